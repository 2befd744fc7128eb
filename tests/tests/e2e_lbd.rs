//! lbd and lbctl end to end: real TCP from a client namespace through the VIP to
//! backend namespaces (topology in tests/src/topo.rs), lbd run as a process, every
//! change made with the lbctl binary. Root; one test at a time (shared names).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use lb_common::maglev::{self, MaglevBackend};
use lb_common::{FlowKey, PROTO_TCP, addr_bytes};
use lb_tests::lbd::{Lbd, bin, wait_for};
use lb_tests::netns::{Conn, ServerMode, TopoSpec, Topology, vip_v4};
use serde_json::Value;

const PREFIX: &str = "lbdt-";
const INSTANCE: &str = "lbdt";

/// A topology with `backends` echo servers on port 80 holding `vips`, and an lbd
/// (not started) for its balancer.
fn setup(backends: usize, vips: &[IpAddr]) -> (Topology, Lbd) {
    let t = Topology::new(PREFIX, TopoSpec { lbs: 1, backends });
    for v in vips {
        t.add_vip_to_backends(*v);
    }
    t.start_servers(80, ServerMode::Echo);
    let l = Lbd::new(&t, 0, INSTANCE);
    (t, l)
}

fn web() -> IpAddr {
    vip_v4(1)
}

fn app() -> IpAddr {
    vip_v4(2)
}

fn addr(t: &Topology, i: usize) -> String {
    t.backends[i].v4.to_string()
}

fn backends_toml(t: &Topology, which: &[(usize, u32)]) -> String {
    which.iter().map(|(i, w)| format!("[[service.backend]]\naddress = \"{}\"\nweight = {w}\n", addr(t, *i))).collect()
}

fn connect(t: &Topology, vip: IpAddr) -> std::io::Result<Conn> {
    t.connect(vip, 80)
}

/// The backend name lbd's live table gives a client port, computed from
/// `lbctl -o json service show` (ids, weights, in-table flags) as the control plane does.
struct Predictor {
    table: Vec<u32>,
    names: BTreeMap<u32, String>,
    vip: IpAddr,
    client: IpAddr,
}

impl Predictor {
    fn new(t: &Topology, l: &Lbd, service: &str, vip: IpAddr) -> Self {
        let v = l.lbctl_json(&["service", "show", service]);
        let m = v["table_size"].as_u64().unwrap() as u32;
        let mut bs = Vec::new();
        let mut names = BTreeMap::new();
        for b in v["backends"].as_array().unwrap() {
            let Some(id) = b["id"].as_u64() else { continue };
            let addr: IpAddr = b["address"].as_str().unwrap().parse().unwrap();
            let w = if b["in_table"].as_bool().unwrap() { b["weight"].as_u64().unwrap() as u32 } else { 0 };
            bs.push(MaglevBackend { addr: addr_bytes(addr), weight: w, id: id as u32 });
            names.insert(id as u32, t.backend_by_addr(addr).unwrap().name.clone());
        }
        bs.sort_by_key(|b| b.addr);
        Self { table: maglev::build(&bs, m).unwrap(), names, vip, client: t.client.addr(vip.is_ipv6()) }
    }

    fn predict(&self, port: u16) -> String {
        let k = FlowKey::new(self.client, port, self.vip, 80, PROTO_TCP);
        let id = maglev::pick(&self.table, &k);
        self.names.get(&id).cloned().unwrap_or_else(|| format!("none({id})"))
    }
}

/// Opens `n` connections; checks each against the prediction; returns counts by backend.
fn spread(t: &Topology, l: &Lbd, service: &str, vip: IpAddr, n: usize) -> BTreeMap<String, usize> {
    let p = Predictor::new(t, l, service, vip);
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let c = connect(t, vip).unwrap_or_else(|e| panic!("connection {i} to {vip}: {e}\n{}", l.log()));
        assert_eq!(c.backend, p.predict(c.local.port()), "connection {i} (client port {}) on the predicted backend", c.local.port());
        *counts.entry(c.backend).or_insert(0) += 1;
    }
    counts
}

fn wait_next_hops(l: &Lbd, service: &str) {
    let ok = wait_for(Duration::from_secs(10), || {
        l.lbctl_json(&["backend", "list", service]).as_array().unwrap().iter().all(|b| b["next_hop"].as_str().unwrap() != "unresolved")
    });
    assert!(ok.is_some(), "next hops of {service} resolved from the neighbour table: {}", l.lbctl(&["backend", "list", service]).1);
}

fn backend_field(l: &Lbd, service: &str, addr: &str, field: &str) -> Value {
    let list = l.lbctl_json(&["backend", "list", service]);
    list.as_array().unwrap().iter().find(|b| b["address"] == addr).map(|b| b[field].clone()).unwrap_or(Value::Null)
}


#[test]
fn both_modes_spread_per_weights_and_counters_match() {
    let (t, mut l) = setup(3, &[web(), app()]);
    // web: ipip, weights 1:1:2, MACs from the neighbour table. app: dsr-l2, one MAC
    // configured, two from the neighbour table, with TCP health checks.
    l.write_config(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\nmode = \"ipip\"\ntable_size = 1009\n{}\n\
         [[service]]\nname = \"app\"\nvip = \"{}:80/tcp\"\nmode = \"dsr-l2\"\ntable_size = 1009\n\
         health = {{ kind = \"tcp\", interval_ms = 200, timeout_ms = 100, rise = 2, fall = 2 }}\n\
         [[service.backend]]\naddress = \"{}\"\nmac = \"{}\"\n{}",
        web(),
        backends_toml(&t, &[(0, 1), (1, 1), (2, 2)]),
        app(),
        addr(&t, 0),
        lb_tests::netns::mac_str(&t.backends[0].mac),
        backends_toml(&t, &[(1, 1), (2, 1)])
    ));
    l.start();
    wait_next_hops(&l, "web");
    wait_next_hops(&l, "app");

    let w = spread(&t, &l, "web", web(), 160);
    let share = w["be2"] as f64 / 160.0;
    assert!((0.35..=0.65).contains(&share), "weight 2 of 4 gets about half: {w:?}");
    let a = spread(&t, &l, "app", app(), 60);
    assert_eq!(a.len(), 3, "dsr-l2 reaches every backend: {a:?}");

    // Per-backend new flows = the connections it got (one flow per connection).
    let stats = l.lbctl_json(&["stats"]);
    for (svc, counts) in [("web", &w), ("app", &a)] {
        let s = stats["services"].as_array().unwrap().iter().find(|s| s["name"] == svc).unwrap();
        assert_eq!(s["new_flows"].as_u64().unwrap() as usize, counts.values().sum::<usize>(), "{svc} new flows");
        for b in s["backends"].as_array().unwrap() {
            let name = t.backend_by_addr(b["address"].as_str().unwrap().parse().unwrap()).unwrap().name.clone();
            let n = counts.get(&name).copied().unwrap_or(0);
            assert_eq!(b["new_flows"].as_u64().unwrap() as usize, n, "{svc}/{name} new flows");
            assert!(b["packets"].as_u64().unwrap() >= 3 * n as u64, "{svc}/{name} packets");
        }
    }
    let (ok, table, _) = l.lbctl(&["stats"]);
    assert!(ok && table.contains("NEW FLOWS") && table.contains("web"), "{table}");
}

#[test]
fn add_drain_remove_under_load_keeps_the_right_connections() {
    let (t, mut l) = setup(4, &[web()]);
    l.write_config(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n{}",
        web(),
        backends_toml(&t, &[(0, 1), (1, 1), (2, 1)])
    ));
    l.start();
    wait_next_hops(&l, "web");

    let mut streams: Vec<Conn> = (0..30).map(|i| connect(&t, web()).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect();
    let on = |s: &[Conn], b: &str| s.iter().filter(|c| c.backend == b).count();
    assert!(on(&streams, "be0") > 0 && on(&streams, "be1") > 0 && on(&streams, "be2") > 0, "streams on every backend");

    for args in [["backend", "add", "web", &addr(&t, 3)], ["backend", "drain", "web", &addr(&t, 0)], ["backend", "remove", "web", &addr(&t, 1)]] {
        let (ok, _, err) = l.lbctl(&args);
        assert!(ok, "lbctl {args:?}: {err}");
    }
    wait_next_hops(&l, "web");

    // Streams on the kept (be2) and drained (be0) backends keep working.
    for (i, c) in streams.iter_mut().enumerate().filter(|(_, c)| c.backend != "be1") {
        c.echo(&format!("after-change-{i}")).unwrap_or_else(|e| panic!("stream {i} on {} broke: {e}", c.backend));
    }
    // Streams of the removed backend: its entry is invalidated, the flow re-steers to a
    // backend without that connection, which answers with a RST: a prompt reset.
    for (i, c) in streams.iter_mut().enumerate().filter(|(_, c)| c.backend == "be1") {
        let t0 = Instant::now();
        assert!(c.echo(&format!("removed-{i}")).is_err(), "stream {i} on the removed backend is reset");
        assert!(t0.elapsed() < Duration::from_secs(2), "reset promptly, not a timeout");
    }
    // New connections: the new set, exactly as predicted; never be0 (drained) or be1.
    let counts = spread(&t, &l, "web", web(), 60);
    assert!(!counts.contains_key("be0") && !counts.contains_key("be1"), "{counts:?}");
    assert!(counts.contains_key("be3"), "the added backend takes its share: {counts:?}");
}

#[test]
fn kill_9_and_restart_loses_no_stream_and_restores_cli_changes() {
    let (t, mut l) = setup(3, &[web()]);
    l.write_config(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n\
         health = {{ kind = \"tcp\", interval_ms = 200, timeout_ms = 100, rise = 2, fall = 2 }}\n{}",
        web(),
        backends_toml(&t, &[(0, 1), (1, 1)])
    ));
    l.start();
    wait_next_hops(&l, "web");
    // Runtime changes that must survive the crash.
    assert!(l.lbctl(&["backend", "add", "web", &addr(&t, 2), "--weight", "3"]).0);
    assert!(l.lbctl(&["backend", "set-weight", "web", &addr(&t, 0), "2"]).0);
    wait_next_hops(&l, "web");
    let before = l.lbctl_json(&["service", "show", "web"]);

    let mut streams: Vec<Conn> = (0..12).map(|i| connect(&t, web()).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect();
    let pid = l.lbctl_json(&["status"])["pid"].as_u64().unwrap();
    l.kill();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "lbd is gone");

    // While lbd is dead and after it is back, every stream answers each line well
    // within a retransmission timeout (nothing is lost, so nothing is retransmitted).
    let mut worst = Duration::ZERO;
    let mut round = |streams: &mut [Conn], tag: &str| {
        for (i, c) in streams.iter_mut().enumerate() {
            let t0 = Instant::now();
            c.echo(&format!("{tag}-{i}")).unwrap_or_else(|e| panic!("stream {i} ({tag}) on {}: {e}", c.backend));
            worst = worst.max(t0.elapsed());
        }
    };
    for r in 0..5 {
        round(&mut streams, &format!("down{r}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(connect(&t, web()).expect("new connections work while lbd is down"));
    l.start();
    for r in 0..5 {
        round(&mut streams, &format!("up{r}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(worst < Duration::from_millis(200), "worst echo {worst:?}: a stall would mean lost packets");

    let st = l.lbctl_json(&["status"]);
    assert_eq!(st["adopted"], true, "the new lbd adopted the pinned datapath: {st}");
    assert_ne!(st["pid"].as_u64().unwrap(), pid);
    assert!(st["interfaces"].as_array().unwrap().iter().all(|i| i["attached_now"] == false), "{st}");
    let after = l.lbctl_json(&["service", "show", "web"]);
    assert_eq!(after["backends"].as_array().unwrap().len(), 3);
    for (b, a) in before["backends"].as_array().unwrap().iter().zip(after["backends"].as_array().unwrap()) {
        assert_eq!((&b["address"], &b["weight"], &b["id"]), (&a["address"], &a["weight"], &a["id"]), "CLI changes and ids restored");
    }
    // The datapath still steers as the restored state says.
    spread(&t, &l, "web", web(), 30);
}

#[test]
fn health_checks_take_a_dead_server_out_and_back() {
    let (t, mut l) = setup(3, &[web()]);
    let (interval, rise, fall) = (200u64, 2u64, 2u64);
    l.write_config(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n\
         health = {{ kind = \"tcp\", interval_ms = {interval}, timeout_ms = 100, rise = {rise}, fall = {fall} }}\n{}",
        web(),
        backends_toml(&t, &[(0, 1), (1, 1), (2, 1)])
    ));
    l.start();
    wait_next_hops(&l, "web");
    let be1 = addr(&t, 1);
    assert!(wait_for(Duration::from_secs(3), || backend_field(&l, "web", &be1, "health") == "up").is_some());

    t.stop_server(1, 80);
    let slack = Duration::from_millis(interval + 400);
    let down = wait_for(Duration::from_millis(fall * interval) + slack * 2, || backend_field(&l, "web", &be1, "health") == "down")
        .expect("be1 marked down");
    assert!(down <= Duration::from_millis(fall * interval) + slack, "down after {down:?}; fall x interval = {} ms", fall * interval);
    assert_eq!(backend_field(&l, "web", &be1, "in_table"), false);
    let counts = spread(&t, &l, "web", web(), 40);
    assert!(!counts.contains_key("be1"), "no new flow to a down backend: {counts:?}");

    t.start_server(1, 80, ServerMode::Echo);
    let up = wait_for(Duration::from_millis(rise * interval) + slack * 2, || backend_field(&l, "web", &be1, "health") == "up")
        .expect("be1 back up");
    assert!(up <= Duration::from_millis(rise * interval) + slack, "up after {up:?}; rise x interval = {} ms", rise * interval);
    let counts = spread(&t, &l, "web", web(), 40);
    assert!(counts.contains_key("be1"), "be1 gets flows again: {counts:?}");
    let st = l.lbctl_json(&["status"]);
    assert_eq!((st["backends_up"].as_u64(), st["backends_down"].as_u64()), (Some(3), Some(0)));
}

/// Sends raw bytes to lbd's socket and returns its one-line answer.
fn raw(l: &Lbd, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(l.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad answer {out:?}: {e}"))
}

#[test]
fn invalid_input_gets_a_clear_error_and_changes_nothing() {
    let (t, mut l) = setup(3, &[web()]);
    let (b0, b1) = (addr(&t, 0), addr(&t, 1));
    let services = format!("[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n{}", web(), backends_toml(&t, &[(0, 1)]));
    l.write_config(&services);
    l.start();
    let snapshot = || (l.lbctl_json(&["service", "list"]), l.lbctl_json(&["status"])["config_version"].clone());
    let before = snapshot();

    let vip = format!("{}:80/tcp", web());
    let cases: &[(&[&str], &str)] = &[
        (&["backend", "add", "web", "10.200.0.300"], "invalid value"),
        (&["backend", "add", "web", &b0], "duplicate backend"),
        (&["backend", "add", "nope", &b1], "unknown service"),
        (&["backend", "add", "web", &b1, "--weight", "70000"], "out of range"),
        (&["backend", "add", "web", &b1, "--mac", "zz:00"], "bad MAC"),
        (&["backend", "set-weight", "web", &b0, "65536"], "out of range"),
        (&["backend", "remove", "web", "10.200.0.99"], "unknown backend"),
        (&["backend", "drain", "web", "10.200.0.99"], "unknown backend"),
        (&["service", "add", "web2", "--vip", &vip], "already used"),
        (&["service", "add", "web", "--vip", "10.201.0.9:80/tcp"], "already exists"),
        (&["service", "add", "x", "--vip", "10.201.0.9:80/tcp", "--table-size", "100"], "prime"),
        (&["service", "add", "bad name", "--vip", "10.201.0.9:80/tcp"], "bad service name"),
        (&["service", "add", "x", "--vip", "10.201.0.9:80"], "expected ADDR:PORT"),
        (&["service", "add", "x", "--vip", "10.201.0.9:0/tcp", "--health", "tcp"], "health.port is required"),
        (&["service", "remove", "nope"], "unknown service"),
        (&["service", "show", "nope"], "unknown service"),
    ];
    for (args, want) in cases {
        let (ok, out, err) = l.lbctl(args);
        assert!(!ok, "lbctl {args:?} must fail, printed {out}");
        assert!(err.contains(want), "lbctl {args:?}: {err:?} should say {want:?}");
        assert_eq!(err.trim().lines().filter(|x| !x.is_empty() && !x.starts_with("For more")).count(), 1, "one line: {err:?}");
    }
    // The protocol itself: malformed, unknown command, oversized.
    assert!(raw(&l, b"{not json\n")["error"].as_str().unwrap().contains("bad request"));
    assert!(raw(&l, b"{\"cmd\":\"format-disk\"}\n")["error"].as_str().unwrap().contains("unknown variant"));
    let mut big = b"{\"cmd\":\"status\",\"pad\":\"".to_vec();
    big.resize(70 * 1024, b'a');
    assert!(raw(&l, &big)["error"].as_str().unwrap().contains("larger than"));
    // A reload with a broken file is refused whole.
    l.write_config(&services.replace("table_size = 1009", "table_size = 1000"));
    let (ok, _, err) = l.lbctl(&["reload"]);
    assert!(!ok && err.contains("prime"), "{err}");
    assert_eq!(snapshot(), before, "nothing changed");

    // A valid reload applies; SIGHUP does the same.
    l.write_config(&format!("{services}{}", backends_toml(&t, &[(1, 1)])));
    let (ok, out, err) = l.lbctl(&["reload"]);
    assert!(ok && out.contains("web"), "{out} {err}");
    let n = || l.lbctl_json(&["service", "show", "web"])["backends"].as_array().unwrap().len();
    assert_eq!(n(), 2);
    l.write_config(&services);
    let pid = l.lbctl_json(&["status"])["pid"].as_u64().unwrap() as i32;
    // SAFETY: signalling the lbd this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(wait_for(Duration::from_secs(3), || n() == 1).is_some(), "SIGHUP applied the file");

    // lbctl detach removes everything and stops lbd.
    let (ok, _, err) = l.lbctl(&["detach", "--yes"]);
    assert!(ok, "{err}");
    assert!(!lb_userspace::pins::pin_dir(INSTANCE).exists(), "pins removed");
    assert!(wait_for(Duration::from_secs(3), || !l.socket().exists()).is_some(), "lbd stopped");
}

#[test]
fn check_validates_without_touching_the_system() {
    let dir = std::env::temp_dir().join(format!("lbd-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "instance = \"chk\"\ninterfaces = [\"eth9\"]\nencap_source_v4 = \"10.0.0.5\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100:80/tcp\"\n[[service.backend]]\naddress = \"10.0.1.11\"\nweight = 3\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("lbd")).args(["--check", "--config"]).arg(&good).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("service web vip 10.0.0.100:80/tcp") && text.contains("backend 10.0.1.11 weight 3"), "{text}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "instance = \"chk\"\ninterfaces = []\nmtu = 10\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100:80/tcp\"\ntable_size = 4\n").unwrap();
    let out = std::process::Command::new(bin("lbd")).args(["--check", "--config"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // Each at its own key's line (table_size, not the [[service]] line).
    for want in ["line 2: interfaces", "line 3: mtu", "line 7: service \"web\": table size 4 must be a prime", "3 error(s)"] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    assert!(!std::path::Path::new("/sys/fs/bpf/chk").exists() && !std::path::Path::new("/run/lb/chk.sock").exists(), "no side effects");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn datapath_config_errors_are_counted_and_logged_through_lbd() {
    let (t, mut l) = setup(3, &[]);
    // An on-link backend address nobody answers for: no MAC, no neighbour entry, no
    // gateway_mac, so the datapath cannot forward and says why.
    let vip = vip_v4(3);
    l.write_config(&format!("[[service]]\nname = \"dns\"\nvip = \"{vip}:53/udp\"\ntable_size = 251\n[[service.backend]]\naddress = \"10.200.0.99\"\n"));
    l.start();
    let sent = lb_tests::netns::in_ns(&t.client.ns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        (0..5).filter(|_| s.send_to(b"query", (vip, 53)).is_ok()).count()
    });
    assert_eq!(sent, 5);
    let dropped = || {
        let st = l.lbctl_json(&["stats"]);
        st["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "drop_no_nexthop").unwrap()["packets"].as_u64().unwrap()
    };
    assert!(wait_for(Duration::from_secs(3), || dropped() >= 5).is_some(), "counted: {}", dropped());
    // The datapath's own record (aya-log) in lbd's log: first, second, fourth drop.
    assert!(
        wait_for(Duration::from_secs(3), || l.log().matches("drop_no_nexthop: a backend has no next-hop MAC").count() >= 2).is_some(),
        "datapath log in lbd's log:\n{}",
        l.log()
    );
    assert!(l.log().matches("drop_no_nexthop").count() <= 6, "logarithmic, not per packet:\n{}", l.log());
    let b = &l.lbctl_json(&["backend", "list", "dns"])[0];
    assert_eq!(b["next_hop"], "unresolved");
}

#[test]
fn ipv6_vip_with_next_hops_from_neighbour_discovery() {
    let vip = lb_tests::netns::vip_v6(1);
    let (t, mut l) = setup(3, &[vip]);
    // IP6IP6 to every backend, MACs from the neighbour table (NDP in the LB's namespace).
    let backends: String = (0..3).map(|i| format!("[[service.backend]]\naddress = \"{}\"\nweight = {}\n", t.backends[i].v6, i + 1)).collect();
    l.write_config(&format!("[[service]]\nname = \"web6\"\nvip = \"[{vip}]:80/tcp\"\ntable_size = 1009\n{backends}"));
    l.start();
    wait_next_hops(&l, "web6");
    let counts = spread(&t, &l, "web6", vip, 60);
    assert_eq!(counts.len(), 3, "every backend reached over IPv6: {counts:?}");
    let stats = l.lbctl_json(&["stats"]);
    assert_eq!(stats["services"][0]["new_flows"].as_u64(), Some(60));
}
