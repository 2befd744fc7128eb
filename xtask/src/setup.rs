//! `cargo xtask setup`: check each requirement, install only what is missing, one line
//! per item, so a second run takes seconds and installs nothing. Debian 12, as root.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{probe, require_root, run};

/// LLVM 22 dev libraries for building bpf-linker; iproute2/ethtool for the datapath tests;
/// nginx, MariaDB (server and client) and HAProxy for the lab (`cargo xtask lab`, its
/// end-to-end test, and the HAProxy comparison); Prometheus, curl and systemd
/// (systemd-analyze) for the operators' tests (tests/tests/e2e_ops.rs).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "ethtool",
    "nginx",
    "mariadb-server",
    "mariadb-client",
    "haproxy",
    "prometheus",
    "curl",
    "systemd",
    // BIRD 2: the BGP speaker lbd drives in active-active mode ([bgp]).
    "bird2",
];
/// Tells invoke-rc.d not to start services: the lab runs nginx/MariaDB/HAProxy (and the
/// tests Prometheus) only
/// inside its namespaces, never as the distribution's services on this machine.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// What we install; any installed 0.13 or later is accepted.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_MIN: (u64, u64) = (0, 13);
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn setup() -> anyhow::Result<()> {
    let mut installed: Vec<String> = Vec::new();

    // apt: one `apt-get update` and one install for everything missing.
    let mut missing = Vec::new();
    for &p in APT_PACKAGES {
        if apt_installed(p)? {
            println!("setup: {p}: ok (already present)");
        } else {
            println!("setup: {p}: installing ...");
            missing.push(p);
        }
    }
    if !missing.is_empty() {
        require_root("apt-get install")?;
        run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        // A temporary policy-rc.d (exit 101: "not allowed") unless one exists already.
        let ours = !std::path::Path::new(POLICY_RC_D).exists();
        if ours {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(POLICY_RC_D, "#!/bin/sh\n# cargo xtask setup: no service starts during install\nexit 101\n")?;
            std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        }
        let r = run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if ours {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
        r?;
        installed.extend(missing.iter().map(|s| s.to_string()));
    }

    // Nightly (build-std for the BPF target) and its rust-src.
    let toolchains = probe(Command::new("rustup").args(["toolchain", "list"]))?
        .context("`rustup toolchain list` failed: install Rust with rustup first (https://rustup.rs)")?;
    if toolchains.lines().any(is_plain_nightly) {
        println!("setup: nightly toolchain: ok (already present)");
    } else {
        println!("setup: nightly toolchain: installing ...");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        installed.push("nightly".into());
    }
    let comps = probe(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?
        .context("`rustup component list --toolchain nightly --installed` failed")?;
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src (nightly): ok (already present)");
    } else {
        println!("setup: rust-src (nightly): installing ...");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        installed.push("rust-src".into());
    }

    // bpf-linker, built against the system LLVM 22 installed above.
    match bpf_linker_version()? {
        Some((v, s)) if v >= BPF_LINKER_MIN => println!("setup: bpf-linker {s}: ok (already present)"),
        found => {
            let why = found.map_or("absent".to_string(), |(_, s)| format!("{s} is older than 0.13"));
            println!("setup: bpf-linker ({why}): installing {BPF_LINKER_VERSION} against LLVM 22 (a few minutes) ...");
            run(Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22", "--force"])
                .env("LLVM_PREFIX", LLVM_PREFIX))?;
            if bpf_linker_version()?.is_none_or(|(v, _)| v < BPF_LINKER_MIN) {
                bail!(
                    "bpf-linker installed but `bpf-linker --version` does not report 0.13 or later: is ~/.cargo/bin on PATH?"
                );
            }
            installed.push("bpf-linker".into());
        }
    }

    // cargo-fuzz for `cargo xtask fuzz` (libFuzzer targets on nightly).
    if probe(Command::new("cargo").args(["fuzz", "--version"]))?.is_some() {
        println!("setup: cargo-fuzz: ok (already present)");
    } else {
        println!("setup: cargo-fuzz: installing {CARGO_FUZZ_VERSION} ...");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
        installed.push("cargo-fuzz".into());
    }

    if installed.is_empty() {
        println!("setup: done, everything already present, nothing installed");
    } else {
        println!("setup: done, installed {}", installed.join(", "));
    }
    Ok(())
}

fn apt_installed(pkg: &str) -> anyhow::Result<bool> {
    // dpkg-query exits non-zero for a package it has never heard of: that is "not installed".
    Ok(probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))?
        .is_some_and(|s| s.contains("install ok installed")))
}

/// `nightly-<host>` but not a dated `nightly-2026-05-19-<host>`, which `--toolchain nightly`
/// would not select.
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or("");
    name == "nightly"
        || name.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// (major, minor) and the version string from `bpf-linker --version` ("bpf-linker 0.13.0");
/// None when absent or unparsable (then it is reinstalled).
fn bpf_linker_version() -> anyhow::Result<Option<((u64, u64), String)>> {
    let Some(out) = probe(Command::new("bpf-linker").arg("--version"))? else { return Ok(None) };
    let Some(v) = out.split_whitespace().nth(1) else { return Ok(None) };
    let mut it = v.split('.').map(|n| n.parse::<u64>().ok());
    Ok(match (it.next().flatten(), it.next().flatten()) {
        (Some(major), Some(minor)) => Some(((major, minor), v.to_string())),
        _ => None,
    })
}
