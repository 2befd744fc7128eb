//! `cargo xtask bench <what> [args]`: benchmarks that load BPF programs (root).

use std::process::Command;

use anyhow::bail;

use crate::{require_root, run, setup::setup};

pub fn bench(what: &str, args: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    setup()?;
    match what {
        // tests/src/bin/lb-bench.rs; lb-userspace's build.rs builds the objects it embeds.
        "datapath" => run(Command::new("cargo")
            .args(["run", "--release", "--package", "lb-tests", "--bin", "lb-bench", "--", "datapath"])
            .args(args)),
        // tests/src/bin/lb-bench-control.rs drives a real lbd: build lbd and lbctl first.
        "control" => {
            run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--bins"]))?;
            run(Command::new("cargo")
                .args(["run", "--release", "--package", "lb-tests", "--bin", "lb-bench-control", "--"])
                .args(args))
        }
        // tests/src/bin/lb-bench-failover.rs: two real lbd nodes in namespaces.
        "failover" => {
            run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--bins"]))?;
            run(Command::new("cargo")
                .args(["run", "--release", "--package", "lb-tests", "--bin", "lb-bench-failover", "--"])
                .args(args))
        }
        // tests/src/bin/lb-bench-lab.rs: the lab's web tier behind lbd, then HAProxy.
        "lab" => {
            run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--bins"]))?;
            run(Command::new("cargo").args(["build", "--release", "--package", "lb-tests", "--bins"]))?;
            run(Command::new("cargo")
                .args(["run", "--release", "--package", "lb-tests", "--bin", "lb-bench-lab", "--"])
                .args(args))
        }
        other => bail!("unknown bench {other:?} (available: datapath, control, failover, lab)"),
    }
}
