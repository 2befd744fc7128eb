//! lbd at run time: loads or adopts the datapath, applies the config, persists state,
//! runs health checks and the stats sampler, reloads on SIGHUP, and serves lbctl on a
//! root-only Unix socket. The rules live in `core::Core`; this file is the plumbing.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tracing::{error, info, warn};

use crate::api::{InterfaceView, MAX_REQUEST, Request, Response, StatsView, StatusView};
use crate::cluster::node::ClusterState;
use crate::config::{Config, content_hash};
use crate::control::ControlPlane;
use crate::core::{Change, Core, fill_pps};
use crate::health::{self, Target};
use crate::maps::AyaMaps;
use crate::persist::{self, State};
use crate::pins;
use crate::stats::Stats;

/// At most this many lbctl connections are served at once.
const MAX_CLIENTS: usize = 16;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Daemon {
    config_path: PathBuf,
    pub(crate) cfg: Mutex<Config>,
    /// Hash of the config file text the services came from (see `persist::State`).
    config_hash: Mutex<String>,
    pub(crate) core: Mutex<Core<AyaMaps>>,
    stats: Mutex<Stats>,
    ebpf: Mutex<aya::Ebpf>,
    pin_dir: PathBuf,
    interfaces: Mutex<BTreeMap<String, InterfaceView>>,
    health: Mutex<health::Runner>,
    /// Recent (time, counters) samples for pps.
    samples: Mutex<VecDeque<(Instant, StatsView)>>,
    started: Instant,
    adopted: bool,
    pub(crate) shutdown: AtomicBool,
    clients: AtomicUsize,
    /// Two-node failover, when configured.
    pub(crate) cluster: Option<Mutex<ClusterState>>,
    /// This node is active: the datapath reports new flows (SETTINGS_F_FLOW_SYNC).
    pub(crate) flow_sync_on: AtomicBool,
    /// Flow events lost in the datapath (ring full), per CPU.
    sync_stats: Option<aya::maps::PerCpuArray<aya::maps::MapData, u64>>,
    _lock: std::fs::File,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one request handler must not wedge the daemon.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the instance lock (`/run/lb/<instance>.lock`), so two lbd never drive the
/// same pins. Released by the kernel when the process dies, kill -9 included.
fn take_lock(instance: &str) -> anyhow::Result<std::fs::File> {
    let dir = Path::new("/run/lb");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{instance}.lock"));
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another lbd is running for instance {instance:?} (lock {} is held)", path.display());
    }
    Ok(f)
}

/// `lbd --detach`: removes an instance's datapath when no lbd runs for it.
pub fn detach_offline(instance: &str) -> anyhow::Result<Vec<String>> {
    let _lock = take_lock(instance).context("lbd is running: use `lbctl detach`")?;
    let r = pins::detach_all(instance);
    remove_lock_file(instance);
    r
}

/// After a detach nothing of the instance is left, its lock file included.
fn remove_lock_file(instance: &str) {
    let _ = std::fs::remove_file(format!("/run/lb/{instance}.lock"));
}

impl Daemon {
    /// Everything up to serving: config, lock, datapath (loaded or adopted), services
    /// applied, interfaces attached, state saved.
    pub fn start(config_path: &Path) -> anyhow::Result<Arc<Daemon>> {
        // Absolute, so reloads find the file whatever the working directory.
        let config_path = &std::fs::canonicalize(config_path).with_context(|| format!("opening {}", config_path.display()))?;
        let (cfg, src) = Config::load(config_path).map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        let lock_file = take_lock(&cfg.instance)?;
        let hash = content_hash(&src);

        // What to run: the saved state if it came from this very file, else the file.
        // `cluster_pos`: where the services stood in the pair's order last time.
        let mut from_file = true;
        let mut saved_epoch = None;
        let (services, health, mut version, saved_ifaces, cluster_pos) = match persist::load(&cfg.state_file()) {
            persist::Loaded::Found(st) if st.config_hash == hash => {
                from_file = false;
                saved_epoch = st.cluster_epoch;
                info!(state = %cfg.state_file().display(), version = st.version, "restoring runtime state (config file unchanged)");
                (st.services, st.health, st.version, st.interfaces, st.cluster_config)
            }
            persist::Loaded::Found(st) => {
                saved_epoch = st.cluster_epoch;
                warn!("config file changed since the state was saved: the file's services replace runtime changes");
                (cfg.services.clone(), st.health, st.version + 1, st.interfaces, st.cluster_config)
            }
            persist::Loaded::Corrupt(aside, why) => {
                error!(moved_to = %aside.display(), %why, "state file unreadable; starting from the config file");
                (cfg.services.clone(), Vec::new(), 0, BTreeMap::new(), None)
            }
            persist::Loaded::Missing => (cfg.services.clone(), Vec::new(), 0, BTreeMap::new(), None),
        };

        let pins::Loaded { mut ebpf, adopted, dir } = pins::load(&cfg.instance)?;
        forward_datapath_log(&mut ebpf);
        let maps = AyaMaps::from_ebpf(&mut ebpf)?;
        let stats = Stats::from_ebpf(&mut ebpf)?;
        let cp = if adopted {
            info!(pins = %dir.display(), "adopting the running datapath");
            pins::adopt_control(maps, &services)?
        } else {
            ControlPlane::new(maps)
        };
        // Cluster: key, epoch, socket, and the maps flow sync needs, before anything runs.
        let cluster = match &cfg.cluster {
            None => None,
            Some(cc) => {
                let key = crate::cluster::load_secret(&cc.secret_file)?;
                let last = saved_epoch;
                let wall_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                let epoch = crate::cluster::wire::next_epoch(wall_ms, last);
                let sock = std::net::UdpSocket::bind(cc.listen).with_context(|| format!("cluster.listen {}", cc.listen))?;
                let flows = match ebpf.take_map(lb_common::map_names::FLOWS) {
                    Some(m @ aya::maps::Map::LruHashMap(_)) => Some(crate::flowsync::FlowWriter::new(aya::maps::HashMap::try_from(m)?)),
                    _ => None,
                };
                let events = match ebpf.take_map(lb_common::map_names::FLOW_EVENTS) {
                    Some(m @ aya::maps::Map::RingBuf(_)) => Some(aya::maps::RingBuf::try_from(m)?),
                    _ => None,
                };
                let pos = cluster_pos.map_or(crate::cluster::config_sync::ConfigPos::default(), |(version, origin)| {
                    crate::cluster::config_sync::ConfigPos { version, origin }
                });
                let mut st = ClusterState::new(cc.clone(), key, pos, epoch, flows);
                if from_file {
                    // The file's services are this node's change: numbered after what it
                    // knew, so the pair converges on the newer of the two.
                    let _ = st.local_change();
                }
                Some((st, sock, events))
            }
        };
        let (cluster_state, cluster_io) = match cluster {
            Some((st, sock, events)) => (Some(Mutex::new(st)), Some((sock, events))),
            None => (None, None),
        };
        let sync_stats = match ebpf.take_map(lb_common::map_names::SYNC_STATS) {
            Some(m @ aya::maps::Map::PerCpuArray(_)) => aya::maps::PerCpuArray::try_from(m).ok(),
            _ => None,
        };

        let mut core = Core::new(cp);
        core.seed_resolved_from_datapath();
        let to_resolve: Vec<_> = services.iter().flat_map(|d| d.backends.iter().filter(|b| b.mac.is_none()).map(|b| b.address)).collect();
        match crate::neigh::resolve(&to_resolve, |_| true) {
            Ok(found) => {
                core.set_resolved(found)?;
            }
            Err(e) => warn!(error = %e, "reading the neighbour table"),
        }
        core.restore_health(&health);
        core.set_settings(cfg.settings())?;
        let changed = if adopted { core.replace_all_forced(services.clone()) } else { core.replace_all(services.clone()) };
        if let Err(e) = changed {
            // Saved state no longer valid for this build: the file is the authority.
            if services != cfg.services {
                warn!(error = %e, "saved services rejected; applying the config file's");
                core.replace_all_forced(cfg.services.clone())?;
            } else {
                return Err(e.into());
            }
        }
        version = version.max(core.version);
        core.version = version;

        // Attach after the maps hold the services: the first packet finds them.
        let mut ifaces = BTreeMap::new();
        for i in &cfg.interfaces {
            match pins::attach(&mut ebpf, &dir, i, cfg.xdp_mode) {
                Ok(a) => {
                    let mode = if a.mode.is_empty() { saved_ifaces.get(i).cloned().unwrap_or_default() } else { a.mode };
                    info!(interface = %i, mode = %mode, adopted = !a.attached_now, "balancer on interface");
                    ifaces.insert(i.clone(), InterfaceView { name: i.clone(), mode, attached_now: a.attached_now });
                }
                Err(e) => {
                    // Undo only what this run attached; adopted links keep forwarding.
                    for (name, v) in &ifaces {
                        if v.attached_now {
                            let _ = pins::detach_interface(&dir, name);
                        }
                    }
                    return Err(e);
                }
            }
        }
        // Interfaces dropped from the config since the last run.
        for i in pins::pinned_interfaces(&dir) {
            if !cfg.interfaces.contains(&i) {
                pins::detach_interface(&dir, &i)?;
                info!(interface = %i, "detached (no longer in the config)");
            }
        }

        let d = Arc::new(Daemon {
            config_path: config_path.to_path_buf(),
            cfg: Mutex::new(cfg),
            config_hash: Mutex::new(hash),
            core: Mutex::new(core),
            stats: Mutex::new(stats),
            ebpf: Mutex::new(ebpf),
            pin_dir: dir,
            interfaces: Mutex::new(ifaces),
            health: Mutex::new(health::Runner::default()),
            samples: Mutex::new(VecDeque::new()),
            started: Instant::now(),
            adopted,
            shutdown: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            cluster: cluster_state,
            flow_sync_on: AtomicBool::new(false),
            sync_stats,
            _lock: lock_file,
        });
        {
            let core = lock(&d.core);
            d.persist(&core).context("saving state")?;
        }
        d.sync_health();
        d.resolve_loop();
        if let Some((sock, events)) = cluster_io {
            d.start_cluster(sock, events);
        }
        Ok(d)
    }

    /// Keeps next-hop MACs of backends configured without one current (every second).
    fn resolve_loop(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("neighbours".into()).spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(d) = me.upgrade() else { return };
                if d.shutdown.load(Ordering::Relaxed) {
                    return;
                }
                let addrs = lock(&d.core).addrs_to_resolve();
                if addrs.is_empty() {
                    continue;
                }
                // Only never-resolved addresses are nudged: no steady probe traffic.
                let known: Vec<_> = {
                    let core = lock(&d.core);
                    addrs.iter().filter(|a| core.is_resolved(**a)).copied().collect()
                };
                let found = match crate::neigh::resolve(&addrs, |a| !known.contains(&a)) {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(error = %e, "reading the neighbour table");
                        continue;
                    }
                };
                let mut core = lock(&d.core);
                match core.set_resolved(found) {
                    Ok(changed) if !changed.is_empty() => {
                        info!(services = ?changed, "next-hop MACs changed");
                        if let Err(e) = d.persist(&core) {
                            error!(error = %format!("{e:#}"), "saving state");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => error!(error = %e, "applying next-hop MACs"),
                }
            }
        });
    }

    /// The datapath settings for `cfg`, with flow reporting on while this node is the
    /// active one of a cluster.
    pub(crate) fn settings_now(&self, cfg: &Config) -> lb_common::Settings {
        let mut s = cfg.settings();
        if self.flow_sync_on.load(Ordering::Relaxed) {
            s.flags |= lb_common::SETTINGS_F_FLOW_SYNC;
        }
        s
    }

    fn state(&self, core: &Core<AyaMaps>) -> State {
        State {
            format: persist::FORMAT,
            config_hash: lock(&self.config_hash).clone(),
            version: core.version,
            services: core.services(),
            health: core.health_records(),
            interfaces: lock(&self.interfaces).iter().map(|(k, v)| (k.clone(), v.mode.clone())).collect(),
            cluster_config: self.cluster.as_ref().map(|c| {
                let c = lock(c);
                (c.pos.version, c.pos.origin)
            }),
            cluster_epoch: self.cluster.as_ref().map(|c| lock(c).epoch),
        }
    }

    pub(crate) fn persist(&self, core: &Core<AyaMaps>) -> anyhow::Result<()> {
        let path = lock(&self.cfg).state_file();
        persist::save(&path, &self.state(core))
    }

    /// Starts and stops health-check threads to match the services.
    pub(crate) fn sync_health(self: &Arc<Self>) {
        let targets = lock(&self.core).health_targets();
        let me = Arc::downgrade(self);
        let report: health::Report = Arc::new(move |t: &Target, r: Result<(), String>| {
            if let Some(d) = me.upgrade() {
                d.health_result(t, r);
            }
        });
        lock(&self.health).sync(&targets, &report);
    }

    fn health_result(&self, t: &Target, r: Result<(), String>) {
        if self.shutdown.load(Ordering::Relaxed) {
            return;
        }
        let mut core = lock(&self.core);
        match core.health_result(t, r) {
            Ok(Some(ev)) => {
                if ev.up {
                    info!(service = %ev.service, backend = %ev.address, detail = %ev.detail, "backend up: back in the table");
                } else {
                    warn!(service = %ev.service, backend = %ev.address, detail = %ev.detail, "backend down: out of the table");
                }
                if let Err(e) = self.persist(&core) {
                    error!(error = %format!("{e:#}"), "saving state after a health change");
                }
            }
            Ok(None) => {}
            Err(e) => error!(service = %t.service, backend = %t.addr, error = %e, "applying a health change"),
        }
    }

    /// Re-reads the config file (SIGHUP, `lbctl reload`). All or nothing.
    pub fn reload(self: &Arc<Self>) -> anyhow::Result<String> {
        let (cfg, src) = Config::load(&self.config_path).map_err(|e| anyhow::anyhow!("{}: {e}", self.config_path.display()))?;
        let hash = content_hash(&src);
        lock(&self.cfg).check_reload(&cfg).map_err(anyhow::Error::msg)?;
        if *lock(&self.config_hash) == hash {
            return Ok("config file unchanged".into());
        }
        let mut core = lock(&self.core);
        let mut ebpf = lock(&self.ebpf);
        let mut ifaces = lock(&self.interfaces);
        // New interfaces first (harmless: same maps); undone if anything below fails.
        let mut added = Vec::new();
        let undo = |added: &[String], ifaces: &mut BTreeMap<String, InterfaceView>| {
            for i in added {
                let _ = pins::detach_interface(&self.pin_dir, i);
                ifaces.remove(i);
            }
        };
        for i in &cfg.interfaces {
            if !ifaces.contains_key(i) {
                match pins::attach(&mut ebpf, &self.pin_dir, i, cfg.xdp_mode) {
                    Ok(a) => {
                        ifaces.insert(i.clone(), InterfaceView { name: i.clone(), mode: a.mode, attached_now: a.attached_now });
                        added.push(i.clone());
                    }
                    Err(e) => {
                        undo(&added, &mut ifaces);
                        return Err(e);
                    }
                }
            }
        }
        let before_settings = *core.control().settings();
        let changed = match core.set_settings(self.settings_now(&cfg)).and_then(|()| core.replace_all(cfg.services.clone())) {
            Ok(c) => c,
            Err(e) => {
                let _ = core.set_settings(before_settings);
                undo(&added, &mut ifaces);
                return Err(e.into());
            }
        };
        let gone: Vec<String> = ifaces.keys().filter(|i| !cfg.interfaces.contains(i)).cloned().collect();
        for i in gone {
            match pins::detach_interface(&self.pin_dir, &i) {
                Ok(()) => {
                    ifaces.remove(&i);
                }
                Err(e) => warn!(interface = %i, error = %format!("{e:#}"), "detaching an interface dropped from the config"),
            }
        }
        drop((ebpf, ifaces));
        *lock(&self.config_hash) = hash;
        *lock(&self.cfg) = cfg;
        let t = (!changed.is_empty()).then(|| self.cluster.as_ref().and_then(|c| lock(c).local_change())).flatten();
        self.persist(&core).context("saving state")?;
        drop(core);
        self.sync_health();
        if let Some(t) = t {
            self.on_transition(t);
        }
        self.sync_vips();
        Ok(if changed.is_empty() { "reloaded; no service changed".into() } else { format!("reloaded; changed: {}", changed.join(", ")) })
    }

    fn status(&self) -> StatusView {
        let core = lock(&self.core);
        let cfg = lock(&self.cfg);
        let (up, down, drained) = core.backend_counts();
        StatusView {
            instance: cfg.instance.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            config_version: core.version,
            adopted: self.adopted,
            pin_dir: self.pin_dir.display().to_string(),
            state_file: cfg.state_file().display().to_string(),
            interfaces: lock(&self.interfaces).values().cloned().collect(),
            services: core.services().len(),
            backends: up + down + drained,
            backends_up: up,
            backends_down: down,
            backends_drained: drained,
            cluster: self.cluster.as_ref().map(|c| {
                let v = lock(c).view(0);
                let peer = v.peer.map_or("peer never heard".to_string(), |p| {
                    format!(
                        "peer node {} {} ({}), last heartbeat {} ms ago, config {}",
                        p.node_id,
                        p.role,
                        if p.alive { "alive" } else { "dead" },
                        p.last_heartbeat_ms_ago,
                        p.config
                    )
                });
                format!("node {} {}, config {}; {peer}", v.node_id, v.role, v.config)
            }),
        }
    }

    fn stats_now(&self) -> anyhow::Result<StatsView> {
        let core = lock(&self.core);
        let stats = lock(&self.stats);
        Ok(core.stats(&*stats)?)
    }

    /// Samples the counters about once a second (pps = difference of two samples).
    fn sample_stats(&self) {
        if let Ok(s) = self.stats_now() {
            let mut q = lock(&self.samples);
            q.push_back((Instant::now(), s));
            while q.len() > 3 {
                q.pop_front();
            }
        }
    }

    fn stats_with_pps(&self) -> anyhow::Result<StatsView> {
        let mut now = self.stats_now()?;
        let t = Instant::now();
        let q = lock(&self.samples);
        // The newest sample at least half a second old.
        if let Some((at, before)) = q.iter().rev().find(|(at, _)| t.duration_since(*at) >= Duration::from_millis(500)) {
            fill_pps(&mut now, before, t.duration_since(*at).as_secs_f64());
        }
        Ok(now)
    }

    fn change(self: &Arc<Self>, c: Change, service: &str) -> anyhow::Result<Response> {
        let mut core = lock(&self.core);
        core.apply(c)?;
        let t = self.cluster.as_ref().and_then(|c| lock(c).local_change());
        // Applied to the datapath; a failed save is reported, the change stays.
        self.persist(&core).context("the change is live but saving the state failed")?;
        let view = core.service_view(service).ok();
        drop(core);
        self.sync_health();
        if let Some(t) = t {
            self.on_transition(t);
        }
        self.sync_vips();
        Ok(match view {
            Some(v) => Response::ok(v),
            None => Response::ok(serde_json::json!({ "removed": service })),
        })
    }

    pub fn handle(self: &Arc<Self>, req: Request) -> Response {
        let r = (|| -> anyhow::Result<Response> {
            Ok(match req {
                Request::Status {} => Response::ok(self.status()),
                Request::ServiceList {} => Response::ok(lock(&self.core).service_views()),
                Request::ServiceShow { name } => Response::ok(lock(&self.core).service_view(&name)?),
                Request::ServiceAdd { service } => {
                    let name = service.name.clone();
                    self.change(Change::AddService(service), &name)?
                }
                Request::ServiceRemove { name } => self.change(Change::RemoveService(name.clone()), &name)?,
                Request::BackendList { service } => Response::ok(lock(&self.core).backend_views(service.as_deref())?),
                Request::BackendAdd { service, address, weight, mac } => {
                    self.change(Change::AddBackend { service: service.clone(), address, weight, mac }, &service)?
                }
                Request::BackendRemove { service, address } => self.change(Change::RemoveBackend { service: service.clone(), address }, &service)?,
                Request::BackendSetWeight { service, address, weight } => {
                    self.change(Change::SetWeight { service: service.clone(), address, weight }, &service)?
                }
                Request::BackendDrain { service, address } => self.change(Change::Drain { service: service.clone(), address }, &service)?,
                Request::BackendEnable { service, address } => self.change(Change::Enable { service: service.clone(), address }, &service)?,
                Request::Stats {} => Response::ok(self.stats_with_pps()?),
                Request::ClusterStatus {} => match &self.cluster {
                    Some(c) => Response::ok(lock(c).view(self.flows_lost_in_datapath())),
                    None => Response::err("this lbd has no [cluster] section: it runs standalone"),
                },
                Request::ClusterFailover {} => match &self.cluster {
                    Some(c) => {
                        lock(c).failover().map_err(anyhow::Error::msg)?;
                        Response::ok(serde_json::json!({ "result": "handing the active role to the peer" }))
                    }
                    None => Response::err("this lbd has no [cluster] section: it runs standalone"),
                },
                Request::Reload {} => Response::ok(serde_json::json!({ "result": self.reload()? })),
                Request::Detach {} => {
                    let instance = lock(&self.cfg).instance.clone();
                    lock(&self.health).sync(&[], &(Arc::new(|_: &Target, _| {}) as health::Report));
                    let ifaces = pins::detach_all(&instance)?;
                    remove_lock_file(&instance);
                    self.shutdown.store(true, Ordering::Relaxed);
                    Response::ok(serde_json::json!({ "detached": ifaces }))
                }
            })
        })();
        r.unwrap_or_else(|e| Response::err(format!("{e:#}")))
    }

    fn flows_lost_in_datapath(&self) -> u64 {
        self.sync_stats.as_ref().and_then(|m| m.get(&0, 0).ok()).map_or(0, |v| v.iter().sum())
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    /// Serves lbctl until `stop` (SIGTERM) or `lbctl detach`.
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        let socket = lock(&self.cfg).socket.clone();
        let listener = bind_socket(&socket)?;
        listener.set_nonblocking(true)?;
        info!(socket = %socket.display(), "serving lbctl");
        let mut next_sample = Instant::now();
        while !self.shutdown.load(Ordering::Relaxed) {
            if Instant::now() >= next_sample {
                self.sample_stats();
                next_sample = Instant::now() + Duration::from_secs(1);
            }
            match listener.accept() {
                Ok((conn, _)) => {
                    if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        self.clients.fetch_sub(1, Ordering::SeqCst);
                        let _ = respond(&conn, &Response::err("lbd is busy: too many lbctl connections"));
                        continue;
                    }
                    let me = self.clone();
                    std::thread::spawn(move || {
                        me.serve_one(conn);
                        me.clients.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener, Duration::from_millis(200)),
                Err(e) => {
                    warn!(error = %e, "accept on the control socket");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = std::fs::remove_file(&socket);
        lock(&self.health).sync(&[], &(Arc::new(|_: &Target, _| {}) as health::Report));
        // Stopping on purpose: the VIPs go now, so the peer's takeover is clean (the
        // cluster thread may not get to it before the process exits).
        self.release_all_vips();
        info!("lbd stopped; pinned datapath (if not detached) keeps forwarding");
        Ok(())
    }

    fn serve_one(self: &Arc<Self>, conn: UnixStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
        let resp = match peer_uid(&conn) {
            Some(0) => match read_request(&conn) {
                Ok(req) => self.handle(req),
                Err(e) => Response::err(e),
            },
            Some(uid) => Response::err(format!("permission denied: uid {uid} is not root")),
            None => Response::err("permission denied: peer credentials unavailable"),
        };
        let _ = respond(&conn, &resp);
    }
}

/// Forwards the datapath's aya-log records (rare events only: per-packet events are
/// counters) into lbd's log, target `lb_ebpf`.
fn forward_datapath_log(ebpf: &mut aya::Ebpf) {
    let mut logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "datapath log not available");
            return;
        }
    };
    let _ = std::thread::Builder::new().name("datapath-log".into()).spawn(move || {
        loop {
            let mut p = libc::pollfd { fd: logger.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll on one valid pollfd; the fd lives as long as `logger`.
            unsafe { libc::poll(&mut p, 1, 1000) };
            logger.flush();
        }
    });
}

/// Sleeps until `l` has a connection to accept, at most `max` (so the loop notices a
/// stop and samples the counters on time).
fn wait_readable(l: &UnixListener, max: Duration) {
    let mut p = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut p, 1, max.as_millis() as libc::c_int) };
}

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // We hold the instance lock: a socket file left here is from a dead lbd.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

fn peer_uid(conn: &UnixStream) -> Option<u32> {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a properly sized ucred.
    let rc = unsafe { libc::getsockopt(conn.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, &mut cred as *mut _ as *mut libc::c_void, &mut len) };
    (rc == 0).then_some(cred.uid)
}

/// One request line, at most MAX_REQUEST bytes.
pub fn read_request(conn: &UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut r = BufReader::new(conn.take(MAX_REQUEST as u64 + 1));
    r.read_until(b'\n', &mut line).map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"))
}

fn respond(mut conn: &UnixStream, r: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_vec(r).unwrap_or_else(|_| br#"{"ok":false,"error":"encoding failed"}"#.to_vec());
    s.push(b'\n');
    conn.write_all(&s)
}

/// Client side: one request, one response (lbctl, tests).
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut c = UnixStream::connect(socket).with_context(|| format!("connecting to {} (is lbd running?)", socket.display()))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut s = serde_json::to_vec(req)?;
    s.push(b'\n');
    c.write_all(&s).context("sending the request")?;
    let mut line = Vec::new();
    BufReader::new(c.take(64 << 20)).read_until(b'\n', &mut line).context("reading the response")?;
    serde_json::from_slice(&line).context("decoding the response")
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: a zeroed sigset filled by the libc calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks SIGHUP/SIGTERM/SIGINT; call first thing in main, so every thread inherits
/// the mask and only the signal thread (`handle_signals`) receives them.
pub fn block_signals() {
    let set = signal_set();
    // SAFETY: setting this thread's mask from a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// HUP reloads; TERM/INT stop lbd (the pinned datapath keeps running).
pub fn handle_signals(d: &Arc<Daemon>) {
    let d = d.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = signal_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: waiting on signals blocked by block_signals.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match sig {
                    libc::SIGHUP => match d.reload() {
                        Ok(m) => info!("SIGHUP: {m}"),
                        Err(e) => error!("SIGHUP: reload rejected, nothing changed: {e:#}"),
                    },
                    _ => {
                        info!(signal = sig, "stopping");
                        d.stop();
                        return;
                    }
                }
            }
        })
        .expect("spawning the signal thread");
}
