//! Active-active behind ECMP with the mesh (issue 14): three lbd nodes, each with its
//! own BIRD announcing the VIP to a router BIRD (BGP + BFD 100 ms × 3, `merge paths`),
//! which also form the cluster mesh (`[cluster]` listing the other two). The service
//! runs in `ipip` mode with no second chance on the backends: when ECMP moves a flow to
//! another node after a backend-set change, only flow sync can keep its backend.
//! Root; one test at a time (shared names).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use lb_tests::bgp::{Bfd, BgpLab, forwarded, per_node};
use lb_tests::lbd::{Lbd, wait_for};
use lb_tests::netns::{Conn, ServerMode, TopoSpec, Topology, flow_slot, vip_v4};

const PREFIX: &str = "bma-";
const PORT: u16 = 80;
const MESH_PORT: u16 = 7946;
const TABLE_SIZE: u32 = 1009;
const SECRET: &[u8] = b"the secret of the three BGP mesh nodes\n";
/// Long-lived connections whose Maglev pick changes when be3 is added, and ones whose
/// pick stays. About a quarter of the slots change (3 -> 4 backends).
const CHANGED: usize = 45;
const KEPT: usize = 15;

/// `[[service]]` `g` in ipip mode over backends `0..n` of `t`.
fn service(t: &Topology, vip: IpAddr, n: usize) -> String {
    let backends: String = (0..n)
        .map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[i].v4))
        .collect();
    format!(
        "[[service]]\nname = \"g\"\nvip = \"{}/tcp\"\nmode = \"ipip\"\ntable_size = {TABLE_SIZE}\n{backends}\n",
        SocketAddr::new(vip, PORT)
    )
}

/// `[cluster]` of node `i`: the other two as peers (ids given), heartbeat 100 ms, the
/// shared secret in a 0600 file of its lbd directory.
fn mesh(t: &Topology, lbd: &Lbd, i: usize) -> String {
    let secret = lbd.dir.join("cluster.key");
    std::fs::write(&secret, SECRET).expect("writing the secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let peers: String = (0..t.lbs.len())
        .filter(|&j| j != i)
        .map(|j| {
            format!(
                "[[cluster.peers]]\naddress = \"{}:{MESH_PORT}\"\nnode_id = {}\n",
                t.lbs[j].v4,
                j + 1
            )
        })
        .collect();
    format!(
        "[cluster]\nnode_id = {}\nlisten = \"{}:{MESH_PORT}\"\nsecret_file = \"{}\"\nheartbeat_ms = 100\ndead_after = 3\n{peers}\n",
        i + 1,
        t.lbs[i].v4,
        secret.display()
    )
}

fn alive_peers(l: &Lbd) -> usize {
    l.lbctl_json(&["cluster", "status"])["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["alive"] == true).count())
}

/// Whether `lbctl backend list g` on `l` has `addr` in the Maglev table.
fn has_backend(l: &Lbd, addr: &str) -> bool {
    l.lbctl_json(&["backend", "list", "g"])
        .as_array()
        .is_some_and(|v| {
            v.iter()
                .any(|b| b["address"] == addr && b["in_table"].as_bool() == Some(true))
        })
}

/// `lbctl flow lookup` of connection `c` on `l`: (flow-table backend, Maglev pick).
fn lookup(l: &Lbd, c: &Conn, vip: IpAddr) -> (Option<String>, Option<String>) {
    let v = l.lbctl_json(&[
        "flow",
        "lookup",
        &c.local.to_string(),
        &format!("{}/tcp", SocketAddr::new(vip, PORT)),
    ]);
    (
        v["flow"]["backend"].as_str().map(String::from),
        v["maglev"]["backend"].as_str().map(String::from),
    )
}

/// A backend added with `lbctl` on one node of the mesh reaches the other two; Maglev
/// now picks another backend for some of the long-lived connections, yet every node's
/// flow table holds each with its original backend (flows fanned out at creation,
/// ids translated by address). The node holding most changed-pick connections dies
/// (link down, kill -9 of lbd and BIRD); BFD withdraws it, ECMP moves its connections
/// to the survivors, which send them to their original backends: none breaks (in
/// ipip mode a wrong backend has no socket and answers with a RST). New connections
/// take the new table's pick.
#[test]
fn backend_added_on_one_node_then_node_killed_flow_sync_keeps_moved_flows() {
    let t = Topology::routed(
        PREFIX,
        TopoSpec {
            lbs: 3,
            backends: 4,
        },
    );
    let vip = vip_v4(1);
    t.add_vip_to_backends(vip);
    t.start_servers(PORT, ServerMode::Echo);
    let mut lab = BgpLab::new(&t, PREFIX.trim_end_matches('-'), Bfd::FAST, 500);
    let services = service(&t, vip, 3);
    for (i, n) in lab.nodes.iter().enumerate() {
        n.write_config(&(services.clone() + &mesh(&t, &n.lbd, i)));
    }
    lab.start_nodes(&t, vip, &[0, 1, 2]);
    let meshed = wait_for(Duration::from_secs(10), || {
        lab.nodes.iter().all(|n| alive_peers(&n.lbd) == 2)
    });
    assert!(
        meshed.is_some(),
        "every node hears its two peers\n{}",
        lab.logs()
    );

    // Maglev depends on addresses and weights only (ids are labels): the tables before
    // and after be3 joins.
    let before = t.maglev_table_of_first(3, TABLE_SIZE);
    let after = t.maglev_table_of_first(4, TABLE_SIZE);
    let vip_sa = SocketAddr::new(vip, PORT);
    let slot_of = |p: u16| flow_slot(SocketAddr::new(t.client.addr(false), p), vip_sa, TABLE_SIZE);
    let changed: Vec<u16> = (20000..30000)
        .filter(|&p| before[slot_of(p)] != after[slot_of(p)])
        .take(CHANGED)
        .collect();
    let kept: Vec<u16> = (20000..30000)
        .filter(|&p| before[slot_of(p)] == after[slot_of(p)])
        .take(KEPT)
        .collect();
    assert_eq!((changed.len(), kept.len()), (CHANGED, KEPT));
    let ports: Vec<u16> = changed.iter().chain(&kept).copied().collect();
    let is_changed = |i: usize| i < CHANGED;

    // The long-lived connections, one at a time: the node whose new-flow counter moved
    // is the one ECMP chose (the others get the flow by sync, not as a new flow).
    let new_flows = |lab: &BgpLab| -> Vec<u64> {
        lab.nodes
            .iter()
            .map(|n| forwarded(&n.lbd.instance).new_flows)
            .collect()
    };
    let mut conns = Vec::new();
    let mut via = Vec::new();
    for &p in &ports {
        let n0 = new_flows(&lab);
        let c = t
            .connect_from(p, vip, PORT)
            .unwrap_or_else(|e| panic!("port {p}: {e}\n{}", lab.logs()));
        assert_eq!(
            c.backend,
            format!("be{}", before[slot_of(p)]),
            "port {p}: the predicted backend before the change"
        );
        let n1 = new_flows(&lab);
        let on: Vec<usize> = (0..3).filter(|&i| n1[i] > n0[i]).collect();
        assert_eq!(on.len(), 1, "port {p}: one node took the new flow: {on:?}");
        via.push(on[0]);
        conns.push(c);
    }
    let share = per_node(&via, 3);
    assert!(
        share.iter().all(|&n| n > 0),
        "long-lived connections on every node: {share:?}"
    );
    let changed_on = |n: usize| (0..CHANGED).filter(|&i| via[i] == n).count();
    // The victim holds the most changed-pick connections; the backend is added there,
    // so the survivors have the change only through the mesh.
    let victim = (0..3).max_by_key(|&n| changed_on(n)).unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&n| n != victim).collect();

    // The change on the victim alone reaches the others through the mesh.
    let added = t.backends[3].v4.to_string();
    let t0 = Instant::now();
    lab.lbctl_on(&[victim], &["backend", "add", "g", &added]);
    for (i, n) in lab.nodes.iter().enumerate() {
        assert!(
            wait_for(Duration::from_secs(3), || has_backend(&n.lbd, &added)).is_some(),
            "node {i} has be3 in its table: {}\n{}",
            n.lbd.lbctl_json(&["backend", "list", "g"]),
            n.lbd.log()
        );
    }
    let replicated = t0.elapsed();

    // Every node's flow table holds every connection with its original backend, and
    // every node's own table now picks another backend for the changed ones.
    let mut picks_changed = [0usize; 3];
    for (i, n) in lab.nodes.iter().enumerate() {
        for (k, c) in conns.iter().enumerate() {
            let want = t.backends[t.backend_index(&c.backend).unwrap()]
                .v4
                .to_string();
            let mut got = lookup(&n.lbd, c, vip);
            if got.0.is_none() {
                // A flow just synced may still be on its way.
                wait_for(Duration::from_secs(3), || {
                    got = lookup(&n.lbd, c, vip);
                    got.0.is_some()
                });
            }
            assert_eq!(
                got.0.as_deref(),
                Some(want.as_str()),
                "node {i}'s flow entry for {} (taken by node {})",
                c.local,
                via[k]
            );
            let pick = format!("be{}", after[slot_of(ports[k])]);
            let pick_addr = t.backends[t.backend_index(&pick).unwrap()].v4.to_string();
            assert_eq!(
                got.1.as_deref(),
                Some(pick_addr.as_str()),
                "node {i}'s Maglev pick for {} is the predicted one",
                c.local
            );
            if got.1 != got.0 {
                picks_changed[i] += 1;
            }
        }
    }
    assert_eq!(
        picks_changed, [CHANGED; 3],
        "every node's table picks another backend for exactly the changed connections"
    );
    let victim_changed = changed_on(victim);
    assert!(
        victim_changed >= 5,
        "the victim holds enough changed-pick connections: {victim_changed} of {CHANGED} ({via:?})"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&format!("before-{i}"))
            .unwrap_or_else(|e| panic!("connection {i} before the kill: {e}"));
    }

    // The victim dies; BFD withdraws it.
    lab.die(&t, victim);
    let converged = t.wait_router_lbs(vip, &survivors, Duration::from_secs(10));
    assert!(
        converged.is_some(),
        "router without node {victim}: {:?}\n{}",
        t.router_next_hops(vip),
        lab.logs()
    );
    // Which survivor each connection goes through now: the node whose forwarded-packet
    // counter moves while it alone echoes (a pause lets a delayed ACK land first).
    let packets = |lab: &BgpLab| -> Vec<u64> {
        lab.nodes
            .iter()
            .map(|n| forwarded(&n.lbd.instance).packets)
            .collect()
    };
    let mut broken: Vec<(usize, String)> = Vec::new();
    let mut now: Vec<Option<usize>> = vec![None; ports.len()];
    for round in 0..3 {
        for (i, c) in conns.iter_mut().enumerate() {
            if broken.iter().any(|(b, _)| *b == i) {
                continue;
            }
            std::thread::sleep(Duration::from_millis(if round == 0 { 50 } else { 0 }));
            let p0 = packets(&lab);
            if let Err(e) = c.echo(&format!("after-{round}-{i}")) {
                broken.push((
                    i,
                    format!(
                        "port {} ({}, {} via node {}): {e}",
                        ports[i],
                        c.backend,
                        if is_changed(i) {
                            "pick changed"
                        } else {
                            "pick kept"
                        },
                        via[i]
                    ),
                ));
                continue;
            }
            if round == 0 {
                std::thread::sleep(Duration::from_millis(50));
                let p1 = packets(&lab);
                let on: Vec<usize> = (0..3).filter(|&n| p1[n] > p0[n]).collect();
                assert!(
                    on.len() == 1 && survivors.contains(&on[0]),
                    "port {}: forwarded by {on:?} after the kill",
                    ports[i]
                );
                now[i] = Some(on[0]);
            }
        }
    }
    let moved: Vec<usize> = (0..ports.len())
        .filter(|&i| now[i].is_some_and(|n| n != via[i]))
        .collect();
    let moved_changed = moved.iter().filter(|&&i| is_changed(i)).count();
    // The survivors still hold every connection with its original backend.
    for &s in &survivors {
        for c in &conns {
            let want = t.backends[t.backend_index(&c.backend).unwrap()]
                .v4
                .to_string();
            assert_eq!(
                lookup(&lab.nodes[s].lbd, c, vip).0.as_deref(),
                Some(want.as_str()),
                "survivor {s}'s entry for {} after the kill",
                c.local
            );
        }
    }

    // New connections keep working and take the new table's pick.
    let fresh: Vec<u16> = (40000..40040).collect();
    let mut fresh_bad = Vec::new();
    let mut fresh_be3 = 0;
    for &p in &fresh {
        let want = format!("be{}", after[slot_of(p)]);
        match t.connect_from(p, vip, PORT).and_then(|mut c| {
            c.echo("fresh")?;
            Ok(c.backend)
        }) {
            Ok(b) if b == want => fresh_be3 += usize::from(b == "be3"),
            Ok(b) => fresh_bad.push(format!("port {p}: {b}, predicted {want}")),
            Err(e) => fresh_bad.push(format!("port {p}: {e}")),
        }
    }

    println!(
        "{} long-lived connections ({CHANGED} whose Maglev pick changes when be3 is added), per node {share:?}; \
         be3 added on node {victim} only, on all 3 nodes after {replicated:?}; picks changed per node's lookup {picks_changed:?}, \
         all held by every node with the original backend; node {victim} killed holding {victim_changed} changed-pick \
         connections, router converged {converged:?} after the kill; moved by ECMP: {} ({moved_changed} with a \
         changed pick, {} from the dead node); broken: {}; new connections: {} of {} as predicted ({fresh_be3} on be3)",
        ports.len(),
        moved.len(),
        via.iter().filter(|&&n| n == victim).count(),
        broken.len(),
        fresh.len() - fresh_bad.len(),
        fresh.len()
    );
    assert!(broken.is_empty(), "{broken:#?}\n{}", lab.logs());
    assert!(
        moved_changed >= victim_changed && moved_changed >= 5,
        "changed-pick connections moved by ECMP: {moved_changed}"
    );
    assert!(fresh_bad.is_empty(), "{fresh_bad:#?}");
    assert!(fresh_be3 > 0, "new connections reach the added backend");
}
