//! The BGP lab's scenario (tests/src/lab_bgp.rs, `cargo xtask lab --bgp`) as
//! assertions: ECMP spreads the tiers' connections over three lbd nodes, a node dies
//! without losing an established connection and with a new-connection gap below 1 s,
//! a backend change plus a node drain lose nothing, and the node that returns takes
//! its share again. Root; needs bird2, nginx, mariadb-server and mariadb-client
//! (`cargo xtask setup`). Its own prefix and state directory, removed on drop (also
//! after a failed assertion).

use std::path::Path;
use std::time::Duration;

use lb_tests::lab_bgp::{LabBgp, NODES, spread};

const PREFIX: &str = "lgt-";
const DIR: &str = "/var/lib/lb-lab-bgp-test";

#[test]
fn bgp_lab_scenario_spread_kill_maintenance_rejoin() {
    let lab = LabBgp::up(PREFIX, Path::new(DIR), &|s| eprintln!("lab: {s}"));

    // 1. Every node takes a share of the connections (client → web, nginx → app,
    // app → db all cross the router).
    let s = lab.step_spread(60);
    let c = &s.counts;
    println!(
        "1. {} sent, {} failed; paths {:?}; new connections per node: {}",
        c.sent,
        c.failed,
        s.paths,
        spread(&s.shares)
    );
    assert_eq!(
        (c.sent, c.answered, c.failed),
        (60, 60, 0),
        "{:?}",
        c.first_error
    );
    assert_eq!(
        s.paths,
        (0..NODES).collect::<Vec<_>>(),
        "the router's ECMP route has every node"
    );
    assert!(
        s.shares.iter().all(|f| f.new_flows > 0),
        "every node forwards a share: {}",
        spread(&s.shares)
    );

    let mut held = lab.open_keepalives();
    assert!(
        held.conns.iter().all(|c| c.via.is_some()),
        "each held connection is in one node's flow table"
    );

    // 2. The node with the most held connections dies: BFD withdraws it, new
    // connections keep working after a gap below 1 s, no held connection is lost.
    let s = lab.step_kill(&mut held);
    println!(
        "2. n{} killed: withdrawn after {:?}; new connections OK again after {:?} ({} of {} slow or failed); held {}/{} kept ({} via the node); new connections per node: {}",
        s.node + 1,
        s.withdrawn_after,
        s.outage,
        s.load.failed.len(),
        s.load.attempts,
        s.held - s.held_lost,
        s.held,
        s.held_via_node,
        spread(&s.shares)
    );
    assert!(
        s.withdrawn_after
            .is_some_and(|d| d < Duration::from_secs(1)),
        "BFD withdraws the dead node: {:?}",
        s.withdrawn_after
    );
    assert!(
        s.held_via_node > 0,
        "some held connection went through the killed node (else the check proves nothing)"
    );
    assert_eq!(
        s.held_lost, 0,
        "established connections survive: {:?}",
        s.held_error
    );
    assert!(
        s.outage < Duration::from_secs(1),
        "new-connection gap {:?} after the death: {:?}",
        s.outage,
        s.load.failed
    );
    assert!(
        s.load.attempts >= 100,
        "the load ran: {} attempts",
        s.load.attempts
    );
    assert_eq!(
        s.counts.failed, 0,
        "every visit answered (lost SYNs are sent again): {:?}",
        s.counts.first_error
    );

    // 3. app3 added on every running node, then another node drained: nothing lost,
    // and the drained node forwards nothing once drain_ms has passed.
    let running: Vec<usize> = (0..NODES).filter(|&i| i != s.node).collect();
    let killed = s.node;
    let s = lab.step_maintenance(&mut held, &running, running[0]);
    let c = &s.counts;
    println!(
        "3. app3 in every table after {:?}; n{} withdrawn after {:?}, {} packets after drain_ms; {} sent, {} failed; apps {:?}; held {}/{} kept",
        s.app3_in_tables_after,
        s.node + 1,
        s.withdrawn_after,
        s.drained_packets_after,
        c.sent,
        c.failed,
        c.by_app,
        s.held - s.held_lost,
        s.held
    );
    assert!(
        s.app3_in_tables_after.is_some(),
        "app3 in every running node's table"
    );
    assert!(
        s.withdrawn_after.is_some(),
        "the drained node's routes leave the router"
    );
    assert!(c.sent >= 50, "the loop ran: {}", c.sent);
    assert_eq!(
        (c.answered, c.failed),
        (c.sent, 0),
        "nothing lost: {:?}",
        c.first_error
    );
    assert!(
        c.by_app.get("app3").copied().unwrap_or(0) > 0,
        "app3 answered: {:?}",
        c.by_app
    );
    assert_eq!(
        s.drained_packets_after, 0,
        "the drained node forwards nothing after drain_ms"
    );
    assert_eq!(
        s.held_lost, 0,
        "established connections survive: {:?}",
        s.held_error
    );

    // 4. The killed node returns, the drained one undrains: each takes its share, no
    // held connection is lost.
    let drained = s.node;
    let s = lab.step_rejoin(&mut held, killed, drained, 60);
    let c = &s.counts;
    println!(
        "4. n{} back, n{} undrained: 3 paths after {:?}; {} sent, {} failed; new connections per node: {}; held {}/{} kept",
        killed + 1,
        drained + 1,
        s.back_after,
        c.sent,
        c.failed,
        spread(&s.shares),
        s.held - s.held_lost,
        s.held
    );
    assert!(s.back_after.is_ok(), "{:?}", s.back_after);
    assert_eq!(
        s.sessions,
        (2 * NODES, 2 * NODES),
        "every BGP session (IPv4 and IPv6) up again"
    );
    assert_eq!((c.answered, c.failed), (c.sent, 0), "{:?}", c.first_error);
    assert!(
        s.shares[killed].new_flows > 0,
        "the returned node takes a share: {}",
        spread(&s.shares)
    );
    assert!(
        s.shares[drained].new_flows > 0,
        "the undrained node takes a share: {}",
        spread(&s.shares)
    );
    assert_eq!(
        s.held_lost, 0,
        "established connections survive the join: {:?}",
        s.held_error
    );

    drop(held);
    drop(lab);
    assert!(!Path::new(DIR).exists(), "state directory removed");
    assert!(
        !Path::new(&format!("/run/netns/{PREFIX}cl")).exists(),
        "namespaces removed"
    );
}
