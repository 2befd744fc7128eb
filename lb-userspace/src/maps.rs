//! Writing the datapath's maps. `MapWriter` is the small seam between the control
//! plane's logic and the kernel: `AyaMaps` writes the real maps, `MemMaps` keeps them in
//! memory (with failure injection) so the control plane is unit-tested without root.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    BACKEND_F_VALID, BackendValue, MAX_BACKENDS, MAX_TABLE_SIZE, Settings, TABLES_ENTRIES, TableEntry, TrafficCounter,
    VipBloom, VipKey, VipValue, map_names, table_index,
};

#[derive(Debug, thiserror::Error)]
#[error("writing map {map}: {detail}")]
pub struct MapWriteError {
    pub map: &'static str,
    pub detail: String,
}

impl MapWriteError {
    fn new(map: &'static str, e: impl std::fmt::Display) -> Self {
        Self { map, detail: e.to_string() }
    }
}

/// What the control plane writes. Every call is one atomic step from the datapath's
/// point of view, except `put_table`, which only ever targets a slot not in use.
pub trait MapWriter {
    fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapWriteError>;
    fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapWriteError>;
    fn put_bloom(&mut self, bloom: &VipBloom) -> Result<(), MapWriteError>;
    /// Makes VIP_ADDRS hold exactly `addrs` (address words -> services on it).
    fn put_vip_addrs(&mut self, addrs: &std::collections::BTreeMap<[u32; 4], u32>) -> Result<(), MapWriteError>;
    /// Writes `entries` (len = the service's table size) into a service's table slot.
    fn put_table(&mut self, service_id: u32, slot: u32, entries: &[TableEntry]) -> Result<(), MapWriteError>;
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapWriteError>;
    fn put_settings(&mut self, settings: &Settings) -> Result<(), MapWriteError>;
    /// Zeroes a service's counters (a freshly allocated id must not show its previous
    /// owner's traffic).
    fn clear_service_stats(&mut self, id: u32) -> Result<(), MapWriteError>;
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), MapWriteError>;
}

/// `TABLES`, mapped into our memory (the map is BPF_F_MMAPABLE): a 65537-entry table
/// is one pass over memory instead of 65537 syscalls. Safe to write a slot while the
/// datapath reads the other one; the slot flip (a syscall on `VIPS`) orders the writes
/// before it. The kernel stores array elements at an 8-byte stride (value size rounded
/// up to 8), so entry i is the u64 i: one (primary, secondary) `TableEntry`.
struct TableMmap {
    ptr: *mut u64,
    len_bytes: usize,
    _map: MapData,
}

// SAFETY: the mapping is owned by this struct and only written through &mut self.
unsafe impl Send for TableMmap {}

impl TableMmap {
    fn new(map: MapData) -> Result<Self, MapWriteError> {
        let page = 4096usize;
        let len_bytes = (TABLES_ENTRIES as usize * 8).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array map fd; checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len_bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(MapWriteError::new(map_names::TABLES, std::io::Error::last_os_error()));
        }
        Ok(Self { ptr: p as *mut u64, len_bytes, _map: map })
    }

    fn write(&mut self, start: u32, entries: &[TableEntry]) {
        assert!(start as usize + entries.len() <= TABLES_ENTRIES as usize);
        // SAFETY: bounds asserted above; the mapping covers TABLES_ENTRIES elements.
        unsafe {
            let dst = self.ptr.add(start as usize);
            for (i, e) in entries.iter().enumerate() {
                // Volatile: the datapath reads this memory concurrently.
                // SAFETY (of the cast): TableEntry is 8 bytes of two u32, repr(C).
                std::ptr::write_volatile(dst.add(i), std::mem::transmute::<TableEntry, u64>(*e));
            }
        }
    }
}

impl Drop for TableMmap {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len_bytes) };
    }
}

/// The kernel maps of one balancer instance.
pub struct AyaMaps {
    vips: BpfHashMap<MapData, VipKey, VipValue>,
    bloom: Array<MapData, VipBloom>,
    vip_addrs: BpfHashMap<MapData, [u32; 4], u32>,
    tables: TableMmap,
    backends: Array<MapData, BackendValue>,
    settings: Array<MapData, Settings>,
    service_stats: PerCpuArray<MapData, TrafficCounter>,
    backend_stats: PerCpuArray<MapData, TrafficCounter>,
}

/// Checks an opened map against lb_common::contract.
fn check_contract(name: &'static str, m: &MapData) -> Result<(), MapWriteError> {
    let spec = lb_common::contract::balancer_map(name).ok_or_else(|| MapWriteError::new(name, "not in the map contract"))?;
    let i = m.info().map_err(|e| MapWriteError::new(name, e))?;
    let ty = i.map_type().map_or(u32::MAX, |t| t as u32);
    let d = spec.differences(ty, i.key_size(), i.value_size(), i.max_entries(), i.map_flags());
    if d.is_empty() { Ok(()) } else { Err(MapWriteError::new(name, d.join("; "))) }
}

/// A second handle on a map of `ebpf` (the stats maps are read by `Stats` too).
fn dup_map(ebpf: &aya::Ebpf, name: &'static str) -> Result<MapData, MapWriteError> {
    let m = match ebpf.map(name) {
        Some(Map::PerCpuArray(m)) => m,
        _ => return Err(MapWriteError::new(name, "missing or not a per-CPU array")),
    };
    let fd = m.fd().as_fd().try_clone_to_owned().map_err(|e| MapWriteError::new(name, e))?;
    MapData::from_fd(fd).map_err(|e| MapWriteError::new(name, e))
}

impl AyaMaps {
    /// Takes the writable maps out of a freshly loaded balancer object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapWriteError> {
        let stats = [dup_map(ebpf, map_names::SERVICE_STATS)?, dup_map(ebpf, map_names::BACKEND_STATS)?];
        let mut take = |name: &'static str| -> Result<MapData, MapWriteError> {
            match ebpf.take_map(name) {
                Some(Map::HashMap(m)) | Some(Map::Array(m)) => Ok(m),
                Some(_) => Err(MapWriteError::new(name, "unexpected map type")),
                None => Err(MapWriteError::new(name, "not in the object")),
            }
        };
        Self::from_data(
            [
                take(map_names::VIPS)?,
                take(map_names::VIP_BLOOM)?,
                take(map_names::VIP_ADDRS)?,
                take(map_names::TABLES)?,
                take(map_names::BACKENDS)?,
                take(map_names::SETTINGS)?,
            ],
            stats,
        )
    }

    /// Opens the maps pinned under `dir` (a running instance). Each must match the map
    /// contract (type, sizes, max_entries, flags): a running datapath of another build
    /// is refused here rather than misread.
    pub fn from_pins(dir: &Path) -> Result<Self, MapWriteError> {
        let open = |name: &'static str| -> Result<MapData, MapWriteError> {
            let m = MapData::from_pin(dir.join(name)).map_err(|e| MapWriteError::new(name, e))?;
            check_contract(name, &m)?;
            Ok(m)
        };
        Self::from_data(
            [
                open(map_names::VIPS)?,
                open(map_names::VIP_BLOOM)?,
                open(map_names::VIP_ADDRS)?,
                open(map_names::TABLES)?,
                open(map_names::BACKENDS)?,
                open(map_names::SETTINGS)?,
            ],
            [open(map_names::SERVICE_STATS)?, open(map_names::BACKEND_STATS)?],
        )
    }

    fn from_data(state: [MapData; 6], stats: [MapData; 2]) -> Result<Self, MapWriteError> {
        let [vips, bloom, vip_addrs, tables, backends, settings] = state;
        let [service_stats, backend_stats] = stats;
        let per_cpu = |m: MapData, name: &'static str| {
            PerCpuArray::try_from(Map::PerCpuArray(m)).map_err(|e| MapWriteError::new(name, e))
        };
        Ok(Self {
            service_stats: per_cpu(service_stats, map_names::SERVICE_STATS)?,
            backend_stats: per_cpu(backend_stats, map_names::BACKEND_STATS)?,
            vips: BpfHashMap::try_from(Map::HashMap(vips)).map_err(|e| MapWriteError::new(map_names::VIPS, e))?,
            bloom: Array::try_from(Map::Array(bloom)).map_err(|e| MapWriteError::new(map_names::VIP_BLOOM, e))?,
            vip_addrs: BpfHashMap::try_from(Map::HashMap(vip_addrs)).map_err(|e| MapWriteError::new(map_names::VIP_ADDRS, e))?,
            tables: TableMmap::new(tables)?,
            backends: Array::try_from(Map::Array(backends)).map_err(|e| MapWriteError::new(map_names::BACKENDS, e))?,
            settings: Array::try_from(Map::Array(settings)).map_err(|e| MapWriteError::new(map_names::SETTINGS, e))?,
        })
    }
}

impl AyaMaps {
    /// Every VIP entry (a running datapath's services).
    pub fn read_vips(&self) -> Result<Vec<(VipKey, VipValue)>, MapWriteError> {
        self.vips.iter().collect::<Result<Vec<_>, _>>().map_err(|e| MapWriteError::new(map_names::VIPS, e))
    }

    /// Every valid backend entry, by id.
    pub fn read_backends(&self) -> Result<Vec<(u32, BackendValue)>, MapWriteError> {
        let mut out = Vec::new();
        for id in 0..MAX_BACKENDS {
            let v = self.backends.get(&id, 0).map_err(|e| MapWriteError::new(map_names::BACKENDS, e))?;
            if v.flags & BACKEND_F_VALID != 0 {
                out.push((id, v));
            }
        }
        Ok(out)
    }

    pub fn read_settings(&self) -> Result<Settings, MapWriteError> {
        self.settings.get(&0, 0).map_err(|e| MapWriteError::new(map_names::SETTINGS, e))
    }

    fn clear(map: &mut PerCpuArray<MapData, TrafficCounter>, name: &'static str, id: u32) -> Result<(), MapWriteError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapWriteError::new(name, e))?;
        let zero = PerCpuValues::try_from(vec![TrafficCounter::default(); cpus]).map_err(|e| MapWriteError::new(name, e))?;
        map.set(id, zero, 0).map_err(|e| MapWriteError::new(name, e))
    }
}

impl MapWriter for AyaMaps {
    fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapWriteError> {
        self.vips.insert(key, value, 0).map_err(|e| MapWriteError::new(map_names::VIPS, e))
    }
    fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapWriteError> {
        self.vips.remove(key).map_err(|e| MapWriteError::new(map_names::VIPS, e))
    }
    fn put_bloom(&mut self, bloom: &VipBloom) -> Result<(), MapWriteError> {
        self.bloom.set(0, bloom, 0).map_err(|e| MapWriteError::new(map_names::VIP_BLOOM, e))
    }
    fn put_vip_addrs(&mut self, addrs: &std::collections::BTreeMap<[u32; 4], u32>) -> Result<(), MapWriteError> {
        let err = |e| MapWriteError::new(map_names::VIP_ADDRS, e);
        // Add first, then remove: an address that stays is never missing.
        for (a, n) in addrs {
            self.vip_addrs.insert(a, n, 0).map_err(err)?;
        }
        let stale: Vec<[u32; 4]> = self.vip_addrs.keys().filter_map(Result::ok).filter(|k| !addrs.contains_key(k)).collect();
        for k in stale {
            self.vip_addrs.remove(&k).map_err(err)?;
        }
        Ok(())
    }
    fn put_table(&mut self, service_id: u32, slot: u32, entries: &[TableEntry]) -> Result<(), MapWriteError> {
        if entries.len() > MAX_TABLE_SIZE as usize {
            return Err(MapWriteError::new(map_names::TABLES, "table larger than MAX_TABLE_SIZE"));
        }
        self.tables.write(table_index(service_id, slot, 0), entries);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapWriteError> {
        self.backends.set(id, value, 0).map_err(|e| MapWriteError::new(map_names::BACKENDS, e))
    }
    fn put_settings(&mut self, settings: &Settings) -> Result<(), MapWriteError> {
        self.settings.set(0, settings, 0).map_err(|e| MapWriteError::new(map_names::SETTINGS, e))
    }
    fn clear_service_stats(&mut self, id: u32) -> Result<(), MapWriteError> {
        Self::clear(&mut self.service_stats, map_names::SERVICE_STATS, id)
    }
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), MapWriteError> {
        Self::clear(&mut self.backend_stats, map_names::BACKEND_STATS, id)
    }
}

/// In-memory maps with the datapath's lookup logic, for tests without root.
#[derive(Default, Debug, Clone)]
pub struct MemMaps {
    pub vips: HashMap<VipKey, VipValue>,
    pub bloom: VipBloom,
    pub vip_addrs: std::collections::BTreeMap<[u32; 4], u32>,
    /// The primaries of each (service, slot) table.
    pub tables: HashMap<(u32, u32), Vec<u32>>,
    /// The whole (primary, secondary) entries of each (service, slot) table.
    pub pairs: HashMap<(u32, u32), Vec<TableEntry>>,
    pub backends: HashMap<u32, BackendValue>,
    pub settings: Settings,
    pub cleared_service_stats: Vec<u32>,
    pub cleared_backend_stats: Vec<u32>,
    /// Fail every write after this many more successful ones (failure injection).
    pub fail_after: Option<usize>,
    pub writes: usize,
}

impl MemMaps {
    fn step(&mut self, map: &'static str) -> Result<(), MapWriteError> {
        if let Some(n) = self.fail_after {
            if n == 0 {
                return Err(MapWriteError::new(map, "injected failure"));
            }
            self.fail_after = Some(n - 1);
        }
        self.writes += 1;
        Ok(())
    }

    /// The backend id the datapath picks for `flow` without a flow-table entry, from the
    /// live table slot of the service `key` names (lb_common::maglev::pick).
    pub fn pick(&self, key: &VipKey, flow: &lb_common::FlowKey) -> Option<u32> {
        let v = self.vips.get(key)?;
        let t = self.tables.get(&(v.service_id, v.active_slot))?;
        Some(lb_common::maglev::pick(t, flow))
    }

    /// The (primary, secondary) pair the datapath reads for `flow` (maglev::pick_pair).
    pub fn pick_pair(&self, key: &VipKey, flow: &lb_common::FlowKey) -> Option<TableEntry> {
        let v = self.vips.get(key)?;
        let t = self.pairs.get(&(v.service_id, v.active_slot))?;
        Some(lb_common::maglev::pick_pair(t, flow))
    }
}

impl MapWriter for MemMaps {
    fn put_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<(), MapWriteError> {
        self.step(map_names::VIPS)?;
        self.vips.insert(*key, *value);
        Ok(())
    }
    fn delete_vip(&mut self, key: &VipKey) -> Result<(), MapWriteError> {
        self.step(map_names::VIPS)?;
        self.vips.remove(key).map(|_| ()).ok_or_else(|| MapWriteError::new(map_names::VIPS, "no such key"))
    }
    fn put_bloom(&mut self, bloom: &VipBloom) -> Result<(), MapWriteError> {
        self.step(map_names::VIP_BLOOM)?;
        self.bloom = *bloom;
        Ok(())
    }
    fn put_vip_addrs(&mut self, addrs: &std::collections::BTreeMap<[u32; 4], u32>) -> Result<(), MapWriteError> {
        self.step(map_names::VIP_ADDRS)?;
        self.vip_addrs = addrs.clone();
        Ok(())
    }
    fn put_table(&mut self, service_id: u32, slot: u32, entries: &[TableEntry]) -> Result<(), MapWriteError> {
        self.step(map_names::TABLES)?;
        self.tables.insert((service_id, slot), entries.iter().map(|e| e.primary).collect());
        self.pairs.insert((service_id, slot), entries.to_vec());
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapWriteError> {
        self.step(map_names::BACKENDS)?;
        self.backends.insert(id, *value);
        Ok(())
    }
    fn put_settings(&mut self, settings: &Settings) -> Result<(), MapWriteError> {
        self.step(map_names::SETTINGS)?;
        self.settings = *settings;
        Ok(())
    }
    fn clear_service_stats(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.step(map_names::SERVICE_STATS)?;
        self.cleared_service_stats.push(id);
        Ok(())
    }
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.step(map_names::BACKEND_STATS)?;
        self.cleared_backend_stats.push(id);
        Ok(())
    }
}
