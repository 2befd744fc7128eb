//! What the operator asks for: services (tiers) and their backends with weights, admin
//! state and health-check settings. One shape for the config file, the state file and
//! the CLI protocol, so a service means the same thing everywhere.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::control::{BackendSpec, ControlError, ControlPlane, MAX_WEIGHT, Mode, ServiceSpec, Vip};
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
        ServiceSpec { name: self.name.clone(), vip: self.vip, mode: self.mode, table_size: self.table_size }
    }

    pub fn backend(&self, addr: IpAddr) -> Option<&BackendDef> {
        self.backends.iter().find(|b| b.address == addr)
    }

    /// Everything that can be checked about one service on its own.
    pub fn validate(&self) -> Result<(), ControlError> {
        // A backend without `mac` gets one from the neighbour table at run time, so a
        // placeholder stands in for the MAC check here.
        let specs: Vec<BackendSpec> = self
            .backends
            .iter()
            .map(|b| BackendSpec { addr: b.address, weight: b.weight, mac: Some(b.mac.map_or([2, 0, 0, 0, 0, 0], |m| m.0)) })
            .collect();
        ControlPlane::<crate::maps::MemMaps>::check_service_alone(&self.spec())?;
        ControlPlane::<crate::maps::MemMaps>::check_backends(&self.spec(), &specs)?;
        if let Some(h) = &self.health {
            h.validate(self.vip.port).map_err(|e| ControlError::Invalid(format!("service {:?}: {e}", self.name)))?;
        }
        for b in &self.backends {
            if b.weight > MAX_WEIGHT {
                return Err(ControlError::BadWeight(b.weight));
            }
        }
        Ok(())
    }
}
