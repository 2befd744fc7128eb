//! Who is active: a deterministic state machine with no I/O and no clock of its own.
//! The daemon calls `on_tick` every heartbeat interval (then sends `heartbeat()`),
//! `on_heartbeat` for every accepted peer heartbeat, `set_local_config` when its
//! config changes, and `request_failover` for `lbctl cluster failover`. Every call
//! that may change the role returns the change; the daemon then takes or releases the
//! VIPs and sends a heartbeat at once, so the peer learns without waiting a tick.
//!
//! Rules (rank = not yielding, then higher priority, then lower node id):
//! - **Alive**: the peer was heard less than `dead_after × heartbeat_ms` ago.
//! - **Startup**: a node starts in `Init` and listens. Hearing the peer decides at
//!   once (below); hearing nothing for the dead interval, it becomes active: with no
//!   peer there is nothing to sync from, its own config is the newest it knows.
//! - **Synced**: our config position is ≥ the peer's (`config_sync::ConfigPos`).
//!   While the peer is alive, a node becomes active only if synced, so a returning
//!   node first takes the peer's config. A dead peer needs no sync: the backup takes
//!   over with what it has (anything else would leave the VIPs unserved).
//! - **Peer dead**: a backup becomes active.
//! - **Nobody active** (both Init/Backup): the best-ranked synced node becomes active.
//! - **Peer active**: we stay (or become) backup, unless it yields to us (we take over
//!   if synced), or `preempt` is set, we are synced, outrank it, and have not handed
//!   the role over ourselves (see failover).
//! - **Both active** (a healed partition, or a preemption in flight): the lower rank
//!   becomes backup on the first heartbeat it hears from the other, so one heartbeat
//!   after the link heals exactly one is active. Both sides apply the same rule to the
//!   same facts, so they never both step down or both stay.
//! - **Failover**: the active, if the peer is alive and synced, keeps the VIPs and
//!   announces `yielding`, which ranks it below the peer (make before break). The peer
//!   becomes active; on hearing it the yielder becomes backup and will not preempt it
//!   back while it lives (the operator asked for the move). A yield the peer does not
//!   take within two dead intervals lapses; the node stays active.

use std::cmp::Reverse;

use super::config_sync::ConfigPos;
use super::wire::{Heartbeat, Role};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub node_id: u32,
    pub priority: u8,
    pub preempt: bool,
    pub heartbeat_ms: u64,
    pub dead_after: u64,
}

impl Params {
    pub fn dead_ms(&self) -> u64 {
        self.heartbeat_ms.saturating_mul(self.dead_after)
    }
}

/// Why the role changed, for the log and `lbctl cluster status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// No peer heard during the startup interval.
    AloneAtStartup,
    /// The peer fell silent for the dead interval.
    PeerDead,
    /// Neither was active; we rank first among synced nodes.
    Elected,
    /// Neither was active; the peer ranks first (or we are not synced).
    PeerPreferred,
    /// The peer is active; we follow.
    PeerActive,
    /// The active peer handed the role to us.
    PeerYielded,
    /// We outrank the active peer and preempt is on.
    Preempted,
    /// Both active; the peer outranks us.
    SplitBrainLost,
    /// We yielded and the peer took over.
    HandedOver,
    /// Active-active (`[bgp]`): no election, every node forwards from the start.
    ActiveActive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Role,
    pub to: Role,
    pub why: Why,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    #[error("this node is {0}, not active: run failover on the active node")]
    NotActive(Role),
    #[error("the peer is not alive: nobody to hand over to")]
    PeerNotAlive,
    #[error("the peer's config {peer} is older than ours ({ours}): wait for it to sync")]
    PeerNotSynced { peer: ConfigPos, ours: ConfigPos },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub node_id: u32,
    pub heartbeat: Heartbeat,
    pub heard_at: u64,
}

/// For `lbctl cluster status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub role: Role,
    pub config: ConfigPos,
    pub synced: bool,
    pub yielding: bool,
    pub peer: Option<PeerView>,
    pub peer_alive: bool,
    pub last_heard_ms_ago: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Election {
    p: Params,
    role: Role,
    started: u64,
    local: ConfigPos,
    peer: Option<PeerView>,
    /// Set while we ask the peer to take over: the deadline of the request.
    yield_until: Option<u64>,
    /// We handed the role over on purpose: no preemption while that peer lives.
    handed_over: bool,
}

type Rank = (bool, u8, Reverse<u32>);

fn rank(yielding: bool, priority: u8, node_id: u32) -> Rank {
    (!yielding, priority, Reverse(node_id))
}

impl Election {
    pub fn new(p: Params, local: ConfigPos, now: u64) -> Self {
        Self { p, role: Role::Init, started: now, local, peer: None, yield_until: None, handed_over: false }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    pub fn yielding(&self) -> bool {
        self.yield_until.is_some()
    }

    fn alive_peer(&self, now: u64) -> Option<PeerView> {
        self.peer.filter(|s| now.saturating_sub(s.heard_at) < self.p.dead_ms())
    }

    /// Our config is at least as new as the peer's last advertised one (true if none).
    pub fn synced(&self) -> bool {
        self.peer.is_none_or(|s| self.local >= s.heartbeat.config)
    }

    /// The peer is alive with a newer config: the daemon should expect its sync.
    pub fn needs_sync(&self, now: u64) -> bool {
        self.alive_peer(now).is_some_and(|s| s.heartbeat.config > self.local)
    }

    /// What we announce now.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            priority: self.p.priority,
            role: self.role,
            preempt: self.p.preempt,
            config: self.local,
            synced: self.synced(),
            yielding: self.yielding(),
        }
    }

    pub fn status(&self, now: u64) -> Status {
        Status {
            role: self.role,
            config: self.local,
            synced: self.synced(),
            yielding: self.yielding(),
            peer: self.peer,
            peer_alive: self.alive_peer(now).is_some(),
            last_heard_ms_ago: self.peer.map(|s| now.saturating_sub(s.heard_at)),
        }
    }

    pub fn on_tick(&mut self, now: u64) -> Option<Transition> {
        self.evaluate(now)
    }

    /// An accepted heartbeat (authenticated, from the peer's id, not a replay).
    pub fn on_heartbeat(&mut self, now: u64, node_id: u32, hb: Heartbeat) -> Option<Transition> {
        self.peer = Some(PeerView { node_id, heartbeat: hb, heard_at: now });
        self.evaluate(now)
    }

    /// Our config changed (a local change, or the peer's full sync applied). Being
    /// synced may make us eligible at once.
    pub fn set_local_config(&mut self, now: u64, pos: ConfigPos) -> Option<Transition> {
        self.local = pos;
        self.evaluate(now)
    }

    /// `lbctl cluster failover` on this node: hand the active role to the peer.
    /// Repeating it while yielding extends the request.
    pub fn request_failover(&mut self, now: u64) -> Result<(), FailoverError> {
        if self.role != Role::Active {
            return Err(FailoverError::NotActive(self.role));
        }
        let peer = self.alive_peer(now).ok_or(FailoverError::PeerNotAlive)?;
        if peer.heartbeat.config < self.local {
            return Err(FailoverError::PeerNotSynced { peer: peer.heartbeat.config, ours: self.local });
        }
        self.yield_until = Some(now.saturating_add(self.p.dead_ms().saturating_mul(2)));
        Ok(())
    }

    fn to(&mut self, to: Role, why: Why) -> Option<Transition> {
        let from = self.role;
        self.role = to;
        if to == Role::Active {
            self.handed_over = false;
        }
        Some(Transition { from, to, why })
    }

    fn evaluate(&mut self, now: u64) -> Option<Transition> {
        let Some(peer) = self.alive_peer(now) else {
            // Nobody to hand over to, and nobody to defer to.
            self.yield_until = None;
            self.handed_over = false;
            return match self.role {
                Role::Active => None,
                Role::Init if now.saturating_sub(self.started) < self.p.dead_ms() => None,
                Role::Init => self.to(Role::Active, Why::AloneAtStartup),
                Role::Backup => self.to(Role::Active, Why::PeerDead),
            };
        };
        let hb = peer.heartbeat;
        let synced = self.local >= hb.config;
        let peer_synced = hb.config >= self.local;
        if self.yield_until.is_some_and(|t| now >= t) {
            self.yield_until = None;
        }
        let mine = rank(self.yielding(), self.p.priority, self.p.node_id);
        let theirs = rank(hb.yielding, hb.priority, peer.node_id);
        match self.role {
            Role::Active => {
                if hb.role != Role::Active || mine > theirs {
                    return None;
                }
                let why = if self.yielding() { Why::HandedOver } else { Why::SplitBrainLost };
                if self.yielding() {
                    self.handed_over = true;
                    self.yield_until = None;
                }
                self.to(Role::Backup, why)
            }
            Role::Init | Role::Backup => {
                let t = if hb.role == Role::Active {
                    if hb.yielding && synced {
                        Some((Role::Active, Why::PeerYielded))
                    } else if self.p.preempt && !self.handed_over && synced && mine > theirs {
                        Some((Role::Active, Why::Preempted))
                    } else {
                        Some((Role::Backup, Why::PeerActive))
                    }
                } else if synced && (!peer_synced || mine > theirs) {
                    Some((Role::Active, Why::Elected))
                } else {
                    Some((Role::Backup, Why::PeerPreferred))
                };
                match t {
                    Some((to, why)) if to != self.role => self.to(to, why),
                    _ => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::{Active as A, Backup as B, Init as I};

    fn params(node_id: u32, priority: u8, preempt: bool) -> Params {
        Params { node_id, priority, preempt, heartbeat_ms: 100, dead_after: 3 }
    }

    const V0: ConfigPos = ConfigPos { version: 0, origin: 0 };

    /// One simulated node: its election (None while stopped), its config (kept across
    /// restarts, as `state.json` keeps it) and its tick phase.
    struct Node {
        p: Params,
        e: Option<Election>,
        cfg: ConfigPos,
        phase: u64,
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Stop(usize),
        Start(usize),
        /// Both directions down / up.
        Cut,
        Heal,
        /// Only the link from node .0 to the other down.
        CutFrom(usize),
        /// A local config change on the node.
        Change(usize),
        Failover(usize, Result<(), FailoverError>),
        /// Roles of node 0 and node 1 (None: stopped).
        Expect(Option<Role>, Option<Role>),
        /// Exactly one node active.
        ExpectOneActive,
    }

    struct Sim {
        n: [Node; 2],
        /// link[i]: datagrams from node i reach the other.
        link: [bool; 2],
        /// Full syncs in flight: (deliver at, to node, position).
        syncs: Vec<(u64, usize, ConfigPos)>,
        sync_delay: u64,
        log: Vec<(u64, usize, Transition)>,
    }

    impl Sim {
        fn new(a: Params, b: Params) -> Self {
            Sim {
                n: [Node { p: a, e: None, cfg: V0, phase: 0 }, Node { p: b, e: None, cfg: V0, phase: 50 }],
                link: [true, true],
                syncs: Vec::new(),
                sync_delay: 0,
                log: Vec::new(),
            }
        }

        fn roles(&self) -> [Option<Role>; 2] {
            [self.n[0].e.as_ref().map(|e| e.role()), self.n[1].e.as_ref().map(|e| e.role())]
        }

        fn note(&mut self, now: u64, i: usize, t: Option<Transition>) -> bool {
            if let Some(t) = t {
                self.log.push((now, i, t));
            }
            t.is_some()
        }

        /// Node `i` sends a heartbeat; the receiver may answer at once (after a role
        /// change, as the daemon does) and may start a full sync (the Replicator rule).
        fn send(&mut self, now: u64, i: usize, depth: u32) {
            assert!(depth < 8, "heartbeat ping-pong does not settle");
            let j = 1 - i;
            let Some(hb) = self.n[i].e.as_ref().map(|e| e.heartbeat()) else { return };
            if !self.link[i] {
                return;
            }
            let id = self.n[i].p.node_id;
            let Some(ej) = self.n[j].e.as_mut() else { return };
            let t = ej.on_heartbeat(now, id, hb);
            if self.link[j] && self.n[j].cfg > hb.config && !self.syncs.iter().any(|s| s.1 == i) {
                self.syncs.push((now + self.sync_delay, i, self.n[j].cfg));
            }
            if self.note(now, j, t) {
                self.send(now, j, depth + 1);
            }
        }

        fn step(&mut self, now: u64) {
            let due: Vec<(u64, usize, ConfigPos)> = self.syncs.iter().copied().filter(|s| s.0 <= now).collect();
            self.syncs.retain(|s| s.0 > now);
            for (_, i, pos) in due {
                self.n[i].cfg = self.n[i].cfg.max(pos);
                let cfg = self.n[i].cfg;
                if let Some(e) = self.n[i].e.as_mut() {
                    let t = e.set_local_config(now, cfg);
                    if self.note(now, i, t) {
                        self.send(now, i, 0);
                    }
                }
            }
            for i in 0..2 {
                if now % 100 == self.n[i].phase {
                    let t = self.n[i].e.as_mut().and_then(|e| e.on_tick(now));
                    self.note(now, i, t);
                    self.send(now, i, 0);
                }
            }
        }

        fn apply(&mut self, now: u64, op: Op) {
            match op {
                Op::Stop(i) => self.n[i].e = None,
                Op::Start(i) => self.n[i].e = Some(Election::new(self.n[i].p, self.n[i].cfg, now)),
                Op::Cut => self.link = [false, false],
                Op::Heal => self.link = [true, true],
                Op::CutFrom(i) => self.link[i] = false,
                Op::Change(i) => {
                    let peer_seen = self.n[i].e.as_ref().and_then(|e| e.peer).map(|p| p.heartbeat.config);
                    self.n[i].cfg = self.n[i].cfg.next(peer_seen, self.n[i].p.node_id);
                    let cfg = self.n[i].cfg;
                    let t = self.n[i].e.as_mut().and_then(|e| e.set_local_config(now, cfg));
                    self.note(now, i, t);
                }
                Op::Failover(i, want) => {
                    let got = self.n[i].e.as_mut().map(|e| e.request_failover(now));
                    assert_eq!(got, Some(want), "failover on node {i} at {now}");
                    if got == Some(Ok(())) {
                        self.send(now, i, 0);
                    }
                }
                Op::Expect(a, b) => assert_eq!(self.roles(), [a, b], "at {now} ms; log {:?}", self.log),
                Op::ExpectOneActive => {
                    let n = self.roles().iter().filter(|r| **r == Some(A)).count();
                    assert_eq!(n, 1, "at {now} ms: {:?}; log {:?}", self.roles(), self.log);
                }
            }
        }

        /// Runs the script in 10 ms steps; an op at time t runs before t's ticks
        /// except expectations, which see the state after them.
        fn run(&mut self, script: &[(u64, Op)]) {
            let end = script.iter().map(|s| s.0).max().unwrap_or(0);
            for now in (0..=end).step_by(10) {
                for &(t, op) in script.iter().filter(|s| s.0 == now && !matches!(s.1, Op::Expect(..) | Op::ExpectOneActive)) {
                    self.apply(t, op);
                }
                self.step(now);
                for &(t, op) in script.iter().filter(|s| s.0 == now && matches!(s.1, Op::Expect(..) | Op::ExpectOneActive)) {
                    self.apply(t, op);
                }
            }
        }
    }

    use Op::*;
    const S: Option<Role> = None;

    fn ex(a: Role, b: Role) -> Op {
        Expect(Some(a), Some(b))
    }

    #[test]
    fn both_start_together_the_higher_priority_is_active_at_once() {
        let mut s = Sim::new(params(1, 100, false), params(2, 200, false));
        // Node 0 ticks first (at 0) and its Init heartbeat reaches node 1, which is
        // elected on the spot and answers; node 0 follows. No waiting for a timeout.
        s.run(&[(0, Start(0)), (0, Start(1)), (0, ex(B, A)), (5000, ex(B, A))]);
        assert_eq!(s.log.len(), 2, "{:?}", s.log);
    }

    #[test]
    fn equal_priority_lower_node_id_wins() {
        let mut s = Sim::new(params(7, 100, false), params(3, 100, false));
        s.run(&[(0, Start(0)), (0, Start(1)), (50, ex(B, A)), (1000, ex(B, A))]);
    }

    #[test]
    fn alone_at_startup_becomes_active_after_the_dead_interval() {
        let mut s = Sim::new(params(1, 100, false), params(2, 200, false));
        s.run(&[(0, Start(0)), (200, Expect(Some(I), S)), (290, Expect(Some(I), S)), (300, Expect(Some(A), S))]);
        assert_eq!(s.log[0].2.why, Why::AloneAtStartup);
    }

    #[test]
    fn backup_takes_over_within_dead_after_plus_one_tick_of_the_last_heartbeat() {
        let mut s = Sim::new(params(1, 200, false), params(2, 100, false));
        s.run(&[
            (0, Start(0)),
            (0, Start(1)),
            (100, ex(A, B)),
            // Node 0's last heartbeat goes out at 1000; it dies at 1010.
            (1010, Stop(0)),
            (1290, Expect(S, Some(B))),
            // Node 1 ticks at x50: 1350 is the first tick 300 ms after 1000.
            (1350, Expect(S, Some(A))),
        ]);
        assert_eq!(s.log.last().unwrap().2.why, Why::PeerDead);
    }

    #[test]
    fn returning_preferred_node_stays_backup_without_preempt() {
        let mut s = Sim::new(params(1, 200, false), params(2, 100, false));
        s.run(&[
            (0, Start(0)),
            (0, Start(1)),
            (1010, Stop(0)),
            (1350, Expect(S, Some(A))),
            (2000, Start(0)),
            (2000, ex(I, A)),
            (2050, ex(B, A)),
            (9000, ex(B, A)),
        ]);
    }

    #[test]
    fn returning_preferred_node_preempts_with_preempt_on() {
        let mut s = Sim::new(params(1, 200, true), params(2, 100, false));
        s.run(&[(0, Start(0)), (0, Start(1)), (1010, Stop(0)), (1350, Expect(S, Some(A))), (2000, Start(0)), (2050, ex(A, B)), (9000, ex(A, B))]);
        let whys: Vec<Why> = s.log.iter().map(|l| l.2.why).collect();
        assert_eq!(whys[whys.len() - 2..], [Why::Preempted, Why::SplitBrainLost]);
    }

    #[test]
    fn returning_node_with_stale_config_syncs_before_it_may_preempt() {
        let mut s = Sim::new(params(1, 200, true), params(2, 100, false));
        s.sync_delay = 300;
        s.run(&[
            (0, Start(0)),
            (0, Start(1)),
            (1010, Stop(0)),
            // Changed while node 0 is away.
            (1500, Change(1)),
            (2000, Start(0)),
            // Hears the active peer at 2000 and 2050 but is behind: backup.
            (2050, ex(B, A)),
            (2290, ex(B, A)),
            // The sync node 1 started on hearing node 0 at 2000 lands at 2300.
            (2300, ex(A, B)),
        ]);
        assert_eq!(s.n[0].cfg, ConfigPos { version: 1, origin: 2 });
    }

    #[test]
    fn unsynced_node_is_never_elected_while_a_synced_peer_lives() {
        // Node 0 outranks but starts behind; sync takes 500 ms: node 1 must serve.
        let mut s = Sim::new(params(1, 200, false), params(2, 100, false));
        s.sync_delay = 500;
        s.n[1].cfg = ConfigPos { version: 4, origin: 2 };
        s.run(&[(0, Start(0)), (0, Start(1)), (50, ex(B, A)), (1000, ex(B, A))]);
        assert_eq!(s.n[0].cfg, s.n[1].cfg);
    }

    #[test]
    fn split_brain_resolves_on_the_first_heartbeat_after_the_heal() {
        for (pa, pb) in [(200, 100), (100, 200), (100, 100)] {
            let mut s = Sim::new(params(1, pa, false), params(2, pb, false));
            let mut script = vec![(0, Start(0)), (0, Start(1)), (100, ExpectOneActive), (1000, Cut), (1500, ex(A, A)), (3000, Heal)];
            // One heartbeat interval after the heal (both nodes have sent once): one active,
            // and it stays so.
            for t in (3050..4000).step_by(10) {
                script.push((t, ExpectOneActive));
            }
            s.run(&script);
            // Ties go to node 0, the lower node id.
            let winner = if pa >= pb { A } else { B };
            assert_eq!(s.roles()[0], Some(winner), "priorities {pa}/{pb}");
            assert_eq!(s.log.last().unwrap().2.why, Why::SplitBrainLost);
        }
    }

    #[test]
    fn split_brain_heal_heard_by_the_winner_first_still_resolves_within_one_interval() {
        // Node 0 (winner) ticks at x00, so after a heal at 3010 node 1's tick at 3050 reaches
        // node 0 first; node 0 stays, and node 1 steps down on node 0's heartbeat at 3100.
        let mut s = Sim::new(params(1, 200, false), params(2, 100, false));
        s.run(&[(0, Start(0)), (0, Start(1)), (1000, Cut), (1500, ex(A, A)), (3010, Heal), (3050, ex(A, A)), (3100, ex(A, B)), (4000, ex(A, B))]);
    }

    #[test]
    fn one_way_loss_gives_two_actives_until_the_link_returns() {
        // The documented limit: a node that hears nothing takes over. On repair it resolves.
        let mut s = Sim::new(params(1, 200, false), params(2, 100, false));
        s.run(&[(0, Start(0)), (0, Start(1)), (1000, CutFrom(0)), (1400, ex(A, A)), (2000, Heal), (2100, ex(A, B))]);
    }

    #[test]
    fn failover_hands_over_and_the_yielder_does_not_take_it_back() {
        // Node 0 outranks and has preempt: without the hand-over rule it would preempt back.
        let mut s = Sim::new(params(1, 200, true), params(2, 100, true));
        s.run(&[
            (0, Start(0)),
            (0, Start(1)),
            (100, ex(A, B)),
            (1000, Failover(1, Err(FailoverError::NotActive(B)))),
            (1000, Failover(0, Ok(()))),
            (1000, ex(B, A)),
            (4990, ex(B, A)),
            // And back on request, from the new active.
            (5000, Failover(1, Ok(()))),
            (5000, ex(A, B)),
            (8000, ex(A, B)),
        ]);
        let whys: Vec<Why> = s.log.iter().skip(2).map(|l| l.2.why).collect();
        assert_eq!(whys, vec![Why::PeerYielded, Why::HandedOver, Why::PeerYielded, Why::HandedOver]);
    }

    #[test]
    fn failover_is_refused_without_a_live_synced_peer() {
        let mut s = Sim::new(params(1, 200, false), params(2, 100, false));
        s.sync_delay = 1000;
        s.run(&[
            (0, Start(0)),
            (0, Start(1)),
            (500, Change(0)),
            (600, Failover(0, Err(FailoverError::PeerNotSynced { peer: V0, ours: ConfigPos { version: 1, origin: 1 } }))),
            (1600, Failover(0, Ok(()))),
            (1600, ex(B, A)),
            (2000, Stop(0)),
            (2500, Failover(1, Err(FailoverError::PeerNotAlive))),
        ]);
    }

    #[test]
    fn a_yielded_node_takes_over_again_when_the_peer_dies() {
        let mut s = Sim::new(params(1, 200, true), params(2, 100, false));
        s.run(&[(0, Start(0)), (0, Start(1)), (1000, Failover(0, Ok(()))), (1000, ex(B, A)), (2010, Stop(1)), (2300, Expect(Some(A), S))]);
    }

    fn hb(role: Role, priority: u8, config: ConfigPos, yielding: bool) -> Heartbeat {
        Heartbeat { priority, role, preempt: false, config, synced: true, yielding }
    }

    #[test]
    fn an_unanswered_yield_lapses_and_the_node_stays_active() {
        let mut e = Election::new(params(1, 200, false), V0, 0);
        assert_eq!(e.on_tick(300).map(|t| t.to), Some(A));
        e.on_heartbeat(350, 2, hb(B, 100, V0, false));
        e.request_failover(400).unwrap();
        assert!(e.heartbeat().yielding);
        // The peer keeps answering as backup (it cannot take over, say) for 2 × 300 ms.
        for t in (450..1000).step_by(50) {
            assert_eq!(e.on_heartbeat(t, 2, hb(B, 100, V0, false)), None);
            assert_eq!(e.yielding(), t < 1000);
        }
        assert_eq!(e.on_heartbeat(1000, 2, hb(B, 100, V0, false)), None);
        assert!(!e.yielding() && e.role() == A);
    }

    #[test]
    fn both_yielding_falls_back_to_priority() {
        let mut e = Election::new(params(1, 200, false), V0, 0);
        e.on_tick(300);
        e.on_heartbeat(350, 2, hb(B, 100, V0, false));
        e.request_failover(360).unwrap();
        // The peer, active too and yielding as well: ranks compare on priority.
        assert_eq!(e.on_heartbeat(370, 2, hb(A, 100, V0, true)), None);
        let mut e2 = Election::new(params(2, 100, false), V0, 0);
        e2.on_tick(300);
        e2.on_heartbeat(350, 1, hb(B, 200, V0, false));
        e2.request_failover(360).unwrap();
        assert_eq!(e2.on_heartbeat(370, 1, hb(A, 200, V0, true)).map(|t| t.to), Some(B));
    }

    #[test]
    fn status_and_heartbeat_report_the_state() {
        let mut e = Election::new(params(1, 150, true), ConfigPos { version: 3, origin: 1 }, 1000);
        let st = e.status(1000);
        assert_eq!((st.role, st.peer_alive, st.last_heard_ms_ago, st.synced), (I, false, None, true));
        e.on_heartbeat(1100, 2, hb(A, 100, ConfigPos { version: 5, origin: 2 }, false));
        assert!(e.needs_sync(1100) && !e.synced());
        let h = e.heartbeat();
        assert_eq!((h.priority, h.role, h.preempt, h.synced, h.yielding), (150, B, true, false, false));
        let st = e.status(1250);
        assert_eq!((st.peer_alive, st.last_heard_ms_ago, st.peer.map(|p| p.node_id)), (true, Some(150), Some(2)));
        assert!(!e.status(1400).peer_alive);
        // The sync lands: synced, and as preempt is on and we outrank, active.
        let t = e.set_local_config(1200, ConfigPos { version: 5, origin: 2 });
        assert_eq!(t, Some(Transition { from: B, to: A, why: Why::Preempted }));
        assert!(e.synced() && !e.needs_sync(1200));
    }
}
