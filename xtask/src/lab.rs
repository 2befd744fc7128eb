//! `cargo xtask lab [--once]` / `cargo xtask lab down`: setup (toolchain and the lab's
//! packages), build lbd/lbctl and the lab binaries, then `lb-lab` (tests/src/bin/lb-lab.rs)
//! brings the lab up in network namespaces and narrates the scenario.

use std::process::Command;

use anyhow::bail;

use crate::{require_root, run, setup::setup};

pub fn lab(args: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask lab")?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lb_lab = |a: &[&str]| {
        run(Command::new("cargo").args(["run", "--release", "--quiet", "--package", "lb-tests", "--bin", "lb-lab", "--"]).args(a))
    };
    match args.as_slice() {
        ["down"] => {
            println!("lab: removing the lab (namespaces, links, pins, processes, state)");
            lb_lab(&["down"])
        }
        [] | ["up"] | ["--once"] | ["up", "--once"] => {
            let once = args.contains(&"--once");
            println!("lab [1/3]: setup: toolchain, nginx, MariaDB, HAProxy (installs only what is missing)");
            setup()?;
            println!("lab [2/3]: build: lbd, lbctl, lb-lab, lb-lab-app (release; the first build takes minutes)");
            run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--package", "lb-tests", "--bins"]))?;
            println!("lab [3/3]: bring up and run the scenario");
            lb_lab(if once { &["up", "--once"] } else { &["up"] })
        }
        other => bail!("usage: cargo xtask lab [--once] | cargo xtask lab down (got {other:?})"),
    }
}
