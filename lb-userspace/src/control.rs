//! Services (tiers) and their backend sets, and how a change reaches the datapath.
//!
//! Commit protocol for a backend-set change, so the datapath never sees half a change:
//! 1. write the entries of new backends (unreferenced until step 3),
//! 2. build the Maglev table and write it into the service's idle slot,
//! 3. flip the VIP's active slot (one map update: the commit point),
//! 4. invalidate removed backends' entries, so flows pinned to them re-steer.
//!
//! A failure at any step leaves the datapath and this model as they were: before step
//! 3 the written entries are put back; in step 4 the flip is undone (the old table is
//! still intact in the other slot) after re-validating what step 4 invalidated. Only
//! if an undo write fails too does the change go forward instead, to the state the
//! datapath then has; writes still owed (an entry to invalidate, the VIP address
//! maps) are kept and retried before the next change, and an id owed an
//! invalidation is not reused before it succeeds. Either way the live table only
//! ever names valid entries of its own service as primaries.
//!
//! Second chance (`gue` services, issue 15): every table position holds a (primary,
//! secondary) pair (`maglev::build_entries`). A change opens a window of
//! `SECOND_CHANCE_WINDOW`: its first change records the backend set before it
//! (`before`), and every table built while the window is open takes each position's
//! owner under `before` as the secondary where the primary differs, so connections
//! made before the window find their backend in the pair through any number of
//! changes in it. Backends of `before` that left (removed, or dropped by a `reset`
//! health policy) stay as `former` entries: not VALID (flows pinned to them re-steer
//! to the new primary, whose decap forwards what it does not hold) but
//! `BACKEND_F_HOP`, so the datapath may name them as a hop. The first change after the
//! window closes starts a new one from the set then; formers no longer in it are
//! invalidated and their ids freed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use lb_common::maglev::{self, MaglevBackend};
use lb_common::{
    BACKEND_F_HAS_MAC, BACKEND_F_HOP, BACKEND_F_V6, BACKEND_F_VALID, BackendValue, NO_BACKEND, TableEntry, MAX_BACKENDS, MAX_SERVICES,
    MAX_TABLE_SIZE, MODE_DSR_L2, MODE_GUE, MODE_IPIP, PROTO_TCP, PROTO_UDP, Settings, VIP_F_NO_FLOW_TABLE, VipBloom,
    VipKey, VipValue, addr_bytes, addr_words, gue, vip_mode,
};

use crate::maps::{MapWriteError, MapWriter};

/// Serde through `Display`/`FromStr`: config, state file and protocol all write these
/// as the strings an operator types ("dsr-l2", "10.0.0.100:80/tcp", "02:00:..").
macro_rules! serde_as_string {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <String as serde::Deserialize>::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use serde_as_string;

serde_as_string!(Mode);
serde_as_string!(Vip);

/// Largest backend weight (HAProxy allows 0..=256; we allow finer shares).
pub const MAX_WEIGHT: u32 = 65535;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Ipip,
    DsrL2,
    /// Outer IP + UDP to `port` + GUE with a hop list (lb_common::gue).
    Gue { port: u16 },
}

impl Mode {
    fn datapath(self) -> u32 {
        match self {
            Mode::Ipip => MODE_IPIP,
            Mode::DsrL2 => MODE_DSR_L2,
            Mode::Gue { port } => vip_mode(MODE_GUE, port),
        }
    }

    /// Bytes the mode puts before the client's IP packet for an IPv4 (`v6` false) or
    /// IPv6 backend; None for dsr-l2, which adds none and needs no encap source.
    pub fn outer_len(self, v6: bool) -> Option<u32> {
        let ip = if v6 { 40 } else { 20 };
        match self {
            Mode::Ipip => Some(ip),
            // The balancer carries at most one hop (the secondary).
            Mode::Gue { .. } => Some(ip + gue::overhead(1) as u32),
            Mode::DsrL2 => None,
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    /// `ipip`, `dsr-l2`, `gue` (UDP port 6080) or `gue:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipip" => Ok(Mode::Ipip),
            "dsr-l2" => Ok(Mode::DsrL2),
            "gue" => Ok(Mode::Gue { port: gue::DEFAULT_PORT }),
            _ => match s.strip_prefix("gue:").map(str::parse::<u16>) {
                Some(Ok(port)) if port != 0 => Ok(Mode::Gue { port }),
                Some(_) => Err(format!("mode {s:?}: the GUE port must be 1-65535")),
                None => Err(format!("unknown mode {s:?} (expected ipip, dsr-l2, gue or gue:PORT)")),
            },
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Ipip => f.write_str("ipip"),
            Mode::DsrL2 => f.write_str("dsr-l2"),
            Mode::Gue { port } if *port == gue::DEFAULT_PORT => f.write_str("gue"),
            Mode::Gue { port } => write!(f, "gue:{port}"),
        }
    }
}

/// A virtual address: (address, port, protocol); port 0 = every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    pub addr: IpAddr,
    pub port: u16,
    /// PROTO_TCP or PROTO_UDP.
    pub proto: u8,
}

impl Vip {
    pub fn key(&self) -> VipKey {
        VipKey::new(self.addr, self.port, self.proto)
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = if self.proto == PROTO_TCP { "tcp" } else { "udp" };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

impl FromStr for Vip {
    type Err = String;
    /// `10.0.0.100:80/tcp`, `[2001:db8::1]:443/udp`, `10.0.0.100:0/tcp` (all ports).
    fn from_str(s: &str) -> Result<Self, String> {
        let (sock, proto) = s.rsplit_once('/').ok_or_else(|| format!("VIP {s:?}: expected ADDR:PORT/tcp|udp"))?;
        let proto = match proto {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            p => {
                return Err(format!("VIP {s:?}: unknown protocol {p:?} (expected tcp or udp)"));
            }
        };
        let sa: std::net::SocketAddr = sock.parse().map_err(|_| format!("VIP {s:?}: bad address:port {sock:?}"))?;
        Ok(Vip { addr: sa.ip(), port: sa.port(), proto })
    }
}

/// An IPv4 address written as IPv4-mapped IPv6 (`::ffff:a.b.c.d`). The maps store
/// IPv4 in exactly that form, so such an address would alias its IPv4 twin: it is
/// refused everywhere (config, CLI, peer sync) rather than silently rewritten.
fn is_v4_mapped(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

const MAPPED: &str = "an IPv4-mapped IPv6 address (write it as plain IPv4)";

/// Addresses no VIP may have: traffic to them is not the balancer's to take.
pub fn check_vip_addr(vip: &Vip) -> Result<(), ControlError> {
    let why = match vip.addr {
        a if a.is_unspecified() => "the unspecified address",
        IpAddr::V4(a) if a.is_broadcast() => "the broadcast address",
        a if a.is_multicast() => "a multicast address",
        a if a.is_loopback() => "a loopback address",
        a if is_v4_mapped(a) => MAPPED,
        _ => return Ok(()),
    };
    Err(ControlError::BadVip(*vip, why))
}

/// Addresses no backend may have: nothing could answer, or the packet would loop.
pub fn check_backend_addr(vip: &Vip, addr: IpAddr) -> Result<(), ControlError> {
    let why = match addr {
        a if a.is_unspecified() => "the unspecified address cannot be a backend",
        IpAddr::V4(a) if a.is_broadcast() => "the broadcast address cannot be a backend",
        a if a.is_multicast() => "a multicast address cannot be a backend",
        a if is_v4_mapped(a) => "an IPv4-mapped IPv6 address cannot be a backend (write it as plain IPv4)",
        a if a == vip.addr => "the VIP's own address cannot be a backend (the packet would come back to the balancer)",
        _ => return Ok(()),
    };
    Err(ControlError::BadBackendAddr(addr, why))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Vip,
    pub mode: Mode,
    /// Maglev table size M (a prime).
    pub table_size: u32,
    /// TCP flows are recorded in the flow table (`flow_table = "on"`); false only for
    /// a gue TCP service (`check_flow_table`), written as VIP_F_NO_FLOW_TABLE.
    pub flow_table: bool,
}

impl ServiceSpec {
    /// The same service but for `flow_table`: a flip is one VIP write
    /// (`ControlPlane::set_flow_table`), not a new service.
    pub fn same_but_flow_table(&self, other: &ServiceSpec) -> bool {
        *self == ServiceSpec { flow_table: self.flow_table, ..other.clone() }
    }
}

/// `flow_table = "off"` needs what replaces the flow table: second chance on the
/// backends, which only `gue` mode has and only TCP (socket state) can use.
pub fn check_flow_table(spec: &ServiceSpec) -> Result<(), ControlError> {
    if spec.flow_table {
        return Ok(());
    }
    if !matches!(spec.mode, Mode::Gue { .. }) {
        return Err(ControlError::Invalid(format!(
            "flow_table = \"off\" needs mode gue (this service is {}): without second chance on the backends, a backend change would move established connections",
            spec.mode
        )));
    }
    if spec.vip.proto != PROTO_TCP {
        return Err(ControlError::Invalid(
            "flow_table = \"off\" applies to TCP services only: UDP has no connection state for second chance, so a udp service keeps the flow table".into(),
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// 0 = drained: no new flows, existing flows stay.
    pub weight: u32,
    /// Next-hop MAC; required in dsr-l2 mode.
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("service {0:?} already exists")]
    ServiceExists(String),
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("bad service name {0:?}: use 1-32 characters from [A-Za-z0-9_-]")]
    BadName(String),
    #[error("VIP {0} is already used by service {1:?}")]
    VipInUse(Vip, String),
    #[error("table size {0} must be a prime between 3 and {MAX_TABLE_SIZE}")]
    BadTableSize(u32),
    #[error("duplicate backend {0} in service {1:?}")]
    DuplicateBackend(IpAddr, String),
    #[error("unknown backend {0} in service {1:?}")]
    UnknownBackend(IpAddr, String),
    #[error("weight {0} out of range 0..={MAX_WEIGHT}")]
    BadWeight(u32),
    #[error("backend {0} needs a MAC address: service {1:?} is dsr-l2")]
    MacRequired(IpAddr, String),
    #[error("backend {0} is not of the VIP's address family: dsr-l2 forwards the packet unchanged")]
    FamilyMismatch(IpAddr),
    #[error("VIP {0}: {1} cannot be a VIP")]
    BadVip(Vip, &'static str),
    #[error("backend {0}: {1}")]
    BadBackendAddr(IpAddr, &'static str),
    #[error("too many services (at most {MAX_SERVICES})")]
    TooManyServices,
    #[error("backend table full (at most {MAX_BACKENDS} backends over all services)")]
    TooManyBackends,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Map(#[from] MapWriteError),
}

#[derive(Clone, Debug)]
struct Backend {
    spec: BackendSpec,
    id: u32,
}

/// How long a change window of a `gue` service lasts (module doc): the set before its
/// first change stays the secondaries' reference, and its removed backends stay hops.
pub const SECOND_CHANCE_WINDOW: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
struct Service {
    id: u32,
    spec: ServiceSpec,
    /// Sorted by address.
    backends: Vec<Backend>,
    active_slot: u32,
    /// gue: the backend set when the open change window began (module doc).
    before: Vec<Backend>,
    /// gue: backends of `before` no longer in `backends`, kept as hops (ids held).
    former: Vec<Backend>,
    /// gue: when the open change window closes.
    window_until: Option<Instant>,
}

/// One service as a running datapath holds it (see `ControlPlane::adopt`).
#[derive(Clone, Debug)]
pub struct Adopted {
    pub spec: ServiceSpec,
    pub id: u32,
    pub active_slot: u32,
    /// (spec, datapath backend id).
    pub backends: Vec<(BackendSpec, u32)>,
}

/// A read-only view of one service for listing.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub spec: ServiceSpec,
    pub id: u32,
    /// (spec, datapath backend id), sorted by address.
    pub backends: Vec<(BackendSpec, u32)>,
    pub active_slot: u32,
}

pub struct ControlPlane<W: MapWriter> {
    w: W,
    services: BTreeMap<String, Service>,
    free_service_ids: BTreeSet<u32>,
    /// FIFO so a freed id is reused as late as possible (flows may still name it).
    free_backend_ids: VecDeque<u32>,
    settings: Settings,
    /// Backend ids no live table names whose invalidation failed: retried by
    /// `settle`, reused only after it succeeds.
    pending_invalid: Vec<u32>,
    /// The VIP address maps may not match the services (a failed write): rewritten
    /// by `settle`.
    addr_maps_dirty: bool,
}

impl<W: MapWriter> ControlPlane<W> {
    /// A control plane with no services over maps that hold none yet.
    pub fn new(w: W) -> Self {
        Self {
            w,
            services: BTreeMap::new(),
            free_service_ids: (0..MAX_SERVICES).collect(),
            free_backend_ids: (0..MAX_BACKENDS).collect(),
            settings: Settings::default(),
            pending_invalid: Vec::new(),
            addr_maps_dirty: false,
        }
    }

    /// Writes still owed from an earlier failure (see the module doc): (backend
    /// entries to invalidate, whether the VIP address maps need a rewrite).
    pub fn owed(&self) -> (usize, bool) {
        (self.pending_invalid.len(), self.addr_maps_dirty)
    }

    /// Retries the writes owed from earlier failures. Run before every change.
    pub fn settle(&mut self) {
        if self.addr_maps_dirty && self.write_bloom().is_ok() {
            self.addr_maps_dirty = false;
        }
        for id in std::mem::take(&mut self.pending_invalid) {
            match self.w.put_backend(id, &BackendValue::default()) {
                Ok(()) => self.free_backend_ids.push_back(id),
                Err(_) => self.pending_invalid.push(id),
            }
        }
    }

    /// Takes over maps a running datapath already holds (lbd restarting): `services`
    /// is what the maps say, so ids and live slots stay as they are and existing flows
    /// keep their backends. Nothing is written.
    pub fn adopt(w: W, settings: Settings, services: Vec<Adopted>) -> Result<Self, ControlError> {
        let mut cp = Self::new(w);
        cp.settings = settings;
        let mut used_backend_ids = BTreeSet::new();
        for a in services {
            let bad = |what: String| ControlError::Invalid(format!("adopting service {:?}: {what}", a.spec.name));
            if !cp.free_service_ids.remove(&a.id) {
                return Err(bad(format!("service id {} out of range or used twice", a.id)));
            }
            if a.active_slot > 1 {
                return Err(bad(format!("active slot {}", a.active_slot)));
            }
            if cp.services.contains_key(&a.spec.name) {
                return Err(ControlError::ServiceExists(a.spec.name));
            }
            let mut backends = Vec::new();
            for (spec, id) in a.backends {
                if id >= MAX_BACKENDS || !used_backend_ids.insert(id) {
                    return Err(bad(format!("backend id {id} out of range or used twice")));
                }
                backends.push(Backend { spec, id });
            }
            backends.sort_by_key(|b| b.spec.addr);
            let name = a.spec.name.clone();
            let svc = Service { id: a.id, spec: a.spec, backends, active_slot: a.active_slot, before: Vec::new(), former: Vec::new(), window_until: None };
            cp.services.insert(name, svc);
        }
        cp.free_backend_ids.retain(|id| !used_backend_ids.contains(id));
        Ok(cp)
    }

    pub fn writer(&self) -> &W {
        &self.w
    }

    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.w
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn set_settings(&mut self, s: Settings) -> Result<(), ControlError> {
        self.w.put_settings(&s)?;
        self.settings = s;
        Ok(())
    }

    pub fn service(&self, name: &str) -> Option<ServiceView> {
        self.services.get(name).map(|s| ServiceView {
            spec: s.spec.clone(),
            id: s.id,
            backends: s.backends.iter().map(|b| (b.spec, b.id)).collect(),
            active_slot: s.active_slot,
        })
    }

    pub fn services(&self) -> Vec<ServiceView> {
        self.services.keys().filter_map(|n| self.service(n)).collect()
    }

    /// Datapath id of a backend of a service.
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services.get(name).map(|s| s.id)
    }

    /// Every backend of `service` in the datapath: address → (id, in its table, i.e.
    /// weight > 0). One pass, nothing cloned: views of thousands of backends look
    /// each one up here instead of scanning the service per backend.
    pub fn backend_index(&self, service: &str) -> std::collections::HashMap<IpAddr, (u32, bool)> {
        self.services.get(service).map_or_else(Default::default, |s| s.backends.iter().map(|b| (b.spec.addr, (b.id, b.spec.weight > 0))).collect())
    }

    pub fn backend_id(&self, service: &str, addr: IpAddr) -> Option<u32> {
        self.services.get(service)?.backends.iter().find(|b| b.spec.addr == addr).map(|b| b.id)
    }

    /// Checks of a service spec that do not depend on other services.
    pub fn check_service_alone(spec: &ServiceSpec) -> Result<(), ControlError> {
        Self::check_name(&spec.name)?;
        check_vip_addr(&spec.vip)?;
        Self::check_table_size(spec.table_size)?;
        check_flow_table(spec)
    }

    pub fn check_name(name: &str) -> Result<(), ControlError> {
        let name_ok = (1..=32).contains(&name.len()) && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !name_ok {
            return Err(ControlError::BadName(name.to_string()));
        }
        Ok(())
    }

    pub fn check_table_size(m: u32) -> Result<(), ControlError> {
        if !(3..=MAX_TABLE_SIZE).contains(&m) || !maglev::is_prime(m) {
            return Err(ControlError::BadTableSize(m));
        }
        Ok(())
    }

    fn check_service_spec(&self, spec: &ServiceSpec) -> Result<(), ControlError> {
        Self::check_service_alone(spec)?;
        if self.services.contains_key(&spec.name) {
            return Err(ControlError::ServiceExists(spec.name.clone()));
        }
        if let Some(other) = self.services.values().find(|s| s.spec.vip == spec.vip) {
            return Err(ControlError::VipInUse(spec.vip, other.spec.name.clone()));
        }
        Ok(())
    }

    /// The checks `set_backends` makes, without writing anything.
    pub fn check_backends(spec: &ServiceSpec, backends: &[BackendSpec]) -> Result<(), ControlError> {
        let mut seen = BTreeSet::new();
        for b in backends {
            if !seen.insert(b.addr) {
                return Err(ControlError::DuplicateBackend(b.addr, spec.name.clone()));
            }
            Self::check_backend(spec, b)?;
        }
        Ok(())
    }

    /// One backend of `spec` on its own (duplicates are `check_backends`'s).
    pub fn check_backend(spec: &ServiceSpec, b: &BackendSpec) -> Result<(), ControlError> {
        check_backend_addr(&spec.vip, b.addr)?;
        if b.weight > MAX_WEIGHT {
            return Err(ControlError::BadWeight(b.weight));
        }
        if spec.mode == Mode::DsrL2 {
            if b.mac.is_none() {
                return Err(ControlError::MacRequired(b.addr, spec.name.clone()));
            }
            if b.addr.is_ipv4() != spec.vip.addr.is_ipv4() {
                return Err(ControlError::FamilyMismatch(b.addr));
            }
        }
        Ok(())
    }

    /// Adds a service with its initial backends (possibly none: then it drops, counted).
    pub fn add_service(&mut self, spec: ServiceSpec, backends: Vec<BackendSpec>) -> Result<(), ControlError> {
        self.check_service_spec(&spec)?;
        Self::check_backends(&spec, &backends)?;
        let id = *self.free_service_ids.iter().next().ok_or(ControlError::TooManyServices)?;
        self.settle();
        // The address maps first: a bloom bit without its VIP costs one lookup
        // (pass_no_service); a VIP without its bit would have its traffic passed.
        if let Err(e) = self.write_addr_maps(None, Some(spec.vip.addr)) {
            self.restore_addr_maps();
            return Err(e.into());
        }
        let mut svc = Service { id, spec: spec.clone(), backends: Vec::new(), active_slot: 1, before: Vec::new(), former: Vec::new(), window_until: None };
        // Slot 1 is "active" but unreferenced until the VIP exists; the first commit
        // writes slot 0 and creates the VIP pointing at it.
        if let Err(e) = self.commit_backends(&mut svc, backends, true) {
            self.restore_addr_maps();
            return Err(e);
        }
        self.free_service_ids.remove(&id);
        self.services.insert(spec.name.clone(), svc);
        Ok(())
    }

    pub fn remove_service(&mut self, name: &str) -> Result<(), ControlError> {
        let svc = self.services.get(name).ok_or_else(|| ControlError::UnknownService(name.to_string()))?.clone();
        self.settle();
        // The address maps without it first (its traffic passes from here on, as it
        // will once the VIP is gone); on failure put them back.
        if let Err(e) = self.write_addr_maps(Some(name), None) {
            self.restore_addr_maps();
            return Err(e.into());
        }
        // The commit point.
        if let Err(e) = self.w.delete_vip(&svc.spec.vip.key()) {
            self.restore_addr_maps();
            return Err(e.into());
        }
        self.services.remove(name);
        self.free_service_ids.insert(svc.id);
        // The VIP is gone, so no lookup reaches these entries any more: a failed
        // invalidation is owed (retried by `settle`), not a failed removal.
        for b in svc.backends.into_iter().chain(svc.former) {
            match self.w.put_backend(b.id, &BackendValue::default()) {
                Ok(()) => self.free_backend_ids.push_back(b.id),
                Err(_) => self.pending_invalid.push(b.id),
            }
        }
        Ok(())
    }

    /// Replaces a service's backend set atomically.
    pub fn set_backends(&mut self, name: &str, backends: Vec<BackendSpec>) -> Result<(), ControlError> {
        let mut svc = self.services.get(name).ok_or_else(|| ControlError::UnknownService(name.to_string()))?.clone();
        Self::check_backends(&svc.spec, &backends)?;
        self.settle();
        let r = self.commit_backends(&mut svc, backends, false);
        // On error `svc` holds what the datapath has (unchanged, or gone forward
        // when an undo failed): the model follows it either way.
        self.services.insert(name.to_string(), svc);
        r
    }

    pub fn add_backend(&mut self, name: &str, b: BackendSpec) -> Result<(), ControlError> {
        let mut set = self.backend_specs(name)?;
        if set.iter().any(|x| x.addr == b.addr) {
            return Err(ControlError::DuplicateBackend(b.addr, name.to_string()));
        }
        set.push(b);
        self.set_backends(name, set)
    }

    pub fn remove_backend(&mut self, name: &str, addr: IpAddr) -> Result<(), ControlError> {
        let mut set = self.backend_specs(name)?;
        let before = set.len();
        set.retain(|x| x.addr != addr);
        if set.len() == before {
            return Err(ControlError::UnknownBackend(addr, name.to_string()));
        }
        self.set_backends(name, set)
    }

    /// Weight 0 drains: the backend leaves the table, its flows stay.
    pub fn set_weight(&mut self, name: &str, addr: IpAddr, weight: u32) -> Result<(), ControlError> {
        let mut set = self.backend_specs(name)?;
        let b = set.iter_mut().find(|x| x.addr == addr).ok_or_else(|| ControlError::UnknownBackend(addr, name.to_string()))?;
        b.weight = weight;
        self.set_backends(name, set)
    }

    fn backend_specs(&self, name: &str) -> Result<Vec<BackendSpec>, ControlError> {
        let svc = self.services.get(name).ok_or_else(|| ControlError::UnknownService(name.to_string()))?;
        Ok(svc.backends.iter().map(|b| b.spec).collect())
    }

    /// `svc`'s VIPS value with `slot` live.
    fn vip_value(svc: &Service, slot: u32) -> VipValue {
        let flags = if svc.spec.flow_table { 0 } else { VIP_F_NO_FLOW_TABLE };
        VipValue { service_id: svc.id, mode: svc.spec.mode.datapath(), active_slot: slot, table_size: svc.spec.table_size, flags }
    }

    /// Turns a service's flow table on or off in place: one VIPS update, so every
    /// packet sees the old or the new setting, and tables, backends and slots stay.
    /// Turning it off leaves the recorded flows to age out of the LRU unread; turning
    /// it on records flows from their next packet on.
    pub fn set_flow_table(&mut self, name: &str, on: bool) -> Result<(), ControlError> {
        let mut next = self.services.get(name).ok_or_else(|| ControlError::UnknownService(name.to_string()))?.clone();
        if next.spec.flow_table == on {
            return Ok(());
        }
        next.spec.flow_table = on;
        check_flow_table(&next.spec)?;
        self.settle();
        self.w.put_vip(&next.spec.vip.key(), &Self::vip_value(&next, next.active_slot))?;
        self.services.insert(name.to_string(), next);
        Ok(())
    }

    /// The entry of a backend in `svc`'s table (valid; a hop too in gue mode).
    fn backend_value(svc: &Service, b: &BackendSpec) -> BackendValue {
        let mut v = Self::hop_value(svc, b);
        v.flags |= BACKEND_F_VALID;
        if !matches!(svc.spec.mode, Mode::Gue { .. }) {
            v.flags &= !BACKEND_F_HOP;
        }
        v
    }

    /// The entry of a former backend of a gue service: a hop, not a flow's backend.
    fn hop_value(svc: &Service, b: &BackendSpec) -> BackendValue {
        let mut flags = BACKEND_F_HOP;
        if b.addr.is_ipv6() {
            flags |= BACKEND_F_V6;
        }
        if b.mac.is_some() {
            flags |= BACKEND_F_HAS_MAC;
        }
        BackendValue { addr: addr_words(b.addr), flags, service_id: svc.id, mac: b.mac.unwrap_or_default(), _pad: [0; 2] }
    }

    /// Steps 1-4 of the commit protocol for `svc` (updated in place on success). On
    /// error `svc` and the datapath are as before, or, if an undo write failed too,
    /// `svc` is what the datapath now has (see the module doc).
    fn commit_backends(&mut self, svc: &mut Service, specs: Vec<BackendSpec>, create_vip: bool) -> Result<(), ControlError> {
        let gue = matches!(svc.spec.mode, Mode::Gue { .. });
        let now = Instant::now();
        let window_open = gue && svc.window_until.is_some_and(|t| now < t);
        // The set the secondaries refer to (module doc): kept while the window is open.
        let before_set: Vec<Backend> = if !gue {
            Vec::new()
        } else if window_open {
            svc.before.clone()
        } else {
            svc.backends.clone()
        };
        // Ids: keep a backend's id across changes (its flows stay valid), a former
        // backend's when it comes back, allocate new.
        let mut ids = self.free_backend_ids.clone();
        let mut next: Vec<Backend> = Vec::with_capacity(specs.len());
        let mut fresh = Vec::new();
        for spec in specs {
            let id = match svc.backends.iter().chain(&svc.former).find(|b| b.spec.addr == spec.addr) {
                Some(b) => b.id,
                None => {
                    let id = ids.pop_front().ok_or(ControlError::TooManyBackends)?;
                    fresh.push(id);
                    id
                }
            };
            next.push(Backend { spec, id });
        }
        next.sort_by_key(|b| b.spec.addr);
        let former: Vec<Backend> = before_set.iter().filter(|b| !next.iter().any(|n| n.spec.addr == b.spec.addr)).cloned().collect();

        let maglev_set = |bs: &[Backend]| bs.iter().map(|b| MaglevBackend { addr: addr_bytes(b.spec.addr), weight: b.spec.weight, id: b.id }).collect::<Vec<_>>();
        let live = maglev_set(&next);
        let table: Vec<TableEntry> = if gue {
            maglev::build_entries(&live, &maglev_set(&before_set), svc.spec.table_size)
        } else {
            maglev::build(&live, svc.spec.table_size).map(|t| t.into_iter().map(|primary| TableEntry { primary, secondary: NO_BACKEND }).collect())
        }
        .map_err(|e| match e {
            maglev::MaglevError::NotPrime(m) => ControlError::BadTableSize(m),
            maglev::MaglevError::DuplicateBackend(_) => ControlError::DuplicateBackend(next[0].spec.addr, svc.spec.name.clone()),
        })?;
        let idle = 1 - svc.active_slot;
        let vip = Self::vip_value(svc, idle);
        let old_vip = VipValue { active_slot: svc.active_slot, ..vip };
        // What each entry held before (None: a fresh id, unreferenced).
        let before = |id: u32| svc.backends.iter().find(|b| b.id == id).map(|b| Self::backend_value(svc, &b.spec));

        let mut written: Vec<u32> = Vec::new();
        let prepared = (|| -> Result<(), MapWriteError> {
            if create_vip {
                self.w.clear_service_stats(svc.id)?;
            }
            for id in &fresh {
                self.w.clear_backend_stats(*id)?;
            }
            for b in &next {
                self.w.put_backend(b.id, &Self::backend_value(svc, &b.spec))?;
                written.push(b.id);
            }
            self.w.put_table(svc.id, idle, &table)?;
            self.w.put_vip(&svc.spec.vip.key(), &vip)
        })();
        if let Err(e) = prepared {
            // The flip did not happen: the live table still names the old entries.
            self.restore_entries(&written, &before);
            return Err(e.into());
        }
        // Committed: the datapath uses the new table. Removed backends' entries are
        // invalidated so their flows re-steer; in gue mode those of `before` become
        // hops only (formers), and formers no longer needed are invalidated.
        let removed: Vec<Backend> = svc.backends.iter().filter(|b| !next.iter().any(|n| n.id == b.id)).cloned().collect();
        let dropped_formers: Vec<u32> =
            svc.former.iter().filter(|b| !next.iter().any(|n| n.id == b.id) && !former.iter().any(|f| f.id == b.id)).map(|b| b.id).collect();
        let mut invalidated = Vec::new();
        let mut made_hops = Vec::new();
        let mut failed = None;
        for b in &removed {
            let is_former = former.iter().any(|f| f.id == b.id);
            let v = if is_former { Self::hop_value(svc, &b.spec) } else { BackendValue::default() };
            match self.w.put_backend(b.id, &v) {
                Ok(()) if is_former => made_hops.push(b.id),
                Ok(()) => invalidated.push(b.id),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let Some(e) = failed else {
            svc.backends = next;
            svc.active_slot = idle;
            if gue {
                // Only a change that takes connections' backends away (removed, or
                // drained) opens a window; additions alone (a service's first backends
                // arriving one by one) keep the one-step rule.
                if !window_open {
                    let shrinks = before_set.iter().any(|b| {
                        svc.backends.iter().find(|n| n.spec.addr == b.spec.addr).is_none_or(|n| n.spec.weight == 0 && b.spec.weight > 0)
                    });
                    svc.window_until = shrinks.then_some(now + SECOND_CHANCE_WINDOW);
                }
                svc.before = before_set;
                svc.former = former;
            }
            self.free_backend_ids.retain(|id| !fresh.contains(id));
            self.free_backend_ids.extend(invalidated);
            // The new table no longer names these: a failed write is owed.
            for id in dropped_formers {
                match self.w.put_backend(id, &BackendValue::default()) {
                    Ok(()) => self.free_backend_ids.push_back(id),
                    Err(_) => self.pending_invalid.push(id),
                }
            }
            return Ok(());
        };
        // Undo: the old table (intact in the old slot) may only go live again once
        // every entry it names is valid again.
        let revalidated = invalidated.iter().chain(&made_hops).all(|&id| before(id).is_some_and(|v| self.w.put_backend(id, &v).is_ok()));
        if revalidated && self.w.put_vip(&svc.spec.vip.key(), &old_vip).is_ok() {
            self.restore_entries(&written, &before);
            return Err(e.into());
        }
        // An undo write failed too: go forward to what the datapath has, the new
        // table live; what is left to invalidate is owed.
        svc.backends = next;
        svc.active_slot = idle;
        self.free_backend_ids.retain(|id| !fresh.contains(id));
        for b in removed {
            self.pending_invalid.push(b.id);
        }
        Err(e.into())
    }

    /// After a flip that did not happen (or was undone): fresh entries cleared, kept
    /// ones back to their old value. A fresh entry that cannot be cleared is owed an
    /// invalidation and not reused until then.
    fn restore_entries(&mut self, written: &[u32], before: &dyn Fn(u32) -> Option<BackendValue>) {
        for &id in written {
            match before(id) {
                Some(v) => {
                    let _ = self.w.put_backend(id, &v);
                }
                None => {
                    if self.w.put_backend(id, &BackendValue::default()).is_err() {
                        self.free_backend_ids.retain(|&x| x != id);
                        self.pending_invalid.push(id);
                    }
                }
            }
        }
    }

    /// The VIP address maps for the services, without `skip`, with `add`.
    fn write_addr_maps(&mut self, skip: Option<&str>, add: Option<IpAddr>) -> Result<(), MapWriteError> {
        let mut bloom = VipBloom::default();
        let mut addrs = BTreeMap::new();
        let vips = self.services.iter().filter(|(n, _)| Some(n.as_str()) != skip).map(|(_, s)| s.spec.vip.addr);
        for a in vips.chain(add) {
            bloom.set(a);
            *addrs.entry(addr_words(a)).or_insert(0u32) += 1;
        }
        self.w.put_bloom(&bloom)?;
        self.w.put_vip_addrs(&addrs)
    }

    /// The address maps back to the services as they are; if that fails too, owed.
    fn restore_addr_maps(&mut self) {
        if self.write_bloom().is_err() {
            self.addr_maps_dirty = true;
        }
    }

    /// The VIP address maps: the bloom prefilter and the exact set (echo replies).
    fn write_bloom(&mut self) -> Result<(), MapWriteError> {
        self.write_addr_maps(None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::MemMaps;
    use lb_common::{FlowKey, NO_BACKEND};

    fn svc(name: &str, vip: &str, mode: Mode) -> ServiceSpec {
        ServiceSpec { name: name.into(), vip: vip.parse().unwrap(), mode, table_size: 251, flow_table: true }
    }

    fn be(addr: &str, weight: u32) -> BackendSpec {
        BackendSpec { addr: addr.parse().unwrap(), weight, mac: Some([2, 0, 0, 0, 0, 1]) }
    }

    fn cp() -> ControlPlane<MemMaps> {
        ControlPlane::new(MemMaps::default())
    }

    #[test]
    fn vip_parses_and_prints() {
        let v: Vip = "10.0.0.100:80/tcp".parse().unwrap();
        assert_eq!(v.to_string(), "10.0.0.100:80/tcp");
        let v6: Vip = "[2001:db8::1]:0/udp".parse().unwrap();
        assert_eq!(v6.to_string(), "[2001:db8::1]:0/udp");
        assert!("10.0.0.100:80".parse::<Vip>().unwrap_err().contains("expected"));
        assert!("10.0.0.100:80/sctp".parse::<Vip>().unwrap_err().contains("sctp"));
        assert!("10.0.0.300:80/tcp".parse::<Vip>().unwrap_err().contains("bad address"));
    }

    #[test]
    fn gue_removed_backend_stays_a_hop_and_the_old_owners_stay_secondaries() {
        let mut c = cp();
        let bs: Vec<_> = (1..=5).map(|i| be(&format!("10.1.0.{i}"), 1)).collect();
        c.add_service(svc("g", "10.0.0.100:80/tcp", Mode::Gue { port: 6080 }), bs).unwrap();
        let key = |c: &ControlPlane<MemMaps>| {
            let v = c.services["g"].clone();
            c.writer().pairs[&(v.id, v.active_slot)].clone()
        };
        let t0 = key(&c);
        assert!(t0.iter().all(|e| e.secondary != NO_BACKEND && e.secondary != e.primary), "secondaries drawn at creation");
        let gone = c.backend_id("g", "10.1.0.3".parse().unwrap()).unwrap();
        c.remove_backend("g", "10.1.0.3".parse().unwrap()).unwrap();
        let v = c.writer().backends[&gone];
        assert_eq!(v.flags & (BACKEND_F_VALID | BACKEND_F_HOP), BACKEND_F_HOP, "a former backend: a hop, not a flow's backend");
        c.add_backend("g", be("10.1.0.9", 1)).unwrap();
        let t2 = key(&c);
        for (i, (a, b)) in t0.iter().zip(&t2).enumerate() {
            assert_ne!(b.primary, gone);
            if a.primary != b.primary {
                assert_eq!(b.secondary, a.primary, "slot {i}: the owner before the window is the secondary");
            }
        }
        assert!(t2.iter().any(|e| e.secondary == gone));
        // Back again: its id and a valid entry; no longer a former.
        c.add_backend("g", be("10.1.0.3", 1)).unwrap();
        assert_eq!(c.backend_id("g", "10.1.0.3".parse().unwrap()), Some(gone));
        assert!(c.writer().backends[&gone].flags & BACKEND_F_VALID != 0);
        // Removing the service frees the former ids too.
        c.remove_backend("g", "10.1.0.1".parse().unwrap()).unwrap();
        let f = c.backend_id("g", "10.1.0.2".parse().unwrap()).unwrap();
        c.remove_service("g").unwrap();
        assert!(c.writer().backends.values().all(|v| v.flags == 0), "{f}");
        // ipip: no secondaries, no hop flag.
        c.add_service(svc("i", "10.0.0.101:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1), be("10.1.0.2", 1)]).unwrap();
        let v = c.services["i"].clone();
        assert!(c.writer().pairs[&(v.id, v.active_slot)].iter().all(|e| e.secondary == NO_BACKEND));
        assert!(c.writer().backends.values().all(|b| b.flags & BACKEND_F_HOP == 0));
    }

    #[test]
    fn gue_mode_parses_prints_and_carries_its_port() {
        assert_eq!("gue".parse::<Mode>().unwrap(), Mode::Gue { port: gue::DEFAULT_PORT });
        assert_eq!("gue:7000".parse::<Mode>().unwrap(), Mode::Gue { port: 7000 });
        for m in ["ipip", "dsr-l2", "gue", "gue:7000"] {
            assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
        }
        assert_eq!("gue:6080".parse::<Mode>().unwrap().to_string(), "gue");
        for bad in ["gue:0", "gue:65536", "gue:", "gue:x"] {
            assert!(bad.parse::<Mode>().unwrap_err().contains("1-65535"), "{bad}");
        }
        let mut c = cp();
        c.add_service(svc("g", "10.0.0.100:80/tcp", Mode::Gue { port: 7000 }), vec![be("10.1.0.1", 1)]).unwrap();
        let v = c.writer().vips[&VipKey::new("10.0.0.100".parse().unwrap(), 80, PROTO_TCP)];
        assert_eq!((v.mode & lb_common::MODE_MASK, v.mode >> 16), (MODE_GUE, 7000));
        assert_eq!(Mode::Gue { port: 1 }.outer_len(false), Some(52));
        assert_eq!(Mode::Gue { port: 1 }.outer_len(true), Some(72));
    }

    /// Issue 15 item 4: `flow_table = "off"` is VIP_F_NO_FLOW_TABLE in the VIP's
    /// flags from the first commit on, through backend changes, and a flip is one VIP
    /// write that keeps the table, slot and backends.
    #[test]
    fn flow_table_off_is_the_vip_flag_and_flips_in_one_write() {
        let mut c = cp();
        let key = VipKey::new("10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
        let g = ServiceSpec { flow_table: false, ..svc("g", "10.0.0.100:80/tcp", Mode::Gue { port: 6080 }) };
        c.add_service(g, vec![be("10.1.0.1", 1), be("10.1.0.2", 1)]).unwrap();
        assert_eq!(c.writer().vips[&key].flags, VIP_F_NO_FLOW_TABLE);
        c.add_backend("g", be("10.1.0.3", 1)).unwrap();
        let v = c.writer().vips[&key];
        assert_eq!((v.flags, v.active_slot), (VIP_F_NO_FLOW_TABLE, 1), "a backend change keeps the flag");
        assert!(!c.service("g").unwrap().spec.flow_table);

        let (writes, tables, backends) = (c.writer().writes, c.writer().pairs.clone(), c.writer().backends.clone());
        c.set_flow_table("g", true).unwrap();
        assert_eq!(c.writer().writes, writes + 1, "one VIPS update");
        assert_eq!(c.writer().vips[&key], VipValue { flags: 0, ..v });
        assert_eq!((&c.writer().pairs, &c.writer().backends), (&tables, &backends));
        assert!(c.service("g").unwrap().spec.flow_table);
        c.set_flow_table("g", true).unwrap();
        assert_eq!(c.writer().writes, writes + 1, "already on: nothing written");
        c.set_flow_table("g", false).unwrap();
        assert_eq!(c.writer().vips[&key], v);

        // A failed write changes neither the datapath nor the model.
        c.writer_mut().fail_after = Some(0);
        c.set_flow_table("g", true).unwrap_err();
        c.writer_mut().fail_after = None;
        assert_eq!((c.writer().vips[&key], c.service("g").unwrap().spec.flow_table), (v, false));

        // Off only where second chance stands in: gue, TCP.
        c.add_service(svc("i", "10.0.0.101:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1)]).unwrap();
        let writes = c.writer().writes;
        let e = c.set_flow_table("i", false).unwrap_err().to_string();
        assert!(e.contains("needs mode gue (this service is ipip)"), "{e}");
        let e = c.add_service(ServiceSpec { flow_table: false, ..svc("u", "10.0.0.102:53/udp", Mode::Gue { port: 6080 }) }, vec![]).unwrap_err().to_string();
        assert!(e.contains("TCP services only"), "{e}");
        let e = c.add_service(ServiceSpec { flow_table: false, ..svc("d", "10.0.0.103:80/tcp", Mode::DsrL2) }, vec![]).unwrap_err().to_string();
        assert!(e.contains("needs mode gue"), "{e}");
        assert_eq!(c.writer().writes, writes, "refusals write nothing");
        assert_eq!(c.writer().vips[&VipKey::new("10.0.0.101".parse().unwrap(), 80, PROTO_TCP)].flags, 0);
    }

    #[test]
    fn add_service_writes_table_vip_and_bloom() {
        let mut c = cp();
        c.add_service(svc("web", "10.0.0.100:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1), be("10.1.0.2", 1)]).unwrap();
        let m = c.writer();
        let key = VipKey::new("10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
        let v = m.vips[&key];
        assert_eq!((v.service_id, v.active_slot, v.table_size, v.mode), (0, 0, 251, MODE_IPIP));
        assert!(m.bloom.contains("10.0.0.100".parse().unwrap()));
        assert_eq!(m.vip_addrs.get(&addr_words("10.0.0.100".parse().unwrap())), Some(&1));
        let t = &m.tables[&(0, 0)];
        let ids: BTreeSet<u32> = t.iter().copied().collect();
        assert_eq!(ids, BTreeSet::from([0, 1]));
        assert!(m.backends[&0].flags & BACKEND_F_VALID != 0);
    }

    #[test]
    fn invalid_input_changes_nothing() {
        let mut c = cp();
        c.add_service(svc("web", "10.0.0.100:80/tcp", Mode::DsrL2), vec![be("10.1.0.1", 1)]).unwrap();
        let before = c.writer().clone();
        let errs = [
            c.add_service(svc("web", "10.0.0.101:80/tcp", Mode::Ipip), vec![]).unwrap_err(),
            c.add_service(svc("app", "10.0.0.100:80/tcp", Mode::Ipip), vec![]).unwrap_err(),
            c.add_service(ServiceSpec { table_size: 250, ..svc("x", "10.0.0.9:1/tcp", Mode::Ipip) }, vec![]).unwrap_err(),
            c.add_service(svc("bad name!", "10.0.0.9:1/tcp", Mode::Ipip), vec![]).unwrap_err(),
            c.add_backend("web", be("10.1.0.1", 1)).unwrap_err(),
            c.add_backend("nope", be("10.1.0.9", 1)).unwrap_err(),
            c.add_backend("web", be("10.1.0.9", MAX_WEIGHT + 1)).unwrap_err(),
            c.add_backend("web", BackendSpec { mac: None, ..be("10.1.0.9", 1) }).unwrap_err(),
            c.add_backend("web", be("2001:db8::9", 1)).unwrap_err(),
            c.remove_backend("web", "10.1.0.7".parse().unwrap()).unwrap_err(),
            c.set_weight("web", "10.1.0.7".parse().unwrap(), 3).unwrap_err(),
            c.remove_service("nope").unwrap_err(),
        ];
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        for (m, want) in msgs.iter().zip([
            "already exists", "already used by service \"web\"", "must be a prime", "bad service name",
            "duplicate backend", "unknown service", "out of range", "needs a MAC", "address family",
            "unknown backend", "unknown backend", "unknown service",
        ]) {
            assert!(m.contains(want), "{m:?} should contain {want:?}");
        }
        let after = c.writer();
        assert_eq!(after.writes, before.writes, "no map was written");
        assert_eq!(c.services().len(), 1);
    }

    #[test]
    fn failed_write_before_flip_leaves_everything_as_it_was() {
        let mut c = cp();
        c.add_service(svc("web", "10.0.0.100:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1)]).unwrap();
        let key = VipKey::new("10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
        let vip_before = c.writer().vips[&key];
        // Let the backend write succeed, fail the table write.
        c.writer_mut().fail_after = Some(2);
        let err = c.add_backend("web", be("10.1.0.2", 1)).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        c.writer_mut().fail_after = None;
        assert_eq!(c.writer().vips[&key], vip_before, "VIP still points at the old slot");
        assert_eq!(c.service("web").unwrap().backends.len(), 1);
        // The fresh id was cleared and is still free: the retry gets a working state.
        c.add_backend("web", be("10.1.0.2", 1)).unwrap();
        assert_eq!(c.service("web").unwrap().backends.len(), 2);
    }

    #[test]
    fn change_flips_slot_and_invalidates_removed_backends() {
        let mut c = cp();
        c.add_service(svc("web", "10.0.0.100:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1), be("10.1.0.2", 1)]).unwrap();
        let id1 = c.backend_id("web", "10.1.0.1".parse().unwrap()).unwrap();
        c.remove_backend("web", "10.1.0.1".parse().unwrap()).unwrap();
        let v = c.service("web").unwrap();
        assert_eq!(v.active_slot, 1);
        assert_eq!(c.writer().backends[&id1].flags, 0, "removed backend invalidated");
        assert!(c.writer().tables[&(0, 1)].iter().all(|&x| x != id1));
        // Ids of kept backends do not change (their flows stay valid).
        let id2 = c.backend_id("web", "10.1.0.2".parse().unwrap()).unwrap();
        c.add_backend("web", be("10.1.0.3", 1)).unwrap();
        assert_eq!(c.backend_id("web", "10.1.0.2".parse().unwrap()), Some(id2));
        assert_ne!(c.backend_id("web", "10.1.0.3".parse().unwrap()), Some(id1), "freed ids are reused last");
    }

    #[test]
    fn drain_and_empty_service() {
        let mut c = cp();
        c.add_service(svc("web", "10.0.0.100:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1)]).unwrap();
        c.set_weight("web", "10.1.0.1".parse().unwrap(), 0).unwrap();
        let key = VipKey::new("10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
        let flow = FlowKey::new("192.0.2.1".parse().unwrap(), 1000, "10.0.0.100".parse().unwrap(), 80, PROTO_TCP);
        assert_eq!(c.writer().pick(&key, &flow), Some(NO_BACKEND));
        let id = c.backend_id("web", "10.1.0.1".parse().unwrap()).unwrap();
        assert!(c.writer().backends[&id].flags & BACKEND_F_VALID != 0, "drained backend stays valid");
    }

    #[test]
    fn remove_service_clears_vip_bloom_and_backends() {
        let mut c = cp();
        c.add_service(svc("web", "10.0.0.100:80/tcp", Mode::Ipip), vec![be("10.1.0.1", 1)]).unwrap();
        c.add_service(svc("db", "10.0.0.102:3306/tcp", Mode::Ipip), vec![be("10.3.0.1", 1)]).unwrap();
        c.remove_service("web").unwrap();
        let m = c.writer();
        assert_eq!(m.vips.len(), 1);
        assert!(!m.bloom.contains("10.0.0.100".parse().unwrap()));
        assert!(m.bloom.contains("10.0.0.102".parse().unwrap()));
        assert!(m.backends.values().filter(|b| b.flags != 0).count() == 1);
        // The freed service id is reused.
        c.add_service(svc("web2", "10.0.0.100:80/tcp", Mode::Ipip), vec![]).unwrap();
        assert_eq!(c.service("web2").unwrap().id, 0);
    }
}
