//! The BGP task: a tokio task of its own that makes BIRD announce what the owner
//! wants. The owner publishes `Wanted` (config, routes, a sequence number) in a
//! `watch` cell and never waits; the task writes BIRD's file, sends `configure`,
//! and publishes `TaskState` (what BIRD accepted, errors, sessions) back. A failure
//! (BIRD unreachable, a refused command) is retried with a bounded backoff (100 ms
//! doubling to 5 s) and reported; forwarding never depends on it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::birdc::{self, Conn};
use super::{BgpConfig, render, write_atomic};

pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Each control-socket exchange.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// BGP sessions are polled this often for `lbctl status`.
pub const POLL: Duration = Duration::from_secs(2);

/// What the owner wants announced.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    pub seq: u64,
    pub instance: String,
    pub cfg: Option<Arc<BgpConfig>>,
    pub routes: BTreeSet<IpAddr>,
}

/// What the task last achieved; shown by `lbctl status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// The `Wanted::seq` BIRD accepted last (None: nothing yet).
    pub applied_seq: Option<u64>,
    /// The routes of that config (announced, or being announced, by BIRD).
    pub announced: Vec<IpAddr>,
    /// BIRD answered the last exchange.
    pub bird_ok: bool,
    /// BIRD's greeting (its version) when it answered.
    pub bird_version: String,
    /// The last error (unreachable, refused, file not written), None when the last
    /// exchange worked.
    pub error: Option<String>,
    /// Failed attempts in a row.
    pub failures: u64,
    /// Every failed attempt since start.
    pub failures_total: u64,
    /// "name state info" of each BGP protocol, from `show protocols`.
    pub sessions: Vec<String>,
}

/// Runs until the owner's `Wanted` sender is dropped.
pub async fn run(mut wanted: watch::Receiver<Wanted>, state: watch::Sender<TaskState>) {
    let mut backoff = BACKOFF_MIN;
    let mut next_poll = Instant::now();
    loop {
        let w = wanted.borrow_and_update().clone();
        let Some(cfg) = w.cfg.clone() else {
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        };
        let need = state.borrow().applied_seq != Some(w.seq);
        let wait = if need {
            match apply(&cfg, &w).await {
                Ok((version, sessions)) => {
                    info!(routes = ?w.routes, "bgp: BIRD reconfigured");
                    state.send_modify(|s| {
                        s.applied_seq = Some(w.seq);
                        s.announced = w.routes.iter().copied().collect();
                        s.bird_ok = true;
                        s.bird_version = version;
                        s.error = None;
                        s.failures = 0;
                        s.sessions = sessions;
                    });
                    backoff = BACKOFF_MIN;
                    next_poll = Instant::now() + POLL;
                    POLL
                }
                Err(e) => {
                    fail(&state, &e);
                    let b = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    b
                }
            }
        } else {
            if Instant::now() >= next_poll {
                match poll(&cfg).await {
                    Ok((version, sessions)) => state.send_modify(|s| {
                        s.bird_ok = true;
                        s.bird_version = version;
                        s.error = None;
                        s.failures = 0;
                        s.sessions = sessions;
                    }),
                    Err(e) => fail(&state, &e),
                }
                next_poll = Instant::now()
                    + if state.borrow().bird_ok {
                        POLL
                    } else {
                        backoff
                    };
            }
            next_poll.saturating_duration_since(Instant::now())
        };
        tokio::select! {
            r = wanted.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn fail(state: &watch::Sender<TaskState>, e: &str) {
    let first = state.borrow().failures == 0;
    if first {
        warn!(error = %e, "bgp: BIRD exchange failed; retrying with backoff (forwarding is not affected)");
    }
    state.send_modify(|s| {
        s.bird_ok = false;
        s.error = Some(e.to_string());
        s.failures += 1;
        s.failures_total += 1;
    });
}

/// Writes the file, asks BIRD to reload it, reads the sessions.
async fn apply(cfg: &BgpConfig, w: &Wanted) -> Result<(String, Vec<String>), String> {
    let path = cfg.bird_config_path(&w.instance);
    write_atomic(&path, &render(cfg, &w.instance, &w.routes))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    let mut c = Conn::connect(&cfg.control_socket, IO_TIMEOUT)
        .await
        .map_err(|e| format!("BIRD unreachable: {e}"))?;
    let r = c
        .cmd("configure")
        .await
        .map_err(|e| format!("configure: {e}"))?;
    birdc::configure_ok(&r).map_err(|e| format!("configure: {e}"))?;
    let sessions = sessions(&mut c).await.unwrap_or_default();
    Ok((c.version.clone(), sessions))
}

async fn poll(cfg: &BgpConfig) -> Result<(String, Vec<String>), String> {
    let mut c = Conn::connect(&cfg.control_socket, IO_TIMEOUT)
        .await
        .map_err(|e| format!("BIRD unreachable: {e}"))?;
    let s = sessions(&mut c).await?;
    Ok((c.version.clone(), s))
}

async fn sessions(c: &mut Conn) -> Result<Vec<String>, String> {
    let r = c
        .cmd("show protocols")
        .await
        .and_then(|r| r.check())
        .map_err(|e| format!("show protocols: {e}"))?;
    Ok(birdc::parse_protocols(&r)
        .into_iter()
        .filter(|p| p.proto == "BGP" && p.name.starts_with("lb_peer"))
        .map(|p| {
            format!("{} {} {}", p.name, p.state, p.info)
                .trim_end()
                .to_string()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    fn cfg(dir: &std::path::Path) -> BgpConfig {
        let mut c: BgpConfig =
            toml::from_str("local_as = 65001\nrouter_id = \"10.0.0.1\"\n[[neighbor]]\naddress = \"10.0.0.254\"\nas = 65000\n").unwrap();
        c.control_socket = dir.join("bird.ctl");
        c.bird_config = Some(dir.join("lb.bird.conf"));
        c
    }

    /// A fake BIRD: answers `configure` with `answer`, `show protocols` with one session.
    async fn fake_bird(l: tokio::net::UnixListener, answer: &'static str) {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let _ = w.write_all(b"0001 BIRD 2.0.12 ready.\n").await;
                let mut r = BufReader::new(r);
                let mut line = String::new();
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let a = match line.trim() {
                        "configure" => answer.to_string(),
                        "show protocols" => "2002-Name Proto Table State Since Info\n1002-lb_peer1 BGP --- up 22:00:00.000 Established\n0000 \n".into(),
                        _ => "9001 syntax error\n".into(),
                    };
                    let _ = w.write_all(a.as_bytes()).await;
                    line.clear();
                }
            });
        }
    }

    async fn until(
        rx: &mut watch::Receiver<TaskState>,
        f: impl Fn(&TaskState) -> bool,
    ) -> TaskState {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if f(&rx.borrow_and_update()) {
                    return rx.borrow().clone();
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("state not reached: {:?}", rx.borrow()))
    }

    #[tokio::test]
    async fn unreachable_is_reported_retried_and_recovers() {
        let dir = std::env::temp_dir().join(format!("lb-bgp-task-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let c = Arc::new(cfg(&dir));
        let routes: BTreeSet<IpAddr> = ["10.201.0.1".parse().unwrap()].into();
        let (wtx, wrx) = watch::channel(Wanted {
            seq: 1,
            instance: "t".into(),
            cfg: Some(c.clone()),
            routes: routes.clone(),
        });
        let (stx, mut srx) = watch::channel(TaskState::default());
        let task = tokio::spawn(run(wrx, stx));
        // No BIRD: reported, retried; the file is written anyway (a starting BIRD reads it).
        let s = until(&mut srx, |s| s.failures >= 3).await;
        assert!(!s.bird_ok && s.applied_seq.is_none());
        assert!(
            s.error.as_deref().unwrap().contains("BIRD unreachable"),
            "{s:?}"
        );
        let text = std::fs::read_to_string(dir.join("lb.bird.conf")).unwrap();
        assert!(text.contains("route 10.201.0.1/32 blackhole;"));
        // A BIRD refusing the config: reported with its code.
        let l = tokio::net::UnixListener::bind(dir.join("bird.ctl")).unwrap();
        let bird = tokio::spawn(fake_bird(
            l,
            "0002-Reading configuration from /x\n8002 /x:1:1 syntax error\n",
        ));
        let s = until(&mut srx, |s| {
            s.error.as_deref().is_some_and(|e| e.contains("8002"))
        })
        .await;
        assert!(s.applied_seq.is_none());
        bird.abort();
        let _ = std::fs::remove_file(dir.join("bird.ctl"));
        // A working BIRD: applied, sessions read, failures reset.
        let l = tokio::net::UnixListener::bind(dir.join("bird.ctl")).unwrap();
        let bird = tokio::spawn(fake_bird(
            l,
            "0002-Reading configuration from /x\n0003 Reconfigured\n",
        ));
        let s = until(&mut srx, |s| s.applied_seq == Some(1)).await;
        assert!(
            s.bird_ok && s.error.is_none() && s.failures == 0 && s.failures_total >= 4,
            "{s:?}"
        );
        assert_eq!(s.announced, routes.iter().copied().collect::<Vec<_>>());
        assert_eq!(s.sessions, vec!["lb_peer1 up Established".to_string()]);
        // Withdraw: a new seq with no routes.
        wtx.send_replace(Wanted {
            seq: 2,
            instance: "t".into(),
            cfg: Some(c),
            routes: BTreeSet::new(),
        });
        let s = until(&mut srx, |s| s.applied_seq == Some(2)).await;
        assert!(s.announced.is_empty());
        assert!(
            !std::fs::read_to_string(dir.join("lb.bird.conf"))
                .unwrap()
                .contains("route ")
        );
        drop(wtx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        bird.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
