//! Three lbd nodes active-active (`[cluster]` peers with `[bgp]`), end to end: the
//! client, three balancer nodes and the backends of a `netns::Topology`. Each lbd has `[bgp]` pointing
//! at a control socket where no BIRD runs: it must keep forwarding and say so.
//! Root; one test at a time.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use lb_tests::lbd::{Lbd, wait_for};
use lb_tests::netns::{Conn, ServerMode, TopoSpec, Topology, vip_v4};
use serde_json::Value;

const PREFIX: &str = "pra-";
const PORT: u16 = 7946;
const SECRET: &[u8] = b"the secret of the three active-active nodes\n";

fn web() -> IpAddr {
    vip_v4(1)
}

struct Cluster {
    // Dropped in order: lbd processes, then the topology.
    n: Vec<Lbd>,
    t: Topology,
}

/// Three nodes, web on backends 0 and 1, each node's `[cluster]` listing the other two
/// (node ids given for one, learnt for the other) and `[bgp]` with no BIRD behind it.
fn three() -> Cluster {
    let t = Topology::new(
        PREFIX,
        TopoSpec {
            lbs: 3,
            backends: 3,
        },
    );
    t.add_vip_to_backends(web());
    t.start_servers(80, ServerMode::Echo);
    // ECMP stand-in: the client's route to the VIPs points at node 1 (set_client_route
    // moves it, as a router does when the next hops change).
    t.set_client_route(0);
    let n: Vec<Lbd> = (0..3)
        .map(|i| Lbd::new(&t, i, &format!("{PREFIX}n{}", i + 1)))
        .collect();
    let addrs = [t.lbs[0].v4, t.lbs[1].v4, t.lbs[2].v4];
    for (i, l) in n.iter().enumerate() {
        let secret = l.dir.join("cluster.key");
        std::fs::write(&secret, SECRET).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let peers: String = (0..3)
            .filter(|&j| j != i)
            .map(|j| {
                // The next node's id is configured, the other one's learnt.
                let id = if j == (i + 1) % 3 {
                    format!("node_id = {}\n", j + 1)
                } else {
                    String::new()
                };
                format!("[[cluster.peers]]\naddress = \"{}:{PORT}\"\n{id}", addrs[j])
            })
            .collect();
        l.write_config(&format!(
            "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n\
             [[service.backend]]\naddress = \"{}\"\n[[service.backend]]\naddress = \"{}\"\n\n\
             [cluster]\nnode_id = {}\nlisten = \"{}:{PORT}\"\nsecret_file = \"{}\"\nheartbeat_ms = 100\ndead_after = 3\n{peers}\n\
             [bgp]\nlocal_as = 65001\nrouter_id = \"{}\"\ncontrol_socket = \"{}\"\nbird_config = \"{}\"\ndrain_ms = 0\n\
             [[bgp.neighbor]]\naddress = \"10.200.0.254\"\nas = 65000\n",
            web(),
            t.backends[0].v4,
            t.backends[1].v4,
            i + 1,
            addrs[i],
            secret.display(),
            addrs[i],
            l.dir.join("no-bird.ctl").display(),
            l.dir.join("bird-vips.conf").display(),
        ));
    }
    Cluster { n, t }
}

fn cluster(l: &Lbd) -> Value {
    l.lbctl_json(&["cluster", "status"])
}

/// Node ids of the peers `l` hears now.
fn alive_peers(l: &Lbd) -> usize {
    cluster(l)["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["alive"] == true).count())
}

fn backends(l: &Lbd) -> Vec<String> {
    let mut v: Vec<String> = l
        .lbctl_json(&["backend", "list", "web"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn wait_all_alive(c: &Cluster, nodes: &[usize], want: usize) {
    for &i in nodes {
        let ok = wait_for(Duration::from_secs(5), || alive_peers(&c.n[i]) == want).is_some();
        assert!(
            ok,
            "node {} hears {want} peers: {}\n{}",
            i + 1,
            cluster(&c.n[i]),
            c.n[i].log()
        );
    }
}

/// `lbctl flow lookup` of a connection on node `l`: (flow-table backend, Maglev pick).
fn lookup(l: &Lbd, conn: &Conn) -> (Option<String>, Option<String>) {
    let v = l.lbctl_json(&[
        "flow",
        "lookup",
        &conn.local.to_string(),
        &format!("{}:80/tcp", web()),
    ]);
    (
        v["flow"]["backend"].as_str().map(String::from),
        v["maglev"]["backend"].as_str().map(String::from),
    )
}

/// The address of the backend that answered `conn` (what every node's entry must hold).
fn answered_by(t: &Topology, conn: &Conn) -> String {
    let b = t.backends.iter().find(|b| b.name == conn.backend);
    b.unwrap_or_else(|| panic!("{} answered from unknown {}", conn.local, conn.backend))
        .v4
        .to_string()
}

/// Whether `l`'s flow table holds `conn` with backend `want` within `max`.
fn holds(l: &Lbd, conn: &Conn, want: &str, max: Duration) -> bool {
    wait_for(max, || lookup(l, conn).0.as_deref() == Some(want)).is_some()
}

#[test]
fn three_nodes_replicate_config_and_flows_to_every_peer_and_catch_up_after_a_restart() {
    let mut c = three();
    for l in &mut c.n {
        l.start();
    }
    wait_all_alive(&c, &[0, 1, 2], 2);
    // No election: every node forwards; no BIRD: each says so and keeps forwarding.
    for (i, l) in c.n.iter().enumerate() {
        let st = cluster(l);
        assert_eq!(
            (st["mode"].as_str(), st["role"].as_str()),
            (Some("active-active"), Some("active")),
            "node {}: {st}",
            i + 1
        );
        let (ok, status, err) = l.lbctl(&["status"]);
        assert!(ok, "{err}");
        assert!(
            status.contains(&format!("node {} active-active", i + 1))
                && status.matches(" alive (last heartbeat").count() == 2,
            "{status}\n{}",
            cluster(l)
        );
        let reported = wait_for(Duration::from_secs(5), || {
            l.lbctl(&["status"]).1.contains("bird         ERROR")
        })
        .is_some();
        assert!(
            reported,
            "BIRD unreachable is reported: {}",
            l.lbctl(&["status"]).1
        );
    }
    let (_, table, _) = c.n[0].lbctl(&["cluster", "status"]);
    assert!(
        table.contains("active-active") && table.matches(" alive ").count() == 2,
        "{table}"
    );

    // Connections through node 1 (flows created there, fanned out to 2 and 3).
    let mut conns: Vec<Conn> = (0..24)
        .map(|i| {
            c.t.connect(web(), 80)
                .unwrap_or_else(|e| panic!("connection {i} through node 1: {e}"))
        })
        .collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.echo(&format!("hello-{i}")).unwrap();
    }
    // A backend-set change on node 1 reaches nodes 2 and 3.
    let be2 = c.t.backends[2].v4.to_string();
    let (ok, _, err) = c.n[0].lbctl(&["backend", "add", "web", &be2]);
    assert!(ok, "{err}");
    let three_backends = {
        let mut v: Vec<String> = c.t.backends.iter().map(|b| b.v4.to_string()).collect();
        v.sort();
        v
    };
    for i in [1, 2] {
        let ok = wait_for(Duration::from_secs(3), || {
            backends(&c.n[i]) == three_backends
        })
        .is_some();
        assert!(
            ok,
            "node {} got node 1's backend add: {:?}\n{}",
            i + 1,
            backends(&c.n[i]),
            c.n[i].log()
        );
    }
    let pos = cluster(&c.n[0])["config"].clone();
    for l in &c.n[1..] {
        assert_eq!(cluster(l)["config"], pos, "same position everywhere");
    }
    // Every flow is in nodes 2's and 3's flow tables with node 1's backend (ids
    // translated by address); some now have another Maglev pick.
    let applied = |l: &Lbd| cluster(l)["flows_applied"].as_u64().unwrap();
    for i in [1, 2] {
        let ok = wait_for(Duration::from_secs(3), || {
            applied(&c.n[i]) >= conns.len() as u64
        })
        .is_some();
        assert!(ok, "node {} applied the flows: {}", i + 1, cluster(&c.n[i]));
    }
    let mut moved = 0;
    for s in &conns {
        let want = answered_by(&c.t, s);
        let (on1, _) = lookup(&c.n[0], s);
        assert_eq!(
            on1.as_deref(),
            Some(want.as_str()),
            "node 1's own entry for {}",
            s.local
        );
        for i in [1, 2] {
            let (flow, maglev) = lookup(&c.n[i], s);
            assert_eq!(
                flow.as_deref(),
                Some(want.as_str()),
                "node {}'s entry for {}",
                i + 1,
                s.local
            );
            moved += (maglev.as_deref() != Some(want.as_str())) as usize;
        }
    }
    assert!(
        moved > 0,
        "the backend add moved some Maglev picks (else this proves nothing)"
    );
    // ECMP moves the flows to node 2: every connection keeps its backend.
    c.t.set_client_route(1);
    for (i, s) in conns.iter_mut().enumerate() {
        s.echo(&format!("via-node-2-{i}")).unwrap_or_else(|e| {
            panic!("connection {i} ({}) after moving to node 2: {e}", s.backend)
        });
    }
    eprintln!(
        "{moved} of {} lookups on nodes 2 and 3 had another Maglev pick; all kept their backend",
        2 * conns.len()
    );

    // Node 3 dies: node 2's change still reaches node 1; node 3 is reported dead.
    c.n[2].kill();
    for i in [0, 1] {
        let ok = wait_for(Duration::from_secs(3), || alive_peers(&c.n[i]) == 1).is_some();
        assert!(ok, "node {} sees node 3 dead: {}", i + 1, cluster(&c.n[i]));
    }
    let (ok, _, err) = c.n[1].lbctl(&["backend", "remove", "web", &be2]);
    assert!(ok, "{err}");
    let two_backends: Vec<String> = three_backends
        .iter()
        .filter(|b| **b != be2)
        .cloned()
        .collect();
    let ok = wait_for(Duration::from_secs(3), || backends(&c.n[0]) == two_backends).is_some();
    assert!(
        ok,
        "node 1 got node 2's change with node 3 down: {:?}",
        backends(&c.n[0])
    );
    // `lbctl status` reads the owner's copy, refreshed every heartbeat interval.
    let dead = wait_for(Duration::from_secs(1), || {
        c.n[1]
            .lbctl(&["status"])
            .1
            .contains("node 3 dead (last heartbeat")
    })
    .is_some();
    assert!(dead, "{}", c.n[1].lbctl(&["status"]).1);
    // Flows keep fanning out to the live peer.
    let mut late =
        c.t.connect(web(), 80)
            .expect("a new connection through node 2");
    late.echo("late").unwrap();
    let want = answered_by(&c.t, &late);
    let ok = holds(&c.n[0], &late, &want, Duration::from_secs(3));
    assert!(
        ok,
        "node 2's new flow reached node 1: {:?}",
        lookup(&c.n[0], &late)
    );

    // Node 3 returns as a replaced node would: its saved (older) config, but no
    // datapath and so an empty flow table (its pins removed). It catches up on the
    // config, then the others send it their flow tables.
    lb_userspace::daemon::detach_offline(&c.n[2].instance).expect("removing node 3's pins");
    c.n[2].start();
    wait_all_alive(&c, &[0, 1, 2], 2);
    let ok = wait_for(Duration::from_secs(5), || backends(&c.n[2]) == two_backends).is_some();
    assert!(
        ok,
        "node 3 caught up: {:?}\n{}",
        backends(&c.n[2]),
        c.n[2].log()
    );
    let pos = cluster(&c.n[1])["config"].clone();
    for l in &c.n {
        assert_eq!(
            cluster(l)["config"],
            pos,
            "same position everywhere after the catch-up"
        );
    }
    let dumped = |l: &Lbd| -> u64 {
        cluster(l)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["flows_dumped"].as_u64())
            .sum()
    };
    for s in &conns {
        let want = answered_by(&c.t, s);
        let ok = holds(&c.n[2], s, &want, Duration::from_secs(5));
        assert!(
            ok,
            "{} in the rejoined node 3's table (dumped by 1: {}, by 2: {}): {:?}",
            s.local,
            dumped(&c.n[0]),
            dumped(&c.n[1]),
            lookup(&c.n[2], s)
        );
    }
    assert!(dumped(&c.n[0]) >= conns.len() as u64 && dumped(&c.n[1]) >= conns.len() as u64);
    // And receives flows again: one more connection through node 2. (Its applied
    // counter also counts the dumps, so the entry itself is what is waited for.)
    let mut again =
        c.t.connect(web(), 80)
            .expect("a connection after node 3 returned");
    again.echo("again").unwrap();
    let want = answered_by(&c.t, &again);
    let ok = holds(&c.n[2], &again, &want, Duration::from_secs(3));
    assert!(
        ok,
        "the new flow reached node 3: {:?}\n{}",
        lookup(&c.n[2], &again),
        cluster(&c.n[2])
    );
    for (i, s) in conns.iter_mut().enumerate() {
        s.echo(&format!("end-{i}"))
            .unwrap_or_else(|e| panic!("connection {i} at the end: {e}"));
    }
}
