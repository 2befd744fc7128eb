#![allow(unused_imports, dead_code)]
//! Active-active behind ECMP (issue 14) end to end: three lbd nodes, each with its own
//! BIRD announcing the VIP to a router BIRD (BGP + BFD 100 ms × 3, `merge paths`), the
//! client behind the router, backends answering directly (DSR through the router).
//! Services run in gue mode with second chance (backends run lb_decap). Root; one test
//! at a time (shared names).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::bgp::{
    Bfd, BgpLab, LoadReport, echo_all, echo_load, new_conn_load, nodes_holding, xdp_attached,
};
use lb_tests::lbd::wait_for;
use lb_tests::netns::{Conn, ServerMode, TopoSpec, Topology, vip_v4};

const PORT: u16 = 80;
const EVERY: Duration = Duration::from_millis(20);
/// A request slower than this lost a packet (a lost SYN is retransmitted after 1 s).
const SLOW: Duration = Duration::from_millis(500);
const CONVERGE: Duration = Duration::from_secs(30);

/// A routed topology with 3 balancers and `backends` backends (servers on all), the
/// BGP lab on it (router BIRD started, nodes not), and the gue service over backends
/// `0..in_service`.
fn setup(
    prefix: &str,
    backends: usize,
    in_service: usize,
    drain_ms: u32,
) -> (Topology, BgpLab, IpAddr, String) {
    let t = Topology::routed(prefix, TopoSpec { lbs: 3, backends });
    let vip = vip_v4(1);
    t.add_vip_to_backends(vip);
    t.enable_second_chance();
    t.start_servers(PORT, ServerMode::Echo);
    let lab = BgpLab::new(&t, prefix.trim_end_matches('-'), Bfd::FAST, drain_ms);
    let backends: String = (0..in_service)
        .map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[i].v4))
        .collect();
    let services = format!(
        "[[service]]\nname = \"g\"\nvip = \"{vip}:{PORT}/tcp\"\nmode = \"gue\"\ntable_size = 1009\n{backends}"
    );
    lab.write_config(&services);
    (t, lab, vip, services)
}

/// Starts nodes `which` and waits until the router's route to `vip` has exactly them.
fn start_nodes(t: &Topology, lab: &mut BgpLab, vip: IpAddr, which: &[usize]) -> Duration {
    let t0 = Instant::now();
    for &i in which {
        lab.nodes[i].start();
    }
    assert!(
        t.wait_router_lbs(vip, which, CONVERGE).is_some(),
        "router next hops for {vip}: {:?}, want nodes {which:?}\n{}",
        t.router_next_hops(vip),
        lab.logs()
    );
    t0.elapsed()
}

/// `n` long-lived connections, and the node each went through (the one whose flow
/// table holds it).
fn open_long_lived(t: &Topology, lab: &BgpLab, vip: IpAddr, n: usize) -> (Vec<Conn>, Vec<usize>) {
    let conns: Vec<Conn> = (0..n)
        .map(|i| {
            t.connect(vip, PORT)
                .unwrap_or_else(|e| panic!("long-lived {i}: {e}\n{}", lab.logs()))
        })
        .collect();
    let via: Vec<usize> = conns
        .iter()
        .map(|c| {
            let on = nodes_holding(&lab.nodes, c, vip, PORT);
            assert_eq!(
                on.len(),
                1,
                "{}: exactly one node holds a new flow: {on:?}",
                c.local
            );
            on[0]
        })
        .collect();
    (conns, via)
}

fn per_node(via: &[usize]) -> [usize; 3] {
    let mut n = [0; 3];
    for &v in via {
        n[v] += 1;
    }
    n
}

/// ECMP spreads new connections over the three nodes; each forwards its share.
#[test]
fn ecmp_spreads_over_three_nodes() {
    let (t, mut lab, vip, _) = setup("bga-", 3, 3, 500);
    let took = start_nodes(&t, &mut lab, vip, &[0, 1, 2]);
    let before = lab.forwarded();
    let (mut conns, via) = open_long_lived(&t, &lab, vip, 60);
    let share = per_node(&via);
    let after = lab.forwarded();
    let new_flows: Vec<u64> = (0..3)
        .map(|i| after[i].new_flows - before[i].new_flows)
        .collect();
    println!(
        "3 nodes announced in {took:?}; 60 connections per node {share:?}; new flows per node {new_flows:?}"
    );
    assert!(
        share.iter().all(|&n| n > 0),
        "every node takes a share: {share:?}"
    );
    assert_eq!(
        new_flows.iter().map(|&n| n as usize).collect::<Vec<_>>(),
        share.to_vec(),
        "each node's counters saw exactly its flows"
    );
    assert!(echo_all(&mut conns, "spread").is_empty());
}
