//! `lb-lab`: the narrated lab (`cargo xtask lab`, root). See tests/src/lab.rs.
//!
//!     lb-lab up [--once]          build the lab, run the scenario, leave it running (or remove it)
//!     lb-lab up --bgp [--once]    the same for the BGP lab (tests/src/lab_bgp.rs)
//!     lb-lab down [--bgp]         remove every namespace, link, pin and process of both labs
//!                                 (--bgp: of the BGP lab only)

use std::path::Path;
use std::time::Duration;

use lb_tests::lab::{self, Counts, LAB_DIR, LAB_PREFIX, Lab, app_vip, db_vip, web_vip};
use lb_tests::lab_bgp::{self, BGP_LAB_DIR, BGP_LAB_PREFIX, LabBgp, spread};

fn ms(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
}

/// A table of steps: sent / answered / failed, which servers answered, optional
/// extra columns (the BGP lab's balancers), the result.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new() -> Table {
        Table::with(&[])
    }
    /// With `extra` columns before "result".
    fn with(extra: &[&str]) -> Table {
        let mut h: Vec<String> = ["step", "sent", "answered", "failed", "web servers", "app servers"].map(String::from).to_vec();
        h.extend(extra.iter().map(|s| s.to_string()));
        h.push("result".into());
        Table { rows: vec![h] }
    }
    fn row(&mut self, step: &str, c: &Counts, result: String) {
        self.row_with(step, c, &[], result);
    }
    fn row_with(&mut self, step: &str, c: &Counts, extra: &[String], result: String) {
        let mut r = vec![
            step.into(),
            c.sent.to_string(),
            c.answered.to_string(),
            c.failed.to_string(),
            Counts::spread(&c.by_web),
            Counts::spread(&c.by_app),
        ];
        r.extend(extra.iter().cloned());
        r.push(result);
        self.rows.push(r);
    }
    fn print(&self) {
        let cols = self.rows[0].len();
        let w: Vec<usize> = (0..cols).map(|i| self.rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
        for (k, r) in self.rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| if (1..=3).contains(&i) { format!("{c:>w$}", w = w[i]) } else { format!("{c:<w$}", w = w[i]) })
                .collect();
            println!("  {}", line.join("  ").trim_end());
            if k == 0 {
                println!("  {}", w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>().join("  "));
            }
        }
        println!();
    }
}

fn visits(c: &Counts) -> String {
    c.visits.map_or("no data".into(), |(a, b)| format!("visit counter {a} → {b}"))
}

fn up(once: bool) {
    let dir = Path::new(LAB_DIR);
    println!("lab: building in namespaces {LAB_PREFIX}* (state in {LAB_DIR})");
    let lab = Lab::up(LAB_PREFIX, dir, &|s| println!("lab: {s}"));
    println!("lab: web VIP {}:80, app VIP {}:8080, db VIP {}:3306\n", web_vip(), app_vip(), db_vip());
    let mut all = Table::new();

    println!("== 1. Requests through the web VIP: client → web VIP → nginx → app VIP → app → db VIP → MariaDB");
    let c1 = lab.visits(50, Duration::ZERO, Duration::from_secs(30));
    let item = lab.get("/app/items/add?name=lab-item").map(|b| b.trim().to_string()).unwrap_or_else(|e| e);
    let items = lab.get("/app/items").map(|b| b.trim().to_string()).unwrap_or_else(|e| e);
    let mut t = Table::new();
    t.row("1 50 × GET /app/visit", &c1, visits(&c1));
    t.print();
    println!("  GET /app/items/add?name=lab-item → {item}\n  GET /app/items → {items}\n");
    all.row("1 requests", &c1, visits(&c1));

    println!("== 2. nginx on web1 stopped during a steady request loop (health: every {} ms, fall {})", lab::HEALTH_INTERVAL_MS, lab::HEALTH_FALL);
    let s2 = lab.step_web_down();
    let r2 = format!(
        "web1 out after {}; last failure {} after the stop (window {} ms); web1 after removal: {}",
        ms(s2.removed_after),
        ms(s2.last_failure_after_stop),
        s2.window.as_millis(),
        s2.web1_after_removal
    );
    let mut t = Table::new();
    t.row("2 web1 stopped", &s2.counts, r2.clone());
    t.print();
    if let Some(e) = &s2.counts.first_error {
        println!("  first failure: {e}\n");
    }
    all.row("2 web1 down", &s2.counts, r2);

    println!("== 3. The active lbd killed (-9) and its link down; the backup takes over");
    let s3 = lab.step_failover();
    let r3 = format!(
        "takeover {}; keep-alive conn (on {}): {}/3 before, {}/3 after{}",
        ms(s3.takeover),
        s3.keepalive_web,
        s3.keepalive_before,
        s3.keepalive_after,
        s3.keepalive_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
    );
    let mut t = Table::new();
    t.row("3 active LB killed", &s3.counts, r3.clone());
    t.print();
    all.row("3 LB failover", &s3.counts, r3);

    println!("== 4. web1's nginx restarted; app3 added with `lbctl backend add app {}`", lab.addr(lab::APP3));
    let s4 = lab.step_add_backend();
    let r4 = format!("web1 back after {}; app3 in the table after {}", ms(s4.web1_back_after), ms(s4.in_table_after));
    let mut t = Table::new();
    t.row("4 web1 back, app3 added", &s4.counts, r4.clone());
    t.print();
    if let Some(e) = &s4.counts.first_error {
        println!("  first failure: {e}\n");
    }
    all.row("4 backend added", &s4.counts, r4);

    let back = lab.restore_failed_node();
    println!("lab: the failed LB node is back as backup after {}\n", ms(back));

    println!("== Summary");
    all.print();

    if once {
        drop(lab);
        println!("lab: removed (--once)");
        return;
    }
    let n = |i: usize| lab.nodes[i].socket().display().to_string();
    let cl = lab.t.client.ns.clone();
    let (n0, n1) = (n(0), n(1));
    lab.keep();
    println!("lab: running. Look around:");
    println!("  target/release/lbctl --socket {} status            # node 1", n0);
    println!("  target/release/lbctl --socket {} status            # node 2", n1);
    println!("  target/release/lbctl --socket {} backend list", n1);
    println!("  nsenter --net=/run/netns/{cl} curl -s http://{}/               # static page from nginx", web_vip());
    println!("  nsenter --net=/run/netns/{cl} curl -s http://{}/app/visit      # web → app → db", web_vip());
    println!("  nsenter --net=/run/netns/{cl} curl -s http://{}/app/items", web_vip());
    println!("  ls {LAB_DIR}   # configs, logs, pid files");
    println!("Remove it: cargo xtask lab down");
}

/// "9/9 kept-alive conns survived"
fn survived(lost: usize, total: usize, err: &Option<String>) -> String {
    format!("{}/{total} kept-alive conns survived{}", total - lost, err.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())
}

fn up_bgp(once: bool) {
    let dir = Path::new(BGP_LAB_DIR);
    println!("lab: building the BGP lab in namespaces {BGP_LAB_PREFIX}* (state in {BGP_LAB_DIR})");
    let lab = LabBgp::up(BGP_LAB_PREFIX, dir, &|s| println!("lab: {s}"));
    println!("lab: web VIP {}:80, app VIP {}:8080, db VIP {}:3306, announced by n1, n2, n3 over BGP", web_vip(), app_vip(), db_vip());
    println!(
        "lab: services in gue mode with second chance on the backends; nginx → app VIP and app → db VIP go through the router too\n"
    );
    let extra = ["balancers (new conns)"];
    let mut all = Table::with(&extra);

    println!("== 1. Requests through the web VIP; the router spreads connections over n1, n2, n3 (ECMP, L4 hash)");
    let s1 = lab.step_spread(60);
    let paths: Vec<String> = s1.paths.iter().map(|i| format!("n{}", i + 1)).collect();
    println!("  router: {}/32 via {} (ECMP, BGP from each node's BIRD)", web_vip(), paths.join(", "));
    let r1 = visits(&s1.counts);
    let mut t = Table::with(&extra);
    t.row_with("1 60 × GET /app/visit", &s1.counts, &[spread(&s1.shares)], r1.clone());
    t.print();
    all.row_with("1 spread", &s1.counts, &[spread(&s1.shares)], r1);

    let mut held = lab.open_keepalives();
    let per: Vec<String> = held.per_node().iter().map(|(n, k)| format!("n{} {k}", n + 1)).collect();
    println!("lab: {} keep-alive connections held open from here on (through {})\n", held.conns.len(), per.join(", "));

    println!(
        "== 2. A node dies (link down, lbd and its BIRD killed -9) under a new visit every 20 ms; BFD {} ms × {}",
        lab_bgp::BFD.interval_ms,
        lab_bgp::BFD.multiplier
    );
    let s2 = lab.step_kill(&mut held);
    let k = s2.node + 1;
    let r2 = format!(
        "n{k} killed: router withdrew it after {}; new conns OK again {} ms after ({} of {} slow: a lost SYN is resent after 1 s); {} ({} via n{k})",
        ms(s2.withdrawn_after),
        s2.outage.as_millis(),
        s2.load.failed.len(),
        s2.load.attempts,
        survived(s2.held_lost, s2.held, &s2.held_error),
        s2.held_via_node
    );
    let mut t = Table::with(&extra);
    t.row_with(&format!("2 n{k} killed"), &s2.counts, &[spread(&s2.shares)], r2.clone());
    t.print();
    if let Some((at, e)) = s2.load.failed.first() {
        println!("  first slow or failed request (at {} ms): {e}\n", at.as_millis());
    }
    all.row_with(&format!("2 n{k} killed"), &s2.counts, &[spread(&s2.shares)], r2);

    let running: Vec<usize> = (0..lab_bgp::NODES).filter(|&i| i != s2.node).collect();
    let drained = running[0];
    let d = drained + 1;
    println!(
        "== 3. app3 added (`lbctl backend add app {}` on every running node), then n{d} drained (`lbctl node drain`, drain_ms {})",
        lab.addr(lab::APP3),
        lab_bgp::DRAIN_MS
    );
    let s3 = lab.step_maintenance(&mut held, &running, drained);
    let r3 = format!(
        "app3 in every table after {}; n{d} withdrawn after {}, forwarded {} packets in the second after drain_ms; second chance: {} packets; {}",
        ms(s3.app3_in_tables_after),
        ms(s3.withdrawn_after),
        s3.drained_packets_after,
        s3.second_chance,
        survived(s3.held_lost, s3.held, &s3.held_error)
    );
    let mut t = Table::with(&extra);
    t.row_with(&format!("3 app3 added, n{d} drained"), &s3.counts, &[spread(&s3.shares)], r3.clone());
    t.print();
    if let Some(e) = &s3.counts.first_error {
        println!("  first failure: {e}\n");
    }
    all.row_with(&format!("3 app3 + n{d} drained"), &s3.counts, &[spread(&s3.shares)], r3);

    println!("== 4. n{k} returns (link up, lbd and BIRD started; app3 in its config) and n{d} undrains (`lbctl node undrain`)");
    let s4 = lab.step_rejoin(&mut held, s2.node, drained, 60);
    let r4 = format!(
        "n{k} running after {} ms, 3 paths again after {}, {}/{} BGP sessions up; second chance: {} packets; {}",
        s4.started_after.as_millis(),
        s4.back_after.as_ref().map_or_else(|e| e.clone(), |d| format!("{} ms", d.as_millis())),
        s4.sessions.0,
        s4.sessions.1,
        s4.second_chance,
        survived(s4.held_lost, s4.held, &s4.held_error)
    );
    let mut t = Table::with(&extra);
    t.row_with(&format!("4 n{k} back, n{d} undrained"), &s4.counts, &[spread(&s4.shares)], r4.clone());
    t.print();
    all.row_with(&format!("4 n{k} back"), &s4.counts, &[spread(&s4.shares)], r4);

    println!("== Summary");
    all.print();

    if once {
        drop(held);
        drop(lab);
        println!("lab: removed (--once)");
        return;
    }
    drop(held);
    let cl = lab.t.client.ns.clone();
    let rt = lab.t.router().ns().to_string();
    let socks: Vec<String> = lab.nodes.iter().map(|n| n.socket().display().to_string()).collect();
    let bird = lab_bgp::bird_socket(&lab.nodes[0]).display().to_string();
    lab.keep();
    println!("lab: running. Look around:");
    for (i, s) in socks.iter().enumerate() {
        println!("  target/release/lbctl --socket {s} status        # n{}", i + 1);
    }
    println!("  target/release/lbctl --socket {} node drain    # and: node undrain", socks[1]);
    println!("  ip -n {rt} route show {}                        # the router's ECMP route", web_vip());
    println!("  birdc -s {BGP_LAB_DIR}/router/bird.ctl show protocols   # the router's BGP sessions");
    println!("  birdc -s {bird} show route             # what n1 announces");
    println!("  nsenter --net=/run/netns/{cl} curl -s http://{}/app/visit      # web → app → db", web_vip());
    println!("  ls {BGP_LAB_DIR}   # configs, logs, pid files");
    println!("Remove it: cargo xtask lab --bgp down (or cargo xtask lab down: both labs)");
}

fn print_down(did: Vec<String>) {
    if did.is_empty() {
        println!("lab: nothing to remove");
    }
    for l in did {
        println!("lab down: {l}");
    }
}

fn main() {
    lb_tests::require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["up"] => up(false),
        ["up", "--once"] | ["--once", "up"] => up(true),
        ["up", "--bgp"] => up_bgp(false),
        ["up", "--bgp", "--once"] | ["up", "--once", "--bgp"] => up_bgp(true),
        ["down"] => {
            let mut did = lab::down(LAB_PREFIX, Path::new(LAB_DIR));
            did.extend(lab_bgp::down(BGP_LAB_PREFIX, Path::new(BGP_LAB_DIR)));
            print_down(did);
        }
        ["down", "--bgp"] => print_down(lab_bgp::down(BGP_LAB_PREFIX, Path::new(BGP_LAB_DIR))),
        _ => {
            eprintln!("usage: lb-lab up [--bgp] [--once] | lb-lab down [--bgp]");
            std::process::exit(2);
        }
    }
}
