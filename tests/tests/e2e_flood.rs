//! Two lbd nodes under a flood of new flows (root; the scenario is `lb_tests::flood`):
//! 64 services, 4,032 backends, 40k spoofed new flows/s (SYN + ACK) for 10 s to one
//! VIP. The control path must not notice: no role change, no heartbeat gap beyond
//! dead_after, `lbctl status` answers within 100 ms throughout, and the backup
//! applies the flows it is sent or counts what it drops. Prefix `rtf-`.

use std::time::Duration;

use lb_tests::flood::{self, n};

const RATE: u64 = 40_000;
const SECS: u64 = 10;

#[test]
fn a_syn_flood_does_not_reach_the_control_path() {
    let r = flood::run("rtf-", RATE, SECS);
    let (a, b) = (&r.after[0], &r.after[1]);
    let received = r.received();
    eprintln!(
        "flood: {} flows (SYN + ACK) in {SECS} s, {} new flows on the active; status polls {}, slowest {:?}; \
         active: queued {} sent {} dropped(queue) {} lost(datapath) {}, heartbeat interval p99 {:.1} ms max {:.1} ms; \
         backup: applied {} dropped(apply queue) {} unknown {} / received {received}; peer gap max {} / {} ms",
        r.sent,
        r.new_flows,
        r.polls,
        r.slowest,
        n(a, "flows_queued"),
        n(a, "flows_sent"),
        n(a, "flows_dropped_queue_full"),
        n(a, "flows_lost_in_datapath"),
        a["heartbeat_interval_p99_ms"].as_f64().unwrap(),
        a["heartbeat_interval_max_ms"].as_f64().unwrap(),
        n(b, "flows_applied"),
        n(b, "flows_dropped_apply_queue"),
        n(b, "flows_unknown_vip") + n(b, "flows_unknown_backend"),
        n(b, "peer_gap_max_ms"),
        n(a, "peer_gap_max_ms"),
    );
    assert!(r.sent >= RATE * SECS * 95 / 100, "the flood ran at its rate: {}", r.sent);
    for i in 0..2 {
        let (before, after) = (&r.before[i], &r.after[i]);
        assert_eq!(n(after, "role_changes"), n(before, "role_changes"), "no role change on node {}: {after}", i + 1);
        assert!(n(after, "peer_gap_max_ms") < 300, "no heartbeat gap beyond dead_after on node {}: {after}", i + 1);
    }
    assert_eq!(r.roles_after, ["active", "backup"]);
    assert!(r.slowest < Duration::from_millis(100), "lbctl status took {:?}", r.slowest);
    // Every flow recorded saw its second packet, so each was reported: queued, or
    // counted as dropped by the queue or lost in the datapath's ring.
    assert_eq!(
        n(a, "flows_queued") + n(a, "flows_dropped_queue_full") + n(a, "flows_lost_in_datapath"),
        r.new_flows,
        "every recorded flow was reported: {a}"
    );
    assert_eq!(n(a, "flows_queued"), n(a, "flows_sent"), "the queue drained: {a}");
    // Every flow sent is applied or counted by the backup (nothing lost without a count).
    assert_eq!(received, n(a, "flows_sent"), "the backup applied or counted every flow sent: {b}");
}
