//! `lb-bench-backend-down` (`cargo xtask bench backend-down`, root): failed connections
//! per forwarding mode when a backend's server stops (issue 15). One run, one lbd: a
//! service per mode (dsr-l2, ipip, gue) over the same three backends, each on its own
//! VIP, health checks 500 ms × fall 3; a client per service opens a connection every
//! 20 ms while backend 0's server stops, until the checks have taken it out of every
//! table and one second more (`lb_tests::backend_down`, the run of `e2e_gue`'s test
//! (a)). Printed: failed / attempted per mode in one table. `--runs N` repeats it on a
//! fresh topology and prints every run plus the totals.
//!
//! A failure is a connection refused or reset (the SYN reached the dead server), timed
//! out, or slower than 500 ms (a SYN retransmitted after 1 s). In dsr-l2 and ipip mode
//! every new connection Maglev sends to the dead server before the checks notice
//! fails; gue's second chance hands those SYNs to the slot's secondary.

use anyhow::{Context as _, bail, ensure};
use lb_tests::backend_down::{self, Svc};
use lb_tests::lbd::Lbd;
use lb_tests::netns::{TopoSpec, Topology, vip_v4};

fn main() -> anyhow::Result<()> {
    let mut runs = 1usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse().context("--runs N")?,
            other => bail!("unknown argument {other:?} (usage: lb-bench-backend-down [--runs N])"),
        }
    }
    ensure!((1..=20).contains(&runs), "--runs: 1 to 20");
    let svcs: Vec<Svc> = [("d", "dsr-l2"), ("i", "ipip"), ("g", "gue")]
        .iter()
        .enumerate()
        .map(|(n, (name, mode))| Svc {
            name: name.to_string(),
            mode: mode.to_string(),
            vip: vip_v4(n as u8 + 1),
        })
        .collect();
    // (failed, attempted) per mode over all runs.
    let mut totals = vec![(0usize, 0usize); svcs.len()];
    for run in 1..=runs {
        let t = Topology::new(
            "g5x-",
            TopoSpec {
                lbs: 1,
                backends: 3,
            },
        );
        let mut l = Lbd::new(&t, 0, "g5x");
        backend_down::setup(&t, &l, &svcs);
        l.start();
        backend_down::warm_up(&t, &l, &svcs)
            .map_err(anyhow::Error::msg)
            .context("warm-up")?;
        let (out, took) = backend_down::server_stops(&t, &l, &svcs).map_err(anyhow::Error::msg)?;
        let sc = backend_down::decap_count(&t, 0, "second_chance_syn");
        println!(
            "backend-down run {run}/{runs}: be0's server stopped, a new connection every {} ms per mode; health checks (500 ms x fall 3) took be0 out after {:.2} s; be0 second_chance_syn {sc}",
            backend_down::EVERY.as_millis(),
            took.as_secs_f64()
        );
        println!("  {:<8} {:>7} {:>10}", "MODE", "FAILED", "ATTEMPTED");
        for (o, tot) in out.iter().zip(&mut totals) {
            println!("  {:<8} {:>7} {:>10}", o.mode, o.failed.len(), o.attempts);
            tot.0 += o.failed.len();
            tot.1 += o.attempts;
        }
        // The first failures of each mode, to tell refused from timed out.
        for o in &out {
            if let Some(f) = o.failed.first() {
                println!("  {} first failure: {f}", o.mode);
            }
        }
    }
    if runs > 1 {
        println!("backend-down totals over {runs} runs:");
        println!("  {:<8} {:>7} {:>10}", "MODE", "FAILED", "ATTEMPTED");
        for (s, (f, a)) in svcs.iter().zip(&totals) {
            println!("  {:<8} {:>7} {:>10}", s.mode, f, a);
        }
    }
    Ok(())
}
