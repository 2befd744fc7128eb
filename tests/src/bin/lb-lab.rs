//! `lb-lab`: the narrated lab (`cargo xtask lab`, root). See tests/src/lab.rs.
//!
//!     lb-lab up [--once]    build the lab, run the scenario, leave it running (or remove it)
//!     lb-lab down           remove every namespace, link, pin and process of the lab

use std::path::Path;
use std::time::Duration;

use lb_tests::lab::{self, Counts, LAB_DIR, LAB_PREFIX, Lab, app_vip, db_vip, web_vip};

fn ms(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
}

struct Table {
    rows: Vec<[String; 7]>,
}

impl Table {
    fn new() -> Table {
        Table { rows: vec![["step".into(), "sent".into(), "answered".into(), "failed".into(), "web servers".into(), "app servers".into(), "result".into()]] }
    }
    fn row(&mut self, step: &str, c: &Counts, result: String) {
        self.rows.push([
            step.into(),
            c.sent.to_string(),
            c.answered.to_string(),
            c.failed.to_string(),
            Counts::spread(&c.by_web),
            Counts::spread(&c.by_app),
            result,
        ]);
    }
    fn print(&self) {
        let w: Vec<usize> = (0..7).map(|i| self.rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
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

fn main() {
    lb_tests::require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["up"] => up(false),
        ["up", "--once"] | ["--once", "up"] => up(true),
        ["down"] => {
            let did = lab::down(LAB_PREFIX, Path::new(LAB_DIR));
            if did.is_empty() {
                println!("lab: nothing to remove");
            }
            for l in did {
                println!("lab down: {l}");
            }
        }
        _ => {
            eprintln!("usage: lb-lab up [--once] | lb-lab down");
            std::process::exit(2);
        }
    }
}
