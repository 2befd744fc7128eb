//! `lb-bench-lab`: the lab's web tier behind the lbd pair, then behind HAProxy in TCP
//! mode (the design our users run today), in one run on the same namespaces, web
//! servers and client (`cargo xtask bench lab`, root).
//!
//! Load: 16 client threads, each opening a new connection per request (GET /index.html
//! over HTTP/1.0) for a fixed time. Per run: requests/s, p50/p99 latency, errors, and
//! the load balancer's CPU per 10,000 requests:
//! - lbd: the lbd processes' CPU (user + system) plus the XDP program's own run time
//!   (kernel BPF statistics, `kernel.bpf_stats_enabled`, switched on for the run);
//! - HAProxy: the haproxy process's CPU (user + system; its socket work is system time).
//!
//! The kernel work around XDP (the veth driver, XDP_TX) is not in our figure and the
//! kernel work of HAProxy's TCP stack outside its syscalls is not in its figure;
//! both are softirq on the same veths and left out of both sides alike.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_tests::lab::{Lab, WEB, web_vip};
use lb_tests::netns::{ChildGuard, in_ns, ns_command};

const WORKERS: usize = 16;
const RUN: Duration = Duration::from_secs(8);

struct Load {
    ok: usize,
    errors: usize,
    secs: f64,
    lat_ms: Vec<f64>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One request on a new connection: the status line says 200.
fn get(vip: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: web\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200") { Ok(()) } else { Err("not 200".into()) }
}

fn load(client_ns: &str) -> Load {
    let vip = SocketAddr::new(web_vip(), 80);
    let t0 = Instant::now();
    let per: Vec<(usize, usize, Vec<f64>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..WORKERS)
            .map(|_| {
                sc.spawn(move || {
                    in_ns(client_ns, || {
                        let (mut ok, mut err, mut lat) = (0, 0, Vec::new());
                        // Bounded by RUN; each request by its 2 s timeouts.
                        while t0.elapsed() < RUN {
                            let t = Instant::now();
                            match get(vip) {
                                Ok(()) => {
                                    ok += 1;
                                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                                }
                                Err(_) => err += 1,
                            }
                        }
                        (ok, err, lat)
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker")).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut l = Load { ok: 0, errors: 0, secs, lat_ms: Vec::new() };
    for (ok, err, lat) in per {
        l.ok += ok;
        l.errors += err;
        l.lat_ms.extend(lat);
    }
    l
}

/// user + system CPU of a process, ns.
fn proc_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name
    // (field 3, the state, is rest[0]; utime is field 14, stime field 15).
    let rest: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let field = |i: usize| rest.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (field(11) + field(12)) * 1_000_000_000 / hz
}

fn pids_of(pattern: &str) -> Vec<u32> {
    let out = std::process::Command::new("pgrep").args(["-f", pattern]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Run time of every loaded `lb_xdp` (kernel BPF stats), ns.
fn xdp_run_ns() -> u64 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("lb_xdp"))
        .map(|p| p.run_time().as_nanos() as u64)
        .sum()
}

fn row(name: &str, l: &mut Load, cpu_ns: u64) -> (f64, f64) {
    let rps = l.ok as f64 / l.secs;
    let cpu_per_10k_ms = cpu_ns as f64 / 1e6 / (l.ok.max(1) as f64 / 10_000.0);
    println!(
        "lab {name:<8} requests={:>6} rps={rps:>8.0} p50_ms={:>6.2} p99_ms={:>6.2} errors={:>3} lb_cpu_ms_per_10k={cpu_per_10k_ms:>8.2}",
        l.ok,
        pct(&mut l.lat_ms, 0.5),
        pct(&mut l.lat_ms, 0.99),
        l.errors
    );
    (rps, cpu_per_10k_ms)
}

fn main() {
    lb_tests::require_root();
    let _stats = BpfStats::enable();
    let dir = std::env::temp_dir().join(format!("lbbl-{}", std::process::id()));
    let lab = Lab::up("lbbl-", &dir, &|s| eprintln!("lab: {s}"));
    let client = lab.t.client.ns.clone();

    // 1. The lbd pair (XDP, ipip to the web servers, direct return).
    let lbd_pids: Vec<u32> = lab.nodes.iter().flat_map(|n| pids_of(&n.config().display().to_string())).collect();
    let cpu0: u64 = lbd_pids.iter().map(|p| proc_cpu_ns(*p)).sum::<u64>() + xdp_run_ns();
    let mut a = load(&client);
    let cpu1: u64 = lbd_pids.iter().map(|p| proc_cpu_ns(*p)).sum::<u64>() + xdp_run_ns();

    // 2. HAProxy in TCP mode on the first LB node: lbd stopped (VIPs released), its
    // datapath detached, the web VIP on that node, the client's ARP entry renewed.
    for n in 0..2 {
        lab.stop(&format!("lbd-n{}", n + 1), libc::SIGTERM);
        let _ = lb_userspace::daemon::detach_offline(&lab.nodes[n].instance);
    }
    let lb = &lab.t.lbs[0];
    let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["-n", &lb.ns, "addr", "replace", &format!("{}/32", web_vip()), "dev", &lb.ifname]);
    ip(&["-n", &client, "neigh", "flush", "all"]);
    let cfg = dir.join("haproxy.cfg");
    let servers: String = WEB.iter().enumerate().map(|(k, i)| format!("  server web{} {}:80\n", k + 1, lab.addr(*i))).collect();
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend web\n  bind {}:80\n  default_backend web\nbackend web\n  balance roundrobin\n{servers}",
            web_vip()
        ),
    )
    .unwrap();
    let mut c = ns_command(&lb.ns, "haproxy");
    let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
    c.arg("-db").arg("-f").arg(&cfg).stdout(std::process::Stdio::null()).stderr(log);
    let mut haproxy = ChildGuard { child: c.spawn().expect("starting haproxy") };
    let vip = SocketAddr::new(web_vip(), 80);
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        in_ns(&client, || get(vip).is_ok())
    });
    assert!(up, "haproxy answers on the web VIP: {}", std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default());
    // Every process running this config (however haproxy forks or threads).
    let hp = pids_of(&cfg.display().to_string());
    assert!(!hp.is_empty(), "haproxy process found");
    let h0: u64 = hp.iter().map(|p| proc_cpu_ns(*p)).sum();
    let mut b = load(&client);
    let h1: u64 = hp.iter().map(|p| proc_cpu_ns(*p)).sum();
    haproxy.kill();

    println!("lab bench: {WORKERS} clients, a new connection per request, {} s each, GET /index.html through the web VIP", RUN.as_secs());
    let (rps_a, cpu_a) = row("lbd", &mut a, cpu1.saturating_sub(cpu0));
    let (rps_b, cpu_b) = row("haproxy", &mut b, h1.saturating_sub(h0));
    println!(
        "lab ratio rps_lbd_over_haproxy={:.2} cpu_per_request_lbd_over_haproxy={:.3} (target: >= 1.00 and <= 0.20)",
        rps_a / rps_b.max(1e-9),
        cpu_a / cpu_b.max(1e-9)
    );
    drop(lab);
}

/// BPF run-time statistics on for the run, back to what they were afterwards (also on
/// a panic): they cost a little on every program run.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Self {
        let before = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into()).trim().to_string();
        std::fs::write(BPF_STATS, "1").expect("enabling BPF run-time statistics");
        BpfStats(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}
