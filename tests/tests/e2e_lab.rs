//! The lab's scenario (tests/src/lab.rs, `cargo xtask lab`) as assertions on counts:
//! requests sent, answered, failed, which servers answered, the database's counter.
//! Root; needs nginx, mariadb-server and mariadb-client (`cargo xtask setup`). Its
//! own prefix and state directory, removed on drop (also after a failed assertion).

use std::time::Duration;

use lb_tests::lab::{HEALTH_INTERVAL_MS, Lab};

#[test]
fn lab_scenario_web_app_db_through_the_lbd_pair() {
    let dir = std::env::temp_dir().join(format!("labt-{}", std::process::id()));
    let lab = Lab::up("labt-", &dir, &|s| eprintln!("lab: {s}"));

    // 1. web → app VIP → app → db VIP → MariaDB: every answer carries the web server
    // (nginx's header), the app server and the counter the database returned.
    let c = lab.visits(50, Duration::ZERO, Duration::from_secs(30));
    assert_eq!((c.sent, c.answered, c.failed), (50, 50, 0), "{:?}", c.first_error);
    assert_eq!(c.visits, Some((1, 50)), "one increment per request, in order");
    for w in ["web1", "web2"] {
        assert!(c.by_web.get(w).copied().unwrap_or(0) > 0, "{w} answered: {:?}", c.by_web);
    }
    for a in ["app1", "app2"] {
        assert!(c.by_app.get(a).copied().unwrap_or(0) > 0, "{a} answered: {:?}", c.by_app);
    }
    assert_eq!(lab.db_query("SELECT n FROM visits WHERE id = 1").unwrap().trim(), "50", "the database itself counted 50");
    let added = lab.get("/app/items/add?name=from-the-test").expect("insert through the tiers");
    assert!(added.contains("\"added\":\"from-the-test\""), "{added}");
    let items = lab.get("/app/items").expect("list through the tiers");
    assert!(items.contains("\"from-the-test\""), "{items}");
    assert_eq!(lab.db_query("SELECT COUNT(*) FROM items WHERE name = 'from-the-test'").unwrap().trim(), "1");

    // 2. nginx on web1 stops under a steady loop: failures only within the check window.
    let s = lab.step_web_down();
    let c = &s.counts;
    assert_eq!(c.sent, c.answered + c.failed);
    assert!(c.sent >= 100, "the loop ran: {}", c.sent);
    assert_eq!(s.failed_before_stop, 0, "no failure before the stop: {:?}", c.first_error);
    let removed = s.removed_after.expect("web1 removed by the health checks");
    assert!(removed <= s.window + Duration::from_millis(300), "removed after {removed:?}, window {:?}", s.window);
    if let Some(last) = s.last_failure_after_stop {
        assert!(last <= s.window, "a failure {last:?} after the stop, beyond the window {:?}", s.window);
    }
    assert!(c.failed <= (s.window.as_millis() / 25 + 2) as usize, "{} failures: more than the window allows", c.failed);
    assert_eq!(s.web1_after_removal, 0, "no request reaches web1 once it is out");

    // 3. The active lbd killed and its link down: the backup takes over, the kept-alive
    // connection and new requests keep working.
    let s = lab.step_failover();
    let took = s.takeover.expect("the backup takes over");
    assert!(took < Duration::from_millis(1500), "takeover after {took:?}");
    assert_eq!((s.keepalive_before, s.keepalive_after), (3, 3), "keep-alive connection survives: {:?}", s.keepalive_error);
    assert_eq!(s.failed_after_takeover, 0, "requests succeed after the takeover: {:?}", s.counts.first_error);
    assert!(s.counts.answered * 100 >= s.counts.sent * 95, "answered {}/{}: {:?}", s.counts.answered, s.counts.sent, s.counts.first_error);

    // 4. web1 back by its health checks; app3 added with lbctl takes its share.
    let s = lab.step_add_backend();
    let rise = Duration::from_millis(HEALTH_INTERVAL_MS * (lb_tests::lab::HEALTH_RISE + 1) + 300);
    assert!(s.web1_back_after.is_some_and(|d| d <= rise), "web1 back within rise × interval: {:?}", s.web1_back_after);
    assert!(s.in_table_after.is_some(), "app3 in the table");
    let c = &s.counts;
    // No failure at all: app3 enters its table only once its next hop is known and
    // its first check passed (it used to be in the table a second before its MAC).
    assert_eq!(c.answered + c.failed, c.sent);
    assert_eq!(c.failed, 0, "{:?}", c.first_error);
    let app3 = c.by_app.get("app3").copied().unwrap_or(0);
    assert!(app3 * 10 >= c.sent, "app3 got {app3} of {} (a third expected)", c.sent);
    assert!(c.by_web.get("web1").copied().unwrap_or(0) * 10 >= c.sent, "web1 back in rotation: {:?}", c.by_web);

    assert!(lab.restore_failed_node().is_some(), "the failed node returns as backup");
    // Neither node ever forwarded to a backend without a next hop.
    for n in &lab.nodes {
        let st = n.json(&["stats"]).expect("stats");
        let no_nexthop = st["reasons"].as_array().unwrap().iter().find(|r| r["reason"] == "drop_no_nexthop").unwrap()["packets"].as_u64();
        assert_eq!(no_nexthop, Some(0), "{}: drop_no_nexthop", n.instance);
    }
    drop(lab);
    assert!(!dir.exists(), "state directory removed");
    assert!(!std::path::Path::new("/run/netns/labt-cl").exists(), "namespaces removed");
}
