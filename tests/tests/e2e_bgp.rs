//! Active-active behind ECMP (issue 14) end to end: three lbd nodes, each with its own
//! BIRD announcing the VIP to a router BIRD (BGP + BFD 100 ms × 3, `merge paths`), the
//! client behind the router, backends answering directly (DSR through the router).
//! Services run in gue mode with second chance (backends run lb_decap). Root; one test
//! at a time (shared names).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::bgp::{
    BgpLab, LAB_PORT as PORT, LoadReport, echo_all, echo_load, gue_lab, lab_vip6, new_conn_load,
    nodes_holding, per_node, watch_leave, xdp_attached,
};
use lb_tests::lbd::wait_for;
use lb_tests::netns::{Conn, Topology, flow_slot};

const EVERY: Duration = Duration::from_millis(20);
/// A request slower than this lost a packet (a lost SYN is retransmitted after 1 s).
const SLOW: Duration = Duration::from_millis(500);
const CONVERGE: Duration = Duration::from_secs(30);

/// ECMP spreads new connections over the three nodes, over IPv4 and IPv6; each node
/// forwards its share.
#[test]
fn ecmp_spreads_over_three_nodes() {
    let (t, mut lab, vip) = gue_lab("bga-", 3, 3, 3, 500);
    let took = lab.start_nodes(&t, vip, &[0, 1, 2]);
    let before = lab.forwarded();
    let (mut conns, via) = lab.open_long_lived(&t, vip, PORT, 60);
    let share = per_node(&via, 3);
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
        share.clone(),
        "each node's counters saw exactly its flows"
    );
    assert!(echo_all(&mut conns, "spread").is_empty());
    // IPv6: the same nodes announce the /128 over their IPv6 sessions.
    let vip6 = lab_vip6();
    assert!(
        t.wait_router_lbs(vip6, &[0, 1, 2], Duration::from_secs(10))
            .is_some(),
        "IPv6 route: {:?}",
        t.router_next_hops(vip6)
    );
    let (mut conns6, via6) = lab.open_long_lived(&t, vip6, PORT, 30);
    let share6 = per_node(&via6, 3);
    println!(
        "IPv6 VIP {vip6}: next hops {:?}; 30 connections per node {share6:?}",
        t.router_next_hops(vip6)
    );
    assert!(
        share6.iter().all(|&n| n > 0),
        "every node takes a share over IPv6: {share6:?}"
    );
    assert!(echo_all(&mut conns6, "spread6").is_empty());
}

fn decap_count(t: &Topology, reason: &str) -> u64 {
    (0..t.backends.len())
        .map(|i| {
            let s = lb_userspace::decap::stats(&t.backends[i].ifname).expect("decap stats");
            s.iter()
                .find(|(n, _)| *n == reason)
                .map_or(0, |(_, c)| c.packets)
        })
        .sum()
}

/// Packets the backends handed on by second chance (no listener, or not held).
fn second_chanced(t: &Topology) -> u64 {
    decap_count(t, "second_chance_syn") + decap_count(t, "second_chance_not_held")
}

/// What happened while a scenario ran under load: new connections every 20 ms and an
/// echo on every long-lived connection every 50 ms.
struct UnderLoad {
    report: LoadReport,
    /// Long-lived connections that failed an echo during the load or right after.
    broken: Vec<(usize, String)>,
    echo_rounds: usize,
}

/// Runs `event` (given the load's clock origin) while the load runs; the load goes on
/// `after` once the event returns.
fn under_load<R>(
    t: &Topology,
    vip: IpAddr,
    conns: &mut [Conn],
    after: Duration,
    event: impl FnOnce(Instant) -> R,
) -> (UnderLoad, R) {
    let stop = AtomicBool::new(false);
    let origin = Instant::now();
    let max = Duration::from_secs(90);
    let (attempts, (mut broken, echo_rounds), r) = std::thread::scope(|s| {
        let load = s.spawn(|| new_conn_load(t, vip, PORT, EVERY, &stop, max, origin));
        let echo = s.spawn(|| echo_load(conns, Duration::from_millis(50), &stop, max));
        // Both loads run for a second before the event.
        std::thread::sleep(Duration::from_secs(1));
        let r = event(origin);
        std::thread::sleep(after);
        stop.store(true, Ordering::SeqCst);
        (load.join().unwrap(), echo.join().unwrap(), r)
    });
    for (i, e) in echo_all(conns, "after") {
        if !broken.iter().any(|(b, _)| *b == i) {
            broken.push((i, format!("after the load: {e}")));
        }
    }
    (
        UnderLoad {
            report: LoadReport::from_attempts(attempts, SLOW),
            broken,
            echo_rounds,
        },
        r,
    )
}

/// One of three nodes dies (its link down, as a dead machine's, then kill -9 of lbd
/// and BIRD) under long-lived connections on every node and a new connection every 20 ms: BFD
/// (100 ms × 3) withdraws it, the router's ECMP moves its flows to the others, whose
/// identical Maglev tables send them to the same backends. No established connection
/// is lost; new connections fail only while BFD has not noticed (gap < 1 s).
#[test]
fn kill_one_of_three_under_load() {
    let (t, mut lab, vip) = gue_lab("bgb-", 3, 3, 3, 500);
    lab.start_nodes(&t, vip, &[0, 1, 2]);
    let (mut conns, via) = lab.open_long_lived(&t, vip, PORT, 36);
    let share = per_node(&via, 3);
    assert!(
        share.iter().all(|&n| n > 0),
        "long-lived connections on every node: {share:?}"
    );
    let victim = 1;
    let sc_before = second_chanced(&t);
    let (load, (killed_at, xdp_stays, converged)) =
        under_load(&t, vip, &mut conns, Duration::from_millis(1500), |origin| {
            let at = origin.elapsed();
            let xdp_stays = lab.die(&t, victim);
            let converged = t.wait_router_lbs(vip, &[0, 2], Duration::from_secs(10));
            (at, xdp_stays, converged)
        });
    let r = &load.report;
    println!(
        "node {victim} dies (link down, then kill -9 of lbd and BIRD; XDP program still attached after the kill: {xdp_stays}): \
         router route without it {converged:?} after the kill; new connections every 20 ms: {} attempts, {} failed, \
         new-connection gap {:?} from the kill (first to last failure {:?}, max between good ones {:?}; failures {:?}); \
         long-lived: 36 per node {share:?}, {} echo rounds, {} broken",
        r.attempts,
        r.failed.len(),
        r.outage_since(killed_at),
        r.gap,
        r.max_success_gap,
        r.failed
            .iter()
            .map(|(at, e)| format!("{:?} after the kill: {e}", at.saturating_sub(killed_at)))
            .collect::<Vec<_>>(),
        load.echo_rounds,
        load.broken.len()
    );
    assert!(
        converged.is_some(),
        "the router dropped the dead node: {:?}\n{}",
        t.router_next_hops(vip),
        lab.logs()
    );
    assert!(
        load.broken.is_empty(),
        "established connections lost: {:#?}",
        load.broken
    );
    assert!(
        r.gap < Duration::from_secs(1),
        "new-connection gap {:?}: {:#?}",
        r.gap,
        r.failed
    );
    assert!(r.attempts > 100, "the load ran: {} attempts", r.attempts);
    // The backend set did not change: the survivors' identical tables carried the dead
    // node's flows, not the backends' second chance (which would hide a difference).
    assert_eq!(second_chanced(&t) - sc_before, 0, "packets second-chanced after the kill");
}

/// A backend added on all three nodes (lbctl), so the Maglev pick of some flows changes;
/// then the node holding most of those flows dies. ECMP moves them to nodes that never
/// saw them: the new pick is the added backend, whose decap hands them to the slot's
/// secondary, the previous owner (second chance, no flow sync). None breaks.
#[test]
fn backend_added_then_node_killed_keeps_moved_flows() {
    let (t, mut lab, vip) = gue_lab("bgc-", 3, 4, 3, 500);
    lab.start_nodes(&t, vip, &[0, 1, 2]);
    // Predicted tables: Maglev depends on addresses and weights only (ids are labels).
    let before = t.maglev_table_of_first(3, 1009);
    let after = t.maglev_table_of_first(4, 1009);
    let vip_sa = SocketAddr::new(vip, PORT);
    let slot_of = |port: u16| flow_slot(SocketAddr::new(t.client.addr(false), port), vip_sa, 1009);
    let changed: Vec<u16> = (20000..30000)
        .filter(|&p| before[slot_of(p)] != after[slot_of(p)])
        .take(60)
        .collect();
    let kept: Vec<u16> = (20000..30000)
        .filter(|&p| before[slot_of(p)] == after[slot_of(p)])
        .take(15)
        .collect();
    assert_eq!((changed.len(), kept.len()), (60, 15));
    let ports: Vec<u16> = changed.iter().chain(&kept).copied().collect();
    let mut conns: Vec<Conn> = ports
        .iter()
        .map(|&p| {
            t.connect_from(p, vip, PORT)
                .unwrap_or_else(|e| panic!("port {p}: {e}\n{}", lab.logs()))
        })
        .collect();
    for (c, &p) in conns.iter().zip(&ports) {
        assert_eq!(
            c.backend,
            format!("be{}", before[slot_of(p)]),
            "port {p}: the predicted backend before the change"
        );
    }
    let via: Vec<usize> = conns
        .iter()
        .map(|c| {
            let on = nodes_holding(&lab.nodes, c, vip, PORT);
            assert_eq!(on.len(), 1, "{}: {on:?}", c.local);
            on[0]
        })
        .collect();
    // The change, on every node.
    let added = t.backends[3].v4.to_string();
    lab.lbctl_on(&[0, 1, 2], &["backend", "add", "g", &added]);
    for (i, n) in lab.nodes.iter().enumerate() {
        let ok = wait_for(Duration::from_secs(10), || {
            n.lbd
                .lbctl_json(&["backend", "list", "g"])
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["in_table"].as_bool() == Some(true))
        });
        assert!(ok.is_some(), "node {i}: be3 in the table");
    }
    // The predicted table after the change is the datapath's: fresh flows land as predicted.
    for p in (30000..40000).filter(|&p| after[slot_of(p)] == 3).take(5) {
        let c = t
            .connect_from(p, vip, PORT)
            .unwrap_or_else(|e| panic!("fresh port {p}: {e}"));
        assert_eq!(c.backend, "be3", "fresh port {p}");
    }
    // The victim: the node holding most changed-pick flows.
    let changed_on = |n: usize| (0..changed.len()).filter(|&i| via[i] == n).count();
    let victim = (0..3).max_by_key(|&n| changed_on(n)).unwrap();
    let moved_changed = changed_on(victim);
    let sc_before = decap_count(&t, "second_chance_not_held");
    lab.die(&t, victim);
    let others: Vec<usize> = (0..3).filter(|&n| n != victim).collect();
    let converged = t.wait_router_lbs(vip, &others, Duration::from_secs(10));
    assert!(
        converged.is_some(),
        "router without node {victim}: {:?}",
        t.router_next_hops(vip)
    );
    let mut broken = Vec::new();
    for round in 0..3 {
        for (i, e) in echo_all(&mut conns, &format!("r{round}")) {
            broken.push(format!(
                "port {} (pick changed: {}, via node {}): {e}",
                ports[i],
                i < changed.len(),
                via[i]
            ));
        }
    }
    let sc = decap_count(&t, "second_chance_not_held") - sc_before;
    let now_on: Vec<Vec<usize>> = conns
        .iter()
        .map(|c| nodes_holding(&lab.nodes, c, vip, PORT))
        .collect();
    let moved = (0..conns.len())
        .filter(|&i| via[i] != victim && !now_on[i].contains(&via[i]))
        .count();
    println!(
        "75 connections (60 whose pick changes when be3 is added), per node {:?}; be3 added on all nodes; node {victim} \
         killed with {moved_changed} changed-pick flows (router converged in {converged:?}); {} broken; \
         {sc} packets second-chanced to their previous backend; {moved} flows of surviving nodes also moved by the rehash",
        per_node(&via, 3),
        broken.len()
    );
    assert!(broken.is_empty(), "{broken:#?}");
    assert!(
        moved_changed >= 5,
        "the killed node held changed-pick flows: {moved_changed}"
    );
    assert!(
        sc > 0,
        "moved changed-pick flows were carried by second chance"
    );
}

/// `lbctl node drain` under a steady request loop and long-lived connections: lbd
/// withdraws, the router moves everything to the other nodes, no request fails, and
/// after drain_ms the node forwards nothing. Undrain brings it back.
#[test]
fn drain_fails_no_request_and_node_goes_quiet() {
    let drain_ms = 1000;
    let (t, mut lab, vip) = gue_lab("bgd-", 3, 3, 3, drain_ms);
    lab.start_nodes(&t, vip, &[0, 1, 2]);
    let (mut conns, via) = lab.open_long_lived(&t, vip, PORT, 30);
    let share = per_node(&via, 3);
    let node = 2;
    assert!(
        share[node] > 0,
        "long-lived connections through the node to drain: {share:?}"
    );
    let span = Duration::from_millis(u64::from(drain_ms) + 1500);
    let (load, (drained_at, leave)) =
        under_load(&t, vip, &mut conns, Duration::from_millis(200), |origin| {
            let before = lab.nodes[node].forwarded().packets;
            let at = origin.elapsed();
            let t0 = Instant::now();
            let (ok, out, err) = lab.nodes[node].lbd.lbctl(&["node", "drain"]);
            assert!(ok, "lbctl node drain: {err}");
            println!("lbctl node drain: {}", out.trim());
            (
                at,
                watch_leave(&t, &lab, node, vip, &[0, 1], t0, before, span),
            )
        });
    let after = lab.nodes[node].forwarded().packets;
    let bgp = lab.nodes[node].bgp_status();
    let r = &load.report;
    println!(
        "drain of node {node} (drain_ms {drain_ms}) at {drained_at:?}: router without it {:?} after the command; last packet \
         it forwarded {:?} after the command, none in the {:?} after; requests every 20 ms: {} attempts, {} failed; \
         long-lived 30 {share:?}: {} echo rounds, {} broken",
        leave.converged,
        leave.last_packet,
        span - leave.last_packet.unwrap_or_default(),
        r.attempts,
        r.failed.len(),
        load.echo_rounds,
        load.broken.len()
    );
    assert!(
        leave.converged.is_some(),
        "router without the drained node: {:?}",
        t.router_next_hops(vip)
    );
    assert!(r.failed.is_empty(), "failed requests: {:#?}", r.failed);
    assert!(load.broken.is_empty(), "{:#?}", load.broken);
    assert!(
        leave
            .last_packet
            .is_none_or(|d| d < Duration::from_millis(u64::from(drain_ms))),
        "the node forwarded until {:?} after the drain",
        leave.last_packet
    );
    assert_eq!(
        after, leave.packets,
        "the node forwarded nothing after drain_ms"
    );
    assert_eq!(bgp["drained"], true, "{bgp}");
    assert_eq!(bgp["in_sync"], true, "{bgp}");
    assert_eq!(bgp["wanted"], serde_json::json!([]), "{bgp}");
    // Undrain: announced again, new flows reach it.
    let (ok, _, err) = lab.nodes[node].lbd.lbctl(&["node", "undrain"]);
    assert!(ok, "{err}");
    assert!(
        t.wait_router_lbs(vip, &[0, 1, 2], Duration::from_secs(10))
            .is_some(),
        "undrained node back in the route"
    );
    let before = lab.nodes[node].forwarded().new_flows;
    let (_, via2) = lab.open_long_lived(&t, vip, PORT, 30);
    assert!(
        per_node(&via2, 3)[node] > 0 && lab.nodes[node].forwarded().new_flows > before,
        "undrained node takes new flows"
    );
}

/// A third node joins (lbd and BIRD started) while two serve long-lived connections
/// and a new connection every 20 ms: the router rehashes, the flows it moves to the
/// new node find the same backends there (identical tables); none is lost, no request
/// fails, and the new node takes a share of the new connections.
#[test]
fn join_loses_nothing_and_takes_a_share() {
    let (t, mut lab, vip) = gue_lab("bge-", 3, 3, 3, 500);
    lab.start_nodes(&t, vip, &[0, 1]);
    let (mut conns, via) = lab.open_long_lived(&t, vip, PORT, 30);
    let share = per_node(&via, 3);
    let node = 2;
    let sc_before = second_chanced(&t);
    let mut nodes = std::mem::take(&mut lab.nodes);
    let (load, (joined_at, announced)) =
        under_load(&t, vip, &mut conns, Duration::from_millis(1500), |origin| {
            let at = origin.elapsed();
            let t0 = Instant::now();
            nodes[node].start();
            let announced = t
                .wait_router_lbs(vip, &[0, 1, 2], CONVERGE)
                .map(|_| t0.elapsed());
            (at, announced)
        });
    lab.nodes = nodes;
    let r = &load.report;
    let new_flows: Vec<u64> = lab.forwarded().iter().map(|f| f.new_flows).collect();
    let moved_here = conns
        .iter()
        .filter(|c| nodes_holding(&lab.nodes, c, vip, PORT).contains(&node))
        .count();
    println!(
        "node {node} joined at {joined_at:?}: in the router's route {announced:?} after its start; new connections every 20 ms: \
         {} attempts, {} failed; new flows per node since their start {new_flows:?} (the joined node's \
         include the long-lived flows the rehash moved to it); long-lived 30 on {share:?}: {moved_here} moved to the new node, {} echo rounds, {} broken",
        r.attempts,
        r.failed.len(),
        load.echo_rounds,
        load.broken.len()
    );
    assert!(
        announced.is_some(),
        "the joined node in the route\n{}",
        lab.logs()
    );
    assert!(load.broken.is_empty(), "{:#?}", load.broken);
    assert!(r.failed.is_empty(), "{:#?}", r.failed);
    // Not trivially: some established connections moved onto the new node, and its
    // table (identical to the others') kept them, without second chance.
    assert!(moved_here > 0, "the rehash moved long-lived connections to the new node");
    assert_eq!(second_chanced(&t) - sc_before, 0, "packets second-chanced after the join");
    assert!(
        new_flows[node] > 0,
        "the joined node takes new connections: {new_flows:?}"
    );
    let (_, via2) = lab.open_long_lived(&t, vip, PORT, 30);
    println!(
        "30 new connections after the join, per node {:?}",
        per_node(&via2, 3)
    );
    assert!(
        per_node(&via2, 3)[node] > 0,
        "the joined node takes a share of new connections"
    );
}

/// BIRD dies on a node: lbctl status says it is unreachable, lbd goes on forwarding
/// (connections pinned to the node by a router policy rule still work), and once BIRD
/// is back the node is announced again and lbd's retries clear the error. Then BIRD
/// refuses lbd's `configure` (a broken main config): reported, retried, and applied
/// once the config is fixed.
#[test]
fn bird_unreachable_or_refusing_is_reported_and_retried() {
    let (t, mut lab, vip) = gue_lab("bgf-", 3, 3, 3, 200);
    lab.start_nodes(&t, vip, &[0, 1, 2]);
    let node = 1;
    let status = |lab: &BgpLab| lab.nodes[node].bgp_status();
    // 1. BIRD dies.
    lab.nodes[node].bird.kill();
    let withdrawn = t.wait_router_lbs(vip, &[0, 2], Duration::from_secs(10));
    assert!(
        withdrawn.is_some(),
        "BFD withdrew the node whose BIRD died: {:?}",
        t.router_next_hops(vip)
    );
    let reported = wait_for(Duration::from_secs(15), || {
        let b = status(&lab);
        b["bird_ok"] == false
            && b["error"]
                .as_str()
                .is_some_and(|e| e.contains("BIRD unreachable"))
    });
    let b = status(&lab);
    let (_, table, _) = lab.nodes[node].lbd.lbctl(&["status"]);
    assert!(
        reported.is_some(),
        "lbctl status reports BIRD unreachable: {b}"
    );
    assert!(table.contains("ERROR BIRD unreachable"), "{table}");
    // 2. lbd still forwards: the router sends client ports 21000..=21999 to this node.
    t.pin_client_ports(21000..=21999, node);
    let f0 = lab.nodes[node].forwarded().packets;
    for p in 21000..21005 {
        let mut c = t
            .connect_from(p, vip, PORT)
            .unwrap_or_else(|e| panic!("pinned port {p} through node {node}: {e}"));
        c.echo("still forwarding").unwrap();
        assert_eq!(nodes_holding(&lab.nodes, &c, vip, PORT), vec![node]);
    }
    let forwarded = lab.nodes[node].forwarded().packets - f0;
    t.unpin_client_ports();
    assert!(
        forwarded >= 5 * 4,
        "the node forwarded the pinned connections: {forwarded} packets"
    );
    // 3. BIRD is back: announced again, and lbd's poll/retry clears the error.
    let t1 = Instant::now();
    lab.nodes[node].bird.start();
    let back = t.wait_router_lbs(vip, &[0, 1, 2], CONVERGE);
    assert!(back.is_some(), "node back in the route\n{}", lab.logs());
    let cleared = wait_for(Duration::from_secs(15), || {
        let b = status(&lab);
        b["bird_ok"] == true && b["error"].is_null() && b["in_sync"] == true
    });
    let cleared_after = t1.elapsed();
    assert!(cleared.is_some(), "lbctl status ok again: {}", status(&lab));
    println!(
        "BIRD killed: router withdrew the node in {withdrawn:?}, lbctl status reported it {reported:?} later ({}), \
         {forwarded} packets forwarded meanwhile through the node; BIRD restarted: announced again after {back:?}, \
         status ok after {cleared_after:?}",
        b["error"],
    );
    // 4. BIRD refuses lbd's `configure`: its main config is broken.
    let good = std::fs::read_to_string(lab.nodes[node].bird.config_path()).unwrap();
    lab.nodes[node]
        .bird
        .write_config(&format!("{good}this is not a bird statement;\n"));
    let (ok, _, err) = lab.nodes[node].lbd.lbctl(&["node", "drain"]);
    assert!(ok, "{err}");
    let refused = wait_for(Duration::from_secs(10), || {
        let b = status(&lab);
        b["in_sync"] == false
            && b["failures"].as_u64().is_some_and(|f| f >= 1)
            && b["error"].as_str().is_some_and(|e| e.contains("configure"))
    });
    let b = status(&lab);
    assert!(refused.is_some(), "the refusal is reported: {b}");
    // BIRD kept its running config: the node is still announced.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        t.router_lbs(vip),
        vec![0, 1, 2],
        "a refused configure changes nothing"
    );
    let failures = b["failures"].as_u64().unwrap();
    let t2 = Instant::now();
    lab.nodes[node].bird.write_config(&good);
    let applied = t.wait_router_lbs(vip, &[0, 2], Duration::from_secs(15));
    assert!(
        applied.is_some(),
        "lbd's retry applied the drain once BIRD accepts: {}\n{}",
        status(&lab),
        lab.logs()
    );
    assert!(
        wait_for(Duration::from_secs(5), || status(&lab)["in_sync"] == true).is_some(),
        "{}",
        status(&lab)
    );
    println!(
        "BIRD refusing configure: reported ({}; {failures} failed in a row), node stayed announced; config fixed: lbd's retry \
         withdrew the node after {:?}",
        b["error"],
        t2.elapsed()
    );
    lab.lbctl_on(&[node], &["node", "undrain"]);
    assert!(
        t.wait_router_lbs(vip, &[0, 1, 2], Duration::from_secs(10))
            .is_some(),
        "undrained"
    );
}

/// Withdraw before traffic stops: SIGTERM to one node's lbd, then `lbctl detach` on
/// another, each under long-lived connections and a request every 20 ms. lbd
/// withdraws first, the router moves the flows, and only after drain_ms does lbd stop
/// (its pinned XDP program stays) or detach (the program goes): nothing fails.
#[test]
fn sigterm_and_detach_withdraw_before_stopping() {
    let drain_ms = 1000u64;
    let (t, mut lab, vip) = gue_lab("bgg-", 3, 3, 3, drain_ms as u32);
    lab.start_nodes(&t, vip, &[0, 1, 2]);
    let (mut conns, via) = lab.open_long_lived(&t, vip, PORT, 30);
    let share = per_node(&via, 3);
    let mut stop_one = |lab: &mut BgpLab, node: usize, detach: bool, remaining: &[usize]| {
        let ifname = t.lbs[node].ifname.clone();
        let ns = t.lbs[node].ns.clone();
        let (load, (withdrawn, draining, exited, xdp_while, xdp_after)) =
            under_load(&t, vip, &mut conns, Duration::from_millis(300), |_| {
                let t0 = Instant::now();
                let lbd = &mut lab.nodes[node].lbd;
                if detach {
                    let (ok, _, err) = lbd.lbctl(&["detach", "--yes"]);
                    assert!(ok, "lbctl detach: {err}");
                } else {
                    assert!(lbd.terminate(), "SIGTERM to lbd");
                }
                let withdrawn = t.wait_router_lbs(vip, remaining, Duration::from_secs(5));
                // Still there (draining) shortly before drain_ms.
                let draining = lbd
                    .wait_exit(Duration::from_millis(drain_ms - 300))
                    .is_none();
                let xdp_while = xdp_attached(&ns, &ifname);
                let exited = lbd
                    .wait_exit(Duration::from_secs(5))
                    .map(|st| (st.success(), t0.elapsed()));
                (
                    withdrawn,
                    draining,
                    exited,
                    xdp_while,
                    xdp_attached(&ns, &ifname),
                )
            });
        let how = if detach { "lbctl detach" } else { "SIGTERM" };
        println!(
            "{how} on node {node} (drain_ms {drain_ms}): router without it {withdrawn:?} after; lbd still draining at \
             {} ms: {draining}; exited (ok, after) {exited:?}; XDP attached while draining {xdp_while}, after {xdp_after}; \
             requests: {} attempts, {} failed; long-lived 30 (started on {share:?}): {} broken",
            drain_ms - 300,
            load.report.attempts,
            load.report.failed.len(),
            load.broken.len()
        );
        assert!(
            withdrawn.is_some(),
            "{how}: routes withdrawn first: {:?}",
            t.router_next_hops(vip)
        );
        assert!(draining, "{how}: lbd waited drain_ms before stopping");
        let (ok, after) =
            exited.unwrap_or_else(|| panic!("{how}: lbd did not stop\n{}", lab.logs()));
        assert!(
            ok && after >= Duration::from_millis(drain_ms),
            "{how}: exit ok {ok} after {after:?}"
        );
        assert!(xdp_while, "{how}: still forwarding while draining");
        assert_eq!(
            xdp_after, !detach,
            "{how}: the program stays after a stop, goes after a detach"
        );
        assert!(
            load.report.failed.is_empty(),
            "{how}: {:#?}",
            load.report.failed
        );
        assert!(load.broken.is_empty(), "{how}: {:#?}", load.broken);
    };
    stop_one(&mut lab, 2, false, &[0, 1]);
    stop_one(&mut lab, 1, true, &[0]);
}
