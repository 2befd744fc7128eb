//! `lb-bench-scale-out`: active-active behind ECMP (issue 14), `cargo xtask bench
//! scale-out` (root). Topology: `Topology::routed` (client behind a router whose BIRD
//! has BGP + BFD 100 ms × 3 to three lbd nodes, each with its own BIRD; ECMP with the
//! L4 hash), 3 backends, one gue service (`bgp::gue_lab`).
//!
//! Printed:
//! - node deaths (`KILLS`, the three nodes in turn, each revived before the next
//!   round): a node dies as a machine does (link down, then kill -9 of lbd and BIRD).
//!   Router convergence (kill → route without the node); the new-connection gap (kill
//!   → the first good request after the last failed one; a request every 10 ms, good
//!   when done within 500 ms: a lost SYN is retransmitted after 1 s); failed requests
//!   per kill; the longest stretch without a good request (the failover bench's client
//!   gap); established connections lost per kill (30 long-lived, echoed every 50 ms
//!   through the kill and the node's return; lost ones are replaced); rejoin time.
//! - drains (`DRAINS`, `lbctl node drain` then undrain, nodes in turn, drain_ms 1000):
//!   the time from the command until the router's route lacks the node and until the
//!   node's last forwarded packet; failed requests.
//! - beside it, the two-node active/backup pair on the same routed topology (the
//!   router reaches the VIPs on-link): `pair::failover_rounds`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::bgp::{
    Attempt, LAB_PORT, LoadReport, echo_all, echo_load, gue_lab, lab_vip6, new_conn_load,
    watch_leave,
};
use lb_tests::lbd::wait_for;
use lb_tests::netns::Conn;
use lb_tests::pair::{failover_rounds, pair_routed, pct, role};

const KILLS: usize = 12;
const DRAINS: usize = 6;
const FAILOVERS: usize = 10;
const EVERY: Duration = Duration::from_millis(10);
const SLOW: Duration = Duration::from_millis(500);
const LONG_LIVED: usize = 30;
const DRAIN_MS: u32 = 1000;
/// After a kill, the load goes on this long before the round's figures are taken.
const KILL_WINDOW: Duration = Duration::from_millis(1500);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(v: &[f64]) -> String {
    let mut v = v.to_vec();
    format!(
        "p50={:.0} p99={:.0} max={:.0}",
        pct(&mut v, 0.5),
        pct(&mut v, 0.99),
        pct(&mut v, 1.0)
    )
}

/// Attempts that started in `[from, to)`.
fn window(all: &[Attempt], from: Duration, to: Duration) -> Vec<Attempt> {
    all.iter()
        .filter(|a| a.at >= from && a.at < to)
        .cloned()
        .collect()
}

/// The failover bench's client gap over `w` from `from`: the longest stretch of
/// attempt starts without a good one (ms).
fn longest_without_good(w: &[Attempt], from: Duration) -> f64 {
    let mut good: Vec<Duration> = w
        .iter()
        .filter(|a| matches!(a.result, Ok(d) if d <= SLOW))
        .map(|a| a.at)
        .collect();
    good.sort();
    let mut last = from;
    let mut gap = Duration::ZERO;
    for g in good {
        gap = gap.max(g.saturating_sub(last));
        last = g;
    }
    ms(gap)
}

/// Tops `conns` up to `LONG_LIVED`.
fn refill(t: &lb_tests::netns::Topology, vip: std::net::IpAddr, conns: &mut Vec<Conn>) {
    while conns.len() < LONG_LIVED {
        conns.push(t.connect(vip, LAB_PORT).expect("a long-lived connection"));
    }
}

fn main() {
    lb_tests::require_root();
    let (t, mut lab, vip) = gue_lab("bgx-", 3, 3, 3, DRAIN_MS);
    let up = lab.start_nodes(&t, vip, &[0, 1, 2]);
    eprintln!("3 nodes announced in {up:?}");
    let mut conns = Vec::new();
    refill(&t, vip, &mut conns);

    let origin = Instant::now();
    let stop = AtomicBool::new(false);
    let mut converged = Vec::new();
    let mut rejoin = Vec::new();
    let mut lost = Vec::new();
    let mut kills_at = Vec::new();
    let mut drains: Vec<(Duration, Duration, Option<Duration>)> = Vec::new();
    let attempts = std::thread::scope(|s| {
        let load = s.spawn(|| {
            new_conn_load(
                &t,
                vip,
                LAB_PORT,
                EVERY,
                &stop,
                Duration::from_secs(900),
                origin,
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        for round in 0..KILLS {
            let victim = round % 3;
            let others: Vec<usize> = (0..3).filter(|&n| n != victim).collect();
            let echo_stop = AtomicBool::new(false);
            let (mut broken, conv) = std::thread::scope(|s2| {
                let echo = s2.spawn(|| {
                    echo_load(
                        &mut conns,
                        Duration::from_millis(50),
                        &echo_stop,
                        Duration::from_secs(60),
                    )
                    .0
                });
                std::thread::sleep(Duration::from_millis(300));
                let at = origin.elapsed();
                let t0 = Instant::now();
                lab.die(&t, victim);
                kills_at.push(at);
                let conv = t
                    .wait_router_lbs(vip, &others, Duration::from_secs(5))
                    .map(|_| t0.elapsed());
                std::thread::sleep(KILL_WINDOW.saturating_sub(t0.elapsed()));
                // The node returns while the long-lived connections go on.
                let t1 = Instant::now();
                lab.revive(&t, victim);
                let back = t.wait_router_lbs(vip, &[0, 1, 2], Duration::from_secs(30));
                assert!(
                    back.is_some(),
                    "round {round}: node {victim} back in the route\n{}",
                    lab.logs()
                );
                rejoin.push(ms(t1.elapsed()));
                // Its IPv6 session comes back too (the address survives the link flap).
                assert!(
                    t.wait_router_lbs(lab_vip6(), &[0, 1, 2], Duration::from_secs(30))
                        .is_some(),
                    "round {round}: node {victim} back in the IPv6 route: {:?}\n{}",
                    t.router_next_hops(lab_vip6()),
                    lab.logs()
                );
                std::thread::sleep(Duration::from_millis(500));
                echo_stop.store(true, Ordering::SeqCst);
                (echo.join().unwrap(), conv)
            });
            let conv = conv.unwrap_or_else(|| {
                panic!("round {round}: router kept node {victim}\n{}", lab.logs())
            });
            converged.push(ms(conv));
            for (i, _) in echo_all(&mut conns, "after") {
                if !broken.iter().any(|(b, _)| *b == i) {
                    broken.push((i, String::new()));
                }
            }
            lost.push(broken.len() as f64);
            let mut i = 0;
            conns.retain(|_| {
                i += 1;
                !broken.iter().any(|(b, _)| *b == i - 1)
            });
            refill(&t, vip, &mut conns);
            if std::env::var_os("LB_BENCH_VERBOSE").is_some() {
                eprintln!(
                    "kill {round}: node {victim}, route converged {conv:?}, lost {}",
                    broken.len()
                );
            }
        }
        // Drains, with the long-lived connections echoing.
        let echo_stop = AtomicBool::new(false);
        std::thread::scope(|s2| {
            let echo = s2.spawn(|| {
                echo_load(
                    &mut conns,
                    Duration::from_millis(50),
                    &echo_stop,
                    Duration::from_secs(300),
                )
            });
            for round in 0..DRAINS {
                let node = round % 3;
                let others: Vec<usize> = (0..3).filter(|&n| n != node).collect();
                let before = lab.nodes[node].forwarded().packets;
                let at = origin.elapsed();
                let t0 = Instant::now();
                let (ok, _, err) = lab.nodes[node].lbd.lbctl(&["node", "drain"]);
                assert!(ok, "lbctl node drain: {err}");
                let l = watch_leave(
                    &t,
                    &lab,
                    node,
                    vip,
                    &others,
                    t0,
                    before,
                    Duration::from_millis(u64::from(DRAIN_MS) + 1000),
                );
                let withdrawn = l
                    .converged
                    .unwrap_or_else(|| panic!("drain {round}: router kept node {node}"));
                drains.push((at, withdrawn, l.last_packet));
                let (ok, _, err) = lab.nodes[node].lbd.lbctl(&["node", "undrain"]);
                assert!(ok, "lbctl node undrain: {err}");
                assert!(
                    t.wait_router_lbs(vip, &[0, 1, 2], Duration::from_secs(30))
                        .is_some(),
                    "drain {round}: undrained"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            echo_stop.store(true, Ordering::SeqCst);
            let (broken, _) = echo.join().unwrap();
            assert!(
                broken.is_empty(),
                "long-lived connections lost during drains: {broken:?}"
            );
        });
        stop.store(true, Ordering::SeqCst);
        load.join().unwrap()
    });

    let mut gaps = Vec::new();
    let mut failed = Vec::new();
    let mut client_gap = Vec::new();
    let mut per_window = Vec::new();
    for &k in &kills_at {
        let w = window(&attempts, k, k + KILL_WINDOW);
        per_window.push(w.len() as f64);
        let r = LoadReport::from_attempts(w.clone(), SLOW);
        gaps.push(ms(r.outage_since(k)));
        failed.push(r.failed.len() as f64);
        client_gap.push(longest_without_good(&w, k));
    }
    let in_kill_windows = |a: &Attempt| {
        kills_at
            .iter()
            .any(|&k| a.at >= k && a.at < k + KILL_WINDOW)
    };
    let other: Vec<Attempt> = attempts
        .iter()
        .filter(|a| !in_kill_windows(a))
        .cloned()
        .collect();
    let other_failed = LoadReport::from_attempts(other.clone(), SLOW).failed.len();
    let drain_failed = drains
        .iter()
        .map(|&(at, _, _)| {
            LoadReport::from_attempts(
                window(
                    &attempts,
                    at,
                    at + Duration::from_millis(u64::from(DRAIN_MS) + 1000),
                ),
                SLOW,
            )
            .failed
            .len()
        })
        .sum::<usize>();
    println!(
        "scale-out nodes=3 kills={KILLS} bfd=100msx3 route_converged_ms {} (kill: link down, then kill -9 of lbd and BIRD)",
        stats(&converged)
    );
    println!(
        "scale-out new_conn_gap_ms {} target_p99_ms=1000 (request every {} ms; kill -> first good request after the last failed one)",
        stats(&gaps),
        EVERY.as_millis()
    );
    println!(
        "scale-out failed_new_conns_per_kill {} of ~{:.0} in {} ms; client_gap_ms {} (longest stretch without a good request, as the failover bench measures)",
        stats(&failed),
        pct(&mut per_window, 0.5),
        KILL_WINDOW.as_millis(),
        stats(&client_gap)
    );
    println!(
        "scale-out established={LONG_LIVED} lost_per_kill {} total={} target=0 (through the kill and the node's return); rejoin_ms {}",
        stats(&lost),
        lost.iter().sum::<f64>(),
        stats(&rejoin)
    );
    let withdrawn: Vec<f64> = drains.iter().map(|d| ms(d.1)).collect();
    let last: Vec<f64> = drains.iter().map(|d| d.2.map_or(0.0, ms)).collect();
    println!(
        "scale-out drains={DRAINS} drain_ms={DRAIN_MS} route_withdrawn_ms {} last_packet_ms {} failed_requests={drain_failed}",
        stats(&withdrawn),
        stats(&last)
    );
    println!(
        "scale-out requests={} failed_outside_kill_windows={other_failed} (drains, returns)",
        attempts.len()
    );
    drop(conns);
    drop(lab);
    drop(t);

    // Beside it: two-node active/backup on the same routed topology.
    let mut p = pair_routed("bgx-", &[0, 1, 2]);
    p.n[0].start();
    p.n[1].start();
    assert!(
        wait_for(Duration::from_secs(5), || role(&p.n[0]) == "active"
            && role(&p.n[1]) == "backup")
        .is_some(),
        "cluster up"
    );
    let f = failover_rounds(&mut p, FAILOVERS, EVERY, 12);
    println!(
        "active-backup (same routed topology, 2 nodes) rounds={FAILOVERS} heartbeat_ms=100 dead_after=3 takeover_ms {}",
        stats(&f.takeover_ms)
    );
    println!(
        "active-backup client_gap_ms {} baseline_probe_gap_ms={:.0} (new connection every {} ms); established_streams={} lost={}",
        stats(&f.client_gap_ms),
        f.baseline_gap_ms,
        EVERY.as_millis(),
        f.streams,
        f.lost
    );
}
