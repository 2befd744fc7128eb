//! The lab: the "scale up" infrastructure in network namespaces on one machine, built on
//! `netns::Topology` (2 LB nodes, 6 backends), with real servers:
//!
//! ```text
//!  client ──▶ web VIP :80   ─▶ lbd pair ─▶ web1, web2 (nginx: static files, /app/ ─▶ app VIP)
//!             app VIP :8080 ─▶ lbd pair ─▶ app1, app2 (lb-lab-app; app3 spare) ─▶ db VIP
//!             db VIP :3306  ─▶ lbd pair ─▶ db1 (MariaDB)
//! ```
//!
//! Backends `be0..be5` are web1, web2, app1, app2, db1, app3 (app3 runs but is not in the
//! config: step 4 adds it with lbctl). Each tier's VIP is on `lo` of that tier's
//! backends only; the other tiers' VIPs are on-link routes (MTU 1400) there, so a web
//! server ARPs for the app VIP and the active LB answers; replies go direct (ipip +
//! lb_decap). Backends that are clients of a VIP compute checksums in software
//! (`tx off`), like the client.
//!
//! Processes are started detached (own process group, pid files under `<dir>/pids`), so
//! a kept lab (`Lab::keep`) runs on after the process that built it exits; `down`
//! finds everything again by prefix and state directory. An unkept `Lab` removes
//! everything on drop (also after a panic).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lb_userspace::api::Request;
use lb_userspace::daemon::call;
use serde_json::Value;

use crate::lbd::{bin, wait_for};
use crate::netns::{IO_TIMEOUT, TopoSpec, Topology, VIP_ROUTE_MTU, cleanup_stale, ns_command, vip_v4};

/// The lab's fixed prefix and state directory (`cargo xtask lab`).
pub const LAB_PREFIX: &str = "lab-";
pub const LAB_DIR: &str = "/var/lib/lb-lab";

/// Backend indices of each role.
pub const WEB: [usize; 2] = [0, 1];
pub const APP: [usize; 2] = [2, 3];
pub const DB: usize = 4;
/// The spare app server, added by `lbctl backend add` in step 4.
pub const APP3: usize = 5;
pub const ROLES: [&str; 6] = ["web1", "web2", "app1", "app2", "db1", "app3"];

pub const HEALTH_INTERVAL_MS: u64 = 300;
pub const HEALTH_FALL: u64 = 2;
pub const HEALTH_RISE: u64 = 2;
const CLUSTER_PORT: u16 = 7946;

pub fn web_vip() -> IpAddr {
    vip_v4(1)
}
pub fn app_vip() -> IpAddr {
    vip_v4(2)
}
pub fn db_vip() -> IpAddr {
    vip_v4(3)
}

/// One lbd node of the pair.
pub struct LbNode {
    pub instance: String,
    pub ns: String,
    pub ifname: String,
    pub dir: PathBuf,
}

impl LbNode {
    pub fn config(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("lbd.sock")
    }
    /// `lbctl --socket .. ARGS`: (success, stdout, stderr).
    pub fn lbctl(&self, args: &[&str]) -> (bool, String, String) {
        crate::lbd::lbctl_at(&self.socket(), args)
    }
    pub fn json(&self, args: &[&str]) -> Option<Value> {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let (ok, out, _) = self.lbctl(&a);
        if ok { serde_json::from_str(&out).ok() } else { None }
    }
    pub fn role(&self) -> String {
        self.json(&["cluster", "status"]).and_then(|v| v["role"].as_str().map(str::to_string)).unwrap_or_else(|| "down".into())
    }
    /// Whether `lbctl backend list` shows `n` backends, every one up and in its table.
    pub fn all_backends_up(&self, n: usize) -> bool {
        self.json(&["backend", "list"])
            .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == n && a.iter().all(|b| b["health"] == "up" && b["in_table"] == true)))
    }
    /// Health of backend `addr` of `service` (`up`, `down`, ...), if listed.
    pub fn health(&self, service: &str, addr: IpAddr) -> Option<(String, bool)> {
        let v = self.json(&["backend", "list", service])?;
        v.as_array()?.iter().find(|b| b["address"] == addr.to_string()).map(|b| {
            (b["health"].as_str().unwrap_or("?").to_string(), b["in_table"].as_bool().unwrap_or(false))
        })
    }
}

/// What every lab has (this one and the BGP lab, `crate::lab_bgp`): the topology, its
/// prefix and state directory, the detached processes, and the web/app/db tiers on
/// backends `be0..be5`. `Lab` and `lab_bgp::LabBgp` deref to it.
pub struct Site {
    pub t: ManuallyDrop<Topology>,
    pub prefix: String,
    pub dir: PathBuf,
    /// The lbd instances whose pins `down` removes.
    instances: Vec<String>,
    children: Mutex<BTreeMap<String, Child>>,
    keep: bool,
}

pub struct Lab {
    site: Site,
    pub nodes: [LbNode; 2],
}

impl std::ops::Deref for Lab {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.site
    }
}

/// What a run of requests got.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub sent: usize,
    pub answered: usize,
    pub failed: usize,
    pub by_web: BTreeMap<String, usize>,
    pub by_app: BTreeMap<String, usize>,
    /// The database's visit counter: first and last value seen.
    pub visits: Option<(u64, u64)>,
    /// (time since the run started, ok) of every request, in order.
    pub samples: Vec<(Duration, bool)>,
    /// When each request of `samples` ended.
    pub ends: Vec<Duration>,
    pub first_error: Option<String>,
    pub started: Option<Instant>,
}

impl Counts {
    /// Adds one request started at `t` (since the run began) and its result.
    pub fn record(&mut self, t: Duration, r: Result<(String, String, u64), String>) {
        self.sent += 1;
        match r {
            Ok((web, app, n)) => {
                self.answered += 1;
                *self.by_web.entry(web).or_default() += 1;
                *self.by_app.entry(app).or_default() += 1;
                self.visits = Some(match self.visits {
                    None => (n, n),
                    Some((a, b)) => (a.min(n), b.max(n)),
                });
                self.samples.push((t, true));
            }
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert(e);
                self.samples.push((t, false));
            }
        }
    }
    /// "web1 25, web2 25"
    pub fn spread(m: &BTreeMap<String, usize>) -> String {
        if m.is_empty() {
            return "-".into();
        }
        m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    }
}

fn run_ok(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("lab setup: {e}"));
}

fn pid_alive(pid: i32) -> bool {
    // A zombie (nobody reaps it once its parent is gone) counts as dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM, up to 3 s, then SIGKILL (bounded).
fn terminate(pid: i32) {
    if pid <= 1 {
        return;
    }
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if wait_for(Duration::from_secs(3), || !pid_alive(pid)).is_none() {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = wait_for(Duration::from_secs(2), || !pid_alive(pid));
    }
}

/// Removes a lab with `prefix` and state directory `dir`, whether it runs or a crash
/// left parts of it: the processes of its pid files and every process in its
/// namespaces, both lbd instances' pins, the namespaces, links and decap pins by
/// prefix, the state directory. Idempotent. Returns what it did, one line each.
pub fn down(prefix: &str, dir: &Path) -> Vec<String> {
    down_with(prefix, dir, &lbd_instances(prefix, 2))
}

/// `<prefix>n1` .. `<prefix>n<n>`: the lbd instance names of a lab's nodes.
pub fn lbd_instances(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}n{i}")).collect()
}

/// `down` for a lab whose lbd instances are `instances`.
pub fn down_with(prefix: &str, dir: &Path, instances: &[String]) -> Vec<String> {
    let mut did = Vec::new();
    let pids_dir = dir.join("pids");
    if let Ok(rd) = fs::read_dir(&pids_dir) {
        for e in rd.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let mut it = text.split_whitespace();
            let (Some(pid), Some(prog)) = (it.next().and_then(|p| p.parse::<i32>().ok()), it.next()) else { continue };
            // Only if that pid still runs the program we started (pids are reused).
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if pid_alive(pid) && String::from_utf8_lossy(&cmdline).contains(prog) {
                terminate(pid);
                did.push(format!("stopped {} (pid {pid})", e.file_name().to_string_lossy().trim_end_matches(".pid")));
            }
        }
    }
    // Whatever else still runs in our namespaces (nginx workers, database clients).
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let ns = e.file_name().to_string_lossy().into_owned();
            if !ns.starts_with(prefix) {
                continue;
            }
            let pids = run_ok(Command::new("ip").args(["netns", "pids", &ns])).unwrap_or_default();
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                terminate(pid);
                did.push(format!("stopped pid {pid} in {ns}"));
            }
        }
    }
    for inst in instances {
        if Path::new("/sys/fs/bpf").join(inst).exists() {
            match lb_userspace::daemon::detach_offline(inst) {
                Ok(_) => did.push(format!("removed the pins of lbd instance {inst}")),
                Err(e) => did.push(format!("lbd instance {inst}: {e:#}")),
            }
        }
    }
    let had_ns = fs::read_dir("/run/netns")
        .map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).count())
        .unwrap_or(0);
    cleanup_stale(prefix);
    if had_ns > 0 {
        did.push(format!("removed {had_ns} namespaces {prefix}* (their links and decap pins with them)"));
    }
    if dir.exists() {
        let _ = fs::remove_dir_all(dir);
        did.push(format!("removed {}", dir.display()));
    }
    did
}

impl Lab {
    /// Builds and starts everything; `progress` gets one line per phase. A failure
    /// panics, and the drop removes what was made.
    pub fn up(prefix: &str, dir: &Path, progress: &dyn Fn(&str)) -> Lab {
        crate::require_root();
        let _ = down(prefix, dir);
        fs::create_dir_all(dir.join("pids")).expect("state dir");
        progress("namespaces: client, switch (bridge), lb0, lb1, web1, web2, app1, app2, db1, app3");
        let t = Topology::new(prefix, TopoSpec { lbs: 2, backends: 6 });
        let nodes = [1, 2].map(|n| {
            let lb = &t.lbs[n - 1];
            let d = dir.join(format!("n{n}"));
            fs::create_dir_all(&d).expect("node dir");
            LbNode { instance: format!("{prefix}n{n}"), ns: lb.ns.clone(), ifname: lb.ifname.clone(), dir: d }
        });
        let lab = Lab { site: Site::new(t, prefix, dir, lbd_instances(prefix, 2)), nodes };
        lab.network(None);
        lab.t.set_client_route_onlink();
        lab.start_tiers(progress);
        progress("load balancers: lbd pair (active/backup), services web, app, db, health-checked");
        lab.write_lbd_configs();
        for n in 0..2 {
            lab.start_lbd(n);
        }
        let active = wait_for(Duration::from_secs(10), || lab.nodes[0].role() == "active" && lab.nodes[1].role() == "backup");
        assert!(active.is_some(), "lbd pair roles: {} / {}", lab.nodes[0].role(), lab.nodes[1].role());
        let all_up = || lab.nodes[0].all_backends_up(5);
        assert!(
            wait_for(Duration::from_secs(15), all_up).is_some(),
            "every backend up: {}",
            lab.nodes[0].lbctl(&["backend", "list"]).1
        );
        progress("ready: every backend healthy");
        lab
    }

    /// Leaves everything running after this value is gone (`down` removes it).
    pub fn keep(self) {
        self.site.keep();
    }
}

impl Site {
    /// A site on topology `t` (built with `prefix`), state in `dir`, lbd instances
    /// `instances`; nothing started yet. Dropped unkept, it removes everything.
    pub fn new(t: Topology, prefix: &str, dir: &Path, instances: Vec<String>) -> Site {
        Site {
            t: ManuallyDrop::new(t),
            prefix: prefix.to_string(),
            dir: dir.to_path_buf(),
            instances,
            children: Mutex::new(BTreeMap::new()),
            keep: false,
        }
    }

    /// Leaves everything running after this value is gone (`down` removes it).
    pub fn keep(mut self) {
        self.keep = true;
        for (_, c) in std::mem::take(&mut *self.children.lock().unwrap()) {
            std::mem::forget(c);
        }
    }

    fn be(&self, i: usize) -> &crate::netns::Node {
        &self.t.backends[i]
    }

    pub fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.be(i).v4)
    }

    /// Each tier's VIP on `lo` of its backends; the other tiers' VIPs routed on-link
    /// (`gateway` None: the active node answers ARP) or via `gateway` (a router), MTU
    /// 1400; checksums in software.
    pub fn network(&self, gateway: Option<IpAddr>) {
        let tier_vip = |i: usize| match i {
            0 | 1 => web_vip(),
            2 | 3 | 5 => app_vip(),
            _ => db_vip(),
        };
        let mtu = VIP_ROUTE_MTU.to_string();
        for (i, b) in self.t.backends.iter().enumerate() {
            let own = tier_vip(i);
            ip(&["-n", &b.ns, "addr", "add", &format!("{own}/32"), "dev", "lo"]);
            for v in [web_vip(), app_vip(), db_vip()].into_iter().filter(|v| *v != own) {
                let dst = format!("{v}/32");
                match gateway {
                    None => ip(&["-n", &b.ns, "route", "replace", &dst, "dev", &b.ifname, "mtu", &mtu]),
                    Some(gw) => ip(&["-n", &b.ns, "route", "replace", &dst, "via", &gw.to_string(), "mtu", &mtu]),
                }
            }
            run_ok(ns_command(&b.ns, "ethtool").args(["-K", &b.ifname, "tx", "off"])).unwrap_or_else(|e| panic!("lab setup: {e}"));
        }
    }

    /// The database, the app servers (app3 spare) and nginx on the web servers.
    pub fn start_tiers(&self, progress: &dyn Fn(&str)) {
        progress("db tier: MariaDB (private datadir, database lab, user lab)");
        self.start_mariadb();
        progress("app tier: app1, app2 (+ app3 spare) on :8080");
        for i in [APP[0], APP[1], APP3] {
            self.start_app(i);
        }
        progress("web tier: nginx on web1, web2 (static + /app/ → app VIP)");
        for i in WEB {
            self.start_nginx(i);
        }
    }

    /// Starts `prog` in namespace `ns`, detached (own process group, log file, pid file
    /// `<dir>/pids/<name>.pid`).
    pub fn spawn(&self, name: &str, ns: &str, prog: &str, args: &[String]) -> u32 {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log"))).expect("log");
        let mut c = ns_command(ns, prog);
        c.args(args).stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log).process_group(0);
        let child = c.spawn().unwrap_or_else(|e| panic!("starting {name} ({prog}): {e}"));
        let pid = child.id();
        let base = Path::new(prog).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        fs::write(self.dir.join("pids").join(format!("{name}.pid")), format!("{pid} {base}\n")).expect("pid file");
        self.children.lock().unwrap().insert(name.to_string(), child);
        pid
    }

    /// Stops process `name` with `signal` (SIGKILL: at once; else up to 3 s then SIGKILL).
    pub fn stop(&self, name: &str, signal: i32) {
        let c = self.children.lock().unwrap().remove(name);
        if let Some(mut c) = c {
            unsafe { libc::kill(c.id() as i32, signal) };
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(3) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_file(self.dir.join("pids").join(format!("{name}.pid")));
    }

    fn wait_port(&self, ns: &str, addr: SocketAddr, what: &str, max: Duration) {
        let ok = wait_for(max, || crate::netns::in_ns(ns, || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()));
        assert!(ok.is_some(), "{what} not listening on {addr} within {max:?}: see {}", self.dir.display());
    }

    pub fn start_mariadb(&self) {
        let d = self.dir.join("db1");
        let data = d.join("data");
        fs::create_dir_all(&data).expect("db dir");
        let log = fs::File::create(d.join("install.log")).expect("log");
        let st = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--auth-root-authentication-method=socket", "--skip-test-db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .expect("mariadb-install-db (cargo xtask setup installs mariadb-server)");
        assert!(st.success(), "mariadb-install-db failed: {}", d.join("install.log").display());
        let sock = d.join("mysqld.sock");
        let args: Vec<String> = vec![
            "--no-defaults".into(),
            format!("--datadir={}", data.display()),
            "--user=root".into(),
            "--bind-address=0.0.0.0".into(),
            "--port=3306".into(),
            format!("--socket={}", sock.display()),
            format!("--pid-file={}", d.join("mysqld.pid").display()),
            format!("--log-error={}", d.join("error.log").display()),
            "--skip-name-resolve".into(),
            // Health checks connect and close without a handshake: never block them.
            "--max-connect-errors=1000000000".into(),
            "--max-connections=500".into(),
            "--innodb-buffer-pool-size=32M".into(),
            "--innodb-log-file-size=8M".into(),
            "--skip-log-bin".into(),
        ];
        let ns = self.be(DB).ns.clone();
        self.spawn("db1-mariadbd", &ns, "mariadbd", &args);
        assert!(wait_for(Duration::from_secs(30), || sock.exists()).is_some(), "mariadbd did not start: {}", d.join("error.log").display());
        let sql = "CREATE DATABASE lab; CREATE USER 'lab'@'%' IDENTIFIED BY 'lab'; GRANT ALL ON lab.* TO 'lab'@'%'; \
                   CREATE TABLE lab.visits (id INT PRIMARY KEY, n BIGINT NOT NULL); INSERT INTO lab.visits VALUES (1, 0); \
                   CREATE TABLE lab.items (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64) NOT NULL); \
                   INSERT INTO lab.items (name) VALUES ('apple'), ('pear');";
        let r = wait_for(Duration::from_secs(15), || {
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", sock.display()))
                .args(["-u", "root", "--connect-timeout=2", "-e", sql])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(r.is_some(), "creating the lab database failed: {}", d.join("error.log").display());
        self.wait_port(&ns, SocketAddr::new(self.addr(DB), 3306), "mariadbd", Duration::from_secs(5));
    }

    /// Starts (or restarts) the app server on backend `i`.
    pub fn start_app(&self, i: usize) {
        let name = ROLES[i];
        let args = vec!["--name".into(), name.into(), "--listen".into(), "0.0.0.0:8080".into(), "--db".into(), format!("{}:3306", db_vip())];
        let ns = self.be(i).ns.clone();
        self.spawn(&format!("{name}-app"), &ns, &bin("lb-lab-app").to_string_lossy(), &args);
        self.wait_port(&ns, SocketAddr::new(self.addr(i), 8080), name, Duration::from_secs(5));
    }

    /// Starts (or restarts) nginx on web server `i`.
    pub fn start_nginx(&self, i: usize) {
        let name = ROLES[i];
        let d = self.dir.join(name);
        let www = d.join("www");
        fs::create_dir_all(&www).expect("www");
        fs::create_dir_all(d.join("tmp")).expect("tmp");
        fs::write(www.join("index.html"), format!("<!doctype html><title>{name}</title><h1>{name}</h1>\n")).unwrap();
        let p = |f: &str| d.join(f).display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process on;\nuser root root;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {acc};\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  \
             fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n  \
             keepalive_timeout 120s;\n  default_type text/html;\n  server {{\n    listen 80 default_server;\n    root {www};\n    \
             add_header X-Web {name} always;\n    location /app/ {{\n      proxy_pass http://{app}:8080;\n      \
             proxy_set_header X-Web {name};\n      proxy_connect_timeout 2s;\n      proxy_read_timeout 5s;\n      \
             proxy_send_timeout 5s;\n      proxy_next_upstream off;\n    }}\n  }}\n}}\n",
            pid = p("nginx.pid"),
            err = p("error.log"),
            acc = p("access.log"),
            tmp = p("tmp"),
            www = www.display(),
            app = app_vip(),
        );
        fs::write(d.join("nginx.conf"), conf).unwrap();
        let args = vec!["-e".into(), p("error.log"), "-c".into(), p("nginx.conf")];
        let ns = self.be(i).ns.clone();
        self.spawn(&format!("{name}-nginx"), &ns, "nginx", &args);
        self.wait_port(&ns, SocketAddr::new(self.addr(i), 80), "nginx", Duration::from_secs(5));
    }

    /// The lab's three services (`[[service]]` tables, health-checked), the app
    /// service over backends `app`; `extra` goes into each (e.g. `mode = "gue"` and a
    /// newline).
    pub fn services(&self, extra: &str, app: &[usize]) -> String {
        let h = |kind: &str, extra: &str| {
            format!(
                "health = {{ kind = \"{kind}\", {extra}interval_ms = {HEALTH_INTERVAL_MS}, timeout_ms = 250, rise = {HEALTH_RISE}, fall = {HEALTH_FALL} }}\n"
            )
        };
        let backends = |is: &[usize]| is.iter().map(|i| format!("[[service.backend]]\naddress = \"{}\"\n", self.addr(*i))).collect::<String>();
        format!(
            "[[service]]\nname = \"web\"\nvip = \"{}:80/tcp\"\ntable_size = 1009\n{extra}{}{}\n\
             [[service]]\nname = \"app\"\nvip = \"{}:8080/tcp\"\ntable_size = 1009\n{extra}{}{}\n\
             [[service]]\nname = \"db\"\nvip = \"{}:3306/tcp\"\ntable_size = 1009\n{extra}{}{}\n",
            web_vip(),
            h("http", "path = \"/index.html\", "),
            backends(&WEB),
            app_vip(),
            h("http", "path = \"/healthz\", "),
            backends(app),
            db_vip(),
            h("tcp", ""),
            backends(&[DB]),
        )
    }

    /// Starts lbd for `node` (process `lbd-n<n>`, a fresh start: a killed run's pins
    /// are removed first) and waits until it answers.
    pub fn start_lbd_node(&self, node: &LbNode, n: usize) {
        let _ = lb_userspace::daemon::detach_offline(&node.instance);
        let args = vec!["--config".into(), node.config().display().to_string()];
        self.spawn(&format!("lbd-n{n}"), &node.ns, &bin("lbd").to_string_lossy(), &args);
        let ok = wait_for(Duration::from_secs(20), || call(&node.socket(), &Request::Status {}).is_ok_and(|r| r.ok));
        assert!(ok.is_some(), "lbd n{n} did not come up: {}", self.dir.join(format!("lbd-n{n}.log")).display());
    }

    /// One GET through the web VIP from the client: (web, app, visits) from the JSON.
    pub fn visit(&self) -> Result<(String, String, u64), String> {
        let (status, body, _) = self.t.http_get(web_vip(), 80, "/app/visit").map_err(|e| e.to_string())?;
        parse_visit(status, &body)
    }

    /// `n` visits, one every `every` (or back to back), stopping after `max` in all.
    pub fn visits(&self, n: usize, every: Duration, max: Duration) -> Counts {
        let mut c = Counts::default();
        let t0 = Instant::now();
        c.started = Some(t0);
        for k in 0..n {
            let due = every * k as u32;
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            if t0.elapsed() > max {
                break;
            }
            let at = t0.elapsed();
            let r = self.visit();
            c.ends.push(t0.elapsed());
            c.record(at, r);
        }
        c
    }

    /// GET `path` through the web VIP: the body (status 200 only).
    pub fn get(&self, path: &str) -> Result<String, String> {
        let (status, body, _) = self.t.http_get(web_vip(), 80, path).map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("HTTP {status}: {}", body.trim()));
        }
        Ok(body)
    }

    /// Runs `sql` on the database server itself (its socket, not the network): stdout.
    pub fn db_query(&self, sql: &str) -> io::Result<String> {
        run_ok(
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.dir.join("db1").join("mysqld.sock").display()))
                .args(["-u", "root", "--connect-timeout=2", "-N", "-B", "lab", "-e", sql]),
        )
    }

    /// A keep-alive HTTP/1.1 connection from the client to the web VIP.
    pub fn keepalive(&self) -> io::Result<KeepAlive> {
        let s = self.t.client_stream(web_vip(), 80)?;
        Ok(KeepAlive { local: s.local_addr()?, s })
    }
}

impl Lab {
    fn write_lbd_configs(&self) {
        let services = self.services("", &APP);
        for (i, n) in self.nodes.iter().enumerate() {
            let secret = n.dir.join("cluster.key");
            fs::write(&secret, b"the lab's shared cluster secret\n").unwrap();
            fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
            let (me, other) = (&self.t.lbs[i], &self.t.lbs[1 - i]);
            let cfg = format!(
                "instance = \"{}\"\ninterfaces = [\"{}\"]\nxdp_mode = \"native\"\nencap_source_v4 = \"{}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n\
                 {services}\n[cluster]\nnode_id = {}\npriority = {}\nlisten = \"{}:{CLUSTER_PORT}\"\npeer = \"{}:{CLUSTER_PORT}\"\n\
                 secret_file = \"{}\"\nheartbeat_ms = 100\ndead_after = 3\n",
                n.instance,
                n.ifname,
                me.v4,
                n.socket().display(),
                n.dir.join("state").display(),
                i + 1,
                if i == 0 { 200 } else { 100 },
                me.v4,
                other.v4,
                secret.display()
            );
            fs::write(n.config(), cfg).unwrap();
        }
    }

    /// Starts lbd on node `n` (0 or 1) and waits until it answers.
    pub fn start_lbd(&self, n: usize) {
        self.start_lbd_node(&self.nodes[n], n + 1);
    }

    /// The index of the node currently active, if one is.
    pub fn active(&self) -> Option<usize> {
        (0..2).find(|&n| self.nodes[n].role() == "active")
    }
}

fn parse_visit(status: u16, body: &str) -> Result<(String, String, u64), String> {
    if status != 200 {
        return Err(format!("HTTP {status}: {}", body.trim()));
    }
    let v: Value = serde_json::from_str(body.trim()).map_err(|e| format!("bad JSON {body:?}: {e}"))?;
    match (v["web"].as_str(), v["app"].as_str(), v["visits"].as_u64()) {
        (Some(w), Some(a), Some(n)) => Ok((w.to_string(), a.to_string(), n)),
        _ => Err(format!("unexpected answer {body:?}")),
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let names: Vec<String> = self.children.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        for name in names {
            self.stop(&name, libc::SIGTERM);
        }
        let _ = down_with(&self.prefix, &self.dir, &self.instances);
        // SAFETY: dropped once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.t) };
    }
}

/// An HTTP/1.1 connection kept open across requests.
pub struct KeepAlive {
    s: TcpStream,
    pub local: SocketAddr,
}

impl KeepAlive {
    /// GET `path` on this connection: (status, headers, body).
    pub fn get(&mut self, path: &str) -> io::Result<(u16, String, String)> {
        write!(self.s, "GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n")?;
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut buf = Vec::new();
        let mut b = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if Instant::now() > deadline || buf.len() > 65536 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no response header"));
            }
            match self.s.read(&mut b)? {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
                n => buf.extend_from_slice(&b[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("no Content-Length in {head:?}")))?;
        let mut body = buf[head_end..].to_vec();
        while body.len() < len {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "body too slow"));
            }
            match self.s.read(&mut b)? {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-body")),
                n => body.extend_from_slice(&b[..n]),
            }
        }
        Ok((status, head, String::from_utf8_lossy(&body[..len]).into_owned()))
    }

    /// GET /app/visit on this connection: (web, app, visits).
    pub fn visit(&mut self) -> Result<(String, String, u64), String> {
        let (status, _, body) = self.get("/app/visit").map_err(|e| e.to_string())?;
        parse_visit(status, &body)
    }
}

// ---------------------------------------------------------------- the scenario

/// Step 2's result.
pub struct WebDown {
    pub counts: Counts,
    /// From the stop of nginx to lbd showing web1 down.
    pub removed_after: Option<Duration>,
    /// Failed requests started after the stop, and the latest of them (after the stop).
    pub last_failure_after_stop: Option<Duration>,
    /// (fall + 1) × interval: the longest a dead backend can stay in the table.
    pub window: Duration,
    /// Answered requests started after the removal that went to web1 (must be 0).
    pub web1_after_removal: usize,
    /// Failed requests started before the stop (must be 0).
    pub failed_before_stop: usize,
}

/// Step 3's result.
pub struct Failover {
    pub counts: Counts,
    pub takeover: Option<Duration>,
    /// Requests on the kept-alive connection before and after, all answered.
    pub keepalive_before: usize,
    pub keepalive_after: usize,
    pub keepalive_error: Option<String>,
    pub keepalive_web: String,
    /// Failed requests started later than 1 s after the takeover (must be 0).
    pub failed_after_takeover: usize,
}

/// Step 4's result.
pub struct Added {
    pub counts: Counts,
    pub in_table_after: Option<Duration>,
    pub web1_back_after: Option<Duration>,
}

impl Lab {
    /// Step 2: nginx on web1 stops while requests run; lbd removes it.
    pub fn step_web_down(&self) -> WebDown {
        let interval = Duration::from_millis(HEALTH_INTERVAL_MS);
        let window = interval * (HEALTH_FALL as u32 + 1);
        let active = self.active().expect("an active node");
        let web1 = self.addr(WEB[0]);
        let (counts, stop_at, removed_at) = std::thread::scope(|s| {
            let h = s.spawn(|| self.visits(120, Duration::from_millis(25), Duration::from_secs(6)));
            std::thread::sleep(Duration::from_millis(500));
            let stop_at = Instant::now();
            self.stop("web1-nginx", libc::SIGTERM);
            let removed = wait_for(Duration::from_secs(5), || {
                self.nodes[active].health("web", web1).is_some_and(|(h, in_table)| h == "down" && !in_table)
            });
            (h.join().expect("request loop"), stop_at, removed.map(|d| stop_at + d))
        });
        let t0 = counts.started.unwrap();
        let since_stop = |at: Duration| (t0 + at).checked_duration_since(stop_at);
        let last_failure_after_stop = counts.samples.iter().filter(|(_, ok)| !ok).filter_map(|(at, _)| since_stop(*at)).max();
        // By when it ended: a request in flight when the server stopped is cut by the stop.
        let failed_before_stop = counts.samples.iter().zip(&counts.ends).filter(|((_, ok), end)| !ok && since_stop(**end).is_none()).count();
        // Which web server answered after the removal: from a second pass, so the
        // per-request names need not be kept.
        let after = self.visits(20, Duration::ZERO, Duration::from_secs(10));
        WebDown {
            removed_after: removed_at.map(|r| r - stop_at),
            last_failure_after_stop,
            window,
            web1_after_removal: after.by_web.get("web1").copied().unwrap_or(0),
            failed_before_stop,
            counts,
        }
    }

    /// Step 3: the active lbd is killed (-9) and its link goes down while requests run
    /// and one keep-alive connection stays open.
    pub fn step_failover(&self) -> Failover {
        let from = self.active().expect("an active node");
        let to = 1 - from;
        let mut ka = self.keepalive().expect("keep-alive connection");
        let mut before = 0;
        let mut ka_err = None;
        let mut ka_web = String::new();
        for _ in 0..3 {
            match ka.visit() {
                Ok((w, _, _)) => {
                    before += 1;
                    ka_web = w;
                }
                Err(e) => {
                    ka_err.get_or_insert(format!("before: {e}"));
                }
            }
        }
        // Let the active stream the connection's flow to the backup (a heartbeat).
        std::thread::sleep(Duration::from_millis(300));
        let (counts, takeover, t0) = std::thread::scope(|s| {
            let h = s.spawn(|| self.visits(100, Duration::from_millis(30), Duration::from_secs(6)));
            std::thread::sleep(Duration::from_millis(500));
            let t0 = Instant::now();
            self.stop(&format!("lbd-n{}", from + 1), libc::SIGKILL);
            let lb = &self.t.lbs[from];
            let _ = Command::new("ip").args(["-n", &lb.ns, "link", "set", &lb.ifname, "down"]).status();
            let took = wait_for(Duration::from_secs(5), || self.nodes[to].role() == "active").map(|_| t0.elapsed());
            (h.join().expect("request loop"), took, t0)
        });
        let settled = t0 + takeover.unwrap_or(Duration::ZERO) + Duration::from_secs(1);
        let start = counts.started.unwrap();
        let failed_after_takeover = counts.samples.iter().filter(|(at, ok)| !ok && start + *at > settled).count();
        let mut after = 0;
        for _ in 0..3 {
            match ka.visit() {
                Ok(_) => after += 1,
                Err(e) => {
                    ka_err.get_or_insert(format!("after: {e}"));
                }
            }
        }
        Failover { counts, takeover, failed_after_takeover, keepalive_before: before, keepalive_after: after, keepalive_error: ka_err, keepalive_web: ka_web }
    }

    /// Step 4: nginx on web1 restarted (health brings it back) and app3 added with
    /// `lbctl backend add app`; then requests show both taking their share.
    pub fn step_add_backend(&self) -> Added {
        let active = self.active().expect("an active node");
        let n = &self.nodes[active];
        let t0 = Instant::now();
        self.start_nginx(WEB[0]);
        let web1 = self.addr(WEB[0]);
        let web1_back = wait_for(Duration::from_secs(5), || n.health("web", web1).is_some_and(|(h, t)| h == "up" && t)).map(|_| t0.elapsed());
        let app3 = self.addr(APP3).to_string();
        let t1 = Instant::now();
        let (ok, _, err) = n.lbctl(&["backend", "add", "app", &app3]);
        assert!(ok, "lbctl backend add app {app3}: {err}");
        let in_table = wait_for(Duration::from_secs(5), || n.health("app", self.addr(APP3)).is_some_and(|(h, t)| h == "up" && t)).map(|_| t1.elapsed());
        let counts = self.visits(90, Duration::ZERO, Duration::from_secs(20));
        Added { counts, in_table_after: in_table, web1_back_after: web1_back }
    }

    /// After step 3: the failed node comes back (link up, lbd started) as backup.
    pub fn restore_failed_node(&self) -> Option<Duration> {
        let failed = (0..2).find(|&n| self.nodes[n].role() == "down")?;
        let lb = &self.t.lbs[failed];
        let _ = Command::new("ip").args(["-n", &lb.ns, "link", "set", &lb.ifname, "up"]).status();
        let t = Instant::now();
        self.start_lbd(failed);
        wait_for(Duration::from_secs(10), || self.nodes[failed].role() == "backup").map(|_| t.elapsed())
    }
}
