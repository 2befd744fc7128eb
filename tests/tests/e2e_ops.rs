//! Operators' kit end to end: lbd scraped by a real Prometheus while traffic runs, the
//! systemd notify protocol against a NOTIFY_SOCKET this test binds, and the unit files
//! through `systemd-analyze verify`. Root; one test at a time (shared names).

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::lbd::{Lbd, bin, wait_for};
use lb_tests::netns::{ChildGuard, ServerMode, TopoSpec, Topology, ns_command, vip_v4};
use serde_json::Value;

const PREFIX: &str = "op-";
const INSTANCE: &str = "opt";
const METRICS: &str = "127.0.0.1:9469";
const PROM: &str = "127.0.0.1:9479";

fn setup(backends: usize) -> (Topology, Lbd) {
    let t = Topology::new(PREFIX, TopoSpec { lbs: 1, backends });
    t.add_vip_to_backends(vip_v4(1));
    t.start_servers(80, ServerMode::Echo);
    let l = Lbd::new(&t, 0, INSTANCE);
    (t, l)
}

fn service(t: &Topology) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n",
        vip_v4(1)
    );
    for b in &t.backends {
        s.push_str(&format!("[[service.backend]]\naddress = \"{}\"\n", b.v4));
    }
    s
}

fn wait_next_hops(l: &Lbd) {
    let ok = wait_for(Duration::from_secs(10), || {
        l.lbctl_json(&["backend", "list", "web"])
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["in_table"].as_bool() == Some(true))
    });
    assert!(
        ok.is_some(),
        "backends in the table: {}",
        l.lbctl(&["backend", "list", "web"]).1
    );
}

/// GET `url` from inside the namespace `ns` (curl; bounded).
fn get_in(ns: &str, url: &str) -> Option<String> {
    let o = ns_command(ns, "curl")
        .args(["-sf", "--max-time", "3", url])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Prometheus's instant query at unix time `at`: (labels, value) of each series.
fn query(ns: &str, expr: &str, at: f64) -> Vec<(BTreeMap<String, String>, f64)> {
    let url = format!(
        "http://{PROM}/api/v1/query?query={}&time={at:.3}",
        urlencode(expr)
    );
    let body = get_in(ns, &url).unwrap_or_else(|| panic!("query {expr} failed"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{body}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (
                labels,
                r["value"][1].as_str().unwrap().parse::<f64>().unwrap(),
            )
        })
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Per backend address: `expr` at `at`.
fn by_backend(ns: &str, expr: &str, at: f64) -> BTreeMap<String, f64> {
    query(ns, expr, at)
        .into_iter()
        .map(|(l, v)| (l["backend"].clone(), v))
        .collect()
}

#[test]
fn prometheus_scrapes_lbd_and_new_flows_match_the_connections_made() {
    assert!(
        Path::new("/usr/bin/prometheus").exists(),
        "prometheus not installed: cargo xtask setup"
    );
    let (t, mut l) = setup(3);
    l.write_config(&format!(
        "{}\n[metrics]\nlisten = \"{METRICS}\"\n",
        service(&t)
    ));
    l.start();
    wait_next_hops(&l);
    let ns = l.ns.clone();

    // lbd's own endpoint first: conventional names, build info, process metrics.
    let text = get_in(&ns, &format!("http://{METRICS}/metrics")).expect("lbd serves /metrics");
    for want in [
        "# TYPE lb_backend_new_flows counter",
        "lb_build_info{version=",
        "process_cpu_seconds_total",
        "lb_backend_up{service=\"web\"",
        "lb_datapath_reason_packets_total{",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }

    // Prometheus in the balancer's namespace, on loopback, 1 s scrapes, storage in the test's dir.
    let dir = l.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: lbd\n    static_configs:\n      - targets: ['{METRICS}']\n")).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut c = ns_command(&ns, "/usr/bin/prometheus");
    c.arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROM}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let _prom = ChildGuard {
        child: c.spawn().expect("starting prometheus"),
    };
    let plog = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();

    // The target is up and every backend's counter has been scraped (0: no traffic yet).
    let up = wait_for(Duration::from_secs(30), || {
        get_in(&ns, &format!("http://{PROM}/-/ready")).is_some()
            && query(&ns, "up{job=\"lbd\"}", now())
                .first()
                .is_some_and(|(_, v)| *v == 1.0)
    });
    assert!(up.is_some(), "target up within 30 s:\n{}", plog());
    let addrs: Vec<String> = t.backends.iter().map(|b| b.v4.to_string()).collect();
    let zero = wait_for(Duration::from_secs(10), || {
        let m = by_backend(&ns, "lb_backend_new_flows_total", now());
        addrs.iter().all(|a| m.get(a) == Some(&0.0))
    });
    assert!(zero.is_some(), "zero counters scraped for every backend");
    // A scrape of the zeros is at least 1 s older than `before`.
    std::thread::sleep(Duration::from_millis(1100));
    let before = now();

    // Traffic, spread over several scrapes: 4 rounds of 30 connections.
    let mut made: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..4 {
        for i in 0..30 {
            let c = t
                .connect(vip_v4(1), 80)
                .unwrap_or_else(|e| panic!("connection {round}/{i}: {e}\n{}", l.log()));
            let a = t
                .backends
                .iter()
                .find(|b| b.name == c.backend)
                .unwrap()
                .v4
                .to_string();
            *made.entry(a).or_insert(0) += 1;
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    assert_eq!(made.values().sum::<u64>(), 120);
    assert!(made.len() == 3, "every backend got connections: {made:?}");

    // Wait until Prometheus holds the final counts (lbd's counters are summed per scrape).
    let want: BTreeMap<String, f64> = addrs
        .iter()
        .map(|a| (a.clone(), made.get(a).copied().unwrap_or(0) as f64))
        .collect();
    let settled = wait_for(Duration::from_secs(10), || {
        by_backend(&ns, "lb_backend_new_flows_total", now()) == want
    });
    assert!(
        settled.is_some(),
        "scraped counters reach {want:?}: {:?}",
        by_backend(&ns, "lb_backend_new_flows_total", now())
    );
    std::thread::sleep(Duration::from_millis(1100));
    let after = now();
    let span = (after - before).ceil() as u64;

    // Match, strictly: the counter's increase between a scrape before the first
    // connection and a scrape after the last is exactly the connections each backend got.
    let exact = by_backend(
        &ns,
        &format!("lb_backend_new_flows_total - lb_backend_new_flows_total offset {span}s"),
        after,
    );
    assert_eq!(exact, want, "increase per backend = connections made");
    // increase()/rate() over a window holding all the traffic: Prometheus extrapolates
    // the flat ends of the window, so the result is n * W / S, S (sampled span) being
    // at least W - 2 scrape intervals: n <= increase <= n * W / (W - 2).
    let w = span + 2;
    let inc = by_backend(
        &ns,
        &format!("increase(lb_backend_new_flows_total[{w}s])"),
        after,
    );
    let rate = by_backend(
        &ns,
        &format!("rate(lb_backend_new_flows_total[{w}s])"),
        after,
    );
    for (a, n) in &want {
        let (i, r) = (inc[a], rate[a]);
        assert!(
            *n <= i + 1e-9 && i <= n * w as f64 / (w as f64 - 2.0) + 1e-9,
            "{a}: increase {i} for {n} connections over {w}s"
        );
        assert!(
            (r * w as f64 - i).abs() < 1e-6,
            "{a}: rate {r} = increase / window"
        );
    }
    // Service totals agree with the backends.
    let svc = query(&ns, "lb_service_new_flows_total", after);
    assert_eq!(svc.len(), 1);
    assert_eq!(svc[0].1, 120.0);
    assert_eq!(
        query(&ns, "up{job=\"lbd\"}", now())[0].1,
        1.0,
        "target still up"
    );
    eprintln!("scraped per backend: {exact:?}; increase: {inc:?}");
    eprintln!("{}", get_in(&ns, &format!("http://{METRICS}/metrics")).unwrap_or_default());
}

/// The datagrams on `s` until `until` holds for one of them (bounded); WATCHDOG=1 pings
/// are counted apart.
fn recv_until(s: &UnixDatagram, pings: &mut usize, until: impl Fn(&str) -> bool) -> Vec<String> {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(15) {
        let Ok(n) = s.recv(&mut buf) else { continue };
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if m == "WATCHDOG=1\n" {
            *pings += 1;
            continue;
        }
        let done = until(&m);
        got.push(m);
        if done {
            return got;
        }
    }
    panic!("no matching notify datagram in 15 s; got {got:?}");
}

#[test]
fn lbd_speaks_the_notify_protocol_to_a_bound_notify_socket() {
    let (t, mut l) = setup(3);
    l.write_config(&service(&t));
    let path = l.dir.join("notify.sock");
    let s = UnixDatagram::bind(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Inherited by lbd only (tests run one at a time; removed right after the start).
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "1000000");
    }
    l.start();
    unsafe {
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
    }
    let mut pings = 0;
    let m = recv_until(&s, &mut pings, |m| m.starts_with("READY=1"));
    assert_eq!(
        m.last().unwrap(),
        "READY=1\nSTATUS=standalone; 1 services, 3/3 backends up, 0 drained, 3 pending\n",
        "{m:?}"
    );
    wait_next_hops(&l);
    let st = recv_until(&s, &mut pings, |m| m.contains("0 pending"));
    assert_eq!(
        st.last().unwrap(),
        "STATUS=standalone; 1 services, 3/3 backends up, 0 drained, 0 pending\n"
    );
    let pid = l.lbctl_json(&["status"])["pid"].as_i64().unwrap() as i32;
    // SIGHUP and lbctl reload: RELOADING=1 then READY=1, in that order.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    for how in ["SIGHUP", "lbctl reload"] {
        if how == "lbctl reload" {
            let (ok, _, err) = l.lbctl(&["reload"]);
            assert!(ok, "{err}");
        }
        let r = recv_until(&s, &mut pings, |m| m.starts_with("READY=1"));
        assert_eq!(r.len(), 2, "{how}: {r:?}");
        assert!(
            r[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{how}: {r:?}"
        );
        assert!(
            r[1].starts_with("READY=1\nSTATUS=standalone;"),
            "{how}: {r:?}"
        );
    }
    // WATCHDOG_USEC=1s: a ping every 0.5 s while the owner answers.
    let t0 = Instant::now();
    let p0 = pings;
    let mut buf = [0u8; 256];
    while t0.elapsed() < Duration::from_secs(2) {
        if let Ok(n) = s.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1\n");
            pings += 1;
        }
    }
    assert!(
        (3..=5).contains(&(pings - p0)),
        "{} pings in 2 s at 0.5 s",
        pings - p0
    );
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let r = recv_until(&s, &mut pings, |m| m == "STOPPING=1\n");
    assert_eq!(r, vec!["STOPPING=1\n".to_string()]);
    // It stops (the socket goes; the process is this test's child, reaped by `kill`).
    assert!(
        wait_for(Duration::from_secs(10), || !l.socket().exists()).is_some(),
        "lbd stopped:\n{}",
        l.log()
    );
    l.kill();
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    // PID 1 here is not systemd: verify runs offline in a root made here, holding the
    // units, the binaries they start and systemd's own units (targets they refer to).
    let root = std::env::temp_dir().join(format!("op-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["usr/sbin", "bin", "etc/systemd/system", "usr/lib/systemd"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(bin("lbd"), root.join("usr/sbin/lbd")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(root.join("usr/lib/systemd/"))
            .status()
            .unwrap()
            .success()
    );
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    for u in ["lbd@.service", "lb-decap@.service"] {
        std::fs::copy(dist.join(u), root.join("etc/systemd/system").join(u)).unwrap();
    }
    let verify = |units: &[&str]| {
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .arg(format!("--root={}", root.display()))
            .args(units)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, err) = verify(&["lbd@lb0.service", "lb-decap@eth0.service"]);
    assert!(ok && err.trim().is_empty(), "systemd-analyze verify: {err}");
    // The check has teeth: a unit whose binary is missing fails.
    let bad = std::fs::read_to_string(dist.join("lbd@.service"))
        .unwrap()
        .replace("ExecStart=/usr/sbin/lbd", "ExecStart=/usr/sbin/lbd-missing");
    std::fs::write(root.join("etc/systemd/system/lbx@.service"), bad).unwrap();
    let (ok, err) = verify(&["lbx@lb0.service"]);
    assert!(!ok && err.contains("lbd-missing"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_notify_script_runs_on_role_changes_and_its_failure_is_not_fatal() {
    use lb_tests::pair::{pair, wait_roles, web};
    use std::os::unix::fs::PermissionsExt as _;
    let mut p = pair("opp", &[0, 1]);
    // Node 1 records what it is given; node 2's script fails on every run.
    let log = p.n[0].dir.join("notify.log");
    let scripts = [
        format!(
            "#!/bin/sh\necho \"$1|$2|$3|$LB_ROLE|$LB_PREVIOUS_ROLE|$LB_REASON|$LB_VIPS|$LB_INSTANCE|$LB_NODE_ID\" >> {}\n",
            log.display()
        ),
        "#!/bin/sh\necho 'cannot reach the router' >&2\nexit 3\n".to_string(),
    ];
    for (l, body) in p.n.iter().zip(&scripts) {
        let s = l.dir.join("notify.sh");
        std::fs::write(&s, body).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cfg = std::fs::read_to_string(l.config_path()).unwrap();
        cfg.push_str(&format!(
            "notify = \"{}\"\nnotify_timeout_ms = 2000\n",
            s.display()
        ));
        std::fs::write(l.config_path(), cfg).unwrap();
    }
    p.n[0].start();
    p.n[1].start();
    wait_roles(&p, ["active", "backup"], Duration::from_secs(10));
    let vip = web().to_string();
    let first =
        format!("active|alone_at_startup|{vip}|active|init|alone_at_startup|{vip}|oppn1|1\n");
    let got = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).unwrap_or_default() == first
    });
    assert!(
        got.is_some(),
        "node 1's script ran once with role, reason, VIPs: {:?}",
        std::fs::read_to_string(&log)
    );
    // Node 1 dies: node 2 takes over, its script fails, logged, and lbd goes on.
    p.n[0].kill();
    wait_for(Duration::from_secs(10), || {
        lb_tests::pair::role(&p.n[1]) == "active"
    })
    .expect("node 2 takes over");
    let warned = wait_for(Duration::from_secs(5), || {
        let l = p.n[1].log();
        l.contains("notify script")
            && l.contains("exit status: 3")
            && l.contains("cannot reach the router")
    });
    assert!(warned.is_some(), "the failure is logged:\n{}", p.n[1].log());
    assert_eq!(
        lb_tests::pair::role(&p.n[1]),
        "active",
        "still running and active after the failed script"
    );
    let c = p.t.connect(web(), 80).expect("traffic through node 2");
    assert!(c.backend.starts_with("be"), "{}", c.backend);
}
