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

    // ~30 long-lived streams, each checked against the prediction and echoing once.
    let old_table = b.table("live");
    let old_names = names(&t, &b, "live");
    let mut streams = Vec::new();
    for i in 0..30 {
        let mut c = t.connect(vip, PORT).unwrap_or_else(|e| panic!("stream {i}: {e}"));
        let want = &old_names[&old_table[flow_slot(c.local, vsa, m)]];
        assert_eq!(&c.backend, want, "stream {i} from {}: answered by {}, predicted {want}", c.local, c.backend);
        c.echo(&format!("hello {i}")).unwrap_or_else(|e| panic!("stream {i} on {}: first echo: {e}", c.backend));
        streams.push(c);
    }
    let per: BTreeMap<&str, usize> = streams.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.backend.as_str()).or_default() += 1;
        m
    });
    println!("streams per backend before the change: {per:?}");
    for be in ["be0", "be1", "be2"] {
        assert!(per.get(be).copied().unwrap_or(0) > 0, "need a stream on {be} to test the change ({per:?})");
    }
    let removed_id = b.dp.control.backend_id("live", t.backend_spec(2, false, 1).addr).unwrap();

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

    // The surviving streams still work after all that.
    for (i, c) in streams.iter_mut().filter(|c| c.backend != "be2").enumerate() {
        c.echo("still here").unwrap_or_else(|e| panic!("surviving stream {i} on {}: {e}", c.backend));
    }
    let drained_id = b.dp.control.backend_id("live", t.backend_spec(1, false, 0).addr).unwrap();
    let d = b.dp.stats.backend(drained_id).expect("stats");
    println!("drained be1: {} packets, {} new flows", d.packets, d.new_flows);
    println!("test took {:?}", start.elapsed());
}
