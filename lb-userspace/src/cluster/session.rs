//! Which peer datagrams belong to the current session, so that nothing recorded in
//! an earlier one is ever accepted, whatever restarted (issue 11, item 1).
//!
//! Each node draws a random 16-byte nonce when it starts, and again whenever the
//! peer turns up in a new session. Every datagram carries, under the MAC, the
//! sender's nonce and the receiver's nonce as the sender last heard it (`echo`). A
//! datagram is accepted only if it echoes our *current* nonce, so it was sealed after
//! that nonce existed: a datagram recorded before we started, or before we last drew
//! a nonce, echoes another one and is refused. Our nonce is bound to at most one peer
//! nonce: the first fresh datagram binds it, later ones must carry the same peer
//! nonce and a higher sequence number. A fresh datagram with another peer nonce means
//! the peer restarted; we then draw a new nonce, which invalidates everything the
//! peer sealed before (including its previous session's datagrams that echoed our
//! old nonce), and let the new session bind. No persisted state and no clock is
//! involved, so a lost state directory or a clock stepped back changes nothing.
//!
//! Handshake cost: a node that does not know the peer's nonce yet learns it from any
//! authentic datagram (that only chooses what we echo; nothing is accepted from it),
//! and the node is told to answer at once (`Verdict::Stale { hello: true }`), so a
//! session is established within one round trip after a start, two after a one-sided
//! restart. Once the peer has proved a fresh nonce, a datagram that does not echo
//! ours changes what we echo only after `REKEY_AFTER_MS` without another proof: a
//! replayed old datagram cannot make a live pair echo stale nonces.

use std::sync::{Arc, Mutex, MutexGuard};

pub const NONCE_LEN: usize = 16;
pub type Nonce = [u8; NONCE_LEN];

/// A bound session silent this long may learn a new peer nonce from an unverified
/// datagram (the peer restarted faster than a dead interval).
pub const REKEY_AFTER_MS: u64 = 1000;

/// A fresh random nonce (getrandom; /dev/urandom if that fails).
pub fn fresh_nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    // SAFETY: getrandom writes at most NONCE_LEN bytes into the buffer we own.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), NONCE_LEN, 0) };
    if got != NONCE_LEN as isize {
        use std::io::Read as _;
        let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut n)).is_ok();
        if !ok {
            // Never repeats within a boot: time, pid and a counter through SHA-256.
            use sha2::Digest as _;
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let c = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let h = sha2::Sha256::new().chain_update(t.to_be_bytes()).chain_update(std::process::id().to_be_bytes()).chain_update(c.to_be_bytes()).finalize();
            n.copy_from_slice(&h[..NONCE_LEN]);
        }
    }
    // All zeros means "unknown" on the wire.
    if n == [0; NONCE_LEN] {
        n[0] = 1;
    }
    n
}

/// What `Session::check` decided about one authentic datagram from the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Of this session, but not after the last accepted sequence number.
    Replay,
    /// Not sealed for our current nonce. `hello`: our nonce or what we echo changed;
    /// send the peer a datagram now so the handshake completes without waiting.
    Stale {
        hello: bool,
    },
}

#[derive(Debug)]
pub struct Session {
    local: Nonce,
    /// The peer nonce bound to `local`, with the last accepted sequence number.
    bound: Option<(Nonce, u64)>,
    /// The peer's nonce as we last learnt it; all zeros: unknown.
    echo: Nonce,
    /// When the peer last proved a fresh datagram (accepted, or one that made us
    /// redraw our nonce).
    last_fresh_ms: Option<u64>,
    /// Times our nonce was redrawn because the peer appeared in a new session.
    pub rotations: u64,
    /// A session was bound since `take_started` last looked.
    started: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self::with_nonce(fresh_nonce())
    }
}

impl Session {
    pub fn with_nonce(local: Nonce) -> Self {
        Self { local, bound: None, echo: [0; NONCE_LEN], last_fresh_ms: None, rotations: 0, started: false }
    }

    pub fn local(&self) -> Nonce {
        self.local
    }

    pub fn echo(&self) -> Nonce {
        self.echo
    }

    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// True once after a session was bound: the peer is newly reachable, so what it
    /// missed (the config) is worth sending now rather than at the next tick.
    pub fn take_started(&mut self) -> bool {
        std::mem::take(&mut self.started)
    }

    /// Decides about an authentic datagram carrying the peer's nonce `sender`, our
    /// nonce as the peer knew it (`echo`) and its sequence number.
    pub fn check(&mut self, now_ms: u64, sender: Nonce, echo: Nonce, seq: u64) -> Verdict {
        if echo == self.local {
            match self.bound {
                Some((n, last)) if n == sender && seq <= last => return Verdict::Replay,
                Some((n, _)) if n == sender => {}
                None => {}
                Some(_) => {
                    // The peer is in a session other than the one our nonce is bound
                    // to: it restarted. A new nonce of ours voids everything sealed
                    // before now, the old session's datagrams included.
                    self.rotate(fresh_nonce());
                    self.echo = sender;
                    self.last_fresh_ms = Some(now_ms);
                    return Verdict::Stale { hello: true };
                }
            }
            self.started |= self.bound.is_none();
            self.bound = Some((sender, seq));
            self.echo = sender;
            self.last_fresh_ms = Some(now_ms);
            return Verdict::Accept;
        }
        // Sealed for another nonce of ours: recorded earlier, or the peer does not know
        // us yet. Nothing is accepted; it may only tell us what to echo.
        // Only while the peer has not proved a fresh nonce lately: a replayed old
        // datagram must not make a live pair echo stale nonces.
        let silent = self.last_fresh_ms.is_none_or(|t| now_ms.saturating_sub(t) >= REKEY_AFTER_MS);
        let learn = sender != self.echo && silent;
        if learn {
            self.echo = sender;
        }
        Verdict::Stale { hello: learn }
    }

    fn rotate(&mut self, n: Nonce) {
        self.local = n;
        self.bound = None;
        self.rotations = self.rotations.saturating_add(1);
    }
}

/// One session shared by the node's `Sealer` (what it stamps on datagrams) and its
/// `PeerGuard` (what it accepts). Both are used under the node's own lock, so this
/// lock is never contended.
#[derive(Clone, Debug, Default)]
pub struct SharedSession(Arc<Mutex<Session>>);

impl SharedSession {
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Nonce = [0xa; NONCE_LEN];
    const B: Nonce = [0xb; NONCE_LEN];
    const B2: Nonce = [0xb2; NONCE_LEN];

    #[test]
    fn nonces_are_fresh_and_never_zero() {
        let (a, b) = (fresh_nonce(), fresh_nonce());
        assert_ne!(a, b);
        assert_ne!(a, [0; NONCE_LEN]);
    }

    #[test]
    fn binds_once_then_orders_by_seq() {
        let mut s = Session::with_nonce(A);
        // The peer does not know us yet: learn what to echo, answer at once.
        assert_eq!(s.check(0, B, [0; NONCE_LEN], 1), Verdict::Stale { hello: true });
        assert_eq!(s.echo(), B);
        assert_eq!(s.check(1, B, [0; NONCE_LEN], 2), Verdict::Stale { hello: false }, "nothing new to say");
        assert!(!s.take_started());
        assert_eq!(s.check(2, B, A, 3), Verdict::Accept);
        assert!(s.take_started() && !s.take_started(), "reported once");
        assert_eq!(s.check(3, B, A, 3), Verdict::Replay);
        assert_eq!(s.check(3, B, A, 2), Verdict::Replay);
        assert_eq!(s.check(4, B, A, 9), Verdict::Accept);
    }

    #[test]
    fn a_new_peer_session_redraws_our_nonce_and_voids_the_old_one() {
        let mut s = Session::with_nonce(A);
        assert_eq!(s.check(0, B, A, 1), Verdict::Accept);
        // The peer restarted as B2 and learnt our nonce: its datagram is fresh, but
        // our nonce was bound to B, so it is redrawn.
        assert_eq!(s.check(1, B2, A, 1), Verdict::Stale { hello: true });
        let a2 = s.local();
        assert_ne!(a2, A);
        assert_eq!(s.echo(), B2);
        // B's datagrams, whatever their seq, and B2's sealed for A, are dead.
        assert_eq!(s.check(2, B, A, 100), Verdict::Stale { hello: false });
        assert_eq!(s.check(2, B2, A, 100), Verdict::Stale { hello: false });
        assert_eq!(s.check(3, B2, a2, 2), Verdict::Accept);
        assert_eq!(s.rotations, 1);
    }

    #[test]
    fn a_bound_session_ignores_unverified_nonces_until_silent() {
        let mut s = Session::with_nonce(A);
        assert_eq!(s.check(0, B, A, 1), Verdict::Accept);
        assert_eq!(s.check(10, B2, [0; NONCE_LEN], 1), Verdict::Stale { hello: false });
        assert_eq!(s.echo(), B, "a replayed hello does not change what we echo");
        assert_eq!(s.check(REKEY_AFTER_MS, B2, [0; NONCE_LEN], 2), Verdict::Stale { hello: true });
        assert_eq!(s.echo(), B2);
    }
}
