//! lbd: the balancer daemon. This build provides the backend-side decap commands; the
//! daemon proper (config, services, health checks, CLI socket) builds on the same library.

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "lbd", version, about = "XDP L4 load balancer daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    Attach {
        #[arg(long)]
        interface: String,
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        xdp_mode: Mode,
        /// Attach a plain XDP_PASS program instead: for the veth peer of an interface
        /// on which the balancer transmits with native XDP_TX.
        #[arg(long)]
        pass: bool,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Decap { cmd: DecapCmd::Attach { interface, xdp_mode, pass } } => {
            let mode = match xdp_mode {
                Mode::Native => XdpMode::Driver,
                Mode::Generic => XdpMode::Skb,
            };
            if pass {
                lb_userspace::decap::attach_pass(&interface, mode).context("pass attach")?;
            } else {
                lb_userspace::decap::attach(&interface, mode).context("decap attach")?;
            }
            println!("decap attached to {interface}, pinned at {}", lb_userspace::decap::pin_dir(&interface).display());
        }
        Cmd::Decap { cmd: DecapCmd::Detach { interface } } => {
            lb_userspace::decap::detach(&interface).context("decap detach")?;
            println!("decap detached from {interface}");
        }
        Cmd::Decap { cmd: DecapCmd::Stats { interface } } => {
            for (name, c) in lb_userspace::decap::stats(&interface).context("decap stats")? {
                println!("{name:<16} packets={} bytes={}", c.packets, c.bytes);
            }
        }
    }
    Ok(())
}
