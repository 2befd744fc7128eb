//! The operators' tasks around the owner: the metrics source a scrape asks, the
//! systemd watchdog, the `STATUS=` line, and the cluster notify script's role changes.
//! None of them writes a map: a scrape and a watchdog ping are messages to the owner.

use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::owner::{Datapath, Msg, Owner};
use crate::cluster::election::Transition;
use crate::cluster::node::ClusterCmd;
use crate::hooks::RoleChange;
use crate::maps::MapWriter;
use crate::metrics::{BackendState, BuildInfo, ClusterState, Snapshot, SnapshotSource};
use crate::systemd;

/// How long a scrape waits for the owner and for the cluster task.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        revision: env!("LB_GIT_REV").to_string(),
        map_layout: lb_common::contract::MAP_LAYOUT_VERSION.to_string(),
    }
}

impl<W: MapWriter, D: Datapath> Owner<W, D> {
    /// One scrape's view: counters summed from the per-CPU maps now, and the control
    /// state. The cluster's flow and datagram counters are the cluster task's.
    pub fn metrics_snapshot(&self) -> anyhow::Result<Snapshot> {
        let stats = self.core.stats(self.dp.counters())?;
        let backends = self
            .core
            .backend_views(None)?
            .into_iter()
            .map(|b| BackendState {
                up: b.health != "down",
                in_table: b.in_table,
                pending: b.pending.is_some(),
                service: b.service,
                address: b.address,
                weight: b.weight,
            })
            .collect();
        let cluster = self.cluster.as_ref().map(|c| {
            let s = c.snapshot.borrow().clone();
            ClusterState {
                role: c.role.to_string(),
                peer_alive: s.peer_alive,
                last_heartbeat_age_seconds: s.last_heard_ms_ago.map(|ms| ms as f64 / 1000.0),
                local_config_version: c.pos.version,
                peer_config_version: s.peer_pos.map(|p| p.version),
                ..ClusterState::default()
            }
        });
        Ok(Snapshot {
            build: build_info(),
            stats,
            backends,
            cluster,
        })
    }

    /// `STATUS=` for systemd: role and counts, one line.
    pub fn status_line(&self) -> String {
        let (up, down, drained) = self.core.backend_counts();
        let role = self
            .cluster
            .as_ref()
            .map_or("standalone".to_string(), |c| c.role.to_string());
        format!(
            "{role}; {} services, {up}/{} backends up, {drained} drained, {} pending",
            self.core.services().len(),
            up + down + drained,
            self.core.pending_count()
        )
    }

    /// What the notify script is told about a role change.
    pub fn role_change(&self, t: &Transition) -> RoleChange {
        let mut vips: Vec<String> = self
            .core
            .services()
            .iter()
            .map(|d| d.vip.addr.to_string())
            .collect();
        vips.sort();
        vips.dedup();
        RoleChange {
            instance: self.cfg.instance.clone(),
            node_id: self.cluster.as_ref().map_or(0, |c| c.node_id),
            previous: t.from.to_string(),
            role: t.to.to_string(),
            reason: snake_case(&format!("{:?}", t.why)),
            vips,
        }
    }
}

/// `PeerDead` -> `peer_dead`.
fn snake_case(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 4);
    for (i, ch) in s.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                o.push('_');
            }
            o.push(ch.to_ascii_lowercase());
        } else {
            o.push(ch);
        }
    }
    o
}

/// Where `GET /metrics` gets its snapshot: the owner, then the cluster task.
pub struct MetricsSource {
    pub owner: mpsc::Sender<Msg>,
    pub cluster: Option<mpsc::UnboundedSender<ClusterCmd>>,
}

impl SnapshotSource for MetricsSource {
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(ASK_TIMEOUT, self.owner.send(Msg::Metrics(tx)))
            .await
            .map_err(|_| anyhow!("lbd's owner task is busy"))?
            .map_err(|_| anyhow!("lbd is stopping"))?;
        let mut s = tokio::time::timeout(ASK_TIMEOUT, rx)
            .await
            .map_err(|_| anyhow!("lbd's owner task did not answer"))?
            .map_err(|_| anyhow!("lbd is stopping"))??;
        if let (Some(c), Some(cs)) = (&self.cluster, &mut s.cluster) {
            let (tx, rx) = oneshot::channel();
            if c.send(ClusterCmd::Status(tx)).is_err() {
                return Err(anyhow!("lbd is stopping"));
            }
            let v = tokio::time::timeout(ASK_TIMEOUT, rx)
                .await
                .map_err(|_| anyhow!("the cluster task did not answer"))?
                .map_err(|_| anyhow!("lbd is stopping"))?;
            cs.heartbeat_interval_p99_seconds = v.heartbeat_interval_p99_ms / 1000.0;
            cs.peer_gap_max_seconds = v.peer_gap_max_ms as f64 / 1000.0;
            cs.role_changes = v.role_changes;
            cs.datagrams_accepted = v.datagrams_accepted;
            cs.datagrams_rejected = v.datagrams_rejected;
            cs.flows_sent = v.flows_sent;
            cs.flows_applied = v.flows_applied;
            cs.flows_dropped = vec![
                ("queue_full".into(), v.flows_dropped_queue_full),
                ("lost_in_datapath".into(), v.flows_lost_in_datapath),
                ("unknown_vip".into(), v.flows_unknown_vip),
                ("unknown_backend".into(), v.flows_unknown_backend),
                ("apply_queue_full".into(), v.flows_dropped_apply_queue),
            ];
        }
        Ok(s)
    }
}

/// Sends WATCHDOG=1 every `every` while the owner task answers a ping within it: a
/// stuck owner stops the pings and systemd restarts lbd (the datapath forwards on).
pub async fn watchdog(owner: mpsc::Sender<Msg>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (tx, rx) = oneshot::channel();
        match tokio::time::timeout(every, async {
            owner.send(Msg::Ping(tx)).await.map_err(|_| ())?;
            rx.await.map_err(|_| ())
        })
        .await
        {
            Ok(Ok(())) => systemd::watchdog(),
            Ok(Err(())) => return,
            Err(_) => warn!(
                "watchdog: the owner task did not answer within {every:?}; WATCHDOG=1 not sent"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_are_snake_case() {
        assert_eq!(super::snake_case("PeerDead"), "peer_dead");
        assert_eq!(super::snake_case("AloneAtStartup"), "alone_at_startup");
    }
}
