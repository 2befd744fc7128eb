//! Flow sync between two balancers: the active node reads each new flow from
//! `FLOW_EVENTS` and describes it by addresses (backend ids are local to each node);
//! the backup maps the addresses to its own ids and writes the flow into its `FLOWS`,
//! so after a takeover established connections keep their backend even if the backend
//! set changed during their life.

use std::net::IpAddr;

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{FlowEvent, FlowKey, FlowValue, addr_from_words};

use crate::control::Vip;
use crate::core::Core;
use crate::maps::{MapWriteError, MapWriter};

/// A flow as both nodes understand it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub client: IpAddr,
    pub client_port: u16,
    /// Destination of the client's packets (the VIP address and the port used).
    pub vip: IpAddr,
    pub vip_port: u16,
    pub proto: u8,
    pub backend: IpAddr,
}

impl Flow {
    pub fn key(&self) -> FlowKey {
        FlowKey::new(self.client, self.client_port, self.vip, self.vip_port, self.proto)
    }
}

impl<W: MapWriter> Core<W> {
    /// An event of this node's datapath in addresses; None when the service or backend
    /// is gone already (nothing worth syncing).
    pub fn describe_flow(&self, ev: &FlowEvent) -> Option<Flow> {
        let svc = self.control().services().into_iter().find(|s| s.id == ev.service_id)?;
        let (spec, _) = svc.backends.iter().find(|(_, id)| *id == ev.backend_id)?;
        Some(Flow {
            client: addr_from_words(&ev.key.src),
            client_port: u16::from_be(ev.key.src_port),
            vip: addr_from_words(&ev.key.dst),
            vip_port: u16::from_be(ev.key.dst_port),
            proto: ev.key.proto,
            backend: spec.addr,
        })
    }

    /// This node's backend id for a synced flow: the service by VIP as the datapath
    /// finds it (exact port, then port 0), the backend by address. None when this node
    /// does not have that backend in that service (then the flow is not written and
    /// the datapath's own pick applies).
    pub fn local_backend_id(&self, f: &Flow) -> Option<u32> {
        let exact = Vip { addr: f.vip, port: f.vip_port, proto: f.proto };
        let any = Vip { port: 0, ..exact };
        let services = self.control().services();
        let svc = services.iter().find(|s| s.spec.vip == exact).or_else(|| services.iter().find(|s| s.spec.vip == any))?;
        svc.backends.iter().find(|(b, _)| b.addr == f.backend).map(|(_, id)| *id)
    }
}

/// Parses one FLOW_EVENTS record.
pub fn parse_event(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() != size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: length checked; FlowEvent is repr(C) plain data, any bit pattern valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlowEvent) })
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes synced flows into this node's FLOWS.
pub struct FlowWriter {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
}

impl FlowWriter {
    pub fn new(flows: BpfHashMap<MapData, FlowKey, FlowValue>) -> Self {
        Self { flows }
    }

    pub fn insert(&mut self, f: &Flow, backend_id: u32) -> Result<(), MapWriteError> {
        let v = FlowValue { backend_id, _pad: 0, created_ns: monotonic_ns() };
        self.flows.insert(f.key(), v, 0).map_err(|e| MapWriteError { map: lb_common::map_names::FLOWS, detail: e.to_string() })
    }

    pub fn get(&self, f: &Flow) -> Option<u32> {
        self.flows.get(&f.key(), 0).ok().map(|v| v.backend_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BackendSpec, ControlPlane, Mode, ServiceSpec};
    use crate::maps::MemMaps;
    use lb_common::PROTO_TCP;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Two nodes with the same service but backends added in another order: their ids
    /// differ, the addresses carry the flow across.
    #[test]
    fn a_flow_crosses_nodes_by_address_not_id() {
        let spec = |vip: &str| ServiceSpec { name: "web".into(), vip: vip.parse().unwrap(), mode: Mode::Ipip, table_size: 251 };
        let be = |a: &str| BackendSpec { addr: ip(a), weight: 1, mac: None };
        let mut a = ControlPlane::new(MemMaps::default());
        a.add_service(spec("10.0.0.100:80/tcp"), vec![be("10.1.0.1"), be("10.1.0.2")]).unwrap();
        let mut b = ControlPlane::new(MemMaps::default());
        b.add_service(spec("10.0.0.100:80/tcp"), vec![be("10.1.0.8"), be("10.1.0.9")]).unwrap();
        b.add_backend("web", be("10.1.0.2")).unwrap();
        let (a, b) = (Core::new(a), Core::new(b));
        let id_a = a.control().backend_id("web", ip("10.1.0.2")).unwrap();
        let id_b = b.control().backend_id("web", ip("10.1.0.2")).unwrap();
        assert_ne!(id_a, id_b);
        let ev = FlowEvent {
            key: FlowKey::new(ip("192.0.2.1"), 40000, ip("10.0.0.100"), 80, PROTO_TCP),
            backend_id: id_a,
            service_id: a.control().service("web").unwrap().id,
        };
        let f = a.describe_flow(&ev).unwrap();
        assert_eq!(f.backend, ip("10.1.0.2"));
        assert_eq!(f.key(), ev.key);
        assert_eq!(b.local_backend_id(&f), Some(id_b));
        // A backend the other node does not have: not written there.
        let ev1 = FlowEvent { backend_id: a.control().backend_id("web", ip("10.1.0.1")).unwrap(), ..ev };
        assert_eq!(b.local_backend_id(&a.describe_flow(&ev1).unwrap()), None);
        assert!(parse_event(&[0u8; 47]).is_none());
    }

    #[test]
    fn port_zero_service_matches_any_port() {
        let mut c = ControlPlane::new(MemMaps::default());
        let spec = ServiceSpec { name: "all".into(), vip: "10.0.0.101:0/tcp".parse().unwrap(), mode: Mode::Ipip, table_size: 251 };
        c.add_service(spec, vec![BackendSpec { addr: ip("10.1.0.5"), weight: 1, mac: None }]).unwrap();
        let core = Core::new(c);
        let f = Flow { client: ip("192.0.2.1"), client_port: 1, vip: ip("10.0.0.101"), vip_port: 8443, proto: PROTO_TCP, backend: ip("10.1.0.5") };
        assert!(core.local_backend_id(&f).is_some());
    }
}
