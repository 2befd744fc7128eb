//! Flow sync off the control path. The owner publishes a `FlowIndex` (address <-> id)
//! after every change; the ring-buffer reader (active node) names each new flow's
//! backend by address through it, and the applier (backup) maps synced flows to local
//! ids through it and writes `FLOWS`. One hash lookup per flow, no configuration
//! copy, no lock shared with the owner.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use lb_common::FlowEvent;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::cluster::flow_sync::{FlowQueue, LocalIds, Miss, from_flow_key, resolve};
use crate::cluster::wire::SyncedFlow;
use crate::control::{ControlPlane, Vip};
use crate::flowsync::{FlowWriter, parse_event};
use crate::maps::MapWriter;

/// New flows read from the ring per wake-up, at most (the rest on the next one).
pub const READ_BUDGET: usize = 16384;
/// The datapath may write events without waking the reader: drain at least this often.
pub const DRAIN_EVERY: Duration = Duration::from_millis(5);
/// Synced flow batches waiting for the applier, at most (each ≤ one datagram's worth).
pub const APPLY_QUEUE: usize = 1024;

/// Address <-> id of every live backend, as the owner last committed them.
#[derive(Debug, Default)]
pub struct FlowIndex {
    /// (service id, backend id) -> backend address: the active side.
    by_id: HashMap<(u32, u32), IpAddr>,
    /// VIP -> backend address -> backend id: the backup side.
    by_vip: HashMap<Vip, HashMap<IpAddr, u32>>,
    /// Backend id (global: the `BACKENDS` index) -> address: a `FLOWS` entry named.
    by_backend: HashMap<u32, IpAddr>,
}

impl FlowIndex {
    pub fn build<W: MapWriter>(cp: &ControlPlane<W>) -> Self {
        let mut ix = FlowIndex::default();
        for s in cp.services() {
            let backends = ix.by_vip.entry(s.spec.vip).or_default();
            for (b, id) in &s.backends {
                backends.insert(b.addr, *id);
                ix.by_id.insert((s.id, *id), b.addr);
                ix.by_backend.insert(*id, b.addr);
            }
        }
        ix
    }

    /// A datapath event in addresses; None when its backend is gone already.
    pub fn describe(&self, ev: &FlowEvent) -> Option<SyncedFlow> {
        let addr = self.by_id.get(&(ev.service_id, ev.backend_id))?;
        Some(from_flow_key(&ev.key, *addr))
    }
}

impl FlowIndex {
    /// A `FLOWS` entry in addresses; None when its backend is gone.
    pub fn describe_entry(&self, key: &lb_common::FlowKey, backend_id: u32) -> Option<SyncedFlow> {
        Some(from_flow_key(key, *self.by_backend.get(&backend_id)?))
    }
}

impl LocalIds for FlowIndex {
    fn has_service(&self, vip: Vip) -> bool {
        self.by_vip.contains_key(&vip)
    }
    fn backend_id(&self, vip: Vip, backend: IpAddr) -> Option<u32> {
        self.by_vip.get(&vip)?.get(&backend).copied()
    }
}

/// Counters of the flow-sync tasks, read by `lbctl cluster status`.
#[derive(Debug, Default)]
pub struct FlowCounters {
    pub applied: AtomicU64,
    pub unknown_vip: AtomicU64,
    pub unknown_backend: AtomicU64,
    /// Synced flows dropped because the applier's queue was full.
    pub dropped_apply_queue: AtomicU64,
    pub write_errors: AtomicU64,
    /// Events read from the ring (active).
    pub events_read: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads FLOW_EVENTS on readiness and every `DRAIN_EVERY`; while `active`, queues
/// each new flow for the peer (bounded, drops counted by the queue).
pub async fn read_events(
    rb: RingBuf<MapData>,
    index: watch::Receiver<Arc<FlowIndex>>,
    active: Arc<AtomicBool>,
    queue: Arc<Mutex<FlowQueue>>,
    counters: Arc<FlowCounters>,
) {
    // SAFETY: the ring buffer owns its fd, which stays open and the same as long as
    // the AsyncFd (its owner) lives.
    let mut fd = match unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "flow events: cannot poll the ring buffer; flow sync off");
            return;
        }
    };
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            r = fd.readable_mut() => match r {
                Ok(mut g) => {
                    drain(g.get_inner_mut(), &index, &active, &queue, &counters, &mut batch);
                    g.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "flow events: polling the ring buffer");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => drain(fd.get_mut(), &index, &active, &queue, &counters, &mut batch),
        }
    }
}

fn drain(
    rb: &mut RingBuf<MapData>,
    index: &watch::Receiver<Arc<FlowIndex>>,
    active: &AtomicBool,
    queue: &Mutex<FlowQueue>,
    counters: &FlowCounters,
    batch: &mut Vec<SyncedFlow>,
) {
    loop {
        let ix = index.borrow().clone();
        let on = active.load(Ordering::Relaxed);
        let mut n = 0;
        while n < READ_BUDGET {
            let Some(item) = rb.next() else { break };
            n += 1;
            if on
                && let Some(ev) = parse_event(&item)
                && let Some(f) = ix.describe(&ev)
            {
                batch.push(f);
            }
        }
        bump(&counters.events_read, n as u64);
        if !batch.is_empty() {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            for f in batch.drain(..) {
                q.push(f);
            }
        }
        if n < READ_BUDGET {
            return;
        }
    }
}

/// Flows per chunk a dump hands to the cluster task.
pub const DUMP_CHUNK: usize = 4096;
/// Entries one dump reads at most (a full default table is 1M).
pub const DUMP_MAX: usize = 1 << 20;

/// Active-active: sends this node's flow table to a peer that (re)joined and holds our
/// config, so a connection ECMP moves onto it keeps its backend even if it started
/// before the peer came (a restarted lbd keeps its pinned table; a new or rebooted
/// node has none). Reads the pinned `FLOWS` through a handle of its own, on a blocking
/// thread, and hands the flows to the cluster task in chunks through a bounded channel
/// (the cluster task takes one only while the peer queues have room).
pub async fn dump_flows(
    mut requests: mpsc::Receiver<std::net::SocketAddr>,
    pin: std::path::PathBuf,
    index: watch::Receiver<Arc<FlowIndex>>,
    out: mpsc::Sender<(std::net::SocketAddr, Vec<SyncedFlow>)>,
) {
    while let Some(peer) = requests.recv().await {
        let (pin, ix, out) = (pin.clone(), index.borrow().clone(), out.clone());
        match tokio::task::spawn_blocking(move || dump_one(&pin, &ix, peer, &out)).await {
            Ok(Ok(n)) => tracing::info!(%peer, flows = n, "cluster: flow table sent to a joining peer"),
            Ok(Err(e)) => warn!(%peer, error = %format!("{e:#}"), "cluster: reading the flow table for a joining peer"),
            Err(e) => warn!(%peer, error = %e, "cluster: the flow-table dump stopped"),
        }
    }
}

fn dump_one(
    pin: &std::path::Path,
    ix: &FlowIndex,
    peer: std::net::SocketAddr,
    out: &mpsc::Sender<(std::net::SocketAddr, Vec<SyncedFlow>)>,
) -> anyhow::Result<usize> {
    use anyhow::Context as _;
    use aya::maps::{HashMap as BpfHashMap, Map};
    let md = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let flows: BpfHashMap<MapData, lb_common::FlowKey, lb_common::FlowValue> = BpfHashMap::try_from(Map::LruHashMap(md))?;
    let (mut chunk, mut n) = (Vec::with_capacity(DUMP_CHUNK), 0);
    // An entry evicted while we walk is an error item: skipped, and counted in the bound.
    for (k, v) in flows.iter().take(DUMP_MAX).flatten() {
        // 0: recorded but not confirmed by a second packet; the ring reports it then.
        if v.created_ns == 0 {
            continue;
        }
        let Some(f) = ix.describe_entry(&k, v.backend_id) else { continue };
        chunk.push(f);
        n += 1;
        if chunk.len() == DUMP_CHUNK && out.blocking_send((peer, std::mem::take(&mut chunk))).is_err() {
            return Ok(n);
        }
    }
    if !chunk.is_empty() {
        let _ = out.blocking_send((peer, chunk));
    }
    Ok(n)
}

/// The backup: writes each synced flow batch into FLOWS under this node's ids.
pub async fn apply_flows(mut rx: mpsc::Receiver<Vec<SyncedFlow>>, index: watch::Receiver<Arc<FlowIndex>>, mut writer: FlowWriter, counters: Arc<FlowCounters>) {
    while let Some(flows) = rx.recv().await {
        let ix = index.borrow().clone();
        apply_batch(&flows, &*ix, |k, id| writer.insert(k, id).is_ok(), &counters);
    }
}

/// Resolves and writes one batch; `write` is the FLOWS write (one place to change
/// when the flow tables change shape).
pub fn apply_batch(flows: &[SyncedFlow], ix: &impl LocalIds, mut write: impl FnMut(lb_common::FlowKey, u32) -> bool, counters: &FlowCounters) {
    for f in flows {
        match resolve(f, ix) {
            Ok((key, id)) => {
                if write(key, id) {
                    bump(&counters.applied, 1);
                } else {
                    bump(&counters.write_errors, 1);
                }
            }
            Err(Miss::UnknownVip) => bump(&counters.unknown_vip, 1),
            Err(Miss::UnknownBackend) => bump(&counters.unknown_backend, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BackendSpec, Mode, ServiceSpec};
    use crate::maps::MemMaps;
    use lb_common::{FlowKey, PROTO_TCP};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Two nodes whose backend ids differ: the index carries a flow across by address.
    #[test]
    fn the_index_describes_and_resolves_by_address() {
        let spec = ServiceSpec { name: "web".into(), vip: "10.0.0.100:80/tcp".parse().unwrap(), mode: Mode::Ipip, table_size: 251, flow_table: true };
        let be = |a: &str| BackendSpec { addr: ip(a), weight: 1, mac: None };
        let mut a = ControlPlane::new(MemMaps::default());
        a.add_service(spec.clone(), vec![be("10.1.0.1"), be("10.1.0.2")]).unwrap();
        let mut b = ControlPlane::new(MemMaps::default());
        b.add_service(spec, vec![be("10.1.0.8"), be("10.1.0.9")]).unwrap();
        b.add_backend("web", be("10.1.0.2")).unwrap();
        let (ia, ib) = (FlowIndex::build(&a), FlowIndex::build(&b));
        let (id_a, id_b) = (a.backend_id("web", ip("10.1.0.2")).unwrap(), b.backend_id("web", ip("10.1.0.2")).unwrap());
        assert_ne!(id_a, id_b);
        let key = FlowKey::new(ip("192.0.2.1"), 40000, ip("10.0.0.100"), 80, PROTO_TCP);
        let ev = FlowEvent { key, backend_id: id_a, service_id: a.service("web").unwrap().id };
        let f = ia.describe(&ev).unwrap();
        assert_eq!(f.backend, ip("10.1.0.2"));
        let c = FlowCounters::default();
        let mut written = Vec::new();
        let other = ia.describe(&FlowEvent { backend_id: a.backend_id("web", ip("10.1.0.1")).unwrap(), ..ev }).unwrap();
        let mut unknown_vip = f;
        unknown_vip.vip = ip("10.0.0.200");
        apply_batch(
            &[f, other, unknown_vip],
            &ib,
            |k, id| {
                written.push((k, id));
                true
            },
            &c,
        );
        assert_eq!(written, vec![(key, id_b)]);
        assert_eq!((c.applied.load(Ordering::Relaxed), c.unknown_backend.load(Ordering::Relaxed), c.unknown_vip.load(Ordering::Relaxed)), (1, 1, 1));
        assert!(ia.describe(&FlowEvent { backend_id: 999, ..ev }).is_none(), "a gone backend is not synced");
    }
}
