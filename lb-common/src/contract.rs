//! The map contract: one table declaring every map of the balancer object (name, type,
//! key and value size, `max_entries`, flags, and what a restart does with it). The
//! eBPF side declares its maps with these constants, lbd opens and adopts pinned maps
//! by them (`lb_userspace::pins`), and ARCHITECTURE.md carries the table rendered by
//! [`markdown_table`]. A test in lb-userspace parses the built object and fails when
//! the object, this table or the document disagree.

use core::mem::size_of;

use crate::{
    BackendValue, Counter, FLOW_EVENTS_BYTES, FloodMeter, FlowKey, FlowValue, FragKey, FragValue, MAX_BACKENDS,
    MAX_FLOWS, MAX_FRAGS, MAX_SERVICES, MAX_VIPS, ReplyBucket, Settings, TABLES_ENTRIES, TableEntry, TrafficCounter, VipBloom,
    VipKey, VipValue, map_names as n, reason,
};

/// Version of the pinned maps' layout as a whole, stored in the pinned `LAYOUT` map.
/// Bump it whenever the meaning of a pinned map's content changes without its sizes
/// changing (a new flag bit, a field reinterpreted): the adoption check then refuses
/// pins of another version instead of misreading them.
/// 2: FLOWS with per-CPU LRU lists, Settings with `max_new_flows`, the LAYOUT map.
/// 3: TABLES entries are (primary, secondary) pairs (`TableEntry`), `VipValue::flags`,
/// `BACKEND_F_HOP` (issue 15).
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// `bpf_map_type` values used here (uapi/linux/bpf.h).
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// Map flags used here.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `FLOWS` flags: per-CPU LRU lists (see ARCHITECTURE.md, "Flow table").
pub const FLOWS_FLAGS: u32 = BPF_F_NO_COMMON_LRU;
/// `TABLES` flags: userspace writes whole tables through mmap.
pub const TABLES_FLAGS: u32 = BPF_F_MMAPABLE;

/// What a restart of lbd does with a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Pinned and adopted; another layout refuses the start (reusing it would misread
    /// every entry).
    State,
    /// Pinned and adopted; another layout is replaced by a fresh map (counters restart
    /// from zero).
    Counters,
    /// Created with each load, never pinned (datapath-private or per-process).
    PerLoad,
}

/// One map of the balancer object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub keep: Keep,
    /// One line for ARCHITECTURE.md.
    pub what: &'static str,
}

#[allow(clippy::too_many_arguments)] // one row of the table, every column named
const fn spec(
    name: &'static str,
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    flags: u32,
    keep: Keep,
    what: &'static str,
) -> MapSpec {
    MapSpec { name, map_type, key_size: key_size as u32, value_size: value_size as u32, max_entries, flags, keep, what }
}

/// Every map of the balancer object (`lb_xdp`), in the order of ARCHITECTURE.md.
pub const BALANCER_MAPS: &[MapSpec] = &[
    spec(
        n::VIPS,
        BPF_MAP_TYPE_HASH,
        size_of::<VipKey>(),
        size_of::<VipValue>(),
        MAX_VIPS,
        0,
        Keep::State,
        "(VIP address, port, protocol) -> service id, mode, live table slot, table size, flags",
    ),
    spec(
        n::VIP_ADDRS,
        BPF_MAP_TYPE_HASH,
        16,
        4,
        MAX_VIPS,
        0,
        Keep::State,
        "VIP address -> number of services on it (echo replies)",
    ),
    spec(
        n::VIP_BLOOM,
        BPF_MAP_TYPE_ARRAY,
        4,
        size_of::<VipBloom>(),
        1,
        0,
        Keep::State,
        "bitmap over VIP addresses: a clear bit proves \"not a VIP\"",
    ),
    spec(
        n::TABLES,
        BPF_MAP_TYPE_ARRAY,
        4,
        size_of::<TableEntry>(),
        TABLES_ENTRIES,
        TABLES_FLAGS,
        Keep::State,
        "Maglev rings of (primary, secondary) pairs, two slots per service, written through mmap",
    ),
    spec(
        n::BACKENDS,
        BPF_MAP_TYPE_ARRAY,
        4,
        size_of::<BackendValue>(),
        MAX_BACKENDS,
        0,
        Keep::State,
        "backend id -> address, next-hop MAC, flags, service",
    ),
    spec(
        n::FLOWS,
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        MAX_FLOWS,
        FLOWS_FLAGS,
        Keep::State,
        "client 5-tuple -> backend id; one table, per-CPU LRU lists",
    ),
    spec(
        n::SETTINGS,
        BPF_MAP_TYPE_ARRAY,
        4,
        size_of::<Settings>(),
        1,
        0,
        Keep::State,
        "encap sources, gateway MAC, MTU, reply rate, new-flow limit, flags",
    ),
    spec(
        n::LAYOUT,
        BPF_MAP_TYPE_ARRAY,
        4,
        4,
        1,
        0,
        Keep::State,
        "MAP_LAYOUT_VERSION of the pinned maps, written by lbd",
    ),
    spec(
        n::REASON_STATS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size_of::<Counter>(),
        reason::COUNT,
        0,
        Keep::Counters,
        "per reason packets/bytes, per CPU",
    ),
    spec(
        n::SERVICE_STATS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size_of::<TrafficCounter>(),
        MAX_SERVICES,
        0,
        Keep::Counters,
        "per service packets/bytes/new flows, per CPU",
    ),
    spec(
        n::BACKEND_STATS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size_of::<TrafficCounter>(),
        MAX_BACKENDS,
        0,
        Keep::Counters,
        "per backend packets/bytes/new flows, per CPU",
    ),
    spec(
        n::FLOW_EVENTS,
        BPF_MAP_TYPE_RINGBUF,
        0,
        0,
        FLOW_EVENTS_BYTES,
        0,
        Keep::PerLoad,
        "new flows for the peer balancer (flow sync), no per-event wakeup",
    ),
    spec(
        n::SYNC_STATS,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        8,
        1,
        0,
        Keep::PerLoad,
        "flow events lost to a full FLOW_EVENTS, per CPU",
    ),
    spec(
        n::FRAGS,
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<FragKey>(),
        size_of::<FragValue>(),
        MAX_FRAGS,
        0,
        Keep::PerLoad,
        "fragmented datagram -> its first fragment's ports (datapath-private)",
    ),
    spec(
        n::REPLY_BUCKET,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size_of::<ReplyBucket>(),
        1,
        0,
        Keep::PerLoad,
        "token bucket of generated replies, per CPU (datapath-private)",
    ),
    spec(
        n::FLOOD_METER,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        size_of::<FloodMeter>(),
        1,
        0,
        Keep::PerLoad,
        "new flows in the current second, per CPU (flood mode, datapath-private)",
    ),
];

/// The spec of a balancer map by name.
pub fn balancer_map(name: &str) -> Option<&'static MapSpec> {
    BALANCER_MAPS.iter().find(|m| m.name == name)
}

/// Name of a `bpf_map_type` used here.
pub const fn type_name(t: u32) -> &'static str {
    match t {
        BPF_MAP_TYPE_HASH => "hash",
        BPF_MAP_TYPE_ARRAY => "array",
        BPF_MAP_TYPE_PERCPU_ARRAY => "percpu_array",
        BPF_MAP_TYPE_LRU_HASH => "lru_hash",
        BPF_MAP_TYPE_RINGBUF => "ringbuf",
        _ => "other",
    }
}

/// Names of the flag bits used here.
pub const fn flags_name(f: u32) -> &'static str {
    match f {
        0 => "0",
        BPF_F_NO_COMMON_LRU => "BPF_F_NO_COMMON_LRU",
        BPF_F_MMAPABLE => "BPF_F_MMAPABLE",
        _ => "other",
    }
}

#[cfg(feature = "user")]
impl MapSpec {
    /// Every way a map of this shape differs from the contract, as "what: found X, this
    /// build Y" (libbpf compares the same fields before reusing a pinned map). Used by
    /// lbd's adoption check and by the userspace opener.
    pub fn differences(
        &self,
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        flags: u32,
    ) -> std::vec::Vec<std::string::String> {
        use std::format;
        let mut d = std::vec::Vec::new();
        if map_type != self.map_type {
            d.push(format!(
                "type: pinned {} ({map_type}), this lbd {} ({})",
                type_name(map_type),
                type_name(self.map_type),
                self.map_type
            ));
        }
        for (what, g, w) in [
            ("key size", key_size, self.key_size),
            ("value size", value_size, self.value_size),
            ("max_entries", max_entries, self.max_entries),
        ] {
            if g != w {
                d.push(format!("{what}: pinned {g}, this lbd {w}"));
            }
        }
        if flags != self.flags {
            d.push(format!("flags: pinned {flags:#x}, this lbd {:#x} ({})", self.flags, flags_name(self.flags)));
        }
        d
    }
}

#[cfg(feature = "user")]
/// The contract as the Markdown table ARCHITECTURE.md carries (between the markers
/// `<!-- map-contract -->` and `<!-- /map-contract -->`).
pub fn markdown_table() -> std::string::String {
    use std::fmt::Write as _;
    let mut o = std::string::String::new();
    let _ = writeln!(o, "Layout version {MAP_LAYOUT_VERSION}.\n");
    let _ = writeln!(o, "| map | type | key | value | max_entries | flags | on restart | what |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for m in BALANCER_MAPS {
        let keep = match m.keep {
            Keep::State => "adopted; other layout refuses the start",
            Keep::Counters => "adopted; other layout starts from zero",
            Keep::PerLoad => "new per load",
        };
        let _ = writeln!(
            o,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} |",
            m.name,
            type_name(m.map_type),
            m.key_size,
            m.value_size,
            m.max_entries,
            flags_name(m.flags),
            keep,
            m.what
        );
    }
    o
}
