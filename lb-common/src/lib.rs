//! The contract between the XDP datapath (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Every map key and value lives here, `#[repr(C)]` with explicit padding and a size
//! assert: padding bytes in a key would make lookups miss, and a size drift between
//! the two sides would corrupt every read. No `bool`, `Option` or enum in map values.
//!
//! Byte order: addresses and ports are stored in **network byte order** exactly as they
//! appear on the wire, so the datapath copies them without swapping. IPv4 addresses are
//! stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so one key type serves both families.
//!
//! The flow hash ([`flow_hash`]) and the bloom prefilter hash ([`vip_addr_bit`]) are
//! defined here once and used by both sides, so userspace (tests, Maglev prediction, and
//! later flow sync) computes exactly what the datapath computes.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
pub mod maglev;

pub mod contract;

use core::mem::size_of;

/// Map names, as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const VIP_BLOOM: &str = "VIP_BLOOM";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const TABLES: &str = "TABLES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// Decap object: allowed outer sources, key IPv6 or IPv4-mapped words (network order).
    pub const DECAP_ALLOW: &str = "DECAP_ALLOW";
    /// Decap object: this host's addresses, keyed like `DECAP_ALLOW`.
    pub const DECAP_LOCAL: &str = "DECAP_LOCAL";
    /// Decap object: UDP destination ports (network order) carrying GUE -> 1.
    pub const DECAP_GUE_PORTS: &str = "DECAP_GUE_PORTS";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const SYNC_STATS: &str = "SYNC_STATS";
    pub const LAYOUT: &str = "LAYOUT";
    pub const FRAGS: &str = "FRAGS";
    pub const REPLY_BUCKET: &str = "REPLY_BUCKET";
    pub const FLOOD_METER: &str = "FLOOD_METER";

    /// The balancer's maps that lbd pins under /sys/fs/bpf/<instance>/ and reuses on
    /// restart or upgrade: state and counters (`contract::Keep`). Any other map in the
    /// object is per load.
    pub const PINNED: &[&str] = &[
        VIPS,
        VIP_BLOOM,
        VIP_ADDRS,
        TABLES,
        BACKENDS,
        FLOWS,
        SETTINGS,
        LAYOUT,
        REASON_STATS,
        SERVICE_STATS,
        BACKEND_STATS,
    ];
}

/// Program names (the function names in lb-ebpf).
pub mod prog_names {
    /// The balancer, attached on the load balancer's interfaces.
    pub const BALANCER: &str = "lb_xdp";
    /// Strips our IPIP/IP6IP6 header on backends.
    pub const DECAP: &str = "lb_decap";
    /// XDP_PASS only (in the decap object): lets native XDP_TX from a veth peer arrive.
    pub const PASS: &str = "lb_pass";
}

/// Capacity limits. The datapath declares its maps with these sizes; userspace may
/// shrink them at load time but never grow beyond what the control plane validates.
pub const MAX_SERVICES: u32 = 64;
/// Backend ids are global (one id per (service, backend) pair), 0..MAX_BACKENDS.
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev table size M per service (a prime).
pub const MAX_TABLE_SIZE: u32 = 65537;
/// Entries in the shared LRU flow table.
pub const MAX_FLOWS: u32 = 1 << 20;
/// Entries in the VIP hash (a service may have several keys only through port 0 / exact).
pub const MAX_VIPS: u32 = 256;
/// Bits in the VIP address prefilter (a power of two).
pub const VIP_BLOOM_BITS: u32 = 4096;
pub const VIP_BLOOM_WORDS: usize = (VIP_BLOOM_BITS / 64) as usize;

/// Sentinel in `TABLES` for "no backend in this slot" (empty service).
pub const NO_BACKEND: u32 = u32::MAX;

/// One position of a Maglev table in `TABLES`: the backend new flows get (`primary`,
/// Maglev's pick) and the one second-chance delivery tries next (`secondary`, a
/// different backend, or `NO_BACKEND`): see `maglev::build_pairs`. 8 bytes, the
/// kernel's array stride, so the mmap'ed table is one 64-bit store per position.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    pub primary: u32,
    pub secondary: u32,
}
const _: () = assert!(size_of::<TableEntry>() == 8);

impl TableEntry {
    pub const EMPTY: TableEntry = TableEntry { primary: NO_BACKEND, secondary: NO_BACKEND };
}

impl Default for TableEntry {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Table index of a (service, slot, position): the table array holds
/// `MAX_SERVICES * 2` rings of `MAX_TABLE_SIZE` entries; a service uses the first
/// `table_size` entries of its ring.
#[inline(always)]
pub const fn table_index(service_id: u32, slot: u32, pos: u32) -> u32 {
    (service_id * 2 + (slot & 1)) * MAX_TABLE_SIZE + pos
}
pub const TABLES_ENTRIES: u32 = MAX_SERVICES * 2 * MAX_TABLE_SIZE;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of `VIPS`: (address, port, protocol). Port 0 means every port of that protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// IPv6 address or IPv4-mapped IPv6, network byte order.
    pub addr: [u32; 4],
    /// Destination port, network byte order; 0 = all ports.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// `VipValue::mode`: IPIP / IP6IP6 encapsulation to the backend, then XDP_TX.
pub const MODE_IPIP: u32 = 0;
/// `VipValue::mode`: rewrite the destination MAC to the backend's (L2 direct server return).
pub const MODE_DSR_L2: u32 = 1;
/// `VipValue::mode`: outer IPv4/IPv6 + UDP + GUE variant 0 with the hop list as private
/// data (see [`gue`]), then XDP_TX. The UDP destination port is in the high 16 bits.
pub const MODE_GUE: u32 = 2;
/// Bits of `VipValue::mode` that hold the MODE_* value; the high 16 bits hold MODE_GUE's
/// UDP destination port (host order), 0 for the other modes.
pub const MODE_MASK: u32 = 0xffff;

/// `VipValue::mode` of a service: the mode with its GUE port (0 unless MODE_GUE).
#[inline(always)]
pub const fn vip_mode(mode: u32, gue_port: u16) -> u32 {
    (mode & MODE_MASK) | ((gue_port as u32) << 16)
}

/// The GUE port carried in a `VipValue::mode` (`vip_mode`'s inverse; 0 unless MODE_GUE).
#[inline(always)]
pub const fn vip_gue_port(mode: u32) -> u16 {
    (mode >> 16) as u16
}

/// GUE encapsulation (mode `gue`, draft-ietf-intarea-gue variant 0): the wire format
/// the balancer writes and `lb_decap` reads.
///
/// ```text
/// outer IPv4 (20) | IPv6 (40), protocol / next header 17
/// UDP (8): source port gue_source_port(flow hash), destination port per service,
///          checksum 0 (RFC 768 for IPv4; RFC 6935/6936 tunnel rule for IPv6)
/// GUE (4): ver 0, C 0, hlen = 1 + 4 * hops (32-bit words after these 4 bytes),
///          proto = 4 (inner IPv4) or 41 (inner IPv6), flags 0
/// private data, hop list (4 + 16 * hops):
///   version HOPS_VERSION, hops (0..=MAX_HOPS), next (index of the next hop, < hops
///   when one is left), reserved 0,
///   hops × 16-byte address (IPv6, or IPv4-mapped IPv6), network byte order
/// inner IP packet, unchanged
/// ```
///
/// With flags 0, every optional byte GUE's hlen covers is private data (the draft's
/// rule), so a plain GUE receiver (Linux fou in gue mode) skips the hop list and
/// decapsulates. The hop list holds the backends that follow the outer destination,
/// the second-chance targets: a hop is taken by rewriting the outer destination and
/// incrementing `next`, so the packet never changes size on the way.
pub mod gue {
    /// Default UDP destination port of a `gue` service.
    pub const DEFAULT_PORT: u16 = 6080;
    /// Version of the hop-list private data (its first byte).
    pub const HOPS_VERSION: u8 = 1;
    /// Largest hop list a packet carries.
    pub const MAX_HOPS: u8 = 2;
    pub const UDP_LEN: usize = 8;
    /// The 4-byte GUE base header.
    pub const HDR_LEN: usize = 4;
    /// The hop list's fixed word (version, hops, next, reserved).
    pub const HOPS_HDR_LEN: usize = 4;
    pub const HOP_LEN: usize = 16;
    /// UDP + GUE + hop list with `hops` entries: the bytes between the outer IP header
    /// and the inner packet.
    pub const fn overhead(hops: usize) -> usize {
        UDP_LEN + HDR_LEN + HOPS_HDR_LEN + HOP_LEN * hops
    }
    /// UDP source port for a flow: from its flow hash, in the dynamic range 49152-65535
    /// (RFC 8085), so routers and the backend's NIC (RSS) spread flows apart while all
    /// packets of one flow take one path.
    #[inline(always)]
    pub const fn source_port(flow_hash: u32) -> u16 {
        0xc000 | (flow_hash & 0x3fff) as u16
    }
}

/// Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipValue {
    /// Index into the per-service rings of `TABLES` and into `SERVICE_STATS`.
    pub service_id: u32,
    /// MODE_IPIP, MODE_DSR_L2 or MODE_GUE in the low 16 bits (`MODE_MASK`); MODE_GUE's
    /// UDP destination port in the high 16 bits (`vip_mode`).
    pub mode: u32,
    /// Which of the service's two table slots is live (0 or 1). Userspace fills the
    /// idle slot, then flips this, so the datapath never sees half a table.
    pub active_slot: u32,
    /// Maglev table size M of this service (prime, <= MAX_TABLE_SIZE).
    pub table_size: u32,
    /// VIP_F_* bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<VipValue>() == 20);

/// `VipValue::flags`: TCP of this (gue) service skips the flow table (`flow_table =
/// "off"`): every packet takes its Maglev pair, and second chance on the backends
/// keeps connections where they are across backend changes.
pub const VIP_F_NO_FLOW_TABLE: u32 = 1;

/// `BackendValue::flags`: the entry is in use. Flows pinned to a backend id without it
/// (removed backend) are re-steered by Maglev.
pub const BACKEND_F_VALID: u32 = 1;
/// The backend address is IPv6 (outer header IPv6 in ipip mode).
pub const BACKEND_F_V6: u32 = 2;
/// `mac` is set: use it as next hop (dsr-l2 always needs it; ipip to an on-link backend).
pub const BACKEND_F_HAS_MAC: u32 = 4;
/// The entry may be a second-chance hop (gue): set on a valid backend of a gue service
/// and on one that left it (removed) while it still holds connections, which is then
/// not VALID (its flows re-steer) but still named as a secondary.
pub const BACKEND_F_HOP: u32 = 8;

/// Value of `BACKENDS` (an array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u32; 4],
    /// BACKEND_F_* bits.
    pub flags: u32,
    /// The service this backend id belongs to; a flow whose backend now belongs to
    /// another service (id reused) is re-steered.
    pub service_id: u32,
    /// Next-hop MAC for this backend.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<BackendValue>() == 32);

/// Key of `FLOWS`: the client's 5-tuple as seen on the wire (client → VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Client address (IPv4-mapped for IPv4), network byte order.
    pub src: [u32; 4],
    /// VIP address (IPv4-mapped for IPv4), network byte order.
    pub dst: [u32; 4],
    /// Source and destination ports, network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// 0 when the datapath records the flow (a new flow reads no clock): not yet
    /// reported for flow sync. The datapath reports the flow on its next packet while
    /// sync is on and stores the coarse monotonic time of the report here (odd, never
    /// 0); lbd writes its CLOCK_MONOTONIC for a flow synced from the peer, which is
    /// therefore never reported back.
    pub created_ns: u64,
}
const _: () = assert!(size_of::<FlowValue>() == 16);

/// Entries in the datapath-private fragment map (`FRAGS`).
pub const MAX_FRAGS: u32 = 16384;

/// Key of `FRAGS` (datapath-private, not pinned): one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Source and destination (IPv4-mapped for IPv4), network byte order.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// IPv4 identification (16 bits) or IPv6 fragment identification, as loaded.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// `FragValue::flags`: the first fragment was passed to the stack (no service on its
/// port), so its later fragments are passed too.
pub const FRAG_F_PASS: u32 = 1;

/// Value of `FRAGS`: the ports the first fragment carried (network order), so later
/// fragments hash with the datagram's full 5-tuple, exactly like whole datagrams of
/// the same flow (Cilium's fragment map does the same).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub src_port: u16,
    pub dst_port: u16,
    /// FRAG_F_* bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<FragValue>() == 8);

/// Per-CPU new-flow rate meter (`FLOOD_METER`, datapath-private): new flows recorded in
/// the current one-second window of `bpf_ktime_get_coarse_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodMeter {
    pub window_ns: u64,
    pub count: u64,
}
const _: () = assert!(size_of::<FloodMeter>() == 16);

/// Per-CPU token bucket of generated replies (`REPLY_BUCKET`, datapath-private).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyBucket {
    /// Credit in replies × 1e9 (one reply costs 1e9), at most rate × 1e9.
    pub credit: u64,
    /// bpf_ktime_get_ns() of the last refill.
    pub last_ns: u64,
}
const _: () = assert!(size_of::<ReplyBucket>() == 16);

/// `Settings::flags`: `gateway_mac` is set.
pub const SETTINGS_F_HAS_GATEWAY: u32 = 1;
/// `Settings::flags`: report every new flow on `FLOW_EVENTS` (a peer balancer syncs them).
pub const SETTINGS_F_FLOW_SYNC: u32 = 2;

/// One record of `FLOW_EVENTS`: a flow the datapath just pinned to a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub backend_id: u32,
    pub service_id: u32,
}
const _: () = assert!(size_of::<FlowEvent>() == 48);

/// Size of the `FLOW_EVENTS` ring buffer: 74898 events (48 bytes + an 8-byte record
/// header each) between two userspace reads, ~75 ms at 1M reported flows/s: a reader
/// starved by a busy CPU loses nothing for that long (1 MiB lost 3 % of the events in a
/// bench run on a loaded machine).
pub const FLOW_EVENTS_BYTES: u32 = 1 << 22;

/// Flow events are written without waking the reader (`BPF_RB_NO_WAKEUP`): lbd drains
/// the ring on a timer of at most `FLOW_EVENTS_DRAIN_MS`. Only when this many bytes are
/// waiting (a quarter of the ring: ~18700 events, 19 ms of a 1M flows/s burst) is the
/// reader woken at once (`BPF_RB_FORCE_WAKEUP`), so a burst cannot fill the ring
/// between two timer ticks.
pub const FLOW_EVENTS_WAKEUP_BYTES: u64 = (FLOW_EVENTS_BYTES / 4) as u64;

/// Longest interval between two reads of `FLOW_EVENTS` a reader may use (the wakeup
/// design above relies on it).
pub const FLOW_EVENTS_DRAIN_MS: u64 = 10;

/// `Settings::max_new_flows` when lbd's config does not set `max_new_flows_per_cpu`:
/// Katran's flood threshold. At ~1 µs per insert into a full flow table this caps the
/// time one CPU spends recording flows at ~12 %; a real per-CPU rate above it is rare
/// (it is 1.5 M new connections/s on a 12-CPU balancer).
pub const DEFAULT_MAX_NEW_FLOWS: u32 = 125_000;

/// Value of `SETTINGS[0]`: node-wide forwarding settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// Outer IPv4 source for IPIP, network byte order; 0 = none.
    pub encap_src_v4: u32,
    /// Outer IPv6 source for IP6IP6, network byte order; all-zero = none.
    pub encap_src_v6: [u32; 4],
    /// Next hop for ipip backends without their own MAC.
    pub gateway_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// SETTINGS_F_* bits.
    pub flags: u32,
    /// Largest IP packet (outer header included) we may transmit; 0 = 1500.
    pub mtu: u32,
    /// Replies the datapath generates itself (TCP RST and ICMP port unreachable for an
    /// empty service, ICMP echo reply, ICMP too big), per second per CPU, with a burst of
    /// one second's worth; 0 = DEFAULT_REPLY_RATE. Over it: dropped, counted.
    pub reply_rate: u32,
    /// Flood mode: new flows per second per CPU that are recorded in `FLOWS`; beyond
    /// it, new flows are steered by their Maglev pick alone, unrecorded (counted as
    /// `fwd_flood_unrecorded`). 0 = no limit (and no clock read per new flow).
    pub max_new_flows: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<Settings>() == 48);

/// `Settings::reply_rate` when it is 0.
pub const DEFAULT_REPLY_RATE: u32 = 1000;

/// Packets and bytes, per CPU, in every stats map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// Per service and per backend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Flows created by a Maglev pick (flow-table misses).
    pub new_flows: u64,
    pub _pad: u64,
}
const _: () = assert!(size_of::<TrafficCounter>() == 32);

/// The VIP address prefilter: one bit per hashed VIP address (any port/protocol).
/// A clear bit proves the destination is no VIP, so non-VIP traffic leaves after one
/// array lookup instead of two hash lookups.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipBloom {
    pub words: [u64; VIP_BLOOM_WORDS],
}
const _: () = assert!(size_of::<VipBloom>() == 512);

impl Default for VipBloom {
    fn default() -> Self {
        Self { words: [0; VIP_BLOOM_WORDS] }
    }
}

/// Why the datapath passed or dropped a packet (index into `REASON_STATS`). Every
/// XDP_DROP and every unusual XDP_PASS has one; forwarded packets are counted per
/// service and backend instead.
pub mod reason {
    /// Not for a VIP address: passed untouched (normal).
    pub const PASS_NOT_VIP: u32 = 0;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched (normal).
    pub const PASS_NOT_IP: u32 = 1;
    /// VIP address, but no service on that port/protocol: passed to the stack.
    pub const PASS_NO_SERVICE: u32 = 2;
    /// ICMP/ICMPv6 to a VIP address that is neither an echo request we answer nor an
    /// error about a flow (other types, echo with IPv4 options or IPv6 extension headers,
    /// echo to a VIP address without any service): passed.
    pub const PASS_ICMP: u32 = 3;
    /// IP fragment to a VIP address that matches no service: passed.
    pub const PASS_FRAGMENT: u32 = 4;
    /// IPv6 extension headers we do not walk (AH, ESP, mobility, ...) or more than
    /// `MAX_IPV6_EXT` of them, to a VIP address: passed.
    pub const PASS_IPV6_EXT: u32 = 5;
    /// More than one VLAN tag: passed.
    pub const PASS_VLAN_STACKED: u32 = 6;
    /// Protocol other than TCP/UDP/ICMP (IPIP, GRE, ...) to a VIP address: passed.
    pub const PASS_OTHER_PROTO: u32 = 7;
    /// Truncated or inconsistent Ethernet/IP/extension/L4 header: dropped.
    pub const DROP_MALFORMED: u32 = 8;
    /// The service has no usable backend and no reply is due (TCP RST, fragment, an ICMP
    /// error about a flow): dropped.
    pub const DROP_NO_BACKEND: u32 = 9;
    /// The encapsulated packet would exceed the MTU and no ICMP too-big is due (IPv4
    /// without DF, or the packet is itself an ICMP error): dropped.
    pub const DROP_TOO_BIG: u32 = 10;
    /// No next-hop MAC (backend has none and no gateway is set): dropped.
    pub const DROP_NO_NEXTHOP: u32 = 11;
    /// No encap source address for the backend's family: dropped.
    pub const DROP_NO_ENCAP_SOURCE: u32 = 12;
    /// bpf_xdp_adjust_head or bpf_xdp_adjust_tail failed: dropped.
    pub const DROP_ADJUST_HEAD: u32 = 13;
    /// Inconsistent maps (table points at a missing backend, bad slot): dropped.
    pub const DROP_BAD_STATE: u32 = 14;
    /// ICMP echo request to a VIP address answered by the balancer (XDP_TX).
    pub const TX_ECHO_REPLY: u32 = 15;
    /// TCP segment to a service without a usable backend answered with a RST (XDP_TX).
    pub const TX_RST: u32 = 16;
    /// UDP datagram to a service without a usable backend answered with ICMP port
    /// unreachable / ICMPv6 destination unreachable code 4 (XDP_TX).
    pub const TX_PORT_UNREACHABLE: u32 = 17;
    /// Packet too big for the MTU once encapsulated answered with ICMP fragmentation
    /// needed / ICMPv6 packet too big (XDP_TX).
    pub const TX_TOO_BIG: u32 = 18;
    /// A reply (the four above) over `Settings::reply_rate`: dropped.
    pub const DROP_REPLY_RATELIMITED: u32 = 19;
    /// ICMP error (unreachable, too big) whose embedded packet is not a VIP flow, or is
    /// truncated/malformed: passed.
    pub const PASS_ICMP_ERROR: u32 = 20;
    /// Sub-count of forwarded packets (also in the service/backend counters): ICMP
    /// errors steered to the backend owning the embedded flow.
    pub const FWD_ICMP_ERROR: u32 = 21;
    /// Sub-count of forwarded packets (also in the service/backend counters): IP
    /// fragments, steered by the port-less hash.
    pub const FWD_FRAGMENT: u32 = 22;
    /// Sub-count of forwarded packets: a new flow steered by its Maglev pick without
    /// being recorded in `FLOWS`, because this CPU is above `Settings::max_new_flows`
    /// (flood mode).
    pub const FWD_FLOOD_UNRECORDED: u32 = 23;
    /// Sub-count of forwarded packets: a new flow whose `FLOWS` insert failed (the
    /// next packet retries).
    pub const FWD_INSERT_FAILED: u32 = 24;
    /// A later fragment whose first fragment was never seen, with no port-0 service to
    /// steer it by, or an IPv6 fragment header beyond the extension-header walk: dropped
    /// (passing it would only open a slow path to the stack).
    pub const DROP_FRAGMENT_ORPHAN: u32 = 25;
    /// Sub-count of forwarded packets (also in `fwd_fragment`): a later fragment that
    /// arrived before its first, steered by the port-less hash of a port-0 service (it
    /// may reach another backend than the rest of its datagram).
    pub const FWD_FRAGMENT_PORTLESS: u32 = 26;
    /// The packet was already rewritten (head/tail moved, headers written) and a step
    /// after it failed: an internal fault, not bad input. Dropped.
    pub const DROP_INTERNAL: u32 = 27;
    pub const COUNT: u32 = 28;

    /// Stable names for counters, CLI output and tests, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_vip",
        "pass_not_ip",
        "pass_no_service",
        "pass_icmp",
        "pass_fragment",
        "pass_ipv6_ext",
        "pass_vlan_stacked",
        "pass_other_proto",
        "drop_malformed",
        "drop_no_backend",
        "drop_too_big",
        "drop_no_nexthop",
        "drop_no_encap_source",
        "drop_adjust_head",
        "drop_bad_state",
        "tx_echo_reply",
        "tx_rst",
        "tx_port_unreachable",
        "tx_too_big",
        "drop_reply_ratelimited",
        "pass_icmp_error",
        "fwd_icmp_error",
        "fwd_fragment",
        "fwd_flood_unrecorded",
        "fwd_insert_failed",
        "drop_fragment_orphan",
        "fwd_fragment_portless",
        "drop_internal",
    ];

    /// Reasons that count a subset of forwarded packets rather than a verdict of their
    /// own: every packet has exactly one verdict reason or is forwarded, so
    /// sum(reasons not in this list) + forwarded packets = packets seen.
    pub const FORWARD_SUBCOUNTS: [u32; 5] =
        [FWD_ICMP_ERROR, FWD_FRAGMENT, FWD_FLOOD_UNRECORDED, FWD_INSERT_FAILED, FWD_FRAGMENT_PORTLESS];

    /// Whether a reason is a verdict (not a sub-count of forwarded packets).
    pub const fn is_verdict(r: u32) -> bool {
        let mut i = 0;
        while i < FORWARD_SUBCOUNTS.len() {
            if FORWARD_SUBCOUNTS[i] == r {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Counters of the decap program (index into `DECAP_STATS`).
pub mod decap_reason {
    /// IPIP/IP6IP6 stripped and passed to the stack.
    pub const DECAPSULATED: u32 = 0;
    /// Not encapsulated: passed untouched.
    pub const PASS_NOT_ENCAP: u32 = 1;
    /// Truncated outer or inner header: dropped.
    pub const DROP_MALFORMED: u32 = 2;
    /// bpf_xdp_adjust_head failed: dropped.
    pub const DROP_ADJUST_HEAD: u32 = 3;
    /// IPIP/IP6IP6 whose outer destination is not one of this host's addresses
    /// (`DECAP_LOCAL`): dropped, not decapsulated on someone else's behalf.
    pub const DROP_NOT_LOCAL: u32 = 4;
    /// IPIP/IP6IP6 from an outer source outside the allow-list of balancers
    /// (`DECAP_ALLOW`): dropped (spoofed inner sources, 127.0.0.1 among them).
    pub const DROP_SOURCE_NOT_ALLOWED: u32 = 5;
    /// UDP + GUE to one of `DECAP_GUE_PORTS` stripped (outer IP, UDP, GUE and its hop
    /// list) and passed to the stack. The checks above apply alike (`drop_*`); a GUE
    /// header of another version, a control message, flags we do not parse or an inner
    /// protocol other than 4/41 is `drop_malformed`.
    pub const DECAPSULATED_GUE: u32 = 6;
    /// Second chance (GUE with a next hop in its hop list): a TCP SYN to a VIP port
    /// with no listening socket here, sent on to the next hop (XDP_TX).
    pub const SECOND_CHANCE_SYN: u32 = 7;
    /// Second chance: a TCP non-SYN packet of a connection this host does not hold (no
    /// socket, or only a listener and no valid SYN cookie), sent on to the next hop.
    pub const SECOND_CHANCE_NOT_HELD: u32 = 8;
    /// Second chance due, but `bpf_fib_lookup` gives no route and neighbour for the
    /// next hop out of the interface the packet came in on (also: forwarding is off on
    /// that interface, which the helper requires; or the hop is of another family than
    /// the outer header): decapsulated and passed instead.
    pub const SECOND_CHANCE_NO_ROUTE: u32 = 9;
    pub const COUNT: u32 = 10;
    pub const NAMES: [&str; COUNT as usize] = [
        "decapsulated",
        "pass_not_encap",
        "drop_malformed",
        "drop_adjust_head",
        "drop_not_local",
        "drop_source_not_allowed",
        "decapsulated_gue",
        "second_chance_syn",
        "second_chance_not_held",
        "second_chance_no_route",
    ];
}

/// Entries of `DECAP_GUE_PORTS` (UDP ports decap reads as GUE).
pub const DECAP_MAX_GUE_PORTS: u32 = 16;

/// Entries of `DECAP_ALLOW` (the balancers' addresses a backend decapsulates from).
pub const DECAP_MAX_ALLOW: u32 = 256;
/// Entries of `DECAP_LOCAL` (this host's addresses the outer destination must be).
pub const DECAP_MAX_LOCAL: u32 = 256;

/// IPv4-mapped IPv6 prefix word (`::ffff:0:0/96`, third 32-bit word) as loaded
/// natively on a little-endian machine from network-order bytes `00 00 ff ff`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4-mapped form of an IPv4 address given as its network-order word.
#[inline(always)]
pub const fn v4_mapped_words(addr_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

/// IPv4-mapped form of an IPv4 address given as bytes.
#[inline(always)]
pub const fn v4_mapped_bytes(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// The fixed seed of the flow hash: two nodes (and a restarted node) must pick the
/// same backend for the same flow, so it is a constant, not a random per-boot value.
pub const FLOW_HASH_SEED: u32 = 0x4c42_5631; // "LBV1"

#[inline(always)]
const fn murmur_mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn murmur_final(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3 (x86, 32-bit) over whole words. Words are the native (little-endian)
/// loads of network-order bytes on both sides (bpfel and x86_64/aarch64 userspace).
#[inline(always)]
pub fn hash_words<const N: usize>(words: &[u32; N], seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < N {
        h = murmur_mix(h, words[i]);
        i += 1;
    }
    murmur_final(h, (N * 4) as u32)
}

/// The flow hash that indexes a service's Maglev table. Ports and protocol are
/// included; fragments hash with ports zeroed (all fragments of a datagram agree).
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let words = [
        k.src[0],
        k.src[1],
        k.src[2],
        k.src[3],
        k.dst[0],
        k.dst[1],
        k.dst[2],
        k.dst[3],
        (k.src_port as u32) | ((k.dst_port as u32) << 16),
        k.proto as u32,
    ];
    hash_words(&words, FLOW_HASH_SEED)
}

/// Bit of the VIP prefilter for an address given as four native words (IPv4-mapped
/// for IPv4). Cheap on purpose: it runs for every IP packet.
#[inline(always)]
pub fn vip_addr_bit(a: &[u32; 4]) -> u32 {
    let x = a[0] ^ a[1] ^ a[2] ^ a[3];
    x.wrapping_mul(0x9e37_79b1) >> (32 - VIP_BLOOM_BITS.trailing_zeros())
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding and no
    // invalid bit patterns.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for TableEntry {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TrafficCounter {}
    unsafe impl aya::Pod for VipBloom {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for ReplyBucket {}
    unsafe impl aya::Pod for FloodMeter {}
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::IpAddr;

    /// 16-byte form (IPv4-mapped for IPv4) of an address, network byte order.
    pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V4(v4) => v4_mapped_bytes(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// Native words of the 16-byte form, as the datapath loads them.
    pub fn addr_words(a: IpAddr) -> [u32; 4] {
        let b = addr_bytes(a);
        core::array::from_fn(|i| u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))
    }

    /// Inverse of `addr_words`: IPv4-mapped words give an IPv4 address.
    pub fn addr_from_words(w: &[u32; 4]) -> IpAddr {
        let mut b = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
        }
        let v6 = std::net::Ipv6Addr::from(b);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    impl VipKey {
        pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
            Self { addr: addr_words(addr), port: port.to_be(), proto, _pad: 0 }
        }
    }

    impl FlowKey {
        pub fn new(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16, proto: u8) -> Self {
            Self {
                src: addr_words(src),
                dst: addr_words(dst),
                src_port: src_port.to_be(),
                dst_port: dst_port.to_be(),
                proto,
                _pad: [0; 3],
            }
        }
    }

    impl VipBloom {
        pub fn set(&mut self, addr: IpAddr) {
            let bit = vip_addr_bit(&addr_words(addr));
            self.words[(bit / 64) as usize] |= 1u64 << (bit % 64);
        }
        pub fn contains(&self, addr: IpAddr) -> bool {
            let bit = vip_addr_bit(&addr_words(addr));
            self.words[(bit / 64) as usize] & (1u64 << (bit % 64)) != 0
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_bytes, addr_from_words, addr_words};

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // Reference MurmurHash3_x86_32 vectors: 4 zero bytes and 4 0xff bytes, seed 0.
        assert_eq!(hash_words(&[0u32], 0), 0x2362_f9de);
        assert_eq!(hash_words(&[0xffff_ffffu32], 0), 0x7629_3b50);
    }

    #[test]
    fn v4_mapped_forms_agree() {
        let a: IpAddr = "10.0.0.100".parse().unwrap();
        let w = addr_words(a);
        assert_eq!(w[2], V4_MAPPED_WORD);
        assert_eq!(w[3], u32::from_ne_bytes([10, 0, 0, 100]));
        assert_eq!(v4_mapped_words(u32::from_ne_bytes([10, 0, 0, 100])), w);
        assert_eq!(addr_from_words(&w), a);
        let b: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(addr_from_words(&addr_words(b)), b);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let v: IpAddr = "10.0.0.100".parse().unwrap();
        let base = FlowKey::new(a, 40000, v, 80, PROTO_TCP);
        let h = flow_hash(&base);
        let variants = [
            FlowKey::new("192.0.2.2".parse().unwrap(), 40000, v, 80, PROTO_TCP),
            FlowKey::new(a, 40001, v, 80, PROTO_TCP),
            FlowKey::new(a, 40000, "10.0.0.101".parse().unwrap(), 80, PROTO_TCP),
            FlowKey::new(a, 40000, v, 81, PROTO_TCP),
            FlowKey::new(a, 40000, v, 80, PROTO_UDP),
        ];
        for k in variants {
            assert_ne!(flow_hash(&k), h, "{k:?}");
        }
        assert_eq!(flow_hash(&base), h);
    }

    #[test]
    fn reason_names_are_unique_and_classified() {
        let names = reason::NAMES;
        let set: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len(), "duplicate reason name");
        for (r, n) in names.iter().enumerate() {
            let r = r as u32;
            assert!(["pass_", "drop_", "tx_", "fwd_"].iter().any(|p| n.starts_with(p)), "{n}: unknown class");
            assert_eq!(n.starts_with("fwd_"), !reason::is_verdict(r), "{n}: sub-count iff fwd_");
        }
        assert_eq!(names[reason::TX_RST as usize], "tx_rst");
        assert_eq!(names[reason::DROP_REPLY_RATELIMITED as usize], "drop_reply_ratelimited");
        assert_eq!(names[reason::FWD_FRAGMENT as usize], "fwd_fragment");
    }

    #[test]
    fn pinned_maps_are_the_contracts_adopted_maps() {
        use contract::{BALANCER_MAPS, Keep};
        let adopted: std::vec::Vec<&str> = BALANCER_MAPS.iter().filter(|m| m.keep != Keep::PerLoad).map(|m| m.name).collect();
        let mut a = adopted.clone();
        let mut p = map_names::PINNED.to_vec();
        a.sort();
        p.sort();
        assert_eq!(a, p);
        let names: std::collections::BTreeSet<_> = BALANCER_MAPS.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), BALANCER_MAPS.len(), "a map declared twice");
    }

    #[test]
    fn architecture_md_carries_the_map_contract() {
        let doc = include_str!("../../ARCHITECTURE.md");
        let table = contract::markdown_table();
        let start = doc.find("<!-- map-contract -->\n").expect("ARCHITECTURE.md: <!-- map-contract --> marker") + "<!-- map-contract -->\n".len();
        let end = doc.find("<!-- /map-contract -->").expect("ARCHITECTURE.md: <!-- /map-contract --> marker");
        assert_eq!(doc[start..end].trim(), table.trim(), "ARCHITECTURE.md's map table differs from lb_common::contract; paste:\n{table}");
    }

    #[test]
    fn gue_layout_and_source_ports() {
        assert_eq!(gue::overhead(0), 16);
        assert_eq!(gue::overhead(gue::MAX_HOPS as usize), 48);
        assert_eq!(vip_mode(MODE_GUE, 6080) & MODE_MASK, MODE_GUE);
        assert_eq!(vip_gue_port(vip_mode(MODE_GUE, 6080)), 6080);
        assert_eq!(vip_mode(MODE_IPIP, 0), MODE_IPIP);
        // Every source port is in the dynamic range, and flows spread over all of it.
        let v: IpAddr = "10.0.0.100".parse().unwrap();
        let ports: std::collections::BTreeSet<u16> =
            (0..4096u16).map(|p| gue::source_port(flow_hash(&FlowKey::new("192.0.2.1".parse().unwrap(), 1024 + p, v, 80, PROTO_TCP)))).collect();
        assert!(ports.iter().all(|&p| p >= 49152));
        assert!(ports.len() > 3000, "4096 flows on {} source ports", ports.len());
    }

    #[test]
    fn bloom_sets_and_tests() {
        let mut b = VipBloom::default();
        let v: IpAddr = "10.0.0.100".parse().unwrap();
        assert!(!b.contains(v));
        b.set(v);
        assert!(b.contains(v));
        assert_eq!(b.words.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
    }
}
