//! The cluster plane between lbd nodes, as pure logic: the authenticated wire
//! format (`wire`), the election (`election`), config replication order
//! (`config_sync`), the flow-sync queue and id mapping (`flow_sync`), the
//! active-active peer mesh (`mesh`), and the `[cluster]` config section. Sockets,
//! timers and VIP announcement live in the daemon.
//!
//! Two modes: one `peer` without `[bgp]` is the active/backup pair (an election picks
//! the node that holds the VIPs); with `[bgp]`, `[cluster]` lists any number of
//! `peers`, every node forwards (ECMP decides who gets packets) and the cluster plane
//! only replicates config and flows between them.

pub mod config_sync;
pub mod election;
pub mod flow_sync;
pub mod mesh;
pub mod node;
pub mod session;
pub mod wire;

use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

fn default_priority() -> u8 {
    100
}
fn default_heartbeat_ms() -> u32 {
    100
}
fn default_dead_after() -> u32 {
    3
}
fn default_notify_timeout_ms() -> u32 {
    10_000
}

/// `[cluster]` in lbd's config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, 1.. (unique in the pair; breaks priority ties: lower wins).
    pub node_id: u32,
    /// The peer's node id. Unset: learnt from the first authentic datagram, then fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<u32>,
    /// Higher is preferred as active.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Where the peer listens, "addr:port" (the two-node form; or `peers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// Every other node, `[[cluster.peers]]` (active-active with `[bgp]`: any number;
    /// without it, at most one, the same as `peer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// Where we listen, "addr:port".
    pub listen: SocketAddr,
    /// The shared secret: mode 0600 (no group/other bits), owned by lbd's user.
    pub secret_file: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u32,
    /// The peer is dead after this many heartbeat intervals of silence.
    #[serde(default = "default_dead_after")]
    pub dead_after: u32,
    /// A returning preferred node takes the active role back from a healthy active.
    #[serde(default)]
    pub preempt: bool,
    /// A script run on each role change with role, reason and VIPs (keepalived's
    /// `notify`); see `hooks`. Absolute path; failure is logged, never fatal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<PathBuf>,
    /// The notify script is killed (its process group) after this long.
    #[serde(default = "default_notify_timeout_ms")]
    pub notify_timeout_ms: u32,
}

/// One `[[cluster.peers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Where the peer listens, "addr:port".
    pub address: SocketAddr,
    /// The peer's node id. Unset: learnt from its first authentic datagram.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("cluster.{key}: {msg}")]
    Invalid { key: &'static str, msg: String },
    #[error("cluster.secret_file {path}: {msg}")]
    Secret { path: PathBuf, msg: String },
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ClusterConfigError {
    ClusterConfigError::Invalid { key, msg: msg.into() }
}

pub const MIN_SECRET_LEN: usize = 16;
pub const MAX_SECRET_LEN: u64 = 4096;

impl ClusterConfig {
    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<ClusterConfigError> {
        let mut e = Vec::new();
        if self.node_id == 0 {
            e.push(invalid("node_id", "must be at least 1"));
        }
        if self.peer_id == Some(self.node_id) {
            e.push(invalid("peer_id", format!("{} is this node's own node_id", self.node_id)));
        }
        if self.peer_id == Some(0) {
            e.push(invalid("peer_id", "must be at least 1"));
        }
        if !(10..=10_000).contains(&self.heartbeat_ms) {
            e.push(invalid("heartbeat_ms", format!("{} is outside 10..=10000", self.heartbeat_ms)));
        }
        // 1 would declare the peer dead on a single lost datagram.
        if !(2..=100).contains(&self.dead_after) {
            e.push(invalid("dead_after", format!("{} is outside 2..=100 heartbeats", self.dead_after)));
        }
        if self.listen.port() == 0 {
            e.push(invalid("listen", format!("{}: needs a fixed port (the peer sends to it)", self.listen)));
        }
        match (&self.peer, self.peers.is_empty()) {
            (None, true) => e.push(invalid("peers", "no peer: give `peer = \"addr:port\"` or `[[cluster.peers]]` entries")),
            (Some(_), false) => e.push(invalid("peers", "both `peer` and `peers`: use one form")),
            _ => {}
        }
        if self.peer_id.is_some() && self.peer.is_none() {
            e.push(invalid("peer_id", "only with `peer`; give each `[[cluster.peers]]` entry its own node_id"));
        }
        // The key the error names: the form the operator wrote.
        let key = if self.peer.is_some() { "peer" } else { "peers" };
        let mut seen_addr = std::collections::BTreeSet::new();
        let mut seen_id = std::collections::BTreeSet::new();
        for p in self.peer_list() {
            let a = p.address;
            if a.ip().is_unspecified() || a.ip().is_multicast() || a.port() == 0 {
                e.push(invalid(key, format!("{a} is not a unicast address with a port")));
            }
            if self.listen.is_ipv4() != a.is_ipv4() && !self.listen.ip().is_unspecified() {
                e.push(invalid("listen", format!("{} and peer {a} are of different address families", self.listen)));
            }
            if self.listen == a {
                e.push(invalid(key, format!("{a} is our own listen address")));
            }
            if !seen_addr.insert(a) {
                e.push(invalid(key, format!("{a} listed twice")));
            }
            if self.peer.is_none() {
                match p.node_id {
                    Some(0) => e.push(invalid("peers", format!("{a}: node_id must be at least 1"))),
                    Some(id) if id == self.node_id => e.push(invalid("peers", format!("{a}: node_id {id} is this node's own node_id"))),
                    Some(id) if !seen_id.insert(id) => e.push(invalid("peers", format!("{a}: node_id {id} given to two peers"))),
                    _ => {}
                }
            }
        }
        if let Some(p) = &self.notify {
            use std::os::unix::fs::PermissionsExt as _;
            match std::fs::metadata(p) {
                _ if !p.is_absolute() => e.push(invalid("notify", format!("{}: must be an absolute path", p.display()))),
                Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
                    e.push(invalid("notify", format!("{}: not an executable file", p.display())))
                }
                Ok(_) => {}
                Err(err) => e.push(invalid("notify", format!("{}: {err}", p.display()))),
            }
        }
        if !(100..=600_000).contains(&self.notify_timeout_ms) {
            e.push(invalid("notify_timeout_ms", format!("{} is outside 100..=600000", self.notify_timeout_ms)));
        }
        e
    }

    /// The peers in one form, whichever the file used.
    pub fn peer_list(&self) -> Vec<PeerConfig> {
        match self.peer {
            Some(address) => vec![PeerConfig { address, node_id: self.peer_id }],
            None => self.peers.clone(),
        }
    }

    /// The election's timing and identity.
    pub fn params(&self) -> election::Params {
        election::Params {
            node_id: self.node_id,
            priority: self.priority,
            preempt: self.preempt,
            heartbeat_ms: self.heartbeat_ms as u64,
            dead_after: self.dead_after as u64,
        }
    }
}

/// Reads the shared secret. Refused unless it is a regular file, owned by our
/// effective user, with no group/other permission bits (`mode & 0o077 == 0`): anyone
/// who can read it can forge heartbeats and take the VIPs. Trailing whitespace (the
/// newline `echo` leaves) is not part of the secret, so both nodes agree however the
/// file was written; at least 16 bytes must remain.
pub fn load_secret(path: &Path) -> Result<wire::Key, ClusterConfigError> {
    let err = |msg: String| ClusterConfigError::Secret { path: path.to_path_buf(), msg };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    // Checked on the open file, not the path, so the file read is the file checked.
    let md = f.metadata().map_err(|e| err(e.to_string()))?;
    if !md.is_file() {
        return Err(err("not a regular file".into()));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(err(format!("mode {mode:04o} lets group or others access it; chmod 600 it")));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != euid {
        return Err(err(format!("owned by uid {}, not by lbd's uid {euid}", md.uid())));
    }
    if md.len() > MAX_SECRET_LEN {
        return Err(err(format!("{} bytes: at most {MAX_SECRET_LEN}", md.len())));
    }
    let mut buf = Vec::new();
    f.take(MAX_SECRET_LEN + 1).read_to_end(&mut buf).map_err(|e| err(e.to_string()))?;
    if buf.len() as u64 > MAX_SECRET_LEN {
        return Err(err(format!("more than {MAX_SECRET_LEN} bytes")));
    }
    let end = buf.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    if end < MIN_SECRET_LEN {
        return Err(err(format!("{end} bytes of secret: at least {MIN_SECRET_LEN}")));
    }
    wire::Key::new(&buf[..end]).ok_or_else(|| err("unusable as an HMAC key".into()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const GOOD: &str = r#"
node_id = 1
priority = 200
peer = "192.0.2.2:7946"
listen = "192.0.2.1:7946"
secret_file = "/etc/lb/cluster.key"
"#;

    #[test]
    fn parses_with_defaults() {
        let c: ClusterConfig = toml::from_str(GOOD).unwrap();
        assert_eq!((c.heartbeat_ms, c.dead_after, c.preempt, c.peer_id), (100, 3, false, None));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let p = c.params();
        assert_eq!((p.node_id, p.priority, p.heartbeat_ms, p.dead_after), (1, 200, 100, 3));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = toml::from_str::<ClusterConfig>(&format!("{GOOD}\nprio = 3\n")).unwrap_err().to_string();
        assert!(e.contains("prio"), "{e}");
    }

    #[test]
    fn every_invalid_value_names_its_key() {
        let cases = [
            ("node_id = 1", "node_id = 0", "cluster.node_id"),
            ("node_id = 1", "node_id = 1\npeer_id = 1", "cluster.peer_id"),
            ("priority = 200", "priority = 200\nheartbeat_ms = 5", "cluster.heartbeat_ms"),
            ("priority = 200", "priority = 200\ndead_after = 1", "cluster.dead_after"),
            ("192.0.2.2:7946", "0.0.0.0:7946", "cluster.peer"),
            ("192.0.2.2:7946", "192.0.2.2:0", "cluster.peer"),
            ("192.0.2.1:7946", "192.0.2.1:0", "cluster.listen"),
            ("192.0.2.1:7946", "[2001:db8::1]:7946", "cluster.listen"),
            ("192.0.2.1:7946", "192.0.2.2:7946", "our own listen address"),
        ];
        for (from, to, want) in cases {
            let c: ClusterConfig = toml::from_str(&GOOD.replace(from, to)).unwrap();
            let errs: Vec<String> = c.validate().iter().map(|e| e.to_string()).collect();
            assert!(errs.iter().any(|e| e.contains(want)), "{to}: {errs:?}");
        }
        // A wildcard listen address serves either family.
        let c: ClusterConfig = toml::from_str(&GOOD.replace("192.0.2.1:7946", "[::]:7946")).unwrap();
        assert!(c.validate().is_empty());
    }

    #[test]
    fn peers_list_parses_and_each_mistake_names_its_key() {
        // Array tables come last in TOML.
        let list = format!(
            "{}[[peers]]\naddress = \"192.0.2.2:7946\"\nnode_id = 2\n[[peers]]\naddress = \"192.0.2.3:7946\"\n",
            GOOD.replace("peer = \"192.0.2.2:7946\"\n", "")
        );
        let c: ClusterConfig = toml::from_str(&list).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(
            c.peer_list(),
            vec![
                PeerConfig { address: "192.0.2.2:7946".parse().unwrap(), node_id: Some(2) },
                PeerConfig { address: "192.0.2.3:7946".parse().unwrap(), node_id: None }
            ]
        );
        // The two-node form is the same list of one.
        let one: ClusterConfig = toml::from_str(&format!("{GOOD}peer_id = 2\n")).unwrap();
        assert_eq!(one.peer_list(), vec![PeerConfig { address: "192.0.2.2:7946".parse().unwrap(), node_id: Some(2) }]);
        let cases = [
            ("node_id = 2\n", "node_id = 1\n", "cluster.peers: 192.0.2.2:7946: node_id 1 is this node's own"),
            ("node_id = 2\n", "node_id = 0\n", "node_id must be at least 1"),
            ("192.0.2.3:7946\"\n", "192.0.2.3:7946\"\nnode_id = 2\n", "node_id 2 given to two peers"),
            ("192.0.2.3:7946", "192.0.2.2:7946", "cluster.peers: 192.0.2.2:7946 listed twice"),
            ("192.0.2.3:7946", "192.0.2.1:7946", "our own listen address"),
            ("192.0.2.3:7946", "0.0.0.0:7946", "not a unicast address"),
            ("priority = 200", "priority = 200\npeer_id = 3", "cluster.peer_id: only with `peer`"),
        ];
        for (from, to, want) in cases {
            let c: ClusterConfig = toml::from_str(&list.replacen(from, to, 1)).unwrap();
            let errs: Vec<String> = c.validate().iter().map(|e| e.to_string()).collect();
            assert!(errs.iter().any(|e| e.contains(want)), "{to}: {errs:?}");
        }
        let both: ClusterConfig = toml::from_str(&list.replace("priority = 200", "priority = 200\npeer = \"192.0.2.9:7946\"")).unwrap();
        assert!(both.validate().iter().any(|e| e.to_string().contains("both `peer` and `peers`")));
        let none: ClusterConfig = toml::from_str(&GOOD.replace("peer = \"192.0.2.2:7946\"\n", "")).unwrap();
        assert!(none.validate().iter().any(|e| e.to_string().contains("cluster.peers: no peer")));
        let e = toml::from_str::<ClusterConfig>(&list.replace("node_id = 2", "id = 2")).unwrap_err().to_string();
        assert!(e.contains("id"), "{e}");
    }

    fn secret_file(name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = std::env::temp_dir().join(format!("lb-cluster-secret-{name}-{}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn secret_readable_by_others_is_refused_naming_file_and_mode() {
        let p = secret_file("0644", b"0123456789abcdef0123\n", 0o644);
        let e = load_secret(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("0644") && e.contains("secret_file"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_secret(&p).unwrap_err().to_string().contains("0640"));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn secret_0600_loads_and_trailing_newline_is_not_part_of_it() {
        let a = secret_file("nl", b"0123456789abcdef0123\n", 0o600);
        let b = secret_file("raw", b"0123456789abcdef0123", 0o400);
        let (ka, kb) = (load_secret(&a).unwrap(), load_secret(&b).unwrap());
        // Same key: a datagram sealed with one opens with the other.
        let d = wire::Sealer::new(ka, 1, 1).seal(&wire::Message::ConfigAck(Default::default())).unwrap();
        assert!(wire::open(&kb, &d).is_ok());
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }

    #[test]
    fn short_missing_or_non_regular_secrets_are_refused() {
        let p = secret_file("short", b"tooshort\n\n", 0o600);
        assert!(load_secret(&p).unwrap_err().to_string().contains("8 bytes of secret"));
        std::fs::remove_file(&p).unwrap();
        assert!(load_secret(Path::new("/nonexistent/lb.key")).unwrap_err().to_string().contains("/nonexistent/lb.key"));
        let d = std::env::temp_dir().join(format!("lb-cluster-secret-dir-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(load_secret(&d).unwrap_err().to_string().contains("not a regular file"));
        std::fs::remove_dir(&d).unwrap();
    }

    /// The pieces composed as the daemon will: election heartbeats sealed, sent,
    /// guarded and fed to the peer's election; a replayed old "active" heartbeat
    /// cannot bring a dead peer back.
    #[test]
    fn heartbeats_through_the_codec_elect_and_replays_do_not_revive_a_dead_peer() {
        use election::Election;
        use wire::{Message, Role};
        let key = wire::Key::new(b"0123456789abcdef0123").unwrap();
        let cfg = |id, prio| ClusterConfig {
            node_id: id,
            peer_id: Some(3 - id),
            priority: prio,
            peer: Some("192.0.2.2:7946".parse().unwrap()),
            peers: Vec::new(),
            listen: "192.0.2.1:7946".parse().unwrap(),
            secret_file: "/x".into(),
            heartbeat_ms: 100,
            dead_after: 3,
            preempt: false,
            notify: None,
            notify_timeout_ms: 10_000,
        };
        let (c1, c2) = (cfg(1, 200), cfg(2, 100));
        let mut e = [Election::new(c1.params(), Default::default(), 0), Election::new(c2.params(), Default::default(), 0)];
        let ((t1, r1), (t2, r2)) = (wire::endpoint(key.clone(), 1, Some(2), 1_000), wire::endpoint(key.clone(), 2, Some(1), 2_000));
        let (mut tx, mut rx) = ([t1, t2], [r1, r2]);
        let mut captured = Vec::new();
        for now in (0..1000).step_by(50) {
            let i = (now / 50 % 2) as usize;
            let j = 1 - i;
            e[i].on_tick(now);
            let d = tx[i].seal(&Message::Heartbeat(e[i].heartbeat())).unwrap();
            if i == 0 {
                captured.push(d.clone());
            }
            // The very first one is the session handshake.
            let Ok((h, m)) = rx[j].accept(now, &d) else {
                assert_eq!(now, 0);
                continue;
            };
            let Message::Heartbeat(hb) = m else { panic!("{m:?}") };
            e[j].on_heartbeat(now, h.node_id, hb);
        }
        assert_eq!((e[0].role(), e[1].role()), (Role::Active, Role::Backup));
        // Node 1 dies; an attacker replays its captured heartbeats to node 2.
        for (k, now) in (1000..2000).step_by(100).enumerate() {
            let r = rx[1].accept(now, &captured[k % captured.len()]).unwrap_err();
            assert!(matches!(r.error, wire::WireError::Replay { .. } | wire::WireError::StaleSession), "{r:?}");
            e[1].on_tick(now);
        }
        assert_eq!(e[1].role(), Role::Active);
        let c = rx[1].counters();
        assert_eq!(c.get(wire::Reason::Replay) + c.get(wire::Reason::StaleSession), 11, "10 replays and the handshake");
    }

    /// Issue 11 item 1: heartbeats captured in an earlier session are replayed after
    /// a restart of the victim, of its peer, or of both (the peer then dead). None is
    /// accepted, and the victim, hearing nothing, becomes active.
    #[test]
    fn datagrams_of_an_earlier_session_are_refused_whatever_restarted() {
        use election::Election;
        use wire::{Message, Role, endpoint};
        let key = wire::Key::new(b"0123456789abcdef0123").unwrap();
        let hb = |role| Message::Heartbeat(wire::Heartbeat { priority: 200, role, preempt: false, config: Default::default(), synced: true, yielding: false });
        for (victim_restarts, peer_restarts) in [(true, true), (true, false), (false, true)] {
            // Session 1: node 1 active, node 2 listening; 100 heartbeats captured.
            let (mut tx1, mut rx1) = endpoint(key.clone(), 1, Some(2), 1_000);
            let (mut tx2, mut rx2) = endpoint(key.clone(), 2, Some(1), 2_000);
            let mut captured = Vec::new();
            for now in 0..200 {
                if captured.len() == 100 {
                    break;
                }
                let d = tx1.seal(&hb(Role::Active)).unwrap();
                let ok = rx2.accept(now, &d).is_ok();
                let _ = rx1.accept(now, &tx2.seal(&hb(Role::Backup)).unwrap());
                if ok {
                    captured.push(d);
                }
            }
            assert_eq!(captured.len(), 100, "the session ran");
            if victim_restarts {
                (tx2, rx2) = endpoint(key.clone(), 2, Some(1), 3_000);
            }
            if peer_restarts {
                // Node 1 comes back as a new process, talks a while, then dies.
                (tx1, rx1) = endpoint(key.clone(), 1, Some(2), 4_000);
                for now in 200..210 {
                    let _ = rx2.accept(now, &tx1.seal(&hb(Role::Backup)).unwrap());
                    let _ = rx1.accept(now, &tx2.seal(&hb(Role::Backup)).unwrap());
                }
                assert!(rx2.in_session(), "the new session established");
            } else {
                // Node 1 dies without restarting; the victim keeps talking to nobody.
                let _ = tx2.seal(&hb(Role::Backup));
            }
            let mut victim =
                Election::new(election::Params { node_id: 2, priority: 100, heartbeat_ms: 100, dead_after: 3, preempt: false }, Default::default(), 300);
            let mut accepted = 0;
            for (i, d) in captured.iter().enumerate() {
                let now = 300 + i as u64 * 10;
                if let Ok((h, Message::Heartbeat(b))) = rx2.accept(now, d) {
                    accepted += 1;
                    victim.on_heartbeat(now, h.node_id, b);
                }
                victim.on_tick(now);
            }
            assert_eq!(accepted, 0, "victim restarted {victim_restarts}, peer restarted {peer_restarts}");
            assert_eq!(victim.role(), Role::Active, "the victim serves the VIPs");
        }
    }
}
