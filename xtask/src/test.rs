//! `cargo xtask test [-- args]`: the whole suite on a fresh machine: setup, then every
//! test crate with cargo's own output (the build compiles and embeds the eBPF objects).

use std::process::Command;

use crate::{require_root, run, setup::setup};

pub fn test(args: &[String]) -> anyhow::Result<()> {
    // Checked first: setup (apt) and the datapath tests both need it.
    require_root("cargo xtask test")?;
    setup()?;
    // No separate `build_ebpf` step: lb-userspace's build.rs (aya-build) compiles the
    // objects the tests embed, so building them here too would only be done twice.
    // Packages listed because lb-ebpf is not a host crate; lb-common's `user` feature
    // holds the Maglev builder and its tests. One test thread: datapath tests share
    // network namespaces and interface names.
    // The end-to-end tests run the real lbd and lbctl binaries.
    run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--bins"]))?;
    let mut c = Command::new("cargo");
    c.args(["test", "--release"]);
    c.args(["--package", "lb-common", "--features", "lb-common/user"]);
    c.args(["--package", "lb-userspace", "--package", "lb-tests", "--package", "xtask"]);
    // The fuzz targets' saved corpus, replayed on stable through the same functions the
    // libFuzzer binaries call (fuzz/tests/replay.rs): a fixed crash stays fixed.
    c.args(["--package", "lb-fuzz"]);
    c.args(["--", "--test-threads=1"]).args(args);
    run(&mut c)
}
