//! `cargo xtask setup`: check each requirement, install only what is missing, say which.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

const APT_PACKAGES: &[&str] = &["llvm-22-dev", "libclang-22-dev", "libpolly-22-dev", "iproute2", "ethtool"];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn apt_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg])).is_some_and(|s| s.contains("install ok installed"))
}

pub fn setup() -> anyhow::Result<()> {
    let mut installed = Vec::new();

    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !apt_installed(p)).collect();
    for p in APT_PACKAGES {
        if !missing.contains(p) {
            println!("setup: {p}: ok (already present)");
        }
    }
    if !missing.is_empty() {
        println!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))?;
        installed.extend(missing.iter().map(|s| s.to_string()));
    }

    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup not found: install Rust with rustup first")?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: nightly toolchain: ok (already present)");
    } else {
        println!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        installed.push("nightly".into());
    }
    let comps = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"])).unwrap_or_default();
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: nightly rust-src: ok (already present)");
    } else {
        println!("setup: installing rust-src for nightly");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        installed.push("rust-src".into());
    }

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if linker.contains(BPF_LINKER_VERSION) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION}: ok (already present)");
    } else {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
        if !output(Command::new("bpf-linker").arg("--version")).unwrap_or_default().contains(BPF_LINKER_VERSION) {
            bail!("bpf-linker installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}: is ~/.cargo/bin on PATH?");
        }
        installed.push("bpf-linker".into());
    }

    if installed.is_empty() {
        println!("setup: everything present, nothing installed");
    } else {
        println!("setup: installed {}", installed.join(", "));
    }
    Ok(())
}
