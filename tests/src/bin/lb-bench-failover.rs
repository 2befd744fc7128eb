//! `lb-bench-failover`: 20 forced failovers of a two-node lbd cluster in network
//! namespaces (`cargo xtask bench failover`, root). Each round fails the active node
//! the way a machine dies (lbd killed, its link down), then brings it back as backup.
//!
//! Printed per run: the takeover gap (failure to the backup holding the VIPs) and the
//! client's gap (the longest stretch of new connections, started every 10 ms, none
//! of which connected within 200 ms: what users see), p50/p99/max; established
//! connections lost over all rounds (12 long-lived streams echoed after every round).
//! Baseline beside it, measured in the same run with no failure: the same client gap
//! over one quiet second (the probe's resolution). The rounds are
//! `lb_tests::pair::failover_rounds` (shared with `cargo xtask bench scale-out`).

use std::time::Duration;

use lb_tests::lbd::wait_for;
use lb_tests::pair::{failover_rounds, pair, pct, role};

const ROUNDS: usize = 20;
const PROBE_EVERY: Duration = Duration::from_millis(10);

fn main() {
    lb_tests::require_root();
    let mut p = pair("lbbf-", &[0, 1, 2]);
    p.n[0].start();
    p.n[1].start();
    assert!(wait_for(Duration::from_secs(5), || role(&p.n[0]) == "active" && role(&p.n[1]) == "backup").is_some(), "cluster up");
    let mut f = failover_rounds(&mut p, ROUNDS, PROBE_EVERY, 12);
    println!(
        "failover rounds={ROUNDS} heartbeat_ms=100 dead_after=3 takeover_ms p50={:.0} p99={:.0} max={:.0} target_p99_ms=500",
        pct(&mut f.takeover_ms, 0.5),
        pct(&mut f.takeover_ms, 0.99),
        pct(&mut f.takeover_ms, 1.0)
    );
    println!(
        "failover client_gap_ms p50={:.0} p99={:.0} max={:.0} baseline_probe_gap_p99_ms={:.0} (new connection every {} ms)",
        pct(&mut f.client_gap_ms, 0.5),
        pct(&mut f.client_gap_ms, 0.99),
        pct(&mut f.client_gap_ms, 1.0),
        f.baseline_gap_ms,
        PROBE_EVERY.as_millis()
    );
    println!("failover established_streams={} lost={} target_lost=0", f.streams, f.lost);
}
