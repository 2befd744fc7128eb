//! The daemon's logic without the kernel: what the operator asked for (`ServiceDef`s),
//! health state, and how each change reaches the datapath through `ControlPlane`.
//! Generic over `MapWriter`, so every rule here is unit-tested without root.
//!
//! Rules:
//! - A change touches only the service it is about: one table rebuilt into the idle
//!   slot, one flip.
//! - A change is validated before anything is written; a rejected change leaves the
//!   model and the maps as they were.
//! - A backend the datapath sees = configured backend, minus drained (weight 0), minus
//!   health-down (weight 0 with `unhealthy = "keep"`, absent with `"reset"`), minus
//!   pending ones: absent until the datapath can reach them (next hop known: configured
//!   MAC, resolved neighbour or, in ipip mode, the gateway MAC) and, with health checks,
//!   until their first check passed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use lb_common::{Counter, MAX_BACKENDS, MAX_SERVICES, Settings, TrafficCounter, reason};
use serde::{Deserialize, Serialize};

use crate::api::{BackendStatsView, BackendView, ReasonView, ServiceStatsView, ServiceView, StatsView, TrafficView};
use crate::control::{BackendSpec, ControlError, ControlPlane, MAX_WEIGHT};
use crate::health::{Target, Tracker};
use crate::maps::{MapWriteError, MapWriter};
use crate::model::{BackendDef, FlowPolicy, Mac, NodeEnv, ServiceDef};

#[derive(Clone, Debug)]
pub struct HealthState {
    pub tracker: Tracker,
    pub last_error: Option<String>,
    pub checks: u64,
}

/// Persisted health of one backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub service: String,
    pub address: IpAddr,
    pub up: bool,
}

/// A change from the CLI.
#[derive(Clone, Debug)]
pub enum Change {
    AddService(ServiceDef),
    RemoveService(String),
    AddBackend { service: String, address: IpAddr, weight: u32, mac: Option<Mac> },
    RemoveBackend { service: String, address: IpAddr },
    SetWeight { service: String, address: IpAddr, weight: u32 },
    Drain { service: String, address: IpAddr },
    Enable { service: String, address: IpAddr },
}

/// What a health result changed, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: String,
    pub address: IpAddr,
    pub up: bool,
    pub detail: String,
}

/// Counters of the running datapath (kernel maps, or a fake in tests).
pub trait CounterSource {
    fn service(&self, id: u32) -> Result<TrafficCounter, MapWriteError>;
    fn backend(&self, id: u32) -> Result<TrafficCounter, MapWriteError>;
    fn reasons(&self) -> Result<Vec<Counter>, MapWriteError>;
}

impl CounterSource for crate::stats::Stats {
    fn service(&self, id: u32) -> Result<TrafficCounter, MapWriteError> {
        crate::stats::Stats::service(self, id)
    }
    fn backend(&self, id: u32) -> Result<TrafficCounter, MapWriteError> {
        crate::stats::Stats::backend(self, id)
    }
    fn reasons(&self) -> Result<Vec<Counter>, MapWriteError> {
        crate::stats::Stats::reasons(self)
    }
}

pub struct Core<W: MapWriter> {
    cp: ControlPlane<W>,
    services: BTreeMap<String, ServiceDef>,
    health: BTreeMap<(String, IpAddr), HealthState>,
    /// Next-hop MACs learnt from the kernel for backends configured without one.
    resolved: BTreeMap<IpAddr, Mac>,
    /// Last failed check of backends still waiting for their first passed one.
    pending_errors: BTreeMap<(String, IpAddr), String>,
    /// Bumped by every applied change.
    pub version: u64,
}

/// Every problem with a whole set of services, each naming the service and key.
pub fn validate_set(defs: &[ServiceDef], env: &NodeEnv) -> Vec<String> {
    let mut errs = Vec::new();
    for d in defs {
        for (_, e) in d.problems(env) {
            errs.push(format!("service {:?}: {e}", d.name));
        }
    }
    errs.extend(validate_across(defs).into_iter().map(|(_, _, e)| e));
    errs
}

/// The problems between services of a set (names, VIPs, capacity), each with the
/// index of the service and the key it is about, if one.
pub fn validate_across(defs: &[ServiceDef]) -> Vec<(Option<usize>, &'static str, String)> {
    let mut errs = Vec::new();
    let mut names = BTreeSet::new();
    let mut vips = BTreeMap::new();
    let mut total = 0usize;
    for (i, d) in defs.iter().enumerate() {
        if !names.insert(d.name.clone()) {
            errs.push((Some(i), "name", format!("service {:?}: defined twice", d.name)));
        }
        if let Some(other) = vips.insert(d.vip, d.name.clone()) {
            errs.push((Some(i), "vip", format!("service {:?}: VIP {} is already used by service {other:?}", d.name, d.vip)));
        }
        total += d.backends.len();
    }
    if defs.len() > MAX_SERVICES as usize {
        errs.push((None, "", format!("{} services: at most {MAX_SERVICES}", defs.len())));
    }
    if total > MAX_BACKENDS as usize {
        errs.push((None, "", format!("{total} backends over all services: the backend table holds {MAX_BACKENDS}")));
    }
    errs
}

impl<W: MapWriter> Core<W> {
    pub fn new(cp: ControlPlane<W>) -> Self {
        Self { cp, services: BTreeMap::new(), health: BTreeMap::new(), resolved: BTreeMap::new(), pending_errors: BTreeMap::new(), version: 0 }
    }

    pub fn control(&self) -> &ControlPlane<W> {
        &self.cp
    }

    pub fn control_mut(&mut self) -> &mut ControlPlane<W> {
        &mut self.cp
    }

    pub fn services(&self) -> Vec<ServiceDef> {
        self.services.values().cloned().collect()
    }

    pub fn service(&self, name: &str) -> Option<&ServiceDef> {
        self.services.get(name)
    }

    /// What validation needs to know about this node (encap sources, MTU).
    pub fn env(&self) -> NodeEnv {
        NodeEnv::from_settings(self.cp.settings())
    }

    pub fn set_settings(&mut self, s: Settings) -> Result<(), ControlError> {
        if *self.cp.settings() != s {
            self.cp.set_settings(s)?;
        }
        Ok(())
    }

    /// None: no health check on this service. A backend not checked yet counts as up
    /// here; `pending` keeps it out of the table until its first check passes.
    fn health_up(&self, def: &ServiceDef, addr: IpAddr) -> Option<bool> {
        def.health.as_ref()?;
        Some(self.health.get(&(def.name.clone(), addr)).is_none_or(|h| h.tracker.up))
    }

    /// Why the datapath cannot use `b` yet, if it cannot: no next hop, or (with health
    /// checks) no passed check so far.
    pub fn pending(&self, def: &ServiceDef, b: &BackendDef) -> Option<&'static str> {
        let gateway = def.mode == crate::control::Mode::Ipip && self.cp.settings().flags & lb_common::SETTINGS_F_HAS_GATEWAY != 0;
        if self.mac_of(b).is_none() && !gateway {
            return Some("next hop unresolved");
        }
        if def.health.is_some() && !self.health.contains_key(&(def.name.clone(), b.address)) {
            return Some("waiting for its first check");
        }
        None
    }

    fn mac_of(&self, b: &BackendDef) -> Option<Mac> {
        b.mac.or_else(|| self.resolved.get(&b.address).copied())
    }

    /// The backends the datapath gets for `def`.
    fn effective(&self, def: &ServiceDef) -> Vec<BackendSpec> {
        def.backends
            .iter()
            .filter_map(|b| {
                let up = self.health_up(def, b.address).unwrap_or(true);
                if !up && def.unhealthy == FlowPolicy::Reset {
                    return None;
                }
                // Not reachable or not checked yet: out until it is.
                if self.pending(def, b).is_some() {
                    return None;
                }
                let mac = self.mac_of(b);
                let weight = if b.drained || !up { 0 } else { b.weight };
                Some(BackendSpec { addr: b.address, weight, mac: mac.map(|m| m.0) })
            })
            .collect()
    }

    pub fn is_resolved(&self, a: IpAddr) -> bool {
        self.resolved.contains_key(&a)
    }

    /// Backends whose MAC comes from the kernel's tables (none configured).
    pub fn addrs_to_resolve(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.services.values().flat_map(|d| d.backends.iter().filter(|b| b.mac.is_none()).map(|b| b.address)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Starts from the MACs a running datapath already uses (adoption), so a restart
    /// does not forward without a next hop until the first resolution round.
    pub fn seed_resolved_from_datapath(&mut self) {
        for v in self.cp.services() {
            for (spec, _) in v.backends {
                if let Some(m) = spec.mac {
                    self.resolved.insert(spec.addr, Mac(m));
                }
            }
        }
    }

    /// New resolution results. An address missing from `found` keeps its last MAC
    /// (idle neighbour entries expire while XDP traffic flows past the kernel).
    /// Rewrites the services whose backends changed; returns their names.
    pub fn set_resolved(&mut self, found: BTreeMap<IpAddr, Mac>) -> Result<Vec<String>, ControlError> {
        // Runs every second: the map writes an earlier failure still owes are retried
        // here too, not only before the next change.
        self.cp.settle();
        let mut changed_addrs = Vec::new();
        for (a, m) in found {
            let prev = self.resolved.insert(a, m);
            if prev != Some(m) {
                changed_addrs.push((a, prev));
            }
        }
        let mut changed = Vec::new();
        if changed_addrs.is_empty() {
            return Ok(changed);
        }
        for d in self.services.values().cloned().collect::<Vec<_>>() {
            if !d.backends.iter().any(|b| b.mac.is_none() && changed_addrs.iter().any(|(a, _)| *a == b.address)) {
                continue;
            }
            let eff = self.effective(&d);
            if self.current(&d.name) != Some(sorted(eff.clone())) {
                if let Err(e) = self.cp.set_backends(&d.name, eff) {
                    // Not applied: forget these results, so the next round finds them
                    // new and tries again, and put back the services already rewritten.
                    for (a, prev) in changed_addrs {
                        match prev {
                            Some(m) => self.resolved.insert(a, m),
                            None => self.resolved.remove(&a),
                        };
                    }
                    for name in changed {
                        if let Some(d) = self.services.get(&name).cloned() {
                            let _ = self.cp.set_backends(&name, self.effective(&d));
                        }
                    }
                    return Err(e);
                }
                changed.push(d.name.clone());
            }
        }
        if !changed.is_empty() {
            self.version += 1;
        }
        Ok(changed)
    }

    /// Next hops from the kernel: a MAC, or None when the next hop is gone (the backend
    /// is pending again). Rewrites the services whose backends changed; returns them.
    pub fn set_next_hops(&mut self, hops: &[(IpAddr, Option<Mac>)]) -> Result<Vec<String>, ControlError> {
        let mut changed_addrs = BTreeSet::new();
        for (a, m) in hops {
            let before = match m {
                Some(m) => self.resolved.insert(*a, *m),
                None => self.resolved.remove(a),
            };
            if before != *m {
                changed_addrs.insert(*a);
            }
        }
        let mut changed = Vec::new();
        if changed_addrs.is_empty() {
            return Ok(changed);
        }
        for d in self.services.values().cloned().collect::<Vec<_>>() {
            if !d.backends.iter().any(|b| b.mac.is_none() && changed_addrs.contains(&b.address)) {
                continue;
            }
            let eff = self.effective(&d);
            if self.current(&d.name) != Some(sorted(eff.clone())) {
                self.cp.set_backends(&d.name, eff)?;
                changed.push(d.name.clone());
            }
        }
        if !changed.is_empty() {
            self.version += 1;
        }
        Ok(changed)
    }

    fn current(&self, name: &str) -> Option<Vec<BackendSpec>> {
        self.cp.service(name).map(|v| v.backends.into_iter().map(|(s, _)| s).collect())
    }

    /// Makes datapath and model match `desired` (start, reload). Only services that
    /// differ are rewritten. Rejected as a whole if any service is invalid.
    pub fn replace_all(&mut self, desired: Vec<ServiceDef>) -> Result<Vec<String>, ControlError> {
        self.replace_all_inner(desired, false)
    }

    /// `replace_all` that rewrites every service even when the model says it matches:
    /// after adopting a running datapath, whose tables the model only approximates.
    /// The same backends and weights give the same table, so no flow moves.
    pub fn replace_all_forced(&mut self, desired: Vec<ServiceDef>) -> Result<Vec<String>, ControlError> {
        self.replace_all_inner(desired, true)
    }

    fn replace_all_inner(&mut self, desired: Vec<ServiceDef>, force: bool) -> Result<Vec<String>, ControlError> {
        let errs = validate_set(&desired, &self.env());
        if !errs.is_empty() {
            return Err(ControlError::Invalid(errs.join("; ")));
        }
        let old = std::mem::take(&mut self.services);
        self.services = desired.into_iter().map(|d| (d.name.clone(), d)).collect();
        match self.sync_all(force) {
            Ok(mut changed) => {
                // A service whose definition changed without touching the datapath
                // (health settings, the unhealthy policy while all are up, a new backend
                // waiting for its next hop or check) is a change too: reported,
                // versioned, and so replicated to the peer.
                for (name, d) in &self.services {
                    if old.get(name) != Some(d) && !changed.contains(name) {
                        changed.push(name.clone());
                    }
                }
                self.prune_health();
                if !changed.is_empty() {
                    self.version += 1;
                }
                Ok(changed)
            }
            Err(e) => {
                // A map write failed midway: put back what was there.
                self.services = old;
                let _ = self.sync_all(false);
                Err(e)
            }
        }
    }

    /// Rewrites every service whose datapath state differs from the model.
    fn sync_all(&mut self, force: bool) -> Result<Vec<String>, ControlError> {
        let mut changed = Vec::new();
        // Removals first, so a VIP can move between services in one change.
        let live: Vec<String> = self.cp.services().into_iter().map(|v| v.spec.name).collect();
        for name in live {
            // A flow_table flip alone keeps the service (one VIP write below).
            let keep = match (self.services.get(&name), self.cp.service(&name)) {
                (Some(d), Some(v)) => d.spec().same_but_flow_table(&v.spec),
                _ => false,
            };
            if !keep {
                self.cp.remove_service(&name)?;
                changed.push(name);
            }
        }
        let defs: Vec<ServiceDef> = self.services.values().cloned().collect();
        for d in &defs {
            let eff = self.effective(d);
            match self.current(&d.name) {
                Some(cur) => {
                    if force || cur != sorted(eff.clone()) {
                        self.cp.set_backends(&d.name, eff)?;
                        changed.push(d.name.clone());
                    }
                    if self.cp.service(&d.name).is_some_and(|v| v.spec.flow_table != d.flow_table.is_on()) {
                        self.cp.set_flow_table(&d.name, d.flow_table.is_on())?;
                        if !changed.contains(&d.name) {
                            changed.push(d.name.clone());
                        }
                    }
                }
                None => {
                    self.cp.add_service(d.spec(), eff)?;
                    if !changed.contains(&d.name) {
                        changed.push(d.name.clone());
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Forgets health of backends that are gone or no longer checked. Record
    /// (`record_health`) relies on it: a health entry means a current backend.
    fn prune_health(&mut self) {
        // One set per checked service: thousands of entries, each looked up once.
        let checked: HashMap<&str, HashSet<IpAddr>> =
            self.services.values().filter(|d| d.health.is_some()).map(|d| (d.name.as_str(), d.backends.iter().map(|b| b.address).collect())).collect();
        let keep = |(s, a): &(String, IpAddr)| checked.get(s.as_str()).is_some_and(|set| set.contains(a));
        self.health.retain(|k, _| keep(k));
        self.pending_errors.retain(|k, _| keep(k));
    }

    /// Applies one CLI change to its service only. Nothing changes on error.
    pub fn apply(&mut self, c: Change) -> Result<(), ControlError> {
        match c {
            Change::AddService(def) => {
                if self.services.contains_key(&def.name) {
                    return Err(ControlError::ServiceExists(def.name));
                }
                def.validate(&self.env())?;
                let eff = self.effective(&def);
                self.cp.add_service(def.spec(), eff)?;
                self.services.insert(def.name.clone(), def);
            }
            Change::RemoveService(name) => {
                if !self.services.contains_key(&name) {
                    return Err(ControlError::UnknownService(name));
                }
                self.cp.remove_service(&name)?;
                self.services.remove(&name);
                self.prune_health();
            }
            Change::AddBackend { service, address, weight, mac } => self.change_service(&service, |d| {
                if d.backend(address).is_some() {
                    return Err(ControlError::DuplicateBackend(address, d.name.clone()));
                }
                d.backends.push(BackendDef { address, weight, mac, drained: false });
                Ok(())
            })?,
            Change::RemoveBackend { service, address } => self.change_service(&service, |d| {
                let n = d.backends.len();
                d.backends.retain(|b| b.address != address);
                if d.backends.len() == n {
                    return Err(ControlError::UnknownBackend(address, d.name.clone()));
                }
                Ok(())
            })?,
            Change::SetWeight { service, address, weight } => self.change_service(&service, |d| {
                if weight > MAX_WEIGHT {
                    return Err(ControlError::BadWeight(weight));
                }
                backend_mut(d, address)?.weight = weight;
                Ok(())
            })?,
            Change::Drain { service, address } => self.change_service(&service, |d| {
                backend_mut(d, address)?.drained = true;
                Ok(())
            })?,
            Change::Enable { service, address } => self.change_service(&service, |d| {
                backend_mut(d, address)?.drained = false;
                Ok(())
            })?,
        }
        self.version += 1;
        Ok(())
    }

    fn change_service(&mut self, name: &str, f: impl FnOnce(&mut ServiceDef) -> Result<(), ControlError>) -> Result<(), ControlError> {
        let mut def = self.services.get(name).cloned().ok_or_else(|| ControlError::UnknownService(name.to_string()))?;
        f(&mut def)?;
        def.validate(&self.env())?;
        let eff = self.effective(&def);
        if self.current(name) != Some(sorted(eff.clone())) {
            self.cp.set_backends(name, eff)?;
        }
        self.services.insert(name.to_string(), def);
        self.prune_health();
        Ok(())
    }

    /// What the health checker should run now.
    pub fn health_targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for d in self.services.values() {
            let Some(h) = &d.health else { continue };
            for b in &d.backends {
                out.push(Target { service: d.name.clone(), addr: b.address, port: h.port(d.vip.port), spec: h.clone(), source: None });
            }
        }
        out
    }

    /// One check result. Returns the transition (and has rebuilt the service's
    /// table) when the backend changes state.
    pub fn health_result(&mut self, t: &Target, r: Result<(), String>) -> Result<Option<HealthEvent>, ControlError> {
        let (mut events, mut errors) = self.health_results(vec![(t.clone(), r)]);
        match errors.pop() {
            Some(e) => Err(e),
            None => Ok(events.pop()),
        }
    }

    /// Many check results at once: the bookkeeping of each, then one table rebuild
    /// per service whose backends changed state (thousands of first checks passing
    /// after a reload cost one rebuild, not one each). A service whose rebuild fails
    /// keeps its old states, so its next results try again.
    pub fn health_results(&mut self, results: Vec<(Target, Result<(), String>)>) -> (Vec<HealthEvent>, Vec<ControlError>) {
        let mut changed: BTreeMap<String, Vec<(HealthEvent, Option<Tracker>)>> = BTreeMap::new();
        for (t, r) in results {
            if let Some(x) = self.record_health(&t, r) {
                changed.entry(t.service.clone()).or_default().push(x);
            }
        }
        let (mut events, mut errors) = (Vec::new(), Vec::new());
        for (name, evs) in changed {
            let Some(eff) = self.services.get(&name).map(|d| self.effective(d)) else { continue };
            match self.cp.set_backends(&name, eff) {
                Ok(()) => {
                    self.version += 1;
                    events.extend(evs.into_iter().map(|(e, _)| e));
                }
                Err(e) => {
                    // Not applied: forget the transitions so the next results try again.
                    for (ev, before) in evs {
                        let key = (name.clone(), ev.address);
                        match before {
                            Some(tr) => {
                                if let Some(h) = self.health.get_mut(&key) {
                                    h.tracker = tr;
                                }
                            }
                            None => {
                                self.health.remove(&key);
                            }
                        }
                    }
                    errors.push(e);
                }
            }
        }
        (events, errors)
    }

    /// The bookkeeping of one result: the transition it makes, if any, with the
    /// tracker before it (None: the backend was pending).
    fn record_health(&mut self, t: &Target, r: Result<(), String>) -> Option<(HealthEvent, Option<Tracker>)> {
        let def = self.services.get(&t.service)?;
        // A result for a target that no longer exists (changed spec, removed backend).
        if def.health.as_ref() != Some(&t.spec) || t.port != t.spec.port(def.vip.port) {
            return None;
        }
        let key = (t.service.clone(), t.addr);
        // A health entry means a current backend (`prune_health`), so the scan of the
        // service's backends is only paid by pending ones.
        if !self.health.contains_key(&key) && def.backend(t.addr).is_none() {
            return None;
        }
        let Some(entry) = self.health.get_mut(&key) else {
            // Pending: a failure keeps it pending (the error is shown); the first pass
            // puts it in the table.
            match r {
                Ok(()) => {
                    self.pending_errors.remove(&key);
                    self.health.insert(key, HealthState { tracker: Tracker::new(true), last_error: None, checks: 1 });
                    let ev = HealthEvent { service: t.service.clone(), address: t.addr, up: true, detail: "first check passed".into() };
                    return Some((ev, None));
                }
                Err(e) => {
                    self.pending_errors.insert(key, e);
                    return None;
                }
            }
        };
        entry.checks += 1;
        let before = entry.tracker;
        let ok = r.is_ok();
        entry.last_error = r.err();
        let up = entry.tracker.record(ok, t.spec.rise, t.spec.fall)?;
        let detail = entry.last_error.clone().unwrap_or_else(|| format!("{} consecutive checks passed", t.spec.rise));
        Some((HealthEvent { service: t.service.clone(), address: t.addr, up, detail }, Some(before)))
    }

    pub fn health_records(&self) -> Vec<HealthRecord> {
        self.health.iter().map(|((s, a), h)| HealthRecord { service: s.clone(), address: *a, up: h.tracker.up }).collect()
    }

    /// Restores persisted health (before `replace_all` at start).
    pub fn restore_health(&mut self, records: &[HealthRecord]) {
        for r in records {
            self.health.insert((r.service.clone(), r.address), HealthState { tracker: Tracker::new(r.up), last_error: None, checks: 0 });
        }
    }

    /// `index`: `ControlPlane::backend_index` of `d`.
    fn backend_view(&self, d: &ServiceDef, b: &BackendDef, index: &HashMap<IpAddr, (u32, bool)>) -> BackendView {
        let h = self.health.get(&(d.name.clone(), b.address));
        let up = self.health_up(d, b.address);
        let pending = self.pending(d, b);
        let (id, in_table) = index.get(&b.address).map_or((None, false), |&(id, t)| (Some(id), t));
        let next_hop = match (b.mac, self.resolved.get(&b.address)) {
            (Some(m), _) => format!("{m} (config)"),
            (None, Some(m)) => format!("{m} (neighbour)"),
            (None, None) if d.mode == crate::control::Mode::Ipip && self.cp.settings().flags & lb_common::SETTINGS_F_HAS_GATEWAY != 0 => {
                "gateway_mac".into()
            }
            (None, None) => "unresolved".into(),
        };
        BackendView {
            service: d.name.clone(),
            address: b.address,
            weight: b.weight,
            mac: b.mac,
            next_hop,
            admin: if b.drained { "drained" } else { "enabled" }.into(),
            health: match up {
                _ if d.health.is_some() && h.is_none() => "pending",
                None => "unchecked",
                Some(true) => "up",
                Some(false) => "down",
            }
            .into(),
            in_table,
            id,
            last_check_error: h.and_then(|h| h.last_error.clone()).or_else(|| self.pending_errors.get(&(d.name.clone(), b.address)).cloned()),
            pending: pending.map(str::to_string),
        }
    }

    pub fn service_view(&self, name: &str) -> Result<ServiceView, ControlError> {
        let d = self.services.get(name).ok_or_else(|| ControlError::UnknownService(name.to_string()))?;
        Ok(ServiceView {
            name: d.name.clone(),
            vip: d.vip.to_string(),
            mode: d.mode.to_string(),
            table_size: d.table_size,
            flow_table: d.flow_table,
            health: d.health.clone(),
            unhealthy: d.unhealthy,
            id: self.cp.service_id(name).unwrap_or(u32::MAX),
            backends: {
                let index = self.cp.backend_index(name);
                d.backends.iter().map(|b| self.backend_view(d, b, &index)).collect()
            },
        })
    }

    pub fn service_views(&self) -> Vec<ServiceView> {
        self.services.keys().filter_map(|n| self.service_view(n).ok()).collect()
    }

    pub fn backend_views(&self, service: Option<&str>) -> Result<Vec<BackendView>, ControlError> {
        if let Some(s) = service
            && !self.services.contains_key(s)
        {
            return Err(ControlError::UnknownService(s.to_string()));
        }
        Ok(self
            .services
            .values()
            .filter(|d| service.is_none_or(|s| s == d.name))
            .flat_map(|d| {
                let index = self.cp.backend_index(&d.name);
                d.backends.iter().map(move |b| self.backend_view(d, b, &index))
            })
            .collect())
    }

    /// Backends not in the table yet because the datapath cannot use them (`pending`).
    pub fn pending_count(&self) -> usize {
        self.services.values().map(|d| d.backends.iter().filter(|b| self.pending(d, b).is_some()).count()).sum()
    }

    /// (up, down, drained) over all backends.
    pub fn backend_counts(&self) -> (usize, usize, usize) {
        let (mut up, mut down, mut drained) = (0, 0, 0);
        for d in self.services.values() {
            for b in &d.backends {
                if b.drained {
                    drained += 1;
                } else if self.health_up(d, b.address) == Some(false) {
                    down += 1;
                } else {
                    up += 1;
                }
            }
        }
        (up, down, drained)
    }

    /// Raw counters (pps is filled in by the caller from two samples).
    pub fn stats(&self, src: &dyn CounterSource) -> Result<StatsView, MapWriteError> {
        let mut services = Vec::new();
        for d in self.services.values() {
            let Some(v) = self.cp.service_id(&d.name) else { continue };
            let index = self.cp.backend_index(&d.name);
            let mut backends = Vec::new();
            for b in &d.backends {
                let bv = self.backend_view(d, b, &index);
                let traffic = match bv.id {
                    Some(id) => traffic(src.backend(id)?),
                    None => TrafficView::default(),
                };
                backends.push(BackendStatsView { address: b.address, health: bv.health, admin: bv.admin, traffic });
            }
            services.push(ServiceStatsView { name: d.name.clone(), vip: d.vip.to_string(), traffic: traffic(src.service(v)?), backends });
        }
        let reasons = src
            .reasons()?
            .iter()
            .enumerate()
            .map(|(i, c)| ReasonView { reason: reason::NAMES.get(i).copied().unwrap_or("unknown").to_string(), packets: c.packets, bytes: c.bytes })
            .collect();
        Ok(StatsView { services, reasons })
    }
}

fn traffic(c: TrafficCounter) -> TrafficView {
    TrafficView { packets: c.packets, bytes: c.bytes, new_flows: c.new_flows, pps: 0.0 }
}

fn sorted(mut v: Vec<BackendSpec>) -> Vec<BackendSpec> {
    v.sort_by_key(|b| b.addr);
    v
}

fn backend_mut(d: &mut ServiceDef, addr: IpAddr) -> Result<&mut BackendDef, ControlError> {
    let name = d.name.clone();
    d.backends.iter_mut().find(|b| b.address == addr).ok_or(ControlError::UnknownBackend(addr, name))
}

/// Fills `pps` in `now` from an earlier sample taken `secs` before.
pub fn fill_pps(now: &mut StatsView, before: &StatsView, secs: f64) {
    if secs <= 0.0 {
        return;
    }
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    for s in &mut now.services {
        let Some(p) = before.services.iter().find(|p| p.name == s.name) else { continue };
        s.traffic.pps = rate(s.traffic.packets, p.traffic.packets);
        for b in &mut s.backends {
            if let Some(pb) = p.backends.iter().find(|pb| pb.address == b.address) {
                b.traffic.pps = rate(b.traffic.packets, pb.traffic.packets);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Mode;
    use crate::health::{HealthKind, HealthSpec};
    use crate::maps::MemMaps;
    use crate::model::FlowTable;
    use lb_common::{FlowKey, NO_BACKEND, PROTO_TCP, VipKey};

    fn def(name: &str, vip: &str, backends: &[(&str, u32)]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            vip: vip.parse().unwrap(),
            mode: Mode::Ipip,
            table_size: 251,
            flow_table: FlowTable::On,
            health: None,
            unhealthy: FlowPolicy::Keep,
            backends: backends.iter().map(|(a, w)| BackendDef { address: a.parse().unwrap(), weight: *w, mac: None, drained: false }).collect(),
        }
    }

    /// With a gateway MAC: ipip backends without one of their own are reachable.
    fn core() -> Core<MemMaps> {
        let mut c = Core::new(ControlPlane::new(MemMaps::default()));
        c.set_settings(Settings {
            gateway_mac: [2, 0, 0, 0, 0, 0xfe],
            flags: lb_common::SETTINGS_F_HAS_GATEWAY,
            encap_src_v4: 0x0500_000a,
            encap_src_v6: [0x20, 0, 0, 0x500],
            mtu: 1500,
            ..Settings::default()
        })
        .unwrap();
        c
    }

    /// Issue 15 item 4: a reload that flips `flow_table` rewrites the VIP's flags in
    /// place (the service, its table, slot and backend ids stay), is reported as a
    /// change, and shows in the service's view.
    #[test]
    fn a_reload_flipping_flow_table_rewrites_the_vip_flags_only() {
        let mut c = core();
        let mac = Some("02:00:00:00:01:01".parse().unwrap());
        let mut g = ServiceDef { mode: Mode::Gue { port: 6080 }, ..def("g", "10.0.0.100:80/tcp", &[("10.0.1.1", 1), ("10.0.1.2", 1)]) };
        for b in &mut g.backends {
            b.mac = mac;
        }
        let web = def("web", "10.0.0.101:80/tcp", &[("10.0.2.1", 1)]);
        c.replace_all(vec![g.clone(), web.clone()]).unwrap();
        let key = VipKey::new(ip("10.0.0.100"), 80, PROTO_TCP);
        let before = c.control().writer().clone();
        assert_eq!(before.vips[&key].flags, 0);
        assert_eq!(c.service_view("g").unwrap().flow_table, FlowTable::On);

        let off = ServiceDef { flow_table: FlowTable::Off, ..g.clone() };
        let changed = c.replace_all(vec![off.clone(), web.clone()]).unwrap();
        assert_eq!(changed, vec!["g".to_string()]);
        let m = c.control().writer();
        assert_eq!(m.writes, before.writes + 1, "one VIPS write");
        assert_eq!(m.vips[&key], lb_common::VipValue { flags: lb_common::VIP_F_NO_FLOW_TABLE, ..before.vips[&key] });
        assert_eq!((&m.pairs, &m.backends), (&before.pairs, &before.backends), "tables and backends untouched");
        assert_eq!(c.service_view("g").unwrap().flow_table, FlowTable::Off);
        assert_eq!(c.service("g"), Some(&off));

        // Flipped back together with a backend change: both land.
        let mut on = g.clone();
        on.backends.push(BackendDef { address: ip("10.0.1.3"), weight: 1, mac, drained: false });
        c.replace_all(vec![on, web.clone()]).unwrap();
        let v = c.control().writer().vips[&key];
        assert_eq!((v.flags, v.active_slot), (0, 1 - before.vips[&key].active_slot));

        // A reload that is refused (off on an ipip service) changes nothing.
        let snapshot = c.control().writer().clone();
        let bad = ServiceDef { flow_table: FlowTable::Off, ..web };
        let e = c.replace_all(vec![off, bad]).unwrap_err().to_string();
        assert!(e.contains("needs mode gue"), "{e}");
        assert_eq!(c.control().writer().vips, snapshot.vips);
        assert_eq!(c.control().writer().writes, snapshot.writes);
    }

    /// Every backend's first check passed (they start pending).
    fn pass_first_checks(c: &mut Core<MemMaps>) {
        for t in c.health_targets() {
            c.health_result(&t, Ok(())).unwrap();
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Backend ids in the live table of `vip`.
    fn table_ids(c: &Core<MemMaps>, vip: &str) -> BTreeSet<u32> {
        let v: crate::control::Vip = vip.parse().unwrap();
        let m = c.control().writer();
        let val = m.vips[&v.key()];
        m.tables[&(val.service_id, val.active_slot)].iter().copied().collect()
    }

    #[test]
    fn replace_all_rewrites_only_what_changed() {
        let mut c = core();
        let web = def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1), ("10.0.1.2", 1)]);
        let db = def("db", "10.0.0.102:3306/tcp", &[("10.0.3.1", 1)]);
        let changed = c.replace_all(vec![web.clone(), db.clone()]).unwrap();
        assert_eq!(changed.len(), 2);
        let writes = c.control().writer().writes;
        assert!(c.replace_all(vec![web.clone(), db.clone()]).unwrap().is_empty(), "same set: nothing rewritten");
        assert_eq!(c.control().writer().writes, writes);
        let mut web2 = web.clone();
        web2.backends.push(BackendDef { address: ip("10.0.1.3"), weight: 1, mac: None, drained: false });
        assert_eq!(c.replace_all(vec![web2, db.clone()]).unwrap(), vec!["web".to_string()]);
        // A VIP moves from one service to a new one in a single reload.
        let moved = def("web-new", "10.0.0.100:80/tcp", &[("10.0.1.9", 1)]);
        let changed = c.replace_all(vec![moved, db]).unwrap();
        assert!(changed.contains(&"web".to_string()) && changed.contains(&"web-new".to_string()));
        assert_eq!(c.services().len(), 2);
    }

    #[test]
    fn invalid_set_is_rejected_whole_and_names_every_problem() {
        let mut c = core();
        c.replace_all(vec![def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1)])]).unwrap();
        let before = c.control().writer().writes;
        let mut bad_weight = def("app", "10.0.0.101:80/tcp", &[("10.0.2.1", 70000)]);
        bad_weight.table_size = 100;
        let dup_vip = def("db", "10.0.0.100:80/tcp", &[]);
        let e = c.replace_all(vec![def("web", "10.0.0.100:80/tcp", &[]), bad_weight, dup_vip]).unwrap_err().to_string();
        assert!(e.contains("\"app\"") && e.contains("prime"), "{e}");
        assert!(e.contains("\"db\"") && e.contains("already used"), "{e}");
        assert_eq!(c.control().writer().writes, before, "nothing written");
        assert_eq!(c.services()[0].backends.len(), 1);
    }

    #[test]
    fn cli_changes_touch_one_service_and_errors_change_nothing() {
        let mut c = core();
        c.replace_all(vec![def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1)]), def("db", "10.0.0.102:3306/tcp", &[("10.0.3.1", 1)])])
            .unwrap();
        let db_slot = c.control().service("db").unwrap().active_slot;
        c.apply(Change::AddBackend { service: "web".into(), address: ip("10.0.1.2"), weight: 5, mac: None }).unwrap();
        assert_eq!(c.control().service("db").unwrap().active_slot, db_slot, "db untouched");
        assert_eq!(c.service("web").unwrap().backends.len(), 2);
        let v = c.version;
        let snapshot = c.control().writer().clone();
        let errs = [
            c.apply(Change::AddBackend { service: "web".into(), address: ip("10.0.1.2"), weight: 1, mac: None }),
            c.apply(Change::AddBackend { service: "nope".into(), address: ip("10.0.1.7"), weight: 1, mac: None }),
            c.apply(Change::AddBackend { service: "web".into(), address: ip("10.0.1.7"), weight: 65536, mac: None }),
            c.apply(Change::SetWeight { service: "web".into(), address: ip("10.0.1.2"), weight: 65536 }),
            c.apply(Change::RemoveBackend { service: "web".into(), address: ip("10.0.1.9") }),
            c.apply(Change::Drain { service: "web".into(), address: ip("10.0.1.9") }),
            c.apply(Change::AddService(def("web", "10.0.0.109:80/tcp", &[]))),
            c.apply(Change::AddService(def("other", "10.0.0.100:80/tcp", &[]))),
            c.apply(Change::RemoveService("nope".into())),
        ];
        let want = [
            "duplicate backend", "unknown service", "out of range", "out of range", "unknown backend", "unknown backend", "already exists",
            "already used", "unknown service",
        ];
        for (e, w) in errs.into_iter().zip(want) {
            let e = e.unwrap_err().to_string();
            assert!(e.contains(w), "{e:?} should contain {w:?}");
        }
        assert_eq!(c.version, v, "no version bump on errors");
        assert_eq!(c.control().writer().writes, snapshot.writes, "no map write on errors");
    }

    #[test]
    fn a_full_backend_table_is_refused_without_change() {
        let mut c = core();
        let addrs: Vec<String> = (0..MAX_BACKENDS).map(|i| format!("10.{}.{}.1", i / 256, i % 256)).collect();
        let bs: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
        let mut d = def("big", "10.0.0.100:80/tcp", &bs);
        d.table_size = 65537;
        c.replace_all(vec![d]).unwrap();
        let writes = c.control().writer().writes;
        let e = c.apply(Change::AddBackend { service: "big".into(), address: ip("192.0.2.1"), weight: 1, mac: None }).unwrap_err();
        assert!(e.to_string().contains("backend table full"), "{e}");
        assert_eq!(c.control().writer().writes, writes, "nothing written");
        assert_eq!(c.service("big").unwrap().backends.len(), MAX_BACKENDS as usize);
        let e = c.replace_all(vec![def("other", "10.0.0.101:80/tcp", &[("192.0.2.9", 1)]), c.services()[0].clone()]).unwrap_err();
        assert!(e.to_string().contains("backend table holds"), "{e}");
    }

    #[test]
    fn drain_keeps_entry_enable_restores() {
        let mut c = core();
        c.replace_all(vec![def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1), ("10.0.1.2", 1)])]).unwrap();
        let id1 = c.control().backend_id("web", ip("10.0.1.1")).unwrap();
        c.apply(Change::Drain { service: "web".into(), address: ip("10.0.1.1") }).unwrap();
        assert!(!table_ids(&c, "10.0.0.100:80/tcp").contains(&id1));
        assert_eq!(c.control().backend_id("web", ip("10.0.1.1")), Some(id1), "entry (and its flows) kept");
        let bv = &c.backend_views(Some("web")).unwrap()[0];
        assert_eq!((bv.admin.as_str(), bv.in_table, bv.weight), ("drained", false, 1));
        c.apply(Change::Enable { service: "web".into(), address: ip("10.0.1.1") }).unwrap();
        assert!(table_ids(&c, "10.0.0.100:80/tcp").contains(&id1));
    }

    fn with_health(mut d: ServiceDef, policy: FlowPolicy) -> ServiceDef {
        d.health = Some(HealthSpec { kind: HealthKind::Tcp, interval_ms: 100, timeout_ms: 50, rise: 2, fall: 2, path: None, port: None, host: None, expect: None });
        d.unhealthy = policy;
        d
    }

    #[test]
    fn health_down_and_up_follow_rise_fall_and_policy() {
        for policy in [FlowPolicy::Keep, FlowPolicy::Reset] {
            let mut c = core();
            c.replace_all(vec![with_health(def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1), ("10.0.1.2", 1)]), policy)]).unwrap();
            assert_eq!(table_ids(&c, "10.0.0.100:80/tcp").len(), 1, "both pending: only NO_BACKEND in the table");
            pass_first_checks(&mut c);
            let targets = c.health_targets();
            assert_eq!(targets.len(), 2);
            let t = targets.iter().find(|t| t.addr == ip("10.0.1.1")).unwrap().clone();
            let id = c.control().backend_id("web", t.addr).unwrap();
            assert_eq!(c.health_result(&t, Err("refused".into())).unwrap(), None, "one failure is not enough (fall 2)");
            let ev = c.health_result(&t, Err("refused".into())).unwrap().expect("down after fall failures");
            assert!(!ev.up && ev.detail.contains("refused"));
            assert!(!table_ids(&c, "10.0.0.100:80/tcp").contains(&id));
            match policy {
                FlowPolicy::Keep => assert_eq!(c.control().backend_id("web", t.addr), Some(id), "keep: entry stays"),
                FlowPolicy::Reset => assert_eq!(c.control().backend_id("web", t.addr), None, "reset: entry invalidated"),
            }
            assert_eq!(c.backend_views(Some("web")).unwrap()[0].health, "down");
            assert_eq!(c.health_result(&t, Ok(())).unwrap(), None);
            assert!(c.health_result(&t, Ok(())).unwrap().unwrap().up);
            assert_eq!(table_ids(&c, "10.0.0.100:80/tcp").len(), 2);
            // Stale results (backend removed) are ignored.
            c.apply(Change::RemoveBackend { service: "web".into(), address: t.addr }).unwrap();
            assert_eq!(c.health_result(&t, Err("x".into())).unwrap(), None);
            assert!(c.health_records().iter().all(|r| r.address != t.addr), "health of a removed backend forgotten");
        }
    }

    #[test]
    fn a_health_settings_only_change_is_a_change() {
        let mut c = core();
        let web = with_health(def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1)]), FlowPolicy::Keep);
        let db = def("db", "10.0.0.102:3306/tcp", &[("10.0.3.1", 1)]);
        c.replace_all(vec![web.clone(), db.clone()]).unwrap();
        let (v, writes) = (c.version, c.control().writer().writes);
        let mut web2 = web.clone();
        web2.health.as_mut().unwrap().interval_ms = 250;
        assert_eq!(c.replace_all(vec![web2.clone(), db.clone()]).unwrap(), vec!["web".to_string()], "reported");
        assert_eq!(c.version, v + 1, "versioned, so the cluster replicates it");
        assert_eq!(c.control().writer().writes, writes, "the datapath had nothing to change");
        assert_eq!(c.health_targets()[0].spec.interval_ms, 250, "the checker gets the new settings");
        // The policy alone, and health removed, likewise.
        let mut web3 = web2.clone();
        web3.unhealthy = FlowPolicy::Reset;
        assert_eq!(c.replace_all(vec![web3.clone(), db.clone()]).unwrap(), vec!["web".to_string()]);
        web3.health = None;
        assert_eq!(c.replace_all(vec![web3, db]).unwrap(), vec!["web".to_string()]);
        assert!(c.health_targets().is_empty());
    }

    #[test]
    fn restored_health_applies_at_start() {
        let mut c = core();
        let d = with_health(def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1), ("10.0.1.2", 1)]), FlowPolicy::Keep);
        c.restore_health(&[HealthRecord { service: "web".into(), address: ip("10.0.1.1"), up: false }]);
        c.replace_all(vec![d]).unwrap();
        let id = c.control().backend_id("web", ip("10.0.1.1")).unwrap();
        assert!(!table_ids(&c, "10.0.0.100:80/tcp").contains(&id));
        assert_eq!(c.backend_counts(), (1, 1, 0));
    }

    #[test]
    fn resolved_macs_reach_the_datapath_and_dsr_waits_for_one() {
        let mut c = core();
        let mut dsr = def("db", "10.0.0.102:3306/tcp", &[("10.0.3.1", 1)]);
        dsr.mode = Mode::DsrL2;
        c.replace_all(vec![def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1)]), dsr]).unwrap();
        assert_eq!(c.control().backend_id("db", ip("10.0.3.1")), None, "dsr-l2 backend without a MAC is left out");
        assert_eq!(c.backend_views(Some("db")).unwrap()[0].next_hop, "unresolved");
        assert_eq!(c.addrs_to_resolve(), vec![ip("10.0.1.1"), ip("10.0.3.1")]);
        let m: Mac = "02:00:00:00:03:01".parse().unwrap();
        let changed = c.set_resolved(BTreeMap::from([(ip("10.0.3.1"), m), (ip("10.0.1.1"), "02:00:00:00:01:01".parse().unwrap())])).unwrap();
        assert_eq!(changed, vec!["db".to_string(), "web".to_string()]);
        let id = c.control().backend_id("db", ip("10.0.3.1")).unwrap();
        assert_eq!(c.control().writer().backends[&id].mac, m.0);
        assert!(c.backend_views(Some("db")).unwrap()[0].next_hop.ends_with("(neighbour)"));
        assert!(c.set_resolved(BTreeMap::new()).unwrap().is_empty(), "a vanished entry keeps its MAC");
        assert!(c.set_resolved(BTreeMap::from([(ip("10.0.3.1"), m)])).unwrap().is_empty(), "same MAC: nothing rewritten");
    }

    #[test]
    fn a_backend_is_pending_until_reachable_and_checked() {
        // No gateway: an ipip backend needs its own next hop.
        let mut c = Core::new(ControlPlane::new(MemMaps::default()));
        c.set_settings(Settings { encap_src_v4: 0x0500_000a, mtu: 1500, ..Settings::default() }).unwrap();
        c.replace_all(vec![with_health(
            def("web", "10.0.0.100:80/tcp", &[]),
            FlowPolicy::Keep,
        )])
        .unwrap();
        let a = ip("10.0.1.3");
        c.apply(Change::AddBackend {
            service: "web".into(),
            address: a,
            weight: 1,
            mac: None,
        })
        .unwrap();
        let v = &c.backend_views(Some("web")).unwrap()[0];
        assert_eq!(
            (v.in_table, v.pending.as_deref(), v.health.as_str()),
            (false, Some("next hop unresolved"), "pending")
        );
        assert_eq!(c.pending_count(), 1);
        let m: Mac = "02:00:00:00:01:03".parse().unwrap();
        assert!(
            c.set_next_hops(&[(a, Some(m))]).unwrap().is_empty(),
            "reachable but unchecked: still out"
        );
        let t = c.health_targets()[0].clone();
        assert_eq!(c.health_result(&t, Err("refused".into())).unwrap(), None);
        let v = &c.backend_views(Some("web")).unwrap()[0];
        assert_eq!(
            (v.in_table, v.pending.as_deref()),
            (false, Some("waiting for its first check"))
        );
        assert_eq!(v.last_check_error.as_deref(), Some("refused"));
        let ev = c
            .health_result(&t, Ok(()))
            .unwrap()
            .expect("first pass: in");
        assert!(ev.up);
        let id = c.control().backend_id("web", a).unwrap();
        assert!(table_ids(&c, "10.0.0.100:80/tcp").contains(&id));
        assert_eq!(c.control().writer().backends[&id].mac, m.0);
        // The next hop disappears: out of the table; back when it returns.
        assert_eq!(
            c.set_next_hops(&[(a, None)]).unwrap(),
            vec!["web".to_string()]
        );
        assert!(
            !table_ids(&c, "10.0.0.100:80/tcp")
                .iter()
                .any(|x| *x != NO_BACKEND)
        );
        assert_eq!(
            c.backend_views(Some("web")).unwrap()[0].pending.as_deref(),
            Some("next hop unresolved")
        );
        assert_eq!(
            c.set_next_hops(&[(a, Some(m))]).unwrap(),
            vec!["web".to_string()]
        );
        assert_eq!(c.pending_count(), 0);
    }

    #[test]
    fn empty_after_all_down_drops_new_flows() {
        let mut c = core();
        c.replace_all(vec![with_health(def("web", "10.0.0.100:80/tcp", &[("10.0.1.1", 1)]), FlowPolicy::Keep)]).unwrap();
        pass_first_checks(&mut c);
        let t = c.health_targets()[0].clone();
        c.health_result(&t, Err("x".into())).unwrap();
        c.health_result(&t, Err("x".into())).unwrap();
        let key = VipKey::new(ip("10.0.0.100"), 80, PROTO_TCP);
        let f = FlowKey::new(ip("192.0.2.1"), 1000, ip("10.0.0.100"), 80, PROTO_TCP);
        assert_eq!(c.control().writer().pick(&key, &f), Some(NO_BACKEND));
    }
}

/// Issue 11 item 4: a map write that fails at any point of any change leaves the
/// datapath and the model as before (or, when the change reports success, as the
/// change wants them), and the live table never names an invalid or foreign entry.
#[cfg(test)]
mod fault_tests {
    use super::*;
    use crate::control::Mode;
    use crate::health::{HealthKind, HealthSpec};
    use crate::maps::MemMaps;
    use crate::model::FlowTable;
    use lb_common::{BACKEND_F_VALID, BackendValue, NO_BACKEND, VipBloom, VipKey, VipValue};

    /// MemMaps failing exactly one write, the `n`th from when it is armed, once.
    #[derive(Clone, Debug, Default)]
    struct FailOnce {
        m: MemMaps,
        countdown: Option<usize>,
        fired: bool,
    }

    impl FailOnce {
        fn tick(&mut self, map: &'static str) -> Result<(), MapWriteError> {
            if let Some(n) = self.countdown {
                if n == 0 {
                    self.countdown = None;
                    self.fired = true;
                    return Err(MapWriteError { map, detail: "injected failure".into() });
                }
                self.countdown = Some(n - 1);
            }
            Ok(())
        }
    }

    impl MapWriter for FailOnce {
        fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapWriteError> {
            self.tick("VIPS")?;
            self.m.put_vip(key, value)
        }
        fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapWriteError> {
            self.tick("VIPS")?;
            self.m.delete_vip(key)
        }
        fn put_bloom(&mut self, bloom: &VipBloom) -> Result<(), MapWriteError> {
            self.tick("VIP_BLOOM")?;
            self.m.put_bloom(bloom)
        }
        fn put_vip_addrs(&mut self, addrs: &BTreeMap<[u32; 4], u32>) -> Result<(), MapWriteError> {
            self.tick("VIP_ADDRS")?;
            self.m.put_vip_addrs(addrs)
        }
        fn put_table(&mut self, service_id: u32, slot: u32, entries: &[lb_common::TableEntry]) -> Result<(), MapWriteError> {
            self.tick("TABLES")?;
            self.m.put_table(service_id, slot, entries)
        }
        fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapWriteError> {
            self.tick("BACKENDS")?;
            self.m.put_backend(id, value)
        }
        fn put_settings(&mut self, settings: &Settings) -> Result<(), MapWriteError> {
            self.tick("SETTINGS")?;
            self.m.put_settings(settings)
        }
        fn clear_service_stats(&mut self, id: u32) -> Result<(), MapWriteError> {
            self.tick("SERVICE_STATS")?;
            self.m.clear_service_stats(id)
        }
        fn clear_backend_stats(&mut self, id: u32) -> Result<(), MapWriteError> {
            self.tick("BACKEND_STATS")?;
            self.m.clear_backend_stats(id)
        }
    }

    /// What the datapath sees, by address (ids may differ after an undo and redo):
    /// per VIP its mode, size and live table as backend addresses; every valid
    /// backend entry with the VIP of its service; the address maps.
    /// (mode, table size, flags, live table as backend addresses).
    type VipView = (u32, u32, u32, Vec<Option<[u32; 4]>>);
    /// (VIP of its service, address, flags, MAC).
    type EntryView = (Option<String>, [u32; 4], u32, [u8; 6]);

    #[derive(Debug, PartialEq)]
    struct View {
        vips: BTreeMap<String, VipView>,
        valid: BTreeSet<EntryView>,
        addrs: BTreeMap<[u32; 4], u32>,
        bloom: VipBloom,
    }

    fn view(m: &MemMaps) -> View {
        let vip_of = |sid: u32| m.vips.iter().find(|(_, v)| v.service_id == sid).map(|(k, _)| format!("{k:?}"));
        let mut vips = BTreeMap::new();
        for (k, v) in &m.vips {
            let t = m.tables.get(&(v.service_id, v.active_slot)).unwrap_or_else(|| panic!("{k:?}: live slot never written"));
            assert_eq!(t.len(), v.table_size as usize);
            let named = t
                .iter()
                .map(|&id| {
                    if id == NO_BACKEND {
                        return None;
                    }
                    let b = m.backends.get(&id).copied().unwrap_or_default();
                    // The invariant: the live table names valid entries of its service.
                    assert!(b.flags & BACKEND_F_VALID != 0, "{k:?}: live slot names invalid backend {id}");
                    assert_eq!(b.service_id, v.service_id, "{k:?}: live slot names backend {id} of another service");
                    Some(b.addr)
                })
                .collect();
            vips.insert(format!("{k:?}"), (v.mode, v.table_size, v.flags, named));
        }
        let valid = m.backends.values().filter(|b| b.flags & BACKEND_F_VALID != 0).map(|b| (vip_of(b.service_id), b.addr, b.flags, b.mac)).collect();
        View { vips, valid, addrs: m.vip_addrs.clone(), bloom: m.bloom }
    }

    fn def(name: &str, vip: &str, backends: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            vip: vip.parse().unwrap(),
            mode: Mode::Ipip,
            table_size: 251,
            flow_table: FlowTable::On,
            health: None,
            unhealthy: FlowPolicy::Keep,
            backends: backends.iter().map(|a| BackendDef { address: a.parse().unwrap(), weight: 1, mac: None, drained: false }).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn base() -> Core<FailOnce> {
        let mut c = Core::new(ControlPlane::new(FailOnce::default()));
        // A gateway, so ipip backends are reachable without a neighbour of their own.
        c.set_settings(Settings {
            encap_src_v4: 0x0500_000a,
            mtu: 1500,
            gateway_mac: [2, 0, 0, 0, 0, 0xfe],
            flags: lb_common::SETTINGS_F_HAS_GATEWAY,
            ..Settings::default()
        })
        .unwrap();
        let mut web = def("web", "10.0.0.100:80/tcp", &["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"]);
        web.backends[3].drained = true;
        web.health = Some(HealthSpec { kind: HealthKind::Tcp, interval_ms: 100, timeout_ms: 50, rise: 1, fall: 1, path: None, port: None, host: None, expect: None });
        web.unhealthy = FlowPolicy::Reset;
        let mut db = def("db", "10.0.0.102:3306/tcp", &["10.0.3.1", "10.0.3.2"]);
        db.backends[0].mac = Some("02:00:00:00:03:01".parse().unwrap());
        let mut g = ServiceDef { mode: Mode::Gue { port: 6080 }, ..def("g", "10.0.0.103:80/tcp", &["10.0.4.1", "10.0.4.2"]) };
        for b in &mut g.backends {
            b.mac = Some("02:00:00:00:04:01".parse().unwrap());
        }
        c.replace_all(vec![web, db, g]).unwrap();
        // Every backend past its first check (new backends start pending).
        for t in c.health_targets() {
            c.health_result(&t, Ok(())).unwrap();
        }
        c
    }

    type Op = Box<dyn Fn(&mut Core<FailOnce>) -> Result<(), ControlError>>;

    fn ops() -> Vec<(&'static str, Op)> {
        let apply = |ch: Change| -> Op { Box::new(move |c: &mut Core<FailOnce>| c.apply(ch.clone())) };
        let w = || "web".to_string();
        vec![
            ("add service", apply(Change::AddService(def("app", "10.0.0.101:8080/tcp", &["10.0.2.1", "10.0.2.2"])))),
            ("remove service", apply(Change::RemoveService("db".into()))),
            // To db: no health checks, so reachable (the gateway) is enough to enter the table.
            ("add backend", apply(Change::AddBackend { service: "db".into(), address: ip("10.0.3.9"), weight: 2, mac: None })),
            ("remove backend", apply(Change::RemoveBackend { service: w(), address: ip("10.0.1.1") })),
            ("set weight", apply(Change::SetWeight { service: w(), address: ip("10.0.1.2"), weight: 7 })),
            ("drain", apply(Change::Drain { service: w(), address: ip("10.0.1.3") })),
            ("enable", apply(Change::Enable { service: w(), address: ip("10.0.1.4") })),
            (
                "reload",
                Box::new(|c: &mut Core<FailOnce>| {
                    // db removed, its VIP moved to a new service, web changed, app added.
                    let mut web = c.service("web").unwrap().clone();
                    web.backends.remove(0);
                    web.backends.push(BackendDef { address: ip("10.0.1.8"), weight: 3, mac: Some("02:00:00:00:01:08".parse().unwrap()), drained: false });
                    let moved = def("db2", "10.0.0.102:3306/tcp", &["10.0.3.2", "10.0.3.7"]);
                    let g = c.service("g").unwrap().clone();
                    c.replace_all(vec![web, moved, g, def("app", "10.0.0.101:8080/tcp", &["10.0.2.1"])]).map(|_| ())
                }),
            ),
            (
                "reload flipping flow_table",
                Box::new(|c: &mut Core<FailOnce>| {
                    // The flip beside a backend change of another service, in one reload.
                    let mut web = c.service("web").unwrap().clone();
                    web.backends.remove(0);
                    let g = ServiceDef { flow_table: FlowTable::Off, ..c.service("g").unwrap().clone() };
                    let db = c.service("db").unwrap().clone();
                    c.replace_all(vec![web, db, g]).map(|_| ())
                }),
            ),
            (
                "neighbour resolution",
                Box::new(|c: &mut Core<FailOnce>| {
                    let m: Mac = "02:00:00:00:01:02".parse().unwrap();
                    c.set_resolved(BTreeMap::from([(ip("10.0.1.2"), m), (ip("10.0.3.2"), m)])).map(|_| ())
                }),
            ),
            (
                "health down (reset)",
                Box::new(|c: &mut Core<FailOnce>| {
                    let t = c.health_targets().into_iter().find(|t| t.addr == ip("10.0.1.2")).unwrap();
                    c.health_result(&t, Err("refused".into())).map(|_| ())
                }),
            ),
        ]
    }

    #[test]
    fn a_write_owed_after_a_removal_is_paid_within_a_resolution_round() {
        let mut c = base();
        let db_ids: Vec<u32> = c.control().service("db").unwrap().backends.iter().map(|(_, id)| *id).collect();
        // Writes of a removal: bloom, addresses, the VIP delete, then one per backend.
        c.control_mut().writer_mut().countdown = Some(3);
        c.apply(Change::RemoveService("db".into())).unwrap();
        assert!(c.control().writer().fired);
        assert_eq!(c.control().owed(), (1, false), "one invalidation owed");
        assert!(c.service("db").is_none() && c.control().writer().m.vips.len() == 2, "the removal itself is done (web and g stay)");
        c.set_resolved(BTreeMap::new()).unwrap();
        assert_eq!(c.control().owed(), (0, false));
        assert!(db_ids.iter().all(|id| c.control().writer().m.backends[id].flags & BACKEND_F_VALID == 0));
    }

    #[test]
    fn a_failed_write_anywhere_in_any_change_applies_fully_or_rolls_back() {
        let mut cases = 0;
        for (name, op) in ops() {
            let mut want = base();
            let start = want.control().writer().m.writes;
            op(&mut want).unwrap_or_else(|e| panic!("{name}: {e}"));
            let writes = want.control().writer().m.writes - start;
            assert!(writes > 0, "{name}");
            let (want_view, want_model) = (view(&want.control().writer().m), want.services());
            for n in 0..=writes {
                let mut c = base();
                let (before_view, before_model) = (view(&c.control().writer().m), c.services());
                c.control_mut().writer_mut().countdown = Some(n);
                let r = op(&mut c);
                let fired = c.control().writer().fired;
                c.control_mut().writer_mut().countdown = None;
                match r {
                    Err(e) => {
                        assert!(fired && e.to_string().contains("injected"), "{name} at write {n}: {e}");
                        assert_eq!(view(&c.control().writer().m), before_view, "{name}, write {n} failed: the datapath changed");
                        assert_eq!(c.services(), before_model, "{name}, write {n} failed: the model changed");
                        assert_eq!(c.control().owed(), (0, false), "{name}, write {n}: one failure, every undo succeeds");
                        // The same change, retried, now goes through.
                        op(&mut c).unwrap_or_else(|e| panic!("{name} retried after write {n}: {e}"));
                    }
                    Ok(()) => {
                        // Reported done with a write owed (invalidating entries no VIP
                        // reaches): paid before the next change.
                        c.control_mut().settle();
                    }
                }
                assert_eq!(view(&c.control().writer().m), want_view, "{name}, write {n} ({})", if fired { "failed" } else { "no failure" });
                assert_eq!(c.services(), want_model, "{name}, write {n}");
                cases += 1;
            }
        }
        assert!(cases > 60, "{cases}");
    }
}
