//! End-to-end through the real datapath: network namespaces on one bridge (see
//! `lb_tests::netns`), the balancer loaded in-process and attached in native mode to the
//! LB node's veth, backends running `lb_decap` and answering the client directly. Real
//! TCP connections; every connection's backend is checked against the userspace Maglev
//! prediction. Root; `--test-threads=1` (XDP attachments, pins).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lb_tests::netns::*;
use lb_tests::{service, settings};
use lb_userspace::{BackendSpec, Mode};

const PORT: u16 = 8080;
/// Every test ends well within this (each socket operation has its own timeout too).
const TEST_BUDGET: Duration = Duration::from_secs(120);

fn topo(prefix: &str, backends: usize) -> Topology {
    Topology::new(prefix, TopoSpec { lbs: 1, backends })
}

/// Loads the balancer on LB 0 with encap sources = the LB's addresses, MTU 1500.
fn balancer(t: &Topology) -> Balancer {
    let mut b = t.load_balancer(0);
    let lb = &t.lbs[0];
    b.control().set_settings(settings(&lb.v4.to_string(), &lb.v6.to_string(), None, 1500)).expect("settings");
    b
}

fn vip_str(vip: IpAddr, port: u16) -> String {
    format!("{}/tcp", SocketAddr::new(vip, port))
}

/// Backend id → backend name, for a service's current set.
fn names(t: &Topology, b: &Balancer, svc: &str) -> BTreeMap<u32, String> {
    let v = b.dp.control.service(svc).expect("service");
    v.backends.iter().map(|(s, id)| (*id, t.backend_by_addr(s.addr).expect("known backend").name.clone())).collect()
}

/// Opens `n` sequential short connections; asserts each answered by exactly its predicted
/// backend. Returns (per-backend-name connection count, distinct flows per name).
fn sequential(t: &Topology, b: &Balancer, svc: &str, vip: IpAddr, n: usize) -> (BTreeMap<String, usize>, BTreeMap<String, BTreeSet<SocketAddr>>) {
    let table = b.table(svc);
    let m = b.dp.control.service(svc).unwrap().spec.table_size;
    let names = names(t, b, svc);
    let vsa = SocketAddr::new(vip, PORT);
    let mut count = BTreeMap::<String, usize>::new();
    let mut flows = BTreeMap::<String, BTreeSet<SocketAddr>>::new();
    let start = Instant::now();
    for i in 0..n {
        assert!(start.elapsed() < TEST_BUDGET, "connection {i} of {n}: out of time");
        let c = t.connect(vip, PORT).unwrap_or_else(|e| panic!("connection {i} of {n} to {vsa}: {e}"));
        let want = &names[&table[flow_slot(c.local, vsa, m)]];
        assert_eq!(&c.backend, want, "connection {i} from {}: answered by {}, Maglev predicts {want}", c.local, c.backend);
        *count.entry(c.backend.clone()).or_default() += 1;
        flows.entry(c.backend.clone()).or_default().insert(c.local);
    }
    println!("{n} connections in {:?}: {count:?}", start.elapsed());
    (count, flows)
}

/// Checks the balancer's counters after `sequential`: every distinct flow was a new flow
/// of its predicted backend, and each connection sent ≥ 3 packets through the LB (SYN,
/// ACK, FIN).
fn check_counters(t: &Topology, b: &Balancer, svc: &str, n: usize, flows: &BTreeMap<String, BTreeSet<SocketAddr>>) {
    let v = b.dp.control.service(svc).unwrap();
    let s = b.dp.stats.service(v.id).expect("service stats");
    let distinct: usize = flows.values().map(|f| f.len()).sum();
    assert!(s.new_flows as usize == distinct, "service {svc}: {} new flows counted, {distinct} distinct client flows made", s.new_flows);
    assert!(s.packets as usize >= 3 * n, "service {svc}: {} packets counted for {n} connections (≥ 3 each)", s.packets);
    for (spec, id) in &v.backends {
        let name = &t.backend_by_addr(spec.addr).unwrap().name;
        let c = b.dp.stats.backend(*id).expect("backend stats");
        let want = flows.get(name).map_or(0, |f| f.len());
        assert_eq!(c.new_flows as usize, want, "backend {name}: new flows counted vs flows that reached it");
    }
    let reasons = b.dp.stats.reasons().expect("reasons");
    for (i, r) in reasons.iter().enumerate() {
        let name = lb_common::reason::NAMES[i];
        if name.starts_with("drop") {
            assert_eq!(r.packets, 0, "no drops expected, {name} = {}", r.packets);
        }
    }
}

fn check_weights(count: &BTreeMap<String, usize>, weights: &[(&str, u32)], n: usize) {
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    for (name, w) in weights {
        let share = count.get(*name).copied().unwrap_or(0) as f64 / n as f64;
        let want = *w as f64 / total as f64;
        // Loose: the exact check is the per-connection prediction; this only catches a
        // gross weighting error (n ≈ 200 gives a standard deviation of ~3.5 points).
        assert!((share - want).abs() < 0.15, "{name}: weight {w}/{total} expects ~{:.0}%, got {:.1}% ({count:?})", want * 100.0, share * 100.0);
    }
}

#[test]
fn ipip_v4_weighted_each_connection_reaches_its_predicted_backend() {
    let t = topo("lbe-a", 3);
    let vip = vip_v4(10);
    t.add_vip_to_backends(vip);
    t.start_servers(PORT, ServerMode::Echo);
    let mut b = balancer(&t);
    let ws = [("be0", 1), ("be1", 1), ("be2", 2)];
    let bes = ws.iter().enumerate().map(|(i, (_, w))| t.backend_spec(i, false, *w)).collect();
    b.control().add_service(service("web", &vip_str(vip, PORT), Mode::Ipip, 65537), bes).expect("add service");
    let n = 240;
    let (count, flows) = sequential(&t, &b, "web", vip, n);
    check_weights(&count, &ws, n);
    check_counters(&t, &b, "web", n, &flows);
    // Every backend decapsulated what it got (one outer header per client packet).
    for be in &t.backends {
        let st = lb_userspace::decap::stats(&be.ifname).expect("decap stats");
        let dec = st.iter().find(|(n, _)| *n == "decapsulated").map(|(_, c)| c.packets).unwrap_or(0);
        assert!(dec as usize >= 3 * flows[&be.name].len(), "{}: {dec} packets decapsulated for {} flows", be.name, flows[&be.name].len());
    }
}

#[test]
fn dsr_l2_v4_each_connection_reaches_its_predicted_backend() {
    let t = topo("lbe-b", 3);
    let vip = vip_v4(20);
    t.add_vip_to_backends(vip);
    t.start_servers(PORT, ServerMode::Echo);
    let mut b = balancer(&t);
    let ws = [("be0", 1), ("be1", 1), ("be2", 2)];
    let bes = ws.iter().enumerate().map(|(i, (_, w))| t.backend_spec(i, false, *w)).collect();
    b.control().add_service(service("dsr", &vip_str(vip, PORT), Mode::DsrL2, 65537), bes).expect("add service");
    let n = 120;
    let (count, flows) = sequential(&t, &b, "dsr", vip, n);
    check_weights(&count, &ws, n);
    check_counters(&t, &b, "dsr", n, &flows);
    // Nothing was encapsulated: the backends' decap programs only passed traffic.
    for be in &t.backends {
        let st = lb_userspace::decap::stats(&be.ifname).expect("decap stats");
        let dec = st.iter().find(|(n, _)| *n == "decapsulated").map(|(_, c)| c.packets).unwrap_or(0);
        assert_eq!(dec, 0, "{}: dsr-l2 frames are not encapsulated", be.name);
    }
}

#[test]
fn ipip_v6_vip_with_v6_and_v4_backends() {
    let t = topo("lbe-c", 3);
    let vip = vip_v6(30);
    t.add_vip_to_backends(vip);
    t.start_servers(PORT, ServerMode::Echo);
    let mut b = balancer(&t);
    // be0, be1 by IPv6 (IP6IP6), be2 by IPv4 (6in4).
    let bes = vec![t.backend_spec(0, true, 1), t.backend_spec(1, true, 1), t.backend_spec(2, false, 1)];
    b.control().add_service(service("web6", &vip_str(vip, PORT), Mode::Ipip, 65537), bes).expect("add service");
    let n = 60;
    let (count, flows) = sequential(&t, &b, "web6", vip, n);
    check_counters(&t, &b, "web6", n, &flows);
    for be in ["be0", "be1", "be2"] {
        assert!(count.get(be).copied().unwrap_or(0) > 0, "{be} got no connection of {n} ({count:?})");
    }
}

/// Long-lived streams across a backend-set change: add be3, drain be1, remove be2.
#[test]
fn backend_changes_under_long_lived_connections() {
    let t = topo("lbe-d", 4);
    let vip = vip_v4(40);
    let vsa = SocketAddr::new(vip, PORT);
    t.add_vip_to_backends(vip);
    t.start_servers(PORT, ServerMode::Echo);
    let mut b = balancer(&t);
    let bes: Vec<BackendSpec> = (0..3).map(|i| t.backend_spec(i, false, 1)).collect();
    b.control().add_service(service("live", &vip_str(vip, PORT), Mode::Ipip, 65537), bes).expect("add service");
    let m = 65537;
    let start = Instant::now();

    // 30 long-lived streams, 10 per backend: client ports chosen by the prediction (so
    // every case below is covered every run), each answered by its predicted backend.
    let old_table = b.table("live");
    let old_names = names(&t, &b, "live");
    let client = IpAddr::V4(t.client.v4);
    let mut planned = BTreeMap::<u32, Vec<u16>>::new();
    for p in 20000u16..30000 {
        let v = planned.entry(old_table[flow_slot(SocketAddr::new(client, p), vsa, m)]).or_default();
        if v.len() < 10 {
            v.push(p);
        }
        if planned.len() == 3 && planned.values().all(|v| v.len() == 10) {
            break;
        }
    }
    let mut streams = Vec::new();
    for (id, ports) in &planned {
        for p in ports {
            let mut c = t.connect_from(*p, vip, PORT).unwrap_or_else(|e| panic!("stream from port {p}: {e}"));
            assert_eq!(c.backend, old_names[id], "stream from {}: answered by {}, predicted {}", c.local, c.backend, old_names[id]);
            c.echo(&format!("hello {p}")).unwrap_or_else(|e| panic!("stream {p} on {}: first echo: {e}", c.backend));
            streams.push(c);
        }
    }
    let per: BTreeMap<&str, usize> = streams.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.backend.as_str()).or_default() += 1;
        m
    });
    assert_eq!(per, BTreeMap::from([("be0", 10), ("be1", 10), ("be2", 10)]), "streams per backend before the change");
    let removed_id = b.dp.control.backend_id("live", t.backend_spec(2, false, 1).addr).unwrap();
    let drained_id = b.dp.control.backend_id("live", t.backend_spec(1, false, 1).addr).unwrap();
    let drained_before = b.dp.stats.backend(drained_id).expect("stats").packets;

    // The change: add be3, drain be1 (weight 0), remove be2.
    b.control().add_backend("live", t.backend_spec(3, false, 1)).expect("add be3");
    b.control().set_weight("live", t.backend_spec(1, false, 1).addr, 0).expect("drain be1");
    b.control().remove_backend("live", t.backend_spec(2, false, 1).addr).expect("remove be2");
    let new_table = b.table("live");
    let new_names = names(&t, &b, "live");
    assert!(!new_table.contains(&removed_id), "removed backend still in the table");

    // Streams of be0 (stays) and be1 (drained) keep their backend: FLOWS pins them.
    // Streams of be2 (removed): the datapath finds their flow's backend invalid and
    // re-steers the next packet by the new table; that backend has no such connection
    // and answers with a RST, so the client sees a reset at once (no hang, no timeout).
    for (i, c) in streams.iter_mut().enumerate() {
        let line = format!("after change {i}");
        if c.backend == "be2" {
            let t0 = Instant::now();
            let r = c.stream.write_all(format!("{line}\n").as_bytes()).and_then(|_| read_line(&mut c.stream));
            let err = r.err().unwrap_or_else(|| panic!("stream {i} of removed be2 still answered"));
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "stream {i} of removed be2: expected a reset, got {err}");
            assert!(t0.elapsed() < Duration::from_secs(1), "stream {i}: reset took {:?}", t0.elapsed());
            // The re-steered flow now names the backend the new table picks.
            let f = b.dp.flow(&tcp_flow_key(c.local, vsa)).expect("flow entry of the re-steered stream");
            let want = new_table[flow_slot(c.local, vsa, m)];
            assert_eq!(f.backend_id, want, "stream {i}: re-steered to {}, new table says {}", new_names[&f.backend_id], new_names[&want]);
        } else {
            c.echo(&line).unwrap_or_else(|e| panic!("stream {i} on {} broke after the change: {e}", c.backend));
        }
    }

    // New connections follow the new set exactly: never be1 (drained) or be2 (removed).
    let n = 90;
    let mut count = BTreeMap::<String, usize>::new();
    for i in 0..n {
        assert!(start.elapsed() < TEST_BUDGET, "out of time");
        let c = t.connect(vip, PORT).unwrap_or_else(|e| panic!("new connection {i}: {e}"));
        let want = &new_names[&new_table[flow_slot(c.local, vsa, m)]];
        assert_eq!(&c.backend, want, "new connection {i} from {}: answered by {}, predicted {want}", c.local, c.backend);
        assert!(c.backend != "be1" && c.backend != "be2", "new connection {i} went to {}", c.backend);
        *count.entry(c.backend).or_default() += 1;
    }
    println!("new connections after the change: {count:?}");
    assert!(count.get("be3").copied().unwrap_or(0) > 0, "the added be3 got none of {n} ({count:?})");

    // The surviving streams still work after all that, also with bulk data (full-size
    // segments: client MSS 1360 from the route MTU 1400, 1420 bytes encapsulated).
    for (i, c) in streams.iter_mut().filter(|c| c.backend != "be2").enumerate() {
        c.echo("still here").unwrap_or_else(|e| panic!("surviving stream {i} on {}: {e}", c.backend));
    }
    for c in streams.iter_mut().filter(|c| c.backend != "be2").take(4) {
        c.echo_bulk(256 * 1024, 32 * 1024).unwrap_or_else(|e| panic!("bulk echo on {} from {}: {e}", c.backend, c.local));
    }
    let reasons = b.dp.stats.reasons().expect("reasons");
    let drops: Vec<_> = reasons.iter().enumerate().filter(|(i, r)| lb_common::reason::NAMES[*i].starts_with("drop") && r.packets > 0).map(|(i, r)| (lb_common::reason::NAMES[i], r.packets)).collect();
    assert!(drops.is_empty(), "no drops expected: {drops:?}");
    // The removed backend is never told: its side of the reset streams stays
    // ESTABLISHED (until its own keepalive or application timeout; our server keeps
    // them until the topology is dropped).
    let ss = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", t.backends[2].ns))
        .args(["ss", "-tnH", "state", "established", &format!("( sport = :{PORT} )")])
        .output()
        .expect("ss in be2");
    let established = String::from_utf8_lossy(&ss.stdout).lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(established, 10, "be2 still holds its 10 streams' sockets: {}", String::from_utf8_lossy(&ss.stdout));
    // The drained backend still carries its streams: 2 echoes each since the change, so
    // ≥ 2 data segments per stream through the balancer (the client's ACKs of the echoes
    // may be delayed or merged, so they are not counted on).
    let d = b.dp.stats.backend(drained_id).expect("stats");
    assert!(d.packets >= drained_before + 20, "drained be1: {} packets before the change, {} after 2 echoes on 10 streams", drained_before, d.packets);
    assert_eq!(d.new_flows, 10, "drained be1 got no new flow after the change");
    println!("test took {:?}", start.elapsed());
}

/// The harness pieces later tests build on: HTTP responder through the VIP, a stopped
/// server (dead backend) refusing the connections aimed at it, restart, a chosen client
/// port reaching its predicted backend, `spawn_in` placing a process in a namespace.
#[test]
fn harness_http_dead_server_and_spawn_in() {
    let t = topo("lbe-e", 3);
    let vip = vip_v4(50);
    let http = 80;
    let vsa = SocketAddr::new(vip, http);
    t.add_vip_to_backends(vip);
    t.start_servers(http, ServerMode::Http);
    let mut b = balancer(&t);
    let bes = (0..3).map(|i| t.backend_spec(i, false, 1)).collect();
    b.control().add_service(service("http", &vip_str(vip, http), Mode::Ipip, 251), bes).expect("add service");
    let names = names(&t, &b, "http");

    let (status, body, _) = t.http_get(vip, http, "/healthz").expect("GET /healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, _) = t.http_get(vip, http, "/nope").expect("GET /nope");
    assert_eq!(status, 404);
    for _ in 0..5 {
        let (status, body, local) = t.http_get(vip, http, "/").expect("GET /");
        let want = &names[&b.predict("http", local, vsa)];
        assert_eq!((status, body.trim()), (200, want.as_str()), "GET / from {local}");
    }

    // Aim at be0 from chosen ports: answered; after stopping its server, refused (the
    // SYN still reaches be0, whose kernel answers with a RST); after a restart, answered.
    let client = IpAddr::V4(t.client.v4);
    let be0 = b.dp.control.backend_id("http", t.backend_spec(0, false, 1).addr).unwrap();
    let mut ports = (41000u16..42000).filter(|p| b.port_for("http", client, vsa, be0, *p..*p + 1).is_some());
    let p1 = ports.next().expect("a port predicted for be0");
    let (_, body, _) = t.http_get_from(p1, vip, http, "/").expect("GET / from a be0 port");
    assert_eq!(body.trim(), "be0", "port {p1} is predicted for be0");
    t.stop_server(0, http);
    let p2 = ports.next().expect("a second be0 port");
    let t0 = Instant::now();
    let err = t.http_get_from(p2, vip, http, "/").expect_err("be0's server is stopped");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "dead backend: {err}");
    assert!(t0.elapsed() < Duration::from_secs(1), "refusal took {:?}", t0.elapsed());
    t.start_server(0, http, ServerMode::Http);
    let p3 = ports.next().expect("a third be0 port");
    let (_, body, _) = t.http_get_from(p3, vip, http, "/").expect("GET / after restart");
    assert_eq!(body.trim(), "be0");

    // spawn_in: the process runs in the client's network namespace; killed on drop.
    let guard = spawn_in(&t.client.ns, std::process::Command::new("sleep").arg("30")).expect("spawn sleep");
    let pid = guard.id();
    // nsenter enters the namespace, then execs: wait (bounded) until it has.
    let t0 = Instant::now();
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != "sleep") {
        assert!(t0.elapsed() < Duration::from_secs(3), "nsenter did not exec sleep");
        std::thread::sleep(Duration::from_millis(5));
    }
    use std::os::unix::fs::MetadataExt;
    let ns_of = |p: &str| std::fs::metadata(p).map(|m| m.ino()).expect("stat netns");
    assert_eq!(ns_of(&format!("/proc/{pid}/ns/net")), ns_of(&format!("/run/netns/{}", t.client.ns)), "spawned in the client ns");
    drop(guard);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} killed and reaped on drop");
}
