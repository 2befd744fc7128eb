//! The owner task's state and message handling: the only holder of the `Core` and the
//! only writer of maps. Every other task sends it a `Msg`; handling one is synchronous
//! and returns the `Effects` the shell (`daemon::run`) carries out afterwards (health
//! tasks, next hops to track, VIP addresses, the flow index, the cluster task). The
//! kernel side is behind `Datapath`, so all of this is unit-tested over `MemMaps`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::api::{InterfaceView, Request, Response, StatsView, StatusView};
use crate::cluster::config_sync::{ConfigPos, Incoming, incoming};
use crate::cluster::node::{ClusterCmd, ClusterEvent, ClusterSnapshot};
use crate::cluster::wire::Role;
use crate::config::{Config, XdpModeCfg, content_hash};
use crate::core::{Change, Core, CounterSource, fill_pps};
use crate::health::Target;
use crate::kernel::nexthop::NextHop;
use crate::maps::MapWriter;
use crate::model::ServiceDef;
use crate::persist::{self, State};
use crate::pins::Attached;

/// A message to the owner task.
pub enum Msg {
    /// An lbctl request and where its answer goes.
    Api(Request, oneshot::Sender<Response>),
    /// Check results, as many as were waiting (applied as one batch).
    Health(Vec<(Target, Result<(), String>)>),
    /// Next hops that changed (None: unreachable now).
    NextHops(Vec<(IpAddr, Option<NextHop>)>),
    /// A link appeared, changed or went away.
    Link {
        index: u32,
        name: String,
        present: bool,
    },
    Cluster(ClusterEvent),
    /// Re-read the config file (SIGHUP: no one waits for the answer).
    Reload(Option<oneshot::Sender<Response>>),
    /// Take a counter sample (pps).
    Sample,
    /// The systemd watchdog's proof that this task runs: answered at once.
    Ping(oneshot::Sender<()>),
    /// A metrics scrape: counters and control state as they are now.
    Metrics(oneshot::Sender<anyhow::Result<crate::metrics::Snapshot>>),
    Stop,
}

/// What the shell does after a message.
#[derive(Default)]
pub struct Effects {
    /// Health targets may have changed.
    pub health: bool,
    /// Backend addresses to track may have changed.
    pub track: bool,
    /// The VIPs to hold may have changed.
    pub vips: bool,
    /// The VIP interface was recreated or lost: the addresses on it are gone.
    pub vips_lost: bool,
    /// Backend ids changed: publish a new flow index.
    pub index: bool,
    pub cluster: Vec<ClusterCmd>,
    /// This node became active (report and sync flows) or stopped being it.
    pub active: Option<bool>,
}

impl Effects {
    fn all(&mut self) {
        self.health = true;
        self.track = true;
        self.vips = true;
        self.index = true;
    }
}

/// The kernel side the owner drives: XDP attachments and counters.
pub trait Datapath {
    fn attach(&mut self, interface: &str, mode: XdpModeCfg) -> anyhow::Result<Attached>;
    fn detach(&mut self, interface: &str) -> anyhow::Result<()>;
    /// Detaches everything and removes the instance's pins.
    fn detach_all(&mut self, instance: &str) -> anyhow::Result<Vec<String>>;
    /// The interface's index, None when it does not exist.
    fn ifindex(&self, interface: &str) -> Option<u32>;
    fn counters(&self) -> &dyn CounterSource;
}

/// One configured interface: what `lbctl status` shows, and the link it is on.
#[derive(Clone, Debug)]
pub struct Iface {
    pub view: InterfaceView,
    pub index: Option<u32>,
}

pub const ATTACHED: &str = "attached";
pub const MISSING: &str = "missing";

/// The BGP facts the owner keeps: drained or not, what it last asked the BGP task
/// for, and the task's state (read for `lbctl status`).
pub struct OwnerBgp {
    pub drained: bool,
    pub state: watch::Receiver<crate::bgp::task::TaskState>,
    /// The last `Wanted` handed to the task.
    pub last: crate::bgp::task::Wanted,
}

/// The cluster facts the owner keeps: our config position and role.
pub struct OwnerCluster {
    pub node_id: u32,
    pub pos: ConfigPos,
    pub epoch: u64,
    pub role: Role,
    pub snapshot: watch::Receiver<ClusterSnapshot>,
}

pub struct Owner<W: MapWriter, D: Datapath> {
    pub core: Core<W>,
    pub dp: D,
    pub cfg: Config,
    config_path: PathBuf,
    config_hash: String,
    pub interfaces: BTreeMap<String, Iface>,
    started: Instant,
    adopted: bool,
    pin_dir: PathBuf,
    pub cluster: Option<OwnerCluster>,
    /// Source address towards each backend (the route's), for health checks.
    sources: BTreeMap<IpAddr, IpAddr>,
    samples: VecDeque<(Instant, StatsView)>,
    flow_sync_on: bool,
    pub stopping: bool,
    /// `[bgp]`: set by the shell after `new` when the section is there.
    pub bgp: Option<OwnerBgp>,
    /// `lbctl detach` with BGP: the shell withdraws, waits `drain_ms`, then detaches.
    pub detach_after_drain: bool,
}

impl<W: MapWriter, D: Datapath> Owner<W, D> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: Core<W>,
        dp: D,
        cfg: Config,
        config_path: PathBuf,
        config_hash: String,
        adopted: bool,
        pin_dir: PathBuf,
        cluster: Option<OwnerCluster>,
    ) -> Self {
        Self {
            core,
            dp,
            cfg,
            config_path,
            config_hash,
            interfaces: BTreeMap::new(),
            started: Instant::now(),
            adopted,
            pin_dir,
            cluster,
            sources: BTreeMap::new(),
            samples: VecDeque::new(),
            flow_sync_on: false,
            stopping: false,
            bgp: None,
            detach_after_drain: false,
        }
    }

    /// Attaches the configured interfaces at start. One that does not exist is
    /// reported and attached when it appears; any other failure stops the start
    /// (after undoing what this run attached).
    pub fn attach_at_start(&mut self, saved_modes: &BTreeMap<String, String>) -> anyhow::Result<()> {
        for i in self.cfg.interfaces.clone() {
            let Some(index) = self.dp.ifindex(&i) else {
                warn!(interface = %i, "interface missing: the others work, it is attached when it appears");
                self.interfaces.insert(i.clone(), Iface { view: iface_view(&i, String::new(), false, MISSING), index: None });
                continue;
            };
            match self.dp.attach(&i, self.cfg.xdp_mode) {
                Ok(a) => {
                    let mode = if a.mode.is_empty() { saved_modes.get(&i).cloned().unwrap_or_default() } else { a.mode };
                    info!(interface = %i, mode = %mode, adopted = !a.attached_now, "balancer on interface");
                    self.interfaces.insert(i.clone(), Iface { view: iface_view(&i, mode, a.attached_now, ATTACHED), index: Some(index) });
                }
                Err(e) => {
                    for (name, v) in &self.interfaces {
                        if v.view.attached_now {
                            let _ = self.dp.detach(name);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The datapath settings, with flow reporting on while this node is active.
    fn settings_now(&self, cfg: &Config) -> lb_common::Settings {
        let mut s = cfg.settings();
        if self.flow_sync_on {
            s.flags |= lb_common::SETTINGS_F_FLOW_SYNC;
        }
        s
    }

    pub fn state(&self) -> State {
        State {
            format: persist::FORMAT,
            config_hash: self.config_hash.clone(),
            version: self.core.version,
            services: self.core.services(),
            health: self.core.health_records(),
            interfaces: self.interfaces.iter().filter(|(_, v)| !v.view.mode.is_empty()).map(|(k, v)| (k.clone(), v.view.mode.clone())).collect(),
            cluster_config: self.cluster.as_ref().map(|c| (c.pos.version, c.pos.origin)),
            cluster_epoch: self.cluster.as_ref().map(|c| c.epoch),
        }
    }

    pub fn persist(&self) -> anyhow::Result<()> {
        persist::save(&self.cfg.state_file(), &self.state())
    }

    fn persist_logged(&self, what: &str) {
        if let Err(e) = self.persist() {
            error!(error = %format!("{e:#}"), "saving state after {what}");
        }
    }

    pub fn services_json(&self) -> Arc<Vec<u8>> {
        Arc::new(serde_json::to_vec(&self.core.services()).unwrap_or_default())
    }

    /// A local change of the services: the next position in the pair's order.
    fn local_change(&mut self, fx: &mut Effects) {
        let services = self.services_json();
        if let Some(c) = &mut self.cluster {
            let peer = c.snapshot.borrow().peer_pos;
            c.pos = c.pos.next(peer, c.node_id);
            fx.cluster.push(ClusterCmd::LocalChange { pos: c.pos, services });
        }
    }

    /// The health targets, each with the source address towards its backend.
    pub fn health_targets(&self) -> Vec<Target> {
        let mut v = self.core.health_targets();
        for t in &mut v {
            t.source = self.sources.get(&t.addr).copied();
        }
        v
    }

    /// Backends whose first check is due at once (waiting for it to enter the table).
    pub fn first_check_due(&self) -> BTreeSet<(String, IpAddr)> {
        let mut out = BTreeSet::new();
        for d in self.core.services() {
            for b in &d.backends {
                if self.core.pending(&d, b) == Some("waiting for its first check") {
                    out.insert((d.name.clone(), b.address));
                }
            }
        }
        out
    }

    /// The backend addresses whose next hop comes from the kernel.
    pub fn tracked(&self) -> BTreeSet<IpAddr> {
        self.core.addrs_to_resolve().into_iter().collect()
    }

    /// The VIP addresses this node must hold: every service's when active, else none.
    /// None with `[bgp]`: the routers send VIP traffic by route, not by ARP.
    pub fn wanted_vips(&self) -> BTreeSet<IpAddr> {
        match &self.cluster {
            Some(c) if c.role == Role::Active && !self.stopping && self.cfg.bgp.is_none() => self.core.services().iter().map(|d| d.vip.addr).collect(),
            _ => BTreeSet::new(),
        }
    }

    /// The VIP routes to announce over BGP: each VIP with at least one backend in its
    /// table, none while drained or stopping.
    pub fn bgp_routes(&self) -> BTreeSet<IpAddr> {
        match &self.bgp {
            Some(b) if !b.drained && !self.stopping && self.cfg.bgp.is_some() => self
                .core
                .control()
                .services()
                .iter()
                .filter(|s| s.backends.iter().any(|(b, _)| b.weight > 0))
                .map(|s| s.spec.vip.addr)
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// A new `Wanted` for the BGP task when the routes or `[bgp]` changed since the
    /// last one.
    pub fn bgp_wanted(&mut self) -> Option<crate::bgp::task::Wanted> {
        let routes = self.bgp_routes();
        let cfg = self.cfg.bgp.clone();
        let instance = self.cfg.instance.clone();
        let b = self.bgp.as_mut()?;
        if b.last.seq > 0 && b.last.routes == routes && b.last.cfg.as_deref() == cfg.as_ref() {
            return None;
        }
        b.last = crate::bgp::task::Wanted { seq: b.last.seq + 1, instance, cfg: cfg.map(Arc::new), routes };
        Some(b.last.clone())
    }

    /// `lbctl status`'s BGP part.
    pub fn bgp_view(&self) -> Option<crate::api::BgpView> {
        let b = self.bgp.as_ref()?;
        let st = b.state.borrow().clone();
        Some(crate::api::BgpView {
            drained: b.drained,
            wanted: b.last.routes.iter().copied().collect(),
            in_sync: st.applied_seq == Some(b.last.seq),
            bird: st,
        })
    }

    /// VIPs live on the first configured interface; its index when it exists.
    pub fn vip_interface(&self) -> Option<(String, Option<u32>)> {
        let name = self.cfg.interfaces.first()?;
        Some((name.clone(), self.interfaces.get(name).and_then(|i| i.index)))
    }

    pub fn handle(&mut self, m: Msg) -> Effects {
        let mut fx = Effects::default();
        match m {
            Msg::Api(req, reply) => {
                let r = self.api(req, &mut fx).unwrap_or_else(|e| Response::err(format!("{e:#}")));
                let _ = reply.send(r);
            }
            Msg::Health(results) => self.health_results(results, &mut fx),
            Msg::NextHops(hops) => self.next_hops(hops, &mut fx),
            Msg::Link { index, name, present } => self.link(index, &name, present, &mut fx),
            Msg::Cluster(ClusterEvent::Role(t)) => self.role(t.to, &mut fx),
            Msg::Cluster(ClusterEvent::PeerConfig(pos, data)) => self.peer_config(pos, &data, &mut fx),
            Msg::Reload(reply) => {
                let r = self.reload(&mut fx);
                match &r {
                    Ok(m) => info!("reload: {m}"),
                    Err(e) => error!("reload rejected, nothing changed: {e:#}"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(match r {
                        Ok(m) => Response::ok(serde_json::json!({ "result": m })),
                        Err(e) => Response::err(format!("{e:#}")),
                    });
                }
            }
            Msg::Sample => self.sample_stats(),
            Msg::Ping(reply) => {
                let _ = reply.send(());
            }
            Msg::Metrics(reply) => {
                let _ = reply.send(self.metrics_snapshot());
            }
            Msg::Stop => {
                self.stopping = true;
                fx.health = true;
                fx.vips = true;
            }
        }
        fx
    }

    fn health_results(&mut self, results: Vec<(Target, Result<(), String>)>, fx: &mut Effects) {
        if self.stopping {
            return;
        }
        let (events, errors) = self.core.health_results(results);
        for e in &errors {
            error!(error = %e, "applying a health change");
        }
        for ev in &events {
            if ev.up {
                info!(service = %ev.service, backend = %ev.address, detail = %ev.detail, "backend up: in the table");
            } else {
                warn!(service = %ev.service, backend = %ev.address, detail = %ev.detail, "backend down: out of the table");
            }
        }
        if !events.is_empty() {
            fx.index = true;
            self.persist_logged("a health change");
        }
    }

    fn next_hops(&mut self, hops: Vec<(IpAddr, Option<NextHop>)>, fx: &mut Effects) {
        let mut macs = Vec::with_capacity(hops.len());
        for (a, nh) in hops {
            let src = nh.and_then(|n| n.source);
            let before = match src {
                Some(s) => self.sources.insert(a, s),
                None => self.sources.remove(&a),
            };
            fx.health |= before != src;
            macs.push((a, nh.map(|n| n.mac)));
        }
        match self.core.set_next_hops(&macs) {
            Ok(changed) if !changed.is_empty() => {
                info!(services = ?changed, "next hops changed");
                fx.index = true;
                self.persist_logged("a next-hop change");
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "applying next hops"),
        }
    }

    fn link(&mut self, index: u32, name: &str, present: bool, fx: &mut Effects) {
        let vip_iface = self.cfg.interfaces.first().is_some_and(|v| v == name);
        let mode = self.cfg.xdp_mode;
        let Some(i) = self.interfaces.get_mut(name) else {
            return;
        };
        if present {
            if i.index == Some(index) && i.view.state == ATTACHED {
                return; // a flag change of a link we are on
            }
            match self.dp.attach(name, mode) {
                Ok(a) => {
                    info!(interface = %name, mode = %a.mode, "interface present: balancer attached");
                    if !a.mode.is_empty() {
                        i.view.mode = a.mode;
                    }
                    i.view.attached_now = a.attached_now;
                    i.view.state = ATTACHED.into();
                    i.index = Some(index);
                }
                Err(e) => {
                    error!(interface = %name, error = %format!("{e:#}"), "attaching to a returning interface");
                    i.view.state = format!("error: {e:#}");
                    i.index = Some(index);
                }
            }
            if vip_iface {
                fx.vips_lost = true;
                fx.vips = true;
            }
        } else if i.index.is_none_or(|x| x == index) {
            warn!(interface = %name, "interface gone: balancer detached from it; attached again when it returns");
            i.view.state = MISSING.into();
            i.index = None;
            if vip_iface {
                fx.vips_lost = true;
            }
        }
    }

    fn role(&mut self, to: Role, fx: &mut Effects) {
        let Some(c) = &mut self.cluster else { return };
        c.role = to;
        // The active node reports new flows for the peer; a backup does not.
        let active = to == Role::Active;
        self.flow_sync_on = active;
        let s = self.settings_now(&self.cfg);
        if let Err(e) = self.core.set_settings(s) {
            error!(error = %e, "cluster: switching flow reporting");
        }
        fx.active = Some(active);
        fx.vips = true;
    }

    fn peer_config(&mut self, pos: ConfigPos, data: &[u8], fx: &mut Effects) {
        let Some(c) = &self.cluster else { return };
        match incoming(c.pos, pos) {
            Incoming::Apply => {}
            Incoming::AlreadyHave => {
                fx.cluster.push(ClusterCmd::Applied { pos: c.pos, services: self.services_json() });
                return;
            }
            Incoming::Older => return,
        }
        let defs: Vec<ServiceDef> = match serde_json::from_slice(data) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, %pos, "cluster: peer's config unreadable; kept ours");
                return;
            }
        };
        match self.core.replace_all(defs) {
            Ok(changed) => {
                info!(%pos, changed = ?changed, "cluster: applied the peer's config");
                if let Some(c) = &mut self.cluster {
                    c.pos = pos;
                }
                self.persist_logged("a peer config");
                fx.all();
                fx.cluster.push(ClusterCmd::Applied { pos, services: self.services_json() });
            }
            Err(e) => error!(error = %e, %pos, "cluster: peer's config rejected; kept ours"),
        }
    }

    fn change(&mut self, c: Change, service: &str, fx: &mut Effects) -> anyhow::Result<Response> {
        self.core.apply(c)?;
        self.local_change(fx);
        fx.all();
        // Applied to the datapath; a failed save is reported, the change stays.
        self.persist().context("the change is live but saving the state failed")?;
        Ok(match self.core.service_view(service).ok() {
            Some(v) => Response::ok(v),
            None => Response::ok(serde_json::json!({ "removed": service })),
        })
    }

    fn api(&mut self, req: Request, fx: &mut Effects) -> anyhow::Result<Response> {
        Ok(match req {
            Request::Status {} => Response::ok(self.status()),
            Request::ServiceList {} => Response::ok(self.core.service_views()),
            Request::ServiceShow { name } => Response::ok(self.core.service_view(&name)?),
            Request::ServiceAdd { service } => {
                let name = service.name.clone();
                self.change(Change::AddService(service), &name, fx)?
            }
            Request::ServiceRemove { name } => self.change(Change::RemoveService(name.clone()), &name, fx)?,
            Request::BackendList { service } => Response::ok(self.core.backend_views(service.as_deref())?),
            Request::BackendAdd { service, address, weight, mac } => {
                self.change(Change::AddBackend { service: service.clone(), address, weight, mac }, &service, fx)?
            }
            Request::BackendRemove { service, address } => self.change(Change::RemoveBackend { service: service.clone(), address }, &service, fx)?,
            Request::BackendSetWeight { service, address, weight } => {
                self.change(Change::SetWeight { service: service.clone(), address, weight }, &service, fx)?
            }
            Request::BackendDrain { service, address } => self.change(Change::Drain { service: service.clone(), address }, &service, fx)?,
            Request::BackendEnable { service, address } => self.change(Change::Enable { service: service.clone(), address }, &service, fx)?,
            Request::Stats {} => Response::ok(self.stats_with_pps()?),
            Request::Reload {} => Response::ok(serde_json::json!({ "result": self.reload(fx)? })),
            Request::Detach {} if self.bgp.is_some() => {
                // Withdraw first: the shell detaches after `drain_ms`.
                let ifaces: Vec<String> = self.interfaces.iter().filter(|(_, v)| v.view.state == ATTACHED).map(|(k, _)| k.clone()).collect();
                self.stopping = true;
                self.detach_after_drain = true;
                fx.health = true;
                fx.vips = true;
                Response::ok(serde_json::json!({ "detached": ifaces }))
            }
            Request::NodeDrain {} | Request::NodeUndrain {} => {
                let drain = matches!(req, Request::NodeDrain {});
                let ms = self.cfg.bgp.as_ref().map_or(0, |c| c.drain_ms);
                let Some(b) = &mut self.bgp else {
                    return Ok(Response::err("this lbd has no [bgp] section: nothing is announced, nothing to drain"));
                };
                if b.drained != drain {
                    info!(drained = drain, "bgp: node {}", if drain { "drained: withdrawing every route" } else { "undrained: announcing again" });
                }
                b.drained = drain;
                fx.vips = true;
                Response::ok(serde_json::json!({
                    "result": if drain { format!("withdrawing every route; traffic leaves within drain_ms ({ms} ms) after BIRD confirms (lbctl status)") } else { "announcing again".to_string() }
                }))
            }
            Request::Detach {} => {
                let ifaces = self.dp.detach_all(&self.cfg.instance)?;
                super::remove_lock_file(&self.cfg.instance);
                self.stopping = true;
                fx.health = true;
                fx.vips = true;
                Response::ok(serde_json::json!({ "detached": ifaces }))
            }
            Request::ClusterStatus {} | Request::ClusterFailover {} => Response::err("this lbd has no [cluster] section: it runs standalone"),
        })
    }

    pub fn status(&self) -> StatusView {
        let (up, down, drained) = self.core.backend_counts();
        StatusView {
            instance: self.cfg.instance.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            config_version: self.core.version,
            adopted: self.adopted,
            pin_dir: self.pin_dir.display().to_string(),
            state_file: self.cfg.state_file().display().to_string(),
            interfaces: self.interfaces.values().map(|i| i.view.clone()).collect(),
            services: self.core.services().len(),
            backends: up + down + drained,
            backends_up: up,
            backends_down: down,
            backends_drained: drained,
            backends_pending: self.core.pending_count(),
            cluster: self.cluster.as_ref().map(|c| {
                let s = c.snapshot.borrow().clone();
                if self.cfg.bgp.is_some() {
                    let peers: Vec<String> = s
                        .peers
                        .iter()
                        .map(|p| {
                            let who = p.node_id.map_or(p.address.to_string(), |n| format!("node {n}"));
                            match p.last_heard_ms_ago {
                                Some(ms) => format!(
                                    "{who} {} (last heartbeat {ms} ms ago, config {})",
                                    if p.alive { "alive" } else { "dead" },
                                    p.pos.map_or(String::new(), |p| p.to_string())
                                ),
                                None => format!("{who} never heard"),
                            }
                        })
                        .collect();
                    return format!("node {} active-active, config {}; peers: {}", c.node_id, c.pos, if peers.is_empty() { "none yet".into() } else { peers.join("; ") });
                }
                let peer = match (s.peer_node, s.peer_role) {
                    (Some(n), Some(r)) => format!(
                        "peer node {n} {r} ({}), last heartbeat {} ms ago, config {}",
                        if s.peer_alive { "alive" } else { "dead" },
                        s.last_heard_ms_ago.unwrap_or(0),
                        s.peer_pos.map_or(String::new(), |p| p.to_string())
                    ),
                    _ => "peer never heard".to_string(),
                };
                format!("node {} {}, config {}; {peer}", c.node_id, c.role, c.pos)
            }),
            bgp: self.bgp_view(),
        }
    }

    fn stats_now(&self) -> anyhow::Result<StatsView> {
        Ok(self.core.stats(self.dp.counters())?)
    }

    /// Samples the counters (about once a second; pps = difference of two samples).
    fn sample_stats(&mut self) {
        if let Ok(s) = self.stats_now() {
            self.samples.push_back((Instant::now(), s));
            while self.samples.len() > 3 {
                self.samples.pop_front();
            }
        }
    }

    fn stats_with_pps(&self) -> anyhow::Result<StatsView> {
        let mut now = self.stats_now()?;
        let t = Instant::now();
        // The newest sample at least half a second old.
        if let Some((at, before)) = self.samples.iter().rev().find(|(at, _)| t.duration_since(*at) >= Duration::from_millis(500)) {
            fill_pps(&mut now, before, t.duration_since(*at).as_secs_f64());
        }
        Ok(now)
    }

    /// Re-reads the config file (SIGHUP, `lbctl reload`). All or nothing.
    pub fn reload(&mut self, fx: &mut Effects) -> anyhow::Result<String> {
        let (cfg, src) = Config::load(&self.config_path).map_err(|e| anyhow::anyhow!("{}: {e}", self.config_path.display()))?;
        let hash = content_hash(&src);
        self.cfg.check_reload(&cfg).map_err(anyhow::Error::msg)?;
        if self.config_hash == hash {
            return Ok("config file unchanged".into());
        }
        // New interfaces first (harmless: same maps); undone if anything below fails.
        let mut added = Vec::new();
        let mut failed = None;
        for i in &cfg.interfaces {
            if self.interfaces.contains_key(i) {
                continue;
            }
            let Some(index) = self.dp.ifindex(i) else {
                warn!(interface = %i, "interface missing: attached when it appears");
                self.interfaces.insert(i.clone(), Iface { view: iface_view(i, String::new(), false, MISSING), index: None });
                added.push(i.clone());
                continue;
            };
            match self.dp.attach(i, cfg.xdp_mode) {
                Ok(a) => {
                    self.interfaces.insert(i.clone(), Iface { view: iface_view(i, a.mode, a.attached_now, ATTACHED), index: Some(index) });
                    added.push(i.clone());
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let undo = |me: &mut Self, added: &[String]| {
            for i in added {
                if me.interfaces.remove(i).is_some_and(|v| v.view.state == ATTACHED) {
                    let _ = me.dp.detach(i);
                }
            }
        };
        if let Some(e) = failed {
            undo(self, &added);
            return Err(e);
        }
        let before_settings = *self.core.control().settings();
        let settings = self.settings_now(&cfg);
        let changed = match self.core.set_settings(settings).and_then(|()| self.core.replace_all(cfg.services.clone())) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.core.set_settings(before_settings);
                undo(self, &added);
                return Err(e.into());
            }
        };
        let gone: Vec<String> = self.interfaces.keys().filter(|i| !cfg.interfaces.contains(i)).cloned().collect();
        for i in gone {
            let attached = self.interfaces.get(&i).is_some_and(|v| v.view.state == ATTACHED);
            match if attached { self.dp.detach(&i) } else { Ok(()) } {
                Ok(()) => {
                    self.interfaces.remove(&i);
                }
                Err(e) => {
                    warn!(interface = %i, error = %format!("{e:#}"), "detaching an interface dropped from the config")
                }
            }
        }
        self.config_hash = hash;
        self.cfg = cfg;
        if !changed.is_empty() {
            self.local_change(fx);
        }
        fx.all();
        self.persist().context("saving state")?;
        Ok(if changed.is_empty() { "reloaded; no service changed".into() } else { format!("reloaded; changed: {}", changed.join(", ")) })
    }
}

fn iface_view(name: &str, mode: String, attached_now: bool, state: &str) -> InterfaceView {
    InterfaceView { name: name.to_string(), mode, attached_now, state: state.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::election::{Transition, Why};
    use crate::control::ControlPlane;
    use crate::maps::MemMaps;
    use crate::model::Mac;
    use lb_common::{Counter, TrafficCounter};

    /// Interfaces that exist (name -> index) and what was attached.
    #[derive(Default)]
    struct FakeDp {
        links: BTreeMap<String, u32>,
        attaches: Vec<String>,
        zeros: Zeros,
    }

    #[derive(Default)]
    struct Zeros;

    impl CounterSource for Zeros {
        fn service(&self, _: u32) -> Result<TrafficCounter, crate::maps::MapWriteError> {
            Ok(TrafficCounter::default())
        }
        fn backend(&self, _: u32) -> Result<TrafficCounter, crate::maps::MapWriteError> {
            Ok(TrafficCounter::default())
        }
        fn reasons(&self) -> Result<Vec<Counter>, crate::maps::MapWriteError> {
            Ok(Vec::new())
        }
    }

    impl Datapath for FakeDp {
        fn attach(&mut self, interface: &str, _: XdpModeCfg) -> anyhow::Result<Attached> {
            if !self.links.contains_key(interface) {
                anyhow::bail!("no such interface {interface}");
            }
            self.attaches.push(interface.to_string());
            Ok(Attached { mode: "native".into(), attached_now: true })
        }
        fn detach(&mut self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        fn detach_all(&mut self, _: &str) -> anyhow::Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn ifindex(&self, interface: &str) -> Option<u32> {
            self.links.get(interface).copied()
        }
        fn counters(&self) -> &dyn CounterSource {
            &self.zeros
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An owner over MemMaps with eth0 present and eth1 missing, and a state dir.
    fn owner(cluster: bool) -> (Owner<MemMaps, FakeDp>, tempdir::Dir, Option<watch::Sender<ClusterSnapshot>>) {
        let dir = tempdir::Dir::new();
        let src = format!(
            "instance = \"t\"\ninterfaces = [\"eth0\", \"eth1\"]\nencap_source_v4 = \"10.0.0.5\"\nstate_dir = \"{}\"\nsocket = \"{}/s\"\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.0.100:80/tcp\"\ntable_size = 251\n\
             health = {{ kind = \"tcp\", interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 2 }}\n",
            dir.0.display(),
            dir.0.display()
        );
        let cfg = Config::parse(&src).unwrap();
        let mut core = Core::new(ControlPlane::new(MemMaps::default()));
        core.set_settings(cfg.settings()).unwrap();
        core.replace_all(cfg.services.clone()).unwrap();
        let dp = FakeDp { links: BTreeMap::from([("eth0".to_string(), 2)]), ..FakeDp::default() };
        let (snap_tx, snap_rx) = watch::channel(ClusterSnapshot::default());
        let oc = cluster.then(|| OwnerCluster { node_id: 1, pos: ConfigPos { version: 1, origin: 1 }, epoch: 7, role: Role::Init, snapshot: snap_rx });
        let mut o = Owner::new(core, dp, cfg, dir.0.join("lb.toml"), "hash".into(), false, dir.0.join("pins"), oc);
        o.attach_at_start(&BTreeMap::new()).unwrap();
        (o, dir, cluster.then_some(snap_tx))
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("lb-owner-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn api(o: &mut Owner<MemMaps, FakeDp>, req: Request) -> (Response, Effects) {
        let (tx, mut rx) = oneshot::channel();
        let fx = o.handle(Msg::Api(req, tx));
        (rx.try_recv().expect("answered at once"), fx)
    }

    fn backend(o: &Owner<MemMaps, FakeDp>, a: IpAddr) -> crate::api::BackendView {
        o.core.backend_views(Some("web")).unwrap().into_iter().find(|b| b.address == a).unwrap()
    }

    #[test]
    fn a_backend_added_by_lbctl_waits_for_its_next_hop_and_first_check() {
        let (mut o, _d, _) = owner(false);
        let a = ip("10.0.1.3");
        let (r, fx) = api(&mut o, Request::BackendAdd { service: "web".into(), address: a, weight: 1, mac: None });
        assert!(r.ok, "{:?}", r.error);
        assert!(fx.track && fx.health && fx.index, "the shell tracks its next hop and starts its check");
        assert!(o.tracked().contains(&a));
        assert_eq!(backend(&o, a).pending.as_deref(), Some("next hop unresolved"));
        assert_eq!(o.status().backends_pending, 1);
        // The kernel task finds its next hop: the source address goes to its check.
        let hop = NextHop { mac: "02:00:00:00:01:03".parse::<Mac>().unwrap(), source: Some(ip("10.0.0.5")) };
        let fx = o.handle(Msg::NextHops(vec![(a, Some(hop))]));
        assert!(fx.health, "the check restarts from the new source");
        let t = o.health_targets().into_iter().find(|t| t.addr == a).unwrap();
        assert_eq!(t.source, Some(ip("10.0.0.5")));
        assert!(o.first_check_due().contains(&("web".to_string(), a)), "its first check is due at once");
        assert_eq!(backend(&o, a).pending.as_deref(), Some("waiting for its first check"));
        let fx = o.handle(Msg::Health(vec![(t.clone(), Ok(()))]));
        assert!(fx.index, "a new backend id: the flow index is republished");
        let b = backend(&o, a);
        assert!(b.in_table && b.pending.is_none(), "{b:?}");
        // Its next hop fails: out of the table, pending again.
        o.handle(Msg::NextHops(vec![(a, None)]));
        let b = backend(&o, a);
        assert!(!b.in_table && b.pending.as_deref() == Some("next hop unresolved"), "{b:?}");
        // Saved: a restart restores the health record (no pending again).
        let st: persist::State = serde_json::from_slice(&std::fs::read(o.cfg.state_file()).unwrap()).unwrap();
        assert!(st.health.iter().any(|h| h.address == a && h.up));
    }

    #[test]
    fn interfaces_missing_gone_and_back() {
        let (mut o, _d, _) = owner(false);
        let st = |o: &Owner<MemMaps, FakeDp>, n: &str| o.status().interfaces.into_iter().find(|i| i.name == n).unwrap().state;
        assert_eq!((st(&o, "eth0").as_str(), st(&o, "eth1").as_str()), (ATTACHED, MISSING), "one missing interface does not stop the start");
        assert_eq!(o.dp.attaches, vec!["eth0"]);
        // eth1 appears.
        o.dp.links.insert("eth1".into(), 5);
        o.handle(Msg::Link { index: 5, name: "eth1".into(), present: true });
        assert_eq!(st(&o, "eth1"), ATTACHED);
        // A flag change of the same link (attaching XDP makes one) attaches nothing.
        o.handle(Msg::Link { index: 5, name: "eth1".into(), present: true });
        assert_eq!(o.dp.attaches, vec!["eth0", "eth1"]);
        // eth0 deleted and recreated (a new index): detached, then attached again.
        o.dp.links.remove("eth0");
        let fx = o.handle(Msg::Link { index: 2, name: "eth0".into(), present: false });
        assert!(fx.vips_lost, "VIPs on the VIP interface went with it");
        assert_eq!(st(&o, "eth0"), MISSING);
        o.dp.links.insert("eth0".into(), 9);
        o.handle(Msg::Link { index: 9, name: "eth0".into(), present: true });
        assert_eq!(st(&o, "eth0"), ATTACHED);
        assert_eq!(o.dp.attaches, vec!["eth0", "eth1", "eth0"]);
        assert_eq!(o.vip_interface(), Some(("eth0".into(), Some(9))));
        // Other links are none of our business.
        o.handle(Msg::Link { index: 3, name: "lo".into(), present: true });
        assert_eq!(o.dp.attaches.len(), 3);
    }

    #[test]
    fn roles_switch_flow_reporting_and_vips_and_peer_configs_apply() {
        let (mut o, _d, snap) = owner(true);
        assert!(o.wanted_vips().is_empty(), "not active: no VIP");
        let fx = o.handle(Msg::Cluster(ClusterEvent::Role(Transition { from: Role::Init, to: Role::Active, why: Why::AloneAtStartup })));
        assert_eq!(fx.active, Some(true));
        assert!(fx.vips);
        assert_ne!(o.core.control().settings().flags & lb_common::SETTINGS_F_FLOW_SYNC, 0, "active: the datapath reports new flows");
        assert_eq!(o.wanted_vips(), BTreeSet::from([ip("10.0.0.100")]));
        // A local change takes the next position after the peer's.
        snap.unwrap().send_replace(ClusterSnapshot { peer_pos: Some(ConfigPos { version: 5, origin: 2 }), ..ClusterSnapshot::default() });
        let (r, fx) = api(&mut o, Request::BackendAdd { service: "web".into(), address: ip("10.0.1.9"), weight: 1, mac: None });
        assert!(r.ok);
        assert!(matches!(fx.cluster.as_slice(), [ClusterCmd::LocalChange { pos: ConfigPos { version: 6, origin: 1 }, .. }]));
        // A newer config from the peer replaces ours whole and is acked.
        let mut defs = o.core.services();
        defs[0].backends.clear();
        let pos = ConfigPos { version: 9, origin: 2 };
        let fx = o.handle(Msg::Cluster(ClusterEvent::PeerConfig(pos, serde_json::to_vec(&defs).unwrap())));
        assert!(matches!(fx.cluster.as_slice(), [ClusterCmd::Applied { pos: p, .. }] if *p == pos));
        assert!(o.core.service("web").unwrap().backends.is_empty());
        assert_eq!(o.cluster.as_ref().unwrap().pos, pos);
        // An older one changes nothing; garbage is refused.
        let fx = o.handle(Msg::Cluster(ClusterEvent::PeerConfig(ConfigPos { version: 2, origin: 2 }, b"[]".to_vec())));
        assert!(fx.cluster.is_empty());
        o.handle(Msg::Cluster(ClusterEvent::PeerConfig(ConfigPos { version: 10, origin: 2 }, b"{not json".to_vec())));
        assert_eq!(o.cluster.as_ref().unwrap().pos, pos);
        // Backup again: reporting off, VIPs released.
        let fx = o.handle(Msg::Cluster(ClusterEvent::Role(Transition { from: Role::Active, to: Role::Backup, why: Why::PeerPreferred })));
        assert_eq!(fx.active, Some(false));
        assert!(o.wanted_vips().is_empty());
        assert_eq!(o.core.control().settings().flags & lb_common::SETTINGS_F_FLOW_SYNC, 0);
        // Stop: no VIP, no health target.
        o.handle(Msg::Stop);
        assert!(o.stopping);
    }

    #[test]
    fn active_active_reports_flows_holds_no_vip_and_numbers_after_every_peer() {
        let (mut o, _d, snap) = owner(true);
        o.cfg.bgp = Some(toml::from_str("local_as = 65001\nrouter_id = \"10.0.0.5\"\n[[neighbor]]\naddress = \"10.0.0.254\"\nas = 65000\n").unwrap());
        let fx = o.handle(Msg::Cluster(ClusterEvent::Role(Transition { from: Role::Init, to: Role::Active, why: Why::ActiveActive })));
        assert_eq!(fx.active, Some(true));
        assert_ne!(o.core.control().settings().flags & lb_common::SETTINGS_F_FLOW_SYNC, 0, "every node reports its new flows");
        assert!(o.wanted_vips().is_empty(), "routes, not ARP, bring the traffic");
        // Two peers: the change is numbered after the newest position either announced.
        let peer = |n: u32, alive, pos: Option<ConfigPos>| crate::cluster::node::PeerSnap {
            address: format!("10.0.0.{n}:7946").parse().unwrap(),
            node_id: Some(n),
            alive,
            last_heard_ms_ago: pos.map(|_| 40),
            pos,
        };
        let peers = vec![peer(2, true, Some(ConfigPos { version: 4, origin: 3 })), peer(3, false, None)];
        snap.unwrap().send_replace(ClusterSnapshot { peer_pos: Some(ConfigPos { version: 4, origin: 3 }), peers: Arc::new(peers), ..ClusterSnapshot::default() });
        let (r, fx) = api(&mut o, Request::BackendAdd { service: "web".into(), address: ip("10.0.1.9"), weight: 1, mac: None });
        assert!(r.ok);
        assert!(matches!(fx.cluster.as_slice(), [ClusterCmd::LocalChange { pos: ConfigPos { version: 5, origin: 1 }, .. }]));
        let st = o.status().cluster.unwrap();
        assert_eq!(st, "node 1 active-active, config 5@node1; peers: node 2 alive (last heartbeat 40 ms ago, config 4@node3); node 3 never heard");
    }

    #[test]
    fn bgp_routes_follow_usable_backends_drain_and_stop() {
        let (mut o, _d, _) = owner(false);
        let (r, _) = api(&mut o, Request::NodeDrain {});
        assert!(r.error.unwrap().contains("no [bgp] section"));
        o.cfg.bgp = Some(toml::from_str("local_as = 65001\nrouter_id = \"10.0.0.5\"\n[[neighbor]]\naddress = \"10.0.0.254\"\nas = 65000\n").unwrap());
        let (_stx, srx) = watch::channel(crate::bgp::task::TaskState::default());
        o.bgp = Some(OwnerBgp { drained: false, state: srx, last: Default::default() });
        // No usable backend: nothing to announce, but the task gets a first Wanted.
        let w = o.bgp_wanted().expect("first");
        assert!(w.routes.is_empty() && w.seq == 1);
        assert!(o.bgp_wanted().is_none(), "unchanged: nothing new");
        // A backend passes its first check: the VIP is announced.
        let a = ip("10.0.1.3");
        let (r, _) = api(&mut o, Request::BackendAdd { service: "web".into(), address: a, weight: 1, mac: Some("02:00:00:00:01:03".parse().unwrap()) });
        assert!(r.ok, "{:?}", r.error);
        assert!(o.bgp_wanted().is_none(), "pending backends are not usable");
        let t = o.health_targets().into_iter().find(|t| t.addr == a).unwrap();
        o.handle(Msg::Health(vec![(t.clone(), Ok(()))]));
        let w = o.bgp_wanted().expect("announce");
        assert_eq!(w.routes, BTreeSet::from([ip("10.0.0.100")]));
        assert!(!o.bgp_view().unwrap().in_sync, "the task has not applied it yet");
        // Drain withdraws, undrain announces again.
        let (r, fx) = api(&mut o, Request::NodeDrain {});
        assert!(r.ok && fx.vips);
        assert!(o.bgp_wanted().unwrap().routes.is_empty());
        assert!(o.bgp_view().unwrap().drained);
        api(&mut o, Request::NodeUndrain {});
        assert_eq!(o.bgp_wanted().unwrap().routes.len(), 1);
        // The last backend goes down: withdrawn.
        o.handle(Msg::Health(vec![(t.clone(), Err("refused".into())), (t.clone(), Err("refused".into()))]));
        assert!(o.bgp_wanted().unwrap().routes.is_empty(), "{:?}", backend(&o, a));
        o.handle(Msg::Health(vec![(t.clone(), Ok(())), (t.clone(), Ok(()))]));
        assert_eq!(o.bgp_wanted().unwrap().routes.len(), 1);
        // Detach with BGP: answered now, detached by the shell after the drain.
        let (r, _) = api(&mut o, Request::Detach {});
        assert!(r.ok && o.stopping && o.detach_after_drain);
        assert!(o.bgp_wanted().unwrap().routes.is_empty(), "stopping withdraws");
    }

    #[test]
    fn a_rejected_request_changes_nothing_and_says_why() {
        let (mut o, _d, _) = owner(false);
        let before = o.core.control().writer().writes;
        let (r, fx) = api(&mut o, Request::BackendAdd { service: "nope".into(), address: ip("10.0.1.3"), weight: 1, mac: None });
        assert!(!r.ok && r.error.unwrap().contains("unknown service"));
        assert!(!fx.track && !fx.index && fx.cluster.is_empty());
        assert_eq!(o.core.control().writer().writes, before);
        let (r, _) = api(&mut o, Request::ClusterStatus {});
        assert!(r.error.unwrap().contains("standalone"));
    }
}
