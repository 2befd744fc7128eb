//! `cargo xtask build-ebpf [--release]`: the eBPF objects on their own. lb-userspace's
//! build.rs builds the same objects through aya-build; this mirrors its command and
//! flags so both produce the same object.

use std::path::PathBuf;
use std::process::Command;

use anyhow::ensure;

use crate::{run, workspace_root};

/// The `[[bin]]`s of lb-ebpf, one object each.
pub const OBJECTS: &[&str] = &["lb", "lb-decap", "lb-bench"];

/// Builds the objects and returns their paths.
pub fn build_ebpf(release: bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut c = Command::new("cargo");
    c.args([
        "+nightly",
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    if release {
        c.arg("--release");
    }
    // Same flags as aya-build 0.2.0 (riscv64* arches are reported as plain riscv64 there too).
    let arch = std::env::consts::ARCH;
    let arch = if arch.starts_with("riscv64") { "riscv64" } else { arch };
    let flags = [format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()];
    c.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // Set by an outer cargo; they would pin the stable rustc under `+nightly`.
    c.env_remove("RUSTC").env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(&mut c)?;

    let dir = workspace_root().join("target/bpfel-unknown-none").join(if release { "release" } else { "debug" });
    let paths: Vec<PathBuf> = OBJECTS.iter().map(|o| dir.join(o)).collect();
    for p in &paths {
        ensure!(p.is_file(), "cargo succeeded but {} is missing", p.display());
        println!("built {}", p.display());
    }
    Ok(paths)
}
