//! A small network in namespaces for end-to-end tests of lbd: a switch namespace with
//! a bridge, a client, one load balancer, N backends, all on 10.66.0.0/24. Backends run
//! `lb_decap`, hold the VIPs on loopback and answer clients directly; the bridge-side
//! peer of the LB's veth runs `lb_pass` (native XDP_TX on a veth needs an XDP program
//! on the peer). Everything is removed on drop, also when a test fails, and leftovers of
//! a crashed run are removed first.
//!
//! Processes that pin BPF objects are started with `nsenter --net` (never `ip netns
//! exec`, whose private mount namespace would take the pins with it).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::programs::XdpMode;
use lb_userspace::decap;

pub const SUBNET: &str = "10.66.0";
pub const LB_ADDR: &str = "10.66.0.5";
pub const CLIENT_ADDR: &str = "10.66.0.2";
/// Routed to the LB from the client.
pub const VIP_PREFIX: &str = "10.66.100.0/24";
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates stay there).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f).join().unwrap_or_else(|_| panic!("thread in namespace panicked"))
}

pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread with a valid netns fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// A TCP server in a backend namespace: greets with the backend's name, then echoes
/// lines. `listening` toggles the listener (a stopped server refuses connections,
/// established ones keep echoing).
pub struct Server {
    pub name: String,
    listening: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(ns: String, name: String, port: u16, listening: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let ns2 = ns.clone();
    spawn_in_ns(&ns2, move || {
        let mut listener: Option<TcpListener> = None;
        while !stop.load(Ordering::SeqCst) {
            if listening.load(Ordering::SeqCst) {
                let l = listener.get_or_insert_with(|| {
                    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("{ns}: bind {port}: {e}"));
                    l.set_nonblocking(true).expect("nonblocking");
                    l
                });
                match l.accept() {
                    Ok((c, _)) => {
                        let (name, stop) = (name.clone(), stop.clone());
                        std::thread::spawn(move || echo(c, &name, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            } else {
                listener = None;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
}

fn echo(mut c: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    if c.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    // Bounded: ends on EOF, error, or when the topology is dropped.
    while !stop.load(Ordering::SeqCst) {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A client connection through a VIP: who answered, from which local port.
pub struct Conn {
    pub backend: String,
    pub local_port: u16,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Sends a line and waits for its echo (bounded by IO_TIMEOUT).
    pub fn ping(&mut self, msg: &str) -> std::io::Result<()> {
        self.reader.get_mut().write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.trim_end() != msg {
            return Err(std::io::Error::other(format!("echo {line:?} for {msg:?}")));
        }
        Ok(())
    }
}

/// Opens a connection from the client namespace.
pub fn connect(vip: SocketAddr) -> std::io::Result<Conn> {
    in_ns(CLIENT_NS, move || {
        let s = TcpStream::connect_timeout(&vip, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let local_port = s.local_addr()?.port();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other("closed before the greeting"));
        }
        Ok(Conn { backend: line.trim_end().to_string(), local_port, reader })
    })
}

pub const PREFIX: &str = "lbe2e-";
pub const CLIENT_NS: &str = "lbe2e-cl";

pub struct Topo {
    pub client: String,
    pub lb: String,
    pub switch: String,
    /// name -> (namespace, address, interface)
    pub backends: BTreeMap<String, (String, Ipv4Addr, String)>,
    pub servers: BTreeMap<String, Server>,
    pub dir: PathBuf,
    lbd: Option<Child>,
}

fn backend_if(i: usize) -> String {
    format!("lbe2eb{i}")
}

/// Removes everything a `Topo` makes (also a crashed run's).
pub fn cleanup(instance: &str) {
    sh_quiet(&["pkill", "-9", "-f", &format!("lbd --config /tmp/{PREFIX}")]);
    let _ = lb_userspace::daemon::detach_offline(instance);
    for i in 0..8 {
        let _ = decap::detach(&backend_if(i));
    }
    let _ = decap::detach("lbe2esw-lb");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or("");
            if ns.starts_with(PREFIX) {
                sh_quiet(&["ip", "netns", "del", ns]);
            }
        }
    }
}

impl Topo {
    /// `n` backends b1..bn on 10.66.0.11.., each with a server on port 80 holding `vips`
    /// on loopback. The LB namespace gets the config dir `dir`.
    pub fn new(n: usize, vips: &[&str]) -> Topo {
        crate::require_root();
        cleanup(INSTANCE);
        let dir = PathBuf::from(format!("/tmp/{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sw = format!("{PREFIX}sw");
        let mut t = Topo {
            client: CLIENT_NS.to_string(),
            lb: format!("{PREFIX}lb"),
            switch: sw.clone(),
            backends: BTreeMap::new(),
            servers: BTreeMap::new(),
            dir,
            lbd: None,
        };
        for ns in [&t.switch, &t.client, &t.lb] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for k in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"] {
            sh_quiet(&["ip", "netns", "exec", &sw, "sysctl", "-qw", &format!("net.bridge.{k}=0")]);
        }
        // One veth per node: `inner` in the node's namespace, `outer` on the bridge.
        let plug = |ns: &str, inner: &str, outer: &str, addr: &str, mac: &str| {
            sh(&["ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", &sw]);
            sh(&["ip", "-n", ns, "link", "set", inner, "address", mac]);
            sh(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", inner]);
            sh(&["ip", "-n", ns, "link", "set", inner, "up"]);
            sh(&["ip", "-n", &sw, "link", "set", outer, "master", "br0"]);
            sh(&["ip", "-n", &sw, "link", "set", outer, "up"]);
        };
        plug(&t.client, "cl0", "lbe2esw-cl", CLIENT_ADDR, "02:66:00:00:00:02");
        plug(&t.lb, "lb0", "lbe2esw-lb", LB_ADDR, "02:66:00:00:00:05");
        sh(&["ip", "-n", &t.client, "route", "add", VIP_PREFIX, "via", LB_ADDR]);
        // A veth hands the peer packets with the TCP/UDP checksum left to offload
        // (CHECKSUM_PARTIAL); XDP_TX forwards the raw frame, so the backend would see a
        // bad checksum. Real NICs fill it in; here the client's kernel must.
        sh(&["ip", "netns", "exec", &t.client, "ethtool", "-K", "cl0", "tx", "off"]);
        // Native XDP_TX from lb0 arrives only if its peer runs XDP too.
        in_ns(&sw, || decap::attach_pass("lbe2esw-lb", XdpMode::Driver).expect("lb_pass on the LB's bridge port"));
        for i in 1..=n {
            let name = format!("b{i}");
            let ns = format!("{PREFIX}{name}");
            let addr = Ipv4Addr::new(10, 66, 0, 10 + i as u8);
            let ifname = backend_if(i);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            plug(&ns, &ifname, &format!("lbe2esw-b{i}"), &addr.to_string(), &format!("02:66:00:00:01:{:02x}", i));
            for v in vips {
                sh(&["ip", "-n", &ns, "addr", "add", &format!("{v}/32"), "dev", "lo"]);
            }
            for (k, v) in [("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2"), ("net.ipv4.conf.all.rp_filter", "0")] {
                sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", &format!("{k}={v}")]);
            }
            let ifc = ifname.clone();
            in_ns(&ns, move || decap::attach(&ifc, XdpMode::Driver).expect("lb_decap on a backend"));
            let listening = Arc::new(AtomicBool::new(true));
            let stop = Arc::new(AtomicBool::new(false));
            serve(ns.clone(), name.clone(), 80, listening.clone(), stop.clone());
            t.servers.insert(name.clone(), Server { name: name.clone(), listening, stop });
            t.backends.insert(name, (ns, addr, ifname));
        }
        t
    }

    pub fn addr(&self, backend: &str) -> Ipv4Addr {
        self.backends[backend].1
    }

    pub fn name_of(&self, addr: IpAddr) -> Option<String> {
        self.backends.iter().find(|(_, (_, a, _))| IpAddr::V4(*a) == addr).map(|(n, _)| n.clone())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("lbd.sock")
    }

    /// The config header for lbd in the LB namespace; append `[[service]]` tables.
    pub fn config_header(&self) -> String {
        format!(
            "instance = \"{INSTANCE}\"\ninterfaces = [\"lb0\"]\nxdp_mode = \"native\"\nencap_source_v4 = \"{LB_ADDR}\"\n\
             socket = \"{}\"\nstate_dir = \"{}\"\n",
            self.socket().display(),
            self.dir.join("state").display()
        )
    }

    /// Starts lbd in the LB namespace and waits until it answers (bounded).
    pub fn start_lbd(&mut self) {
        assert!(self.lbd.is_none(), "lbd already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("lbd.log")).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lb))
            .arg(bin("lbd"))
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting lbd");
        self.lbd = Some(child);
        let t = Instant::now();
        while !lb_userspace::daemon::call(&self.socket(), &lb_userspace::api::Request::Status {}).is_ok_and(|r| r.ok) {
            assert!(t.elapsed() < Duration::from_secs(20), "lbd did not come up:\n{}", self.lbd_log());
            if let Some(Ok(Some(st))) = self.lbd.as_mut().map(|c| c.try_wait()) {
                panic!("lbd exited with {st}:\n{}", self.lbd_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill_lbd(&mut self) {
        if let Some(mut c) = self.lbd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn lbd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// Runs lbctl against our lbd: (success, stdout, stderr).
    pub fn lbctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin("lbctl")).arg("--socket").arg(self.socket()).args(args).output().expect("running lbctl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `lbctl -o json ARGS`, parsed; panics on failure.
    pub fn lbctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let (ok, out, err) = self.lbctl(&a);
        assert!(ok, "lbctl {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lbctl {args:?}: bad JSON {e}: {out}"))
    }
}

pub const INSTANCE: &str = "lbe2e";

impl Drop for Topo {
    fn drop(&mut self) {
        self.servers.clear();
        self.kill_lbd();
        cleanup(INSTANCE);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A binary of this workspace next to the test executable's directory
/// (target/release/deps/.. -> target/release/).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir: &Path = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} not built: cargo build --release -p lb-userspace --bins", p.display());
    p
}

/// Waits until `f` holds, checking every 50 ms, at most `max`.
pub fn wait_for(max: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < max {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
