//! `cargo xtask`: setup, build-ebpf, test, bench. Every command prints what it runs.

mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build needs (idempotent; root on Debian).
    Setup,
    /// Build the eBPF objects with nightly + bpf-linker.
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, then every test (datapath tests need root).
    Test {
        /// Extra arguments for the test binaries (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `datapath` (ns/packet beside a trivial XDP program).
    Bench {
        what: String,
        #[arg(last = false, trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command from the workspace root, printing it first; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    println!("$ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads BPF programs and must run as root");
    }
    Ok(())
}

/// The eBPF objects, built as aya-build builds them (same flags), into target/bpfel-unknown-none.
fn build_ebpf(release: bool) -> anyhow::Result<()> {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "build", "--package", "lb-ebpf", "--bins", "--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
    if release {
        c.arg("--release");
    }
    let flags = [format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()];
    c.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    c.env_remove("RUSTC").env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(&mut c)?;
    let dir = workspace_root().join("target/bpfel-unknown-none").join(if release { "release" } else { "debug" });
    for bin in ["lb", "lb-decap", "lb-bench"] {
        println!("built {}", dir.join(bin).display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf { release } => build_ebpf(release),
        Cmd::Test { args } => {
            require_root("cargo xtask test")?;
            setup::setup()?;
            build_ebpf(true)?;
            let mut c = Command::new("cargo");
            c.args(["test", "--release", "--package", "lb-common", "--features", "lb-common/user", "--package", "lb-userspace", "--package", "lb-tests", "--package", "xtask", "--"]);
            c.arg("--test-threads=1").args(args);
            run(&mut c)
        }
        Cmd::Bench { what, args } => {
            require_root("cargo xtask bench")?;
            setup::setup()?;
            match what.as_str() {
                "datapath" => run(Command::new("cargo").args(["run", "--release", "--package", "lb-tests", "--bin", "lb-bench", "--", "datapath"]).args(args)),
                other => bail!("unknown bench {other:?} (available: datapath)"),
            }
        }
    }
}
