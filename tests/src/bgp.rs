//! BIRD 2 in the namespaces of a routed `netns::Topology` (issue 14): a router BIRD
//! with a BGP session and BFD to every balancer node, their routes merged into ECMP
//! routes of the router's kernel table, and one BIRD per balancer node whose config
//! includes the file its lbd writes (lb-userspace/src/bgp).
//!
//! - `Bird`: one BIRD process (`bird -f -c CFG -s SOCK -P PID`, through `nsenter --net`
//!   like `netns::spawn_in`), its files in a directory of its own; killed (SIGKILL) on
//!   drop, directory removed.
//! - `router_config`: the router's config (AS `ROUTER_AS`, one IPv4 and one IPv6
//!   session per balancer, BFD, `merge paths on` in the kernel protocols, import of the
//!   VIP /32s and /128s only).
//! - `node_config`: a balancer node's main config: its log and `include` of lbd's file
//!   (router id, BFD, sessions and the VIP routes are lbd's).
//! - `lbd_bgp_section`: the `[bgp]` table of lbd's config for that node.
//! - `BgpNode` (lbd + its BIRD) and `BgpLab` (router BIRD + N nodes) tie them together.
//!
//! Waiting for the router to see the nodes is `Topology::wait_router_lbs` (the kernel's
//! route, what packets follow).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{FlowKey, FlowValue, MAX_SERVICES, map_names};
use lb_userspace::stats::Stats;

use crate::lbd::{Lbd, wait_for};
use crate::netns::{
    ChildGuard, Conn, ServerMode, TopoSpec, Topology, ns_command, run, vip_v4, vip_v6,
};

/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// Every balancer node's AS (one AS: the router's BGP routes to a VIP are then equal
/// and BIRD merges them into one ECMP route).
pub const NODE_AS: u32 = 65001;

/// BFD timers of every session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bfd {
    pub interval_ms: u32,
    pub multiplier: u32,
}

impl Bfd {
    /// 100 ms × 3: a dead node's routes go within about 300 ms.
    pub const FAST: Bfd = Bfd {
        interval_ms: 100,
        multiplier: 3,
    };

    /// How long a silent peer takes to be declared down.
    pub fn detect(&self) -> Duration {
        Duration::from_millis(u64::from(self.interval_ms) * u64::from(self.multiplier))
    }
}

/// One BIRD process in a network namespace.
pub struct Bird {
    pub name: String,
    pub ns: String,
    /// Config, control socket, pid file and log live here.
    pub dir: PathBuf,
    child: Option<ChildGuard>,
}

impl Bird {
    /// A BIRD named `name` (unique: the directory is `<tmp>/<name>-bird-<pid>`) for
    /// namespace `ns`; not started, no config yet.
    pub fn new(name: &str, ns: &str) -> Bird {
        let dir = std::env::temp_dir().join(format!("{name}-bird-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("BIRD directory");
        Bird {
            name: name.to_string(),
            ns: ns.to_string(),
            dir,
            child: None,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("bird.pid")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("bird.log")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("writing BIRD's config");
    }

    /// Starts BIRD and waits (≤ 10 s) until its control socket answers; panics with its
    /// log when it exits or does not answer.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "BIRD {} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("BIRD log");
        let mut c = ns_command(&self.ns, "bird");
        c.arg("-f")
            .arg("-c")
            .arg(self.config_path())
            .arg("-s")
            .arg(self.socket())
            .arg("-P")
            .arg(self.pid_file())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(ChildGuard {
            child: c
                .spawn()
                .expect("starting bird (bird2 installed? cargo xtask setup)"),
        });
        let t = Instant::now();
        while self.birdc("show status").is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.child.try_wait()) {
                self.child = None;
                panic!("BIRD {} exited with {st}:\n{}", self.name, self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "BIRD {} did not answer on {}:\n{}",
                self.name,
                self.socket().display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would (its BGP sessions and BFD stop without a word).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `birdc -s SOCK CMD` (words of `cmd`); its output, or an error when birdc cannot
    /// reach BIRD.
    pub fn birdc(&self, cmd: &str) -> io::Result<String> {
        run(Command::new("birdc")
            .arg("-s")
            .arg(self.socket())
            .args(cmd.split_whitespace()))
    }

    /// The `show protocols` lines of BGP sessions in state Established.
    pub fn established(&self) -> Vec<String> {
        self.birdc("show protocols")
            .map(|o| {
                o.lines()
                    .filter(|l| l.contains(" BGP ") && l.contains("Established"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The router's BIRD config: BGP (with BFD, no graceful restart: a dead node's routes
/// go at once) to every balancer of `t` over IPv4 and IPv6, importing only host
/// routes inside the VIP prefixes, exporting nothing; the kernel protocols install BGP
/// routes with `merge paths on`, so equal routes from several nodes become one ECMP
/// route.
pub fn router_config(t: &Topology, bfd: Bfd, log: &Path) -> String {
    let r = t.router();
    let mut o = format!(
        "log \"{log}\" all;\nrouter id {rid};\n\nprotocol device {{\n}}\n\n\
         protocol bfd {{\n  interface \"{ifname}\" {{\n    min rx interval {ms} ms;\n    min tx interval {ms} ms;\n    idle tx interval 1000 ms;\n    multiplier {m};\n  }};\n}}\n\n\
         protocol kernel kernel4 {{\n  ipv4 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\n\
         protocol kernel kernel6 {{\n  ipv6 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\n\
         template bgp lb_node {{\n  local as {ROUTER_AS};\n  bfd on;\n  graceful restart off;\n  connect retry time 1;\n  error wait time 1, 10;\n}}\n",
        log = log.display(),
        rid = r.node.v4,
        ifname = r.node.ifname,
        ms = bfd.interval_ms,
        m = bfd.multiplier,
    );
    for (i, l) in t.lbs.iter().enumerate() {
        o += &format!(
            "\nprotocol bgp lb{i}_v4 from lb_node {{\n  neighbor {} as {NODE_AS};\n  ipv4 {{ import where net ~ [ {}{{32,32}} ]; export none; }};\n}}\n",
            l.v4,
            crate::netns::VIP_NET_V4
        );
        o += &format!(
            "\nprotocol bgp lb{i}_v6 from lb_node {{\n  neighbor {} as {NODE_AS};\n  ipv6 {{ import where net ~ [ {}{{128,128}} ]; export none; }};\n}}\n",
            l.v6,
            crate::netns::VIP_NET_V6
        );
    }
    o
}

/// A balancer node's main BIRD config: its log, then lbd's file (router id, device,
/// BFD, the sessions to the router and the VIP routes: everything else).
pub fn node_config(lbd_file: &Path, log: &Path) -> String {
    format!(
        "log \"{}\" all;\n# Router id, BFD, the BGP sessions and the VIP routes: written by lbd.\ninclude \"{}\";\n",
        log.display(),
        lbd_file.display()
    )
}

/// The `[bgp]` table of lbd's config on balancer `lb` of `t`: one session to the router
/// per address family, BFD at `bfd`, BIRD's control socket and lbd's file in `bird`'s
/// directory (`lbd_file`).
pub fn lbd_bgp_section(
    t: &Topology,
    lb: usize,
    bird: &Bird,
    lbd_file: &Path,
    bfd: Bfd,
    drain_ms: u32,
) -> String {
    let r = t.router();
    format!(
        "[bgp]\nlocal_as = {NODE_AS}\nrouter_id = \"{rid}\"\nbfd = true\nbfd_interval_ms = {}\nbfd_multiplier = {}\n\
         control_socket = \"{}\"\nbird_config = \"{}\"\ndrain_ms = {drain_ms}\n\n\
         [[bgp.neighbor]]\naddress = \"{}\"\nas = {ROUTER_AS}\n\n[[bgp.neighbor]]\naddress = \"{}\"\nas = {ROUTER_AS}\n",
        bfd.interval_ms,
        bfd.multiplier,
        bird.socket().display(),
        lbd_file.display(),
        r.node.v4,
        r.node.v6,
        rid = t.lbs[lb].v4,
    )
}

/// Starts the router's BIRD for `t` (routed) with `router_config`.
pub fn start_router(t: &Topology, bfd: Bfd) -> Bird {
    let mut b = Bird::new(&format!("{}rt", t.prefix), t.router().ns());
    b.write_config(&router_config(t, bfd, &b.log_path()));
    b.start();
    b
}

/// Packets and new flows a balancer forwarded, summed over every service, read from
/// its pinned counters (also when its lbd is dead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub packets: u64,
    pub new_flows: u64,
}

/// `Forwarded` of lbd instance `instance` (its pins); zero when it has none.
pub fn forwarded(instance: &str) -> Forwarded {
    let Ok(s) = Stats::from_pins(&lb_userspace::pins::pin_dir(instance)) else {
        return Forwarded::default();
    };
    (0..MAX_SERVICES)
        .filter_map(|id| s.service(id).ok())
        .fold(Forwarded::default(), |a, c| Forwarded {
            packets: a.packets + c.packets,
            new_flows: a.new_flows + c.new_flows,
        })
}

/// Whether interface `ifname` of namespace `ns` has an XDP program attached.
pub fn xdp_attached(ns: &str, ifname: &str) -> bool {
    run(Command::new("ip").args(["-j", "-n", ns, "link", "show", "dev", ifname]))
        .ok()
        .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
        .is_some_and(|v| v[0].get("xdp").is_some())
}

/// A balancer node announcing over BGP: its lbd and its BIRD.
pub struct BgpNode {
    /// The balancer index in the topology.
    pub lb: usize,
    pub lbd: Lbd,
    pub bird: Bird,
    bgp_section: String,
}

impl BgpNode {
    /// lbd instance `instance` and a BIRD for balancer `lb` of the routed topology `t`;
    /// nothing started. BIRD's config is written (`node_config`).
    pub fn new(t: &Topology, lb: usize, instance: &str, bfd: Bfd, drain_ms: u32) -> BgpNode {
        let lbd = Lbd::new(t, lb, instance);
        let bird = Bird::new(instance, &t.lbs[lb].ns);
        let lbd_file = bird.dir.join("lbd.conf");
        bird.write_config(&node_config(&lbd_file, &bird.log_path()));
        let bgp_section = lbd_bgp_section(t, lb, &bird, &lbd_file, bfd, drain_ms);
        BgpNode {
            lb,
            lbd,
            bird,
            bgp_section,
        }
    }

    /// The file lbd writes and BIRD includes.
    pub fn lbd_file(&self) -> PathBuf {
        self.bird.dir.join("lbd.conf")
    }

    /// lbd's config: its global keys, `services` (`[[service]]` tables), `[bgp]`.
    pub fn write_config(&self, services: &str) {
        self.lbd
            .write_config(&format!("{services}\n{}", self.bgp_section));
    }

    /// Starts lbd, waits until it has written BIRD's file (BIRD's config includes it),
    /// starts BIRD.
    pub fn start(&mut self) {
        self.lbd.start();
        let f = self.lbd_file();
        assert!(
            wait_for(Duration::from_secs(10), || f.exists()).is_some(),
            "lbd did not write {}:\n{}",
            f.display(),
            self.lbd.log()
        );
        self.bird.start();
    }

    /// kill -9 lbd and BIRD (its XDP program stays attached: see `Topology::set_lb_link`).
    pub fn kill(&mut self) {
        self.lbd.kill();
        self.bird.kill();
    }

    /// `lbctl status`'s `bgp` object.
    pub fn bgp_status(&self) -> serde_json::Value {
        self.lbd.lbctl_json(&["status"])["bgp"].clone()
    }

    pub fn forwarded(&self) -> Forwarded {
        forwarded(&self.lbd.instance)
    }
}

/// A router BIRD and BGP nodes on every balancer of a routed topology.
pub struct BgpLab {
    pub router: Bird,
    pub nodes: Vec<BgpNode>,
}

impl BgpLab {
    /// Starts the router's BIRD; makes node `i` with lbd instance `<instance_prefix><i>`
    /// (not started).
    pub fn new(t: &Topology, instance_prefix: &str, bfd: Bfd, drain_ms: u32) -> BgpLab {
        let router = start_router(t, bfd);
        let nodes = (0..t.lbs.len())
            .map(|i| BgpNode::new(t, i, &format!("{instance_prefix}{i}"), bfd, drain_ms))
            .collect();
        BgpLab { router, nodes }
    }

    /// The same lbd config (`services`) on every node.
    pub fn write_config(&self, services: &str) {
        for n in &self.nodes {
            n.write_config(services);
        }
    }

    pub fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.start();
        }
    }

    /// Runs `lbctl ARGS` on every node whose lbd runs in `which`; panics on a failure.
    pub fn lbctl_on(&self, which: &[usize], args: &[&str]) {
        for &i in which {
            let (ok, _, err) = self.nodes[i].lbd.lbctl(args);
            assert!(ok, "node {i}: lbctl {args:?}: {err}");
        }
    }

    /// `forwarded` of every node.
    pub fn forwarded(&self) -> Vec<Forwarded> {
        self.nodes.iter().map(BgpNode::forwarded).collect()
    }

    /// Every log (lbd and BIRD of each node, the router's BIRD), for a failure message.
    pub fn logs(&self) -> String {
        let mut o = format!("--- router BIRD:\n{}", self.router.log());
        for (i, n) in self.nodes.iter().enumerate() {
            o += &format!(
                "--- node {i} lbd:\n{}--- node {i} BIRD:\n{}",
                n.lbd.log(),
                n.bird.log()
            );
        }
        o
    }
}

/// The flow-table entry of lbd instance `instance` (its pinned `FLOWS`) for `key`.
pub fn flow_entry(instance: &str, key: &FlowKey) -> Option<FlowValue> {
    let m = MapData::from_pin(lb_userspace::pins::pin_dir(instance).join(map_names::FLOWS)).ok()?;
    let flows: BpfHashMap<MapData, FlowKey, FlowValue> =
        BpfHashMap::try_from(Map::LruHashMap(m)).ok()?;
    flows.get(key, 0).ok()
}

/// One attempt of `new_conn_load`: when it started (since the load began), how long
/// connect + greeting + one echo took, or why it failed.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub result: Result<Duration, String>,
}

/// What `new_conn_load` saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub attempts: usize,
    /// (start, error) of every attempt that failed or took longer than `slow` (a SYN
    /// lost on a dead path is retransmitted only after 1 s).
    pub failed: Vec<(Duration, String)>,
    /// The outage: from the first failed attempt's start to the start of the first
    /// success after the last failed one; zero without failures.
    pub gap: Duration,
    /// The longest time between the starts of two consecutive good attempts.
    pub max_success_gap: Duration,
    /// The start of the first good attempt after the last failed one.
    pub first_good_after_failures: Option<Duration>,
}

impl LoadReport {
    pub fn from_attempts(mut v: Vec<Attempt>, slow: Duration) -> LoadReport {
        v.sort_by_key(|a| a.at);
        let bad = |a: &Attempt| !matches!(a.result, Ok(d) if d <= slow);
        let failed: Vec<(Duration, String)> = v
            .iter()
            .filter(|a| bad(a))
            .map(|a| {
                let why = match &a.result {
                    Ok(d) => format!("slow: {d:?}"),
                    Err(e) => e.clone(),
                };
                (a.at, why)
            })
            .collect();
        let gap = match (failed.first(), failed.last()) {
            (Some((first, _)), Some((last, _))) => {
                let end = v
                    .iter()
                    .find(|a| a.at > *last && !bad(a))
                    .map_or(v.last().map_or(*last, |a| a.at), |a| a.at);
                end - *first
            }
            _ => Duration::ZERO,
        };
        let good: Vec<Duration> = v.iter().filter(|a| !bad(a)).map(|a| a.at).collect();
        let max_success_gap = good
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let first_good_after_failures = failed
            .last()
            .and_then(|(last, _)| v.iter().find(|a| a.at > *last && !bad(a)).map(|a| a.at));
        LoadReport {
            attempts: v.len(),
            failed,
            gap,
            max_success_gap,
            first_good_after_failures,
        }
    }

    /// The outage counted from `event` (on the attempts' clock, e.g. a kill): until the
    /// start of the first good attempt after the last failed one; zero without
    /// failures, `Duration::MAX` when the load ended before a good one came back.
    /// Attempts that happened to take live paths right after the event do not shorten
    /// it, unlike `gap`.
    pub fn outage_since(&self, event: Duration) -> Duration {
        match (self.failed.last(), self.first_good_after_failures) {
            (None, _) => Duration::ZERO,
            (Some(_), Some(end)) => end.saturating_sub(event),
            (Some(_), None) => Duration::MAX,
        }
    }
}

/// A request of the load: connect to `vip:port`, read the echo server's greeting,
/// echo one line, close; the backend's name.
pub fn request(t: &Topology, vip: IpAddr, port: u16) -> std::io::Result<String> {
    let mut c = t.connect(vip, port)?;
    c.echo("ping")?;
    Ok(c.backend)
}

/// Every `every` until `stop` (at most `max`), a `request` in a thread of its own (a
/// SYN lost on a dead path does not delay the next ones); joins them all. `Attempt::at`
/// counts from `origin` (the caller's clock, to compare with its own events).
pub fn new_conn_load(
    t: &Topology,
    vip: IpAddr,
    port: u16,
    every: Duration,
    stop: &AtomicBool,
    max: Duration,
    origin: Instant,
) -> Vec<Attempt> {
    let out = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        let mut n = 0u32;
        while !stop.load(Ordering::SeqCst) && start.elapsed() < max {
            let out = &out;
            s.spawn(move || {
                let t0 = Instant::now();
                let r = request(t, vip, port)
                    .map(|_| t0.elapsed())
                    .map_err(|e| e.to_string());
                out.lock().unwrap().push(Attempt {
                    at: t0.duration_since(origin),
                    result: r,
                });
            });
            n += 1;
            if let Some(d) = (start + every * n).checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    });
    out.into_inner().unwrap()
}

/// Echoes on every connection of `conns` in turn until `stop` (at most `max`), at
/// most one round per `every`; a connection that fails once is not used again. The
/// indexes of the broken ones with their errors, and the rounds done.
pub fn echo_load(
    conns: &mut [Conn],
    every: Duration,
    stop: &AtomicBool,
    max: Duration,
) -> (Vec<(usize, String)>, usize) {
    let mut broken: Vec<(usize, String)> = Vec::new();
    let start = Instant::now();
    let mut rounds = 0;
    while !stop.load(Ordering::SeqCst) && start.elapsed() < max {
        let t0 = Instant::now();
        for (i, c) in conns.iter_mut().enumerate() {
            if broken.iter().any(|(b, _)| *b == i) {
                continue;
            }
            if let Err(e) = c.echo(&format!("r{rounds}-c{i}")) {
                broken.push((i, format!("round {rounds} at {:?}: {e}", start.elapsed())));
            }
        }
        rounds += 1;
        if let Some(d) = every.checked_sub(t0.elapsed()) {
            std::thread::sleep(d);
        }
    }
    (broken, rounds)
}

/// Echoes once more on every connection: the indexes of those that fail, with why.
pub fn echo_all(conns: &mut [Conn], tag: &str) -> Vec<(usize, String)> {
    conns
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| {
            c.echo(&format!("{tag}-{i}"))
                .err()
                .map(|e| (i, e.to_string()))
        })
        .collect()
}

/// The node indexes whose flow table holds connection `c` (to `vip:port`).
pub fn nodes_holding(nodes: &[BgpNode], c: &Conn, vip: IpAddr, port: u16) -> Vec<usize> {
    let key = crate::netns::tcp_flow_key(c.local, std::net::SocketAddr::new(vip, port));
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| flow_entry(&n.lbd.instance, &key).is_some())
        .map(|(i, _)| i)
        .collect()
}

/// What `watch_leave` saw from the moment a node started leaving (drain).
#[derive(Clone, Copy, Debug, Default)]
pub struct Leave {
    /// When the router's route to the VIP first had exactly the other nodes.
    pub converged: Option<Duration>,
    /// When the node's forwarded-packet counter last moved (None: never after `t0`).
    pub last_packet: Option<Duration>,
    /// Its counter at the end.
    pub packets: u64,
}

/// From `t0` (the drain command), until `t0 + span`: samples node `node`'s forwarded
/// packets (about every 5 ms) and the router's route to `vip` (want `others`).
#[allow(clippy::too_many_arguments)]
pub fn watch_leave(
    t: &Topology,
    lab: &BgpLab,
    node: usize,
    vip: IpAddr,
    others: &[usize],
    t0: Instant,
    before: u64,
    span: Duration,
) -> Leave {
    let mut want = others.to_vec();
    want.sort();
    let mut l = Leave {
        packets: before,
        ..Leave::default()
    };
    while t0.elapsed() < span {
        let p = lab.nodes[node].forwarded().packets;
        if p != l.packets {
            l.packets = p;
            l.last_packet = Some(t0.elapsed());
        }
        if l.converged.is_none() && t.router_lbs(vip) == want {
            l.converged = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    l
}

/// The service port of `gue_lab`.
pub const LAB_PORT: u16 = 80;

/// A routed topology `prefix` with `lbs` balancers and `backends` backends (echo
/// servers on `LAB_PORT` on all, ready for second chance), the BGP lab on it (router
/// BIRD started with BFD 100 ms × 3, nodes `<prefix without '-'><i>` configured, not
/// started) and two gue services over backends `0..in_service`: `g` on `vip_v4(1)`
/// (returned) and `g6` on `lab_vip6()`.
pub fn gue_lab(
    prefix: &str,
    lbs: usize,
    backends: usize,
    in_service: usize,
    drain_ms: u32,
) -> (Topology, BgpLab, IpAddr) {
    let t = Topology::routed(prefix, TopoSpec { lbs, backends });
    let vip = vip_v4(1);
    t.add_vip_to_backends(vip);
    t.add_vip_to_backends(lab_vip6());
    t.enable_second_chance();
    t.start_servers(LAB_PORT, ServerMode::Echo);
    let lab = BgpLab::new(&t, prefix.trim_end_matches('-'), Bfd::FAST, drain_ms);
    let service = |name: &str, vip: IpAddr| {
        let backends: String = (0..in_service)
            .map(|i| {
                format!(
                    "[[service.backend]]\naddress = \"{}\"\n",
                    t.backends[i].addr(vip.is_ipv6())
                )
            })
            .collect();
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{}/tcp\"\nmode = \"gue\"\ntable_size = 1009\n{backends}\n",
            SocketAddr::new(vip, LAB_PORT)
        )
    };
    lab.write_config(&(service("g", vip) + &service("g6", lab_vip6())));
    (t, lab, vip)
}

/// The IPv6 VIP of `gue_lab` (service `g6`).
pub fn lab_vip6() -> IpAddr {
    vip_v6(1)
}

/// How many of `via` (a node index per connection) each of `nodes` nodes has.
pub fn per_node(via: &[usize], nodes: usize) -> Vec<usize> {
    let mut n = vec![0; nodes];
    for &v in via {
        n[v] += 1;
    }
    n
}

impl BgpLab {
    /// Starts nodes `which` and waits (≤ 30 s) until the router's route to `vip` has
    /// exactly them; the time it took. Panics with every log otherwise.
    pub fn start_nodes(&mut self, t: &Topology, vip: IpAddr, which: &[usize]) -> Duration {
        let t0 = Instant::now();
        for &i in which {
            self.nodes[i].start();
        }
        assert!(
            t.wait_router_lbs(vip, which, Duration::from_secs(30))
                .is_some(),
            "router next hops for {vip}: {:?}, want nodes {which:?}\n{}",
            t.router_next_hops(vip),
            self.logs()
        );
        t0.elapsed()
    }

    /// `n` long-lived connections to `vip:port` and the node each went through (the
    /// one whose flow table holds it; exactly one must).
    pub fn open_long_lived(
        &self,
        t: &Topology,
        vip: IpAddr,
        port: u16,
        n: usize,
    ) -> (Vec<Conn>, Vec<usize>) {
        let conns: Vec<Conn> = (0..n)
            .map(|i| {
                t.connect(vip, port)
                    .unwrap_or_else(|e| panic!("long-lived {i}: {e}\n{}", self.logs()))
            })
            .collect();
        let via = conns
            .iter()
            .map(|c| {
                let on = nodes_holding(&self.nodes, c, vip, port);
                assert_eq!(
                    on.len(),
                    1,
                    "{}: exactly one node holds a new flow: {on:?}",
                    c.local
                );
                on[0]
            })
            .collect();
        (conns, via)
    }

    /// Node `victim` dies as a machine does: its link first, so nothing it would still
    /// send (BIRD's TCP FIN when the kernel closes its sockets) reaches the router and
    /// BFD has to notice; then kill -9 of its lbd and BIRD. Whether its XDP program
    /// stayed attached after the kill.
    pub fn die(&mut self, t: &Topology, victim: usize) -> bool {
        t.set_lb_link(victim, false);
        self.nodes[victim].kill();
        xdp_attached(&t.lbs[victim].ns, &t.lbs[victim].ifname)
    }

    /// A node that `die`d comes back: link up, lbd (adopting its pinned maps) and BIRD.
    pub fn revive(&mut self, t: &Topology, node: usize) {
        t.set_lb_link(node, true);
        self.nodes[node].start();
    }
}
