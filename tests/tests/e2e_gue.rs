//! GUE forwarding with second chance (issue 15) end to end: real TCP from a client
//! namespace through lbd to backend namespaces whose lb_decap forwards what they
//! cannot accept to the packet's next hop. Root; one test at a time (shared names).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::lbd::{Lbd, wait_for};
use lb_tests::netns::{Conn, ServerMode, TopoSpec, Topology, vip_v4};

/// Every `every`, until `stop`, opens a connection to `vip:80` and reads the
/// backend's greeting: (attempts, failures with their errors).
fn open_every(
    t: &Topology,
    vip: IpAddr,
    every: Duration,
    stop: &AtomicBool,
) -> (usize, Vec<String>) {
    let mut attempts = 0;
    let mut failed = Vec::new();
    let start = Instant::now();
    // Bounded: at most 60 s whatever `stop` does.
    while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
        let tick = start + every * (attempts as u32 + 1);
        attempts += 1;
        let t0 = Instant::now();
        match t.connect(vip, 80) {
            Err(e) => failed.push(format!("attempt {attempts} at {:?}: {e}", start.elapsed())),
            // A SYN retransmitted after 1 s is not a second chance: count it.
            Ok(_) if t0.elapsed() > Duration::from_millis(500) => {
                failed.push(format!("attempt {attempts}: slow, {:?}", t0.elapsed()))
            }
            Ok(_) => {}
        }
        if let Some(d) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    (attempts, failed)
}

fn backend_field(l: &Lbd, service: &str, addr: &str, field: &str) -> serde_json::Value {
    let list = l.lbctl_json(&["backend", "list", service]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .map(|b| b[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

fn all_in_table(l: &Lbd, service: &str) -> bool {
    l.lbctl_json(&["backend", "list", service])
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["in_table"].as_bool() == Some(true))
}

fn decap_count(t: &Topology, i: usize, reason: &str) -> u64 {
    let s = lb_userspace::decap::stats(&t.backends[i].ifname).expect("decap stats");
    s.iter()
        .find(|(n, _)| *n == reason)
        .map_or(0, |(_, c)| c.packets)
}

/// A backend's server stops while a client opens a connection every 20 ms to a gue
/// service and to an ipip service over the same backends: gue loses none (the dead
/// server's decap hands each SYN to the slot's secondary), ipip's losses are counted
/// and printed; the health checks then take the dead backend out of both tables.
#[test]
fn server_stops_gue_fails_no_connection() {
    let t = Topology::new(
        "gu-a",
        TopoSpec {
            lbs: 1,
            backends: 3,
        },
    );
    let (gue, ipip) = (vip_v4(1), vip_v4(2));
    t.add_vip_to_backends(gue);
    t.add_vip_to_backends(ipip);
    t.enable_second_chance();
    t.start_servers(80, ServerMode::Echo);
    let mut l = Lbd::new(&t, 0, "gua");
    let backends: String = (0..3)
        .map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[i].v4))
        .collect();
    let health =
        "health = { kind = \"tcp\", interval_ms = 500, timeout_ms = 200, rise = 1, fall = 3 }\n";
    l.write_config(&format!(
        "[[service]]\nname = \"g\"\nvip = \"{gue}:80/tcp\"\nmode = \"gue\"\ntable_size = 1009\n{health}{backends}\n\
         [[service]]\nname = \"i\"\nvip = \"{ipip}:80/tcp\"\nmode = \"ipip\"\ntable_size = 1009\n{health}{backends}"
    ));
    l.start();
    for s in ["g", "i"] {
        assert!(
            wait_for(Duration::from_secs(15), || all_in_table(&l, s)).is_some(),
            "{s}: every backend in the table:\n{}",
            l.lbctl(&["backend", "list", s]).1
        );
    }
    // Both services reach every backend while all are up.
    for vip in [gue, ipip] {
        let got: std::collections::BTreeSet<String> = (0..30)
            .map(|i| {
                t.connect(vip, 80)
                    .unwrap_or_else(|e| panic!("{vip} warm-up {i}: {e}\n{}", l.log()))
                    .backend
            })
            .collect();
        assert_eq!(got.len(), 3, "{vip}: {got:?}");
    }

    let dead = t.backends[0].v4.to_string();
    let stop = AtomicBool::new(false);
    let every = Duration::from_millis(20);
    let ((g_n, g_failed), (i_n, i_failed), took) = std::thread::scope(|s| {
        let g = s.spawn(|| open_every(&t, gue, every, &stop));
        let i = s.spawn(|| open_every(&t, ipip, every, &stop));
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        t.stop_server(0, 80);
        // Until the checks take be0 out of both tables, then one more second.
        let out = wait_for(Duration::from_secs(10), || {
            ["g", "i"]
                .iter()
                .all(|s| backend_field(&l, s, &dead, "in_table").as_bool() == Some(false))
        });
        let took = t0.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        assert!(
            out.is_some(),
            "health checks took be0 out:\n{}",
            l.lbctl(&["backend", "list"]).1
        );
        (g.join().unwrap(), i.join().unwrap(), took)
    });
    let sc = decap_count(&t, 0, "second_chance_syn");
    println!(
        "server stopped, new connection every 20 ms, dead backend out after {took:?}: gue {} of {g_n} failed, ipip {} of {i_n} failed; be0 second_chance_syn {sc}",
        g_failed.len(),
        i_failed.len()
    );
    assert!(
        g_failed.is_empty(),
        "gue: {} of {g_n} connections failed: {g_failed:#?}",
        g_failed.len()
    );
    assert!(sc > 0, "be0's decap handed SYNs to their next hop");
    assert_eq!(
        decap_count(&t, 0, "second_chance_no_route"),
        0,
        "every second chance had a route"
    );
    for s in ["g", "i"] {
        assert_eq!(
            backend_field(&l, s, &dead, "health").as_str(),
            Some("down"),
            "{s}: be0 is down"
        );
    }
    // And new connections no longer go to be0 at all (out of both tables).
    let before = decap_count(&t, 0, "second_chance_syn");
    for vip in [gue, ipip] {
        for i in 0..20 {
            let c: Conn = t
                .connect(vip, 80)
                .unwrap_or_else(|e| panic!("{vip} after {i}: {e}"));
            assert_ne!(c.backend, "be0");
        }
    }
    assert_eq!(
        decap_count(&t, 0, "second_chance_syn"),
        before,
        "no SYN reaches be0 once it is out"
    );
}

/// A backend removed, then another added, under 30 long-lived connections (flow table
/// on): the removed backend's flows re-steer to the new primary, whose decap hands
/// them to the removed backend (the slot's secondary, kept as a hop during the change
/// window); none breaks.
#[test]
fn remove_then_add_breaks_no_connection() {
    let t = Topology::new(
        "gu-b",
        TopoSpec {
            lbs: 1,
            backends: 4,
        },
    );
    let vip = vip_v4(1);
    t.add_vip_to_backends(vip);
    t.enable_second_chance();
    t.start_servers(80, ServerMode::Echo);
    let mut l = Lbd::new(&t, 0, "gub");
    let backends: String = (0..3)
        .map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[i].v4))
        .collect();
    l.write_config(&format!("[[service]]\nname = \"g\"\nvip = \"{vip}:80/tcp\"\nmode = \"gue\"\ntable_size = 1009\n{backends}"));
    l.start();
    assert!(
        wait_for(Duration::from_secs(15), || all_in_table(&l, "g")).is_some(),
        "{}",
        l.lbctl(&["backend", "list", "g"]).1
    );
    let mut streams: Vec<Conn> = (0..30)
        .map(|i| {
            t.connect(vip, 80)
                .unwrap_or_else(|e| panic!("stream {i}: {e}\n{}", l.log()))
        })
        .collect();
    let on_be1 = streams.iter().filter(|c| c.backend == "be1").count();
    assert!(on_be1 > 0, "streams on the backend to remove");
    let (be1, be3) = (t.backends[1].v4.to_string(), t.backends[3].v4.to_string());
    for args in [
        ["backend", "remove", "g", be1.as_str()],
        ["backend", "add", "g", be3.as_str()],
    ] {
        let (ok, _, err) = l.lbctl(&args);
        assert!(ok, "lbctl {args:?}: {err}");
    }
    assert!(
        wait_for(Duration::from_secs(15), || all_in_table(&l, "g")).is_some(),
        "{}",
        l.lbctl(&["backend", "list", "g"]).1
    );
    let mut broken = Vec::new();
    for round in 0..3 {
        for (i, c) in streams.iter_mut().enumerate() {
            if let Err(e) = c.echo(&format!("round-{round}-{i}")) {
                broken.push(format!("stream {i} on {}: {e}", c.backend));
            }
        }
    }
    let forwarded: u64 = (0..4)
        .map(|i| decap_count(&t, i, "second_chance_not_held"))
        .sum();
    println!(
        "remove then add under 30 connections ({on_be1} on the removed backend): {} broken, {forwarded} packets second-chanced",
        broken.len()
    );
    assert!(broken.is_empty(), "{broken:#?}");
    assert!(
        forwarded > 0,
        "the removed backend's packets came through second chance"
    );
    // New connections: never the removed backend.
    for i in 0..30 {
        let c = t
            .connect(vip, 80)
            .unwrap_or_else(|e| panic!("new {i}: {e}"));
        assert_ne!(c.backend, "be1");
    }
}
