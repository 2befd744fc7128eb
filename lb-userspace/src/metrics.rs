//! Prometheus metrics: `GET /metrics` in the text exposition format, rendered with
//! `prometheus-client` from one snapshot of lbd's state per scrape.
//!
//! Why a fresh registry per scrape: the datapath's counters live in per-CPU maps and
//! are summed on read, so every value is an absolute reading, never an increment lbd
//! observes. Building the families from the snapshot keeps one source of truth (the
//! maps and the owner's model) and leaves no series behind for a removed backend.

use std::fmt::Write as _;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::api::StatsView;

/// What the binary was built from (also printed by `lbd --version`).
#[derive(Clone, Debug)]
pub struct BuildInfo {
    pub version: String,
    pub revision: String,
    pub map_layout: String,
}

/// One backend's control-plane state (traffic comes from [`StatsView`]).
#[derive(Clone, Debug)]
pub struct BackendState {
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    /// Health checks say up, or the service has none.
    pub up: bool,
    pub in_table: bool,
    /// Added but not yet reachable (next hop unknown or first check not passed).
    pub pending: bool,
}

/// The cluster as the owner and the heartbeat task see it.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// init | backup | active
    pub role: String,
    pub peer_alive: bool,
    /// Time since the peer's last heartbeat arrived (None: never heard).
    pub last_heartbeat_age_seconds: Option<f64>,
    /// Our heartbeat send interval, p99 over the last 4096 sent.
    pub heartbeat_interval_p99_seconds: f64,
    /// Longest silence of the peer between two heartbeats heard.
    pub peer_gap_max_seconds: f64,
    pub role_changes: u64,
    pub local_config_version: u64,
    pub peer_config_version: Option<u64>,
    pub datagrams_accepted: u64,
    pub datagrams_rejected: Vec<(String, u64)>,
    /// Flows sent to the peer (active) and applied from it (backup).
    pub flows_sent: u64,
    pub flows_applied: u64,
    /// Flows not synced, by reason (queue full, unknown VIP, ...).
    pub flows_dropped: Vec<(String, u64)>,
}

pub const ROLES: [&str; 3] = ["init", "backup", "active"];

/// Everything one scrape shows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub build: BuildInfo,
    pub stats: StatsView,
    pub backends: Vec<BackendState>,
    pub cluster: Option<ClusterState>,
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, f.clone()),
        None => reg.register(name, help, f.clone()),
    }
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// The kind of a datapath reason from its name's prefix (`lb_common::reason::NAMES`).
fn reason_kind(name: &str) -> &'static str {
    match name.split('_').next() {
        Some("drop") => "drop",
        Some("pass") => "pass",
        Some("tx") => "reply",
        Some("fwd") => "forward",
        _ => "other",
    }
}

/// Renders a snapshot (plus this process's own metrics) as Prometheus text.
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("lb");

    let build = Info::new(vec![
        ("version", s.build.version.clone()),
        ("revision", s.build.revision.clone()),
        ("map_layout", s.build.map_layout.clone()),
    ]);
    reg.register(
        "build",
        "Version, git revision and map-layout version of this lbd",
        build,
    );

    let svc_packets = counter_family(
        &mut reg,
        "service_packets",
        "Packets the datapath steered for a service",
        None,
    );
    let svc_bytes = counter_family(
        &mut reg,
        "service",
        "Bytes the datapath steered for a service",
        Some(Unit::Bytes),
    );
    let svc_flows = counter_family(
        &mut reg,
        "service_new_flows",
        "New flows of a service",
        None,
    );
    let be_packets = counter_family(
        &mut reg,
        "backend_packets",
        "Packets sent to a backend",
        None,
    );
    let be_bytes = counter_family(
        &mut reg,
        "backend",
        "Bytes sent to a backend",
        Some(Unit::Bytes),
    );
    let be_flows = counter_family(
        &mut reg,
        "backend_new_flows",
        "New flows steered to a backend",
        None,
    );
    let be_up = gauge_family(
        &mut reg,
        "backend_up",
        "1 if the backend passes its health checks (or has none), else 0",
    );
    let be_in_table = gauge_family(
        &mut reg,
        "backend_in_table",
        "1 if the backend is in its service's Maglev table",
    );
    let be_pending = gauge_family(
        &mut reg,
        "backend_pending",
        "1 while a new backend waits for its next hop or first check",
    );
    let be_weight = gauge_family(
        &mut reg,
        "backend_weight",
        "Configured weight (0 = drained)",
    );
    for svc in &s.stats.services {
        let l: Labels = vec![("service", svc.name.clone()), ("vip", svc.vip.clone())];
        svc_packets.get_or_create(&l).inc_by(svc.traffic.packets);
        svc_bytes.get_or_create(&l).inc_by(svc.traffic.bytes);
        svc_flows.get_or_create(&l).inc_by(svc.traffic.new_flows);
        for b in &svc.backends {
            let l: Labels = vec![
                ("service", svc.name.clone()),
                ("backend", b.address.to_string()),
            ];
            be_packets.get_or_create(&l).inc_by(b.traffic.packets);
            be_bytes.get_or_create(&l).inc_by(b.traffic.bytes);
            be_flows.get_or_create(&l).inc_by(b.traffic.new_flows);
        }
    }
    for b in &s.backends {
        let l: Labels = vec![
            ("service", b.service.clone()),
            ("backend", b.address.to_string()),
        ];
        be_up.get_or_create(&l).set(b.up.into());
        be_in_table.get_or_create(&l).set(b.in_table.into());
        be_pending.get_or_create(&l).set(b.pending.into());
        be_weight.get_or_create(&l).set(b.weight.into());
    }

    let r_packets = counter_family(
        &mut reg,
        "datapath_reason_packets",
        "Packets by datapath reason: drops, passes to the host stack, replies the balancer built, forwarded sub-counts",
        None,
    );
    let r_bytes = counter_family(
        &mut reg,
        "datapath_reason",
        "Bytes by datapath reason",
        Some(Unit::Bytes),
    );
    for r in &s.stats.reasons {
        let l: Labels = vec![
            ("reason", r.reason.clone()),
            ("kind", reason_kind(&r.reason).to_string()),
        ];
        r_packets.get_or_create(&l).inc_by(r.packets);
        r_bytes.get_or_create(&l).inc_by(r.bytes);
    }

    if let Some(c) = &s.cluster {
        let role = gauge_family(
            &mut reg,
            "cluster_role",
            "1 for this node's current cluster role, 0 for the others",
        );
        for r in ROLES {
            role.get_or_create(&vec![("role", r.to_string())])
                .set((c.role == r).into());
        }
        let alive = Gauge::<i64>::default();
        alive.set(c.peer_alive.into());
        reg.register(
            "cluster_peer_alive",
            "1 while the peer's heartbeats arrive within dead_after",
            alive,
        );
        let f64_gauge = |reg: &mut Registry, name: &str, help: &str, v: f64| {
            let g = Gauge::<f64, AtomicU64>::default();
            g.set(v);
            reg.register_with_unit(name, help, Unit::Seconds, g);
        };
        if let Some(age) = c.last_heartbeat_age_seconds {
            f64_gauge(
                &mut reg,
                "cluster_peer_last_heartbeat_age",
                "Time since the peer's last heartbeat arrived",
                age,
            );
        }
        f64_gauge(
            &mut reg,
            "cluster_heartbeat_interval_p99",
            "Heartbeat send interval, p99 over the last 4096 sent",
            c.heartbeat_interval_p99_seconds,
        );
        f64_gauge(
            &mut reg,
            "cluster_peer_gap_max",
            "Longest silence of the peer between two heartbeats since start",
            c.peer_gap_max_seconds,
        );
        let changes = Counter::<u64>::default();
        changes.inc_by(c.role_changes);
        reg.register(
            "cluster_role_changes",
            "Role changes of this node since start",
            changes,
        );
        let dgrams = counter_family(
            &mut reg,
            "cluster_datagrams",
            "Peer datagrams, accepted or refused by reason",
            None,
        );
        dgrams
            .get_or_create(&vec![("result", "accepted".to_string())])
            .inc_by(c.datagrams_accepted);
        for (reason, n) in &c.datagrams_rejected {
            dgrams
                .get_or_create(&vec![("result", reason.clone())])
                .inc_by(*n);
        }
        let ver = gauge_family(
            &mut reg,
            "cluster_config_version",
            "Config position's version, this node and the peer's",
        );
        ver.get_or_create(&vec![("node", "local".to_string())])
            .set(c.local_config_version.try_into().unwrap_or(i64::MAX));
        if let Some(p) = c.peer_config_version {
            ver.get_or_create(&vec![("node", "peer".to_string())])
                .set(p.try_into().unwrap_or(i64::MAX));
        }
        let synced = counter_family(
            &mut reg,
            "cluster_flows_synced",
            "Flows streamed to the peer (sent) or written from it (applied)",
            None,
        );
        synced
            .get_or_create(&vec![("direction", "sent".to_string())])
            .inc_by(c.flows_sent);
        synced
            .get_or_create(&vec![("direction", "applied".to_string())])
            .inc_by(c.flows_applied);
        let dropped = counter_family(
            &mut reg,
            "cluster_flows_dropped",
            "Flows not synced, by reason",
            None,
        );
        for (reason, n) in &c.flows_dropped {
            dropped
                .get_or_create(&vec![("reason", reason.clone())])
                .inc_by(*n);
        }
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    // `encode` ends with the OpenMetrics `# EOF`; the process metrics go before it.
    let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
    let mut body = body;
    process_metrics(&mut body);
    body.push_str("# EOF\n");
    body
}

/// Standard `process_*` metrics of this process from /proc (Linux).
fn process_metrics(out: &mut String) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which may contain spaces: skip to the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime = field 14, stime = 15, starttime = 22,
    // vsize = 23, rss = 24 (1-based), i.e. indexes 11, 12, 19, 20, 21 here.
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut line = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        if kind == "counter" {
            let _ = writeln!(out, "{name}_total {v}");
        } else {
            let _ = writeln!(out, "{name} {v}");
        }
    };
    if let (Some(u), Some(s)) = (num(11), num(12)) {
        line(
            "process_cpu_seconds",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (u + s) as f64 / ticks,
        );
    }
    if let Some(v) = num(20) {
        line(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            v as f64,
        );
    }
    if let Some(r) = num(21) {
        line(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (r * page) as f64,
        );
    }
    if let (Some(start), Ok(uptime)) = (num(19), std::fs::read_to_string("/proc/uptime")) {
        let up: f64 = uptime
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        line(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            now - up + start as f64 / ticks,
        );
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        line(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            d.count() as f64,
        );
    }
}

/// Where a scrape gets its snapshot: the daemon asks its owner task.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> impl Future<Output = anyhow::Result<Snapshot>> + Send;
}

/// Requests are one small GET; anything bigger is refused.
const MAX_REQUEST: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapers are a handful of Prometheus servers: more concurrent connections wait.
const MAX_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` (and `/` with a pointer to it) until the listener fails.
pub async fn serve<S: SnapshotSource>(
    listener: TcpListener,
    source: Arc<S>,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (conn, _) = listener.accept().await?;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, handle(conn, &*source))
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn handle<S: SnapshotSource>(mut conn: TcpStream, source: &S) -> Result<(), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
        }
        let n = conn.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the end of the request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return respond(
            &mut conn,
            "400 Bad Request",
            "text/plain",
            "bad request line\n",
        )
        .await;
    }
    if method != "GET" {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        )
        .await;
    }
    match target.split('?').next().unwrap_or("") {
        "/metrics" => match source.snapshot().await {
            Ok(s) => {
                respond(
                    &mut conn,
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    &render(&s),
                )
                .await
            }
            Err(e) => {
                respond(
                    &mut conn,
                    "503 Service Unavailable",
                    "text/plain",
                    &format!("{e:#}\n"),
                )
                .await
            }
        },
        "/" => {
            respond(
                &mut conn,
                "200 OK",
                "text/plain",
                "lbd: metrics at /metrics\n",
            )
            .await
        }
        _ => respond(&mut conn, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> Result<(), String> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    conn.write_all(body.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    conn.shutdown().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendStatsView, ReasonView, ServiceStatsView, TrafficView};

    fn traffic(p: u64, b: u64, f: u64) -> TrafficView {
        TrafficView {
            packets: p,
            bytes: b,
            new_flows: f,
            pps: 0.0,
        }
    }

    fn sample() -> Snapshot {
        let be: IpAddr = "10.0.1.11".parse().unwrap();
        Snapshot {
            build: BuildInfo {
                version: "0.1.0".into(),
                revision: "abc1234".into(),
                map_layout: "3".into(),
            },
            stats: StatsView {
                services: vec![ServiceStatsView {
                    name: "web".into(),
                    vip: "10.0.0.100:80/tcp".into(),
                    traffic: traffic(10, 1000, 2),
                    backends: vec![BackendStatsView {
                        address: be,
                        health: "up".into(),
                        admin: "enabled".into(),
                        traffic: traffic(7, 700, 2),
                    }],
                }],
                reasons: vec![
                    ReasonView {
                        reason: "drop_malformed".into(),
                        packets: 3,
                        bytes: 180,
                    },
                    ReasonView {
                        reason: "pass_not_vip".into(),
                        packets: 5,
                        bytes: 300,
                    },
                ],
            },
            backends: vec![BackendState {
                service: "web".into(),
                address: be,
                weight: 100,
                up: true,
                in_table: true,
                pending: false,
            }],
            cluster: Some(ClusterState {
                role: "active".into(),
                peer_alive: true,
                last_heartbeat_age_seconds: Some(0.05),
                heartbeat_interval_p99_seconds: 0.1,
                peer_gap_max_seconds: 0.2,
                role_changes: 1,
                local_config_version: 4,
                peer_config_version: Some(4),
                datagrams_accepted: 100,
                datagrams_rejected: vec![("bad_mac".into(), 2)],
                flows_sent: 12,
                flows_applied: 0,
                flows_dropped: vec![("queue_full".into(), 1)],
            }),
        }
    }

    /// The value of the one sample line that starts with `series` (name and labels).
    fn value(text: &str, series: &str) -> f64 {
        let hits: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .collect();
        assert_eq!(hits.len(), 1, "{series} in\n{text}");
        hits[0].rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn renders_conventional_names_and_values() {
        let t = render(&sample());
        assert_eq!(
            value(
                &t,
                r#"lb_service_packets_total{service="web",vip="10.0.0.100:80/tcp"}"#
            ),
            10.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_service_bytes_total{service="web",vip="10.0.0.100:80/tcp"}"#
            ),
            1000.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_backend_new_flows_total{service="web",backend="10.0.1.11"}"#
            ),
            2.0
        );
        assert_eq!(
            value(&t, r#"lb_backend_up{service="web",backend="10.0.1.11"}"#),
            1.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_backend_pending{service="web",backend="10.0.1.11"}"#
            ),
            0.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_backend_weight{service="web",backend="10.0.1.11"}"#
            ),
            100.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_datapath_reason_packets_total{reason="drop_malformed",kind="drop"}"#
            ),
            3.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_datapath_reason_packets_total{reason="pass_not_vip",kind="pass"}"#
            ),
            5.0
        );
        assert_eq!(value(&t, r#"lb_cluster_role{role="active"}"#), 1.0);
        assert_eq!(value(&t, r#"lb_cluster_role{role="backup"}"#), 0.0);
        assert_eq!(value(&t, "lb_cluster_peer_alive"), 1.0);
        assert_eq!(
            value(&t, "lb_cluster_peer_last_heartbeat_age_seconds"),
            0.05
        );
        assert_eq!(value(&t, "lb_cluster_role_changes_total"), 1.0);
        assert_eq!(
            value(&t, r#"lb_cluster_datagrams_total{result="bad_mac"}"#),
            2.0
        );
        assert_eq!(
            value(&t, r#"lb_cluster_flows_synced_total{direction="sent"}"#),
            12.0
        );
        assert_eq!(
            value(&t, r#"lb_cluster_flows_dropped_total{reason="queue_full"}"#),
            1.0
        );
        assert_eq!(
            value(
                &t,
                r#"lb_build_info{version="0.1.0",revision="abc1234",map_layout="3"}"#
            ),
            1.0
        );
        assert!(value(&t, "process_cpu_seconds_total") >= 0.0);
        assert!(value(&t, "process_resident_memory_bytes") > 0.0);
        assert!(t.contains("# TYPE lb_service_packets counter"), "{t}");
        assert!(t.ends_with("# EOF\n"));
        assert_eq!(t.matches("# EOF").count(), 1);
    }

    #[test]
    fn standalone_node_has_no_cluster_series() {
        let mut s = sample();
        s.cluster = None;
        let t = render(&s);
        assert!(!t.contains("lb_cluster_"), "{t}");
    }

    struct Fixed(Snapshot);
    impl SnapshotSource for Fixed {
        async fn snapshot(&self) -> anyhow::Result<Snapshot> {
            Ok(self.0.clone())
        }
    }

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_over_http_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(l, Arc::new(Fixed(sample()))));
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("lb_backend_new_flows_total{service=\"web\",backend=\"10.0.1.11\"} 2"),
            "{ok}"
        );
        assert!(
            get(addr, b"GET /nope HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            get(addr, b"POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
        assert!(
            get(addr, b"garbage\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400")
        );
        let big = [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 10000]].concat();
        assert!(get(addr, &big).await.starts_with("HTTP/1.1 431"));
        server.abort();
    }
}
