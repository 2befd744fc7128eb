//! The lbctl <-> lbd protocol: one JSON request per connection on the instance's Unix
//! socket, one JSON response back, each a single line. Requests are limited to
//! `MAX_REQUEST` bytes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::health::HealthSpec;
use crate::model::{FlowPolicy, FlowTable, Mac, ServiceDef};

pub const MAX_REQUEST: usize = 64 * 1024;

/// Where an instance's socket lives unless the config says otherwise.
pub fn default_socket(instance: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/lb/{instance}.sock"))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// Variants without fields are written `Status {}` so unknown fields are rejected
/// for them too (serde ignores extra fields of unit variants in tagged enums).
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {},
    ServiceList {},
    ServiceShow { name: String },
    ServiceAdd { service: ServiceDef },
    ServiceRemove { name: String },
    BackendList { service: Option<String> },
    BackendAdd { service: String, address: IpAddr, weight: u32, mac: Option<Mac> },
    BackendRemove { service: String, address: IpAddr },
    BackendSetWeight { service: String, address: IpAddr, weight: u32 },
    BackendDrain { service: String, address: IpAddr },
    BackendEnable { service: String, address: IpAddr },
    Stats {},
    /// Re-read the config file (as SIGHUP does).
    Reload {},
    /// Detach from every interface, remove the pins, stop lbd.
    Detach {},
    /// Role, peer, config positions, sync counters.
    ClusterStatus {},
    /// Hand the active role to the peer (run on the active node).
    ClusterFailover {},
    /// Withdraw every BGP route for maintenance (the node keeps forwarding what
    /// still reaches it).
    NodeDrain {},
    /// Announce again after a drain.
    NodeUndrain {},
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Self { ok: true, error: None, data: Some(v) },
            Err(e) => Self::err(format!("encoding the response: {e}")),
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self { ok: false, error: Some(e.to_string()), data: None }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    /// native | generic
    pub mode: String,
    /// This run attached it (false: adopted from the pins of a previous run).
    pub attached_now: bool,
    /// attached | missing (the interface does not exist: attached when it appears) |
    /// error: ... (it exists, attaching failed)
    #[serde(default = "attached")]
    pub state: String,
}

fn attached() -> String {
    "attached".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub instance: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub config: String,
    /// Bumped by every applied change (file, CLI, health).
    pub config_version: u64,
    /// This run took over the pinned datapath of a previous run.
    pub adopted: bool,
    pub pin_dir: String,
    pub state_file: String,
    pub interfaces: Vec<InterfaceView>,
    pub services: usize,
    pub backends: usize,
    pub backends_up: usize,
    pub backends_down: usize,
    pub backends_drained: usize,
    /// Enabled but not in the table yet: next hop unresolved or first check not passed.
    #[serde(default)]
    pub backends_pending: usize,
    /// Cluster role, peer state, last heartbeat, config on both sides; none when standalone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// BGP announcement state; none without `[bgp]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpView>,
}

/// `lbctl status`'s BGP part.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BgpView {
    /// `lbctl node drain` is in force: nothing is announced.
    pub drained: bool,
    /// The routes lbd wants announced now: VIPs with a usable backend, none while
    /// drained or stopping.
    pub wanted: Vec<IpAddr>,
    /// BIRD accepted exactly the wanted set.
    pub in_sync: bool,
    /// What BIRD last accepted, its errors and sessions.
    #[serde(flatten)]
    pub bird: crate::bgp::task::TaskState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// Where frames to it go: "<mac> (config)", "<mac> (neighbour)", "gateway_mac",
    /// or "unresolved".
    pub next_hop: String,
    /// enabled | drained
    pub admin: String,
    /// up | down | unchecked (no health check configured)
    pub health: String,
    /// Receives new flows (in the Maglev table).
    pub in_table: bool,
    /// Datapath id while the backend has an entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_error: Option<String>,
    /// Why it is not in the table yet although enabled: "next hop unresolved" or
    /// "waiting for its first check". None: usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub mode: String,
    pub table_size: u32,
    /// on | off (TCP skips the flow table; gue only). Absent from an older lbd: on.
    #[serde(default)]
    pub flow_table: FlowTable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    pub unhealthy: FlowPolicy,
    pub id: u32,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrafficView {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets per second over the last sampling interval (about 1 s).
    pub pps: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub address: IpAddr,
    pub health: String,
    pub admin: String,
    #[serde(flatten)]
    pub traffic: TrafficView,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatsView {
    pub name: String,
    pub vip: String,
    #[serde(flatten)]
    pub traffic: TrafficView,
    pub backends: Vec<BackendStatsView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReasonView {
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsView {
    pub services: Vec<ServiceStatsView>,
    /// Every drop and unusual pass, by named reason.
    pub reasons: Vec<ReasonView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::BackendAdd { service: "web".into(), address: "10.0.1.13".parse().unwrap(), weight: 50, mac: None };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"cmd":"backend-add","service":"web","address":"10.0.1.13","weight":50,"mac":null}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        let e = serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown variant"), "{e}");
        let e = serde_json::from_str::<Request>(r#"{"cmd":"backend-add","service":"web","address":"10.0.1.300","weight":1,"mac":null}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid"), "{e}");
    }
}
