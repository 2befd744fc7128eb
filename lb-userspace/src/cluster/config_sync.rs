//! Config replication rules. Every config the two nodes hold has a position
//! (version, origin node); positions are totally ordered so both nodes pick the same
//! winner without talking: the higher version wins, and on equal versions the lower
//! origin node id (the same tie-break as the election). A local change takes
//! `max(both versions) + 1`, so after a sync the next change from either side is
//! newer than everything either has seen.
//!
//! The node with the newer position sends its whole config (`Replicator`), in order,
//! until the peer's heartbeat or ack shows it; the receiver reassembles it with bounded
//! memory (`Assembler`) and applies it if it is newer than its own (`incoming`).
//! Two changes made on both sides of a partition are not merged: the older position
//! is replaced whole (the operator sees it in the log and in `lbctl cluster status`).

use std::cmp::Ordering;

use super::wire::{ConfigChunk, MAX_CONFIG_LEN};

/// Where a config stands in the total order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConfigPos {
    pub version: u64,
    pub origin: u32,
}

impl Ord for ConfigPos {
    /// Greater = newer: higher version, then lower origin node id.
    fn cmp(&self, other: &Self) -> Ordering {
        self.version.cmp(&other.version).then(other.origin.cmp(&self.origin))
    }
}

impl PartialOrd for ConfigPos {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for ConfigPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@node{}", self.version, self.origin)
    }
}

/// The highest config version either node may hold. One change per nanosecond would
/// take 146 years to get there, so only a corrupt or buggy peer announces more; the
/// wire refuses such positions (`bad_payload`). Without the bound a peer announcing
/// `u64::MAX` would pin the pair there: `+ 1` saturates, and every later change of
/// the node with the higher id would lose the tie, so replication from it stopped.
pub const MAX_CONFIG_VERSION: u64 = 1 << 62;

impl ConfigPos {
    /// The position of a change made on node `me`, knowing the peer's last position.
    /// Never above `MAX_CONFIG_VERSION` (positions we hold never exceed it).
    pub fn next(self, peer_seen: Option<ConfigPos>, me: u32) -> ConfigPos {
        let v = self.version.max(peer_seen.map_or(0, |p| p.version));
        ConfigPos { version: v.saturating_add(1).min(MAX_CONFIG_VERSION), origin: me }
    }

    /// Within the range a node may hold (see `MAX_CONFIG_VERSION`).
    pub fn in_range(&self) -> bool {
        self.version <= MAX_CONFIG_VERSION
    }
}

/// What to do with a full config the peer sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Newer than ours: validate, apply, then take its position as ours.
    Apply,
    /// The same position: already have it (ack it so the peer stops resending).
    AlreadyHave,
    /// Older than ours: ignore; our heartbeat tells the peer, which then syncs from us.
    Older,
}

pub fn incoming(local: ConfigPos, theirs: ConfigPos) -> Incoming {
    match theirs.cmp(&local) {
        Ordering::Greater => Incoming::Apply,
        Ordering::Equal => Incoming::AlreadyHave,
        Ordering::Less => Incoming::Older,
    }
}

/// What a peer's advertised position asks of us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Same position: nothing to do.
    InSync,
    /// The peer is behind: send it our whole config.
    SendMine,
    /// The peer is ahead: it will send; we are not synced until it has.
    AwaitTheirs,
}

pub fn compare(local: ConfigPos, peer: ConfigPos) -> Action {
    match local.cmp(&peer) {
        Ordering::Equal => Action::InSync,
        Ordering::Greater => Action::SendMine,
        Ordering::Less => Action::AwaitTheirs,
    }
}

/// Paces full syncs to a peer that is behind: send at once, then again every
/// `resend_ms` until the peer reports our position (heartbeat or ack). Sends are lost
/// silently on UDP, so "sent once" is never taken for "received".
#[derive(Clone, Debug)]
pub struct Replicator {
    resend_ms: u64,
    last_sent: Option<(ConfigPos, u64)>,
    pub full_syncs_sent: u64,
}

impl Replicator {
    pub fn new(resend_ms: u64) -> Self {
        Self { resend_ms, last_sent: None, full_syncs_sent: 0 }
    }

    /// Called with every peer position heard (heartbeat or ack). True: send the whole
    /// config now.
    pub fn on_peer(&mut self, now_ms: u64, local: ConfigPos, peer: ConfigPos) -> bool {
        if compare(local, peer) != Action::SendMine {
            self.last_sent = None;
            return false;
        }
        let due = match self.last_sent {
            Some((pos, at)) => pos != local || now_ms.saturating_sub(at) >= self.resend_ms,
            None => true,
        };
        if due {
            self.last_sent = Some((local, now_ms));
            self.full_syncs_sent = self.full_syncs_sent.saturating_add(1);
        }
        due
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("config of {0} bytes exceeds the {MAX_CONFIG_LEN}-byte limit")]
    TooLarge(u32),
    #[error("chunk at offset {got}, expected {want} (a chunk was lost; waiting for the resend)")]
    Gap { got: u32, want: u32 },
    #[error("chunk of config {got} while assembling {want}")]
    Mismatch { got: ConfigPos, want: ConfigPos },
}

/// Reassembles one in-order chunked config. Memory is bounded by `MAX_CONFIG_LEN` and
/// only grows with bytes actually received, never with an announced length. A chunk
/// at offset 0 of any position starts over (a resend, or a newer config).
#[derive(Debug, Default)]
pub struct Assembler {
    cur: Option<(ConfigPos, u32, Vec<u8>)>,
}

impl Assembler {
    /// Feeds one chunk. `Ok(Some((pos, bytes)))` when the config is complete.
    pub fn push(&mut self, c: ConfigChunk) -> Result<Option<(ConfigPos, Vec<u8>)>, AssembleError> {
        if c.total_len > MAX_CONFIG_LEN {
            return Err(AssembleError::TooLarge(c.total_len));
        }
        if c.offset == 0 {
            self.cur = Some((c.pos, c.total_len, Vec::new()));
        }
        let Some((pos, total, buf)) = self.cur.as_mut() else {
            return Err(AssembleError::Gap { got: c.offset, want: 0 });
        };
        if *pos != c.pos || *total != c.total_len {
            return Err(AssembleError::Mismatch { got: c.pos, want: *pos });
        }
        let have = buf.len() as u32;
        if c.offset != have {
            self.cur = None;
            return Err(AssembleError::Gap { got: c.offset, want: have });
        }
        if buf.len() as u64 + c.data.len() as u64 > *total as u64 {
            self.cur = None;
            return Err(AssembleError::TooLarge(have.saturating_add(c.data.len() as u32)));
        }
        buf.extend_from_slice(&c.data);
        if buf.len() as u32 == *total {
            let (pos, _, bytes) = self.cur.take().unwrap_or_default();
            return Ok(Some((pos, bytes)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(version: u64, origin: u32) -> ConfigPos {
        ConfigPos { version, origin }
    }

    #[test]
    fn order_is_version_then_lower_origin() {
        let mut v = vec![p(2, 1), p(1, 2), p(2, 2), p(1, 1), p(3, 9), p(0, 0)];
        v.sort();
        assert_eq!(v, vec![p(0, 0), p(1, 2), p(1, 1), p(2, 2), p(2, 1), p(3, 9)]);
        // Total: exactly one of <, ==, > for every pair, the same seen from either side.
        for a in &v {
            for b in &v {
                assert_eq!(a.cmp(b), b.cmp(a).reverse());
                assert_eq!(a == b, a.cmp(b) == Ordering::Equal);
            }
        }
    }

    #[test]
    fn decisions() {
        let cases = [
            // (local, theirs, incoming, compare)
            (p(5, 1), p(6, 2), Incoming::Apply, Action::AwaitTheirs),
            (p(5, 1), p(5, 1), Incoming::AlreadyHave, Action::InSync),
            (p(5, 1), p(4, 1), Incoming::Older, Action::SendMine),
            (p(5, 2), p(5, 1), Incoming::Apply, Action::AwaitTheirs),
            (p(5, 1), p(5, 2), Incoming::Older, Action::SendMine),
        ];
        for (l, t, inc, act) in cases {
            assert_eq!(incoming(l, t), inc, "{l} vs {t}");
            assert_eq!(compare(l, t), act, "{l} vs {t}");
        }
    }

    #[test]
    fn concurrent_changes_converge_to_one_winner() {
        // Both at 4@1, partitioned; each makes a change.
        let base = p(4, 1);
        let a = base.next(Some(base), 1);
        let b = base.next(Some(base), 2);
        assert_eq!((a, b), (p(5, 1), p(5, 2)));
        // After the heal each side decides alone; both keep a.
        assert_eq!(incoming(a, b), Incoming::Older);
        assert_eq!(incoming(b, a), Incoming::Apply);
        // The next change after converging is newer than both.
        assert!(a.next(Some(a), 2) > a && a.next(Some(a), 2) > b);
        // A node behind that changes locally still lands after what it has seen.
        assert_eq!(p(2, 2).next(Some(p(9, 1)), 2), p(10, 2));
    }

    #[test]
    fn a_peer_at_the_top_of_the_range_cannot_freeze_replication() {
        // Positions stop at MAX_CONFIG_VERSION; the wire refuses anything above it.
        let top = p(MAX_CONFIG_VERSION, 1);
        assert!(top.in_range() && !p(MAX_CONFIG_VERSION + 1, 1).in_range() && !p(u64::MAX, 1).in_range());
        assert_eq!(top.next(Some(top), 2), p(MAX_CONFIG_VERSION, 2), "never past the bound");
        // Anything a peer may announce still leaves room for our change to win.
        let peer = p(MAX_CONFIG_VERSION - 1, 1);
        let mine = p(3, 2).next(Some(peer), 2);
        assert!(mine > peer && mine.in_range(), "{mine} vs {peer}");
        assert_eq!(incoming(peer, mine), Incoming::Apply, "the peer applies our change");
    }

    #[test]
    fn replicator_sends_at_once_then_paces_resends() {
        let mut r = Replicator::new(1000);
        let (l, behind) = (p(5, 1), p(3, 1));
        let sends: Vec<bool> = [0, 100, 999, 1000, 1500, 2000].iter().map(|&t| r.on_peer(t, l, behind)).collect();
        assert_eq!(sends, vec![true, false, false, true, false, true]);
        // A new local change is sent at once, not after the pacing interval.
        assert!(r.on_peer(2100, p(6, 1), behind));
        // The peer caught up: nothing more; it falls behind again later: at once.
        assert!(!r.on_peer(2200, p(6, 1), p(6, 1)));
        assert!(r.on_peer(2300, p(7, 1), p(6, 1)));
        // The peer is ahead: it sends, we don't.
        assert!(!r.on_peer(2400, p(7, 1), p(8, 2)));
        assert_eq!(r.full_syncs_sent, 5);
    }

    fn chunk(pos: ConfigPos, total: u32, offset: u32, data: &[u8]) -> ConfigChunk {
        ConfigChunk { pos, total_len: total, offset, data: data.to_vec() }
    }

    #[test]
    fn assembler_in_order_gap_restart_and_limits() {
        let mut a = Assembler::default();
        let v = p(3, 1);
        assert_eq!(a.push(chunk(v, 6, 0, b"ab")), Ok(None));
        assert_eq!(a.push(chunk(v, 6, 2, b"cd")), Ok(None));
        assert_eq!(a.push(chunk(v, 6, 4, b"ef")), Ok(Some((v, b"abcdef".to_vec()))));
        // A lost chunk: the rest is refused until the resend starts at 0 again.
        assert_eq!(a.push(chunk(v, 6, 0, b"ab")), Ok(None));
        assert_eq!(a.push(chunk(v, 6, 4, b"ef")), Err(AssembleError::Gap { got: 4, want: 2 }));
        assert_eq!(a.push(chunk(v, 6, 2, b"cd")), Err(AssembleError::Gap { got: 2, want: 0 }));
        assert_eq!(a.push(chunk(v, 6, 0, b"abcdef")), Ok(Some((v, b"abcdef".to_vec()))));
        // Chunks of another config mixed in are refused; a new offset 0 starts over.
        assert_eq!(a.push(chunk(v, 6, 0, b"ab")), Ok(None));
        assert_eq!(a.push(chunk(p(4, 1), 6, 2, b"cd")), Err(AssembleError::Mismatch { got: p(4, 1), want: v }));
        assert_eq!(a.push(chunk(p(4, 1), 2, 0, b"xy")), Ok(Some((p(4, 1), b"xy".to_vec()))));
        // Empty config, oversize announcement, chunk past the total.
        assert_eq!(a.push(chunk(v, 0, 0, b"")), Ok(Some((v, vec![]))));
        assert_eq!(a.push(chunk(v, MAX_CONFIG_LEN + 1, 0, b"x")), Err(AssembleError::TooLarge(MAX_CONFIG_LEN + 1)));
        assert!(matches!(a.push(chunk(v, 2, 0, b"xyz")), Err(AssembleError::TooLarge(_))));
    }
}
