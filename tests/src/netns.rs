//! End-to-end topology in network namespaces: one L2 segment (a Linux bridge in its own
//! namespace), a client, 1-3 balancer nodes and ≥ 3 backends, each in its own namespace
//! on a veth into the bridge. Real TCP through the VIP.
//!
//! ```text
//!            ┌──────────────── <prefix>sw: bridge <prefix>br ────────────────┐
//!   <prefix>cl ── client      <prefix>lb0..2 ── balancer     <prefix>be0..N ── backends
//! ```
//!
//! Routed (`Topology::routed`, issue 14): the client sits behind a router on a link of
//! its own; the router is on the segment and spreads the VIPs over the balancers by ECMP
//! (routes put there by BIRD, see `crate::bgp`, or by a test):
//!
//! ```text
//!   <prefix>cl ── client ──(<prefix>clp)── <prefix>rt ── router ── bridge ── lb0..2, be0..N
//!   10.210.0.100              10.210.0.1  10.200.0.254
//! ```
//!
//! - Client 10.210.0.100 / fd00:210::100, router 10.210.0.1 / fd00:210::1 on the client
//!   link and 10.200.0.254 / fd00:200::254 on the segment; forwarding on and
//!   `fib_multipath_hash_policy = 1` (L4 hash, IPv4 and IPv6) in the router.
//! - The client routes the VIP prefixes via the router (`mtu 1400`); backends and
//!   balancers route the client subnet via the router (DSR replies go through it).
//! - The bridge does not flood unknown unicast to the balancers' ports (a NIC's MAC
//!   filter): frames for a dead balancer do not reach the live ones' XDP. Balancers
//!   keep their IPv6 address across `set_lb_link` down/up (`keep_addr_on_down`).
//!
//! - Addresses (one subnet, in every topology: namespaces isolate them): client
//!   10.200.0.100 / fd00:200::100, LB i 10.200.0.(1+i) / fd00:200::(1+i), backend i
//!   10.200.0.(11+i) / fd00:200::(11+i) (same digits); VIPs in 10.201.0.0/24 and fd00:201::/64, routed
//!   by the client via one LB (`set_client_route`). Fixed MACs (`MAC_*`).
//! - The bridge-side veth of every LB runs `lb_pass` (native XDP_TX from the balancer on
//!   a veth arrives only when the peer runs XDP); every backend runs `lb_decap` (native)
//!   on its interface, holds the VIPs on `lo` and sets arp_ignore=1/arp_announce=2.
//! - The client's interface computes TCP/UDP checksums in software (`tx off`): a real
//!   wire never carries CHECKSUM_PARTIAL frames, and a veth would hand them to the
//!   balancer's XDP (which rewrites and retransmits them) with the L4 checksum unfilled.
//! - The client's VIP routes carry `mtu 1400`, so client segments stay below the
//!   balancer's MTU (1500) after the outer header (20 or 40 bytes) is added.
//!
//! Nothing leaves these namespaces: every address used is inside them. Everything is
//! removed on drop (also after a panic) and at the start (`cleanup_stale`), by prefix.
//!
//! Pins: the XDP programs are pinned under `/sys/fs/bpf/lb-decap/<interface>/` in the
//! global bpffs, so pinned interface names carry the prefix. Processes that pin must be
//! started with `nsenter --net` (`spawn_in`), never `ip netns exec` (private /sys).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::programs::{Xdp, XdpMode};
use lb_common::maglev::{MaglevBackend, build};
use lb_common::{FlowKey, PROTO_TCP, addr_bytes, prog_names};
use lb_userspace::{AyaMaps, BackendSpec, ControlPlane, decap};

use crate::Datapath;

/// Timeout of every socket operation of the harness.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

pub const SUBNET_V4_LEN: u8 = 24;
pub const SUBNET_V6_LEN: u8 = 64;
pub const VIP_NET_V4: &str = "10.201.0.0/24";
pub const VIP_NET_V6: &str = "fd00:201::/64";
/// The client's own subnet in a routed topology.
pub const CLIENT_NET_V4: &str = "10.210.0.0/24";
pub const CLIENT_NET_V6: &str = "fd00:210::/64";
pub const MAC_ROUTER: [u8; 6] = [0x02, 0xe2, 0, 3, 0, 0xfe];
pub const MAC_ROUTER_CLIENT_SIDE: [u8; 6] = [0x02, 0xe2, 0, 3, 0, 0x01];
/// Host part of the router on the segment (10.200.0.254, fd00:200::254).
pub const ROUTER_HOST: u8 = 254;
/// Route MTU toward the VIPs (see the module docs).
pub const VIP_ROUTE_MTU: u32 = 1400;

pub const MAC_CLIENT: [u8; 6] = [0x02, 0xe2, 0, 0, 0, 0x64];
pub fn mac_lb(i: usize) -> [u8; 6] {
    [0x02, 0xe2, 0, 1, 0, i as u8]
}
pub fn mac_backend(i: usize) -> [u8; 6] {
    [0x02, 0xe2, 0, 2, 0, i as u8]
}

/// A VIP address of the VIP prefixes (`n` < 256).
pub fn vip_v4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 201, 0, n))
}
pub fn vip_v6(n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, n))
}

fn v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, host)
}
/// Same digits as the IPv4 host part: 11 → fd00:200::11.
fn v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, digits(host))
}
fn digits(host: u8) -> u16 {
    u16::from_str_radix(&host.to_string(), 16).expect("digits")
}
/// The client subnet of a routed topology: 10.210.0.<host>, fd00:210::<host digits>.
fn client_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 210, 0, host)
}
fn client_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, digits(host))
}

/// The EUI-64 link-local address the kernel gives an interface with MAC `m`.
pub fn link_local(m: &[u8; 6]) -> Ipv6Addr {
    let w = |a: u8, b: u8| u16::from_be_bytes([a, b]);
    Ipv6Addr::new(0xfe80, 0, 0, 0, w(m[0] ^ 2, m[1]), w(m[2], 0xff), w(0xfe, m[3]), w(m[4], m[5]))
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[derive(Clone, Debug)]
pub struct TopoSpec {
    /// Balancer nodes (1 to 3).
    pub lbs: usize,
    /// Backend nodes (≥ 3).
    pub backends: usize,
}

/// One namespace on the segment.
#[derive(Clone, Debug)]
pub struct Node {
    /// Role name: `client`, `lb0`, `be0`, ... (backends answer with it).
    pub name: String,
    pub ns: String,
    /// The interface inside `ns`.
    pub ifname: String,
    /// Its veth peer, a port of the bridge in the switch namespace.
    pub peer: String,
    pub mac: [u8; 6],
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Node {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(self.v6) } else { IpAddr::V4(self.v4) }
    }
}

/// What a backend's server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMode {
    /// On connect: `<backend name>\n`; then echoes every byte it receives.
    Echo,
    /// One HTTP/1.1 request per connection: `GET /healthz` → 200 `ok`, `GET /` → 200
    /// `<backend name>\n`, anything else 404; then closes.
    Http,
}

struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The router of a routed topology (`Topology::routed`).
#[derive(Clone, Debug)]
pub struct Router {
    /// Its side of the segment: namespace `<prefix>rt`, interface `<prefix>rt` into the
    /// bridge, 10.200.0.254 / fd00:200::254.
    pub node: Node,
    /// Its interface toward the client (`<prefix>clp`, in `node.ns`).
    pub client_if: String,
    /// Its addresses on the client link (the client's gateway).
    pub client_side_v4: Ipv4Addr,
    pub client_side_v6: Ipv6Addr,
}

impl Router {
    pub fn ns(&self) -> &str {
        &self.node.ns
    }
}

pub struct Topology {
    pub prefix: String,
    pub switch_ns: String,
    pub bridge: String,
    /// In a routed topology the client is not on the segment: its `peer` is the
    /// router's client-side interface.
    pub client: Node,
    pub lbs: Vec<Node>,
    pub backends: Vec<Node>,
    /// Present in a routed topology (`Topology::routed`).
    pub router: Option<Router>,
    /// Interfaces with pins under /sys/fs/bpf/lb-decap (detached on drop).
    pins: Mutex<Vec<String>>,
    /// (backend index, port) → running server.
    servers: Mutex<BTreeMap<(usize, u16), Server>>,
    vips: Mutex<Vec<IpAddr>>,
    cleaned: AtomicBool,
}

pub fn run_out(args: &[&str]) -> String {
    run(Command::new(args[0]).args(&args[1..])).unwrap_or_else(|e| e.to_string())
}

pub(crate) fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>`; panics with the command and its stderr on failure (setup only).
fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("topology setup: {e}"));
}

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// Moves the calling thread into network namespace `ns` (only its network namespace:
/// mounts, and so the global bpffs, stay). Sockets it creates afterwards belong to `ns`,
/// interface names resolve in `ns`.
pub fn enter_ns(ns: &str) -> io::Result<()> {
    let f = std::fs::File::open(netns_path(ns))?;
    // SAFETY: setns on an fd we own; CLONE_NEWNET affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` in a thread inside network namespace `ns` and returns its result (a panic
/// in `f` is propagated).
pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter_ns(ns).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
            f()
        });
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Writes a sysctl of namespace `ns` (`net.ipv4.conf.all.rp_filter` style key).
pub fn sysctl(ns: &str, key: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_ns(ns, || std::fs::write(&path, value)).map_err(|e| io::Error::other(format!("sysctl {key}={value} in {ns}: {e}")))
}

/// A process in a network namespace, killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL now and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command that runs `program` in network namespace `ns` through `nsenter --net`
/// (which execs it: the child's pid is the program's). Add arguments and stdio, then
/// `spawn_in`.
pub fn ns_command(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(ns))).arg("--").arg(program);
    c
}

/// Runs `cmd` (program, arguments, environment, working directory are taken over) in
/// network namespace `ns`, stdin null and stdout/stderr inherited. Killed on drop of the
/// guard. The pid is nsenter's until it has entered `ns` and exec'd the program (a few
/// ms): wait for the program's own sign of life before relying on its namespace.
pub fn spawn_in(ns: &str, cmd: &Command) -> io::Result<ChildGuard> {
    let mut c = ns_command(ns, &cmd.get_program().to_string_lossy());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c.stdin(Stdio::null());
    Ok(ChildGuard { child: c.spawn()? })
}

/// Removes what a crashed run with `prefix` left: XDP pins, namespaces, root-namespace
/// links.
pub fn cleanup_stale(prefix: &str) {
    if let Ok(rd) = std::fs::read_dir(decap::PIN_ROOT) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                let _ = decap::detach(&name);
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let _ = std::fs::remove_dir(decap::PIN_ROOT);
    }
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                let _ = run(Command::new("ip").args(["netns", "del", &name]));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                let _ = run(Command::new("ip").args(["link", "del", &name]));
            }
        }
    }
}

impl Topology {
    /// Builds the topology; names start with `prefix` (≤ 8 characters, e.g. `lbe-a`),
    /// after removing stale leftovers with that prefix. Panics on a setup failure
    /// (everything made so far is removed by the drop).
    pub fn new(prefix: &str, spec: TopoSpec) -> Topology {
        Self::make(prefix, spec, false)
    }

    /// A routed topology (module docs): the client behind a router namespace on the
    /// segment. The router has no route to the VIPs until BIRD (or `set_router_vip_route`)
    /// puts one there.
    pub fn routed(prefix: &str, spec: TopoSpec) -> Topology {
        Self::make(prefix, spec, true)
    }

    fn make(prefix: &str, spec: TopoSpec, routed: bool) -> Topology {
        crate::require_root();
        assert!(prefix.len() <= 8 && !prefix.is_empty(), "prefix {prefix:?}: 1..=8 characters (interface names ≤ 15)");
        assert!((1..=3).contains(&spec.lbs), "1 to 3 balancer nodes");
        assert!((3..=40).contains(&spec.backends), "3..=40 backends");
        cleanup_stale(prefix);
        let node = |name: String, mac, v4, v6| Node {
            ns: format!("{prefix}{name}"),
            ifname: format!("{prefix}{name}"),
            peer: format!("{prefix}{name}p"),
            name,
            mac,
            v4,
            v6,
        };
        let t = Topology {
            prefix: prefix.to_string(),
            switch_ns: format!("{prefix}sw"),
            bridge: format!("{prefix}br"),
            client: if routed {
                node("cl".into(), MAC_CLIENT, client_v4(100), client_v6(100))
            } else {
                node("cl".into(), MAC_CLIENT, v4(100), v6(100))
            },
            router: routed.then(|| Router {
                node: node("rt".into(), MAC_ROUTER, v4(ROUTER_HOST), v6(ROUTER_HOST)),
                client_if: format!("{prefix}clp"),
                client_side_v4: client_v4(1),
                client_side_v6: client_v6(1),
            }),
            lbs: (0..spec.lbs).map(|i| node(format!("lb{i}"), mac_lb(i), v4(1 + i as u8), v6(1 + i as u8))).collect(),
            backends: (0..spec.backends)
                .map(|i| node(format!("be{i}"), mac_backend(i), v4(11 + i as u8), v6(11 + i as u8)))
                .collect(),
            pins: Mutex::new(Vec::new()),
            servers: Mutex::new(BTreeMap::new()),
            vips: Mutex::new(Vec::new()),
            cleaned: AtomicBool::new(false),
        };
        // From here on a panic drops `t`, which removes what exists.
        t.build();
        t
    }

    /// Every namespace with a node: client, router (routed), balancers, backends.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        // The router first: the routed client's link is made into its namespace.
        self.router.as_ref().map(|r| &r.node).into_iter().chain(std::iter::once(&self.client)).chain(&self.lbs).chain(&self.backends)
    }

    pub fn router(&self) -> &Router {
        self.router.as_ref().expect("a routed topology (Topology::routed)")
    }

    fn build(&self) {
        let sw = self.switch_ns.as_str();
        ip(&["netns", "add", sw]);
        // No IPv6 on the bridge ports: no router solicitations or MLD noise on the segment.
        sysctl(sw, "net.ipv6.conf.default.disable_ipv6", "1").unwrap();
        sysctl(sw, "net.ipv6.conf.all.disable_ipv6", "1").unwrap();
        ip(&["-n", sw, "link", "add", &self.bridge, "type", "bridge"]);
        ip(&["-n", sw, "link", "set", &self.bridge, "up"]);
        // br_netfilter is built in: without this the bridge drops frames it finds odd.
        for k in ["iptables", "ip6tables", "arptables"] {
            sysctl(sw, &format!("net.bridge.bridge-nf-call-{k}"), "0").unwrap();
        }
        for n in self.nodes() {
            ip(&["netns", "add", &n.ns]);
            for (k, v) in [
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
            ] {
                sysctl(&n.ns, k, v).unwrap();
            }
            match &self.router {
                // The routed client's link ends in the router (made first: `nodes` order).
                Some(r) if n.name == "cl" => {
                    ip(&["-n", &r.node.ns, "link", "add", &n.peer, "type", "veth", "peer", "name", &n.ifname, "netns", &n.ns]);
                }
                _ => {
                    ip(&["-n", sw, "link", "add", &n.peer, "type", "veth", "peer", "name", &n.ifname, "netns", &n.ns]);
                    ip(&["-n", sw, "link", "set", &n.peer, "master", &self.bridge, "up"]);
                }
            }
            ip(&["-n", &n.ns, "link", "set", "lo", "up"]);
            ip(&["-n", &n.ns, "link", "set", &n.ifname, "address", &mac_str(&n.mac), "up"]);
            ip(&["-n", &n.ns, "addr", "add", &format!("{}/{SUBNET_V4_LEN}", n.v4), "dev", &n.ifname]);
            ip(&["-n", &n.ns, "-6", "addr", "add", &format!("{}/{SUBNET_V6_LEN}", n.v6), "dev", &n.ifname, "nodad"]);
        }
        if let Some(r) = &self.router {
            self.build_router(r);
        }
        for b in &self.backends {
            sysctl(&b.ns, "net.ipv4.conf.all.arp_ignore", "1").unwrap();
            sysctl(&b.ns, "net.ipv4.conf.all.arp_announce", "2").unwrap();
        }
        run(ns_command(&self.client.ns, "ethtool").args(["-K", &self.client.ifname, "tx", "off"]))
            .unwrap_or_else(|e| panic!("topology setup: {e}"));
        for lb in &self.lbs {
            self.pins.lock().unwrap().push(lb.peer.clone());
            in_ns(sw, || decap::attach_pass(&lb.peer, XdpMode::Driver))
                .unwrap_or_else(|e| panic!("attaching lb_pass to {} in {sw}: {e:#}", lb.peer));
        }
        // Backends decapsulate only from the balancers (their node addresses are the
        // encap sources the tests configure).
        let balancers: Vec<IpAddr> = self.lbs.iter().flat_map(|l| [IpAddr::V4(l.v4), IpAddr::V6(l.v6)]).collect();
        for b in &self.backends {
            self.pins.lock().unwrap().push(b.ifname.clone());
            in_ns(&b.ns, || decap::attach(&b.ifname, XdpMode::Driver, &balancers))
                .unwrap_or_else(|e| panic!("attaching lb_decap to {} in {}: {e:#}", b.ifname, b.ns));
        }
        if self.router.is_none() {
            self.set_client_route(0);
        }
    }

    /// The router's client link, forwarding and ECMP hashing; the routes of the
    /// client (VIPs via the router) and of the segment (client subnet via the router).
    fn build_router(&self, r: &Router) {
        let rt = r.node.ns.as_str();
        // The namespace (made in `build`, before the client's link) exists: the
        // router's side of the client link, whose veth peer went to the client.
        ip(&["-n", rt, "link", "set", &r.client_if, "address", &mac_str(&MAC_ROUTER_CLIENT_SIDE), "up"]);
        ip(&["-n", rt, "addr", "add", &format!("{}/{SUBNET_V4_LEN}", r.client_side_v4), "dev", &r.client_if]);
        ip(&["-n", rt, "-6", "addr", "add", &format!("{}/{SUBNET_V6_LEN}", r.client_side_v6), "dev", &r.client_if, "nodad"]);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // L4 hash: the flows of one client spread over the balancers.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
        ] {
            sysctl(rt, k, v).unwrap();
        }
        let mtu = VIP_ROUTE_MTU.to_string();
        let cl = &self.client;
        let (gw4, gw6) = (r.client_side_v4.to_string(), r.client_side_v6.to_string());
        ip(&["-n", &cl.ns, "route", "replace", VIP_NET_V4, "via", &gw4, "mtu", &mtu]);
        ip(&["-n", &cl.ns, "-6", "route", "replace", VIP_NET_V6, "via", &gw6, "mtu", &mtu]);
        // A NIC drops unicast frames for other MACs; a veth hands them to XDP, and
        // lb_xdp forwards whatever is addressed to a VIP. Without this, the bridge
        // would flood the frames for a dead balancer (its MAC forgotten with its link)
        // to the live ones, which would forward them: a dead node would lose nothing.
        for l in &self.lbs {
            run(Command::new("bridge").args(["-n", &self.switch_ns, "link", "set", "dev", &l.peer, "flood", "off"]))
                .unwrap_or_else(|e| panic!("topology setup: {e}"));
            // `set_lb_link` down and up again must give the node back its IPv6 address
            // (the kernel drops it with the link otherwise), or its IPv6 BGP session
            // never returns.
            sysctl(&l.ns, &format!("net.ipv6.conf.{}.keep_addr_on_down", l.ifname), "1").unwrap();
        }
        let (seg4, seg6) = (r.node.v4.to_string(), r.node.v6.to_string());
        for n in self.lbs.iter().chain(&self.backends) {
            ip(&["-n", &n.ns, "route", "replace", CLIENT_NET_V4, "via", &seg4]);
            ip(&["-n", &n.ns, "-6", "route", "replace", CLIENT_NET_V6, "via", &seg6]);
        }
    }

    /// The next hops of the router's kernel route to `vip` (a /32 or /128, as BIRD
    /// installs them; several with ECMP), sorted; empty when there is none.
    pub fn router_next_hops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let (fam, len) = if vip.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
        let out = run(Command::new("ip").args(["-j", fam, "-n", self.router().ns(), "route", "show", "exact", &format!("{vip}/{len}")]))
            .unwrap_or_else(|e| panic!("router routes: {e}"));
        let mut hops = parse_next_hops(&out);
        hops.sort();
        hops
    }

    /// The balancer a next hop of the router's routes is: its address, or (IPv6
    /// routes from BIRD, which prefers the link-local next hop) its link-local address.
    pub fn lb_of_hop(&self, hop: IpAddr) -> Option<usize> {
        self.lbs.iter().position(|l| hop == IpAddr::V4(l.v4) || hop == IpAddr::V6(l.v6) || hop == IpAddr::V6(link_local(&l.mac)))
    }

    /// The balancer indexes the router's route to `vip` points at now, sorted (a next
    /// hop that is no balancer is left out).
    pub fn router_lbs(&self, vip: IpAddr) -> Vec<usize> {
        let mut v: Vec<usize> = self.router_next_hops(vip).into_iter().filter_map(|h| self.lb_of_hop(h)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Waits (at most `max`, checking every 10 ms) until the router's route to `vip`
    /// points at exactly balancers `lbs`; the time it took.
    pub fn wait_router_lbs(&self, vip: IpAddr, lbs: &[usize], max: Duration) -> Option<Duration> {
        let mut want = lbs.to_vec();
        want.sort();
        let t = Instant::now();
        while t.elapsed() < max {
            if self.router_lbs(vip) == want {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Makes the VIP prefixes on-link for the router (an active/backup pair holds
    /// its VIPs by ARP/ND, `pair::pair_routed`).
    pub fn set_router_vip_onlink(&self) {
        let r = self.router();
        ip(&["-n", r.ns(), "route", "replace", VIP_NET_V4, "dev", &r.node.ifname]);
        ip(&["-n", r.ns(), "-6", "route", "replace", VIP_NET_V6, "dev", &r.node.ifname]);
    }

    /// Sends the client's TCP connections from source ports `ports` to the VIP
    /// prefixes through balancer `lb`, whatever the router's ECMP route says (a policy
    /// rule and table `100 + lb` in the router): a test reaches one node on purpose.
    pub fn pin_client_ports(&self, ports: std::ops::RangeInclusive<u16>, lb: usize) {
        let rt = self.router().ns().to_string();
        let table = (100 + lb).to_string();
        let l = &self.lbs[lb];
        ip(&["-n", &rt, "route", "replace", VIP_NET_V4, "via", &l.v4.to_string(), "table", &table]);
        ip(&["-n", &rt, "-6", "route", "replace", VIP_NET_V6, "via", &l.v6.to_string(), "table", &table]);
        let range = format!("{}-{}", ports.start(), ports.end());
        for fam in ["-4", "-6"] {
            ip(&["-n", &rt, fam, "rule", "add", "priority", "100", "iif", &self.router().client_if, "ipproto", "tcp", "sport", &range, "lookup", &table]);
        }
    }

    /// Undoes every `pin_client_ports`.
    pub fn unpin_client_ports(&self) {
        let rt = self.router().ns().to_string();
        for fam in ["-4", "-6"] {
            // Bounded: one rule per pinned range and family.
            for _ in 0..64 {
                if run(Command::new("ip").args(["-n", &rt, fam, "rule", "del", "priority", "100"])).is_err() {
                    break;
                }
            }
        }
    }

    /// Sets balancer `lb`'s interface up or down (a dead machine: its XDP program
    /// would otherwise go on forwarding what still reaches it).
    pub fn set_lb_link(&self, lb: usize, up: bool) {
        let l = &self.lbs[lb];
        ip(&["-n", &l.ns, "link", "set", &l.ifname, if up { "up" } else { "down" }]);
    }

    /// Points the client's routes to the VIP prefixes at balancer `lb` (failover).
    pub fn set_client_route(&self, lb: usize) {
        assert!(self.router.is_none(), "routed topology: the router picks the balancer");
        let l = &self.lbs[lb];
        let mtu = VIP_ROUTE_MTU.to_string();
        ip(&["-n", &self.client.ns, "route", "replace", VIP_NET_V4, "via", &l.v4.to_string(), "mtu", &mtu]);
        ip(&["-n", &self.client.ns, "-6", "route", "replace", VIP_NET_V6, "via", &l.v6.to_string(), "mtu", &mtu]);
    }

    /// Makes the VIP prefixes on-link for the client: it ARPs/NDs for each VIP and
    /// sends to whichever balancer answers (the active node of a cluster holds them).
    pub fn set_client_route_onlink(&self) {
        assert!(self.router.is_none(), "routed topology: the client is not on the segment");
        let mtu = VIP_ROUTE_MTU.to_string();
        let dev = self.client.ifname.as_str();
        ip(&["-n", &self.client.ns, "route", "replace", VIP_NET_V4, "dev", dev, "mtu", &mtu]);
        ip(&["-n", &self.client.ns, "-6", "route", "replace", VIP_NET_V6, "dev", dev, "mtu", &mtu]);
    }

    /// Readies the backends for GUE second chance (issue 15): forwarding on their
    /// interface (bpf_fib_lookup answers only there), every other backend a permanent
    /// neighbour (the FIB helper needs the next hop's MAC at once), and lb_pass on their
    /// bridge ports (native XDP_TX on a veth needs a program on the peer).
    pub fn enable_second_chance(&self) {
        for b in &self.backends {
            sysctl(&b.ns, &format!("net.ipv4.conf.{}.forwarding", b.ifname), "1").unwrap();
            sysctl(&b.ns, &format!("net.ipv6.conf.{}.forwarding", b.ifname), "1").unwrap();
            for o in self.backends.iter().filter(|o| o.name != b.name) {
                for a in [o.v4.to_string(), o.v6.to_string()] {
                    ip(&["-n", &b.ns, "neigh", "replace", &a, "lladdr", &mac_str(&o.mac), "dev", &b.ifname, "nud", "permanent"]);
                }
            }
            self.pins.lock().unwrap().push(b.peer.clone());
            in_ns(&self.switch_ns, || decap::attach_pass(&b.peer, XdpMode::Driver))
                .unwrap_or_else(|e| panic!("attaching lb_pass to {} in {}: {e:#}", b.peer, self.switch_ns));
        }
    }

    /// Puts `vip` on `lo` of every backend (idempotent).
    pub fn add_vip_to_backends(&self, vip: IpAddr) {
        let mut vips = self.vips.lock().unwrap();
        if vips.contains(&vip) {
            return;
        }
        for b in &self.backends {
            let a = if vip.is_ipv4() { format!("{vip}/32") } else { format!("{vip}/128") };
            ip(&["-n", &b.ns, "addr", "add", &a, "dev", "lo"]);
        }
        vips.push(vip);
    }

    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name == name)
    }

    /// The backend spec of backend `i` for a service of family `v6` (address of that
    /// family, the backend's MAC as next hop).
    /// The Maglev table (IPv4, weight 1, ids = indices) of the first `n` backends, as
    /// every node builds it: Maglev depends on addresses and weights only.
    pub fn maglev_table_of_first(&self, n: usize, table_size: u32) -> Vec<u32> {
        let specs: Vec<(BackendSpec, u32)> = (0..n).map(|i| (self.backend_spec(i, false, 1), i as u32)).collect();
        maglev_table(&specs, table_size)
    }

    pub fn backend_spec(&self, i: usize, v6: bool, weight: u32) -> BackendSpec {
        let b = &self.backends[i];
        BackendSpec { addr: b.addr(v6), weight, mac: Some(b.mac) }
    }

    /// Backend name by address (either family).
    pub fn backend_by_addr(&self, a: IpAddr) -> Option<&Node> {
        self.backends.iter().find(|b| IpAddr::V4(b.v4) == a || IpAddr::V6(b.v6) == a)
    }

    /// Starts a server on backend `i`, port `port` (all addresses, both families).
    pub fn start_server(&self, i: usize, port: u16, mode: ServerMode) {
        let b = &self.backends[i];
        let listener = in_ns(&b.ns, || {
            // [::] with IPV6_V6ONLY off (the netns default): IPv4 and IPv6 clients.
            TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        })
        .unwrap_or_else(|e| panic!("server {} port {port}: bind: {e}", b.name));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let name = b.name.clone();
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("srv-{name}-{port}"))
            .spawn(move || serve(listener, name, mode, s2))
            .expect("spawn server thread");
        let old = self.servers.lock().unwrap().insert((i, port), Server { stop, thread: Some(thread) });
        assert!(old.is_none(), "server {i}:{port} was already running");
    }

    /// Starts a server on every backend.
    pub fn start_servers(&self, port: u16, mode: ServerMode) {
        for i in 0..self.backends.len() {
            self.start_server(i, port, mode);
        }
    }

    /// Stops backend `i`'s server on `port`: the listener and every connection close (a
    /// dead server: new connections are refused with a RST).
    pub fn stop_server(&self, i: usize, port: u16) {
        let s = self.servers.lock().unwrap().remove(&(i, port));
        drop(s.unwrap_or_else(|| panic!("no server {i}:{port}")));
    }

    /// Opens a TCP connection from the client namespace to `vip:port` and reads the
    /// backend's greeting (echo servers).
    pub fn connect(&self, vip: IpAddr, port: u16) -> io::Result<Conn> {
        let stream = self.client_stream(vip, port)?;
        let local = stream.local_addr()?;
        let mut stream = stream;
        let backend = read_line(&mut stream)?;
        Ok(Conn { backend, local, stream })
    }

    /// A connected stream from the client namespace, with I/O timeouts, nothing read.
    pub fn client_stream(&self, vip: IpAddr, port: u16) -> io::Result<TcpStream> {
        let s = in_ns(&self.client.ns, || TcpStream::connect_timeout(&SocketAddr::new(vip, port), IO_TIMEOUT))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Like `client_stream`, from client port `local_port` (so a test can aim at the
    /// backend a port is predicted to reach; see `Balancer::port_for`).
    pub fn client_stream_from(&self, local_port: u16, vip: IpAddr, port: u16) -> io::Result<TcpStream> {
        let local = SocketAddr::new(self.client.addr(vip.is_ipv6()), local_port);
        let s = in_ns(&self.client.ns, || connect_bound(local, SocketAddr::new(vip, port)))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// `connect` from client port `local_port`.
    pub fn connect_from(&self, local_port: u16, vip: IpAddr, port: u16) -> io::Result<Conn> {
        let mut stream = self.client_stream_from(local_port, vip, port)?;
        let local = stream.local_addr()?;
        let backend = read_line(&mut stream)?;
        Ok(Conn { backend, local, stream })
    }

    /// One HTTP GET from the client namespace: (status, body, client address).
    pub fn http_get(&self, vip: IpAddr, port: u16, path: &str) -> io::Result<(u16, String, SocketAddr)> {
        let s = self.client_stream(vip, port)?;
        http_exchange(s, vip, path)
    }

    /// `http_get` from client port `local_port`.
    pub fn http_get_from(&self, local_port: u16, vip: IpAddr, port: u16, path: &str) -> io::Result<(u16, String, SocketAddr)> {
        let s = self.client_stream_from(local_port, vip, port)?;
        http_exchange(s, vip, path)
    }

    /// Loads the balancer in-process and attaches `lb_xdp` in native mode to balancer
    /// node `lb`'s interface. Settings and services are the caller's (`b.dp.control`).
    pub fn load_balancer(&self, lb: usize) -> Balancer {
        let node = self.lbs[lb].clone();
        let mut dp = Datapath::load();
        let prog: &mut Xdp = dp.ebpf.program_mut(prog_names::BALANCER).expect("lb_xdp").try_into().expect("xdp");
        in_ns(&node.ns, || prog.attach(&node.ifname, XdpMode::Driver))
            .unwrap_or_else(|e| panic!("attaching lb_xdp to {} in {}: {e}", node.ifname, node.ns));
        Balancer { dp, node }
    }

    /// Removes everything (idempotent; also run by drop).
    pub fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        // Servers first: their sockets hold the backend namespaces.
        let servers = std::mem::take(&mut *self.servers.lock().unwrap_or_else(|p| p.into_inner()));
        drop(servers);
        for ifname in self.pins.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = decap::detach(&ifname);
            let _ = std::fs::remove_dir_all(decap::pin_dir(&ifname));
        }
        let _ = std::fs::remove_dir(decap::PIN_ROOT);
        for n in self.nodes() {
            let _ = run(Command::new("ip").args(["netns", "del", &n.ns]));
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.switch_ns]));
        // Anything else with our prefix (nothing is created in the root namespace).
        cleanup_stale(&self.prefix);
    }
}

/// The gateways of `ip -j route show` output: `gateway` of a single-path route, every
/// `nexthops[].gateway` of a multipath one.
pub fn parse_next_hops(json: &str) -> Vec<IpAddr> {
    let Ok(serde_json::Value::Array(routes)) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let gw = |v: &serde_json::Value| v.get("gateway").and_then(|g| g.as_str()).and_then(|g| g.parse::<IpAddr>().ok());
    let mut out = Vec::new();
    for r in &routes {
        match r.get("nexthops").and_then(|n| n.as_array()) {
            Some(hops) => out.extend(hops.iter().filter_map(gw)),
            None => out.extend(gw(r)),
        }
    }
    out
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The balancer attached to an LB node. Dropping it detaches the program.
pub struct Balancer {
    pub dp: Datapath,
    pub node: Node,
}

impl Balancer {
    pub fn control(&mut self) -> &mut ControlPlane<AyaMaps> {
        &mut self.dp.control
    }

    /// The backend id the datapath picks for a new TCP flow, computed in userspace from
    /// the service's current backend set (same Maglev build, same flow hash).
    pub fn predict(&self, service: &str, client: SocketAddr, vip: SocketAddr) -> u32 {
        let v = self.dp.control.service(service).unwrap_or_else(|| panic!("no service {service}"));
        predict_from(&v.backends, v.spec.table_size, client, vip)
    }

    /// The first client port in `ports` whose new TCP flow from the client address of
    /// `vip`'s family to `vip` the current table sends to backend `id`.
    pub fn port_for(&self, service: &str, client: IpAddr, vip: SocketAddr, id: u32, ports: std::ops::Range<u16>) -> Option<u16> {
        let v = self.dp.control.service(service)?;
        let table = maglev_table(&v.backends, v.spec.table_size);
        ports.into_iter().find(|p| table[flow_slot(SocketAddr::new(client, *p), vip, v.spec.table_size)] == id)
    }

    /// The current Maglev table of `service` (ids), for many predictions at once.
    pub fn table(&self, service: &str) -> Vec<u32> {
        let v = self.dp.control.service(service).unwrap_or_else(|| panic!("no service {service}"));
        maglev_table(&v.backends, v.spec.table_size)
    }
}

/// The Maglev table the control plane builds for `backends` ((spec, id) pairs).
pub fn maglev_table(backends: &[(BackendSpec, u32)], table_size: u32) -> Vec<u32> {
    let mb: Vec<MaglevBackend> =
        backends.iter().map(|(b, id)| MaglevBackend { addr: addr_bytes(b.addr), weight: b.weight, id: *id }).collect();
    build(&mb, table_size).expect("Maglev build")
}

/// The table slot index of a TCP flow client → vip.
pub fn flow_slot(client: SocketAddr, vip: SocketAddr, table_size: u32) -> usize {
    lb_common::maglev::slot(&tcp_flow_key(client, vip), table_size)
}

pub fn tcp_flow_key(client: SocketAddr, vip: SocketAddr) -> FlowKey {
    FlowKey::new(unmap(client.ip()), client.port(), unmap(vip.ip()), vip.port(), PROTO_TCP)
}

/// IPv4-mapped IPv6 (as a dual-stack socket reports IPv4 peers) → IPv4.
pub fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        a => a,
    }
}

pub fn predict_from(backends: &[(BackendSpec, u32)], table_size: u32, client: SocketAddr, vip: SocketAddr) -> u32 {
    maglev_table(backends, table_size)[flow_slot(client, vip, table_size)]
}

/// A client connection to an echo server.
pub struct Conn {
    /// The backend's name from its greeting line.
    pub backend: String,
    /// The client's address and port of this connection.
    pub local: SocketAddr,
    pub stream: TcpStream,
}

impl Conn {
    /// Sends `line` + `\n` and expects exactly it back (the connection still works).
    pub fn echo(&mut self, line: &str) -> io::Result<()> {
        assert!(!line.contains('\n'));
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let got = read_line(&mut self.stream)?;
        if got != line {
            return Err(io::Error::other(format!("echo: sent {line:?}, got {got:?}")));
        }
        Ok(())
    }
}

impl Conn {
    /// Sends `total` bytes in chunks of `chunk` (≤ 64 KiB, each read back before the
    /// next is sent, so neither side's buffers fill) and checks every echoed byte:
    /// full-size segments through the balancer.
    pub fn echo_bulk(&mut self, total: usize, chunk: usize) -> io::Result<()> {
        assert!(chunk > 0 && chunk <= 64 * 1024);
        let mut sent = 0usize;
        let mut back = vec![0u8; chunk];
        while sent < total {
            let n = chunk.min(total - sent);
            // No '\n' needed: a pattern that differs at every offset of a chunk.
            let data: Vec<u8> = (0..n).map(|i| ((sent + i) % 251) as u8).collect();
            self.stream.write_all(&data)?;
            self.stream.read_exact(&mut back[..n]).map_err(|e| {
                io::Error::new(e.kind(), format!("bulk echo: bytes {sent}..{} not echoed within {IO_TIMEOUT:?}: {e}", sent + n))
            })?;
            if back[..n] != data[..] {
                return Err(io::Error::other(format!("bulk echo: bytes {sent}..{} came back different", sent + n)));
            }
            sent += n;
        }
        Ok(())
    }
}

/// Reads one `\n`-terminated line (without it), byte by byte (nothing buffered past
/// it), at most 4 KiB, within the stream's timeouts. EOF before a line: UnexpectedEof.
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        if Instant::now() > deadline || line.len() > 4096 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no complete line in time"));
        }
        match s.read(&mut b)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF after {line:?}"))),
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}

/// Waits until `fd` is readable (or `ms` elapse).
fn poll_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// The accept loop of one server; every connection gets a thread. Returns (after
/// joining every connection thread) once `stop` is set.
fn serve(listener: TcpListener, name: String, mode: ServerMode, stop: Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if !poll_readable(listener.as_raw_fd(), 50) {
            continue;
        }
        match listener.accept() {
            Ok((s, _)) => {
                let (name, stop) = (name.clone(), stop.clone());
                if let Ok(h) = std::thread::Builder::new().name(format!("conn-{name}")).spawn(move || {
                    let _ = handle(s, &name, mode, &stop);
                }) {
                    conns.push(h);
                }
                conns.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    drop(listener);
    for h in conns {
        let _ = h.join();
    }
}

fn handle(mut s: TcpStream, name: &str, mode: ServerMode, stop: &AtomicBool) -> io::Result<()> {
    s.set_nonblocking(false)?;
    // Short read timeout: the thread checks `stop` between reads.
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    match mode {
        ServerMode::Echo => {
            s.write_all(format!("{name}\n").as_bytes())?;
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => s.write_all(&buf[..n])?,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        ServerMode::Http => {
            let mut req = Vec::new();
            let deadline = Instant::now() + IO_TIMEOUT;
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline || req.len() > 8192 {
                    return Ok(());
                }
                match s.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e),
                }
            }
            let req = String::from_utf8_lossy(&req);
            let mut first = req.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
            let (status, body) = match (method, path) {
                ("GET", "/healthz") => ("200 OK", "ok\n".to_string()),
                ("GET", "/") => ("200 OK", format!("{name}\n")),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            let _ = s.shutdown(Shutdown::Write);
        }
    }
    Ok(())
}

/// Sends one GET on `s` and reads the whole response: (status, body, client address).
fn http_exchange(mut s: TcpStream, vip: IpAddr, path: &str) -> io::Result<(u16, String, SocketAddr)> {
    let local = s.local_addr()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut chunk = [0u8; 1024];
    loop {
        if Instant::now() > deadline || buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "HTTP response too slow or too long"));
        }
        match s.read(&mut chunk)? {
            0 => break,
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| io::Error::other(format!("bad HTTP response {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_string(), local))
}

/// A TCP connection from `local` (SO_REUSEADDR, so a port in TIME_WAIT can be reused
/// toward another destination) to `dst`, within `IO_TIMEOUT`. Blocking when returned.
fn connect_bound(local: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
    }
    fn raw(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain data; all-zero is valid.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in, sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: 0,
                };
                // SAFETY: as above, for sockaddr_in6.
                unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in6, sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        (st, len as libc::socklen_t)
    }
    let family = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket syscalls on an fd owned by `fd` from here on.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0))?)
    };
    let one: libc::c_int = 1;
    let (l, ll) = raw(local);
    let (d, dl) = raw(dst);
    unsafe {
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        check(libc::bind(fd.as_raw_fd(), &l as *const _ as *const libc::sockaddr, ll))?;
        if libc::connect(fd.as_raw_fd(), &d as *const _ as *const libc::sockaddr, dl) < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        if check(libc::poll(&mut p, 1, IO_TIMEOUT.as_millis() as i32))? == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect {local} → {dst} timed out")));
        }
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        check(libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut _ as *mut libc::c_void, &mut len))?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let s = TcpStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}
