//! What the operator asks for: services (tiers) and their backends with weights, admin
//! state and health-check settings. One shape for the config file, the state file and
//! the CLI protocol, so a service means the same thing everywhere.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::control::{BackendSpec, ControlError, ControlPlane, Mode, ServiceSpec, Vip};
use crate::health::HealthSpec;

/// A MAC address, written `02:00:00:00:01:11`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("bad MAC address {s:?}: expected six hex bytes like 02:00:00:00:01:11"));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("bad MAC address {s:?}: expected six hex bytes like 02:00:00:00:01:11"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}: {p:?} is not a hex byte"))?;
        }
        if out[0] & 1 != 0 {
            return Err(format!("bad MAC address {s:?}: multicast/broadcast cannot be a next hop"));
        }
        if out == [0; 6] {
            return Err(format!("bad MAC address {s:?}: all zeros"));
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

crate::control::serde_as_string!(Mac);

/// What happens to the established flows of a backend that fails its health check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowPolicy {
    /// The backend leaves the table (no new flows); its flows stay on it, as HAProxy
    /// keeps sessions on a server marked down. Right when checks fail on overload.
    #[default]
    Keep,
    /// The backend's entry is invalidated: its flows re-steer to healthy backends,
    /// which answer unknown TCP connections with a RST, so clients reconnect at once
    /// instead of waiting on a dead server (HAProxy's on-marked-down shutdown-sessions).
    Reset,
}

impl fmt::Display for FlowPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowPolicy::Keep => "keep",
            FlowPolicy::Reset => "reset",
        })
    }
}

/// Whether a service records its flows in the flow table (`flow_table = "on" | "off"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowTable {
    /// Every flow is recorded: it keeps its backend across backend-set changes.
    #[default]
    On,
    /// TCP of a `gue` service skips the flow table: every packet takes its Maglev pair,
    /// and second chance on the backends keeps connections where they are (issue 15).
    Off,
}

impl FlowTable {
    pub fn is_on(&self) -> bool {
        *self == FlowTable::On
    }
}

impl fmt::Display for FlowTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_on() { "on" } else { "off" })
    }
}

impl FromStr for FlowTable {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(FlowTable::On),
            "off" => Ok(FlowTable::Off),
            _ => Err(format!("flow_table {s:?}: expected on or off")),
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn default_mode() -> Mode {
    Mode::Ipip
}

fn default_table_size() -> u32 {
    65537
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendDef {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// Administratively drained (`lbctl backend drain`): no new flows, flows stay.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drained: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    pub name: String,
    pub vip: Vip,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// "off": TCP skips the flow table (gue mode only). Written only when off, so state
    /// files and peers that predate the key read every other service unchanged.
    #[serde(default, skip_serializing_if = "FlowTable::is_on")]
    pub flow_table: FlowTable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// Flows of a backend that fails its health check: keep or reset.
    #[serde(default)]
    pub unhealthy: FlowPolicy,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendDef>,
}

impl ServiceDef {
    pub fn spec(&self) -> ServiceSpec {
        ServiceSpec { name: self.name.clone(), vip: self.vip, mode: self.mode, table_size: self.table_size, flow_table: self.flow_table.is_on() }
    }

    pub fn backend(&self, addr: IpAddr) -> Option<&BackendDef> {
        self.backends.iter().find(|b| b.address == addr)
    }

    /// Everything that can be checked about one service on its own, given the node's
    /// settings: the first problem. See `problems` for all of them.
    pub fn validate(&self, env: &NodeEnv) -> Result<(), ControlError> {
        match self.problems(env).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Every problem with this service on its own, each with the key it is about. The
    /// one list of rules, applied alike to the config file (`lbd --check`, start,
    /// reload), the CLI and configs synced from the peer.
    pub fn problems(&self, env: &NodeEnv) -> Vec<(Key, ControlError)> {
        type Cp = ControlPlane<crate::maps::MemMaps>;
        let mut out = Vec::new();
        let mut push = |k: Key, r: Result<(), ControlError>| {
            if let Err(e) = r {
                out.push((k, e));
            }
        };
        push(Key::Service("name"), Cp::check_name(&self.name));
        push(Key::Service("vip"), crate::control::check_vip_addr(&self.vip));
        push(Key::Service("table_size"), Cp::check_table_size(self.table_size));
        push(Key::Service("flow_table"), crate::control::check_flow_table(&self.spec()));
        if let Some(h) = &self.health {
            push(Key::Service("health"), h.validate(self.vip.port).map_err(ControlError::Invalid));
        }
        let spec = self.spec();
        let mut seen = std::collections::BTreeSet::new();
        let mut widest_outer = None;
        for (i, b) in self.backends.iter().enumerate() {
            if !seen.insert(b.address) {
                push(Key::Backend(i, "address"), Err(ControlError::DuplicateBackend(b.address, self.name.clone())));
            }
            // A backend without `mac` gets one from the neighbour table at run time,
            // so a placeholder stands in for the MAC check here.
            let bs = BackendSpec { addr: b.address, weight: b.weight, mac: Some(b.mac.map_or([2, 0, 0, 0, 0, 0], |m| m.0)) };
            let key = match Cp::check_backend(&spec, &bs) {
                Err(ControlError::BadWeight(_)) => "weight",
                Err(ControlError::MacRequired(..)) => "mac",
                _ => "address",
            };
            push(Key::Backend(i, key), Cp::check_backend(&spec, &bs));
            if let Some(outer) = self.mode.outer_len(b.address.is_ipv6()) {
                let (v4, have, name) = if b.address.is_ipv4() { (true, env.encap_v4, "encap_source_v4") } else { (false, env.encap_v6, "encap_source_v6") };
                if !have {
                    let fam = if v4 { "IPv4" } else { "IPv6" };
                    let mode = if self.mode == Mode::Ipip { "ipip" } else { "gue" };
                    push(Key::Backend(i, "address"), Err(ControlError::Invalid(format!("backend {} is {fam} in {mode} mode: set {name}", b.address))));
                }
                widest_outer = widest_outer.max(Some(outer));
            }
        }
        // IPv6 never fragments in flight: every link must carry 1280-byte packets, so
        // the encapsulated room must hold them (else they are answered with a packet
        // too big of 1280 that the client cannot go below, and never forwarded).
        if let (Some(outer), true) = (widest_outer, self.vip.addr.is_ipv6())
            && env.mtu < IPV6_MIN_MTU + outer
        {
            push(
                Key::Mtu,
                Err(ControlError::Invalid(format!(
                    "mtu {} leaves {} bytes for IPv6 packets after the {outer}-byte outer header; IPv6 needs {IPV6_MIN_MTU}: set mtu to at least {}",
                    env.mtu,
                    env.mtu.saturating_sub(outer),
                    IPV6_MIN_MTU + outer
                ))),
            );
        }
        out
    }
}

/// The smallest MTU an IPv6 link may have (RFC 8200).
pub const IPV6_MIN_MTU: u32 = 1280;

/// What validating a service needs to know about the node it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeEnv {
    /// `encap_source_v4` / `encap_source_v6` are set.
    pub encap_v4: bool,
    pub encap_v6: bool,
    pub mtu: u32,
}

impl NodeEnv {
    /// From the datapath settings lbd runs with (CLI changes, peer sync).
    pub fn from_settings(s: &lb_common::Settings) -> Self {
        Self { encap_v4: s.encap_src_v4 != 0, encap_v6: s.encap_src_v6 != [0; 4], mtu: if s.mtu == 0 { 1500 } else { s.mtu } }
    }
}

/// Which key of a service a problem is about (`lbd --check` prints that key's line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Service(&'static str),
    /// (index of the backend in the service, key).
    Backend(usize, &'static str),
    /// The top-level `mtu`.
    Mtu,
}
