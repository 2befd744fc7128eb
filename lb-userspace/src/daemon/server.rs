//! The lbctl socket: a tokio `UnixListener`, one request line and one response line per
//! connection, root only (SO_PEERCRED), at most `MAX_CLIENTS` at once. Requests go to
//! the owner task; cluster status and failover go to the cluster task directly, so
//! they answer whatever the owner is doing.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::warn;

use super::owner::Msg;
use crate::api::{MAX_REQUEST, Request, Response};
use crate::cluster::node::ClusterCmd;

/// At most this many lbctl connections are served at once.
pub const MAX_CLIENTS: usize = 16;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // We hold the instance lock: a socket file left here is from a dead lbd.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// Serves until the runtime stops. `slots` (MAX_CLIENTS permits) is held by each
/// connection until its answer is written: taking all of them at shutdown waits for
/// the answers in flight (`lbctl detach` gets its answer before lbd exits).
pub async fn serve(listener: UnixListener, owner: mpsc::Sender<Msg>, cluster: Option<mpsc::UnboundedSender<ClusterCmd>>, slots: Arc<Semaphore>) {
    loop {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                warn!(error = %e, "accept on the control socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut conn = conn;
                let _ = respond(&mut conn, &Response::err("lbd is busy: too many lbctl connections")).await;
            });
            continue;
        };
        let (owner, cluster) = (owner.clone(), cluster.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, serve_one(conn, owner, cluster)).await;
            drop(permit);
        });
    }
}

async fn serve_one(mut conn: UnixStream, owner: mpsc::Sender<Msg>, cluster: Option<mpsc::UnboundedSender<ClusterCmd>>) {
    let resp = match conn.peer_cred().map(|c| c.uid()) {
        Ok(0) => match read_request(&mut conn).await {
            Ok(req) => dispatch(req, &owner, cluster.as_ref()).await,
            Err(e) => Response::err(e),
        },
        Ok(uid) => Response::err(format!("permission denied: uid {uid} is not root")),
        Err(_) => Response::err("permission denied: peer credentials unavailable"),
    };
    let _ = respond(&mut conn, &resp).await;
}

async fn dispatch(req: Request, owner: &mpsc::Sender<Msg>, cluster: Option<&mpsc::UnboundedSender<ClusterCmd>>) -> Response {
    let gone = || Response::err("lbd is stopping");
    match (req, cluster) {
        (Request::ClusterStatus {}, Some(c)) => {
            let (tx, rx) = oneshot::channel();
            if c.send(ClusterCmd::Status(tx)).is_err() {
                return gone();
            }
            rx.await.map_or_else(|_| gone(), Response::ok)
        }
        (Request::ClusterFailover {}, Some(c)) => {
            let (tx, rx) = oneshot::channel();
            if c.send(ClusterCmd::Failover(tx)).is_err() {
                return gone();
            }
            match rx.await {
                Ok(Ok(())) => Response::ok(serde_json::json!({ "result": "handing the active role to the peer" })),
                Ok(Err(e)) => Response::err(e),
                Err(_) => gone(),
            }
        }
        (req, _) => {
            let (tx, rx) = oneshot::channel();
            let msg = match req {
                Request::Reload {} => Msg::Reload(Some(tx)),
                req => Msg::Api(req, tx),
            };
            if owner.send(msg).await.is_err() {
                return gone();
            }
            rx.await.unwrap_or_else(|_| gone())
        }
    }
}

/// One request line, at most MAX_REQUEST bytes.
async fn read_request(conn: &mut UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut r = BufReader::new(conn.take(MAX_REQUEST as u64 + 1));
    r.read_until(b'\n', &mut line).await.map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"))
}

async fn respond(conn: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_vec(r).unwrap_or_else(|_| br#"{"ok":false,"error":"encoding failed"}"#.to_vec());
    s.push(b'\n');
    conn.write_all(&s).await
}
