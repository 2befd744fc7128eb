//! lbctl: talk to a running lbd over its Unix socket.
//!
//!   lbctl status
//!   lbctl backend add web 10.0.1.13 --weight 50
//!   lbctl -o json stats
//!
//! Exit codes: 0 ok, 1 refused by lbd, 2 usage or config error, 3 lbd unreachable.
//! With `-o json` every outcome is one JSON document on stdout, errors included.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use lb_userspace::api::{self, BackendView, Request, ServiceView, StatsView, StatusView};
use lb_userspace::cluster::node::ClusterView;
use lb_userspace::config::Config;
use lb_userspace::control::{Mode, Vip};
use lb_userspace::health::{HealthKind, HealthSpec};
use lb_userspace::model::{BackendDef, FlowPolicy, FlowTable, Mac, ServiceDef};

/// The package version and the git revision it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("LB_GIT_REV"), ")");

#[derive(Parser)]
#[command(
    name = "lbctl",
    version = VERSION,
    about = "Control a running lbd over its Unix socket",
    after_help = "Examples:\n  lbctl status\n  lbctl backend add web 10.0.1.13 --weight 50\n  lbctl -o json stats\n\n\
Exit codes: 0 ok, 1 refused by lbd, 2 usage or config error, 3 lbd unreachable.\n\
With -o json every outcome, errors included, is one JSON document on stdout."
)]
struct Cli {
    /// Instance name: the socket is /run/lb/INSTANCE.sock.
    #[arg(long, short, default_value = "lb0", global = true, value_name = "INSTANCE")]
    instance: String,
    /// Socket path (overrides --instance), e.g. /run/lb/lb1.sock.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Output format: table (for people), json (for scripts), toml (`config dump` only).
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Toml,
}

#[derive(Subcommand)]
enum Cmd {
    /// Instance, interfaces, counts of services and backends.
    #[command(after_help = "Example:\n  lbctl status")]
    Status,
    /// Services (tiers): list, show, add, remove.
    #[command(after_help = "Example:\n  lbctl service list")]
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Backends of services: list, add, remove, set-weight, drain, enable.
    #[command(after_help = "Example:\n  lbctl backend list web")]
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// Packets, bytes, new flows and pps per service and backend; drop reasons.
    #[command(after_help = "Examples:\n  lbctl stats\n  lbctl stats --watch --interval 2")]
    Stats {
        /// Refresh in place, like top: pps, bps and new flows/s per service and backend.
        #[arg(long)]
        watch: bool,
        /// Seconds between two samples with --watch.
        #[arg(long, default_value_t = 1.0, value_name = "S", requires = "watch")]
        interval: f64,
        /// Stop after this many samples (0: until interrupted).
        #[arg(long, default_value_t = 0, value_name = "N", requires = "watch")]
        count: u64,
    },
    /// Re-read the config file (like SIGHUP): only changed services are rebuilt.
    #[command(after_help = "Example:\n  lbctl reload")]
    Reload,
    /// Detach the balancer from every interface, remove its pins, stop lbd: forwarding stops.
    #[command(after_help = "Example:\n  lbctl detach --yes")]
    Detach {
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// The running services as a config file, and how they differ from the file.
    #[command(after_help = "Examples:\n  lbctl config dump -o toml > /etc/lb/lb0.toml.new\n  lbctl config diff")]
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Flows: which backend the datapath picks for a connection.
    #[command(after_help = "Example:\n  lbctl flow lookup 192.0.2.10:40000 10.0.0.100:80/tcp")]
    Flow {
        #[command(subcommand)]
        cmd: FlowCmd,
    },
    /// Two-node failover: status, failover.
    #[command(after_help = "Example:\n  lbctl cluster status")]
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// This node's BGP announcements: drain (withdraw every route) or undrain.
    #[command(after_help = "Example:\n  lbctl node drain\n  lbctl status\n  lbctl node undrain")]
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Print shell completions for lbctl.
    #[command(after_help = "Example:\n  lbctl completions bash > /etc/bash_completion.d/lbctl")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (lbctl.1 and one per subcommand) into a directory (packaging).
    #[command(hide = true)]
    Man {
        /// Output directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum FlowCmd {
    /// The backend the datapath would pick for a new flow (Maglev, from the live table)
    /// and the flow table's entry if the flow is known. Reads lbd's pinned maps (root).
    #[command(after_help = "Examples:\n  lbctl flow lookup 192.0.2.10:40000 10.0.0.100:80/tcp\n  \
lbctl flow lookup [2001:db8:c::10]:40000 [2001:db8::100]:443/tcp")]
    Lookup {
        /// The client's address and source port, e.g. 192.0.2.10:40000 or [2001:db8::10]:40000.
        client: std::net::SocketAddr,
        /// The destination: VIP:PORT/tcp|udp, e.g. 10.0.0.100:80/tcp.
        dest: Vip,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Write the running services as a config file: the file lbd was started with, its
    /// services replaced by the running ones (CLI changes included). Comments are not kept.
    #[command(after_help = "Example:\n  lbctl config dump -o toml > /etc/lb/lb0.toml.new")]
    Dump,
    /// Show how the running services differ from the config file ("the file wins" on
    /// the next reload or start).
    #[command(after_help = "Examples:\n  lbctl config diff\n  lbctl config diff --file /etc/lb/lb0.toml.new")]
    Diff {
        /// The file to compare with (default: the one lbd was started with).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Every service with its VIP, mode, health check and backend counts.
    #[command(after_help = "Example:\n  lbctl service list")]
    List,
    /// One service and its backends.
    #[command(after_help = "Example:\n  lbctl service show web")]
    Show {
        /// Service name.
        name: String,
    },
    /// Add a service; backends are added with `lbctl backend add`.
    #[command(after_help = "Example:\n  lbctl service add web --vip 10.0.0.100:80/tcp --health http --health-path /healthz")]
    Add {
        /// Service name, [A-Za-z0-9_-]{1,32}.
        name: String,
        /// ADDR:PORT/tcp|udp, e.g. 10.0.0.100:80/tcp or [2001:db8::1]:443/tcp; port 0 = all ports.
        #[arg(long)]
        vip: Vip,
        /// ipip (encapsulate to the backend), dsr-l2 (rewrite the MAC only), gue or gue:PORT
        /// (UDP + GUE with a second-chance hop).
        #[arg(long, default_value = "ipip")]
        mode: Mode,
        /// Maglev table size (a prime ≤ 65537; ≥ 100 × backends keeps the spread within 1%).
        #[arg(long, default_value_t = 65537)]
        table_size: u32,
        /// on, or off: TCP skips the flow table and second chance on the backends keeps
        /// connections (gue mode, tcp VIPs only).
        #[arg(long, default_value = "on", value_name = "on|off")]
        flow_table: FlowTable,
        /// Health check kind (none if omitted).
        #[arg(long, value_enum)]
        health: Option<HealthArg>,
        /// Milliseconds between two checks of a backend.
        #[arg(long, default_value_t = 2000, value_name = "MS")]
        health_interval_ms: u32,
        /// Milliseconds before a check counts as failed.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        health_timeout_ms: u32,
        /// Consecutive successes that bring a down backend back.
        #[arg(long, default_value_t = 2)]
        rise: u32,
        /// Consecutive failures that take an up backend out.
        #[arg(long, default_value_t = 3)]
        fall: u32,
        /// HTTP check path, e.g. /healthz (default /).
        #[arg(long, value_name = "PATH")]
        health_path: Option<String>,
        /// Port to check (default: the VIP's; required for a port-0 VIP).
        #[arg(long, value_name = "PORT")]
        health_port: Option<u16>,
        /// Flows of a backend that fails its check: keep (they stay) or reset (they move).
        #[arg(long, value_enum, default_value_t = PolicyArg::Keep)]
        unhealthy: PolicyArg,
    },
    /// Remove a service and its backends.
    #[command(after_help = "Example:\n  lbctl service remove web")]
    Remove {
        /// Service name.
        name: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Withdraw every VIP route (maintenance); the node forwards what still reaches it.
    #[command(after_help = "Example:\n  lbctl node drain")]
    Drain,
    /// Announce the VIP routes again.
    #[command(after_help = "Example:\n  lbctl node undrain")]
    Undrain,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Role, peer, last heartbeat, config versions on both sides, sync counters.
    #[command(after_help = "Example:\n  lbctl cluster status")]
    Status,
    /// Hand the active role to the peer on purpose (maintenance); run on the active node.
    #[command(after_help = "Example:\n  lbctl cluster failover")]
    Failover,
}

#[derive(Clone, Copy, ValueEnum)]
enum HealthArg {
    /// A TCP connect.
    Tcp,
    /// An HTTP GET that must answer 2xx/3xx.
    Http,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Flows stay on the backend; it only stops getting new ones.
    Keep,
    /// Flows move to healthy backends (clients reconnect after a RST).
    Reset,
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Backends of one service, or of all.
    #[command(after_help = "Examples:\n  lbctl backend list\n  lbctl backend list web")]
    List {
        /// Service name (all services if omitted).
        service: Option<String>,
    },
    /// Add a backend to a service.
    #[command(
        after_help = "Examples:\n  lbctl backend add web 10.0.1.13 --weight 50\n  lbctl backend add web 10.0.1.14    # the service's most common weight"
    )]
    Add {
        /// Service name.
        service: String,
        /// The backend's IPv4 or IPv6 address.
        address: IpAddr,
        /// 0..=65535, 0 = no new flows. Default: the most common weight among the
        /// service's backends (1 if it has none); lbctl says which it chose.
        #[arg(long)]
        weight: Option<u32>,
        /// Next-hop MAC, e.g. 02:00:00:00:01:13 (required in dsr-l2 mode).
        #[arg(long)]
        mac: Option<Mac>,
    },
    /// Remove a backend; its flows move to the others.
    #[command(after_help = "Example:\n  lbctl backend remove web 10.0.1.13")]
    Remove {
        /// Service name.
        service: String,
        /// The backend's address.
        address: IpAddr,
    },
    /// Change a backend's weight.
    #[command(after_help = "Example:\n  lbctl backend set-weight web 10.0.1.13 100")]
    SetWeight {
        /// Service name.
        service: String,
        /// The backend's address.
        address: IpAddr,
        /// 0..=65535, 0 = no new flows.
        weight: u32,
    },
    /// No new flows; established flows stay.
    #[command(after_help = "Example:\n  lbctl backend drain web 10.0.1.11")]
    Drain {
        /// Service name.
        service: String,
        /// The backend's address.
        address: IpAddr,
    },
    /// Undo a drain.
    #[command(after_help = "Example:\n  lbctl backend enable web 10.0.1.11")]
    Enable {
        /// Service name.
        service: String,
        /// The backend's address.
        address: IpAddr,
    },
}

/// Why a command failed, and its exit code.
enum Fail {
    /// lbd answered and refused (exit 1).
    Refused(String),
    /// Bad arguments, a bad config file, or a question not answered (exit 2).
    Usage(String),
    /// lbd could not be reached or did not answer (exit 3).
    Unreachable(String),
}

impl Fail {
    fn code(&self) -> u8 {
        match self {
            Fail::Refused(_) => 1,
            Fail::Usage(_) => 2,
            Fail::Unreachable(_) => 3,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Fail::Refused(_) => "refused",
            Fail::Usage(_) => "usage",
            Fail::Unreachable(_) => "unreachable",
        }
    }
    fn message(&self) -> &str {
        match self {
            Fail::Refused(m) | Fail::Usage(m) | Fail::Unreachable(m) => m,
        }
    }
}

/// Reports a failure as the output format wants it and returns its exit code.
fn fail(json: bool, f: Fail) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({ "ok": false, "error": f.message(), "kind": f.kind(), "exit_code": f.code() }));
    }
    eprintln!("lbctl: error: {}", f.message());
    ExitCode::from(f.code())
}

/// Whether the raw arguments ask for JSON (for errors found before they are parsed).
fn wants_json(args: &[String]) -> bool {
    args.windows(2).any(|w| (w[0] == "-o" || w[0] == "--output") && w[1] == "json")
        || args.iter().any(|a| a == "--output=json" || a == "-ojson")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if wants_json(&args) => {
            // clap's first line without its "error: " prefix; the hints follow on stderr.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
            eprint!("{text}");
            println!("{}", serde_json::json!({ "ok": false, "error": first, "kind": "usage", "exit_code": 2 }));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let json = cli.output == Output::Json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(json, f),
    }
}

struct Client {
    socket: PathBuf,
}

impl Client {
    fn call(&self, req: &Request) -> Result<serde_json::Value, Fail> {
        let resp = lb_userspace::daemon::call(&self.socket, req).map_err(|e| Fail::Unreachable(format!("{e:#}")))?;
        if !resp.ok {
            return Err(Fail::Refused(resp.error.unwrap_or_else(|| "unknown error".into())));
        }
        Ok(resp.data.unwrap_or(serde_json::Value::Null))
    }

    fn get<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T, Fail> {
        serde_json::from_value(self.call(req)?).map_err(|e| Fail::Unreachable(format!("lbd's answer to {req:?} does not decode: {e}")))
    }
}

fn print(s: &str) {
    let _ = std::io::stdout().write_all(s.as_bytes());
}

fn run(cli: Cli) -> Result<(), Fail> {
    let socket = cli.socket.clone().unwrap_or_else(|| api::default_socket(&cli.instance));
    let client = Client { socket };
    let output = cli.output;
    if output == Output::Toml && !matches!(cli.cmd, Cmd::Config { cmd: ConfigCmd::Dump }) {
        return Err(Fail::Usage("-o toml is for `lbctl config dump` only".into()));
    }
    let mut note = None;
    let req = match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Man { dir } => {
            let done = std::fs::create_dir_all(&dir).and_then(|()| clap_mangen::generate_to(Cli::command(), &dir));
            return done.map_err(|e| Fail::Usage(format!("writing man pages into {}: {e}", dir.display())));
        }
        Cmd::Stats { watch: true, interval, count } => return watch_stats(&client, output, interval, count),
        Cmd::Config { cmd: ConfigCmd::Dump } => return config_dump(&client, output),
        Cmd::Flow { cmd: FlowCmd::Lookup { client: c, dest } } => return flow_lookup(&client, output, c, dest),
        Cmd::Config { cmd: ConfigCmd::Diff { file } } => return config_diff(&client, output, file.as_deref()),
        Cmd::Detach { yes } => {
            confirm_detach(&client, yes)?;
            Request::Detach {}
        }
        Cmd::Status => Request::Status {},
        Cmd::Stats { .. } => Request::Stats {},
        Cmd::Reload => Request::Reload {},
        Cmd::Cluster { cmd: ClusterCmd::Status } => Request::ClusterStatus {},
        Cmd::Cluster { cmd: ClusterCmd::Failover } => Request::ClusterFailover {},
        Cmd::Node { cmd: NodeCmd::Drain } => Request::NodeDrain {},
        Cmd::Node { cmd: NodeCmd::Undrain } => Request::NodeUndrain {},
        Cmd::Service { cmd } => match cmd {
            ServiceCmd::List => Request::ServiceList {},
            ServiceCmd::Show { name } => Request::ServiceShow { name },
            ServiceCmd::Remove { name } => Request::ServiceRemove { name },
            ServiceCmd::Add {
                name,
                vip,
                mode,
                table_size,
                flow_table,
                health,
                health_interval_ms,
                health_timeout_ms,
                rise,
                fall,
                health_path,
                health_port,
                unhealthy,
            } => Request::ServiceAdd {
                service: ServiceDef {
                    name,
                    vip,
                    mode,
                    table_size,
                    flow_table,
                    health: health.map(|k| HealthSpec {
                        kind: match k {
                            HealthArg::Tcp => HealthKind::Tcp,
                            HealthArg::Http => HealthKind::Http,
                        },
                        interval_ms: health_interval_ms,
                        timeout_ms: health_timeout_ms,
                        rise,
                        fall,
                        path: health_path,
                        port: health_port,
                        host: None,
                        expect: None,
                    }),
                    unhealthy: match unhealthy {
                        PolicyArg::Keep => FlowPolicy::Keep,
                        PolicyArg::Reset => FlowPolicy::Reset,
                    },
                    backends: vec![],
                },
            },
        },
        Cmd::Backend { cmd } => match cmd {
            BackendCmd::List { service } => Request::BackendList { service },
            BackendCmd::Add { service, address, weight, mac } => {
                let weight = match weight {
                    Some(w) => w,
                    None => {
                        let svc: ServiceView = client.get(&Request::ServiceShow { name: service.clone() })?;
                        let (w, why) = common_weight(&svc.backends);
                        note = Some(format!("lbctl: no --weight given: used {w}, {why} of service {service}"));
                        w
                    }
                };
                Request::BackendAdd { service, address, weight, mac }
            }
            BackendCmd::Remove { service, address } => Request::BackendRemove { service, address },
            BackendCmd::SetWeight { service, address, weight } => Request::BackendSetWeight { service, address, weight },
            BackendCmd::Drain { service, address } => Request::BackendDrain { service, address },
            BackendCmd::Enable { service, address } => Request::BackendEnable { service, address },
        },
    };
    let data = client.call(&req)?;
    // Said once the backend is in: on a refusal the error alone is the answer.
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let out = match output {
        Output::Json => serde_json::to_string_pretty(&data).unwrap_or_default() + "\n",
        _ => render(&req, data),
    };
    print(&out);
    Ok(())
}

/// The weight most backends of a service have (ties: the larger), and why it was chosen.
fn common_weight(backends: &[BackendView]) -> (u32, &'static str) {
    let mut n: BTreeMap<u32, usize> = BTreeMap::new();
    for b in backends {
        *n.entry(b.weight).or_default() += 1;
    }
    match n.into_iter().max_by_key(|&(w, c)| (c, w)) {
        Some((w, _)) => (w, "the most common weight among the backends"),
        None => (1, "the default: there is no other backend"),
    }
}

fn confirm_detach(client: &Client, yes: bool) -> Result<(), Fail> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Fail::Usage("detach stops forwarding: confirm with --yes (stdin is not a terminal to ask on)".into()));
    }
    let st: StatusView = client.get(&Request::Status {})?;
    let ifaces: Vec<&str> = st.interfaces.iter().map(|i| i.name.as_str()).collect();
    eprint!(
        "Detach instance {} from {} ({} services, {} backends)? Forwarding stops and lbd exits. [y/N] ",
        st.instance,
        ifaces.join(", "),
        st.services,
        st.backends
    );
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(Fail::Usage("not confirmed: nothing was changed".into()))
    }
}

/// The running services in the config file's shape.
fn running_defs(client: &Client) -> Result<Vec<ServiceDef>, Fail> {
    let views: Vec<ServiceView> = client.get(&Request::ServiceList {})?;
    views
        .into_iter()
        .map(|v| {
            let bad = |e: String| Fail::Unreachable(format!("lbd's service {}: {e}", v.name));
            Ok(ServiceDef {
                vip: v.vip.parse().map_err(bad)?,
                mode: v.mode.parse().map_err(bad)?,
                table_size: v.table_size,
                flow_table: v.flow_table,
                health: v.health.clone(),
                unhealthy: v.unhealthy,
                backends: v
                    .backends
                    .iter()
                    .map(|b| BackendDef { address: b.address, weight: b.weight, mac: b.mac, drained: b.admin == "drained" })
                    .collect(),
                name: v.name,
            })
        })
        .collect()
}

fn config_dump(client: &Client, output: Output) -> Result<(), Fail> {
    let st: StatusView = client.get(&Request::Status {})?;
    let defs = running_defs(client)?;
    if output == Output::Json {
        print(&(serde_json::to_string_pretty(&serde_json::json!({ "service": defs })).unwrap_or_default() + "\n"));
        return Ok(());
    }
    let text = std::fs::read_to_string(&st.config).map_err(|e| Fail::Usage(format!("reading lbd's config file {}: {e}", st.config)))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| Fail::Usage(format!("{}: {e}", st.config)))?;
    let services = toml::Value::try_from(&defs).map_err(|e| Fail::Unreachable(format!("encoding the services: {e}")))?;
    table.insert("service".into(), services);
    let body = toml::to_string(&table).map_err(|e| Fail::Unreachable(format!("encoding the config: {e}")))?;
    print(&format!(
        "# Written by `lbctl config dump` from lbd instance {} (config version {}):\n# {} with its services replaced by the running ones. Comments are not kept.\n\n{body}",
        st.instance, st.config_version, st.config
    ));
    Ok(())
}

/// One difference between the file and the running services.
#[derive(serde::Serialize)]
struct Difference {
    service: String,
    what: String,
    file: Option<String>,
    running: Option<String>,
}

fn diff_services(file: &[ServiceDef], running: &[ServiceDef]) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut d = |service: &str, what: String, f: Option<String>, r: Option<String>| {
        out.push(Difference { service: service.into(), what, file: f, running: r })
    };
    let names: std::collections::BTreeSet<&str> = file.iter().chain(running).map(|s| s.name.as_str()).collect();
    for name in names {
        let f = file.iter().find(|s| s.name == name);
        let r = running.iter().find(|s| s.name == name);
        let (f, r) = match (f, r) {
            (Some(f), Some(r)) => (f, r),
            (f, r) => {
                let vip = |s: Option<&ServiceDef>| s.map(|s| s.vip.to_string());
                d(name, "service".into(), vip(f), vip(r));
                continue;
            }
        };
        let fields: [(&str, String, String); 6] = [
            ("vip", f.vip.to_string(), r.vip.to_string()),
            ("mode", f.mode.to_string(), r.mode.to_string()),
            ("table_size", f.table_size.to_string(), r.table_size.to_string()),
            ("flow_table", f.flow_table.to_string(), r.flow_table.to_string()),
            ("health", format!("{:?}", f.health), format!("{:?}", r.health)),
            ("unhealthy", f.unhealthy.to_string(), r.unhealthy.to_string()),
        ];
        for (k, a, b) in fields {
            if a != b {
                d(name, k.into(), Some(a), Some(b));
            }
        }
        let addrs: std::collections::BTreeSet<IpAddr> = f.backends.iter().chain(&r.backends).map(|b| b.address).collect();
        let show = |b: &BackendDef| {
            format!(
                "weight {}{}{}",
                b.weight,
                b.mac.map_or(String::new(), |m| format!(" mac {m}")),
                if b.drained { " drained" } else { "" }
            )
        };
        for a in addrs {
            let (fb, rb) = (f.backend(a), r.backend(a));
            if fb != rb {
                d(name, format!("backend {a}"), fb.map(show), rb.map(show));
            }
        }
    }
    out
}

fn config_diff(client: &Client, output: Output, file: Option<&Path>) -> Result<(), Fail> {
    let path = match file {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(client.get::<StatusView>(&Request::Status {})?.config),
    };
    let (cfg, _) = Config::load(&path).map_err(|e| Fail::Usage(format!("{}: {e}", path.display())))?;
    let running = running_defs(client)?;
    let diffs = diff_services(&cfg.services, &running);
    if output == Output::Json {
        print(&(serde_json::to_string_pretty(&serde_json::json!({ "file": path, "differences": diffs })).unwrap_or_default() + "\n"));
        return Ok(());
    }
    if diffs.is_empty() {
        print(&format!("no difference: the running services are those of {}\n", path.display()));
        return Ok(());
    }
    let rows = diffs
        .into_iter()
        .map(|x| vec![x.service, x.what, x.file.unwrap_or_else(|| "-".into()), x.running.unwrap_or_else(|| "-".into())])
        .collect();
    print(&format!("--- {} (file)\n+++ lbd (running)\n", path.display()));
    print(&table(&["SERVICE", "WHAT", "FILE", "RUNNING"], rows));
    Ok(())
}

/// What the datapath does with a flow, read from the running instance's pinned maps with
/// the datapath's own rules: a flow-table entry wins while its backend is valid and still
/// in the service; otherwise the Maglev slot of the flow hash in the active table.
fn flow_lookup(client: &Client, output: Output, c: std::net::SocketAddr, dest: Vip) -> Result<(), Fail> {
    use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
    use lb_common::{BACKEND_F_VALID, BackendValue, FlowKey, FlowValue, MAX_TABLE_SIZE, NO_BACKEND, VipKey, VipValue, map_names};
    if c.is_ipv4() != dest.addr.is_ipv4() {
        return Err(Fail::Usage(format!("client {c} and VIP {} are of different families", dest.addr)));
    }
    let st: StatusView = client.get(&Request::Status {})?;
    let services: Vec<ServiceView> = client.get(&Request::ServiceList {})?;
    let dir = Path::new(&st.pin_dir);
    let open = |name: &str| {
        MapData::from_pin(dir.join(name)).map_err(|e| Fail::Refused(format!("opening {}/{name} (run as root): {e}", dir.display())))
    };
    let bad = |name: &str, e: aya::maps::MapError| Fail::Refused(format!("{name}: {e}"));
    let vips: BpfHashMap<MapData, VipKey, VipValue> =
        BpfHashMap::try_from(Map::HashMap(open(map_names::VIPS)?)).map_err(|e| bad(map_names::VIPS, e))?;
    let tables: Array<MapData, lb_common::TableEntry> = Array::try_from(Map::Array(open(map_names::TABLES)?)).map_err(|e| bad(map_names::TABLES, e))?;
    let backends: Array<MapData, BackendValue> =
        Array::try_from(Map::Array(open(map_names::BACKENDS)?)).map_err(|e| bad(map_names::BACKENDS, e))?;
    let flows: BpfHashMap<MapData, FlowKey, FlowValue> =
        BpfHashMap::try_from(Map::LruHashMap(open(map_names::FLOWS)?)).map_err(|e| bad(map_names::FLOWS, e))?;

    // The service the datapath would pick: exact port, then the all-ports VIP.
    let found = [dest.port, 0].into_iter().find_map(|port| vips.get(&VipKey::new(dest.addr, port, dest.proto), 0).ok());
    let Some(vip) = found else {
        return Err(Fail::Refused(format!("no service on {dest} (nor on port 0): the datapath passes this flow")));
    };
    let service = services.iter().find(|s| s.id == vip.service_id).map_or_else(|| format!("#{}", vip.service_id), |s| s.name.clone());
    let key = FlowKey::new(c.ip(), c.port(), dest.addr, dest.port, dest.proto);
    let backend_at = |id: u32| -> Option<BackendValue> { backends.get(&id, 0).ok().filter(|b| b.flags & BACKEND_F_VALID != 0) };
    let addr_of = |id: u32| backend_at(id).map(|b| lb_common::addr_from_words(&b.addr).to_string());
    if vip.table_size == 0 || vip.table_size > MAX_TABLE_SIZE {
        return Err(Fail::Refused(format!("service {service}: bad table size {} in the datapath", vip.table_size)));
    }
    let pos = lb_common::flow_hash(&key) % vip.table_size;
    // Each position holds (primary, secondary); the primary is Maglev's pick.
    let maglev = tables.get(&lb_common::table_index(vip.service_id, vip.active_slot, pos), 0).map_err(|e| bad(map_names::TABLES, e))?.primary;
    let maglev_backend = if maglev == NO_BACKEND { None } else { addr_of(maglev) };
    let entry = flows.get(&key, 0).ok();
    let entry_valid = entry.is_some_and(|f| backend_at(f.backend_id).is_some_and(|b| b.service_id == vip.service_id));
    let chosen = if entry_valid { entry.and_then(|f| addr_of(f.backend_id)) } else { maglev_backend.clone() };
    if output == Output::Json {
        let v = serde_json::json!({
            "service": service, "client": c.to_string(), "vip": dest.to_string(),
            "maglev": { "slot": pos, "backend_id": (maglev != NO_BACKEND).then_some(maglev), "backend": maglev_backend },
            "flow": entry.map(|f| serde_json::json!({ "backend_id": f.backend_id, "backend": addr_of(f.backend_id), "valid": entry_valid })),
            "backend": chosen,
        });
        print(&(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"));
        return Ok(());
    }
    let none = || "none".to_string();
    print(&format!(
        "service      {service}\nflow         {c} -> {dest}\nmaglev       slot {pos} of {}: {}\nflow table   {}\nbackend      {}\n",
        vip.table_size,
        maglev_backend.clone().unwrap_or_else(|| "no backend (the datapath drops new flows)".into()),
        match entry {
            None => "no entry (a new flow gets the Maglev pick)".to_string(),
            Some(f) if entry_valid => format!("entry: {}", addr_of(f.backend_id).unwrap_or_else(none)),
            Some(f) => format!("stale entry (backend id {} no longer in the service): re-steered to the Maglev pick", f.backend_id),
        },
        chosen.unwrap_or_else(none)
    ));
    Ok(())
}

/// Per-second rates between two samples.
fn watch_stats(client: &Client, output: Output, interval: f64, count: u64) -> Result<(), Fail> {
    if !(0.1..=3600.0).contains(&interval) {
        return Err(Fail::Usage(format!("--interval {interval}: between 0.1 and 3600 seconds")));
    }
    // (service, backend or "*") → (packets, bytes, new flows) of the previous sample.
    type Sample = BTreeMap<(String, String), (u64, u64, u64)>;
    let mut prev: Option<(Instant, Sample)> = None;
    let mut n = 0u64;
    loop {
        let st: StatsView = client.get(&Request::Stats {})?;
        let now = Instant::now();
        let mut cur = BTreeMap::new();
        let mut rows = Vec::new();
        for s in &st.services {
            let t = &s.traffic;
            cur.insert((s.name.clone(), "*".to_string()), (t.packets, t.bytes, t.new_flows));
            for b in &s.backends {
                let t = &b.traffic;
                cur.insert((s.name.clone(), b.address.to_string()), (t.packets, t.bytes, t.new_flows));
            }
        }
        for (k, &(p, b, f)) in &cur {
            let rate = prev.as_ref().and_then(|(t0, m)| {
                let dt = now.duration_since(*t0).as_secs_f64();
                m.get(k).map(|&(p0, b0, f0)| {
                    let r = |a: u64, z: u64| a.saturating_sub(z) as f64 / dt;
                    (r(p, p0), r(b, b0) * 8.0, r(f, f0))
                })
            });
            rows.push((k.clone(), p, rate));
        }
        if output == Output::Json {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|((svc, be), p, r)| {
                    serde_json::json!({ "service": svc, "backend": be, "packets": p,
                        "pps": r.map(|r| r.0), "bps": r.map(|r| r.1), "new_flows_per_s": r.map(|r| r.2) })
                })
                .collect();
            println!("{}", serde_json::json!({ "rows": v }));
        } else {
            let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
            let body = table(
                &["SERVICE", "BACKEND", "PACKETS", "PPS", "BPS", "NEW FLOWS/S"],
                rows.into_iter()
                    .map(|((svc, be), p, r)| vec![svc, be, p.to_string(), f(r.map(|r| r.0)), f(r.map(|r| r.1)), f(r.map(|r| r.2))])
                    .collect(),
            );
            // Home and clear: refreshed in place like top.
            print(&format!("\x1b[H\x1b[2Jlbctl stats --watch: every {interval} s (Ctrl-C to stop)\n\n{body}"));
        }
        let _ = std::io::stdout().flush();
        prev = Some((now, cur));
        n += 1;
        if count != 0 && n >= count {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
}

/// Human-readable output; falls back to JSON for anything without a table.
fn render(req: &Request, data: serde_json::Value) -> String {
    let r = match req {
        Request::Status {} => serde_json::from_value::<StatusView>(data.clone()).map(|s| status_table(&s)),
        Request::ServiceList {} => serde_json::from_value::<Vec<ServiceView>>(data.clone()).map(|v| services_table(&v)),
        Request::BackendList { .. } => serde_json::from_value::<Vec<BackendView>>(data.clone()).map(|v| backends_table(&v)),
        Request::Stats {} => serde_json::from_value::<StatsView>(data.clone()).map(|s| stats_table(&s)),
        Request::ServiceShow { .. }
        | Request::ServiceAdd { .. }
        | Request::BackendAdd { .. }
        | Request::BackendRemove { .. }
        | Request::BackendSetWeight { .. }
        | Request::BackendDrain { .. }
        | Request::BackendEnable { .. } => serde_json::from_value::<ServiceView>(data.clone()).map(|s| {
            let mut o = services_table(std::slice::from_ref(&s));
            o.push('\n');
            o + &backends_table(&s.backends)
        }),
        Request::Reload {} => Ok(data.get("result").and_then(|v| v.as_str()).unwrap_or("reloaded").to_string() + "\n"),
        Request::Detach {} => {
            Ok(format!("detached from {}; pins removed; lbd stopped\n", data.get("detached").map_or("-".into(), |v| v.to_string())))
        }
        Request::ServiceRemove { name } => Ok(format!("service {name} removed\n")),
        Request::ClusterStatus {} => serde_json::from_value::<ClusterView>(data.clone()).map(|c| cluster_table(&c)),
        Request::ClusterFailover {} | Request::NodeDrain {} | Request::NodeUndrain {} => Ok(data.get("result").and_then(|v| v.as_str()).unwrap_or("ok").to_string() + "\n"),
    };
    r.unwrap_or_else(|_| serde_json::to_string_pretty(&data).unwrap_or_default() + "\n")
}

/// Left-aligned columns.
fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        s.join("  ").trim_end().to_string() + "\n"
    };
    let mut o = line(head.iter().map(|s| s.to_string()).collect());
    for r in rows {
        o += &line(r);
    }
    o
}

fn status_table(s: &StatusView) -> String {
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| match i.state.as_str() {
            "attached" => format!("{} ({}{})", i.name, if i.mode.is_empty() { "?" } else { &i.mode }, if i.attached_now { "" } else { ", adopted" }),
            state => format!("{} ({state})", i.name),
        })
        .collect();
    format!(
        "instance     {}\npid          {}\nuptime       {} s\nconfig       {} (version {})\ndatapath     {}\npins         {}\nstate        {}\ninterfaces   {}\nservices     {}\nbackends     {} ({} up, {} down, {} drained, {} pending)\n",
        s.instance,
        s.pid,
        s.uptime_s,
        s.config,
        s.config_version,
        if s.adopted { "adopted from a previous run" } else { "loaded by this run" },
        s.pin_dir,
        s.state_file,
        ifaces.join(", "),
        s.services,
        s.backends,
        s.backends_up,
        s.backends_down,
        s.backends_drained,
        s.backends_pending
    ) + &s.cluster.as_ref().map_or(String::new(), |c| format!("cluster      {c}\n"))
        + &s.bgp.as_ref().map_or(String::new(), bgp_lines)
}

fn bgp_lines(b: &api::BgpView) -> String {
    let list = |v: &[std::net::IpAddr]| if v.is_empty() { "none".to_string() } else { v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ") };
    let bird = match (&b.bird.error, b.bird.bird_ok) {
        (Some(e), _) => format!("ERROR {e} ({} failed in a row, retrying)", b.bird.failures),
        (None, true) => format!("ok ({})", b.bird.bird_version),
        (None, false) => "not contacted yet".to_string(),
    };
    format!(
        "bgp          {}wanted {}; announced {}{}\nbird         {bird}\nsessions     {}\n",
        if b.drained { "DRAINED; " } else { "" },
        list(&b.wanted),
        list(&b.bird.announced),
        if b.in_sync { "" } else { " (not in sync yet)" },
        if b.bird.sessions.is_empty() { "-".to_string() } else { b.bird.sessions.join(", ") }
    )
}

fn services_table(v: &[ServiceView]) -> String {
    table(
        &["SERVICE", "VIP", "MODE", "TABLE", "FLOW TABLE", "HEALTH", "BACKENDS", "IN TABLE"],
        v.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.vip.clone(),
                    s.mode.clone(),
                    s.table_size.to_string(),
                    s.flow_table.to_string(),
                    s.health.as_ref().map_or("none".into(), |h| format!("{:?}", h.kind).to_lowercase()),
                    s.backends.len().to_string(),
                    s.backends.iter().filter(|b| b.in_table).count().to_string(),
                ]
            })
            .collect(),
    )
}

fn backends_table(v: &[BackendView]) -> String {
    table(
        &["SERVICE", "BACKEND", "WEIGHT", "ADMIN", "HEALTH", "IN TABLE", "NEXT HOP", "LAST CHECK ERROR"],
        v.iter()
            .map(|b| {
                vec![
                    b.service.clone(),
                    b.address.to_string(),
                    b.weight.to_string(),
                    b.admin.clone(),
                    b.health.clone(),
                    match (&b.pending, b.in_table) {
                        (Some(why), _) => format!("pending ({why})"),
                        (None, true) => "yes".into(),
                        (None, false) => "no".into(),
                    },
                    b.next_hop.clone(),
                    b.last_check_error.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    )
}

fn stats_table(s: &StatsView) -> String {
    let mut rows = Vec::new();
    for svc in &s.services {
        let t = &svc.traffic;
        rows.push(vec![
            svc.name.clone(),
            "*".into(),
            "".into(),
            t.packets.to_string(),
            t.bytes.to_string(),
            t.new_flows.to_string(),
            format!("{:.0}", t.pps),
        ]);
        for b in &svc.backends {
            let t = &b.traffic;
            let state = if b.admin == "drained" { "drained".to_string() } else { b.health.clone() };
            rows.push(vec![
                "".into(),
                b.address.to_string(),
                state,
                t.packets.to_string(),
                t.bytes.to_string(),
                t.new_flows.to_string(),
                format!("{:.0}", t.pps),
            ]);
        }
    }
    let mut o = table(&["SERVICE", "BACKEND", "STATE", "PACKETS", "BYTES", "NEW FLOWS", "PPS"], rows);
    let reasons: Vec<Vec<String>> =
        s.reasons.iter().filter(|r| r.packets > 0).map(|r| vec![r.reason.clone(), r.packets.to_string(), r.bytes.to_string()]).collect();
    o.push('\n');
    if reasons.is_empty() {
        o += "no drops or unusual passes\n";
    } else {
        o += &table(&["REASON", "PACKETS", "BYTES"], reasons);
    }
    o
}

fn cluster_table(c: &ClusterView) -> String {
    if c.mode == lb_userspace::cluster::mesh::MODE_ACTIVE_ACTIVE {
        return mesh_table(c);
    }
    let peer = match &c.peer {
        Some(p) => format!(
            "node {} {} priority {} config {} ({}, last heartbeat {} ms ago)",
            p.node_id,
            p.role,
            p.priority,
            p.config,
            if p.alive { "alive" } else { "dead" },
            p.last_heartbeat_ms_ago
        ),
        None => "never heard".into(),
    };
    let vips: Vec<String> = c.vips_held.iter().map(|v| v.to_string()).collect();
    let rejected: Vec<String> = c.datagrams_rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
    format!(
        "node         {} ({}, priority {}, preempt {})\nconfig       {}{}\npeer         {}\nvips held    {}\nlast change  {}\ndatagrams    {} accepted; rejected: {}\nflows out    {} queued, {} sent, {} dropped (queue full), {} lost in the datapath\nflows in     {} applied, {} unknown VIP, {} unknown backend\n",
        c.node_id,
        c.role,
        c.priority,
        c.preempt,
        c.config,
        if c.synced { "" } else { " (not synced)" },
        peer,
        if vips.is_empty() { "none".into() } else { vips.join(", ") },
        c.last_change.as_deref().unwrap_or("-"),
        c.datagrams_accepted,
        if rejected.is_empty() { "none".into() } else { rejected.join(", ") },
        c.flows_queued,
        c.flows_sent,
        c.flows_dropped_queue_full,
        c.flows_lost_in_datapath,
        c.flows_applied,
        c.flows_unknown_vip,
        c.flows_unknown_backend
    )
}

/// Active-active: no roles; a line per peer with its liveness and flow sync.
fn mesh_table(c: &ClusterView) -> String {
    let rejected: Vec<String> = c.datagrams_rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let mut o = format!(
        "node         {} (active-active: every node forwards)\nconfig       {}{}\ndatagrams    {} accepted; rejected: {}\nflows out    {} read from the datapath, {} dropped (queue full), {} lost in the datapath\nflows in     {} applied, {} unknown VIP, {} unknown backend, {} dropped (apply queue full)\n",
        c.node_id,
        c.config,
        if c.synced { "" } else { " (a peer has a newer config)" },
        c.datagrams_accepted,
        if rejected.is_empty() { "none".into() } else { rejected.join(", ") },
        c.flows_queued,
        c.flows_dropped_queue_full,
        c.flows_lost_in_datapath,
        c.flows_applied,
        c.flows_unknown_vip,
        c.flows_unknown_backend,
        c.flows_dropped_apply_queue
    );
    o.push_str("PEER                   NODE  STATE  LAST HB  CONFIG        FLOWS SENT  DROPPED  SKIPPED (DOWN)  FULL SYNCS\n");
    for p in &c.peers {
        o.push_str(&format!(
            "{:<22} {:<5} {:<6} {:<8} {:<13} {:<11} {:<8} {:<15} {}\n",
            p.address.to_string(),
            p.node_id.map_or("-".into(), |n| n.to_string()),
            if p.alive { "alive" } else if p.last_heartbeat_ms_ago.is_some() { "dead" } else { "never" },
            p.last_heartbeat_ms_ago.map_or("-".into(), |ms| format!("{ms} ms")),
            p.config.as_deref().unwrap_or("-"),
            p.flows_sent,
            p.flows_dropped_queue_full,
            p.flows_skipped_peer_down,
            p.full_syncs_sent
        ));
    }
    o
}
