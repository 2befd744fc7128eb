//! `cargo xtask lab [--bgp] [--once]` / `cargo xtask lab [--bgp] down`: setup (toolchain
//! and the lab's packages), build lbd/lbctl and the lab binaries, then `lb-lab`
//! (tests/src/bin/lb-lab.rs) brings the lab up in network namespaces and narrates the
//! scenario. `--bgp`: the BGP lab (three nodes behind an ECMP router, tests/src/lab_bgp.rs).
//! `down` removes both labs; `--bgp down` the BGP lab only.

use std::process::Command;

use anyhow::bail;

use crate::{require_root, run, setup::setup};

pub fn lab(args: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask lab")?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lb_lab = |a: &[&str]| {
        run(Command::new("cargo").args(["run", "--release", "--quiet", "--package", "lb-tests", "--bin", "lb-lab", "--"]).args(a))
    };
    let bgp = args.contains(&"--bgp");
    let rest: Vec<&str> = args.iter().copied().filter(|a| *a != "--bgp").collect();
    match rest.as_slice() {
        ["down"] => {
            if bgp {
                println!("lab: removing the BGP lab (namespaces, links, pins, processes, state)");
                lb_lab(&["down", "--bgp"])
            } else {
                println!("lab: removing the lab (namespaces, links, pins, processes, state)");
                lb_lab(&["down"])
            }
        }
        [] | ["up"] | ["--once"] | ["up", "--once"] => {
            let once = rest.contains(&"--once");
            println!("lab [1/3]: setup: toolchain, nginx, MariaDB, HAProxy (installs only what is missing)");
            setup()?;
            println!("lab [2/3]: build: lbd, lbctl, lb-lab, lb-lab-app (release; the first build takes minutes)");
            run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--package", "lb-tests", "--bins"]))?;
            println!("lab [3/3]: bring up and run the scenario");
            let mut a = vec!["up"];
            if bgp {
                a.push("--bgp");
            }
            if once {
                a.push("--once");
            }
            lb_lab(&a)
        }
        other => bail!("usage: cargo xtask lab [--bgp] [--once] | cargo xtask lab [--bgp] down (got {other:?})"),
    }
}
