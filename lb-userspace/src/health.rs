//! Backend health checks: a TCP connect or an HTTP GET per backend every interval,
//! with HAProxy's rise/fall thresholds. Each target is a task on lbd's runtime
//! (thousands cost a few KiB each, no thread), jittered, and reports each result to
//! the owner task; the rise/fall bookkeeping (`Tracker`) is plain data, unit-tested.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// The backend accepts a TCP connection.
    Tcp,
    /// `GET path` answers with a 2xx or 3xx status (or one listed in `expect`).
    Http,
}

/// One service's health check, as written in the config (`health = { ... }`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    pub kind: HealthKind,
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u32,
    /// Consecutive successes that bring a down backend back.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend out.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// HTTP only; default "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port to check; default the VIP's port (required when the VIP is port 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP only: the Host header; default the backend's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// HTTP only: the status codes that pass; default any 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Vec<u16>>,
}

mod defaults {
    // HAProxy's defaults: inter 2s, rise 2, fall 3; timeout = the interval there, 1 s here.
    pub fn interval_ms() -> u32 {
        2000
    }
    pub fn timeout_ms() -> u32 {
        1000
    }
    pub fn rise() -> u32 {
        2
    }
    pub fn fall() -> u32 {
        3
    }
}

impl HealthSpec {
    /// Checks the values; `vip_port` is the service's port (0 = all ports).
    pub fn validate(&self, vip_port: u16) -> Result<(), String> {
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(format!("health.interval_ms {} out of range 100..=3600000", self.interval_ms));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!("health.timeout_ms {} must be between 1 and interval_ms ({})", self.timeout_ms, self.interval_ms));
        }
        if !(1..=100).contains(&self.rise) {
            return Err(format!("health.rise {} out of range 1..=100", self.rise));
        }
        if !(1..=100).contains(&self.fall) {
            return Err(format!("health.fall {} out of range 1..=100", self.fall));
        }
        match (self.kind, &self.path) {
            (HealthKind::Tcp, Some(_)) => {
                return Err("health.path is only for kind = \"http\"".into());
            }
            (HealthKind::Http, Some(p)) if !p.starts_with('/') || p.len() > 1024 || p.bytes().any(|c| c <= b' ' || c == 0x7f) => {
                return Err(format!("health.path {p:?} must start with '/' and hold no spaces or control characters"));
            }
            _ => {}
        }
        if self.kind == HealthKind::Tcp && (self.host.is_some() || self.expect.is_some()) {
            return Err("health.host and health.expect are only for kind = \"http\"".into());
        }
        if let Some(h) = &self.host
            && (h.is_empty() || h.len() > 255 || h.bytes().any(|c| c <= b' ' || c == 0x7f))
        {
            return Err(format!("health.host {h:?} must be 1..=255 characters without spaces or control characters"));
        }
        if let Some(e) = &self.expect
            && (e.is_empty() || e.len() > 16 || e.iter().any(|c| !(100..=599).contains(c)))
        {
            return Err(format!("health.expect {e:?}: 1 to 16 status codes, each 100..=599"));
        }
        if self.port == Some(0) {
            return Err("health.port must not be 0".into());
        }
        if vip_port == 0 && self.port.is_none() {
            return Err("health.port is required when the VIP covers all ports (port 0)".into());
        }
        Ok(())
    }

    pub fn port(&self, vip_port: u16) -> u16 {
        self.port.unwrap_or(vip_port)
    }

    /// Whether an HTTP status passes this check.
    pub fn status_ok(&self, code: u16) -> bool {
        match &self.expect {
            Some(list) => list.contains(&code),
            None => (200..400).contains(&code),
        }
    }
}

/// One check against `addr:port` from `source` (the kernel's source address towards
/// the backend; None: the kernel picks), bounded by `spec.timeout_ms` in total:
/// connect, and for `http` the request and the status line.
pub async fn probe(spec: &HealthSpec, addr: IpAddr, port: u16, source: Option<IpAddr>) -> Result<(), String> {
    let timeout = Duration::from_millis(spec.timeout_ms as u64);
    let sa = SocketAddr::new(addr, port);
    match tokio::time::timeout(timeout, probe_inner(spec, sa, source)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{} {sa}: timed out after {} ms", if spec.kind == HealthKind::Tcp { "connect" } else { "check" }, spec.timeout_ms)),
    }
}

async fn probe_inner(spec: &HealthSpec, sa: SocketAddr, source: Option<IpAddr>) -> Result<(), String> {
    let sock = if sa.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = source.filter(|s| s.is_ipv4() == sa.is_ipv4()) {
        sock.bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
    }
    let mut s = sock.connect(sa).await.map_err(|e| format!("connect {sa}: {e}"))?;
    if spec.kind == HealthKind::Tcp {
        return Ok(());
    }
    let path = spec.path.as_deref().unwrap_or("/");
    let host = match (&spec.host, sa.ip()) {
        (Some(h), _) => h.clone(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(a)) => format!("[{a}]"),
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write {sa}: {e}"))?;
    // The status line is all we need; read until its end or 512 bytes.
    let mut buf = [0u8; 512];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        match s.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read {sa}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (proto, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !proto.starts_with("HTTP/") {
        return Err(format!("GET {path} on {sa}: not an HTTP response ({line:?})"));
    }
    match code.parse::<u16>() {
        Ok(c) if spec.status_ok(c) => Ok(()),
        Ok(c) => Err(format!("GET {path} on {sa}: status {c}")),
        Err(_) => Err(format!("GET {path} on {sa}: bad status line {line:?}")),
    }
}

/// Rise/fall state of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    pub up: bool,
    /// Consecutive results that disagree with `up`.
    pub streak: u32,
}

impl Tracker {
    pub fn new(up: bool) -> Self {
        Self { up, streak: 0 }
    }

    /// Records one result; returns the new state when it changes.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak >= if self.up { fall } else { rise } {
            self.up = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// What to check: a service's backend with its service's spec, from which source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub service: String,
    pub addr: IpAddr,
    pub port: u16,
    pub spec: HealthSpec,
    /// The interface address the kernel uses towards the backend (never a VIP).
    pub source: Option<IpAddr>,
}

/// Where results go: (target, result of one probe).
pub type Report = mpsc::Sender<(Target, Result<(), String>)>;

/// One task per target on the runtime's threads, started and stopped as the backend
/// sets change. Dropping the runner stops every check.
#[derive(Default)]
pub struct Runner {
    running: HashMap<Target, AbortHandle>,
}

impl Runner {
    /// Runs exactly `targets`: starts new ones, stops the ones not listed. `now`:
    /// targets whose first check runs at once (backends waiting for it); the others
    /// start at a point spread over their interval, so thousands do not fire together.
    pub fn sync(&mut self, targets: &[Target], now: &dyn Fn(&Target) -> bool, report: &Report) {
        let want: std::collections::HashSet<&Target> = targets.iter().collect();
        self.running.retain(|t, h| {
            let keep = want.contains(t);
            if !keep {
                h.abort();
            }
            keep
        });
        // Checks due at once are spread at 4 per ms (a reload or start with thousands of
        // new backends must not fire them together); one new backend is checked at once.
        let due = targets.iter().filter(|t| !self.running.contains_key(*t) && now(t)).count() as u64;
        for t in targets {
            if self.running.contains_key(t) {
                continue;
            }
            let interval = t.spec.interval_ms.max(1) as u64;
            let first = if now(t) { Duration::from_millis(spread(t) % (due / 4).clamp(1, interval)) } else { Duration::from_millis(spread(t) % interval) };
            let h = tokio::spawn(check_loop(t.clone(), first, report.clone()));
            self.running.insert(t.clone(), h.abort_handle());
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    pub fn stop_all(&mut self) {
        for h in self.running.values() {
            h.abort();
        }
        self.running.clear();
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A per-target number that spreads first checks and jitter.
fn spread(t: &Target) -> u64 {
    lb_common::hash_words(&lb_common::addr_words(t.addr), 7 ^ t.port as u32) as u64
}

/// Which results go to the owner. Once `settle` identical results in a row have been
/// sent (`max(rise, fall)`), the owner's rise/fall tracker has settled and more of the
/// same tell it nothing; sending them would wake the owner 4,000 times a second for
/// 4,000 healthy targets. One in `REFRESH_EVERY` is still sent, so a tracker the owner
/// rolled back (a failed map write) catches up within that many intervals.
struct Suppress {
    settle: u32,
    last: Option<Result<(), String>>,
    same: u32,
}

const REFRESH_EVERY: u32 = 8;

impl Suppress {
    fn new(spec: &HealthSpec) -> Self {
        Self { settle: spec.rise.max(spec.fall).max(1), last: None, same: 0 }
    }

    fn send(&mut self, r: &Result<(), String>) -> bool {
        if self.last.as_ref() == Some(r) {
            self.same = self.same.saturating_add(1);
        } else {
            self.last = Some(r.clone());
            self.same = 1;
        }
        self.same <= self.settle || (self.same - self.settle).is_multiple_of(REFRESH_EVERY)
    }
}

async fn check_loop(t: Target, first: Duration, report: Report) {
    let interval = Duration::from_millis(t.spec.interval_ms as u64);
    // ±5% per round, from a cheap per-target sequence: checks that started together
    // drift apart instead of staying in lock step.
    let mut x = spread(&t) | 1;
    let mut suppress = Suppress::new(&t.spec);
    tokio::time::sleep(first).await;
    loop {
        let started = tokio::time::Instant::now();
        let r = probe(&t.spec, t.addr, t.port, t.source).await;
        if suppress.send(&r) && report.send((t.clone(), r)).await.is_err() {
            return;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let span = (interval.as_millis() as u64 / 10).max(1);
        let jitter = (x % span) as i64 - (span / 2) as i64;
        let next = (interval.as_millis() as i64 + jitter).max(1) as u64;
        tokio::time::sleep_until(started + Duration::from_millis(next)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_results_are_sent_once_in_a_while_and_every_change_at_once() {
        let mut s = Suppress::new(&HealthSpec { rise: 2, fall: 3, ..spec(HealthKind::Tcp) });
        let ok: Result<(), String> = Ok(());
        let err: Result<(), String> = Err("refused".into());
        // The first 3 (max(rise, fall)) of a run go, then one in 8.
        let sent: Vec<bool> = (0..20).map(|_| s.send(&ok)).collect();
        let want: Vec<bool> = (1..=20u32).map(|n| n <= 3 || (n - 3) % REFRESH_EVERY == 0).collect();
        assert_eq!(sent, want);
        // A change goes at once, and so does every result of the new run until settled:
        // `fall` failures in a row reach the tracker.
        assert!(s.send(&err) && s.send(&err) && s.send(&err));
        assert!(!s.send(&err));
        // Another error text is news (the last error is shown by `backend list`).
        assert!(s.send(&Err("timed out".into())));
        assert!(s.send(&ok));
    }
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::time::Instant;

    fn spec(kind: HealthKind) -> HealthSpec {
        HealthSpec { kind, interval_ms: 1000, timeout_ms: 500, rise: 2, fall: 3, path: None, port: None, host: None, expect: None }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn tracker_needs_fall_failures_and_rise_successes() {
        let mut t = Tracker::new(true);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), None, "a success resets the failure streak");
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), Some(false));
        assert!(!t.up);
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), Some(true));
        assert!(t.up);
    }

    #[test]
    fn validate_names_the_bad_key() {
        let ok = spec(HealthKind::Tcp);
        ok.validate(80).unwrap();
        let http = spec(HealthKind::Http);
        let cases = [
            (HealthSpec { interval_ms: 10, ..ok.clone() }, "interval_ms"),
            (HealthSpec { timeout_ms: 2000, ..ok.clone() }, "timeout_ms"),
            (HealthSpec { rise: 0, ..ok.clone() }, "rise"),
            (HealthSpec { fall: 1000, ..ok.clone() }, "fall"),
            (HealthSpec { path: Some("/x".into()), ..ok.clone() }, "only for kind"),
            (HealthSpec { kind: HealthKind::Http, path: Some("no slash".into()), ..ok.clone() }, "path"),
            (HealthSpec { kind: HealthKind::Http, path: Some("/a b".into()), ..ok.clone() }, "path"),
            (HealthSpec { host: Some("a".into()), ..ok.clone() }, "only for kind"),
            (HealthSpec { host: Some("a b".into()), ..http.clone() }, "health.host"),
            (HealthSpec { expect: Some(vec![]), ..http.clone() }, "health.expect"),
            (HealthSpec { expect: Some(vec![200, 99]), ..http.clone() }, "health.expect"),
        ];
        for (s, want) in cases {
            let e = s.validate(80).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        assert!(ok.validate(0).unwrap_err().contains("port is required"));
        HealthSpec { port: Some(8080), ..ok }.validate(0).unwrap();
        HealthSpec { host: Some("app.example".into()), expect: Some(vec![200, 204]), ..http }.validate(80).unwrap();
    }

    #[test]
    fn tcp_probe_on_loopback_from_a_given_source() {
        let rt = rt();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        rt.block_on(probe(&spec(HealthKind::Tcp), lo, port, Some("127.0.0.2".parse().unwrap()))).unwrap();
        let (_, from) = l.accept().unwrap();
        assert_eq!(from.ip(), "127.0.0.2".parse::<IpAddr>().unwrap(), "the check leaves from the source given");
        drop(l);
        let e = rt.block_on(probe(&spec(HealthKind::Tcp), lo, port, None)).unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }

    /// Serves `n` connections on loopback, answering each with `status`; sends each
    /// request it read on the channel.
    fn http_server(status: &'static str, n: usize) -> (u16, std::sync::mpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut c, _)) = l.accept() else { return };
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 1024];
                let k = c.read(&mut buf).unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..k]).to_string());
                let _ = c.write_all(status.as_bytes());
            }
        });
        (port, rx)
    }

    #[test]
    fn http_probe_checks_status_host_and_timeout() {
        let rt = rt();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let http = HealthSpec { path: Some("/healthz".into()), ..spec(HealthKind::Http) };
        let (p, rx) = http_server("HTTP/1.1 200 OK\r\n\r\n", 1);
        rt.block_on(probe(&http, lo, p, None)).unwrap();
        let req = rx.recv().unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.0\r\n") && req.contains("Host: 127.0.0.1\r\n"), "{req}");
        rt.block_on(probe(&http, lo, http_server("HTTP/1.0 302 Found\r\n\r\n", 1).0, None)).unwrap();
        let e = rt.block_on(probe(&http, lo, http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n", 1).0, None)).unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        let e = rt.block_on(probe(&http, lo, http_server("SSH-2.0-OpenSSH\r\n", 1).0, None)).unwrap_err();
        assert!(e.contains("not an HTTP response"), "{e}");
        // Expected codes and a Host header of our choice.
        let strict = HealthSpec { host: Some("app.example".into()), expect: Some(vec![204]), ..http.clone() };
        let e = rt.block_on(probe(&strict, lo, http_server("HTTP/1.1 200 OK\r\n\r\n", 1).0, None)).unwrap_err();
        assert!(e.contains("status 200"), "200 is not in expect: {e}");
        let (p, rx) = http_server("HTTP/1.1 204 No Content\r\n\r\n", 1);
        rt.block_on(probe(&strict, lo, p, None)).unwrap();
        assert!(rx.recv().unwrap().contains("Host: app.example\r\n"));
        // A server that accepts and never answers: bounded by the timeout.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        let e = rt.block_on(probe(&http, lo, l.local_addr().unwrap().port(), None)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "probe is bounded by timeout_ms");
        assert!(e.contains("timed out"), "{e}");
    }

    #[test]
    fn runner_reports_and_stops() {
        let rt = rt();
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let t = Target {
                service: "web".into(),
                addr: "127.0.0.1".parse().unwrap(),
                port: l.local_addr().unwrap().port(),
                spec: HealthSpec { interval_ms: 100, timeout_ms: 100, ..spec(HealthKind::Tcp) },
                source: None,
            };
            let (tx, mut rx) = mpsc::channel(16);
            let mut runner = Runner::default();
            runner.sync(std::slice::from_ref(&t), &|_| true, &tx);
            assert_eq!(runner.len(), 1);
            for _ in 0..2 {
                let (got, r) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("a report within 2 s").unwrap();
                assert_eq!(got, t);
                assert!(r.is_ok());
            }
            runner.sync(&[], &|_| true, &tx);
            assert!(runner.is_empty());
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            assert!(tokio::time::timeout(Duration::from_millis(400), rx.recv()).await.is_err(), "stopped checks report nothing");
        });
    }
}
