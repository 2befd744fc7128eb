//! `lb-bench-failover`: 20 forced failovers of a two-node lbd cluster in network
//! namespaces (`cargo xtask bench failover`, root). Each round fails the active node
//! the way a machine dies (lbd killed, its link down), then brings it back as backup.
//!
//! Printed per run: the takeover gap (failure to the backup holding the VIPs) and the
//! client's gap (the longest stretch of new connections, started every 10 ms, none
//! of which connected within 200 ms: what users see), p50/p99/max; established
//! connections lost over all rounds (12 long-lived streams echoed after every round).
//! Baseline beside it, measured in the same run with no failure: the same client gap
//! over one quiet second (the probe's resolution).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::lbd::{poll_every, wait_for};
use lb_tests::pair::{pair, role, web};

const ROUNDS: usize = 20;
const PROBE_EVERY: Duration = Duration::from_millis(10);

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// From `t0`: the time until the first probe started after `t0` that connected
/// quickly, i.e. how long new connections failed or stalled.
fn client_gap_since(probes: &[(Instant, bool)], t0: Instant) -> f64 {
    let mut started: Vec<&(Instant, bool)> = probes.iter().filter(|(s, _)| *s >= t0).collect();
    started.sort_by_key(|(s, _)| *s);
    let mut gap = 0.0;
    let mut last_ok = t0;
    for (s, ok) in started {
        if *ok {
            gap = f64::max(gap, s.saturating_duration_since(last_ok).as_secs_f64() * 1e3);
            last_ok = *s;
        }
    }
    gap
}

fn main() {
    lb_tests::require_root();
    let mut p = pair("lbbf-", &[0, 1, 2]);
    p.n[0].start();
    p.n[1].start();
    assert!(wait_for(Duration::from_secs(5), || role(&p.n[0]) == "active" && role(&p.n[1]) == "backup").is_some(), "cluster up");

    // Client probes: a new connection started every 10 ms, each on its own thread (a
    // probe caught in the failure waits for its SYN retransmission; the next ones must
    // not wait behind it). Records (start, connected within 200 ms).
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(std::sync::Mutex::new(Vec::<(Instant, bool)>::new()));
    let topo = &p.t;
    let mut streams: Vec<_> = (0..12).map(|i| topo.connect(web(), 80).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect();
    std::thread::scope(|sc| {
        let (stop2, probes2) = (stop.clone(), probes.clone());
        sc.spawn(move || {
            // Bounded by the stop flag; each probe by the harness's connect timeout.
            while !stop2.load(Ordering::Relaxed) {
                let probes3 = probes2.clone();
                sc.spawn(move || {
                    let t0 = Instant::now();
                    let ok = topo.connect(web(), 80).is_ok() && t0.elapsed() < Duration::from_millis(200);
                    probes3.lock().unwrap().push((t0, ok));
                });
                std::thread::sleep(PROBE_EVERY);
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        // Baseline: with no failure, the longest run of probe starts without a quick success.
        let baseline = client_gap_since(&probes.lock().unwrap(), Instant::now() - Duration::from_millis(900));
        let mut takeover = Vec::new();
        let mut client_gap = Vec::new();
        let mut lost = 0usize;
        for round in 0..ROUNDS {
            let active = if role(&p.n[0]) == "active" { 0 } else { 1 };
            let backup = 1 - active;
            let lb = &p.t.lbs[active];
            let t0 = Instant::now();
            p.n[active].kill();
            let _ = std::process::Command::new("ip").args(["-n", &lb.ns, "link", "set", &lb.ifname, "down"]).status();
            // Polled over the socket every 5 ms (not through the lbctl binary: finer).
            let holds = || {
                lb_userspace::daemon::call(&p.n[backup].socket(), &lb_userspace::api::Request::ClusterStatus {})
                    .ok()
                    .and_then(|r| r.data)
                    .is_some_and(|d| d["vips_held"].as_array().is_some_and(|a| !a.is_empty()))
            };
            let took = poll_every(Duration::from_millis(5), Duration::from_secs(5), holds).unwrap_or_else(|| panic!("round {round}: no takeover"));
            takeover.push(took.as_secs_f64() * 1e3);
            if std::env::var_os("LB_BENCH_VERBOSE").is_some() {
                eprintln!("round {round}: node {} failed, takeover {took:?}", active + 1);
            }
            std::thread::sleep(Duration::from_millis(700));
            let gap = client_gap_since(&probes.lock().unwrap(), t0);
            client_gap.push(gap);
            streams.retain_mut(|c| c.echo(&format!("round-{round}")).is_ok() || {
                lost += 1;
                false
            });
            // The failed node comes back and stays backup (preempt off).
            let _ = std::process::Command::new("ip").args(["-n", &lb.ns, "link", "set", &lb.ifname, "up"]).status();
            p.n[active].start();
            assert!(wait_for(Duration::from_secs(5), || role(&p.n[active]) == "backup").is_some(), "round {round}: returning node is backup");
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
        println!(
            "failover rounds={ROUNDS} heartbeat_ms=100 dead_after=3 takeover_ms p50={:.0} p99={:.0} max={:.0} target_p99_ms=500",
            pct(&mut takeover, 0.5),
            pct(&mut takeover, 0.99),
            pct(&mut takeover, 1.0)
        );
        println!(
            "failover client_gap_ms p50={:.0} p99={:.0} max={:.0} baseline_probe_gap_p99_ms={baseline:.0} (new connection every {} ms)",
            pct(&mut client_gap, 0.5),
            pct(&mut client_gap, 0.99),
            pct(&mut client_gap, 1.0),
            PROBE_EVERY.as_millis()
        );
        println!("failover established_streams=12 lost={lost} target_lost=0");
    });
}
