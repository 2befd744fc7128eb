//! lbd and lbctl end to end: real TCP from a client namespace through the VIP to
//! backend namespaces (topology in tests/src/topo.rs), lbd run as a process, every
//! change made with the lbctl binary. Root; one test at a time (shared names).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use lb_common::maglev::{self, MaglevBackend};
use lb_common::{FlowKey, PROTO_TCP, addr_bytes, flow_hash};
use lb_tests::topo::{CLIENT_ADDR, Conn, Topo, connect, wait_for};
use serde_json::Value;

const WEB: &str = "10.66.100.1";
const APP: &str = "10.66.100.2";

fn vip(a: &str) -> SocketAddr {
    SocketAddr::new(a.parse().unwrap(), 80)
}

/// The backend name lbd's live table gives a client port, computed from
/// `lbctl -o json service show` (ids, weights, in-table flags) as the control plane does.
struct Predictor {
    table: Vec<u32>,
    names: BTreeMap<u32, String>,
    vip: IpAddr,
}

impl Predictor {
    fn new(t: &Topo, service: &str, vip: &str) -> Self {
        let v = t.lbctl_json(&["service", "show", service]);
        let m = v["table_size"].as_u64().unwrap() as u32;
        let mut bs = Vec::new();
        let mut names = BTreeMap::new();
        for b in v["backends"].as_array().unwrap() {
            let Some(id) = b["id"].as_u64() else { continue };
            let addr: IpAddr = b["address"].as_str().unwrap().parse().unwrap();
            let w = if b["in_table"].as_bool().unwrap() { b["weight"].as_u64().unwrap() as u32 } else { 0 };
            bs.push(MaglevBackend { addr: addr_bytes(addr), weight: w, id: id as u32 });
            names.insert(id as u32, t.name_of(addr).unwrap());
        }
        bs.sort_by_key(|b| b.addr);
        Self { table: maglev::build(&bs, m).unwrap(), names, vip: vip.parse().unwrap() }
    }

    fn predict(&self, port: u16) -> String {
        let k = FlowKey::new(CLIENT_ADDR.parse().unwrap(), port, self.vip, 80, PROTO_TCP);
        let id = self.table[(flow_hash(&k) % self.table.len() as u32) as usize];
        self.names.get(&id).cloned().unwrap_or_else(|| format!("none({id})"))
    }
}

/// Opens `n` connections; checks each against the prediction; returns counts by backend.
fn spread(t: &Topo, service: &str, vip_addr: &str, n: usize) -> BTreeMap<String, usize> {
    let p = Predictor::new(t, service, vip_addr);
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let c = connect(vip(vip_addr)).unwrap_or_else(|e| panic!("connection {i} to {vip_addr}: {e}\n{}", t.lbd_log()));
        assert_eq!(c.backend, p.predict(c.local_port), "connection {i} (client port {}) on the predicted backend", c.local_port);
        *counts.entry(c.backend).or_insert(0) += 1;
    }
    counts
}

fn wait_next_hops(t: &Topo, service: &str) {
    let ok = wait_for(Duration::from_secs(10), || {
        t.lbctl_json(&["backend", "list", service]).as_array().unwrap().iter().all(|b| b["next_hop"].as_str().unwrap() != "unresolved")
    });
    assert!(ok.is_some(), "next hops of {service} resolved from the neighbour table: {}", t.lbctl(&["backend", "list", service]).1);
}

fn backend_field(t: &Topo, service: &str, addr: &str, field: &str) -> Value {
    let list = t.lbctl_json(&["backend", "list", service]);
    list.as_array().unwrap().iter().find(|b| b["address"] == addr).map(|b| b[field].clone()).unwrap_or(Value::Null)
}

#[test]
fn both_modes_spread_per_weights_and_counters_match() {
    let mut t = Topo::new(3, &[WEB, APP]);
    let (b1, b2, b3) = (t.addr("b1"), t.addr("b2"), t.addr("b3"));
    let cfg = format!(
        "{}\n[[service]]\nname = \"web\"\nvip = \"{WEB}:80/tcp\"\nmode = \"ipip\"\ntable_size = 1009\n\
         [[service.backend]]\naddress = \"{b1}\"\n[[service.backend]]\naddress = \"{b2}\"\n[[service.backend]]\naddress = \"{b3}\"\nweight = 2\n\
         \n[[service]]\nname = \"app\"\nvip = \"{APP}:80/tcp\"\nmode = \"dsr-l2\"\ntable_size = 1009\n\
         health = {{ kind = \"tcp\", interval_ms = 200, timeout_ms = 100, rise = 2, fall = 2 }}\n\
         [[service.backend]]\naddress = \"{b1}\"\nmac = \"02:66:00:00:01:01\"\n[[service.backend]]\naddress = \"{b2}\"\n[[service.backend]]\naddress = \"{b3}\"\n",
        t.config_header()
    );
    std::fs::write(t.config_path(), cfg).unwrap();
    t.start_lbd();
    // Backends without `mac` get theirs from the LB namespace's neighbour table.
    wait_next_hops(&t, "web");
    wait_next_hops(&t, "app");

    let web = spread(&t, "web", WEB, 160);
    assert_eq!(web.values().sum::<usize>(), 160);
    let share3 = web["b3"] as f64 / 160.0;
    assert!((0.35..=0.65).contains(&share3), "weight 2 of 4 gets about half: {web:?}");
    let app = spread(&t, "app", APP, 60);
    assert_eq!(app.len(), 3, "dsr-l2 reaches every backend: {app:?}");

    // Per-backend new flows = connections it got (one flow per connection).
    let stats = t.lbctl_json(&["stats"]);
    for (svc, counts) in [("web", &web), ("app", &app)] {
        let s = stats["services"].as_array().unwrap().iter().find(|s| s["name"] == svc).unwrap();
        assert_eq!(s["new_flows"].as_u64().unwrap() as usize, counts.values().sum::<usize>(), "{svc} new flows");
        for b in s["backends"].as_array().unwrap() {
            let name = t.name_of(b["address"].as_str().unwrap().parse().unwrap()).unwrap();
            assert_eq!(b["new_flows"].as_u64().unwrap() as usize, counts.get(&name).copied().unwrap_or(0), "{svc}/{name} new flows");
            assert!(b["packets"].as_u64().unwrap() >= 3 * counts.get(&name).copied().unwrap_or(0) as u64, "{svc}/{name} packets");
        }
    }
    let (ok, table, _) = t.lbctl(&["stats"]);
    assert!(ok && table.contains("NEW FLOWS") && table.contains("web"), "{table}");
}

#[test]
fn add_drain_remove_under_load_keeps_the_right_connections() {
    let mut t = Topo::new(4, &[WEB]);
    let addrs: Vec<String> = (1..=4).map(|i| t.addr(&format!("b{i}")).to_string()).collect();
    let mut cfg = format!("{}\n[[service]]\nname = \"web\"\nvip = \"{WEB}:80/tcp\"\ntable_size = 1009\n", t.config_header());
    for a in &addrs[..3] {
        cfg += &format!("[[service.backend]]\naddress = \"{a}\"\n");
    }
    std::fs::write(t.config_path(), cfg).unwrap();
    t.start_lbd();
    wait_next_hops(&t, "web");

    let mut streams: Vec<Conn> = (0..30).map(|i| connect(vip(WEB)).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect();
    let on = |s: &[Conn], b: &str| s.iter().filter(|c| c.backend == b).count();
    assert!(on(&streams, "b1") > 0 && on(&streams, "b2") > 0 && on(&streams, "b3") > 0, "streams on every backend");

    for args in [["backend", "add", "web", &addrs[3]], ["backend", "drain", "web", &addrs[0]], ["backend", "remove", "web", &addrs[1]]] {
        let (ok, _, err) = t.lbctl(&args);
        assert!(ok, "lbctl {args:?}: {err}");
    }
    wait_next_hops(&t, "web");

    // Streams on the kept (b3) and drained (b1) backends keep working.
    for (i, c) in streams.iter_mut().enumerate().filter(|(_, c)| c.backend != "b2") {
        c.ping(&format!("after-change-{i}")).unwrap_or_else(|e| panic!("stream {i} on {} broke: {e}", c.backend));
    }
    // Streams of the removed backend: its entry is invalidated, the flow re-steers to a
    // backend that has no such connection, which answers with a RST: a prompt reset.
    for (i, c) in streams.iter_mut().enumerate().filter(|(_, c)| c.backend == "b2") {
        let t0 = Instant::now();
        let r = c.ping(&format!("removed-{i}"));
        assert!(r.is_err(), "stream {i} on the removed backend is reset");
        assert!(t0.elapsed() < Duration::from_secs(2), "reset promptly, not a timeout");
    }
    // New connections: the new set, exactly as predicted; never b1 (drained) or b2.
    let counts = spread(&t, "web", WEB, 60);
    assert!(!counts.contains_key("b1") && !counts.contains_key("b2"), "{counts:?}");
    assert!(counts.contains_key("b4"), "the added backend takes its share: {counts:?}");
}

#[test]
fn kill_9_and_restart_loses_no_stream_and_restores_cli_changes() {
    let mut t = Topo::new(3, &[WEB]);
    let a: Vec<String> = (1..=3).map(|i| t.addr(&format!("b{i}")).to_string()).collect();
    let cfg = format!(
        "{}\n[[service]]\nname = \"web\"\nvip = \"{WEB}:80/tcp\"\ntable_size = 1009\n\
         health = {{ kind = \"tcp\", interval_ms = 200, timeout_ms = 100, rise = 2, fall = 2 }}\n\
         [[service.backend]]\naddress = \"{}\"\n[[service.backend]]\naddress = \"{}\"\n",
        t.config_header(),
        a[0],
        a[1]
    );
    std::fs::write(t.config_path(), cfg).unwrap();
    t.start_lbd();
    wait_next_hops(&t, "web");
    // Runtime changes that must survive the crash.
    assert!(t.lbctl(&["backend", "add", "web", &a[2], "--weight", "3"]).0);
    assert!(t.lbctl(&["backend", "set-weight", "web", &a[0], "2"]).0);
    wait_next_hops(&t, "web");
    let before = t.lbctl_json(&["service", "show", "web"]);

    let mut streams: Vec<Conn> = (0..12).map(|i| connect(vip(WEB)).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect();
    let pid = t.lbctl_json(&["status"])["pid"].as_u64().unwrap();
    t.kill_lbd();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "lbd is gone");

    // While lbd is dead and after it is back, every stream answers each ping well
    // within a retransmit timeout (nothing is lost, so nothing is retransmitted).
    let mut worst = Duration::ZERO;
    let mut round = |streams: &mut [Conn], tag: &str| {
        for (i, c) in streams.iter_mut().enumerate() {
            let t0 = Instant::now();
            c.ping(&format!("{tag}-{i}")).unwrap_or_else(|e| panic!("stream {i} ({tag}) on {}: {e}", c.backend));
            worst = worst.max(t0.elapsed());
        }
    };
    for r in 0..5 {
        round(&mut streams, &format!("down{r}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = connect(vip(WEB)).expect("new connections work while lbd is down");
    drop(c);
    t.start_lbd();
    for r in 0..5 {
        round(&mut streams, &format!("up{r}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(worst < Duration::from_millis(200), "worst ping {worst:?}: a stall would mean lost packets");

    let st = t.lbctl_json(&["status"]);
    assert_eq!(st["adopted"], true, "the new lbd adopted the pinned datapath: {st}");
    assert_ne!(st["pid"].as_u64().unwrap(), pid);
    assert!(st["interfaces"].as_array().unwrap().iter().all(|i| i["attached_now"] == false), "{st}");
    let after = t.lbctl_json(&["service", "show", "web"]);
    for (b, a) in before["backends"].as_array().unwrap().iter().zip(after["backends"].as_array().unwrap()) {
        assert_eq!((&b["address"], &b["weight"], &b["id"]), (&a["address"], &a["weight"], &a["id"]), "CLI changes and ids restored");
    }
    assert_eq!(after["backends"].as_array().unwrap().len(), 3);
    // And the datapath still steers as the restored state says.
    spread(&t, "web", WEB, 30);
}

#[test]
fn health_checks_take_a_dead_server_out_and_back() {
    let mut t = Topo::new(3, &[WEB]);
    let a: Vec<String> = (1..=3).map(|i| t.addr(&format!("b{i}")).to_string()).collect();
    let (interval, rise, fall) = (200u64, 2u64, 2u64);
    let mut cfg = format!(
        "{}\n[[service]]\nname = \"web\"\nvip = \"{WEB}:80/tcp\"\ntable_size = 1009\n\
         health = {{ kind = \"tcp\", interval_ms = {interval}, timeout_ms = 100, rise = {rise}, fall = {fall} }}\n",
        t.config_header()
    );
    for x in &a {
        cfg += &format!("[[service.backend]]\naddress = \"{x}\"\n");
    }
    std::fs::write(t.config_path(), cfg).unwrap();
    t.start_lbd();
    wait_next_hops(&t, "web");
    assert!(wait_for(Duration::from_secs(3), || backend_field(&t, "web", &a[1], "health") == "up").is_some());

    t.servers["b2"].set_listening(false);
    let slack = Duration::from_millis(interval + 400);
    let down = wait_for(Duration::from_millis(fall * interval) + slack * 2, || backend_field(&t, "web", &a[1], "health") == "down")
        .expect("b2 marked down");
    assert!(down <= Duration::from_millis(fall * interval) + slack, "down after {down:?}; fall x interval = {} ms", fall * interval);
    assert_eq!(backend_field(&t, "web", &a[1], "in_table"), false);
    let counts = spread(&t, "web", WEB, 40);
    assert!(!counts.contains_key("b2"), "no new flow to a down backend: {counts:?}");

    t.servers["b2"].set_listening(true);
    let up = wait_for(Duration::from_millis(rise * interval) + slack * 2, || backend_field(&t, "web", &a[1], "health") == "up")
        .expect("b2 back up");
    assert!(up <= Duration::from_millis(rise * interval) + slack, "up after {up:?}; rise x interval = {} ms", rise * interval);
    let counts = spread(&t, "web", WEB, 40);
    assert!(counts.contains_key("b2"), "b2 gets flows again: {counts:?}");
    let st = t.lbctl_json(&["status"]);
    assert_eq!((st["backends_up"].as_u64(), st["backends_down"].as_u64()), (Some(3), Some(0)));
}

/// Sends raw bytes to lbd's socket and returns its one-line answer.
fn raw(t: &Topo, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(t.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad answer {out:?}: {e}"))
}

#[test]
fn invalid_input_gets_a_clear_error_and_changes_nothing() {
    let mut t = Topo::new(2, &[WEB]);
    let (b1, b2) = (t.addr("b1").to_string(), t.addr("b2").to_string());
    let cfg = format!(
        "{}\n[[service]]\nname = \"web\"\nvip = \"{WEB}:80/tcp\"\ntable_size = 1009\n[[service.backend]]\naddress = \"{b1}\"\n",
        t.config_header()
    );
    std::fs::write(t.config_path(), &cfg).unwrap();
    t.start_lbd();
    let snapshot = || (t.lbctl_json(&["service", "list"]), t.lbctl_json(&["status"])["config_version"].clone());
    let before = snapshot();

    let cases: &[(&[&str], &str)] = &[
        (&["backend", "add", "web", "10.66.0.300"], "invalid value"),
        (&["backend", "add", "web", &b1], "duplicate backend"),
        (&["backend", "add", "nope", &b2], "unknown service"),
        (&["backend", "add", "web", &b2, "--weight", "70000"], "out of range"),
        (&["backend", "add", "web", &b2, "--mac", "zz:00"], "bad MAC"),
        (&["backend", "set-weight", "web", &b1, "65536"], "out of range"),
        (&["backend", "remove", "web", "10.66.0.99"], "unknown backend"),
        (&["backend", "drain", "web", "10.66.0.99"], "unknown backend"),
        (&["service", "add", "web2", "--vip", &format!("{WEB}:80/tcp")], "already used"),
        (&["service", "add", "web", "--vip", "10.66.100.9:80/tcp"], "already exists"),
        (&["service", "add", "x", "--vip", "10.66.100.9:80/tcp", "--table-size", "100"], "prime"),
        (&["service", "add", "bad name", "--vip", "10.66.100.9:80/tcp"], "bad service name"),
        (&["service", "add", "x", "--vip", "10.66.100.9:80"], "expected ADDR:PORT"),
        (&["service", "add", "x", "--vip", "10.66.100.9:0/tcp", "--health", "tcp"], "health.port is required"),
        (&["service", "remove", "nope"], "unknown service"),
        (&["service", "show", "nope"], "unknown service"),
    ];
    for (args, want) in cases {
        let (ok, out, err) = t.lbctl(args);
        assert!(!ok, "lbctl {args:?} must fail, printed {out}");
        assert!(err.contains(want), "lbctl {args:?}: {err:?} should say {want:?}");
        assert_eq!(err.trim().lines().filter(|l| !l.is_empty() && !l.starts_with("For more")).count(), 1, "one line: {err:?}");
    }
    // The protocol itself: malformed, unknown command, oversized.
    assert!(raw(&t, b"{not json\n")["error"].as_str().unwrap().contains("bad request"));
    assert!(raw(&t, b"{\"cmd\":\"format-disk\"}\n")["error"].as_str().unwrap().contains("unknown variant"));
    let mut big = b"{\"cmd\":\"status\",\"pad\":\"".to_vec();
    big.resize(70 * 1024, b'a');
    assert!(raw(&t, &big)["error"].as_str().unwrap().contains("larger than"));
    // A reload with a broken file is refused whole.
    std::fs::write(t.config_path(), cfg.replace("table_size = 1009", "table_size = 1000")).unwrap();
    let (ok, _, err) = t.lbctl(&["reload"]);
    assert!(!ok && err.contains("prime"), "{err}");
    assert_eq!(snapshot(), before, "nothing changed");

    // A valid reload applies (SIGHUP does the same).
    std::fs::write(t.config_path(), format!("{cfg}[[service.backend]]\naddress = \"{b2}\"\n")).unwrap();
    let (ok, out, err) = t.lbctl(&["reload"]);
    assert!(ok && out.contains("web"), "{out} {err}");
    assert_eq!(t.lbctl_json(&["service", "show", "web"])["backends"].as_array().unwrap().len(), 2);
    // SIGHUP reloads the same way.
    std::fs::write(t.config_path(), &cfg).unwrap();
    let pid = t.lbctl_json(&["status"])["pid"].as_u64().unwrap() as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let n = || t.lbctl_json(&["service", "show", "web"])["backends"].as_array().unwrap().len();
    assert!(wait_for(Duration::from_secs(3), || n() == 1).is_some(), "SIGHUP applied the file");
    // lbctl detach removes everything and stops lbd.
    let (ok, _, err) = t.lbctl(&["detach"]);
    assert!(ok, "{err}");
    assert!(!lb_userspace::pins::pin_dir(lb_tests::topo::INSTANCE).exists(), "pins removed");
    assert!(wait_for(Duration::from_secs(3), || !t.socket().exists()).is_some(), "lbd stopped");
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
    let out = std::process::Command::new(lb_tests::topo::bin("lbd")).args(["--check", "--config"]).arg(&good).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("service web vip 10.0.0.100:80/tcp") && text.contains("backend 10.0.1.11 weight 3"), "{text}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "instance = \"chk\"\ninterfaces = []\nmtu = 10\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100:80/tcp\"\ntable_size = 4\n").unwrap();
    let out = std::process::Command::new(lb_tests::topo::bin("lbd")).args(["--check", "--config"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in ["interfaces", "mtu", "line 4", "prime", "3 error(s)"] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    assert!(!std::path::Path::new("/sys/fs/bpf/chk").exists() && !std::path::Path::new("/run/lb/chk.sock").exists(), "no side effects");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Manual debugging aid: `cargo test --release -p lb-tests --test e2e_lbd -- --ignored hold_topology`.
#[test]
#[ignore]
fn hold_topology() {
    let mut t = Topo::new(2, &[WEB]);
    let cfg = format!(
        "{}\n[[service]]\nname = \"web\"\nvip = \"{WEB}:80/tcp\"\ntable_size = 1009\n[[service.backend]]\naddress = \"{}\"\n",
        t.config_header(),
        t.addr("b1")
    );
    std::fs::write(t.config_path(), cfg).unwrap();
    t.start_lbd();
    std::thread::sleep(Duration::from_secs(90));
}
