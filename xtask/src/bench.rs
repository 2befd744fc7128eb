//! `cargo xtask bench <what> [args]`: benchmarks that load BPF programs (root).

use std::process::Command;

use anyhow::bail;

use crate::{require_root, run, setup::setup};

pub fn bench(what: &str, args: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    setup()?;
    match what {
        // tests/src/bin/lb-bench.rs; lb-userspace's build.rs builds the objects it embeds.
        "datapath" => run_bin("lb-bench", &["datapath"], args),
        // lb_decap with second chance against plain IPIP decapsulation (issue 15).
        "decap" => run_bin("lb-bench", &["decap"], args),
        // The others drive real lbd/lbctl processes: build those binaries first.
        "control" => {
            build_bins(&["lb-userspace"])?;
            run_bin("lb-bench-control", &[], args)
        }
        "failover" => {
            build_bins(&["lb-userspace"])?;
            run_bin("lb-bench-failover", &[], args)
        }
        // Failed connections per mode (dsr-l2, ipip, gue) when a backend's server stops.
        "backend-down" => {
            build_bins(&["lb-userspace"])?;
            run_bin("lb-bench-backend-down", &[], args)
        }
        // Three lbd nodes, each with its own BIRD, behind a router's BIRD (bird2 comes
        // with setup); beside it the active/backup pair on the same topology.
        "scale-out" => {
            build_bins(&["lb-userspace"])?;
            run_bin("lb-bench-scale-out", &[], args)
        }
        // The lab also runs the lab's app server binary.
        "lab" => {
            build_bins(&["lb-userspace", "lb-tests"])?;
            run_bin("lb-bench-lab", &[], args)
        }
        other => bail!("unknown bench {other:?} (available: datapath, decap, control, failover, backend-down, scale-out, lab)"),
    }
}

fn build_bins(packages: &[&str]) -> anyhow::Result<()> {
    for p in packages {
        run(Command::new("cargo").args(["build", "--release", "--package", p, "--bins"]))?;
    }
    Ok(())
}

/// `cargo run` of a benchmark binary of tests/ (tests/src/bin/<bin>.rs).
fn run_bin(bin: &str, first: &[&str], args: &[String]) -> anyhow::Result<()> {
    run(Command::new("cargo").args(["run", "--release", "--package", "lb-tests", "--bin", bin, "--"]).args(first).args(args))
}
