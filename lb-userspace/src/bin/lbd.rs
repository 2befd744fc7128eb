//! lbd: the balancer daemon.
//!
//!   lbd --config /etc/lb/lb0.toml            run (foreground; logs to stderr)
//!   lbd --check --config /etc/lb/lb0.toml    validate only, like `haproxy -c`
//!   lbd --detach --config /etc/lb/lb0.toml   remove the datapath when lbd is not running
//!   lbd decap attach --interface eth0        backend side: strip our IPIP header

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::config::Config;
use lb_userspace::daemon::{self, Daemon};
use lb_userspace::decap;

#[derive(Parser)]
#[command(name = "lbd", version, about = "XDP L4 load balancer daemon", args_conflicts_with_subcommands = true)]
struct Cli {
    /// The config file (TOML); see README "Configuration".
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the config, print the effective services and backends, exit.
    #[arg(long, conflicts_with = "detach")]
    check: bool,
    /// Detach the instance from every interface and remove its pins (lbd not running).
    #[arg(long)]
    detach: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Backend side: strip the balancer's IPIP/IP6IP6 header in XDP (no ipip module needed).
    Decap {
        #[command(subcommand)]
        cmd: DecapCmd,
    },
}

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
        #[arg(long)]
        interface: String,
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
    },
    /// Re-read this host's addresses into the attached decap program (run after an
    /// address change); with --allow/--allow-file, replace the balancer list too.
    ///
    /// Example: lbd decap refresh --interface eth0 --allow-file /etc/lb/balancers
    Refresh {
        #[arg(long)]
        interface: String,
        #[arg(long, value_name = "ADDR[,ADDR...]")]
        allow: Vec<String>,
        #[arg(long, value_name = "FILE")]
        allow_file: Option<PathBuf>,
    },
    /// Detach it and remove its pins.
    Detach {
        #[arg(long)]
        interface: String,
    },
    /// Print its counters.
    Stats {
        #[arg(long)]
        interface: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Native,
    Generic,
}

fn main() -> ExitCode {
    // Before any thread exists, so only the signal thread receives HUP/TERM/INT.
    daemon::block_signals();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(cmd) => decap_cmd(cmd),
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
            ExitCode::FAILURE
        }
    }
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
    let (cfg, _) = Config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let ifaces = daemon::detach_offline(&cfg.instance)?;
    println!(
        "instance {} detached from {}; pins removed",
        cfg.instance,
        if ifaces.is_empty() { "no interface".into() } else { ifaces.join(", ") }
    );
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let d = Daemon::start(path)?;
    daemon::handle_signals(&d);
    d.serve()
}

fn decap_cmd(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Decap { cmd: DecapCmd::Attach { interface, xdp_mode, allow, allow_file, pass } } => {
            let mode = match xdp_mode {
                Mode::Native => XdpMode::Driver,
                Mode::Generic => XdpMode::Skb,
            };
            if pass {
                lb_userspace::decap::attach_pass(&interface, mode).context("pass attach")?;
            } else {
                let allow = decap::parse_allow(&allow, allow_file.as_deref())?;
                decap::attach(&interface, mode, &allow).context("decap attach")?;
            }
            println!("decap attached to {interface}, pinned at {}", lb_userspace::decap::pin_dir(&interface).display());
        }
        Cmd::Decap { cmd: DecapCmd::Refresh { interface, allow, allow_file } } => {
            let allow =
                if allow.is_empty() && allow_file.is_none() { None } else { Some(decap::parse_allow(&allow, allow_file.as_deref())?) };
            let (a, l) = decap::refresh(&interface, allow.as_deref()).context("decap refresh")?;
            println!("decap on {interface}: {a} balancer(s) allowed, {l} local address(es)");
        }
        Cmd::Decap { cmd: DecapCmd::Detach { interface } } => {
            lb_userspace::decap::detach(&interface).context("decap detach")?;
            println!("decap detached from {interface}");
        }
        Cmd::Decap { cmd: DecapCmd::Stats { interface } } => {
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
