//! Active-active (`[cluster]` with `[bgp]`): N nodes behind ECMP, every one
//! forwarding. No election: the routers decide which node gets a packet, so the
//! cluster plane only keeps the nodes alike.
//!
//! - **Liveness**: every node heartbeats every peer each `heartbeat_ms`; a peer is
//!   alive while heard within `dead_after` intervals. Each peer link has its own
//!   session (`wire::endpoint`): nonces and sequence numbers are per pair of nodes.
//! - **Config**: the same total order as the pair, (version, lower origin node id)
//!   (`config_sync::ConfigPos`). A node sends its whole config to every peer whose
//!   heartbeat shows an older position (paced per peer by a `Replicator`), and at once
//!   to all after a local change. A node applies any config newer than its own, from
//!   whichever peer, so the newest position reaches everyone (relayed by every node
//!   that has it), and concurrent changes end with the same winner everywhere.
//! - **Flows**: new flows (from the datapath's ring, through the shared intake queue)
//!   fan out to every live peer. Each peer has its own bounded queue, filled only
//!   while it is alive and drained by a per-tick budget: a dead or slow peer costs
//!   its own queue (its drops are counted against it) and never delays another's.
//!   A shared queue with one cursor per peer would keep one copy of each flow, but
//!   the slowest peer would then hold the tail for everyone, or need the same
//!   per-peer drop accounting anyway; a flow is 40 bytes, so copies are cheap.
//!   Receivers translate backend ids by address as in the pair (`flow_sync::resolve`).
//! - **Joining peers**: a peer whose session starts gets our whole flow table once its
//!   heartbeat shows our config (`take_dump_requests`; the daemon reads the table and
//!   feeds it back through `enqueue_dump` while the peer queues have room).
//!
//! `Mesh` is the state without I/O (tests drive three of them through memory);
//! `run` is the task around it: one socket, one thread, no lock across I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::PeerConfig;
use super::config_sync::{Assembler, ConfigPos, Incoming, Replicator, incoming};
use super::election::{Transition, Why};
use super::flow_sync::FlowQueue;
use super::node::{ClusterCmd, ClusterEvent, ClusterSnapshot, ClusterTask, ClusterView, PeerSnap};
use super::wire::{
    self, ETHERNET_DATAGRAM, Heartbeat, Key, Message, PeerGuard, Role, Sealer, SyncedFlow,
};

/// Datagrams to send, each with its peer's address.
pub type Out = Vec<(SocketAddr, Vec<u8>)>;

/// What a received datagram asks of the daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum MeshEvent {
    /// A complete config newer than ours: the owner validates and applies it.
    PeerConfig(ConfigPos, Vec<u8>),
    /// Flows a peer created: for the applier (ids translated there).
    Flows(Vec<SyncedFlow>),
}

/// One peer as `lbctl cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeerStatus {
    pub address: SocketAddr,
    /// Configured, or learnt from its first authentic datagram.
    pub node_id: Option<u32>,
    pub alive: bool,
    pub last_heartbeat_ms_ago: Option<u64>,
    /// Its config position as last heard.
    pub config: Option<String>,
    /// Longest silence between two heartbeats heard, ms.
    pub gap_max_ms: u64,
    pub datagrams_accepted: u64,
    pub datagrams_rejected: u64,
    pub full_syncs_sent: u64,
    pub flows_queued: u64,
    pub flows_sent: u64,
    pub flows_dropped_queue_full: u64,
    /// New flows not queued for it because it was not alive.
    pub flows_skipped_peer_down: u64,
    /// Flows of our flow table sent when it (re)joined.
    #[serde(default)]
    pub flows_dumped: u64,
}

struct PeerLink {
    address: SocketAddr,
    sealer: Sealer,
    guard: PeerGuard,
    assembler: Assembler,
    replicator: Replicator,
    /// The last heartbeat heard, and when (ms on the mesh's clock).
    heard: Option<(u64, Heartbeat)>,
    gap_max_ms: u64,
    queue: FlowQueue,
    skipped_down: u64,
    /// A session started: send it our flow table once it holds our config.
    dump_due: bool,
    dumped: u64,
    /// It announced a role other than active (it runs the pair's election, so its
    /// `[bgp]` is missing): said once in the log until it announces active again.
    mode_warned: bool,
}

/// Per-peer state of an active-active node. Calls return the datagrams to send; the
/// caller sends them (and nothing here blocks on a peer). `now` is in ms since this
/// node's cluster task started.
pub struct Mesh {
    dead_ms: u64,
    pos: ConfigPos,
    services: Arc<Vec<u8>>,
    peers: Vec<PeerLink>,
    /// Authentic or not, from no configured peer (address and claimed id unknown).
    pub unknown_sender: u64,
    /// Chunks refused by a peer's assembler (lost chunk; the resend recovers).
    pub chunks_refused: u64,
    /// A peer came alive or announced another config since `take_changed`.
    changed: bool,
    /// Peers to send our flow table to (`take_dump_requests`).
    dump_requests: Vec<SocketAddr>,
}

/// Flows sent per peer per heartbeat, at most (as the pair: 160k flows/s at 100 ms).
pub const FLOW_BUDGET: usize = 16384;

impl Mesh {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: u32,
        heartbeat_ms: u64,
        dead_after: u64,
        key: &Key,
        epoch: u64,
        peers: &[PeerConfig],
        pos: ConfigPos,
        services: Arc<Vec<u8>>,
        queue_cap: usize,
    ) -> Self {
        let peers = peers
            .iter()
            .map(|p| {
                let (sealer, guard) = wire::endpoint(key.clone(), node_id, p.node_id, epoch);
                PeerLink {
                    address: p.address,
                    sealer,
                    guard,
                    assembler: Assembler::default(),
                    replicator: Replicator::new(heartbeat_ms.saturating_mul(10)),
                    heard: None,
                    gap_max_ms: 0,
                    queue: FlowQueue::new(queue_cap),
                    skipped_down: 0,
                    dump_due: false,
                    dumped: 0,
                    mode_warned: false,
                }
            })
            .collect();
        Self {
            dead_ms: heartbeat_ms.saturating_mul(dead_after),
            pos,
            services,
            peers,
            unknown_sender: 0,
            chunks_refused: 0,
            changed: false,
            dump_requests: Vec::new(),
        }
    }

    pub fn pos(&self) -> ConfigPos {
        self.pos
    }

    fn alive(&self, i: usize, now: u64) -> bool {
        self.peers[i]
            .heard
            .is_some_and(|(at, _)| now.saturating_sub(at) < self.dead_ms)
    }

    /// The newest position any peer announced: a local change is numbered after it.
    pub fn peer_pos_max(&self) -> Option<ConfigPos> {
        self.peers
            .iter()
            .filter_map(|p| p.heard.map(|(_, hb)| hb.config))
            .max()
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            priority: 0,
            role: Role::Active,
            preempt: false,
            config: self.pos,
            synced: self.peer_pos_max().is_none_or(|p| self.pos >= p),
            yielding: false,
        }
    }

    fn seal_to(&mut self, i: usize, m: &Message, out: &mut Out) {
        let p = &mut self.peers[i];
        match p.sealer.seal(m) {
            Ok(d) => out.push((p.address, d)),
            Err(e) => error!(error = %e, peer = %p.address, "cluster: encoding a datagram"),
        }
    }

    fn heartbeat_to(&mut self, i: usize, out: &mut Out) {
        let hb = Message::Heartbeat(self.heartbeat());
        self.seal_to(i, &hb, out);
    }

    /// The whole config to peer `i` if `force`, or if its last heartbeat shows it
    /// behind (paced).
    fn config_to(&mut self, i: usize, now: u64, force: bool, out: &mut Out) {
        let pos = self.pos;
        let p = &mut self.peers[i];
        let behind = p
            .heard
            .is_some_and(|(_, hb)| p.replicator.on_peer(now, pos, hb.config));
        if !(force || behind) {
            return;
        }
        match p.sealer.seal_config(pos, &self.services, ETHERNET_DATAGRAM) {
            Ok(ds) => out.extend(ds.into_iter().map(|d| (p.address, d))),
            Err(e) => error!(error = %e, "cluster: encoding the config"),
        }
    }

    /// Every heartbeat interval: a heartbeat to each peer, the new flows to each live
    /// one (at most a budget per peer), the config to each peer that is behind.
    pub fn on_tick(&mut self, now: u64, new_flows: &[SyncedFlow], out: &mut Out) {
        for i in 0..self.peers.len() {
            self.heartbeat_to(i, out);
            let alive = self.alive(i, now);
            let p = &mut self.peers[i];
            if alive {
                for f in new_flows {
                    p.queue.push(*f);
                }
            } else {
                // Nobody to send them to; a returning peer gets the flows from then on.
                p.skipped_down = p.skipped_down.saturating_add(new_flows.len() as u64);
                p.queue.clear();
            }
            let flows = p.queue.take(FLOW_BUDGET);
            if !flows.is_empty() {
                out.extend(
                    p.sealer
                        .seal_flows(&flows, ETHERNET_DATAGRAM)
                        .0
                        .into_iter()
                        .map(|d| (p.address, d)),
                );
            }
            self.config_to(i, now, false, out);
        }
    }

    /// A local change: its position, and the config to every peer at once.
    pub fn local_change(
        &mut self,
        now: u64,
        pos: ConfigPos,
        services: Arc<Vec<u8>>,
        out: &mut Out,
    ) {
        self.pos = pos;
        self.services = services;
        for i in 0..self.peers.len() {
            self.config_to(i, now, true, out);
        }
    }

    /// A peer's config is what we run now: tell every peer (a heartbeat carries our
    /// position) and pass it on to those still behind.
    pub fn applied(&mut self, now: u64, pos: ConfigPos, services: Arc<Vec<u8>>, out: &mut Out) {
        self.pos = pos;
        self.services = services;
        for i in 0..self.peers.len() {
            self.heartbeat_to(i, out);
            self.config_to(i, now, false, out);
        }
    }

    /// The configured peer a datagram is from: by the node id it claims (once that
    /// peer's id is known), else by its source address. The peer's guard then
    /// authenticates it, so a wrong guess only costs a refused datagram.
    fn peer_of(&self, from: SocketAddr, d: &[u8]) -> Option<usize> {
        let claimed = wire::peek_node_id(d);
        claimed
            .and_then(|id| {
                self.peers
                    .iter()
                    .position(|p| p.guard.peer_id() == Some(id))
            })
            .or_else(|| self.peers.iter().position(|p| p.address == from))
    }

    /// One datagram received from `from`.
    pub fn on_datagram(
        &mut self,
        now: u64,
        from: SocketAddr,
        d: &[u8],
        out: &mut Out,
        events: &mut Vec<MeshEvent>,
    ) {
        let Some(i) = self.peer_of(from, d) else {
            self.unknown_sender = self.unknown_sender.saturating_add(1);
            if self.unknown_sender.is_power_of_two() {
                warn!(%from, count = self.unknown_sender, "cluster: datagram from no configured peer");
            }
            return;
        };
        let (_, msg) = match self.peers[i].guard.accept(now, d) {
            Ok(x) => x,
            Err(r) => {
                if r.log {
                    warn!(error = %r.error, peer = %self.peers[i].address, suppressed = r.suppressed, "cluster: datagram refused");
                }
                if r.hello {
                    // Session handshake: answer now, not at the next heartbeat.
                    self.heartbeat_to(i, out);
                }
                return;
            }
        };
        match msg {
            Message::Heartbeat(hb) => {
                let was_alive = self.alive(i, now);
                let p = &mut self.peers[i];
                self.changed |=
                    !was_alive || p.heard.is_none_or(|(_, old)| old.config != hb.config);
                if let Some((prev, _)) = p.heard {
                    p.gap_max_ms = p.gap_max_ms.max(now.saturating_sub(prev));
                }
                p.heard = Some((now, hb));
                let started = p.guard.take_session_started();
                let mismatch = hb.role != Role::Active;
                if mismatch && !p.mode_warned {
                    warn!(peer = %p.address, role = %hb.role, "cluster: this peer runs the active/backup election (no [bgp] there?); every node of an active-active cluster needs [bgp]");
                }
                p.mode_warned = mismatch;
                // A new session: the peer (re)joined. Its flow table may lack flows that
                // started before; ours follows once it runs our config (else they would
                // not resolve there).
                // Not for sessions of our own start (`now` counts from it): then it is
                // we who joined; the peers were up and already hold what we had.
                p.dump_due |= started && now >= self.dead_ms;
                if p.dump_due && hb.config == self.pos {
                    p.dump_due = false;
                    self.dump_requests.push(p.address);
                }
                // A new session: the peer may have missed the config; send it now.
                if started {
                    self.heartbeat_to(i, out);
                    self.config_to(i, now, false, out);
                }
            }
            Message::ConfigSync(chunk) => match self.peers[i].assembler.push(chunk) {
                Ok(Some((pos, data))) => match incoming(self.pos, pos) {
                    Incoming::Apply => events.push(MeshEvent::PeerConfig(pos, data)),
                    Incoming::AlreadyHave => self.seal_to(i, &Message::ConfigAck(pos), out),
                    Incoming::Older => {}
                },
                Ok(None) => {}
                Err(e) => {
                    self.chunks_refused = self.chunks_refused.saturating_add(1);
                    warn!(error = %e, peer = %self.peers[i].address, "cluster: config chunk refused");
                }
            },
            Message::ConfigAck(_) => {}
            Message::FlowBatch(flows) => events.push(MeshEvent::Flows(flows)),
        }
    }

    /// Peers that joined and hold our config since the last call: the daemon sends
    /// them our flow table (`enqueue_dump`).
    pub fn take_dump_requests(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.dump_requests)
    }

    /// Every peer queue has room for `n` more flows: a dump chunk may come in.
    pub fn room_for(&self, n: usize) -> bool {
        self.peers.iter().all(|p| p.queue.room() >= n)
    }

    /// Flows of our table for peer `to` (dropped, counted, when its queue is full or
    /// it died meanwhile).
    pub fn enqueue_dump(&mut self, now: u64, to: SocketAddr, flows: &[SyncedFlow]) {
        let Some(i) = self.peers.iter().position(|p| p.address == to) else {
            return;
        };
        let alive = self.alive(i, now);
        let p = &mut self.peers[i];
        if !alive {
            p.skipped_down = p.skipped_down.saturating_add(flows.len() as u64);
            return;
        }
        for f in flows {
            if p.queue.push(*f) {
                p.dumped = p.dumped.saturating_add(1);
            }
        }
    }

    /// True once after a peer came alive or changed its config: worth publishing now
    /// rather than at the next tick (the owner numbers local changes after it).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn peer_status(&self, now: u64) -> Vec<MeshPeerStatus> {
        (0..self.peers.len())
            .map(|i| {
                let p = &self.peers[i];
                let c = p.guard.counters();
                MeshPeerStatus {
                    address: p.address,
                    node_id: p.guard.peer_id(),
                    alive: self.alive(i, now),
                    last_heartbeat_ms_ago: p.heard.map(|(at, _)| now.saturating_sub(at)),
                    config: p.heard.map(|(_, hb)| hb.config.to_string()),
                    gap_max_ms: p.gap_max_ms,
                    datagrams_accepted: c.accepted,
                    datagrams_rejected: c.rejected_total(),
                    full_syncs_sent: p.replicator.full_syncs_sent,
                    flows_queued: p.queue.counters.queued,
                    flows_sent: p.queue.counters.sent,
                    flows_dropped_queue_full: p.queue.counters.dropped_full,
                    flows_skipped_peer_down: p.skipped_down,
                    flows_dumped: p.dumped,
                }
            })
            .collect()
    }

    /// What the owner reads without asking.
    pub fn snapshot(&self, now: u64) -> ClusterSnapshot {
        let peers: Vec<PeerSnap> = (0..self.peers.len())
            .map(|i| {
                let p = &self.peers[i];
                PeerSnap {
                    address: p.address,
                    node_id: p.guard.peer_id(),
                    alive: self.alive(i, now),
                    last_heard_ms_ago: p.heard.map(|(at, _)| now.saturating_sub(at)),
                    pos: p.heard.map(|(_, hb)| hb.config),
                }
            })
            .collect();
        ClusterSnapshot {
            role: Role::Active,
            peer_pos: self.peer_pos_max(),
            peer_alive: peers.iter().any(|p| p.alive),
            peer_node: None,
            peer_role: None,
            last_heard_ms_ago: peers.iter().filter_map(|p| p.last_heard_ms_ago).min(),
            peers: Arc::new(peers),
        }
    }
}

/// The active-active cluster task: the `Mesh` around one socket.
pub(super) async fn run(
    mut t: ClusterTask,
    sock: tokio::net::UdpSocket,
    mut cmds: mpsc::UnboundedReceiver<ClusterCmd>,
) {
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64;
    let peers = t.cfg.peer_list();
    let mut mesh = Mesh::new(
        t.cfg.node_id,
        t.cfg.heartbeat_ms as u64,
        t.cfg.dead_after as u64,
        &t.key,
        t.epoch,
        &peers,
        t.pos,
        t.services.clone(),
        super::node::FLOW_QUEUE,
    );
    info!(node = t.cfg.node_id, peers = ?peers.iter().map(|p| p.address).collect::<Vec<_>>(), "cluster: active-active");
    // No election: forwarding (and flow reporting) starts now.
    let _ = t.events.send(ClusterEvent::Role(Transition {
        from: Role::Init,
        to: Role::Active,
        why: Why::ActiveActive,
    }));
    let mut push = t.push_config;
    let mut tick = tokio::time::interval(Duration::from_millis(t.cfg.heartbeat_ms as u64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65536];
    let mut send_errors = SendErrors::default();
    let (dump_tx, mut dump_rx) = match t.dump.take() {
        Some(d) => (Some(d.requests), Some(d.chunks)),
        None => (None, None),
    };
    loop {
        // A chunk of our flow table only while every peer queue can take it whole.
        let dump_room = mesh.room_for(crate::daemon::flows::DUMP_CHUNK);
        let mut out = Out::new();
        let mut events = Vec::new();
        tokio::select! {
            biased;
            _ = tick.tick() => {
                let n = now();
                if std::mem::take(&mut push) {
                    let (pos, services) = (mesh.pos(), t.services.clone());
                    mesh.local_change(n, pos, services, &mut out);
                }
                // The reader's lock is held only to move the flows out, never across I/O.
                let flows = t.queue.lock().unwrap_or_else(|e| e.into_inner()).take(FLOW_BUDGET);
                mesh.on_tick(n, &flows, &mut out);
                t.snapshot.send_replace(mesh.snapshot(n));
            }
            res = sock.recv_from(&mut buf) => match res {
                Ok((len, from)) => {
                    let n = now();
                    mesh.on_datagram(n, from, &buf[..len], &mut out, &mut events);
                    if mesh.take_changed() {
                        t.snapshot.send_replace(mesh.snapshot(n));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cluster: receive");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some((to, flows)) = recv_or_pending(&mut dump_rx), if dump_room => {
                mesh.enqueue_dump(now(), to, &flows);
            }
            c = cmds.recv() => match c {
                None | Some(ClusterCmd::Stop) => return,
                Some(ClusterCmd::LocalChange { pos, services }) => mesh.local_change(now(), pos, services, &mut out),
                Some(ClusterCmd::Applied { pos, services }) => mesh.applied(now(), pos, services, &mut out),
                Some(ClusterCmd::Failover(reply)) => {
                    let _ = reply.send(Err("active-active ([bgp]): every node forwards, there is no active role to hand over; use `lbctl node drain`".into()));
                }
                Some(ClusterCmd::Status(reply)) => {
                    let _ = reply.send(view(&t, &mesh, now()));
                }
            },
        }
        for e in events {
            match e {
                MeshEvent::PeerConfig(pos, data) => {
                    let _ = t.events.send(ClusterEvent::PeerConfig(pos, data));
                }
                MeshEvent::Flows(flows) => {
                    let n = flows.len() as u64;
                    if t.apply.try_send(flows).is_err() {
                        t.counters
                            .dropped_apply_queue
                            .fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
        for to in mesh.take_dump_requests() {
            if let Some(tx) = &dump_tx
                && tx.try_send(to).is_err()
            {
                warn!(peer = %to, "cluster: flow-table dump requests queue full; the peer gets new flows only");
            }
        }
        for (to, d) in out {
            // A lost datagram is recovered by the protocol (heartbeats repeat, config is
            // resent until the peer's heartbeat shows it, a flow is left to Maglev). One
            // peer's error never stops the datagrams of another.
            if let Err(e) = sock.send_to(&d, to).await {
                send_errors.note(to, &e);
            }
        }
    }
}

/// The next item of an optional channel; never ready without one.
async fn recv_or_pending<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Send errors, logged at most once per peer per 10 s.
#[derive(Default)]
struct SendErrors {
    /// Per peer: when its last error was logged (None: never), errors since start.
    last: std::collections::HashMap<SocketAddr, (Option<Instant>, u64)>,
}

impl SendErrors {
    fn note(&mut self, to: SocketAddr, e: &std::io::Error) {
        let (at, n) = self.last.entry(to).or_insert((None, 0));
        *n += 1;
        if at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            warn!(error = %e, peer = %to, errors = *n, "cluster: send");
            *at = Some(Instant::now());
        }
    }
}

fn view(t: &ClusterTask, mesh: &Mesh, now: u64) -> ClusterView {
    let peers = mesh.peer_status(now);
    let q = t.queue.lock().unwrap_or_else(|e| e.into_inner()).counters;
    let c = &t.counters;
    let lost = t
        .sync_stats
        .as_ref()
        .and_then(|m| m.get(&0, 0).ok())
        .map_or(0, |v| v.iter().sum());
    ClusterView {
        node_id: t.cfg.node_id,
        role: Role::Active.to_string(),
        priority: t.cfg.priority,
        preempt: false,
        synced: mesh.peer_pos_max().is_none_or(|p| mesh.pos() >= p),
        yielding: false,
        config: mesh.pos().to_string(),
        peer: None,
        vips_held: t.held.borrow().clone(),
        last_change: None,
        role_changes: 0,
        heartbeat_interval_p99_ms: 0.0,
        heartbeat_interval_max_ms: 0.0,
        peer_gap_max_ms: peers.iter().map(|p| p.gap_max_ms).max().unwrap_or(0),
        datagrams_accepted: peers.iter().map(|p| p.datagrams_accepted).sum(),
        datagrams_rejected: [
            ("no_such_peer".to_string(), mesh.unknown_sender),
            (
                "rejected_by_peer_guards".to_string(),
                peers.iter().map(|p| p.datagrams_rejected).sum(),
            ),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect(),
        flows_queued: q.queued,
        flows_sent: peers.iter().map(|p| p.flows_sent).sum(),
        flows_dropped_queue_full: q.dropped_full
            + peers
                .iter()
                .map(|p| p.flows_dropped_queue_full)
                .sum::<u64>(),
        flows_lost_in_datapath: lost,
        flows_applied: c.applied.load(Ordering::Relaxed),
        flows_unknown_vip: c.unknown_vip.load(Ordering::Relaxed),
        flows_unknown_backend: c.unknown_backend.load(Ordering::Relaxed),
        flows_dropped_apply_queue: c.dropped_apply_queue.load(Ordering::Relaxed),
        mode: MODE_ACTIVE_ACTIVE.into(),
        peers,
    }
}

pub const MODE_ACTIVE_ACTIVE: &str = "active-active";
pub const MODE_ACTIVE_BACKUP: &str = "active-backup";

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;

    use lb_common::PROTO_TCP;

    use super::*;
    use crate::cluster::flow_sync::{LocalIds, resolve};
    use crate::control::Vip;

    const HB: u64 = 100;

    fn addr(i: usize) -> SocketAddr {
        format!("192.0.2.{}:7946", i + 1).parse().unwrap()
    }

    /// `n` nodes (ids 1..=n) exchanging datagrams through memory; the test plays the
    /// owner (applies any newer peer config at once) and can take nodes down.
    struct Net {
        nodes: Vec<Mesh>,
        down: BTreeSet<usize>,
        /// Flows each node received, in order.
        flows_in: Vec<Vec<SyncedFlow>>,
        now: u64,
        key: Key,
        /// Nodes whose owner does not apply peer configs (yet).
        frozen: BTreeSet<usize>,
    }

    impl Net {
        fn new(n: usize, pos: impl Fn(usize) -> ConfigPos) -> Self {
            let key = Key::new(b"0123456789abcdef0123").unwrap();
            let nodes = (0..n).map(|i| Self::node(&key, n, i, pos(i))).collect();
            Net {
                nodes,
                down: BTreeSet::new(),
                frozen: BTreeSet::new(),
                flows_in: vec![Vec::new(); n],
                now: 0,
                key,
            }
        }

        fn node(key: &Key, n: usize, i: usize, pos: ConfigPos) -> Mesh {
            // Node ids configured for some peers and learnt for others.
            let peers: Vec<PeerConfig> = (0..n)
                .filter(|&j| j != i)
                .map(|j| PeerConfig {
                    address: addr(j),
                    node_id: (j % 2 == 0).then_some(j as u32 + 1),
                })
                .collect();
            Mesh::new(
                i as u32 + 1,
                HB,
                3,
                key,
                1000 + i as u64,
                &peers,
                pos,
                Arc::new(format!("services of node {}", i + 1).into_bytes()),
                64,
            )
        }

        /// A node restarts (new sessions, nothing learnt) with the position it saved.
        fn restart(&mut self, i: usize) {
            let pos = self.nodes[i].pos();
            let services = self.nodes[i].services.clone();
            let n = self.nodes.len();
            self.nodes[i] = Self::node(&self.key, n, i, pos);
            self.nodes[i].services = services;
        }

        fn deliver(&mut self, from: usize, out: Out) {
            let mut queue: Vec<(usize, Out)> = vec![(from, out)];
            // Bounded: each round answers the previous one's datagrams.
            for _ in 0..50 {
                let Some((src, out)) = queue.pop() else {
                    return;
                };
                if self.down.contains(&src) {
                    continue;
                }
                for (to, d) in out {
                    let j = (0..self.nodes.len()).find(|&j| addr(j) == to).unwrap();
                    if self.down.contains(&j) {
                        continue;
                    }
                    let (mut o, mut ev) = (Out::new(), Vec::new());
                    self.nodes[j].on_datagram(self.now, addr(src), &d, &mut o, &mut ev);
                    for e in ev {
                        match e {
                            MeshEvent::PeerConfig(pos, data) => {
                                // The owner applies it if still newer, then acknowledges.
                                if incoming(self.nodes[j].pos(), pos) == Incoming::Apply
                                    && !self.frozen.contains(&j)
                                {
                                    self.nodes[j].applied(self.now, pos, Arc::new(data), &mut o);
                                }
                            }
                            MeshEvent::Flows(f) => self.flows_in[j].extend(f),
                        }
                    }
                    queue.push((j, o));
                }
            }
            panic!("datagrams still bouncing after 50 rounds");
        }

        /// `ms` of heartbeat ticks on every live node.
        fn run(&mut self, ms: u64) {
            for _ in 0..ms / HB {
                self.now += HB;
                for i in 0..self.nodes.len() {
                    if self.down.contains(&i) {
                        continue;
                    }
                    let mut out = Out::new();
                    self.nodes[i].on_tick(self.now, &[], &mut out);
                    self.deliver(i, out);
                }
            }
        }

        fn change(&mut self, i: usize, what: &str) -> ConfigPos {
            let pos = self.nodes[i]
                .pos()
                .next(self.nodes[i].peer_pos_max(), i as u32 + 1);
            let mut out = Out::new();
            self.nodes[i].local_change(self.now, pos, Arc::new(what.as_bytes().to_vec()), &mut out);
            self.deliver(i, out);
            pos
        }

        fn new_flows(&mut self, i: usize, flows: &[SyncedFlow]) {
            self.now += HB;
            let mut out = Out::new();
            self.nodes[i].on_tick(self.now, flows, &mut out);
            self.deliver(i, out);
        }

        fn configs(&self) -> Vec<(ConfigPos, String)> {
            self.nodes
                .iter()
                .map(|m| (m.pos(), String::from_utf8(m.services.to_vec()).unwrap()))
                .collect()
        }
    }

    fn p(version: u64, origin: u32) -> ConfigPos {
        ConfigPos { version, origin }
    }

    fn flow(i: u16, backend: &str) -> SyncedFlow {
        SyncedFlow {
            client: "198.51.100.7".parse().unwrap(),
            client_port: 40000 + i,
            vip: "10.0.0.100".parse().unwrap(),
            vip_port: 80,
            proto: PROTO_TCP,
            backend: backend.parse().unwrap(),
        }
    }

    #[test]
    fn every_node_heartbeats_every_peer_and_a_change_anywhere_reaches_all() {
        // Three nodes started from their files: 1@1, 1@2, 1@3; the order picks 1@1.
        let mut net = Net::new(3, |i| p(1, i as u32 + 1));
        net.run(500);
        for (i, m) in net.nodes.iter().enumerate() {
            let st = m.peer_status(net.now);
            assert_eq!(st.len(), 2);
            assert!(
                st.iter().all(|s| s.alive && s.node_id.is_some()),
                "node {}: {st:?}",
                i + 1
            );
        }
        assert!(
            net.configs()
                .iter()
                .all(|c| *c == (p(1, 1), "services of node 1".into())),
            "{:?}",
            net.configs()
        );
        // A change on node 3 reaches 1 and 2 at once (no tick needed).
        let pos = net.change(2, "backend added on node 3");
        assert_eq!(pos, p(2, 3));
        assert!(
            net.configs()
                .iter()
                .all(|c| *c == (p(2, 3), "backend added on node 3".into())),
            "{:?}",
            net.configs()
        );
        // Then one on node 1: numbered after what it has seen, so it wins.
        assert_eq!(net.change(0, "from node 1"), p(3, 1));
        net.run(300);
        assert!(
            net.configs().iter().all(|c| c.0 == p(3, 1)),
            "{:?}",
            net.configs()
        );
    }

    #[test]
    fn concurrent_changes_converge_to_the_same_winner_everywhere() {
        let mut net = Net::new(3, |_| p(4, 1));
        net.run(300);
        // A partition: each node changes on its own, then the links heal.
        net.down = (0..3).collect();
        let mut out = Out::new();
        for i in [2, 1, 0] {
            let pos = net.nodes[i]
                .pos()
                .next(net.nodes[i].peer_pos_max(), i as u32 + 1);
            net.nodes[i].local_change(
                net.now,
                pos,
                Arc::new(format!("made on {}", i + 1).into_bytes()),
                &mut out,
            );
        }
        assert_eq!(
            net.nodes.iter().map(|m| m.pos()).collect::<Vec<_>>(),
            vec![p(5, 1), p(5, 2), p(5, 3)]
        );
        net.down.clear();
        net.run(2000);
        // Version 5 everywhere; the lowest origin id wins the tie, on every node.
        assert!(
            net.configs()
                .iter()
                .all(|c| *c == (p(5, 1), "made on 1".into())),
            "{:?}",
            net.configs()
        );
        // Same with the partition cutting 3 off from 1 and 2, and 3 a version ahead.
        net.down.insert(2);
        net.change(1, "2 while 3 is away");
        let far = p(7, 3);
        let mut out = Out::new();
        net.nodes[2].local_change(net.now, far, Arc::new(b"3 far ahead".to_vec()), &mut out);
        net.run(500);
        net.down.clear();
        net.run(2000);
        assert!(
            net.configs()
                .iter()
                .all(|c| *c == (far, "3 far ahead".into())),
            "{:?}",
            net.configs()
        );
    }

    #[test]
    fn flows_fan_out_to_live_peers_and_a_dead_one_stalls_nobody() {
        let mut net = Net::new(3, |_| p(1, 1));
        net.run(500);
        net.new_flows(0, &[flow(1, "10.0.1.1"), flow(2, "10.0.1.2")]);
        assert_eq!(net.flows_in[1].len(), 2);
        assert_eq!(net.flows_in[2].len(), 2);
        assert!(net.flows_in[0].is_empty());
        // Node 3 dies: node 1 notices after the dead interval; flows still reach 2 in
        // the same tick, and none are queued for 3.
        net.down.insert(2);
        net.run(400);
        let st = net.nodes[0].peer_status(net.now);
        assert!(st[0].alive && !st[1].alive, "{st:?}");
        let flows: Vec<SyncedFlow> = (10..30).map(|i| flow(i, "10.0.1.1")).collect();
        net.new_flows(0, &flows);
        assert_eq!(
            net.flows_in[1].len(),
            22,
            "node 2 got every flow in the same tick"
        );
        let st = net.nodes[0].peer_status(net.now);
        assert_eq!(
            (st[1].flows_skipped_peer_down, st[1].flows_queued),
            (20, 2),
            "{:?}",
            st[1]
        );
        // More new flows than a peer queue holds (64): bounded, the drops counted
        // against the peer, and what was queued is sent.
        let many: Vec<SyncedFlow> = (100..200).map(|i| flow(i, "10.0.1.2")).collect();
        net.new_flows(0, &many);
        let st = net.nodes[0].peer_status(net.now);
        assert_eq!(
            (st[0].flows_dropped_queue_full, net.flows_in[1].len()),
            (36, 22 + 64),
            "{:?}",
            st[0]
        );
        // Node 3 restarts: it catches up with the config and gets new flows again.
        net.change(1, "changed while 3 was down");
        net.restart(2);
        net.down.clear();
        net.run(1000);
        assert!(
            net.configs()
                .iter()
                .all(|c| c.1 == "changed while 3 was down"),
            "{:?}",
            net.configs()
        );
        net.new_flows(1, &[flow(500, "10.0.1.1")]);
        assert_eq!(net.flows_in[2].last(), Some(&flow(500, "10.0.1.1")));
        assert_eq!(net.flows_in[0].last(), Some(&flow(500, "10.0.1.1")));
    }

    /// Node ids per node: the same backends, allocated in different orders.
    struct Ids(BTreeMap<IpAddr, u32>);
    impl LocalIds for Ids {
        fn has_service(&self, vip: Vip) -> bool {
            vip.port == 80
        }
        fn backend_id(&self, _: Vip, backend: IpAddr) -> Option<u32> {
            self.0.get(&backend).copied()
        }
    }

    #[test]
    fn a_flow_fanned_out_keeps_its_backend_on_every_node_whatever_the_ids() {
        let mut net = Net::new(3, |_| p(1, 1));
        net.run(500);
        let (a, b): (IpAddr, IpAddr) = ("10.0.1.1".parse().unwrap(), "10.0.1.2".parse().unwrap());
        let ids = [
            Ids(BTreeMap::from([(a, 0), (b, 1)])),
            Ids(BTreeMap::from([(a, 1), (b, 0)])),
            Ids(BTreeMap::from([(a, 7), (b, 3)])),
        ];
        // Node 2 sees the flow first and picks backend b (its id 0).
        let f = flow(1, "10.0.1.2");
        net.new_flows(1, &[f]);
        for (i, want) in [(0, 1), (2, 3)] {
            let got = &net.flows_in[i];
            assert_eq!(got.as_slice(), &[f]);
            let (key, id) = resolve(&got[0], &ids[i]).unwrap();
            assert_eq!(id, want, "node {}", i + 1);
            assert_eq!(lb_common::addr_from_words(&key.src), f.client);
        }
    }

    #[test]
    fn datagrams_from_unknown_senders_are_counted_not_applied() {
        let mut net = Net::new(2, |_| p(1, 1));
        net.run(300);
        // An authentic datagram (same secret) from a node nobody listed.
        let mut stranger = Net::node(&net.key, 3, 2, p(9, 3));
        let mut out = Out::new();
        stranger.local_change(0, p(9, 3), Arc::new(b"x".to_vec()), &mut out);
        let (mut o, mut ev) = (Out::new(), Vec::new());
        for (_, d) in out {
            net.nodes[0].on_datagram(
                net.now,
                "192.0.2.99:7946".parse().unwrap(),
                &d,
                &mut o,
                &mut ev,
            );
        }
        assert!(ev.is_empty() && o.is_empty());
        assert!(net.nodes[0].unknown_sender > 0);
        assert_eq!(net.nodes[0].pos(), p(1, 1));
    }

    #[test]
    fn a_joining_peer_gets_our_flow_table_once_it_runs_our_config() {
        let mut net = Net::new(3, |_| p(1, 1));
        net.run(500);
        // Sessions of a node's own start ask for no dump: it is the one joining.
        for m in &mut net.nodes {
            assert!(m.take_dump_requests().is_empty());
        }
        net.change(0, "v2");
        // Node 3 is replaced: it comes back with an older config and applies nothing yet.
        net.down.insert(2);
        net.run(400);
        net.nodes[2] = Net::node(&net.key, 3, 2, p(1, 1));
        net.frozen.insert(2);
        net.down.clear();
        net.run(1000);
        assert!(net.nodes[0].peer_status(net.now)[1].alive);
        assert!(net.nodes[0].take_dump_requests().is_empty(), "flows of a config it lacks would not resolve there");
        net.frozen.clear();
        net.run(1000);
        assert_eq!(net.nodes[2].pos(), p(2, 1));
        assert_eq!(net.nodes[0].take_dump_requests(), vec![addr(2)], "once, for node 3");
        assert_eq!(net.nodes[1].take_dump_requests(), vec![addr(2)]);
        net.run(500);
        assert!(net.nodes[0].take_dump_requests().is_empty());
        // The daemon's dump chunks go to that peer only, bounded by its queue.
        assert!(net.nodes[0].room_for(64) && !net.nodes[0].room_for(65));
        let table: Vec<SyncedFlow> = (0..70).map(|i| flow(i, "10.0.1.1")).collect();
        net.nodes[0].enqueue_dump(net.now, addr(2), &table);
        assert!(!net.nodes[0].room_for(1));
        let before = net.flows_in[1].len();
        net.new_flows(0, &[]);
        assert_eq!(net.flows_in[2], table[..64].to_vec());
        assert_eq!(net.flows_in[1].len(), before, "nothing for node 2");
        let st = &net.nodes[0].peer_status(net.now)[1];
        assert_eq!((st.flows_dumped, st.flows_dropped_queue_full), (64, 6), "{st:?}");
    }
}
