//! lbd at run time, on a tokio runtime (DESIGN.md 6b). One owner task holds the
//! `Core` and is the only map writer; the API server, health tasks, the kernel
//! (netlink) task, the flow-event reader and applier, signals and the cluster task
//! talk to it by message. The cluster task runs on a thread of its own so nothing in
//! the control state can delay a heartbeat. Tasks and messages: ARCHITECTURE.md.

pub mod flows;
pub mod kernel;
pub mod ops;
pub mod owner;
pub mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use self::flows::{FlowCounters, FlowIndex};
use self::owner::{Datapath, Msg, Owner, OwnerCluster};
use crate::api::{Request, Response};
use crate::cluster::config_sync::ConfigPos;
use crate::cluster::flow_sync::FlowQueue;
use crate::cluster::node::{ClusterCmd, ClusterSnapshot, ClusterTask, FLOW_QUEUE};
use crate::config::{Config, XdpModeCfg, content_hash};
use crate::control::ControlPlane;
use crate::core::{Core, CounterSource};
use crate::health;
use crate::kernel::netlink::{self, Netlink};
use crate::maps::AyaMaps;
use crate::persist;
use crate::pins::{self, Attached};
use crate::stats::Stats;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Worker threads of the runtime (the cluster task has one more of its own).
pub const WORKERS: usize = 2;

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
pub(crate) fn remove_lock_file(instance: &str) {
    let _ = std::fs::remove_file(format!("/run/lb/{instance}.lock"));
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

/// The real datapath: the loaded object, its pins and counters.
struct Kernel {
    ebpf: aya::Ebpf,
    dir: PathBuf,
    stats: Stats,
}

impl Datapath for Kernel {
    fn attach(&mut self, interface: &str, mode: XdpModeCfg) -> anyhow::Result<Attached> {
        pins::attach(&mut self.ebpf, &self.dir, interface, mode)
    }
    fn detach(&mut self, interface: &str) -> anyhow::Result<()> {
        pins::detach_interface(&self.dir, interface)
    }
    fn detach_all(&mut self, instance: &str) -> anyhow::Result<Vec<String>> {
        pins::detach_all(instance)
    }
    fn ifindex(&self, interface: &str) -> Option<u32> {
        let name = std::ffi::CString::new(interface).ok()?;
        // SAFETY: if_nametoindex on a NUL-terminated string.
        let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
        (i != 0).then_some(i)
    }
    fn counters(&self) -> &dyn CounterSource {
        &self.stats
    }
}

/// Runs lbd until SIGTERM/SIGINT or `lbctl detach`.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).thread_name("lbd-worker").enable_all().build().context("starting the runtime")?;
    rt.block_on(run_async(config_path))
}

async fn run_async(config_path: &Path) -> anyhow::Result<()> {
    // Absolute, so reloads find the file whatever the working directory.
    let config_path = &std::fs::canonicalize(config_path).with_context(|| format!("opening {}", config_path.display()))?;
    let (cfg, src) = Config::load(config_path).map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    let lock_file = take_lock(&cfg.instance)?;
    let hash = content_hash(&src);

    // What to run: the saved state if it came from this very file, else the file.
    let mut from_file = true;
    let mut saved_epoch = None;
    let (services, health_records, mut version, saved_ifaces, cluster_pos) = match persist::load(&cfg.state_file()) {
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

    // Kernel state: events subscribed before the first reads, so nothing is missed.
    let nl = Netlink::connect()?;
    let (kev_tx, kev_rx) = mpsc::channel(4096);
    netlink::events(kev_tx)?;

    let mut core = Core::new(cp);
    core.seed_resolved_from_datapath();
    let to_track: BTreeSet<IpAddr> = services.iter().flat_map(|d| d.backends.iter().filter(|b| b.mac.is_none()).map(|b| b.address)).collect();
    let mut hops = kernel::initial(&nl, &to_track).await;
    let first = hops.changes();
    // Only what was found: an adopted MAC stays until the kernel says otherwise.
    core.set_next_hops(&first.iter().filter_map(|(a, n)| Some((*a, Some(n.as_ref()?.mac)))).collect::<Vec<_>>())?;
    core.restore_health(&health_records);
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

    // Cluster: key, epoch, socket and the flow-sync maps, before anything runs.
    let (snap_tx, snap_rx) = watch::channel(ClusterSnapshot::default());
    let mut cluster_parts = None;
    let owner_cluster = match &cfg.cluster {
        None => None,
        Some(cc) => {
            let key = crate::cluster::load_secret(&cc.secret_file)?;
            let wall_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let epoch = crate::cluster::wire::next_epoch(wall_ms, saved_epoch);
            let sock = std::net::UdpSocket::bind(cc.listen).with_context(|| format!("cluster.listen {}", cc.listen))?;
            let flows = match ebpf.take_map(lb_common::map_names::FLOWS) {
                Some(m @ aya::maps::Map::LruHashMap(_)) => Some(crate::flowsync::FlowWriter::new(aya::maps::HashMap::try_from(m)?)),
                _ => None,
            };
            let events = match ebpf.take_map(lb_common::map_names::FLOW_EVENTS) {
                Some(m @ aya::maps::Map::RingBuf(_)) => Some(aya::maps::RingBuf::try_from(m)?),
                _ => None,
            };
            let sync_stats = match ebpf.take_map(lb_common::map_names::SYNC_STATS) {
                Some(m @ aya::maps::Map::PerCpuArray(_)) => aya::maps::PerCpuArray::try_from(m).ok(),
                _ => None,
            };
            let mut pos = cluster_pos.map_or(ConfigPos::default(), |(version, origin)| ConfigPos { version, origin });
            if from_file {
                // The file's services are this node's change: numbered after what it
                // knew, so the pair converges on the newer of the two.
                pos = pos.next(None, cc.node_id);
            }
            cluster_parts = Some((cc.clone(), key, epoch, sock, flows, events, sync_stats, pos, from_file));
            Some(OwnerCluster { node_id: cc.node_id, pos, epoch, role: crate::cluster::wire::Role::Init, snapshot: snap_rx })
        }
    };

    let dp = Kernel { ebpf, dir: dir.clone(), stats };
    let mut owner = Owner::new(core, dp, cfg, config_path.to_path_buf(), hash, adopted, dir.clone(), owner_cluster);
    // Attach after the maps hold the services: the first packet finds them.
    owner.attach_at_start(&saved_ifaces)?;
    // Interfaces dropped from the config since the last run.
    for i in pins::pinned_interfaces(&dir) {
        if !owner.cfg.interfaces.contains(&i) {
            pins::detach_interface(&dir, &i)?;
            info!(interface = %i, "detached (no longer in the config)");
        }
    }
    owner.persist().context("saving state")?;
    // The MACs are in already; this records the source address towards each backend.
    owner.handle(Msg::NextHops(first));

    let socket = owner.cfg.socket.clone();
    let listener = server::bind(&socket)?;
    info!(socket = %socket.display(), "serving lbctl");
    let metrics_listener = match &owner.cfg.metrics {
        Some(m) => {
            let l = tokio::net::TcpListener::bind(m.listen).await.with_context(|| format!("metrics.listen {}", m.listen))?;
            info!(listen = %m.listen, "serving Prometheus metrics at /metrics");
            Some(l)
        }
        None => None,
    };

    // Channels. The owner's inbox is bounded (senders wait: API, kernel, signals);
    // health results have their own; the cluster task never waits on the owner.
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let (health_tx, mut health_rx) = mpsc::channel::<(health::Target, Result<(), String>)>(4096);
    let (cev_tx, mut cev_rx) = mpsc::unbounded_channel();
    let (kcmd_tx, kcmd_rx) = mpsc::unbounded_channel();
    let (index_tx, index_rx) = watch::channel(Arc::new(FlowIndex::build(owner.core.control())));
    let (held_tx, held_rx) = watch::channel(Vec::<IpAddr>::new());
    let active = Arc::new(AtomicBool::new(false));

    tokio::spawn(kernel::run(nl.clone(), hops, kcmd_rx, kev_rx, tx.clone()));
    let _ = kcmd_tx.send(kernel::KernelCmd::Track(owner.tracked()));

    let mut cluster_tx = None;
    let mut cluster_thread = None;
    if let Some((cc, key, epoch, sock, flows, events, sync_stats, pos, push)) = cluster_parts {
        let queue = Arc::new(Mutex::new(FlowQueue::new(FLOW_QUEUE)));
        let counters = Arc::new(FlowCounters::default());
        let (apply_tx, apply_rx) = mpsc::channel(flows::APPLY_QUEUE);
        // Active-active: our flow table for peers that join (read from the pin).
        let mut dump = None;
        if let Some(w) = flows {
            tokio::spawn(flows::apply_flows(apply_rx, index_rx.clone(), w, counters.clone()));
            if owner.cfg.bgp.is_some() {
                let (req_tx, req_rx) = mpsc::channel(16);
                let (chunk_tx, chunk_rx) = mpsc::channel(2);
                tokio::spawn(flows::dump_flows(req_rx, dir.join(lb_common::map_names::FLOWS), index_rx.clone(), chunk_tx));
                dump = Some(crate::cluster::node::FlowDump { requests: req_tx, chunks: chunk_rx });
            }
        }
        if let Some(rb) = events {
            tokio::spawn(flows::read_events(rb, index_rx.clone(), active.clone(), queue.clone(), counters.clone()));
        }
        let (ctx, crx) = mpsc::unbounded_channel();
        let task = ClusterTask {
            cfg: cc,
            key,
            pos,
            epoch,
            services: owner.services_json(),
            push_config: push,
            socket: sock,
            queue,
            apply: apply_tx,
            counters,
            sync_stats,
            held: held_rx,
            events: cev_tx,
            snapshot: snap_tx,
            active_active: owner.cfg.bgp.is_some(),
            dump,
        };
        // A restarted node may still hold VIPs from a previous life: it holds none
        // until the election says so.
        release_vips(&nl, &owner, &owner.core.services().iter().map(|d| d.vip.addr).collect()).await;
        cluster_thread = Some(task.spawn(crx).context("starting the cluster thread")?);
        cluster_tx = Some(ctx);
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(server::MAX_CLIENTS));
    tokio::spawn(server::serve(listener, tx.clone(), cluster_tx.clone(), slots.clone()));
    tokio::spawn(signals(tx.clone()));
    if let Some(l) = metrics_listener {
        let source = Arc::new(ops::MetricsSource { owner: tx.clone(), cluster: cluster_tx.clone() });
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(l, source).await {
                error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    if let Some(every) = crate::systemd::watchdog_interval() {
        tokio::spawn(ops::watchdog(tx.clone(), every));
    }
    let hook = owner.cfg.cluster.as_ref().and_then(|c| {
        let script = c.notify.clone()?;
        Some(crate::hooks::NotifyHook::spawn(script, Duration::from_millis(c.notify_timeout_ms.into()), None))
    });

    // BGP: its own task drives BIRD; the owner hands it the wanted routes.
    let bgp_tx = owner.cfg.bgp.as_ref().map(|_| {
        let (wtx, wrx) = watch::channel(crate::bgp::task::Wanted::default());
        let (stx, srx) = watch::channel(crate::bgp::task::TaskState::default());
        tokio::spawn(crate::bgp::task::run(wrx, stx));
        owner.bgp = Some(owner::OwnerBgp { drained: false, state: srx, last: Default::default() });
        wtx
    });
    push_bgp(&mut owner, bgp_tx.as_ref());

    let mut runner = health::Runner::default();
    sync_health(&owner, &mut runner, &health_tx);
    let mut held: BTreeSet<IpAddr> = BTreeSet::new();
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = owner.status_line();
    crate::systemd::ready(&status);

    while !owner.stopping {
        let msg = tokio::select! {
            biased;
            Some(ev) = cev_rx.recv() => Msg::Cluster(ev),
            Some(m) = rx.recv() => m,
            Some(first) = health_rx.recv() => {
                // Whatever else is waiting goes in the same batch: one table rebuild
                // and one save per service, however many checks passed together.
                let mut batch = vec![first];
                while batch.len() < 8192 {
                    match health_rx.try_recv() {
                        Ok(x) => batch.push(x),
                        Err(_) => break,
                    }
                }
                Msg::Health(batch)
            }
            _ = sample.tick() => Msg::Sample,
        };
        let reload = matches!(msg, Msg::Reload(_));
        let status_due = reload || matches!(msg, Msg::Sample | Msg::Cluster(crate::cluster::node::ClusterEvent::Role(_)));
        if let (Some(h), Msg::Cluster(crate::cluster::node::ClusterEvent::Role(t))) = (&hook, &msg) {
            h.role_changed(owner.role_change(t));
        }
        if reload {
            crate::systemd::reloading();
        }
        let fx = owner.handle(msg);
        if reload {
            status = owner.status_line();
            crate::systemd::ready(&status);
        } else if status_due && !owner.stopping {
            let now = owner.status_line();
            if now != status {
                crate::systemd::status(&now);
                status = now;
            }
        }
        if fx.health {
            sync_health(&owner, &mut runner, &health_tx);
        }
        if fx.track {
            let _ = kcmd_tx.send(kernel::KernelCmd::Track(owner.tracked()));
        }
        if fx.index {
            index_tx.send_replace(Arc::new(FlowIndex::build(owner.core.control())));
        }
        if let Some(a) = fx.active {
            active.store(a, Ordering::Relaxed);
        }
        if fx.vips_lost {
            held.clear();
        }
        if fx.vips || fx.vips_lost {
            sync_vips(&nl, &owner, &mut held).await;
            held_tx.send_replace(held.iter().copied().collect());
        }
        if let Some(c) = &cluster_tx {
            for m in fx.cluster {
                let _ = c.send(m);
            }
        }
        if fx.index || fx.vips {
            push_bgp(&mut owner, bgp_tx.as_ref());
        }
    }
    // Withdraw before traffic stops: routes out, `drain_ms` for the routers to move
    // the flows, then stop (or detach).
    withdraw_and_drain(&mut owner, bgp_tx.as_ref()).await;
    if owner.detach_after_drain {
        match owner.dp.detach_all(&owner.cfg.instance) {
            Ok(ifaces) => info!(interfaces = ?ifaces, "detached after the drain"),
            Err(e) => error!(error = %format!("{e:#}"), "detaching after the drain"),
        }
        remove_lock_file(&owner.cfg.instance);
    }
    crate::systemd::stopping();
    runner.stop_all();
    // Answers in flight (a detach, a stop's last status) are written before we exit.
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, slots.acquire_many(server::MAX_CLIENTS as u32)).await;
    // Stopping on purpose: the VIPs go now, so the peer's takeover is clean.
    release_vips(&nl, &owner, &held).await;
    if let Some(c) = &cluster_tx {
        let _ = c.send(ClusterCmd::Stop);
    }
    if let Some(t) = cluster_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    let _ = std::fs::remove_file(&socket);
    drop(lock_file);
    info!("lbd stopped; pinned datapath (if not detached) keeps forwarding");
    Ok(())
}

/// Hands the BGP task the wanted routes when they changed.
fn push_bgp<W: crate::maps::MapWriter, D: Datapath>(owner: &mut Owner<W, D>, tx: Option<&watch::Sender<crate::bgp::task::Wanted>>) {
    if let (Some(tx), Some(w)) = (tx, owner.bgp_wanted()) {
        tx.send_replace(w);
    }
}

/// Stopping with BGP: withdraw every route, wait (at most 3 s) for BIRD to take it,
/// then `drain_ms` if anything was announced.
async fn withdraw_and_drain<W: crate::maps::MapWriter, D: Datapath>(owner: &mut Owner<W, D>, tx: Option<&watch::Sender<crate::bgp::task::Wanted>>) {
    let (Some(tx), Some(b)) = (tx, owner.bgp.as_ref()) else { return };
    let mut state = b.state.clone();
    let had = !state.borrow().announced.is_empty();
    if let Some(w) = owner.bgp_wanted() {
        let seq = w.seq;
        tx.send_replace(w);
        if tokio::time::timeout(Duration::from_secs(3), state.wait_for(|s| s.applied_seq >= Some(seq))).await.is_err() {
            warn!(error = ?state.borrow().error, "bgp: BIRD did not confirm the withdrawal within 3 s; stopping anyway");
        }
    }
    let ms = owner.cfg.bgp.as_ref().map_or(0, |c| c.drain_ms);
    if had && ms > 0 {
        info!(drain_ms = ms, "bgp: routes withdrawn; draining before stopping");
        tokio::time::sleep(Duration::from_millis(ms as u64)).await;
    }
}

fn sync_health<W: crate::maps::MapWriter, D: Datapath>(owner: &Owner<W, D>, runner: &mut health::Runner, tx: &health::Report) {
    if owner.stopping {
        runner.stop_all();
        return;
    }
    let due = owner.first_check_due();
    runner.sync(&owner.health_targets(), &|t| due.contains(&(t.service.clone(), t.addr)), tx);
}

/// Holds exactly the wanted VIPs on the VIP interface; announces the new ones.
async fn sync_vips<W: crate::maps::MapWriter, D: Datapath>(nl: &Netlink, owner: &Owner<W, D>, held: &mut BTreeSet<IpAddr>) {
    let Some((iface, Some(index))) = owner.vip_interface() else {
        held.clear();
        return;
    };
    let want = owner.wanted_vips();
    for v in want.difference(&held.clone()) {
        match nl.set_vip(index, *v, true).await {
            Ok(()) => {
                // Twice: one lost gratuitous ARP must not leave clients on the old node.
                for _ in 0..2 {
                    if let Err(e) = crate::announce::announce(&iface, *v) {
                        warn!(vip = %v, error = %e, "cluster: announcing a VIP");
                    }
                }
                held.insert(*v);
            }
            Err(e) => error!(vip = %v, error = %e, "cluster: taking a VIP"),
        }
    }
    for v in held.clone().difference(&want) {
        match nl.set_vip(index, *v, false).await {
            Ok(()) => {
                held.remove(v);
            }
            Err(e) => error!(vip = %v, error = %e, "cluster: releasing a VIP"),
        }
    }
}

async fn release_vips<W: crate::maps::MapWriter, D: Datapath>(nl: &Netlink, owner: &Owner<W, D>, vips: &BTreeSet<IpAddr>) {
    let Some((_, Some(index))) = owner.vip_interface() else {
        return;
    };
    for v in vips {
        if let Err(e) = nl.set_vip(index, *v, false).await {
            warn!(vip = %v, error = %e, "releasing a VIP");
        }
    }
}

/// HUP reloads; TERM/INT stop lbd (the pinned datapath keeps running).
async fn signals(tx: mpsc::Sender<Msg>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        error!("cannot install signal handlers");
        return;
    };
    loop {
        let m = tokio::select! {
            _ = hup.recv() => Msg::Reload(None),
            _ = term.recv() => Msg::Stop,
            _ = int.recv() => Msg::Stop,
        };
        let stop = matches!(m, Msg::Stop);
        if stop {
            info!("stopping");
        }
        if tx.send(m).await.is_err() || stop {
            return;
        }
    }
}

/// Forwards the datapath's aya-log records (rare events only: per-packet events are
/// counters) into lbd's log, target `lb_ebpf`.
fn forward_datapath_log(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "datapath log not available");
            return;
        }
    };
    tokio::spawn(async move {
        // SAFETY: the logger owns its fd, open and unchanged while the AsyncFd lives.
        let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }) else {
            return;
        };
        loop {
            let Ok(mut g) = fd.readable_mut().await else {
                return;
            };
            g.get_inner_mut().flush();
            g.clear_ready();
        }
    });
}
