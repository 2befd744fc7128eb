//! The cluster plane at run time: one task on a thread of its own (a current-thread
//! runtime), so nothing in the control state can delay a heartbeat. It owns the UDP
//! socket, the election, the sealer and the peer guard; every `heartbeat_ms` it sends
//! a heartbeat, then the flows queued since the last one (active only), then the full
//! services when the peer is behind. It tells the owner task about role changes and
//! complete peer configs; the owner tells it about local changes. Synced flows from
//! the peer go to the applier task through a bounded queue (drops counted).
//! With `[bgp]` the same thread runs the active-active mesh instead (`mesh::run`).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::ClusterConfig;
use super::config_sync::{Assembler, ConfigPos, Incoming, Replicator, incoming};
use super::election::{Election, Transition};
use super::flow_sync::{FlowQueue, QueueCounters};
use super::wire::{ETHERNET_DATAGRAM, Message, PeerGuard, Role, Sealer, SyncedFlow};
use crate::daemon::flows::FlowCounters;

/// Flows waiting for the peer, at most (about 3 MiB).
pub const FLOW_QUEUE: usize = 65536;
/// Flows sent per heartbeat, at most: 16384 per 100 ms is 160k flows/s.
const FLOW_BUDGET: usize = 16384;
/// Heartbeat send intervals kept for the p99 in `lbctl cluster status`.
const INTERVALS_KEPT: usize = 4096;

/// From the owner task.
pub enum ClusterCmd {
    /// Our services changed here: their new position and JSON.
    LocalChange {
        pos: ConfigPos,
        services: Arc<Vec<u8>>,
    },
    /// The peer's config at `pos` is what we run now (applied, or we had it): ack it.
    Applied {
        pos: ConfigPos,
        services: Arc<Vec<u8>>,
    },
    Failover(oneshot::Sender<Result<(), String>>),
    Status(oneshot::Sender<ClusterView>),
    Stop,
}

/// To the owner task.
#[derive(Debug)]
pub enum ClusterEvent {
    Role(Transition),
    PeerConfig(ConfigPos, Vec<u8>),
}

/// What the owner reads without asking: role and the peer's config position. In
/// active-active, `peer_pos` is the newest any peer announced and `peers` lists them.
#[derive(Clone, Debug)]
pub struct ClusterSnapshot {
    pub role: Role,
    pub peer_pos: Option<ConfigPos>,
    pub peer_alive: bool,
    pub peer_node: Option<u32>,
    pub peer_role: Option<Role>,
    pub last_heard_ms_ago: Option<u64>,
    /// Active-active only: every peer's liveness.
    pub peers: Arc<Vec<PeerSnap>>,
}

/// One active-active peer in the owner's snapshot (`lbctl status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSnap {
    pub address: SocketAddr,
    pub node_id: Option<u32>,
    pub alive: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub pos: Option<ConfigPos>,
}

impl Default for ClusterSnapshot {
    fn default() -> Self {
        Self { role: Role::Init, peer_pos: None, peer_alive: false, peer_node: None, peer_role: None, last_heard_ms_ago: None, peers: Arc::default() }
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
    /// Role changes since start.
    #[serde(default)]
    pub role_changes: u64,
    /// Heartbeat send interval: p99 and largest, ms, over the last 4096 sent.
    #[serde(default)]
    pub heartbeat_interval_p99_ms: f64,
    #[serde(default)]
    pub heartbeat_interval_max_ms: f64,
    /// Longest silence of the peer between two heartbeats heard, ms.
    #[serde(default)]
    pub peer_gap_max_ms: u64,
    pub datagrams_accepted: u64,
    pub datagrams_rejected: Vec<(String, u64)>,
    pub flows_queued: u64,
    pub flows_sent: u64,
    pub flows_dropped_queue_full: u64,
    pub flows_lost_in_datapath: u64,
    pub flows_applied: u64,
    pub flows_unknown_vip: u64,
    pub flows_unknown_backend: u64,
    /// Synced flows received but dropped: the applier was behind.
    #[serde(default)]
    pub flows_dropped_apply_queue: u64,
    /// "active-backup" (the pair's election) or "active-active" (`[bgp]`, N peers).
    #[serde(default)]
    pub mode: String,
    /// Active-active: every peer, its liveness and its flow-sync counters.
    #[serde(default)]
    pub peers: Vec<super::mesh::MeshPeerStatus>,
}

/// Everything the cluster task needs, built by the daemon at start.
pub struct ClusterTask {
    pub cfg: ClusterConfig,
    pub key: super::wire::Key,
    pub pos: ConfigPos,
    pub epoch: u64,
    pub services: Arc<Vec<u8>>,
    /// Send our config at once (the file's services are a local change).
    pub push_config: bool,
    pub socket: std::net::UdpSocket,
    pub queue: Arc<Mutex<FlowQueue>>,
    pub apply: mpsc::Sender<Vec<SyncedFlow>>,
    pub counters: Arc<FlowCounters>,
    pub sync_stats: Option<PerCpuArray<MapData, u64>>,
    pub held: watch::Receiver<Vec<IpAddr>>,
    pub events: mpsc::UnboundedSender<ClusterEvent>,
    pub snapshot: watch::Sender<ClusterSnapshot>,
    /// `[bgp]` is configured: no election, every node forwards (`mesh`).
    pub active_active: bool,
    /// Active-active: asks for this node's flow table to be sent to a peer, and
    /// receives it in chunks (`daemon::flows::dump_flows`).
    pub dump: Option<FlowDump>,
}

/// The cluster task's ends of the flow-table dump.
pub struct FlowDump {
    pub requests: mpsc::Sender<SocketAddr>,
    pub chunks: mpsc::Receiver<(SocketAddr, Vec<SyncedFlow>)>,
}

struct Run {
    t: ClusterTask,
    election: Election,
    sealer: Sealer,
    guard: PeerGuard,
    replicator: Replicator,
    assembler: Assembler,
    started: Instant,
    last_transition: Option<(Transition, Instant)>,
    role_changes: u64,
    last_sent: Option<Instant>,
    intervals: VecDeque<f64>,
    last_heard: Option<Instant>,
    peer_gap_max_ms: u64,
    sock: UdpSocket,
    peer: SocketAddr,
}

impl ClusterTask {
    /// Runs on a thread of its own until `Stop` or the owner goes away.
    pub fn spawn(self, cmds: mpsc::UnboundedReceiver<ClusterCmd>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("lbd-cluster".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cluster: no runtime");
                    return;
                }
            };
            rt.block_on(self.run(cmds));
        })
    }

    async fn run(self, mut cmds: mpsc::UnboundedReceiver<ClusterCmd>) {
        let _ = self.socket.set_nonblocking(true);
        // Room for a burst of flow batches while this thread sends a heartbeat.
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt on our socket with an int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.socket),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let sock = match self.socket.try_clone().and_then(UdpSocket::from_std) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cluster: socket");
                return;
            }
        };
        if self.active_active {
            return super::mesh::run(self, sock, cmds).await;
        }
        // Validation guarantees exactly one peer without [bgp].
        let Some((peer, peer_id)) = self.cfg.peer_list().first().map(|p| (p.address, p.node_id)) else {
            error!("cluster: no peer configured");
            return;
        };
        let (sealer, guard) = super::wire::endpoint(self.key.clone(), self.cfg.node_id, peer_id, self.epoch);
        let mut r = Run {
            election: Election::new(self.cfg.params(), self.pos, 0),
            sealer,
            guard,
            replicator: Replicator::new(self.cfg.heartbeat_ms as u64 * 10),
            assembler: Assembler::default(),
            started: Instant::now(),
            last_transition: None,
            role_changes: 0,
            last_sent: None,
            intervals: VecDeque::new(),
            last_heard: None,
            peer_gap_max_ms: 0,
            sock,
            peer,
            t: self,
        };
        let hb = Duration::from_millis(r.t.cfg.heartbeat_ms as u64);
        let mut tick = tokio::time::interval(hb);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The election looks at the peer's silence 5 times per heartbeat, so a death is
        // noticed within a fifth of an interval of the dead time.
        let mut eval = tokio::time::interval((hb / 5).max(Duration::from_millis(1)));
        eval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => r.on_tick().await,
                _ = eval.tick() => {
                    let now = r.now();
                    if let Some(t) = r.election.on_tick(now) {
                        r.transition(t).await;
                    }
                }
                res = r.sock.recv_from(&mut buf) => match res {
                    Ok((n, _)) => r.on_datagram(&buf[..n]).await,
                    Err(e) => {
                        warn!(error = %e, "cluster: receive");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                c = cmds.recv() => match c {
                    None | Some(ClusterCmd::Stop) => return,
                    Some(c) => r.on_cmd(c).await,
                },
            }
        }
    }
}

impl Run {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn publish(&self) {
        let st = self.election.status(self.now());
        self.t.snapshot.send_replace(ClusterSnapshot {
            role: st.role,
            peer_pos: st.peer.map(|p| p.heartbeat.config),
            peer_alive: st.peer_alive,
            peer_node: st.peer.map(|p| p.node_id),
            peer_role: st.peer.map(|p| p.heartbeat.role),
            last_heard_ms_ago: st.last_heard_ms_ago,
            peers: Arc::default(),
        });
    }

    async fn send(&self, datagrams: Vec<Vec<u8>>) {
        for d in datagrams {
            // A lost datagram is recovered by the protocol (heartbeats repeat, config is
            // resent until acked, a flow left to Maglev).
            if let Err(e) = self.sock.send_to(&d, self.peer).await {
                warn!(error = %e, peer = %self.peer, "cluster: send");
                return;
            }
        }
    }

    async fn send_heartbeat(&mut self) {
        let hb = self.election.heartbeat();
        if let Ok(d) = self.sealer.seal(&Message::Heartbeat(hb)) {
            let now = Instant::now();
            if let Some(prev) = self.last_sent.replace(now) {
                if self.intervals.len() == INTERVALS_KEPT {
                    self.intervals.pop_front();
                }
                self.intervals.push_back(now.duration_since(prev).as_secs_f64() * 1000.0);
            }
            self.send(vec![d]).await;
        }
    }

    async fn on_tick(&mut self) {
        self.send_heartbeat().await;
        let mut out = Vec::new();
        if self.election.role() == Role::Active {
            let flows = self.t.queue.lock().unwrap_or_else(|e| e.into_inner()).take(FLOW_BUDGET);
            if !flows.is_empty() {
                out.extend(self.sealer.seal_flows(&flows, ETHERNET_DATAGRAM).0);
            }
        } else {
            self.t.queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        // Full config: after a local change, or when the peer is behind (paced).
        let now = self.now();
        let peer_pos = self.election.status(now).peer.map(|p| p.heartbeat.config);
        let behind = peer_pos.is_some_and(|p| self.replicator.on_peer(now, self.t.pos, p));
        if std::mem::take(&mut self.t.push_config) || behind {
            match self.sealer.seal_config(self.t.pos, &self.t.services, ETHERNET_DATAGRAM) {
                Ok(ds) => out.extend(ds),
                Err(e) => error!(error = %e, "cluster: encoding the config"),
            }
        }
        self.send(out).await;
        self.publish();
    }

    async fn transition(&mut self, t: Transition) {
        self.last_transition = Some((t, Instant::now()));
        self.role_changes += 1;
        info!(from = %t.from, to = %t.to, why = ?t.why, "cluster: role change");
        let _ = self.t.events.send(ClusterEvent::Role(t));
        self.publish();
        // Answer at once: a decision reaches the peer without waiting a tick.
        self.send_heartbeat().await;
    }

    async fn on_datagram(&mut self, d: &[u8]) {
        let now = self.now();
        let (h, msg) = match self.guard.accept(now, d) {
            Ok(x) => x,
            Err(r) => {
                if r.log {
                    warn!(error = %r.error, suppressed = r.suppressed, "cluster: datagram refused");
                }
                if r.hello {
                    // Session handshake: answer now, not at the next heartbeat.
                    self.send_heartbeat().await;
                }
                return;
            }
        };
        match msg {
            Message::Heartbeat(hb) => {
                let at = Instant::now();
                if let Some(prev) = self.last_heard.replace(at) {
                    self.peer_gap_max_ms = self.peer_gap_max_ms.max(at.duration_since(prev).as_millis() as u64);
                }
                if let Some(t) = self.election.on_heartbeat(now, h.node_id, hb) {
                    self.transition(t).await;
                }
                // A new session: the peer may have missed the config; send now.
                if self.guard.take_session_started() {
                    self.on_tick().await;
                }
            }
            Message::ConfigSync(chunk) => match self.assembler.push(chunk) {
                Ok(Some((pos, data))) => match incoming(self.t.pos, pos) {
                    Incoming::Apply => {
                        let _ = self.t.events.send(ClusterEvent::PeerConfig(pos, data));
                    }
                    Incoming::AlreadyHave => {
                        if let Ok(d) = self.sealer.seal(&Message::ConfigAck(pos)) {
                            self.send(vec![d]).await;
                        }
                    }
                    Incoming::Older => {}
                },
                Ok(None) => {}
                Err(e) => warn!(error = %e, "cluster: config chunk refused"),
            },
            Message::ConfigAck(_) => {}
            Message::FlowBatch(flows) => {
                let n = flows.len() as u64;
                if self.t.apply.try_send(flows).is_err() {
                    self.t.counters.dropped_apply_queue.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    async fn on_cmd(&mut self, c: ClusterCmd) {
        match c {
            ClusterCmd::LocalChange { pos, services } => {
                self.t.pos = pos;
                self.t.services = services;
                self.t.push_config = true;
                let now = self.now();
                if let Some(t) = self.election.set_local_config(now, pos) {
                    self.transition(t).await;
                }
            }
            ClusterCmd::Applied { pos, services } => {
                self.t.pos = pos;
                self.t.services = services;
                let now = self.now();
                let t = self.election.set_local_config(now, pos);
                if let Ok(d) = self.sealer.seal(&Message::ConfigAck(pos)) {
                    self.send(vec![d]).await;
                }
                if let Some(t) = t {
                    self.transition(t).await;
                }
            }
            ClusterCmd::Failover(reply) => {
                let now = self.now();
                let _ = reply.send(self.election.request_failover(now).map_err(|e| e.to_string()));
                self.send_heartbeat().await;
            }
            ClusterCmd::Status(reply) => {
                let _ = reply.send(self.view());
            }
            ClusterCmd::Stop => {}
        }
    }

    fn view(&self) -> ClusterView {
        let now = self.now();
        let st = self.election.status(now);
        let QueueCounters { queued, dropped_full, sent } = self.t.queue.lock().unwrap_or_else(|e| e.into_inner()).counters;
        let mut iv: Vec<f64> = self.intervals.iter().copied().collect();
        iv.sort_by(f64::total_cmp);
        let p99 = if iv.is_empty() { 0.0 } else { iv[((iv.len() - 1) as f64 * 0.99).round() as usize] };
        let c = &self.t.counters;
        let lost = self.t.sync_stats.as_ref().and_then(|m| m.get(&0, 0).ok()).map_or(0, |v| v.iter().sum());
        ClusterView {
            node_id: self.t.cfg.node_id,
            role: st.role.to_string(),
            priority: self.t.cfg.priority,
            preempt: self.t.cfg.preempt,
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
            vips_held: self.t.held.borrow().clone(),
            last_change: self.last_transition.map(|(t, at)| format!("{} -> {} ({:?}) {} ms ago", t.from, t.to, t.why, at.elapsed().as_millis())),
            role_changes: self.role_changes,
            heartbeat_interval_p99_ms: p99,
            heartbeat_interval_max_ms: iv.last().copied().unwrap_or(0.0),
            peer_gap_max_ms: self.peer_gap_max_ms,
            datagrams_accepted: self.guard.counters().accepted,
            datagrams_rejected: self.guard.counters().by_reason().filter(|(_, n)| *n > 0).map(|(r, n)| (r.to_string(), n)).collect(),
            flows_queued: queued,
            flows_sent: sent,
            flows_dropped_queue_full: dropped_full,
            flows_lost_in_datapath: lost,
            flows_applied: c.applied.load(Ordering::Relaxed),
            flows_unknown_vip: c.unknown_vip.load(Ordering::Relaxed),
            flows_unknown_backend: c.unknown_backend.load(Ordering::Relaxed),
            flows_dropped_apply_queue: c.dropped_apply_queue.load(Ordering::Relaxed),
            mode: super::mesh::MODE_ACTIVE_BACKUP.into(),
            peers: Vec::new(),
        }
    }
}
