//! Flow sync, the parts that touch this node's datapath (the rest, I/O-free, is in
//! `cluster::flow_sync`): the active node reads each new flow from `FLOW_EVENTS` and
//! names its backend by address; the backup maps addresses to its own backend ids
//! (`cluster::flow_sync::resolve` over `LocalIds for Core`) and writes `FLOWS`.

use std::net::IpAddr;

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{FlowEvent, FlowKey, FlowValue};

use crate::cluster::flow_sync::{LocalIds, from_flow_key};
use crate::cluster::wire::SyncedFlow;
use crate::control::Vip;
use crate::core::Core;
use crate::maps::{MapWriteError, MapWriter};

impl<W: MapWriter> Core<W> {
    /// An event of this node's datapath in addresses; None when the service or backend
    /// is gone already (nothing worth syncing).
    pub fn describe_flow(&self, ev: &FlowEvent) -> Option<SyncedFlow> {
        let svc = self.control().services().into_iter().find(|s| s.id == ev.service_id)?;
        let (spec, _) = svc.backends.iter().find(|(_, id)| *id == ev.backend_id)?;
        Some(from_flow_key(&ev.key, spec.addr))
    }
}

impl<W: MapWriter> LocalIds for Core<W> {
    fn has_service(&self, vip: Vip) -> bool {
        self.control().services().iter().any(|s| s.spec.vip == vip)
    }

    fn backend_id(&self, vip: Vip, backend: IpAddr) -> Option<u32> {
        let svc = self.control().services().into_iter().find(|s| s.spec.vip == vip)?;
        svc.backends.iter().find(|(b, _)| b.addr == backend).map(|(_, id)| *id)
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

    pub fn insert(&mut self, key: FlowKey, backend_id: u32) -> Result<(), MapWriteError> {
        let v = FlowValue { backend_id, _pad: 0, created_ns: monotonic_ns() };
        self.flows.insert(key, v, 0).map_err(|e| MapWriteError { map: lb_common::map_names::FLOWS, detail: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::flow_sync::resolve;
    use crate::control::{BackendSpec, ControlPlane, Mode, ServiceSpec};
    use crate::maps::MemMaps;
    use lb_common::PROTO_TCP;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Two nodes with the same service but backends added in another order: their ids
    /// differ, the addresses carry the flow across.
    #[test]
    fn a_datapath_event_crosses_nodes_by_address_not_id() {
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
        assert_eq!(resolve(&f, &b), Ok((ev.key, id_b)));
        // A backend the other node does not have: not written there.
        let ev1 = FlowEvent { backend_id: a.control().backend_id("web", ip("10.1.0.1")).unwrap(), ..ev };
        assert!(resolve(&a.describe_flow(&ev1).unwrap(), &b).is_err());
        assert!(parse_event(&[0u8; 47]).is_none());
    }
}
