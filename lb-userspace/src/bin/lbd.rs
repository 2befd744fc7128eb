//! lbd: the balancer daemon.
//!
//!   lbd --config /etc/lb/lb0.toml            run (foreground; logs to stderr)
//!   lbd --check --config /etc/lb/lb0.toml    validate only, like `haproxy -c`
//!   lbd --detach --config /etc/lb/lb0.toml   remove the datapath when lbd is not running
//!   lbd decap attach --interface eth0 --allow 10.0.0.5   backend side: strip our IPIP header
//!
//! Exit codes: 0 ok, 1 failed, 2 usage or config error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use lb_userspace::config::Config;
use lb_userspace::daemon;
use lb_userspace::decap;

/// The package version, the git revision it was built from (build.rs) and the layout
/// version of the maps it pins (a build of another layout refuses to adopt them).
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (git {}, map layout {})",
        env!("CARGO_PKG_VERSION"),
        env!("LB_GIT_REV"),
        lb_common::contract::MAP_LAYOUT_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "lbd",
    version = VERSION.as_str(),
    about = "XDP L4 load balancer daemon",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  lbd --check --config /etc/lb/lb0.toml\n  lbd --config /etc/lb/lb0.toml\n  \
lbd --detach --config /etc/lb/lb0.toml\n  lbd --log-format json --config /etc/lb/lb0.toml\n  lbd decap attach --interface eth0 --allow 10.0.0.5,10.0.0.6\n\n\
Exit codes: 0 ok, 1 failed, 2 usage or config error."
)]
struct Cli {
    /// The config file (TOML); see README "Configuration". Runs lbd in the foreground
    /// (logs on stderr) unless --check or --detach is given.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config, print the effective services and backends, exit (2 on errors).
    #[arg(long, conflicts_with = "detach", requires = "config")]
    check: bool,
    /// Detach the instance from every interface and remove its pins (lbd not running);
    /// succeeds when nothing is pinned, so it fits ExecStopPost=.
    #[arg(long, requires = "config")]
    detach: bool,
    /// Log lines on stderr as text, or as one JSON object a line (for log shippers).
    /// The level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Backend side: strip the balancer's IPIP/IP6IP6 header in XDP (no ipip module needed).
    #[command(after_help = "Example:\n  lbd decap attach --interface eth0 --allow 10.0.0.5,10.0.0.6")]
    Decap {
        #[command(subcommand)]
        cmd: DecapCmd,
    },
    /// Print shell completions for lbd.
    #[command(after_help = "Example:\n  lbd completions bash > /etc/bash_completion.d/lbd")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (lbd.8 and one per subcommand) into a directory (packaging).
    #[command(hide = true)]
    Man {
        /// Output directory.
        dir: PathBuf,
    },
}

/// A usage or config error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

#[derive(Subcommand)]
enum DecapCmd {
    /// Attach and pin the decap program on an interface.
    ///
    /// It decapsulates IPIP/IP6IP6 only from the balancers given with --allow or
    /// --allow-file to one of this host's addresses (read now; see `refresh`); any other
    /// encapsulated packet is dropped and counted.
    ///
    /// Example: lbd decap attach --interface eth0 --allow 10.0.0.5,10.0.0.6
    Attach {
        /// The interface the balancers' packets arrive on, e.g. eth0.
        #[arg(long)]
        interface: String,
        /// native (in the driver) or generic (skb, slower; for drivers without XDP).
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        xdp_mode: Mode,
        /// Balancer addresses (the lbd nodes' encap sources) to accept IPIP from,
        /// comma-separated or repeated.
        #[arg(long, value_name = "ADDR[,ADDR...]", required_unless_present_any = ["allow_file", "pass"])]
        allow: Vec<String>,
        /// A file of balancer addresses, one or more a line, `#` comments.
        #[arg(long, value_name = "FILE")]
        allow_file: Option<PathBuf>,
        /// Attach a plain XDP_PASS program instead: for the veth peer of an interface
        /// on which the balancer transmits with native XDP_TX.
        #[arg(long, conflicts_with_all = ["allow", "allow_file"])]
        pass: bool,
        /// UDP ports read as GUE (the balancers' `gue:PORT` services), comma-separated
        /// or repeated; UDP to other ports passes untouched. Second chance needs
        /// forwarding on the interface (README, "GUE").
        #[arg(long, value_name = "PORT[,PORT...]", value_delimiter = ',', default_value = "6080", conflicts_with = "pass")]
        gue_port: Vec<u16>,
    },
    /// Re-read this host's addresses into the attached decap program (run after an
    /// address change); with --allow/--allow-file, replace the balancer list too.
    ///
    /// Example: lbd decap refresh --interface eth0 --allow-file /etc/lb/balancers
    Refresh {
        /// The interface decap is attached to.
        #[arg(long)]
        interface: String,
        /// New balancer list (replaces the old one), comma-separated or repeated.
        #[arg(long, value_name = "ADDR[,ADDR...]")]
        allow: Vec<String>,
        /// New balancer list from a file (replaces the old one).
        #[arg(long, value_name = "FILE")]
        allow_file: Option<PathBuf>,
    },
    /// Detach it and remove its pins.
    ///
    /// Example: lbd decap detach --interface eth0
    Detach {
        /// The interface decap is attached to.
        #[arg(long)]
        interface: String,
    },
    /// Print its counters by reason, the allowed balancers and the local addresses.
    ///
    /// Example: lbd decap stats --interface eth0
    Stats {
        /// The interface decap is attached to.
        #[arg(long)]
        interface: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (colour on a terminal).
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// In the driver (fast; veth and most NICs).
    Native,
    /// In the generic skb path (slower; any interface).
    Generic,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    let r = match cli.cmd {
        Some(Cmd::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "lbd", &mut std::io::stdout());
            Ok(())
        }
        Some(Cmd::Man { dir }) => man_pages(&dir),
        Some(Cmd::Decap { cmd }) => decap_cmd(cmd),
        None => match cli.config {
            None => Err(anyhow::anyhow!("--config FILE is required (or a subcommand; see --help)")),
            Some(path) if cli.check => return check(&path),
            Some(path) if cli.detach => detach(&path),
            Some(path) => run(&path),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// The man pages of lbd and of each of its visible subcommands (clap_mangen).
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command().version(VERSION.as_str());
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing man pages into {}", dir.display()))
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map(|(c, _)| c).map_err(|e| UsageError(format!("{}: {e}", path.display())).into())
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok((cfg, _)) => {
            print!("{}", cfg.describe());
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{}: {e}", path.display());
            }
            eprintln!("{}: {} error(s); nothing was changed", path.display(), errs.0.len());
            ExitCode::from(2)
        }
    }
}

fn detach(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = load_config(path)?;
    // Nothing pinned is the state --detach is meant to reach: success, so a second
    // run (or ExecStopPost= after `lbctl detach`) does not fail.
    let dir = lb_userspace::pins::pin_dir(&cfg.instance);
    if !dir.exists() {
        println!("instance {} has nothing pinned ({} does not exist): nothing to detach", cfg.instance, dir.display());
        return Ok(());
    }
    let ifaces = daemon::detach_offline(&cfg.instance)?;
    println!(
        "instance {} detached from {}; pins removed",
        cfg.instance,
        if ifaces.is_empty() { "no interface".into() } else { ifaces.join(", ") }
    );
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    // A config error is a usage error (exit 2), before anything is touched.
    load_config(path)?;
    daemon::run(path)
}

fn decap_cmd(cmd: DecapCmd) -> anyhow::Result<()> {
    match cmd {
        DecapCmd::Attach { interface, xdp_mode, allow, allow_file, pass, gue_port } => {
            let mode = match xdp_mode {
                Mode::Native => XdpMode::Driver,
                Mode::Generic => XdpMode::Skb,
            };
            if pass {
                lb_userspace::decap::attach_pass(&interface, mode).context("pass attach")?;
            } else {
                let allow = decap::parse_allow(&allow, allow_file.as_deref()).map_err(|e| UsageError(format!("{e:#}")))?;
                decap::attach_gue(&interface, mode, &allow, &gue_port).context("decap attach")?;
            }
            println!("decap attached to {interface}, pinned at {}", lb_userspace::decap::pin_dir(&interface).display());
        }
        DecapCmd::Refresh { interface, allow, allow_file } => {
            let allow = if allow.is_empty() && allow_file.is_none() {
                None
            } else {
                Some(decap::parse_allow(&allow, allow_file.as_deref()).map_err(|e| UsageError(format!("{e:#}")))?)
            };
            let (a, l) = decap::refresh(&interface, allow.as_deref()).context("decap refresh")?;
            println!("decap on {interface}: {a} balancer(s) allowed, {l} local address(es)");
        }
        DecapCmd::Detach { interface } => {
            lb_userspace::decap::detach(&interface).context("decap detach")?;
            println!("decap detached from {interface}");
        }
        DecapCmd::Stats { interface } => {
            for (name, c) in lb_userspace::decap::stats(&interface).context("decap stats")? {
                println!("{name:<24} packets={} bytes={}", c.packets, c.bytes);
            }
            let (allow, local) = decap::filter(&interface).context("decap address sets")?;
            let list = |v: Vec<std::net::IpAddr>| v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            println!("allowed balancers        {}", list(allow));
            println!("local addresses          {}", list(local));
        }
    }
    Ok(())
}
