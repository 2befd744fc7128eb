//! The cluster plane at run time, inside lbd: one UDP socket to the peer, a loop that
//! ticks the election every heartbeat, sends heartbeats, replicates the services and
//! streams new flows; role changes take or release the VIP addresses and turn the
//! datapath's flow reporting on or off. The decisions are in `election`,
//! `config_sync`, `flow_sync` and `wire`; this is the I/O around them.
//!
//! Lock order, as in the daemon: `core` before `cluster`; nothing that can block on
//! the network is done while either is held.

use std::collections::BTreeSet;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::ClusterConfig;
use super::config_sync::{Assembler, ConfigPos, Incoming, Replicator, incoming};
use super::election::{Election, Transition};
use super::flow_sync::{ApplyCounters, FlowQueue, QueueCounters, resolve};
use super::wire::{ETHERNET_DATAGRAM, Header, Message, PeerGuard, Role, Sealer};
use crate::daemon::{Daemon, lock};
use crate::flowsync::{FlowWriter, parse_event};
use crate::model::ServiceDef;

/// Flows waiting for the peer, at most (about 2 MiB).
const FLOW_QUEUE: usize = 65536;
/// Flows sent per tick, at most.
const FLOW_BUDGET: usize = 8192;

pub struct ClusterState {
    pub cfg: ClusterConfig,
    pub election: Election,
    sealer: Sealer,
    guard: PeerGuard,
    queue: FlowQueue,
    applied: ApplyCounters,
    replicator: Replicator,
    assembler: Assembler,
    /// Where our services stand in the pair's order.
    pub pos: ConfigPos,
    /// Send our full config at the next tick (a local change).
    push_config: bool,
    held: BTreeSet<IpAddr>,
    pub epoch: u64,
    started: Instant,
    last_transition: Option<(Transition, Instant)>,
    flow_writer: Option<FlowWriter>,
}

impl ClusterState {
    pub fn new(cfg: ClusterConfig, key: super::wire::Key, pos: ConfigPos, epoch: u64, flow_writer: Option<FlowWriter>) -> Self {
        let started = Instant::now();
        let (sealer, guard) = super::wire::endpoint(key, cfg.node_id, cfg.peer_id, epoch);
        Self {
            election: Election::new(cfg.params(), pos, 0),
            sealer,
            guard,
            queue: FlowQueue::new(FLOW_QUEUE),
            applied: ApplyCounters::default(),
            replicator: Replicator::new(cfg.heartbeat_ms as u64 * 10),
            assembler: Assembler::default(),
            cfg,
            pos,
            push_config: false,
            held: BTreeSet::new(),
            epoch,
            started,
            last_transition: None,
            flow_writer,
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn role(&self) -> Role {
        self.election.role()
    }

    /// A local change of the services (CLI, reload): a new position, sent at once.
    pub fn local_change(&mut self) -> Option<Transition> {
        let now = self.now();
        let peer = self.election.status(now).peer.map(|p| p.heartbeat.config);
        self.pos = self.pos.next(peer, self.cfg.node_id);
        self.push_config = true;
        self.election.set_local_config(now, self.pos)
    }

    fn election_tick(&mut self) -> Option<Transition> {
        let now = self.now();
        self.election.on_tick(now)
    }

    /// `lbctl cluster failover`.
    pub fn failover(&mut self) -> Result<(), String> {
        let now = self.now();
        self.election.request_failover(now).map_err(|e| e.to_string())
    }

    pub fn view(&self, datapath_lost: u64) -> ClusterView {
        let now = self.now();
        let st = self.election.status(now);
        let QueueCounters { queued, dropped_full, sent } = self.queue.counters;
        ClusterView {
            node_id: self.cfg.node_id,
            role: st.role.to_string(),
            priority: self.cfg.priority,
            preempt: self.cfg.preempt,
            synced: st.synced,
            yielding: st.yielding,
            config: st.config.to_string(),
            peer: st.peer.map(|p| PeerStatus {
                node_id: p.node_id,
                role: p.heartbeat.role.to_string(),
                priority: p.heartbeat.priority,
                config: p.heartbeat.config.to_string(),
                alive: st.peer_alive,
                last_heartbeat_ms_ago: st.last_heard_ms_ago.unwrap_or(0),
            }),
            vips_held: self.held.iter().copied().collect(),
            last_change: self.last_transition.map(|(t, at)| {
                format!("{} -> {} ({:?}) {} ms ago", t.from, t.to, t.why, at.elapsed().as_millis())
            }),
            datagrams_accepted: self.guard.counters().accepted,
            datagrams_rejected: self.guard.counters().by_reason().filter(|(_, n)| *n > 0).map(|(r, n)| (r.to_string(), n)).collect(),
            flows_queued: queued,
            flows_sent: sent,
            flows_dropped_queue_full: dropped_full,
            flows_lost_in_datapath: datapath_lost,
            flows_applied: self.applied.applied,
            flows_unknown_vip: self.applied.unknown_vip,
            flows_unknown_backend: self.applied.unknown_backend,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: u32,
    pub role: String,
    pub priority: u8,
    pub config: String,
    pub alive: bool,
    pub last_heartbeat_ms_ago: u64,
}

/// `lbctl cluster status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub node_id: u32,
    pub role: String,
    pub priority: u8,
    pub preempt: bool,
    pub synced: bool,
    pub yielding: bool,
    /// Our services' position: version@origin node.
    pub config: String,
    pub peer: Option<PeerStatus>,
    pub vips_held: Vec<IpAddr>,
    pub last_change: Option<String>,
    pub datagrams_accepted: u64,
    pub datagrams_rejected: Vec<(String, u64)>,
    pub flows_queued: u64,
    pub flows_sent: u64,
    pub flows_dropped_queue_full: u64,
    pub flows_lost_in_datapath: u64,
    pub flows_applied: u64,
    pub flows_unknown_vip: u64,
    pub flows_unknown_backend: u64,
}

fn send_all(sock: &UdpSocket, peer: std::net::SocketAddr, datagrams: Vec<Vec<u8>>) {
    for d in datagrams {
        // A lost datagram is recovered by the protocol (heartbeats repeat, config is
        // resent until acked); a send error is logged once per tick at most.
        if let Err(e) = sock.send_to(&d, peer) {
            warn!(error = %e, %peer, "cluster: send");
            return;
        }
    }
}

impl Daemon {
    /// Starts the cluster threads: the protocol loop and the flow-event reader.
    pub(crate) fn start_cluster(self: &Arc<Self>, sock: UdpSocket, events: Option<RingBuf<MapData>>) {
        // A restarted node may still hold VIPs from a previous life: it holds none
        // until the election says so.
        self.release_all_vips();
        let me = self.clone();
        let _ = std::thread::Builder::new().name("cluster".into()).spawn(move || me.cluster_loop(sock));
        if let Some(rb) = events {
            let me = Arc::downgrade(self);
            let _ = std::thread::Builder::new().name("flow-events".into()).spawn(move || flow_event_loop(me, rb));
        }
    }

    pub(crate) fn release_all_vips(&self) {
        let (Some(c), iface) = (self.cluster.as_ref(), self.vip_interface()) else { return };
        let vips: BTreeSet<IpAddr> = lock(&self.core).services().iter().map(|d| d.vip.addr).collect();
        for v in vips {
            let _ = crate::announce::set_vip(&iface, v, false);
        }
        lock(c).held.clear();
    }

    fn cluster_loop(self: Arc<Self>, sock: UdpSocket) {
        let Some(cl) = self.cluster.as_ref() else { return };
        let (hb_ms, peer) = {
            let c = lock(cl);
            (c.cfg.heartbeat_ms as u64, c.cfg.peer)
        };
        let tick = Duration::from_millis(hb_ms);
        // The election looks at the peer's silence 5 times per heartbeat, so a death is
        // noticed within a fifth of an interval of the dead time, not a whole one.
        let eval = Duration::from_millis((hb_ms / 5).max(1));
        let mut next = Instant::now();
        let mut next_eval = Instant::now();
        let mut buf = vec![0u8; 65536];
        while !self.shutdown.load(Ordering::Relaxed) {
            let wait = next.min(next_eval).saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let _ = sock.set_read_timeout(Some(wait));
            match sock.recv_from(&mut buf) {
                Ok((n, _from)) => self.on_datagram(&sock, peer, &buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => {
                    warn!(error = %e, "cluster: receive");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if Instant::now() >= next_eval {
                next_eval = Instant::now() + eval;
                let t = lock(cl).election_tick();
                if let Some(t) = t {
                    self.on_transition(t);
                }
            }
            if Instant::now() >= next {
                next += tick;
                if next < Instant::now() {
                    next = Instant::now() + tick;
                }
                self.on_tick(&sock, peer);
            }
        }
        // Stopping on purpose: give the VIPs up so the peer's takeover is clean.
        self.release_all_vips();
    }

    fn on_tick(self: &Arc<Self>, sock: &UdpSocket, peer: std::net::SocketAddr) {
        let Some(cl) = self.cluster.as_ref() else { return };
        let (mut out, send_config) = {
            let mut c = lock(cl);
            let now = c.now();
            let mut out = Vec::new();
            let hb = c.election.heartbeat();
            if let Ok(d) = c.sealer.seal(&Message::Heartbeat(hb)) {
                out.push(d);
            }
            if c.role() == Role::Active {
                let flows = c.queue.take(FLOW_BUDGET);
                if !flows.is_empty() {
                    out.extend(c.sealer.seal_flows(&flows, ETHERNET_DATAGRAM).0);
                }
            } else {
                c.queue.clear();
            }
            // Full config: after a local change, or when the peer is behind (paced).
            let peer_pos = c.election.status(now).peer.map(|p| p.heartbeat.config);
            let pos = c.pos;
            let behind = peer_pos.is_some_and(|p| c.replicator.on_peer(now, pos, p));
            (out, std::mem::take(&mut c.push_config) || behind)
        };
        if send_config {
            // Serialised only when sent: a big config is not re-encoded every tick.
            let core = lock(&self.core);
            let services = serde_json::to_vec(&core.services()).unwrap_or_default();
            let mut c = lock(cl);
            let pos = c.pos;
            match c.sealer.seal_config(pos, &services, ETHERNET_DATAGRAM) {
                Ok(ds) => out.extend(ds),
                Err(e) => error!(error = %e, "cluster: encoding the config"),
            }
        }
        send_all(sock, peer, out);
    }

    fn on_datagram(self: &Arc<Self>, sock: &UdpSocket, peer: std::net::SocketAddr, d: &[u8]) {
        let Some(cl) = self.cluster.as_ref() else { return };
        let accepted = {
            let mut c = lock(cl);
            let now = c.now();
            c.guard.accept(now, d)
        };
        let (h, msg): (Header, Message) = match accepted {
            Ok(x) => x,
            Err(r) => {
                if r.log {
                    warn!(error = %r.error, suppressed = r.suppressed, "cluster: datagram refused");
                }
                if r.hello {
                    // Session handshake: answer now, not at the next heartbeat.
                    let d = {
                        let mut c = lock(cl);
                        let hb = c.election.heartbeat();
                        c.sealer.seal(&Message::Heartbeat(hb))
                    };
                    if let Ok(d) = d {
                        send_all(sock, peer, vec![d]);
                    }
                }
                return;
            }
        };
        match msg {
            Message::Heartbeat(hb) => {
                let t = {
                    let mut c = lock(cl);
                    let now = c.now();
                    c.election.on_heartbeat(now, h.node_id, hb)
                };
                if let Some(t) = t {
                    // Answer at once: a split brain resolves within one heartbeat.
                    self.on_transition(t);
                    let hb = lock(cl).election.heartbeat();
                    let d = lock(cl).sealer.seal(&Message::Heartbeat(hb));
                    if let Ok(d) = d {
                        send_all(sock, peer, vec![d]);
                    }
                }
                // A new session: the peer may have missed the config; send now.
                if lock(cl).guard.take_session_started() {
                    self.on_tick(sock, peer);
                }
            }
            Message::ConfigSync(chunk) => {
                let done = lock(cl).assembler.push(chunk);
                match done {
                    Ok(Some((pos, data))) => self.on_peer_config(sock, peer, pos, &data),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "cluster: config chunk refused"),
                }
            }
            Message::ConfigAck(_) => {}
            Message::FlowBatch(flows) => {
                let core = lock(&self.core);
                let mut c = lock(cl);
                for f in &flows {
                    let r = resolve(f, &*core);
                    c.applied.count(&r);
                    if let (Ok((key, id)), Some(w)) = (r, c.flow_writer.as_mut())
                        && let Err(e) = w.insert(key, id)
                    {
                        warn!(error = %e, "cluster: writing a synced flow");
                    }
                }
            }
        }
    }

    fn on_peer_config(self: &Arc<Self>, sock: &UdpSocket, peer: std::net::SocketAddr, pos: ConfigPos, data: &[u8]) {
        let Some(cl) = self.cluster.as_ref() else { return };
        let mut core = lock(&self.core);
        let decision = incoming(lock(cl).pos, pos);
        let mut t = None;
        match decision {
            Incoming::Apply => {
                let defs: Vec<ServiceDef> = match serde_json::from_slice(data) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, %pos, "cluster: peer's config unreadable; kept ours");
                        return;
                    }
                };
                match core.replace_all(defs) {
                    Ok(changed) => {
                        info!(%pos, changed = ?changed, "cluster: applied the peer's config");
                        let mut c = lock(cl);
                        c.pos = pos;
                        let now = c.now();
                        t = c.election.set_local_config(now, pos);
                    }
                    Err(e) => {
                        error!(error = %e, %pos, "cluster: peer's config rejected; kept ours");
                        return;
                    }
                }
                if let Err(e) = self.persist(&core) {
                    error!(error = %format!("{e:#}"), "saving state after a peer config");
                }
            }
            Incoming::AlreadyHave => {}
            Incoming::Older => return,
        }
        drop(core);
        self.sync_health();
        if let Ok(d) = lock(cl).sealer.seal(&Message::ConfigAck(pos)) {
            send_all(sock, peer, vec![d]);
        }
        if let Some(t) = t {
            self.on_transition(t);
        }
        self.sync_vips();
    }

    pub(crate) fn on_transition(self: &Arc<Self>, t: Transition) {
        if let Some(cl) = self.cluster.as_ref() {
            lock(cl).last_transition = Some((t, Instant::now()));
        }
        info!(from = %t.from, to = %t.to, why = ?t.why, "cluster: role change");
        // The active node reports new flows for the peer; a backup does not.
        let active = t.to == Role::Active;
        self.flow_sync_on.store(active, Ordering::Relaxed);
        {
            let mut core = lock(&self.core);
            let s = self.settings_now(&lock(&self.cfg));
            if let Err(e) = core.set_settings(s) {
                error!(error = %e, "cluster: switching flow reporting");
            }
        }
        self.sync_vips();
    }

    /// Holds exactly the services' VIPs when active, none otherwise; announces new ones.
    pub(crate) fn sync_vips(&self) {
        let Some(cl) = self.cluster.as_ref() else { return };
        let iface = self.vip_interface();
        let active = lock(cl).role() == Role::Active;
        let want: BTreeSet<IpAddr> = if active { lock(&self.core).services().iter().map(|d| d.vip.addr).collect() } else { BTreeSet::new() };
        let held = lock(cl).held.clone();
        for v in want.difference(&held) {
            match crate::announce::set_vip(&iface, *v, true) {
                Ok(()) => {
                    // Twice: one lost gratuitous ARP must not leave clients on the old node.
                    for _ in 0..2 {
                        if let Err(e) = crate::announce::announce(&iface, *v) {
                            warn!(vip = %v, error = %e, "cluster: announcing a VIP");
                        }
                    }
                    lock(cl).held.insert(*v);
                }
                Err(e) => error!(vip = %v, error = %e, "cluster: taking a VIP"),
            }
        }
        for v in held.difference(&want) {
            match crate::announce::set_vip(&iface, *v, false) {
                Ok(()) => {
                    lock(cl).held.remove(v);
                }
                Err(e) => error!(vip = %v, error = %e, "cluster: releasing a VIP"),
            }
        }
    }

    /// VIPs live on the first configured interface.
    fn vip_interface(&self) -> String {
        lock(&self.cfg).interfaces.first().cloned().unwrap_or_default()
    }
}

/// Reads FLOW_EVENTS; on the active node, queues each new flow for the peer.
fn flow_event_loop(d: std::sync::Weak<Daemon>, mut rb: RingBuf<MapData>) {
    loop {
        let mut p = libc::pollfd { fd: rb.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd for at most 200 ms.
        unsafe { libc::poll(&mut p, 1, 200) };
        let Some(d) = d.upgrade() else { return };
        if d.shutdown.load(Ordering::Relaxed) {
            return;
        }
        let mut events = Vec::new();
        while let Some(item) = rb.next() {
            if let Some(ev) = parse_event(&item) {
                events.push(ev);
            }
            if events.len() >= FLOW_BUDGET {
                break;
            }
        }
        if events.is_empty() {
            continue;
        }
        let core = lock(&d.core);
        let Some(cl) = d.cluster.as_ref() else { return };
        let mut c = lock(cl);
        if c.role() != Role::Active {
            continue;
        }
        for ev in &events {
            if let Some(f) = core.describe_flow(ev) {
                c.queue.push(f);
            }
        }
    }
}
