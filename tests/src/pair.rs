//! Two lbd nodes as a cluster on a `netns::Topology` with two balancer nodes: the
//! client reaches the VIP on-link, so it goes to whichever node holds it (or, in a
//! routed topology, the router does). Shared by the cluster tests, `cargo xtask bench
//! failover` and `cargo xtask bench scale-out` (`failover_rounds`).

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lbd::{Lbd, poll_every, wait_for};
use crate::netns::{ServerMode, TopoSpec, Topology, vip_v4};

pub const PORT: u16 = 7946;
pub const SECRET: &[u8] = b"a shared secret of the two lbd nodes\n";

pub struct Pair {
    pub t: Topology,
    pub n: [Lbd; 2],
}

pub fn web() -> IpAddr {
    vip_v4(1)
}

pub fn backends_toml(t: &Topology, which: &[usize]) -> String {
    which.iter().map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", t.backends[*i].v4)).collect()
}

/// Both nodes configured with `backends` of web, node 1 preferred (priority 200).
pub fn pair(prefix: &str, backends: &[usize]) -> Pair {
    let t = Topology::new(prefix, TopoSpec { lbs: 2, backends: 3 });
    t.set_client_route_onlink();
    pair_on(t, prefix, backends)
}

/// `pair` with the client behind a router (`Topology::routed`) that reaches the VIP
/// prefixes on-link, as a router in front of an active/backup pair does.
pub fn pair_routed(prefix: &str, backends: &[usize]) -> Pair {
    let t = Topology::routed(prefix, TopoSpec { lbs: 2, backends: 3 });
    t.set_router_vip_onlink();
    pair_on(t, prefix, backends)
}

fn pair_on(t: Topology, prefix: &str, backends: &[usize]) -> Pair {
    t.add_vip_to_backends(web());
    t.start_servers(80, ServerMode::Echo);
    let n = [Lbd::new(&t, 0, &format!("{prefix}n1")), Lbd::new(&t, 1, &format!("{prefix}n2"))];
    for (i, l) in n.iter().enumerate() {
        let secret = l.dir.join("cluster.key");
        std::fs::write(&secret, SECRET).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (me, other) = (&t.lbs[i], &t.lbs[1 - i]);
        l.write_config(&format!(
            "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n{}\n[cluster]\nnode_id = {}\npriority = {}\n\
             listen = \"{}:{PORT}\"\npeer = \"{}:{PORT}\"\nsecret_file = \"{}\"\nheartbeat_ms = 100\ndead_after = 3\n",
            web(),
            backends_toml(&t, backends),
            i + 1,
            if i == 0 { 200 } else { 100 },
            me.v4,
            other.v4,
            secret.display()
        ));
    }
    Pair { t, n }
}

pub fn cluster(l: &Lbd) -> Value {
    l.lbctl_json(&["cluster", "status"])
}

pub fn role(l: &Lbd) -> String {
    cluster(l)["role"].as_str().unwrap_or("?").to_string()
}

pub fn wait_roles(p: &Pair, want: [&str; 2], max: Duration) -> Duration {
    wait_for(max, || role(&p.n[0]) == want[0] && role(&p.n[1]) == want[1])
        .unwrap_or_else(|| panic!("roles {want:?} not reached: {} / {}\n{}\n{}", cluster(&p.n[0]), cluster(&p.n[1]), p.n[0].log(), p.n[1].log()))
}


/// The `p` quantile of `v` (sorts it; nearest rank).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// From `t0`: the time until the first probe started after `t0` that connected
/// quickly, i.e. how long new connections failed or stalled (ms).
pub fn client_gap_since(probes: &[(Instant, bool)], t0: Instant) -> f64 {
    let mut started: Vec<&(Instant, bool)> = probes.iter().filter(|(s, _)| *s >= t0).collect();
    started.sort_by_key(|(s, _)| *s);
    let mut gap = 0.0;
    let mut last_ok = t0;
    for (s, ok) in started {
        if *ok {
            gap = f64::max(gap, s.saturating_duration_since(last_ok).as_secs_f64() * 1e3);
            last_ok = *s;
        }
    }
    gap
}

/// What `failover_rounds` measured.
#[derive(Clone, Debug, Default)]
pub struct FailoverFigures {
    /// Failure to the backup holding the VIPs, per round (ms).
    pub takeover_ms: Vec<f64>,
    /// The longest stretch of probe starts without a quick success after the failure,
    /// per round (ms).
    pub client_gap_ms: Vec<f64>,
    /// The same over one quiet second before the first round (the probe's resolution).
    pub baseline_gap_ms: f64,
    pub streams: usize,
    /// Long-lived streams that failed an echo, over all rounds.
    pub lost: usize,
}

/// `rounds` forced failovers of a started pair (roles active/backup): each fails the
/// active node the way a machine dies (lbd killed, its link down), measures, then
/// brings it back as backup. Client probes: a new connection every `probe_every`, each
/// on its own thread, good when connected within 200 ms; `streams` long-lived
/// connections echoed after every round.
pub fn failover_rounds(p: &mut Pair, rounds: usize, probe_every: Duration, streams: usize) -> FailoverFigures {
    let stop = AtomicBool::new(false);
    let probes = Mutex::new(Vec::<(Instant, bool)>::new());
    let topo = &p.t;
    let mut conns: Vec<_> = (0..streams).map(|i| topo.connect(web(), 80).unwrap_or_else(|e| panic!("stream {i}: {e}"))).collect();
    let mut f = FailoverFigures { streams, ..FailoverFigures::default() };
    std::thread::scope(|sc| {
        let (stop, probes) = (&stop, &probes);
        sc.spawn(move || {
            // Bounded by the stop flag; each probe by the harness's connect timeout.
            while !stop.load(Ordering::Relaxed) {
                sc.spawn(move || {
                    let t0 = Instant::now();
                    let ok = topo.connect(web(), 80).is_ok() && t0.elapsed() < Duration::from_millis(200);
                    probes.lock().unwrap().push((t0, ok));
                });
                std::thread::sleep(probe_every);
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        // Baseline: with no failure, the longest run of probe starts without a quick success.
        f.baseline_gap_ms = client_gap_since(&probes.lock().unwrap(), Instant::now() - Duration::from_millis(900));
        for round in 0..rounds {
            let active = if role(&p.n[0]) == "active" { 0 } else { 1 };
            let backup = 1 - active;
            let t0 = Instant::now();
            p.n[active].kill();
            p.t.set_lb_link(active, false);
            // Polled over the socket every 5 ms (not through the lbctl binary: finer).
            let holds = || {
                lb_userspace::daemon::call(&p.n[backup].socket(), &lb_userspace::api::Request::ClusterStatus {})
                    .ok()
                    .and_then(|r| r.data)
                    .is_some_and(|d| d["vips_held"].as_array().is_some_and(|a| !a.is_empty()))
            };
            let took = poll_every(Duration::from_millis(5), Duration::from_secs(5), holds).unwrap_or_else(|| panic!("round {round}: no takeover"));
            f.takeover_ms.push(took.as_secs_f64() * 1e3);
            if std::env::var_os("LB_BENCH_VERBOSE").is_some() {
                eprintln!("round {round}: node {} failed, takeover {took:?}", active + 1);
            }
            std::thread::sleep(Duration::from_millis(700));
            f.client_gap_ms.push(client_gap_since(&probes.lock().unwrap(), t0));
            conns.retain_mut(|c| {
                c.echo(&format!("round-{round}")).is_ok() || {
                    f.lost += 1;
                    false
                }
            });
            // The failed node comes back and stays backup (preempt off).
            p.t.set_lb_link(active, true);
            p.n[active].start();
            assert!(wait_for(Duration::from_secs(5), || role(&p.n[active]) == "backup").is_some(), "round {round}: returning node is backup");
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
    });
    f
}
