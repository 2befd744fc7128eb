//! The BGP lab (`cargo xtask lab --bgp`, issue 14): the web/app/db tiers of
//! `crate::lab` behind three lbd nodes that announce the VIPs over BGP, built on
//! `netns::Topology::routed` (3 balancers, 6 backends) and the BIRD configs of
//! `crate::bgp`:
//!
//! ```text
//!  client ── router (BIRD: BGP + BFD to n1..n3, merge paths, L4 hash)
//!              │ segment
//!              ├── n1, n2, n3: lbd + its own BIRD (includes the file lbd writes)
//!              └── web1, web2 (nginx) · app1, app2, app3 (lb-lab-app) · db1 (MariaDB)
//! ```
//!
//! - Services in gue mode with second chance on the backends (a flow that ECMP moves
//!   to another node after a backend change still reaches the server holding it).
//! - Every tier reaches the next one through the router too: backends route the other
//!   tiers' VIPs via it, so nginx → app VIP and app → db VIP are spread by ECMP over the
//!   balancers like the client's traffic. The router hairpins on the segment: it sends
//!   no ICMP redirects (a backend that followed one would bypass ECMP).
//! - The bridge floods no unknown unicast to the balancers' ports (`Topology::routed`):
//!   a dead node's packets are lost until BFD withdraws its routes, as on real NICs.
//! - Processes are detached with pid files (`lab::Site`): `lbd-n<i>`, `bird-n<i>`,
//!   `bird-router`, the tiers; `down` finds everything by prefix and state directory.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bgp::{
    Attempt, Bfd, Forwarded, LoadReport, NODE_AS, ROUTER_AS, flow_entry, forwarded, node_config,
    router_config,
};
use crate::lab::{self, Counts, KeepAlive, LbNode, Site, app_vip, db_vip, lbd_instances, web_vip};
use crate::lbd::{poll_every, wait_for};
use crate::netns::{TopoSpec, Topology, sysctl, tcp_flow_key};

/// The BGP lab's fixed prefix and state directory (`cargo xtask lab --bgp`).
pub const BGP_LAB_PREFIX: &str = "labg-";
pub const BGP_LAB_DIR: &str = "/var/lib/lb-lab-bgp";
/// Balancer nodes.
pub const NODES: usize = 3;
/// BFD on every session: 100 ms × 3.
pub const BFD: Bfd = Bfd::FAST;
/// How long a withdrawing node keeps forwarding before it stops (SIGTERM).
pub const DRAIN_MS: u32 = 1000;
/// A request slower than this lost a packet on the way (a lost SYN is sent again only
/// after 1 s).
pub const SLOW: Duration = Duration::from_millis(500);
/// Keep-alive connections held across the steps.
pub const KEEPALIVES: usize = 9;
const CONVERGE: Duration = Duration::from_secs(30);

/// Removes a BGP lab (as `lab::down`, with its three lbd instances).
pub fn down(prefix: &str, dir: &Path) -> Vec<String> {
    lab::down_with(prefix, dir, &lbd_instances(prefix, NODES))
}

/// A node's BIRD files, in the node's directory.
fn bird_conf(n: &LbNode) -> PathBuf {
    n.dir.join("bird.conf")
}
pub fn bird_socket(n: &LbNode) -> PathBuf {
    n.dir.join("bird.ctl")
}
/// The file lbd writes and BIRD includes.
fn lbd_bird_file(n: &LbNode) -> PathBuf {
    n.dir.join("bird-lbd.conf")
}

/// `birdc -s SOCK CMD`: stdout, if BIRD answered.
pub fn birdc(socket: &Path, cmd: &str) -> Option<String> {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(cmd.split_whitespace())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct LabBgp {
    site: Site,
    pub nodes: Vec<LbNode>,
}

impl std::ops::Deref for LabBgp {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.site
    }
}

/// The traffic per balancer between two `LabBgp::forwarded` snapshots.
pub fn shares(before: &[Forwarded], after: &[Forwarded]) -> Vec<Forwarded> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| Forwarded {
            packets: a.packets.saturating_sub(b.packets),
            new_flows: a.new_flows.saturating_sub(b.new_flows),
        })
        .collect()
}

/// "n1 40, n2 37, n3 45" (new connections per node).
pub fn spread(s: &[Forwarded]) -> String {
    s.iter()
        .enumerate()
        .map(|(i, f)| format!("n{} {}", i + 1, f.new_flows))
        .collect::<Vec<_>>()
        .join(", ")
}

impl LabBgp {
    /// Builds and starts everything; `progress` gets one line per phase. A failure
    /// panics, and the drop removes what was made.
    pub fn up(prefix: &str, dir: &Path, progress: &dyn Fn(&str)) -> LabBgp {
        crate::require_root();
        let _ = down(prefix, dir);
        fs::create_dir_all(dir.join("pids")).expect("state dir");
        progress(
            "namespaces: client, router, switch (bridge), lb0, lb1, lb2, web1, web2, app1, app2, db1, app3",
        );
        let t = Topology::routed(
            prefix,
            TopoSpec {
                lbs: NODES,
                backends: 6,
            },
        );
        t.enable_second_chance();
        // A node that dies takes its link down; its IPv6 address must survive that
        // for its IPv6 BGP session to come back when it returns.
        for lb in &t.lbs {
            sysctl(
                &lb.ns,
                &format!("net.ipv6.conf.{}.keep_addr_on_down", lb.ifname),
                "1",
            )
            .unwrap();
        }
        let nodes: Vec<LbNode> = (0..NODES)
            .map(|i| {
                let lb = &t.lbs[i];
                let d = dir.join(format!("n{}", i + 1));
                fs::create_dir_all(&d).expect("node dir");
                LbNode {
                    instance: format!("{prefix}n{}", i + 1),
                    ns: lb.ns.clone(),
                    ifname: lb.ifname.clone(),
                    dir: d,
                }
            })
            .collect();
        let lab = LabBgp {
            site: Site::new(t, prefix, dir, lbd_instances(prefix, NODES)),
            nodes,
        };
        let r = lab.t.router().node.clone();
        for k in ["all", "default", r.ifname.as_str()] {
            sysctl(&r.ns, &format!("net.ipv4.conf.{k}.send_redirects"), "0").unwrap();
        }
        lab.network(Some(IpAddr::V4(r.v4)));
        lab.start_tiers(progress);
        progress(&format!(
            "router: BIRD, BGP (AS {ROUTER_AS}) with BFD {} ms × {} to each node, merge paths into the kernel, L4 ECMP hash",
            BFD.interval_ms, BFD.multiplier
        ));
        lab.start_router_bird();
        progress(&format!(
            "load balancers: lbd on n1, n2, n3 (services web, app, db in gue mode, health-checked), each with its BIRD (AS {NODE_AS})"
        ));
        lab.write_configs();
        for i in 0..NODES {
            lab.start_node(i);
        }
        for n in &lab.nodes {
            assert!(
                wait_for(Duration::from_secs(15), || n.all_backends_up(5)).is_some(),
                "{}: every backend up: {}",
                n.instance,
                n.lbctl(&["backend", "list"]).1
            );
        }
        lab.wait_paths(&[0, 1, 2]).unwrap_or_else(|e| panic!("{e}"));
        progress(
            "ready: every backend healthy, the router has a path through every node to every VIP",
        );
        lab
    }

    /// Leaves everything running after this value is gone (`down` removes it).
    pub fn keep(self) {
        self.site.keep();
    }

    fn start_router_bird(&self) {
        let d = self.dir.join("router");
        fs::create_dir_all(&d).expect("router dir");
        fs::write(
            d.join("bird.conf"),
            router_config(&self.t, BFD, &d.join("bird.log")),
        )
        .expect("router BIRD config");
        self.start_bird(
            "bird-router",
            self.t.router().ns(),
            &d.join("bird.conf"),
            &d.join("bird.ctl"),
        );
    }

    /// Starts BIRD (detached) and waits until its control socket answers.
    fn start_bird(&self, name: &str, ns: &str, conf: &Path, sock: &Path) {
        let d = conf.parent().expect("BIRD dir");
        let args: Vec<String> = [
            "-f",
            "-c",
            &conf.display().to_string(),
            "-s",
            &sock.display().to_string(),
            "-P",
            &d.join("bird.pid").display().to_string(),
        ]
        .map(str::to_string)
        .to_vec();
        self.spawn(name, ns, "bird", &args);
        assert!(
            wait_for(Duration::from_secs(10), || birdc(sock, "show status")
                .is_some())
            .is_some(),
            "{name} did not answer on {}: see {}",
            sock.display(),
            self.dir.join(format!("{name}.log")).display()
        );
    }

    /// Each node's lbd config and its BIRD's main config (`write_node_config`).
    fn write_configs(&self) {
        for i in 0..NODES {
            self.write_node_config(i, &lab::APP);
        }
    }

    /// Node `i`'s lbd config (the lab's services in gue mode, the app service over
    /// backends `app`; `[bgp]` toward the router) and its BIRD's main config (a log and
    /// lbd's file).
    pub fn write_node_config(&self, i: usize, app: &[usize]) {
        let services = self.services("mode = \"gue\"\n", app);
        let r = self.t.router();
        let n = &self.nodes[i];
        let me = &self.t.lbs[i];
        // As crate::bgp::lbd_bgp_section, with the lab's paths.
        let bgp = format!(
            "[bgp]\nlocal_as = {NODE_AS}\nrouter_id = \"{}\"\nbfd = true\nbfd_interval_ms = {}\nbfd_multiplier = {}\n\
             control_socket = \"{}\"\nbird_config = \"{}\"\ndrain_ms = {DRAIN_MS}\n\n\
             [[bgp.neighbor]]\naddress = \"{}\"\nas = {ROUTER_AS}\n\n[[bgp.neighbor]]\naddress = \"{}\"\nas = {ROUTER_AS}\n",
            me.v4,
            BFD.interval_ms,
            BFD.multiplier,
            bird_socket(n).display(),
            lbd_bird_file(n).display(),
            r.node.v4,
            r.node.v6,
        );
        let cfg = format!(
            "instance = \"{}\"\ninterfaces = [\"{}\"]\nxdp_mode = \"native\"\nencap_source_v4 = \"{}\"\nencap_source_v6 = \"{}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n{services}\n{bgp}",
            n.instance,
            n.ifname,
            me.v4,
            me.v6,
            n.socket().display(),
            n.dir.join("state").display(),
        );
        fs::write(n.config(), cfg).expect("lbd config");
        fs::write(
            bird_conf(n),
            node_config(&lbd_bird_file(n), &n.dir.join("bird.log")),
        )
        .expect("node BIRD config");
    }

    /// Starts node `i`: lbd, then (once lbd has written the file it includes) its BIRD.
    pub fn start_node(&self, i: usize) {
        let n = &self.nodes[i];
        self.start_lbd_node(n, i + 1);
        let f = lbd_bird_file(n);
        assert!(
            wait_for(Duration::from_secs(10), || f.exists()).is_some(),
            "lbd n{} did not write {}",
            i + 1,
            f.display()
        );
        self.start_bird(
            &format!("bird-n{}", i + 1),
            &n.ns,
            &bird_conf(n),
            &bird_socket(n),
        );
    }

    /// Node `i` dies as a machine does: its link down first (so the kernel's FIN of
    /// the dead BIRD's BGP session never reaches the router: BFD must notice), then
    /// lbd and its BIRD killed (-9).
    pub fn kill_node(&self, i: usize) {
        self.t.set_lb_link(i, false);
        self.stop(&format!("lbd-n{}", i + 1), libc::SIGKILL);
        self.stop(&format!("bird-n{}", i + 1), libc::SIGKILL);
    }

    /// A killed node returns: link up, lbd and BIRD started.
    pub fn restore_node(&self, i: usize) {
        self.t.set_lb_link(i, true);
        self.start_node(i);
    }

    /// The router's BGP sessions: (established, all), IPv4 and IPv6 to each node.
    pub fn router_sessions(&self) -> (usize, usize) {
        let out =
            birdc(&self.dir.join("router").join("bird.ctl"), "show protocols").unwrap_or_default();
        let bgp: Vec<&str> = out.lines().filter(|l| l.contains(" BGP ")).collect();
        (
            bgp.iter().filter(|l| l.contains("Established")).count(),
            bgp.len(),
        )
    }

    /// Packets the backends' decap programs handed on by second chance so far (SYNs
    /// for a port nobody listens on, packets of connections another backend holds).
    pub fn second_chance(&self) -> u64 {
        self.t
            .backends
            .iter()
            .filter_map(|b| lb_userspace::decap::stats(&b.ifname).ok())
            .flatten()
            .filter(|(n, _)| *n == "second_chance_syn" || *n == "second_chance_not_held")
            .map(|(_, c)| c.packets)
            .sum()
    }

    /// Packets and new flows each node forwarded so far (its pinned counters).
    pub fn forwarded(&self) -> Vec<Forwarded> {
        self.nodes.iter().map(|n| forwarded(&n.instance)).collect()
    }

    /// The nodes (indexes) the router's route to `vip` goes through now.
    pub fn paths(&self, vip: IpAddr) -> Vec<usize> {
        self.t.router_lbs(vip)
    }

    /// Waits until the router's routes to every VIP go through exactly nodes `which`.
    pub fn wait_paths(&self, which: &[usize]) -> Result<Duration, String> {
        let t = Instant::now();
        for v in [web_vip(), app_vip(), db_vip()] {
            if self.t.wait_router_lbs(v, which, CONVERGE).is_none() {
                return Err(format!(
                    "router's paths to {v}: nodes {:?}, want {which:?}",
                    self.paths(v)
                ));
            }
        }
        Ok(t.elapsed())
    }

    /// The node whose flow table holds the client's connection from `local` to the web
    /// VIP.
    pub fn node_of(&self, local: SocketAddr) -> Option<usize> {
        let key = tcp_flow_key(local, SocketAddr::new(web_vip(), 80));
        self.nodes
            .iter()
            .position(|n| flow_entry(&n.instance, &key).is_some())
    }

    /// `KEEPALIVES` keep-alive connections to the web VIP, each used once (so each node's
    /// flow table holds its own), with the node each goes through.
    pub fn open_keepalives(&self) -> Held {
        let mut conns = Vec::new();
        for k in 0..KEEPALIVES {
            let mut ka = self
                .keepalive()
                .unwrap_or_else(|e| panic!("keep-alive connection {k}: {e}"));
            let web = page(&mut ka).unwrap_or_else(|e| panic!("keep-alive connection {k}: {e}"));
            let via = self.node_of(ka.local);
            conns.push(HeldConn {
                ka,
                web,
                via,
                requests: 1,
                error: None,
            });
        }
        Held { conns }
    }

    /// One visit every `every`, each in a thread of its own (a SYN lost on a dead path
    /// delays only its own request), until `stop` or `max`: the counts (in start order)
    /// and the attempts for `LoadReport`.
    /// `start`: the clock of the attempts (now, or a moment the caller also times
    /// events from).
    pub fn visit_load(
        &self,
        start: Instant,
        every: Duration,
        stop: &AtomicBool,
        max: Duration,
    ) -> (Counts, Vec<Attempt>) {
        type Outcome = (Duration, Duration, Result<(String, String, u64), String>);
        let out: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < max {
                let at = start.elapsed();
                let out = &out;
                s.spawn(move || {
                    let t0 = Instant::now();
                    let r = self.visit();
                    out.lock().unwrap().push((at, t0.elapsed(), r));
                });
                n += 1;
                if let Some(d) = (start + every * n).checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        });
        let mut v = out.into_inner().unwrap();
        v.sort_by_key(|o| o.0);
        let mut c = Counts {
            started: Some(start),
            ..Counts::default()
        };
        let mut attempts = Vec::new();
        for (at, took, r) in v {
            attempts.push(Attempt {
                at,
                result: r.as_ref().map(|_| took).map_err(Clone::clone),
            });
            c.ends.push(at + took);
            c.record(at, r);
        }
        (c, attempts)
    }
}

/// GET /index.html on a keep-alive connection: the web server that answered.
fn page(ka: &mut KeepAlive) -> Result<String, String> {
    let (status, head, _) = ka.get("/index.html").map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}"));
    }
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-web"))
        .map(|(_, v)| v.trim().to_string())
        .ok_or_else(|| "no X-Web header".into())
}

/// One established connection held across the steps.
pub struct HeldConn {
    pub ka: KeepAlive,
    /// The web server it reached first.
    pub web: String,
    /// The node it went through when opened.
    pub via: Option<usize>,
    pub requests: usize,
    /// Why it broke (it is not used again), or the web server changed.
    pub error: Option<String>,
}

/// The keep-alive connections held across the steps.
pub struct Held {
    pub conns: Vec<HeldConn>,
}

impl Held {
    /// One request on every connection still good; a failure or another web server
    /// answering breaks it.
    pub fn round(&mut self, tag: &str) {
        for c in self.conns.iter_mut().filter(|c| c.error.is_none()) {
            match page(&mut c.ka) {
                Ok(w) if w == c.web => c.requests += 1,
                Ok(w) => c.error = Some(format!("{tag}: answered by {w}, was {}", c.web)),
                Err(e) => c.error = Some(format!("{tag}: {e}")),
            }
        }
    }

    /// Rounds every `every` until `stop` (at most `max`).
    pub fn run(&mut self, every: Duration, stop: &AtomicBool, max: Duration) {
        let start = Instant::now();
        let mut k = 0;
        while !stop.load(Ordering::SeqCst) && start.elapsed() < max {
            let t0 = Instant::now();
            self.round(&format!("round {k} at {:?}", start.elapsed()));
            k += 1;
            if let Some(d) = every.checked_sub(t0.elapsed()) {
                std::thread::sleep(d);
            }
        }
    }

    pub fn lost(&self) -> usize {
        self.conns.iter().filter(|c| c.error.is_some()).count()
    }

    pub fn first_error(&self) -> Option<&str> {
        self.conns.iter().find_map(|c| c.error.as_deref())
    }

    /// How many go through each node ("n1 3, n2 4, n3 2").
    pub fn per_node(&self) -> BTreeMap<usize, usize> {
        let mut m = BTreeMap::new();
        for c in &self.conns {
            if let Some(v) = c.via {
                *m.entry(v).or_default() += 1;
            }
        }
        m
    }
}

// ---------------------------------------------------------------- the scenario

/// Step 1's result.
pub struct Spread {
    pub counts: Counts,
    /// Per node, during the step.
    pub shares: Vec<Forwarded>,
    /// The router's paths to the web VIP.
    pub paths: Vec<usize>,
}

/// Step 2's result.
pub struct Kill {
    pub node: usize,
    pub counts: Counts,
    pub load: LoadReport,
    /// From the link going down until new connections worked again (the first good
    /// one after the last slow or failed one): `LoadReport::outage_since`.
    pub outage: Duration,
    /// From the node's link going down until the router's routes no longer go
    /// through it (BFD's detection plus BIRD's route update).
    pub withdrawn_after: Option<Duration>,
    /// Keep-alive connections through the killed node, and all of them lost.
    pub held_via_node: usize,
    pub held: usize,
    pub held_lost: usize,
    pub held_error: Option<String>,
    pub shares: Vec<Forwarded>,
}

/// Step 3's result.
pub struct Maintenance {
    pub node: usize,
    pub counts: Counts,
    /// After `lbctl backend add`, until app3 was in every running node's table.
    pub app3_in_tables_after: Option<Duration>,
    /// After `lbctl node drain`, until the router's routes left the node.
    pub withdrawn_after: Option<Duration>,
    /// Packets the backends passed on by second chance during the step.
    pub second_chance: u64,
    /// Packets the drained node forwarded in the second after `drain_ms`.
    pub drained_packets_after: u64,
    pub held: usize,
    pub held_lost: usize,
    pub held_error: Option<String>,
    pub shares: Vec<Forwarded>,
}

/// Step 4's result.
pub struct Rejoin {
    pub returned: usize,
    pub undrained: usize,
    /// Packets the backends passed on by second chance during the step.
    pub second_chance: u64,
    /// Until its lbd and BIRD ran (lbd answering, BIRD's socket answering).
    pub started_after: Duration,
    /// Until the router's routes went through all three nodes again (the BGP
    /// session re-established, the VIPs announced once their backends are healthy).
    pub back_after: Result<Duration, String>,
    /// The router's BGP sessions (established, all) once the paths are back (IPv6
    /// too, up to 10 s more).
    pub sessions: (usize, usize),
    pub counts: Counts,
    pub shares: Vec<Forwarded>,
    pub held: usize,
    pub held_lost: usize,
    pub held_error: Option<String>,
}

impl LabBgp {
    /// Step 1: visits from the client; each node's share.
    pub fn step_spread(&self, n: usize) -> Spread {
        let before = self.forwarded();
        let counts = self.visits(n, Duration::ZERO, Duration::from_secs(60));
        Spread {
            counts,
            shares: shares(&before, &self.forwarded()),
            paths: self.paths(web_vip()),
        }
    }

    /// Step 2: under a new visit every 20 ms and rounds on the held connections, the
    /// node carrying the most of them dies (-9, lbd and BIRD, link down).
    pub fn step_kill(&self, held: &mut Held) -> Kill {
        let per = held.per_node();
        let node = (0..NODES)
            .max_by_key(|i| per.get(i).copied().unwrap_or(0))
            .unwrap_or(0);
        let held_via_node = per.get(&node).copied().unwrap_or(0);
        let before = self.forwarded();
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let ((counts, attempts), withdrawn_after, kill_at) = std::thread::scope(|s| {
            let load = s.spawn(|| {
                self.visit_load(
                    start,
                    Duration::from_millis(20),
                    &stop,
                    Duration::from_secs(10),
                )
            });
            let hold =
                s.spawn(|| held.run(Duration::from_millis(100), &stop, Duration::from_secs(10)));
            std::thread::sleep(Duration::from_millis(1000));
            // From the link going down (kill_node's first act), not from the end of
            // the kills.
            let t0 = Instant::now();
            self.kill_node(node);
            let rest: Vec<usize> = (0..NODES).filter(|&i| i != node).collect();
            let w = poll_every(Duration::from_millis(5), Duration::from_secs(5), || {
                self.paths(web_vip()) == rest
            })
            .map(|_| t0.elapsed());
            std::thread::sleep(Duration::from_millis(2500));
            stop.store(true, Ordering::SeqCst);
            hold.join().expect("held connections");
            (load.join().expect("load"), w, t0 - start)
        });
        held.round("after the kill");
        let load = LoadReport::from_attempts(attempts, SLOW);
        Kill {
            node,
            outage: load.outage_since(kill_at),
            load,
            counts,
            withdrawn_after,
            held_via_node,
            held: held.conns.len(),
            held_lost: held.lost(),
            held_error: held.first_error().map(str::to_string),
            shares: shares(&before, &self.forwarded()),
        }
    }

    /// Step 3: under a steady request loop, app3 added on every running node, then
    /// running node `node` drained (`lbctl node drain`).
    pub fn step_maintenance(&self, held: &mut Held, running: &[usize], node: usize) -> Maintenance {
        let before = self.forwarded();
        let sc = self.second_chance();
        let stop = AtomicBool::new(false);
        let app3 = self.addr(lab::APP3);
        let (counts, in_tables, withdrawn, drained_packets_after) = std::thread::scope(|s| {
            let load = s.spawn(|| {
                let mut c = Counts::default();
                let t0 = Instant::now();
                c.started = Some(t0);
                // Back to back, one every 25 ms at most, until told.
                while !stop.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(30) {
                    let at = t0.elapsed();
                    let r = self.visit();
                    c.ends.push(t0.elapsed());
                    c.record(at, r);
                    if let Some(d) = Duration::from_millis(25).checked_sub(t0.elapsed() - at) {
                        std::thread::sleep(d);
                    }
                }
                c
            });
            let hold =
                s.spawn(|| held.run(Duration::from_millis(100), &stop, Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(1000));
            let t1 = Instant::now();
            for &i in running {
                let (ok, _, err) =
                    self.nodes[i].lbctl(&["backend", "add", "app", &app3.to_string()]);
                assert!(ok, "n{}: lbctl backend add app {app3}: {err}", i + 1);
            }
            let in_tables = wait_for(Duration::from_secs(10), || {
                running.iter().all(|&i| {
                    self.nodes[i]
                        .health("app", app3)
                        .is_some_and(|(h, t)| h == "up" && t)
                })
            })
            .map(|_| t1.elapsed());
            std::thread::sleep(Duration::from_millis(1000));
            let t2 = Instant::now();
            let (ok, _, err) = self.nodes[node].lbctl(&["node", "drain"]);
            assert!(ok, "n{}: lbctl node drain: {err}", node + 1);
            let rest: Vec<usize> = running.iter().copied().filter(|&i| i != node).collect();
            let w = poll_every(Duration::from_millis(5), Duration::from_secs(5), || {
                self.paths(web_vip()) == rest
            })
            .map(|_| t2.elapsed());
            if let Some(d) = Duration::from_millis(DRAIN_MS.into()).checked_sub(t2.elapsed()) {
                std::thread::sleep(d);
            }
            let p0 = forwarded(&self.nodes[node].instance).packets;
            std::thread::sleep(Duration::from_secs(1));
            let p1 = forwarded(&self.nodes[node].instance).packets;
            stop.store(true, Ordering::SeqCst);
            hold.join().expect("held connections");
            (load.join().expect("load"), in_tables, w, p1 - p0)
        });
        held.round("after the drain");
        Maintenance {
            node,
            counts,
            app3_in_tables_after: in_tables,
            second_chance: self.second_chance() - sc,
            withdrawn_after: withdrawn,
            drained_packets_after,
            held: held.conns.len(),
            held_lost: held.lost(),
            held_error: held.first_error().map(str::to_string),
            shares: shares(&before, &self.forwarded()),
        }
    }

    /// Step 4: the killed node returns (app3 in its config) and the drained one undrains; then `n` visits show every node's share.
    pub fn step_rejoin(&self, held: &mut Held, killed: usize, drained: usize, n: usize) -> Rejoin {
        // Its config lists app3 now, as config management would have it: the node
        // comes back with the same tables as the others.
        self.write_node_config(killed, &[lab::APP[0], lab::APP[1], lab::APP3]);
        let sc = self.second_chance();
        let t0 = Instant::now();
        self.restore_node(killed);
        let started_after = t0.elapsed();
        let (ok, _, err) = self.nodes[drained].lbctl(&["node", "undrain"]);
        assert!(ok, "n{}: lbctl node undrain: {err}", drained + 1);
        let back_after = self.wait_paths(&[0, 1, 2]).map(|_| t0.elapsed());
        let _ = wait_for(Duration::from_secs(10), || {
            let (up, all) = self.router_sessions();
            up == all && all == 2 * NODES
        });
        let sessions = self.router_sessions();
        held.round("after the rejoin");
        // app3 in the returned node's table too, before its share is measured.
        let _ = wait_for(Duration::from_secs(5), || {
            self.nodes[killed].all_backends_up(6)
        });
        let before = self.forwarded();
        let counts = self.visits(n, Duration::ZERO, Duration::from_secs(60));
        let shares = shares(&before, &self.forwarded());
        held.round("after the visits");
        Rejoin {
            returned: killed,
            undrained: drained,
            second_chance: self.second_chance() - sc,
            started_after,
            back_after,
            sessions,
            counts,
            shares,
            held: held.conns.len(),
            held_lost: held.lost(),
            held_error: held.first_error().map(str::to_string),
        }
    }
}
