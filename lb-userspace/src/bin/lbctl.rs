//! lbctl: talk to a running lbd over its Unix socket.
//!
//!   lbctl status
//!   lbctl backend add web 10.0.1.13 --weight 50
//!   lbctl -o json stats

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use lb_userspace::api::{self, BackendView, Request, ServiceView, StatsView, StatusView};
use lb_userspace::cluster::node::ClusterView;
use lb_userspace::control::{Mode, Vip};
use lb_userspace::health::{HealthKind, HealthSpec};
use lb_userspace::model::{FlowPolicy, Mac, ServiceDef};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control a running lbd")]
struct Cli {
    /// Instance name (socket /run/lb/INSTANCE.sock).
    #[arg(long, short, default_value = "lb0", global = true)]
    instance: String,
    /// Socket path (overrides --instance).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Instance, interfaces, counts of services and backends.
    Status,
    /// Services (tiers).
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Backends of services.
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// Packets, bytes, new flows and pps per service and backend; drop reasons.
    Stats,
    /// Re-read the config file (like SIGHUP).
    Reload,
    /// Detach the balancer from every interface, remove its pins, stop lbd.
    Detach,
    /// Two-node failover.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ServiceCmd {
    List,
    Show {
        name: String,
    },
    /// Add a service; backends are added with `lbctl backend add`.
    Add {
        name: String,
        /// ADDR:PORT/tcp|udp, e.g. 10.0.0.100:80/tcp or [2001:db8::1]:443/tcp; port 0 = all ports.
        #[arg(long)]
        vip: Vip,
        #[arg(long, default_value = "ipip")]
        mode: Mode,
        /// Maglev table size (a prime).
        #[arg(long, default_value_t = 65537)]
        table_size: u32,
        /// Health check kind (none if omitted).
        #[arg(long, value_enum)]
        health: Option<HealthArg>,
        #[arg(long, default_value_t = 2000)]
        health_interval_ms: u32,
        #[arg(long, default_value_t = 1000)]
        health_timeout_ms: u32,
        #[arg(long, default_value_t = 2)]
        rise: u32,
        #[arg(long, default_value_t = 3)]
        fall: u32,
        /// HTTP check path.
        #[arg(long)]
        health_path: Option<String>,
        /// Port to check (default: the VIP's).
        #[arg(long)]
        health_port: Option<u16>,
        /// Flows of a backend that fails its check: keep | reset.
        #[arg(long, value_enum, default_value_t = PolicyArg::Keep)]
        unhealthy: PolicyArg,
    },
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Role, peer, last heartbeat, config versions on both sides, sync counters.
    Status,
    /// Hand the active role to the peer on purpose (maintenance); run on the active node.
    Failover,
}

#[derive(Clone, Copy, ValueEnum)]
enum HealthArg {
    Tcp,
    Http,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Keep,
    Reset,
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Backends of one service, or of all.
    List { service: Option<String> },
    Add {
        service: String,
        address: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Next-hop MAC (required in dsr-l2 mode).
        #[arg(long)]
        mac: Option<Mac>,
    },
    Remove { service: String, address: IpAddr },
    SetWeight { service: String, address: IpAddr, weight: u32 },
    /// No new flows; established flows stay.
    Drain { service: String, address: IpAddr },
    /// Undo a drain.
    Enable { service: String, address: IpAddr },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Status => Request::Status {},
        Cmd::Stats => Request::Stats {},
        Cmd::Reload => Request::Reload {},
        Cmd::Detach => Request::Detach {},
        Cmd::Cluster { cmd: ClusterCmd::Status } => Request::ClusterStatus {},
        Cmd::Cluster { cmd: ClusterCmd::Failover } => Request::ClusterFailover {},
        Cmd::Service { cmd } => match cmd {
            ServiceCmd::List => Request::ServiceList {},
            ServiceCmd::Show { name } => Request::ServiceShow { name },
            ServiceCmd::Remove { name } => Request::ServiceRemove { name },
            ServiceCmd::Add {
                name,
                vip,
                mode,
                table_size,
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
            BackendCmd::Add { service, address, weight, mac } => Request::BackendAdd { service, address, weight, mac },
            BackendCmd::Remove { service, address } => Request::BackendRemove { service, address },
            BackendCmd::SetWeight { service, address, weight } => Request::BackendSetWeight { service, address, weight },
            BackendCmd::Drain { service, address } => Request::BackendDrain { service, address },
            BackendCmd::Enable { service, address } => Request::BackendEnable { service, address },
        },
    };
    let socket = cli.socket.unwrap_or_else(|| api::default_socket(&cli.instance));
    let resp = match lb_userspace::daemon::call(&socket, &req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !resp.ok {
        let msg = resp.error.unwrap_or_else(|| "unknown error".into());
        if cli.output == Output::Json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("lbctl: error: {msg}");
        return ExitCode::FAILURE;
    }
    let data = resp.data.unwrap_or(serde_json::Value::Null);
    let out = match cli.output {
        Output::Json => serde_json::to_string_pretty(&data).unwrap_or_default() + "\n",
        Output::Table => render(&req, data),
    };
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::SUCCESS
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
        Request::Detach {} => Ok(format!("detached from {}; pins removed; lbd stopped\n", data.get("detached").map_or("-".into(), |v| v.to_string()))),
        Request::ServiceRemove { name } => Ok(format!("service {name} removed\n")),
        Request::ClusterStatus {} => serde_json::from_value::<ClusterView>(data.clone()).map(|c| cluster_table(&c)),
        Request::ClusterFailover {} => Ok(data.get("result").and_then(|v| v.as_str()).unwrap_or("ok").to_string() + "\n"),
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
}

fn services_table(v: &[ServiceView]) -> String {
    table(
        &["SERVICE", "VIP", "MODE", "TABLE", "HEALTH", "BACKENDS", "IN TABLE"],
        v.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.vip.clone(),
                    s.mode.clone(),
                    s.table_size.to_string(),
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
        rows.push(vec![svc.name.clone(), "*".into(), "".into(), t.packets.to_string(), t.bytes.to_string(), t.new_flows.to_string(), format!("{:.0}", t.pps)]);
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
