//! Two lbd nodes under a flood of new flows, shared by `e2e_flood` (the assertions)
//! and `lb-bench-control` (the rates): 64 services, 4,032 backends (addresses routed
//! through one backend namespace), spoofed flows from the client namespace
//! (AF_PACKET), each a SYN and then an ACK: the datapath reports a flow for sync on its
//! second packet, so every flow reaches the flow-sync path (a bare SYN flood would
//! not). While it runs, `lbctl status` is asked on both nodes every 100 ms.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_userspace::api::Request;
use lb_userspace::daemon::call;
use serde_json::Value;

use crate::lbd::{Lbd, wait_for};
use crate::netns::{TopoSpec, Topology, in_ns};
use crate::pair::{PORT, SECRET};

pub const SERVICES: usize = 64;
pub const PER_SERVICE: usize = 63;
pub const HEARTBEAT_MS: u32 = 100;

pub fn vip(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, 0, 1 + s as u8)
}

fn backend(s: usize, b: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 210, s as u8, 1 + b as u8)
}

fn config(t: &Topology, i: usize, l: &Lbd, heartbeat_ms: u32) -> String {
    let secret = l.dir.join("cluster.key");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut s = String::new();
    for k in 0..SERVICES {
        s += &format!("[[service]]\nname = \"s{k}\"\nvip = \"{}:80/tcp\"\ntable_size = 251\n", vip(k));
        for b in 0..PER_SERVICE {
            s += &format!("[[service.backend]]\naddress = \"{}\"\n", backend(k, b));
        }
    }
    let (me, other) = (&t.lbs[i], &t.lbs[1 - i]);
    s + &format!(
        "[cluster]\nnode_id = {}\npriority = {}\nlisten = \"{}:{PORT}\"\npeer = \"{}:{PORT}\"\nsecret_file = \"{}\"\nheartbeat_ms = {heartbeat_ms}\ndead_after = 3\n",
        i + 1,
        if i == 0 { 200 } else { 100 },
        me.v4,
        other.v4,
        secret.display()
    )
}

pub fn cluster(l: &Lbd) -> Value {
    l.lbctl_json(&["cluster", "status"])
}

pub fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// One spoofed flow to `dst`: its SYN, then an ACK (its second packet).
fn flow(src_mac: [u8; 6], dst_mac: [u8; 6], client: Ipv4Addr, port: u16, dst: Ipv4Addr) -> [Vec<u8>; 2] {
    let tcp = || etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(client.octets(), dst.octets(), 64).tcp(port, 80, 1, 64240);
    let frame = |b: etherparse::PacketBuilderStep<etherparse::TcpHeader>| {
        let mut f = Vec::with_capacity(b.size(0));
        b.write(&mut f, &[]).unwrap();
        f
    };
    [frame(tcp().syn()), frame(tcp().ack(1))]
}

/// Sends `rate` new flows/s (SYN + ACK) for `secs` s (in 5 ms slices) from the client's
/// interface to the node with `dst_mac`; returns how many flows were sent whole.
fn flood(t: &Topology, dst_mac: [u8; 6], rate: u64, secs: u64) -> u64 {
    let (ns, ifname, src_mac) = (t.client.ns.clone(), t.client.ifname.clone(), t.client.mac);
    in_ns(&ns, move || {
        // SAFETY: socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: raw is a fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&dst_mac);
        let slice = Duration::from_millis(5);
        let per_slice = rate * slice.as_millis() as u64 / 1000;
        let t0 = Instant::now();
        let mut sent = 0u64;
        let mut k = 0u32;
        while t0.elapsed() < Duration::from_secs(secs) {
            let due = (t0.elapsed().as_micros() as u64 / slice.as_micros() as u64 + 1) * per_slice;
            while sent < due {
                k = k.wrapping_add(1);
                let client = Ipv4Addr::from(0xc612_0000u32 | (k & 0xffff)); // 198.18.0.0/16
                let frames = flow(src_mac, dst_mac, client, 1024 + (k >> 16) as u16 * 7 + (k % 50_000) as u16, vip(0));
                let whole = frames.iter().all(|f| {
                    // SAFETY: sendto with a buffer and address we own.
                    let r = unsafe {
                        libc::sendto(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0, (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32)
                    };
                    r > 0
                });
                if whole {
                    sent += 1;
                }
            }
            std::thread::sleep(slice.saturating_sub(Duration::from_micros(t0.elapsed().as_micros() as u64 % slice.as_micros() as u64)));
        }
        sent
    })
}


/// What one flood run saw: the cluster status of both nodes before and after, the
/// flows sent whole, the active's new flows, and the slowest `lbctl status`.
pub struct FloodRun {
    pub sent: u64,
    pub secs: f64,
    pub new_flows: u64,
    pub polls: u64,
    pub slowest: Duration,
    pub before: [Value; 2],
    pub after: [Value; 2],
    pub roles_after: [String; 2],
    /// From the end of the flood until the backup had everything sent (5 s at most).
    pub catch_up: Duration,
}

impl FloodRun {
    /// Flows the backup applied or counted as dropped or unknown.
    pub fn received(&self) -> u64 {
        let b = &self.after[1];
        n(b, "flows_applied") + n(b, "flows_dropped_apply_queue") + n(b, "flows_unknown_vip") + n(b, "flows_unknown_backend")
    }
}

/// Sets up the pair in namespaces named `prefix*`, floods the active at `rate` new
/// flows/s for `secs` s, waits (bounded) for the backup to catch up, and reports.
pub fn run(prefix: &str, rate: u64, secs: u64) -> FloodRun {
    let t = Topology::new(prefix, TopoSpec { lbs: 2, backends: 3 });
    // Every backend address is behind be0: one next hop, 4,032 routes to ask.
    for lb in &t.lbs {
        let ok = Command::new("ip").args(["-n", &lb.ns, "route", "add", "10.210.0.0/16", "via", &t.backends[0].v4.to_string()]).status().unwrap();
        assert!(ok.success());
    }
    let mut nodes = [Lbd::new(&t, 0, &format!("{prefix}n1")), Lbd::new(&t, 1, &format!("{prefix}n2"))];
    for (i, l) in nodes.iter().enumerate() {
        std::fs::write(l.config_path(), format!("{}\n{}", l.config_header(), config(&t, i, l, HEARTBEAT_MS))).unwrap();
    }
    for l in &mut nodes {
        l.start();
    }
    let roles = |ns: &[Lbd; 2]| [cluster(&ns[0])["role"].as_str().unwrap().to_string(), cluster(&ns[1])["role"].as_str().unwrap().to_string()];
    assert!(wait_for(Duration::from_secs(10), || roles(&nodes) == ["active", "backup"]).is_some(), "roles: {:?}", roles(&nodes));
    for l in &nodes {
        assert!(
            wait_for(Duration::from_secs(20), || l.lbctl_json(&["status"])["backends_pending"] == 0).is_some(),
            "every backend reachable on {}: {}",
            l.instance,
            l.lbctl(&["status"]).1
        );
        assert_eq!(l.lbctl_json(&["status"])["backends"], SERVICES * PER_SERVICE);
    }
    let before = [cluster(&nodes[0]), cluster(&nodes[1])];

    // `lbctl status` on both nodes every 100 ms while the flood runs.
    let stop = AtomicBool::new(false);
    let (sent, slowest) = std::thread::scope(|s| {
        let poll = s.spawn(|| {
            let mut slowest = Duration::ZERO;
            let mut polls = 0;
            while !stop.load(Ordering::Relaxed) {
                for l in &nodes {
                    let t0 = Instant::now();
                    let r = call(&l.socket(), &Request::Status {}).expect("status during the flood");
                    assert!(r.ok);
                    slowest = slowest.max(t0.elapsed());
                    polls += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (slowest, polls)
        });
        let sent = flood(&t, t.lbs[0].mac, rate, secs);
        stop.store(true, Ordering::Relaxed);
        (sent, poll.join().unwrap())
    });
    let (slowest, polls) = slowest;
    // The backup catches up with what was sent (bounded wait).
    let settled = |_: ()| {
        let (a, b) = (cluster(&nodes[0]), cluster(&nodes[1]));
        n(&a, "flows_queued") == n(&a, "flows_sent") && n(&b, "flows_applied") + n(&b, "flows_dropped_apply_queue") + n(&b, "flows_unknown_vip") + n(&b, "flows_unknown_backend") >= n(&a, "flows_sent")
    };
    let catch_up = wait_for(Duration::from_secs(5), || settled(())).unwrap_or(Duration::from_secs(5));
    let after = [cluster(&nodes[0]), cluster(&nodes[1])];
    let new_flows = nodes[0].lbctl_json(&["stats"])["services"].as_array().unwrap().iter().map(|s| s["new_flows"].as_u64().unwrap()).sum::<u64>();
    FloodRun { sent, secs: secs as f64, new_flows, polls, slowest, before, after, roles_after: roles(&nodes), catch_up }
}
