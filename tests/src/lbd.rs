//! lbd as a process on a balancer node of a `netns::Topology`: its config directory,
//! start (through `nsenter --net`, so its pins land in the global bpffs), kill -9, and
//! the lbctl binary against its socket. Drop stops it and removes the instance's pins.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_userspace::api::Request;
use lb_userspace::daemon::call;

use crate::netns::{ChildGuard, Topology, ns_command};

pub struct Lbd {
    pub instance: String,
    pub ns: String,
    pub ifname: String,
    pub encap_source: String,
    pub encap_source_v6: String,
    pub dir: PathBuf,
    child: Option<ChildGuard>,
}

/// A binary of this workspace beside the test executable (target/release/deps/..).
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

/// Runs the lbctl binary against the lbd listening on `socket`: (success, stdout,
/// stderr); a failure to run it at all is (false, "", the error).
pub fn lbctl_at(socket: &Path, args: &[&str]) -> (bool, String, String) {
    match Command::new(bin("lbctl")).arg("--socket").arg(socket).args(args).stdin(Stdio::null()).output() {
        Ok(o) => (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => (false, String::new(), e.to_string()),
    }
}

/// Waits until `f` holds, checking every 50 ms, at most `max`; the time it took.
pub fn wait_for(max: Duration, f: impl FnMut() -> bool) -> Option<Duration> {
    poll_every(Duration::from_millis(50), max, f)
}

/// `wait_for` checking every `every`.
pub fn poll_every(every: Duration, max: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < max {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(every);
    }
    None
}

impl Lbd {
    /// lbd instance `instance` for balancer node `lb` of `topo` (not started). Removes a
    /// crashed run's pins of the same instance first.
    pub fn new(topo: &Topology, lb: usize, instance: &str) -> Lbd {
        let _ = lb_userspace::daemon::detach_offline(instance);
        let dir = std::env::temp_dir().join(format!("{instance}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lbd dir");
        let node = &topo.lbs[lb];
        Lbd {
            instance: instance.to_string(),
            ns: node.ns.clone(),
            ifname: node.ifname.clone(),
            encap_source: node.v4.to_string(),
            encap_source_v6: node.v6.to_string(),
            dir,
            child: None,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("lbd.sock")
    }

    /// The global keys of this node's config; append `[[service]]` tables.
    pub fn config_header(&self) -> String {
        format!(
            "instance = \"{}\"\ninterfaces = [\"{}\"]\nxdp_mode = \"native\"\nencap_source_v4 = \"{}\"\nencap_source_v6 = \"{}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n",
            self.instance,
            self.ifname,
            self.encap_source,
            self.encap_source_v6,
            self.socket().display(),
            self.dir.join("state").display()
        )
    }

    pub fn write_config(&self, services: &str) {
        std::fs::write(self.config_path(), format!("{}\n{services}", self.config_header())).expect("writing the config");
    }

    /// Starts lbd and waits until it answers (bounded).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "lbd already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("lbd.log")).expect("log");
        // As netns::spawn_in, but lbd's log (stderr) goes to a file.
        let mut c = ns_command(&self.ns, &bin("lbd").to_string_lossy());
        c.arg("--config").arg(self.config_path()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        self.child = Some(ChildGuard { child: c.spawn().expect("starting lbd") });
        let t = Instant::now();
        while !call(&self.socket(), &Request::Status {}).is_ok_and(|r| r.ok) {
            assert!(t.elapsed() < Duration::from_secs(20), "lbd did not come up:\n{}", self.log());
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.child.try_wait()) {
                panic!("lbd exited with {st}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// SIGTERM (a graceful stop), without waiting; false when lbd is not running.
    pub fn terminate(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        self.child.as_ref().is_some_and(|c| unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) } == 0)
    }

    /// Waits (at most `max`) until lbd has exited by itself (SIGTERM, `lbctl detach`);
    /// its exit status, None when it still runs.
    pub fn wait_exit(&mut self, max: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < max {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.child.try_wait()) {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// Runs lbctl against this lbd: (success, stdout, stderr).
    pub fn lbctl(&self, args: &[&str]) -> (bool, String, String) {
        lbctl_at(&self.socket(), args)
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

impl Drop for Lbd {
    fn drop(&mut self) {
        self.kill();
        let _ = lb_userspace::daemon::detach_offline(&self.instance);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
