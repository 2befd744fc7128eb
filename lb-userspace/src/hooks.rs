//! The cluster's `notify` script, as keepalived runs one: on each role change, with the
//! role, the reason and the VIPs as arguments and environment.
//!
//! Scripts run one at a time, in the order of the changes (a script that sees
//! "backup" after "active" must not run before it), on a task of their own, so a slow
//! script never delays a heartbeat. Each run is bounded by a timeout, after which its
//! process group is killed; a failure is logged, never fatal. Changes that arrive while
//! the queue is full are dropped and logged (the last role is what matters, and the
//! queue only fills when the script hangs on every run).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::mpsc;

/// One role change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleChange {
    pub instance: String,
    pub node_id: u32,
    /// init | backup | active
    pub previous: String,
    pub role: String,
    /// Why, in a word: peer_dead, peer_active, elected, failover, preempted, ...
    pub reason: String,
    /// The VIP addresses this node holds as active (its services' VIPs).
    pub vips: Vec<String>,
}

/// What became of one run (returned for tests and logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    TimedOut,
}

const QUEUE: usize = 64;

/// Handle to the script runner task.
#[derive(Clone)]
pub struct NotifyHook {
    tx: mpsc::Sender<RoleChange>,
}

impl NotifyHook {
    /// Starts the runner on the current tokio runtime. `done` receives each outcome
    /// (tests use it; lbd passes None).
    pub fn spawn(
        script: PathBuf,
        timeout: Duration,
        done: Option<mpsc::UnboundedSender<(RoleChange, Outcome)>>,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<RoleChange>(QUEUE);
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let outcome = run(&script, &change, timeout).await;
                match &outcome {
                    Outcome::Ok => {
                        tracing::info!(role = %change.role, reason = %change.reason, "notify script {} ran", script.display())
                    }
                    Outcome::Failed(e) => {
                        tracing::warn!(role = %change.role, "notify script {}: {e}", script.display())
                    }
                    Outcome::TimedOut => {
                        tracing::warn!(role = %change.role, "notify script {}: killed after {timeout:?}", script.display())
                    }
                }
                if let Some(d) = &done {
                    let _ = d.send((change, outcome));
                }
            }
        });
        Self { tx }
    }

    /// Queues a run; never waits.
    pub fn role_changed(&self, change: RoleChange) {
        if let Err(e) = self.tx.try_send(change) {
            tracing::warn!("notify script queue: {e}; role change not reported to the script");
        }
    }
}

async fn run(script: &std::path::Path, c: &RoleChange, timeout: Duration) -> Outcome {
    let mut cmd = Command::new(script);
    cmd.arg(&c.role)
        .arg(&c.reason)
        .arg(c.vips.join(","))
        .env("LB_INSTANCE", &c.instance)
        .env("LB_NODE_ID", c.node_id.to_string())
        .env("LB_ROLE", &c.role)
        .env("LB_PREVIOUS_ROLE", &c.previous)
        .env("LB_REASON", &c.reason)
        .env("LB_VIPS", c.vips.join(" "))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what the script started too.
        .process_group(0)
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start: {e}")),
    };
    let pgid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Outcome::Ok,
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            Outcome::Failed(format!(
                "{}{}{}",
                out.status,
                if err.is_empty() { "" } else { ": " },
                err.chars().take(200).collect::<String>()
            ))
        }
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(_) => {
            if let Some(pgid) = pgid {
                // SAFETY: signalling a process group we created; a stale id is harmless
                // (the group is ours until its last member is reaped).
                unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
            }
            Outcome::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn change(role: &str, prev: &str) -> RoleChange {
        RoleChange {
            instance: "lb0".into(),
            node_id: 1,
            previous: prev.into(),
            role: role.into(),
            reason: "peer_dead".into(),
            vips: vec!["10.0.0.100".into(), "2001:db8::100".into()],
        }
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn runs_in_order_with_arguments_and_environment_bounded_by_a_timeout() {
        let dir = std::env::temp_dir().join(format!("lb-hooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        // Sleeps long on "hang", fails on "fail", else records what it was given.
        let s = script(
            &dir,
            "notify.sh",
            &format!(
                r#"[ "$2" = hang ] && {{ sleep 30; echo late >> {log}; exit 0; }}
[ "$2" = fail ] && {{ echo "no route" >&2; exit 3; }}
echo "$1|$2|$3|$LB_ROLE|$LB_PREVIOUS_ROLE|$LB_REASON|$LB_VIPS|$LB_INSTANCE|$LB_NODE_ID" >> {log}"#,
                log = log.display()
            ),
        );
        let (dtx, mut drx) = mpsc::unbounded_channel();
        let hook = NotifyHook::spawn(s, Duration::from_millis(300), Some(dtx));
        hook.role_changed(change("active", "backup"));
        hook.role_changed(RoleChange {
            reason: "hang".into(),
            ..change("backup", "active")
        });
        hook.role_changed(RoleChange {
            reason: "fail".into(),
            ..change("active", "backup")
        });
        hook.role_changed(change("backup", "active"));
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            let (c, o) = tokio::time::timeout(Duration::from_secs(10), drx.recv())
                .await
                .expect("outcome in time")
                .unwrap();
            outcomes.push((c.role, c.reason, o));
        }
        assert_eq!(outcomes[0].2, Outcome::Ok);
        assert_eq!(outcomes[1].2, Outcome::TimedOut);
        assert!(
            matches!(&outcomes[2].2, Outcome::Failed(e) if e.contains("exit status: 3") && e.contains("no route")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[3].2, Outcome::Ok);
        let lines = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            lines,
            "active|peer_dead|10.0.0.100,2001:db8::100|active|backup|peer_dead|10.0.0.100 2001:db8::100|lb0|1\n\
             backup|peer_dead|10.0.0.100,2001:db8::100|backup|active|peer_dead|10.0.0.100 2001:db8::100|lb0|1\n"
        );

        // A script that does not exist: a failure, and the runner goes on.
        let (dtx, mut drx) = mpsc::unbounded_channel();
        let hook = NotifyHook::spawn(dir.join("missing"), Duration::from_secs(1), Some(dtx));
        hook.role_changed(change("active", "init"));
        let (_, o) = tokio::time::timeout(Duration::from_secs(5), drx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(o, Outcome::Failed(ref e) if e.contains("cannot start")),
            "{o:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
