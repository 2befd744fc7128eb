//! "A backend's server stops while a client opens a connection every 20 ms" (issue 15):
//! the run shared by `e2e_gue`'s test (a) and `cargo xtask bench backend-down`. One lbd
//! on balancer node 0 serves one service per mode over the same backends (each on its
//! own VIP, health checks 500 ms × fall 3); a client thread per service connects every
//! 20 ms while backend 0's server stops, until the checks take it out of every table.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::lbd::{Lbd, wait_for};
use crate::netns::{ServerMode, Topology};

/// The health check of every service: 500 ms × fall 3, as the issue measured.
pub const HEALTH: &str =
    "health = { kind = \"tcp\", interval_ms = 500, timeout_ms = 200, rise = 1, fall = 3 }\n";

/// The interval between two new connections of a client.
pub const EVERY: Duration = Duration::from_millis(20);

/// One service of the run: its name, `mode` key and VIP.
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub mode: String,
    pub vip: IpAddr,
}

/// What one service's client saw.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: String,
    pub mode: String,
    pub attempts: usize,
    /// Each failed attempt with its error (refused, reset, timed out, or slower than
    /// 500 ms: a SYN retransmitted after 1 s is not a second chance).
    pub failed: Vec<String>,
}

/// Every `every`, until `stop`, opens a connection to `vip:80` and reads the backend's
/// greeting: (attempts, failures with their errors). At most 60 s whatever `stop` does.
pub fn open_every(
    t: &Topology,
    vip: IpAddr,
    every: Duration,
    stop: &AtomicBool,
) -> (usize, Vec<String>) {
    let mut attempts = 0;
    let mut failed = Vec::new();
    let start = Instant::now();
    while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
        let tick = start + every * (attempts as u32 + 1);
        attempts += 1;
        let t0 = Instant::now();
        match t.connect(vip, 80) {
            Err(e) => failed.push(format!("attempt {attempts} at {:?}: {e}", start.elapsed())),
            Ok(_) if t0.elapsed() > Duration::from_millis(500) => {
                failed.push(format!("attempt {attempts}: slow, {:?}", t0.elapsed()))
            }
            Ok(_) => {}
        }
        if let Some(d) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    (attempts, failed)
}

/// One field of backend `addr` of `service` in `lbctl backend list`.
pub fn backend_field(l: &Lbd, service: &str, addr: &str, field: &str) -> serde_json::Value {
    let list = l.lbctl_json(&["backend", "list", service]);
    list.as_array()
        .and_then(|a| a.iter().find(|b| b["address"] == addr))
        .map(|b| b[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// Every backend of `service` is in its table.
pub fn all_in_table(l: &Lbd, service: &str) -> bool {
    l.lbctl_json(&["backend", "list", service])
        .as_array()
        .is_some_and(|a| a.iter().all(|b| b["in_table"].as_bool() == Some(true)))
}

/// Packets of backend `i`'s lb_decap counted under `reason`.
pub fn decap_count(t: &Topology, i: usize, reason: &str) -> u64 {
    let s = lb_userspace::decap::stats(&t.backends[i].ifname).expect("decap stats");
    s.iter()
        .find(|(n, _)| *n == reason)
        .map_or(0, |(_, c)| c.packets)
}

/// Readies `t` (VIPs on the backends, second chance, echo servers on port 80) and
/// writes `l`'s config: one service per entry of `svcs` over backends 0..3, each with
/// `HEALTH`. Backends get their MAC in the config (dsr-l2 needs one; the others use it
/// as the next hop too).
pub fn setup(t: &Topology, l: &Lbd, svcs: &[Svc]) {
    for s in svcs {
        t.add_vip_to_backends(s.vip);
    }
    t.enable_second_chance();
    t.start_servers(80, ServerMode::Echo);
    let backends: String = t.backends[..3]
        .iter()
        .map(|b| {
            format!(
                "[[service.backend]]\naddress = \"{}\"\nmac = \"{}\"\n",
                b.v4,
                crate::netns::mac_str(&b.mac)
            )
        })
        .collect();
    let services: String = svcs
        .iter()
        .map(|s| format!("[[service]]\nname = \"{}\"\nvip = \"{}:80/tcp\"\nmode = \"{}\"\ntable_size = 1009\n{HEALTH}{backends}\n", s.name, s.vip, s.mode))
        .collect();
    l.write_config(&services);
}

/// After `l` started: waits until every backend of every service is in its table and
/// checks that each service reaches all three backends (30 connections). Err: what is
/// wrong.
pub fn warm_up(t: &Topology, l: &Lbd, svcs: &[Svc]) -> Result<(), String> {
    for s in svcs {
        if wait_for(Duration::from_secs(15), || all_in_table(l, &s.name)).is_none() {
            return Err(format!(
                "{}: not every backend in the table:\n{}",
                s.name,
                l.lbctl(&["backend", "list", &s.name]).1
            ));
        }
    }
    for s in svcs {
        let mut got = std::collections::BTreeSet::new();
        for i in 0..30 {
            let c = t
                .connect(s.vip, 80)
                .map_err(|e| format!("{} warm-up {i}: {e}\n{}", s.name, l.log()))?;
            got.insert(c.backend);
        }
        if got.len() != 3 {
            return Err(format!("{}: 30 connections reached only {got:?}", s.name));
        }
    }
    Ok(())
}

/// The run: a client per service connects every `EVERY`; after 500 ms backend 0's
/// server stops; once the health checks have taken backend 0 out of every service's
/// table, one more second. (outcome per service, how long the checks took). Err: the
/// checks did not take it out within 10 s.
pub fn server_stops(
    t: &Topology,
    l: &Lbd,
    svcs: &[Svc],
) -> Result<(Vec<Outcome>, Duration), String> {
    let dead = t.backends[0].v4.to_string();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let clients: Vec<_> = svcs
            .iter()
            .map(|v| s.spawn(|| open_every(t, v.vip, EVERY, &stop)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        t.stop_server(0, 80);
        let out = wait_for(Duration::from_secs(10), || {
            svcs.iter()
                .all(|v| backend_field(l, &v.name, &dead, "in_table").as_bool() == Some(false))
        });
        let took = t0.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        let outcomes: Vec<Outcome> = clients
            .into_iter()
            .zip(svcs)
            .map(|(h, v)| {
                let (attempts, failed) = h.join().expect("client thread");
                Outcome {
                    name: v.name.clone(),
                    mode: v.mode.clone(),
                    attempts,
                    failed,
                }
            })
            .collect();
        match out {
            Some(_) => Ok((outcomes, took)),
            None => Err(format!(
                "health checks did not take be0 out within 10 s:\n{}",
                l.lbctl(&["backend", "list"]).1
            )),
        }
    })
}
