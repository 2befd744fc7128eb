//! Flow sync between the two nodes, the parts without I/O.
//!
//! Sender (active): new `FLOWS` entries go into a bounded `FlowQueue`; each tick the
//! daemon takes at most one budget of them and sends them as FlowBatch datagrams.
//! When the backup (or the link) is slower than new flows arrive, the queue is full
//! and new entries are dropped and counted: memory stays bounded, and a flow that
//! was not synced still lands on the same backend after a failover as long as the
//! backend set did not change (both nodes build the same Maglev table).
//!
//! Receiver (backup): backend ids are allocated per node, so a synced flow names its
//! VIP and backend by address; `resolve` maps them to this node's ids with the same
//! VIP lookup as the datapath (exact port, then port 0). Flows for a VIP or backend
//! this node does not have (config not synced yet) are counted and skipped.

use std::collections::VecDeque;
use std::net::IpAddr;

use lb_common::FlowKey;

use super::wire::SyncedFlow;
use crate::control::Vip;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub queued: u64,
    pub dropped_full: u64,
    pub sent: u64,
}

/// A bounded FIFO of flows waiting to be sent. Full: the new flow is dropped (the
/// queued ones are older and closer to being sent).
#[derive(Debug)]
pub struct FlowQueue {
    cap: usize,
    q: VecDeque<SyncedFlow>,
    pub counters: QueueCounters,
}

impl FlowQueue {
    pub fn new(cap: usize) -> Self {
        // Grows on demand up to `cap`; no up-front allocation of the whole bound.
        Self { cap, q: VecDeque::new(), counters: QueueCounters::default() }
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Flows that still fit.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.q.len())
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// False if the queue was full and the flow dropped.
    pub fn push(&mut self, f: SyncedFlow) -> bool {
        if self.q.len() >= self.cap {
            self.counters.dropped_full = self.counters.dropped_full.saturating_add(1);
            return false;
        }
        self.q.push_back(f);
        self.counters.queued = self.counters.queued.saturating_add(1);
        true
    }

    /// Up to `budget` flows, oldest first: what one tick may send.
    pub fn take(&mut self, budget: usize) -> Vec<SyncedFlow> {
        let n = budget.min(self.q.len());
        self.counters.sent = self.counters.sent.saturating_add(n as u64);
        self.q.drain(..n).collect()
    }

    /// The peer is gone or we are no longer active: queued flows are moot.
    pub fn clear(&mut self) {
        self.q.clear();
    }
}

/// The active side: a `FLOWS` entry as a synced flow, given its backend's address.
pub fn from_flow_key(k: &FlowKey, backend: IpAddr) -> SyncedFlow {
    SyncedFlow {
        client: lb_common::addr_from_words(&k.src),
        client_port: u16::from_be(k.src_port),
        vip: lb_common::addr_from_words(&k.dst),
        vip_port: u16::from_be(k.dst_port),
        proto: k.proto,
        backend,
    }
}

/// This node's ids, as the receiver needs them.
pub trait LocalIds {
    /// Whether a service listens on exactly this VIP.
    fn has_service(&self, vip: Vip) -> bool;
    /// The id of `backend` in the service on exactly this VIP, if it has one.
    fn backend_id(&self, vip: Vip, backend: IpAddr) -> Option<u32>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Miss {
    #[error("no service for the flow's VIP")]
    UnknownVip,
    #[error("the flow's backend is not in the VIP's service here")]
    UnknownBackend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyCounters {
    pub applied: u64,
    pub unknown_vip: u64,
    pub unknown_backend: u64,
}

impl ApplyCounters {
    pub fn count(&mut self, r: &Result<(FlowKey, u32), Miss>) {
        let c = match r {
            Ok(_) => &mut self.applied,
            Err(Miss::UnknownVip) => &mut self.unknown_vip,
            Err(Miss::UnknownBackend) => &mut self.unknown_backend,
        };
        *c = c.saturating_add(1);
    }
}

/// The `FLOWS` key and local backend id for a synced flow.
pub fn resolve(f: &SyncedFlow, ids: &impl LocalIds) -> Result<(FlowKey, u32), Miss> {
    let exact = Vip { addr: f.vip, port: f.vip_port, proto: f.proto };
    let any = Vip { port: 0, ..exact };
    // The service the datapath would pick: exact port first, then the all-ports VIP.
    let vip = [exact, any].into_iter().find(|v| ids.has_service(*v)).ok_or(Miss::UnknownVip)?;
    let id = ids.backend_id(vip, f.backend).ok_or(Miss::UnknownBackend)?;
    Ok((FlowKey::new(f.client, f.client_port, f.vip, f.vip_port, f.proto), id))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lb_common::{PROTO_TCP, PROTO_UDP};

    use super::*;

    fn flow(i: u16, vip_port: u16, backend: &str) -> SyncedFlow {
        SyncedFlow {
            client: "198.51.100.7".parse().unwrap(),
            client_port: 30000 + i,
            vip: "10.0.0.100".parse().unwrap(),
            vip_port,
            proto: PROTO_TCP,
            backend: backend.parse().unwrap(),
        }
    }

    #[test]
    fn queue_is_bounded_drops_new_flows_and_counts() {
        let mut q = FlowQueue::new(3);
        let pushed: Vec<bool> = (0..5).map(|i| q.push(flow(i, 80, "10.0.1.1"))).collect();
        assert_eq!(pushed, vec![true, true, true, false, false]);
        assert_eq!(q.take(2).iter().map(|f| f.client_port).collect::<Vec<_>>(), vec![30000, 30001]);
        assert!(q.push(flow(9, 80, "10.0.1.1")));
        assert_eq!(q.take(100).len(), 2);
        assert!(q.is_empty());
        assert_eq!(q.counters, QueueCounters { queued: 4, dropped_full: 2, sent: 4 });
    }

    /// Two nodes, the same services, backend ids allocated differently.
    struct Ids(BTreeMap<Vip, BTreeMap<IpAddr, u32>>);
    impl LocalIds for Ids {
        fn has_service(&self, vip: Vip) -> bool {
            self.0.contains_key(&vip)
        }
        fn backend_id(&self, vip: Vip, backend: IpAddr) -> Option<u32> {
            self.0.get(&vip)?.get(&backend).copied()
        }
    }

    #[test]
    fn receiver_maps_by_address_to_its_own_ids() {
        let vip80 = Vip { addr: "10.0.0.100".parse().unwrap(), port: 80, proto: PROTO_TCP };
        let vip_any = Vip { port: 0, proto: PROTO_UDP, ..vip80 };
        let mut here = BTreeMap::new();
        here.insert(vip80, BTreeMap::from([("10.0.1.1".parse().unwrap(), 17), ("10.0.1.2".parse().unwrap(), 4)]));
        here.insert(vip_any, BTreeMap::from([("10.0.2.1".parse().unwrap(), 9)]));
        let ids = Ids(here);
        // The active knew 10.0.1.2 as id 1; here it is 4.
        let f = flow(1, 80, "10.0.1.2");
        let (k, id) = resolve(&f, &ids).unwrap();
        assert_eq!(id, 4);
        assert_eq!(k, FlowKey::new(f.client, f.client_port, f.vip, 80, PROTO_TCP));
        assert_eq!(from_flow_key(&k, f.backend), f);
        // An all-ports UDP VIP: found through port 0, keyed with the real port.
        let u = SyncedFlow { proto: PROTO_UDP, vip_port: 5353, backend: "10.0.2.1".parse().unwrap(), ..f };
        let (k, id) = resolve(&u, &ids).unwrap();
        assert_eq!((id, u16::from_be(k.dst_port)), (9, 5353));
        let mut c = ApplyCounters::default();
        for f in [f, u, flow(2, 443, "10.0.1.1"), flow(3, 80, "10.0.9.9")] {
            c.count(&resolve(&f, &ids));
        }
        assert_eq!(c, ApplyCounters { applied: 2, unknown_vip: 1, unknown_backend: 1 });
    }
}
