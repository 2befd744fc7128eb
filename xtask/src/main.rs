//! `cargo xtask`: setup, build-ebpf, test, lab, bench. Every command prints what it runs
//! (`$ ...`) before running it, so a CI log shows exactly what happened.

mod bench;
mod build_ebpf;
mod dist;
mod fuzz;
mod lab;
mod setup;
mod test;

use std::ffi::OsStr;
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
    /// Install everything the build needs (idempotent; root on Debian 12).
    Setup,
    /// Build the eBPF objects with nightly + bpf-linker into target/bpfel-unknown-none.
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build the eBPF objects, then every test (datapath tests need root).
    Test {
        /// Extra arguments for the test binaries (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The lab: web/app/db tiers behind an lbd pair in network namespaces, with a narrated
    /// scenario; stays up (`--once`: removed at the end). `lab down` removes it. `--bgp`:
    /// behind three lbd nodes announcing over BGP to an ECMP router (`--bgp down`).
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package target/dist/lb_VERSION_ARCH.deb: lbd, lbctl, systemd
    /// units, man pages, completions, examples (installs without a Rust toolchain).
    ///
    /// Example: `cargo xtask dist && dpkg -i target/dist/lb_*.deb`
    Dist,
    /// Coverage-guided fuzzing (cargo-fuzz, nightly) of the config parser, the API
    /// request decoder, the peer wire decoder and the flow-event parser.
    ///
    /// Example: `cargo xtask fuzz --secs 600 --parallel 2 --save peer_wire`
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Targets run at once (each takes one core).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Minimize the grown corpus and write it back to fuzz/corpus/ (to commit).
        #[arg(long)]
        save: bool,
        /// Targets to run (all if none): config, api_request, peer_wire, flow_event.
        targets: Vec<String>,
    },
    /// Benchmarks: `datapath` (ns/packet beside a trivial XDP program).
    Bench {
        what: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf { release } => build_ebpf::build_ebpf(release).map(drop),
        Cmd::Test { args } => test::test(&args),
        Cmd::Lab { args } => lab::lab(&args),
        Cmd::Bench { what, args } => bench::bench(&what, &args),
        Cmd::Dist => dist::dist().map(drop),
        Cmd::Fuzz { secs, parallel, save, targets } => fuzz::fuzz(secs, parallel, save, &targets),
    }
}

/// The workspace root: every cargo command runs from here whatever the caller's cwd.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command from the workspace root with inherited stdio, printing it first;
/// a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    println!("$ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs a probe command quietly (for setup's checks). `Ok(None)` when the program is
/// absent or exits non-zero (the thing is "not present"); an error only when the
/// program exists but cannot be started.
pub fn probe(cmd: &mut Command) -> anyhow::Result<Option<String>> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(Some(String::from_utf8_lossy(&o.stdout).into_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("could not start `{}`", show(cmd))),
    }
}

/// The command as a shell line, with the environment it sets (values quoted when needed).
pub fn show(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd.get_envs().filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), quote(v)))).collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

/// Shell quoting, so a printed line can be pasted: '...' normally, $'...' when the value
/// holds control characters (CARGO_ENCODED_RUSTFLAGS's \x1f separators).
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if s.chars().any(char::is_control) {
        let mut q = String::from("$'");
        for c in s.chars() {
            match c {
                '\'' | '\\' => q.extend(['\\', c]),
                c if c.is_control() => q.push_str(&format!("\\x{:02x}", c as u32)),
                c => q.push(c),
            }
        }
        q + "'"
    } else if s.is_empty() || s.chars().any(|c| c.is_whitespace() || "\"'$\\`*?[]{}()<>|&;#~!".contains(c)) {
        format!("'{}'", s.replace('\'', "'\\''"))
    } else {
        s.into_owned()
    }
}

/// Loading BPF programs needs root; say so up front instead of failing mid-suite.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads BPF programs and must run as root (try: sudo -E {what})");
    }
    Ok(())
}
