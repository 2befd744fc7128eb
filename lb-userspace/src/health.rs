//! Backend health checks: a TCP connect or an HTTP GET per backend every interval,
//! with HAProxy's rise/fall thresholds. The checks run in their own threads and report
//! each result; the rise/fall bookkeeping (`Tracker`) is plain data, unit-tested.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// The backend accepts a TCP connection.
    Tcp,
    /// `GET path` answers with a 2xx or 3xx status.
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
            (HealthKind::Tcp, Some(_)) => return Err("health.path is only for kind = \"http\"".into()),
            (HealthKind::Http, Some(p)) if !p.starts_with('/') || p.len() > 1024 || p.bytes().any(|c| c <= b' ' || c == 0x7f) => {
                return Err(format!("health.path {p:?} must start with '/' and hold no spaces or control characters"));
            }
            _ => {}
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
}

/// One check against `addr:port`, bounded by `spec.timeout_ms` in total.
pub fn probe(spec: &HealthSpec, addr: IpAddr, port: u16) -> Result<(), String> {
    let timeout = Duration::from_millis(spec.timeout_ms as u64);
    let deadline = Instant::now() + timeout;
    let sa = SocketAddr::new(addr, port);
    let mut s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("connect {sa}: {e}"))?;
    if spec.kind == HealthKind::Tcp {
        return Ok(());
    }
    let left = |what: &str| {
        deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(|| format!("{what} {sa}: timed out"))
    };
    let path = spec.path.as_deref().unwrap_or("/");
    let host = match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n");
    s.set_write_timeout(Some(left("write")?)).map_err(|e| e.to_string())?;
    s.write_all(req.as_bytes()).map_err(|e| format!("write {sa}: {e}"))?;
    // The status line is all we need; read until its end or 512 bytes.
    let mut buf = [0u8; 512];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        s.set_read_timeout(Some(left("read")?)).map_err(|e| e.to_string())?;
        match s.read(&mut buf[n..]) {
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
        Ok(c) if (200..400).contains(&c) => Ok(()),
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

/// What to check: a service's backend with its service's spec.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub service: String,
    pub addr: IpAddr,
    pub port: u16,
    pub spec: HealthSpec,
}

/// Where results go: (target, result of one probe).
pub type Report = Arc<dyn Fn(&Target, Result<(), String>) + Send + Sync>;

struct Running {
    stop: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

/// One thread per target, started and stopped as the backend sets change.
#[derive(Default)]
pub struct Runner {
    running: HashMap<Target, Running>,
}

impl Runner {
    /// Runs exactly `targets`: starts new ones, stops the ones not listed.
    pub fn sync(&mut self, targets: &[Target], report: &Report) {
        self.running.retain(|t, r| {
            let keep = targets.contains(t);
            if !keep {
                r.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        for t in targets {
            if self.running.contains_key(t) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (t2, stop2, report) = (t.clone(), stop.clone(), report.clone());
            let thread = std::thread::Builder::new()
                .name(format!("health {}", t.addr))
                .spawn(move || check_loop(&t2, &stop2, &*report))
                .expect("spawning a health-check thread");
            self.running.insert(t.clone(), Running { stop, _thread: thread });
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
    }
}

fn check_loop(t: &Target, stop: &AtomicBool, report: &(dyn Fn(&Target, Result<(), String>) + Send + Sync)) {
    let interval = Duration::from_millis(t.spec.interval_ms as u64);
    // Spread the first checks over the interval so N backends are not probed at once.
    let offset = lb_common::hash_words(&lb_common::addr_words(t.addr), 7) as u64 % (t.spec.interval_ms as u64).max(1);
    let mut next = Instant::now() + Duration::from_millis(offset.min(200));
    loop {
        // Sleep in short slices so a stop takes effect quickly.
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let r = probe(&t.spec, t.addr, t.port);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        report(t, r);
        next += interval;
        if next < Instant::now() {
            next = Instant::now() + interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn spec(kind: HealthKind) -> HealthSpec {
        HealthSpec { kind, interval_ms: 1000, timeout_ms: 500, rise: 2, fall: 3, path: None, port: None }
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
        let cases = [
            (HealthSpec { interval_ms: 10, ..ok.clone() }, "interval_ms"),
            (HealthSpec { timeout_ms: 2000, ..ok.clone() }, "timeout_ms"),
            (HealthSpec { rise: 0, ..ok.clone() }, "rise"),
            (HealthSpec { fall: 1000, ..ok.clone() }, "fall"),
            (HealthSpec { path: Some("/x".into()), ..ok.clone() }, "only for kind"),
            (HealthSpec { kind: HealthKind::Http, path: Some("no slash".into()), ..ok.clone() }, "path"),
            (HealthSpec { kind: HealthKind::Http, path: Some("/a b".into()), ..ok.clone() }, "path"),
        ];
        for (s, want) in cases {
            let e = s.validate(80).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        assert!(ok.validate(0).unwrap_err().contains("port is required"));
        HealthSpec { port: Some(8080), ..ok }.validate(0).unwrap();
    }

    #[test]
    fn tcp_probe_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        probe(&spec(HealthKind::Tcp), "127.0.0.1".parse().unwrap(), port).unwrap();
        drop(l);
        let e = probe(&spec(HealthKind::Tcp), "127.0.0.1".parse().unwrap(), port).unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }

    /// Serves `n` connections on loopback, answering each with `status`.
    fn http_server(status: &'static str, n: usize) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut c, _)) = l.accept() else { return };
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let _ = c.write_all(status.as_bytes());
            }
        });
        port
    }

    #[test]
    fn http_probe_accepts_2xx_3xx_only() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let http = HealthSpec { path: Some("/healthz".into()), ..spec(HealthKind::Http) };
        probe(&http, lo, http_server("HTTP/1.1 200 OK\r\n\r\n", 1)).unwrap();
        probe(&http, lo, http_server("HTTP/1.0 302 Found\r\n\r\n", 1)).unwrap();
        let e = probe(&http, lo, http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n", 1)).unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        let e = probe(&http, lo, http_server("SSH-2.0-OpenSSH\r\n", 1)).unwrap_err();
        assert!(e.contains("not an HTTP response"), "{e}");
        // A server that accepts and never answers: bounded by the timeout.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        let e = probe(&http, lo, l.local_addr().unwrap().port()).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "probe is bounded by timeout_ms");
        assert!(e.contains("read") || e.contains("timed out"), "{e}");
    }

    #[test]
    fn runner_reports_and_stops() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Target {
            service: "web".into(),
            addr: "127.0.0.1".parse().unwrap(),
            port: l.local_addr().unwrap().port(),
            spec: HealthSpec { interval_ms: 100, timeout_ms: 100, ..spec(HealthKind::Tcp) },
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let report: Report = Arc::new(move |t: &Target, r: Result<(), String>| {
            let _ = tx.lock().unwrap().send((t.addr, r.is_ok()));
        });
        let mut runner = Runner::default();
        runner.sync(std::slice::from_ref(&t), &report);
        assert_eq!(runner.len(), 1);
        for _ in 0..2 {
            let (_, ok) = rx.recv_timeout(Duration::from_secs(2)).expect("a report within 2 s");
            assert!(ok);
        }
        runner.sync(&[], &report);
        assert!(runner.is_empty());
        // Drain what was in flight, then nothing more arrives.
        std::thread::sleep(Duration::from_millis(300));
        while rx.try_recv().is_ok() {}
        assert!(rx.recv_timeout(Duration::from_millis(400)).is_err(), "stopped checks report nothing");
    }
}
