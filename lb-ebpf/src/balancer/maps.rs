//! The balancer's maps: the contract with userspace (lb_common::contract declares every
//! one: type, sizes, max_entries, flags; a test checks this object against it). Pinned
//! by lbd under /sys/fs/bpf/<instance>/ with these names.

use super::*;

/// (VIP address, port or 0, protocol) -> service id, forwarding mode, live table slot.
#[map]
pub(crate) static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Every VIP address (IPv4-mapped words) -> number of services on it. Echo requests
/// are answered for these addresses only.
#[map]
pub(crate) static VIP_ADDRS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// One-entry bitmap over VIP addresses: a clear bit proves "not a VIP", so non-VIP
/// traffic costs one array lookup instead of two hash lookups.
#[map]
pub(crate) static VIP_BLOOM: Array<VipBloom> = Array::with_max_entries(1, 0);

/// Maglev rings: (service id * 2 + slot) * MAX_TABLE_SIZE + position -> (primary,
/// secondary) backend ids.
/// Two slots per service: userspace fills the idle one, then flips VipValue::active_slot.
/// Mmapable, so userspace writes a whole table with one memcpy.
#[map]
pub(crate) static TABLES: Array<TableEntry> = Array::with_max_entries(TABLES_ENTRIES, TABLES_FLAGS);

/// Backend id -> address, next-hop MAC, flags, owning service.
#[map]
pub(crate) static BACKENDS: Array<BackendValue> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Client 5-tuple -> backend id: keeps established flows on their backend when the
/// backend set changes. One hash table shared by every CPU (a flow that lands on another
/// CPU, or is synced from the peer, is found wherever its packets arrive), with per-CPU
/// LRU lists (BPF_F_NO_COMMON_LRU): an insert takes and evicts entries of its own CPU's
/// list under that CPU's lock, so CPUs inserting at once do not contend on one global
/// LRU lock. Each CPU's list holds max_entries / possible CPUs entries.
#[map]
pub(crate) static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, FLOWS_FLAGS);

/// New flows for the peer balancer (`SETTINGS_F_FLOW_SYNC`), read by lbd.
#[map]
pub(crate) static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Entry 0: flow events lost to a full FLOW_EVENTS, per CPU.
#[map]
pub(crate) static SYNC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0: encap sources, gateway MAC, MTU, reply rate.
#[map]
pub(crate) static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Entry 0: lb_common::contract::MAP_LAYOUT_VERSION of the pinned maps, written by lbd
/// and checked when it adopts them. The program never reads it.
#[map]
pub(crate) static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// Per reason (lb_common::reason) packets/bytes, per CPU.
#[map]
pub(crate) static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per service id packets/bytes/new flows, per CPU.
#[map]
pub(crate) static SERVICE_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per backend id packets/bytes/new flows, per CPU.
#[map]
pub(crate) static BACKEND_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

// Datapath-private state (not pinned, not written by userspace).

/// Fragmented datagram -> the ports its first fragment carried, so later fragments (no
/// L4 header) are steered by the datagram's 5-tuple. LRU: datagrams are short-lived.
#[map]
pub(crate) static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// Token bucket of generated replies, per CPU (no atomics on the reply path).
#[map]
pub(crate) static REPLY_BUCKET: PerCpuArray<ReplyBucket> = PerCpuArray::with_max_entries(1, 0);

/// New flows recorded by this CPU in the current second (flood mode).
#[map]
pub(crate) static FLOOD_METER: PerCpuArray<FloodMeter> = PerCpuArray::with_max_entries(1, 0);

