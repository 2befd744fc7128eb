//! `lb-bench-control`: control-plane figures, run by `cargo xtask bench control` (root).
//!
//! - Maglev table build time for 10, 100, 1000 backends at M=65537, beside a baseline
//!   measured in the same run: writing a 65537-entry table with no permutation work
//!   (the floor any table build pays).
//! - `backend add` to datapath-visible latency, p50/p99 over 200 updates, against a
//!   real lbd on a veth in a network namespace this bench creates (and removes):
//!   the clock stops when the pinned VIPS/TABLES maps the XDP program reads hold the
//!   new backend at a table position predicted beforehand. Beside it: a no-op request
//!   (`status`) over the same socket, the floor of any update.
//! - The same through the `lbctl` binary (process start included), 50 updates.
//! - Sustained updates/second (weight changes back to back).
//! - Health checks of 3,996 targets at a 1 s interval (TCP, answered in the namespace
//!   through an AnyIP route on `lo`): lbd's CPU as % of one core, beside the same
//!   lbd's idle CPU measured just before in the same run.
//! - Flow sync and heartbeats under a flood (`lb_tests::flood`: two lbd nodes, 64
//!   services, 4,032 backends): the active's new flows/s (SYN + ACK each) at offered
//!   rates of 25k, 50k and 100k/s for 5 s, beside the flows/s the backup applied and
//!   what it counted as dropped; the active's heartbeat send interval p99 beside the
//!   configured `heartbeat_ms` (target p99 < 1.5 x).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::maglev::{self, MaglevBackend};
use lb_common::{VipKey, VipValue, addr_bytes, map_names, table_index};
use lb_userspace::api::{Request, ServiceView};
use lb_userspace::daemon::call;

const M: u32 = 65537;
const NS: &str = "lbb-ctl";
const INSTANCE: &str = "lbbench";
const VIP: &str = "10.200.0.100:80/tcp";

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn addr(i: u32) -> IpAddr {
    IpAddr::from([10, 201, (i >> 8) as u8, (i & 0xff) as u8])
}

fn maglev_bench() -> anyhow::Result<()> {
    for n in [10u32, 100, 1000] {
        let backends: Vec<MaglevBackend> = (0..n).map(|i| MaglevBackend { addr: addr_bytes(addr(i)), weight: 1, id: i }).collect();
        let mut build = Vec::new();
        let mut floor = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            let table = maglev::build(&backends, M)?;
            build.push(t.elapsed().as_secs_f64() * 1e3);
            ensure!(table.len() == M as usize);
            let t = Instant::now();
            let plain: Vec<u32> = (0..M).map(|i| i % n).collect();
            floor.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(plain);
        }
        let (b, f) = (median(&mut build), median(&mut floor));
        println!("control maglev_build backends={n} M={M} ms={b:.3} baseline_fill_ms={f:.3} ratio={:.1} target_ms=5", b / f.max(1e-6));
    }
    Ok(())
}

/// Namespace, lbd process, temp dir: removed on drop, also when the bench fails.
struct Lab {
    dir: PathBuf,
    lbd: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let sock = self.dir.join("lbd.sock");
        let _ = call(&sock, &Request::Detach {});
        if let Some(mut c) = self.lbd.take() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(3) && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = lb_userspace::daemon::detach_offline(INSTANCE);
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(cmd: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.parent().context("exe dir")?.join(name);
    ensure!(p.exists(), "{} not built (cargo build --release -p lb-userspace)", p.display());
    Ok(p)
}

fn start_lab() -> anyhow::Result<Lab> {
    let dir = std::env::temp_dir().join(format!("lb-bench-control-{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", NS]).stderr(Stdio::null()).status();
    let _ = lb_userspace::daemon::detach_offline(INSTANCE);
    std::fs::create_dir_all(&dir)?;
    let mut lab = Lab { dir: dir.clone(), lbd: None };
    sh(&["ip", "netns", "add", NS])?;
    sh(&["ip", "-n", NS, "link", "add", "lbbc0", "type", "veth", "peer", "name", "lbbc1"])?;
    sh(&["ip", "-n", NS, "link", "set", "lbbc0", "up"])?;
    sh(&["ip", "-n", NS, "link", "set", "lbbc1", "up"])?;
    let mut cfg = format!(
        "instance = \"{INSTANCE}\"\ninterfaces = [\"lbbc0\"]\nxdp_mode = \"native\"\nencap_source_v4 = \"10.200.0.5\"\n\
         gateway_mac = \"02:00:00:00:00:01\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n",
        dir.join("lbd.sock").display(),
        dir.join("state").display()
    );
    for i in 0..100 {
        cfg += &format!("[[service.backend]]\naddress = \"{}\"\n", addr(i));
    }
    let cfg_path = dir.join("lb.toml");
    std::fs::write(&cfg_path, cfg)?;
    let log = std::fs::File::create(dir.join("lbd.log"))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NS}"))
        .arg(bin("lbd")?)
        .arg("--config")
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting lbd")?;
    lab.lbd = Some(child);
    let sock = dir.join("lbd.sock");
    let t = Instant::now();
    while !call(&sock, &Request::Status {}).is_ok_and(|r| r.ok) {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("lbd did not come up: {}", std::fs::read_to_string(dir.join("lbd.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(lab)
}

/// The pinned maps the XDP program reads.
struct Visible {
    vips: BpfHashMap<MapData, VipKey, VipValue>,
    tables: Array<MapData, lb_common::TableEntry>,
    key: VipKey,
}

impl Visible {
    fn open() -> anyhow::Result<Self> {
        let dir = lb_userspace::pins::pin_dir(INSTANCE);
        let vips = BpfHashMap::try_from(Map::HashMap(MapData::from_pin(dir.join(map_names::VIPS))?))?;
        let tables = Array::try_from(Map::Array(MapData::from_pin(dir.join(map_names::TABLES))?))?;
        let vip: lb_userspace::Vip = VIP.parse().map_err(anyhow::Error::msg)?;
        Ok(Self { vips, tables, key: vip.key() })
    }

    /// The backend id at `pos` of the live table.
    fn at(&self, pos: u32) -> anyhow::Result<u32> {
        let v = self.vips.get(&self.key, 0)?;
        Ok(self.tables.get(&table_index(v.service_id, v.active_slot, pos), 0)?.primary)
    }
}

/// A table position that the backend `new` owns once added to `set` (by address).
fn predicted_position(set: &[IpAddr], new: IpAddr) -> anyhow::Result<u32> {
    let mut all: Vec<IpAddr> = set.to_vec();
    all.push(new);
    all.sort();
    let bs: Vec<MaglevBackend> = all.iter().enumerate().map(|(i, a)| MaglevBackend { addr: addr_bytes(*a), weight: 1, id: i as u32 }).collect();
    let id = all.iter().position(|a| *a == new).context("new backend")? as u32;
    let t = maglev::build(&bs, M)?;
    t.iter().position(|x| *x == id).map(|p| p as u32).context("new backend owns no slot")
}

fn update_bench() -> anyhow::Result<()> {
    let lab = start_lab()?;
    let sock = lab.dir.join("lbd.sock");
    let vis = Visible::open()?;
    let mut set: Vec<IpAddr> = (0..100).map(addr).collect();

    // Floor: a request that changes nothing, over the same socket.
    let mut noop = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        ensure!(call(&sock, &Request::Status {})?.ok);
        noop.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let mut lat = Vec::new();
    for i in 0..200u32 {
        let new = IpAddr::from([10, 202, (i >> 8) as u8, (i & 0xff) as u8]);
        let pos = predicted_position(&set, new)?;
        let t = Instant::now();
        let r = call(&sock, &Request::BackendAdd { service: "web".into(), address: new, weight: 1, mac: None })?;
        ensure!(r.ok, "backend add: {:?}", r.error);
        let view: ServiceView = serde_json::from_value(r.data.context("no data")?)?;
        let id = view.backends.iter().find(|b| b.address == new).and_then(|b| b.id).context("no id for the new backend")?;
        // Poll the datapath's own maps, bounded.
        loop {
            if vis.at(pos)? == id {
                break;
            }
            ensure!(t.elapsed() < Duration::from_secs(2), "backend {new} not visible at position {pos} after 2 s");
            std::thread::sleep(Duration::from_micros(50));
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        set.push(new);
    }
    println!(
        "control update_to_visible updates=200 backends=100..300 p50_ms={:.2} p99_ms={:.2} max_ms={:.2} baseline_noop_request_p50_ms={:.2} p99_ms={:.2} target_p99_ms=20",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0),
        pct(&mut noop, 0.5),
        pct(&mut noop, 0.99)
    );

    // Through the lbctl binary: what an operator's script sees.
    let lbctl = bin("lbctl")?;
    let mut cli = Vec::new();
    for i in 0..50u32 {
        let new = IpAddr::from([10, 203, 0, i as u8]);
        let t = Instant::now();
        let out = Command::new(&lbctl)
            .arg("--socket")
            .arg(&sock)
            .args(["-o", "json", "backend", "add", "web", &new.to_string()])
            .output()?;
        ensure!(out.status.success(), "lbctl: {}", String::from_utf8_lossy(&out.stderr));
        cli.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("control lbctl_backend_add updates=50 p50_ms={:.2} p99_ms={:.2} (process start included)", pct(&mut cli, 0.5), pct(&mut cli, 0.99));

    // Sustained: weight changes back to back, each a table rebuild and a flip.
    let n = 300;
    let t = Instant::now();
    for i in 0..n {
        let r = call(&sock, &Request::BackendSetWeight { service: "web".into(), address: addr(i % 100), weight: 1 + (i % 7) })?;
        ensure!(r.ok, "set-weight: {:?}", r.error);
    }
    let secs = t.elapsed().as_secs_f64();
    println!("control sustained updates={n} seconds={secs:.2} updates_per_s={:.0} backends=350 M={M}", n as f64 / secs);
    drop(lab);
    Ok(())
}

/// lbd's (user, system) CPU time so far, seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the ")".
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((f[11].parse::<f64>()? / hz, f[12].parse::<f64>()? / hz))
}

fn health_bench() -> anyhow::Result<()> {
    const TARGETS: u32 = 3996;
    let lab = start_lab()?;
    let sock = lab.dir.join("lbd.sock");
    let pid = lab.lbd.as_ref().context("lbd")?.id();
    // Every 10.220.0.0/20 address is local in the namespace; one listener answers all.
    sh(&["ip", "-n", NS, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", NS, "route", "add", "local", "10.220.0.0/20", "dev", "lo"])?;
    let listener = lb_tests::netns::in_ns(NS, || std::net::TcpListener::bind("0.0.0.0:80"))?;
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    // (user, system) as % of one core over `secs`.
    let window = |secs: u64| -> anyhow::Result<(f64, f64)> {
        let (u0, s0) = cpu_secs(pid)?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let (u1, s1) = cpu_secs(pid)?;
        let e = t.elapsed().as_secs_f64();
        Ok(((u1 - u0) / e * 100.0, (s1 - s0) / e * 100.0))
    };
    let (idle_u, idle_s) = window(5)?;
    let cfg_path = lab.dir.join("lb.toml");
    let mut cfg = std::fs::read_to_string(&cfg_path)?;
    cfg += "\n[[service]]\nname = \"hc\"\nvip = \"10.200.0.101:80/tcp\"\nhealth = { kind = \"tcp\", interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3 }\n";
    for i in 0..TARGETS {
        cfg += &format!("[[service.backend]]\naddress = \"10.220.{}.{}\"\n", i / 250, 1 + i % 250);
    }
    std::fs::write(&cfg_path, cfg)?;
    let r = call(&sock, &Request::Reload {})?;
    ensure!(r.ok, "reload: {:?}", r.error);
    let t = Instant::now();
    loop {
        let st = call(&sock, &Request::Status {})?.data.context("status")?;
        if st["backends_pending"] == 0 && st["backends_up"].as_u64() == Some(100 + TARGETS as u64) {
            break;
        }
        ensure!(t.elapsed() < Duration::from_secs(30), "health checks did not pass within 30 s: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (busy_u, busy_s) = window(10)?;
    // The floor: the same connects (every target once a second) from one plain thread in
    // the same namespace, blocking connect + close, measured the same way. Both ends of
    // each handshake run on this machine, so the kernel's part is in both figures.
    let (floor_u, floor_s) = lb_tests::netns::in_ns(NS, || -> anyhow::Result<(f64, f64)> {
        let thread_cpu = || {
            // SAFETY: getrusage fills the struct we own.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
            let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            (s(ru.ru_utime), s(ru.ru_stime))
        };
        let (u0, s0) = thread_cpu();
        let t = Instant::now();
        for round in 0..5u32 {
            for i in 0..TARGETS {
                let due = Duration::from_secs(round as u64) + Duration::from_secs(1) * i / TARGETS;
                if let Some(wait) = due.checked_sub(t.elapsed()) {
                    std::thread::sleep(wait);
                }
                let addr = std::net::SocketAddr::from(([10, 220, (i / 250) as u8, (1 + i % 250) as u8], 80));
                drop(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
            }
        }
        let (u1, s1) = thread_cpu();
        let e = t.elapsed().as_secs_f64();
        Ok(((u1 - u0) / e * 100.0, (s1 - s0) / e * 100.0))
    })?;
    // System time includes the loopback handshake the kernel runs in lbd's context
    // (both ends are on this machine here; a remote backend's half is not ours).
    println!(
        "control health_checks targets={TARGETS} interval_ms=1000 kind=tcp lbd_cpu_pct_of_one_core={:.2} user={busy_u:.2} system={busy_s:.2} \
         baseline_idle_lbd_cpu_pct={:.2} baseline_bare_connect_loop_pct={:.2} (user={floor_u:.2} system={floor_s:.2}) \
         lbd_minus_bare_pct={:.2} target_pct=5",
        busy_u + busy_s,
        idle_u + idle_s,
        floor_u + floor_s,
        busy_u + busy_s - floor_u - floor_s
    );
    drop(lab);
    Ok(())
}

fn flow_sync_bench() {
    use lb_tests::flood::{self, HEARTBEAT_MS, n};
    const SECS: u64 = 5;
    for rate in [25_000, 50_000, 100_000] {
        let r = flood::run("lbb-fl", rate, SECS);
        let (a, b) = (&r.after[0], &r.after[1]);
        let window = r.secs + r.catch_up.as_secs_f64();
        let dropped = n(a, "flows_dropped_queue_full") + n(a, "flows_lost_in_datapath") + n(b, "flows_dropped_apply_queue");
        println!(
            "control flow_sync offered_flows_per_s={rate} sent_flows_per_s={:.0} active_new_flows_per_s={:.0} backup_applied_per_s={:.0} \
             applied={} of new_flows={} dropped_counted={dropped} unknown={} catch_up_ms={} target_applied_per_s=50000",
            r.sent as f64 / r.secs,
            r.new_flows as f64 / r.secs,
            n(b, "flows_applied") as f64 / window,
            n(b, "flows_applied"),
            r.new_flows,
            n(b, "flows_unknown_vip") + n(b, "flows_unknown_backend"),
            r.catch_up.as_millis(),
        );
        println!(
            "control heartbeat_under_flood offered_flows_per_s={rate} interval_p99_ms={:.1} max_ms={:.1} baseline_heartbeat_ms={HEARTBEAT_MS} \
             ratio={:.2} target_ratio=1.5 role_changes={} status_slowest_ms={:.1}",
            a["heartbeat_interval_p99_ms"].as_f64().unwrap_or(f64::NAN),
            a["heartbeat_interval_max_ms"].as_f64().unwrap_or(f64::NAN),
            a["heartbeat_interval_p99_ms"].as_f64().unwrap_or(f64::NAN) / HEARTBEAT_MS as f64,
            (0..2).map(|i| n(&r.after[i], "role_changes") - n(&r.before[i], "role_changes")).sum::<u64>(),
            r.slowest.as_secs_f64() * 1000.0,
        );
    }
}

fn main() -> anyhow::Result<()> {
    lb_tests::require_root();
    // `cargo xtask bench control [maglev] [update] [health] [flow-sync]`: the parts to
    // run (all when none is named).
    let only: Vec<String> = std::env::args().skip(1).collect();
    let parts = ["maglev", "update", "health", "flow-sync"];
    if let Some(bad) = only.iter().find(|a| !parts.contains(&a.as_str())) {
        bail!("unknown part {bad:?} (parts: {})", parts.join(", "));
    }
    let run = |p: &str| only.is_empty() || only.iter().any(|a| a == p);
    if run("maglev") {
        maglev_bench()?;
    }
    if run("update") {
        update_bench()?;
    }
    if run("health") {
        health_bench()?;
    }
    if run("flow-sync") {
        flow_sync_bench();
    }
    Ok(())
}
