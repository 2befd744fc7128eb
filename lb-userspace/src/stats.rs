//! Reading the datapath's per-CPU counters (summed over CPUs).

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{Counter, TrafficCounter, map_names, reason};

use crate::maps::MapWriteError;

pub struct Stats {
    reasons: PerCpuArray<MapData, Counter>,
    services: PerCpuArray<MapData, TrafficCounter>,
    backends: PerCpuArray<MapData, TrafficCounter>,
}

fn open<T: aya::Pod>(map: MapData, name: &'static str) -> Result<PerCpuArray<MapData, T>, MapWriteError> {
    PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(|e| MapWriteError { map: name, detail: e.to_string() })
}

/// One per-CPU `Counter` summed over CPUs.
pub fn sum_counters<'a>(per_cpu: impl IntoIterator<Item = &'a Counter>) -> Counter {
    per_cpu.into_iter().fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
}

impl Stats {
    /// Takes the stats maps out of a freshly loaded balancer object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapWriteError> {
        let mut take = |name: &'static str| match ebpf.take_map(name) {
            Some(Map::PerCpuArray(m)) => Ok(m),
            _ => Err(MapWriteError { map: name, detail: "missing or not a per-CPU array".into() }),
        };
        Ok(Self {
            reasons: open(take(map_names::REASON_STATS)?, map_names::REASON_STATS)?,
            services: open(take(map_names::SERVICE_STATS)?, map_names::SERVICE_STATS)?,
            backends: open(take(map_names::BACKEND_STATS)?, map_names::BACKEND_STATS)?,
        })
    }

    /// Opens the stats maps pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapWriteError> {
        let pin = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(|e| MapWriteError { map: name, detail: e.to_string() });
        Ok(Self {
            reasons: open(pin(map_names::REASON_STATS)?, map_names::REASON_STATS)?,
            services: open(pin(map_names::SERVICE_STATS)?, map_names::SERVICE_STATS)?,
            backends: open(pin(map_names::BACKEND_STATS)?, map_names::BACKEND_STATS)?,
        })
    }

    pub fn reason(&self, r: u32) -> Result<Counter, MapWriteError> {
        let v = self.reasons.get(&r, 0).map_err(|e| MapWriteError { map: map_names::REASON_STATS, detail: e.to_string() })?;
        Ok(sum_counters(v.iter()))
    }

    /// Every reason's counter, indexed by reason.
    pub fn reasons(&self) -> Result<Vec<Counter>, MapWriteError> {
        (0..reason::COUNT).map(|r| self.reason(r)).collect()
    }

    fn traffic(map: &PerCpuArray<MapData, TrafficCounter>, name: &'static str, i: u32) -> Result<TrafficCounter, MapWriteError> {
        let v = map.get(&i, 0).map_err(|e| MapWriteError { map: name, detail: e.to_string() })?;
        Ok(v.iter().fold(TrafficCounter::default(), |a, c| TrafficCounter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
            _pad: 0,
        }))
    }

    pub fn service(&self, id: u32) -> Result<TrafficCounter, MapWriteError> {
        Self::traffic(&self.services, map_names::SERVICE_STATS, id)
    }

    pub fn backend(&self, id: u32) -> Result<TrafficCounter, MapWriteError> {
        Self::traffic(&self.backends, map_names::BACKEND_STATS, id)
    }
}
