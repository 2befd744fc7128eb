//! The balancer: an XDP program on the load balancer's interfaces.
//!
//! parse (Ethernet, one VLAN tag, IPv4 / IPv6 + extension headers) -> VIP prefilter ->
//! fragment / ICMP / TCP-UDP -> VIP lookup -> flow table (LRU) -> Maglev table ->
//! IPIP/IP6IP6 encapsulation or L2 rewrite -> XDP_TX. The balancer answers some packets
//! itself (XDP_TX): ICMP echo to a VIP address, TCP RST / ICMP port unreachable for a
//! service without backends, ICMP too big when the encapsulated packet exceeds the MTU.
//! Everything that is not for a VIP leaves with XDP_PASS, untouched. Every XDP_DROP,
//! every unusual XDP_PASS and every reply is counted under a named reason
//! (lb_common::reason); forwarded packets are counted per service and per backend.
#![no_std]
#![no_main]


use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_HAS_MAC, BACKEND_F_V6, BACKEND_F_VALID, BackendValue, Counter, DEFAULT_REPLY_RATE, FLOW_EVENTS_BYTES,
    FLOW_EVENTS_WAKEUP_BYTES, FRAG_F_PASS, FloodMeter, FlowEvent, FlowKey, FlowValue, FragKey, FragValue, MAX_BACKENDS, MAX_FLOWS, MAX_FRAGS, MAX_SERVICES, MAX_TABLE_SIZE,
    MAX_VIPS, MODE_DSR_L2, NO_BACKEND, ReplyBucket, SETTINGS_F_FLOW_SYNC, SETTINGS_F_HAS_GATEWAY, Settings,
    TABLES_ENTRIES, TrafficCounter, VipBloom, VipKey, VipValue, flow_hash, reason, table_index, v4_mapped_words,
    vip_addr_bit,
    contract::{FLOWS_FLAGS, TABLES_FLAGS},
};
use aya_log_ebpf::{error, warn};
use lb_ebpf::*;

// ---------------------------------------------------------------------------------
// Maps: the contract with userspace (lb_common::contract declares every one: type,
// sizes, max_entries, flags; a test checks this object against it). Pinned by lbd
// under /sys/fs/bpf/<instance>/ with these names.
// ---------------------------------------------------------------------------------

/// (VIP address, port or 0, protocol) -> service id, forwarding mode, live table slot.
#[map]
static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Every VIP address (IPv4-mapped words) -> number of services on it. Echo requests
/// are answered for these addresses only.
#[map]
static VIP_ADDRS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// One-entry bitmap over VIP addresses: a clear bit proves "not a VIP", so non-VIP
/// traffic costs one array lookup instead of two hash lookups.
#[map]
static VIP_BLOOM: Array<VipBloom> = Array::with_max_entries(1, 0);

/// Maglev rings: (service id * 2 + slot) * MAX_TABLE_SIZE + position -> backend id.
/// Two slots per service: userspace fills the idle one, then flips VipValue::active_slot.
/// Mmapable, so userspace writes a whole table with one memcpy.
#[map]
static TABLES: Array<u32> = Array::with_max_entries(TABLES_ENTRIES, TABLES_FLAGS);

/// Backend id -> address, next-hop MAC, flags, owning service.
#[map]
static BACKENDS: Array<BackendValue> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Client 5-tuple -> backend id: keeps established flows on their backend when the
/// backend set changes. One hash table shared by every CPU (a flow that lands on another
/// CPU, or is synced from the peer, is found wherever its packets arrive), with per-CPU
/// LRU lists (BPF_F_NO_COMMON_LRU): an insert takes and evicts entries of its own CPU's
/// list under that CPU's lock, so CPUs inserting at once do not contend on one global
/// LRU lock. Each CPU's list holds max_entries / possible CPUs entries.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, FLOWS_FLAGS);

/// New flows for the peer balancer (`SETTINGS_F_FLOW_SYNC`), read by lbd.
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Entry 0: flow events lost to a full FLOW_EVENTS, per CPU.
#[map]
static SYNC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0: encap sources, gateway MAC, MTU, reply rate.
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Entry 0: lb_common::contract::MAP_LAYOUT_VERSION of the pinned maps, written by lbd
/// and checked when it adopts them. The program never reads it.
#[map]
static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// Per reason (lb_common::reason) packets/bytes, per CPU.
#[map]
static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per service id packets/bytes/new flows, per CPU.
#[map]
static SERVICE_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per backend id packets/bytes/new flows, per CPU.
#[map]
static BACKEND_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

// Datapath-private state (not pinned, not written by userspace).

/// Fragmented datagram -> the destination port its first fragment carried, so later
/// fragments (no L4 header) find an exact-port service. LRU: datagrams are short-lived.
#[map]
static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// Token bucket of generated replies, per CPU (no atomics on the reply path).
#[map]
static REPLY_BUCKET: PerCpuArray<ReplyBucket> = PerCpuArray::with_max_entries(1, 0);

/// New flows recorded by this CPU in the current second (flood mode).
#[map]
static FLOOD_METER: PerCpuArray<FloodMeter> = PerCpuArray::with_max_entries(1, 0);

// ---------------------------------------------------------------------------------

/// Why we did not forward: (XDP action, reason). XDP_TX here is a reply we generated.
type Verdict = (u32, u32);

#[inline(always)]
fn pass(r: u32) -> Verdict {
    (XDP_PASS, r)
}

#[inline(always)]
fn drop_with(r: u32) -> Verdict {
    (XDP_DROP, r)
}

#[inline(always)]
fn tx(r: u32) -> Verdict {
    (XDP_TX, r)
}

#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    match balance(&ctx, len) {
        Ok(()) => XDP_TX,
        Err((action, r)) => {
            let n = count_reason(r, len);
            log_config_error(&ctx, r, n);
            action
        }
    }
}

/// Counts one packet under reason `r`; returns this CPU's count after it.
#[inline(always)]
fn count_reason(r: u32, bytes: u64) -> u64 {
    if let Some(c) = REASON_STATS.get_ptr_mut(r) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            return (*c).packets;
        }
    }
    0
}

/// Drops that only a config or control-plane problem causes are also logged (lbd
/// forwards these into its own log), on the 1st, 2nd, 4th, 8th, ... occurrence per
/// CPU: an operator sees the cause at once, and a flood costs a logarithmic number of
/// log records, never one per packet.
#[inline(always)]
fn log_config_error(ctx: &XdpContext, r: u32, n: u64) {
    if n == 0 || n & (n - 1) != 0 {
        return;
    }
    match r {
        reason::DROP_NO_NEXTHOP => {
            warn!(ctx, "drop_no_nexthop: a backend has no next-hop MAC (none configured, not in the neighbour table, no gateway_mac); {} dropped on this CPU", n)
        }
        reason::DROP_NO_ENCAP_SOURCE => {
            warn!(ctx, "drop_no_encap_source: no encap source for the backend's address family (set encap_source_v4/v6); {} dropped on this CPU", n)
        }
        reason::DROP_BAD_STATE => {
            error!(ctx, "drop_bad_state: a table names a backend without a valid entry (control-plane inconsistency); {} dropped on this CPU", n)
        }
        _ => {}
    }
}

#[inline(always)]
fn count_traffic(map: &PerCpuArray<TrafficCounter>, idx: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

/// `FlowKey` / `FragKey` as whole words: a struct literal with a zeroed `[u8; 3]` pad
/// makes LLVM emit a call to memset (a BPF-to-BPF call on the hot path).
#[repr(C)]
struct KeyWords {
    src: [u32; 4],
    dst: [u32; 4],
    /// FlowKey: source port | destination port << 16 (source port first in memory).
    /// FragKey: the datagram id.
    w8: u32,
    /// Protocol and three zero pad bytes.
    proto: u32,
}
const _: () = assert!(core::mem::size_of::<KeyWords>() == core::mem::size_of::<FlowKey>());
const _: () = assert!(core::mem::size_of::<KeyWords>() == core::mem::size_of::<FragKey>());

#[inline(always)]
fn flow_key(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    let w = KeyWords { src: *src, dst: *dst, w8: src_port as u32 | (dst_port as u32) << 16, proto: proto as u32 };
    // SAFETY: same size, alignment 4, every bit pattern valid, pad bytes zero.
    unsafe { core::mem::transmute::<KeyWords, FlowKey>(w) }
}

#[inline(always)]
fn frag_key(src: &[u32; 4], dst: &[u32; 4], id: u32, proto: u8) -> FragKey {
    let w = KeyWords { src: *src, dst: *dst, w8: id, proto: proto as u32 };
    // SAFETY: as above.
    unsafe { core::mem::transmute::<KeyWords, FragKey>(w) }
}

/// Not a fragment, or an IPv6 atomic fragment (offset 0, no more fragments).
const FRAG_NONE: u8 = 0;
/// First fragment: carries the L4 header.
const FRAG_FIRST: u8 = 1;
/// Later fragment: no L4 header.
const FRAG_LATER: u8 = 2;

/// Extension headers walked before the upper-layer header (constant loop bound).
const MAX_IPV6_EXT: usize = 4;

/// Largest quote of the offending packet in an ICMP error we generate: the whole
/// reply stays within 576 bytes (IPv4, RFC 1812) / 1280 bytes (IPv6, RFC 4443).
const QUOTE4_MAX: usize = 576 - IPV4_LEN - 8;
const QUOTE6_MAX: usize = 1280 - IPV6_LEN - 8;

/// What the parser learned about an IP packet addressed to a (maybe) VIP address.
struct Ip {
    /// The VLAN tag's TPID (native load) or 0 when untagged (IP header at 14 or 18).
    tpid: u16,
    v6: bool,
    /// Length of the IP packet (header included), host order.
    ip_len: u32,
    /// Traffic class / TOS byte of the packet, copied to the outer header.
    tos: u8,
    /// Upper-layer protocol (after IPv6 extension headers).
    proto: u8,
    /// Offset of the upper-layer header in the frame, and bytes from it to the end of
    /// the IP packet.
    l4_off: usize,
    l4_len: usize,
    frag: u8,
    frag_id: u32,
    /// Client and VIP address (IPv4-mapped for IPv4), network order.
    src: [u32; 4],
    dst: [u32; 4],
}

impl Ip {
    /// Offset of the IP header, a constant per tag (the verifier needs constants after
    /// bpf_xdp_adjust_head/tail).
    #[inline(always)]
    fn l3_off(&self) -> usize {
        if self.tpid != 0 { ETH_LEN + VLAN_LEN } else { ETH_LEN }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext, len: u64) -> Result<(), Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(drop_with(reason::DROP_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at.
    let mut ethertype = unsafe { (*eth).ether_type };
    let mut l3_off = ETH_LEN;
    let mut tpid = 0;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_LEN).ok_or(drop_with(reason::DROP_MALFORMED))?;
        tpid = ethertype;
        ethertype = unsafe { (*vlan).ether_type };
        l3_off += VLAN_LEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(pass(reason::PASS_VLAN_STACKED));
        }
    }
    let ip = if ethertype == ETH_P_IP {
        parse_v4(ctx, l3_off, tpid)?
    } else if ethertype == ETH_P_IPV6 {
        parse_v6(ctx, l3_off, tpid)?
    } else {
        return Err(pass(reason::PASS_NOT_IP));
    };

    if ip.frag != FRAG_NONE {
        return forward_fragment(ctx, &ip, len);
    }
    if ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP {
        return forward_l4(ctx, &ip, len);
    }
    if (!ip.v6 && ip.proto == IPPROTO_ICMP) || (ip.v6 && ip.proto == IPPROTO_ICMPV6) {
        return icmp(ctx, &ip, len);
    }
    Err(pass(reason::PASS_OTHER_PROTO))
}

/// Bloom prefilter over VIP addresses.
#[inline(always)]
fn maybe_vip(addr: &[u32; 4]) -> bool {
    let bit = vip_addr_bit(addr);
    match VIP_BLOOM.get(0) {
        Some(b) => (b.words[(bit >> 6) as usize & 63] >> (bit & 63)) & 1 != 0,
        None => false,
    }
}

/// The service of (address, port, protocol), exact port first, then port 0.
#[inline(always)]
fn lookup_vip(addr: &[u32; 4], port: u16, proto: u8) -> Option<VipValue> {
    let mut vk = VipKey { addr: *addr, port, proto, _pad: 0 };
    if port != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(v) = unsafe { VIPS.get(vk) } {
            return Some(*v);
        }
        vk.port = 0;
    }
    // SAFETY: as above.
    unsafe { VIPS.get(vk) }.copied()
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3_off: usize, tpid: u16) -> Result<Ip, Verdict> {
    let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 20 bytes of IPv4 header are in bounds.
    let (vihl, daddr) = unsafe { (*ip, ld32(ip.add(16))) };
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || hlen < IPV4_LEN {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    let dst = v4_mapped_words(daddr);
    if !maybe_vip(&dst) {
        return Err(pass(reason::PASS_NOT_VIP));
    }
    // The rest only for VIP traffic (loaded after the map lookup, so the pass path does
    // not load and spill them).
    // SAFETY: as above.
    let (tos, tot_len, id, frags, proto, saddr) = unsafe {
        (*ip.add(1), u16::from_be(ld16(ip.add(2))) as usize, ld16(ip.add(4)), ld16(ip.add(6)), *ip.add(9), ld32(ip.add(12)))
    };
    if tot_len < hlen || !fits(ctx, l3_off, tot_len) {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    let frag = if frags & IP_OFFSET != 0 {
        FRAG_LATER
    } else if frags & IP_MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    Ok(Ip {
        tpid,
        v6: false,
        ip_len: tot_len as u32,
        tos,
        proto,
        l4_off: l3_off + hlen,
        l4_len: tot_len - hlen,
        frag,
        frag_id: id as u32,
        src: v4_mapped_words(saddr),
        dst,
    })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3_off: usize, tpid: u16) -> Result<Ip, Verdict> {
    let ip: *const u8 = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 40 bytes of IPv6 header are in bounds.
    let v0 = unsafe { *ip };
    if v0 >> 4 != 6 {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    let dst = unsafe { [ld32(ip.add(24)), ld32(ip.add(28)), ld32(ip.add(32)), ld32(ip.add(36))] };
    if !maybe_vip(&dst) {
        return Err(pass(reason::PASS_NOT_VIP));
    }
    // SAFETY: as above.
    let (v1, payload_len, first_nh) = unsafe { (*ip.add(1), u16::from_be(ld16(ip.add(4))) as usize, *ip.add(6)) };
    if !fits(ctx, l3_off, IPV6_LEN + payload_len) {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    let src = unsafe { [ld32(ip.add(8)), ld32(ip.add(12)), ld32(ip.add(16)), ld32(ip.add(20))] };
    // Walk hop-by-hop, routing, destination options and fragment headers (at most
    // MAX_IPV6_EXT) to the upper-layer header. Offsets stay relative to the payload
    // (bounded by payload_len) so the verifier can bound every packet pointer.
    let mut nh = first_nh;
    let mut off = 0usize;
    let mut frag = FRAG_NONE;
    let mut frag_id = 0u32;
    let mut i = 0;
    while i < MAX_IPV6_EXT {
        // black_box: LLVM can prove `off + 8 <= payload_len` makes the packet bounds
        // check redundant (the whole payload fits) and drops it; the verifier cannot.
        let hdr_off = core::hint::black_box(l3_off + IPV6_LEN + off);
        if nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS {
            let h: *const u8 = ptr_at::<[u8; 8]>(ctx, hdr_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
            // SAFETY: 8 bytes (the smallest extension header) in bounds.
            let (next, hl) = unsafe { (*h, (*h.add(1) as usize + 1) * 8) };
            if off + hl > payload_len {
                return Err(drop_with(reason::DROP_MALFORMED));
            }
            nh = next;
            off += hl;
        } else if nh == IPPROTO_FRAGMENT {
            let h: *const u8 = ptr_at::<[u8; 8]>(ctx, hdr_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
            if off + 8 > payload_len {
                return Err(drop_with(reason::DROP_MALFORMED));
            }
            // SAFETY: 8 bytes of fragment header in bounds.
            let (next, resv, fo, id) = unsafe { (*h, *h.add(1), u16::from_be(ld16(h.add(2))), ld32(h.add(4))) };
            // A real fragment header has its reserved byte and bits zero. A packet that
            // only claims next header 44 (an upper-layer header follows) is no later
            // fragment: never steer it, or whatever follows, by a guessed id.
            if resv != 0 || fo & 0x0006 != 0 {
                return Err(drop_with(reason::DROP_MALFORMED));
            }
            nh = next;
            off += 8;
            frag_id = id;
            if fo & 0xfff8 != 0 {
                // A later fragment: what follows is data, not a header.
                frag = FRAG_LATER;
                break;
            }
            if fo & 1 != 0 {
                frag = FRAG_FIRST;
            }
        } else {
            break;
        }
        i += 1;
    }
    if frag != FRAG_LATER && nh == IPPROTO_FRAGMENT {
        // A fragment header beyond the walk's bound: its datagram cannot be steered.
        return Err(drop_with(reason::DROP_FRAGMENT_ORPHAN));
    }
    if frag != FRAG_LATER && is_ipv6_ext(nh) {
        // More than MAX_IPV6_EXT headers, or AH/ESP/mobility/...: not ours to parse.
        return Err(pass(reason::PASS_IPV6_EXT));
    }
    Ok(Ip {
        tpid,
        v6: true,
        ip_len: (IPV6_LEN + payload_len) as u32,
        tos: (v0 << 4) | (v1 >> 4),
        proto: nh,
        l4_off: l3_off + IPV6_LEN + off,
        l4_len: payload_len - off,
        frag,
        frag_id,
        src,
        dst,
    })
}

/// Ports and TCP flags of a TCP/UDP header (bounds-checked against the frame and the
/// IP length, else malformed).
#[inline(always)]
fn parse_l4(ctx: &XdpContext, ip: &Ip) -> Result<(u16, u16, u8), Verdict> {
    if ip.proto == IPPROTO_TCP {
        let t: *const u8 = ptr_at::<TcpHdr>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
        // SAFETY: 20 bytes of TCP header are in bounds.
        let (sport, dport, doff, flags) = unsafe { (ld16(t), ld16(t.add(2)), *t.add(12) >> 4, *t.add(13)) };
        if doff < 5 || ip.l4_len < (doff as usize) * 4 {
            return Err(drop_with(reason::DROP_MALFORMED));
        }
        Ok((sport, dport, flags))
    } else {
        let u: *const u8 = ptr_at::<UdpHdr>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
        if ip.l4_len < 8 {
            return Err(drop_with(reason::DROP_MALFORMED));
        }
        // SAFETY: 8 bytes of UDP header are in bounds.
        unsafe { Ok((ld16(u), ld16(u.add(2)), 0)) }
    }
}

/// TCP/UDP to a VIP address: service, backend, forward; an empty service answers.
#[inline(always)]
fn forward_l4(ctx: &XdpContext, ip: &Ip, len: u64) -> Result<(), Verdict> {
    let (sport, dport, tcp_flags) = parse_l4(ctx, ip)?;
    let vip = lookup_vip(&ip.dst, dport, ip.proto).ok_or(pass(reason::PASS_NO_SERVICE))?;
    let flow = flow_key(&ip.src, &ip.dst, sport, dport, ip.proto);
    let tcp = ip.proto == IPPROTO_TCP;
    let rst = tcp && tcp_flags & TCP_RST != 0;
    // A SYN opens a flow: skip the flow-table lookup (as Katran does) and take the
    // Maglev pick. A retransmitted SYN is re-recorded on the same backend unless the
    // backend set changed in between, when the handshake restarts on the new pick.
    let syn = tcp && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (id, be, pick) = match pick_backend(&vip, &flow, !syn, !rst) {
        Ok(p) => p,
        Err((_, r)) if r == reason::DROP_NO_BACKEND => {
            // Answer at once so the client fails fast (never answer a RST).
            return if rst {
                Err(drop_with(reason::DROP_NO_BACKEND))
            } else if ip.proto == IPPROTO_TCP {
                tcp_reset(ctx, ip)
            } else if ip.v6 {
                icmp_error_reply(ctx, ip, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, reason::TX_PORT_UNREACHABLE)
            } else {
                icmp_error_reply(ctx, ip, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, reason::TX_PORT_UNREACHABLE)
            };
        }
        Err(e) => return Err(e),
    };
    forward(ctx, ip, &vip, id, &be, pick == PICK_RECORDED, len, true)?;
    if pick == PICK_FLOOD {
        count_reason(reason::FWD_FLOOD_UNRECORDED, len);
    } else if pick == PICK_INSERT_FAILED {
        count_reason(reason::FWD_INSERT_FAILED, len);
    }
    Ok(())
}

/// A fragment of a TCP/UDP datagram. The first fragment carries the ports: they are
/// remembered in FRAGS, and every fragment is steered by the full 5-tuple (flow table,
/// then Maglev), exactly like whole datagrams of the same flow. A later fragment that
/// arrives before its first has no ports: with a port-0 service it is steered by the
/// port-less hash (counted, it may reach another backend than the rest of its datagram);
/// else it is dropped as an orphan. Fragments never create flow-table entries.
#[inline(always)]
fn forward_fragment(ctx: &XdpContext, ip: &Ip, len: u64) -> Result<(), Verdict> {
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        // No service protocol: the stack's (ICMP, GRE, ... to the VIP address).
        return Err(pass(reason::PASS_FRAGMENT));
    }
    let fk = frag_key(&ip.src, &ip.dst, ip.frag_id, ip.proto);
    let (sport, dport) = if ip.frag == FRAG_FIRST {
        let p = ptr_at::<[u8; 4]>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
        if ip.l4_len < 4 {
            return Err(drop_with(reason::DROP_MALFORMED));
        }
        // SAFETY: 4 bytes (both ports) in bounds.
        let (sport, dport) = unsafe { (ld16(p), ld16(p.add(2))) };
        let passed = lookup_vip(&ip.dst, dport, ip.proto).is_none();
        // A failed insert only costs the later fragments (dropped as orphans).
        let v = FragValue { src_port: sport, dst_port: dport, flags: if passed { FRAG_F_PASS } else { 0 } };
        let _ = FRAGS.insert(fk, v, 0);
        if passed {
            return Err(pass(reason::PASS_FRAGMENT));
        }
        (sport, dport)
    } else if let Some(v) = unsafe { FRAGS.get(fk) } {
        // SAFETY (above): the value is copied out at once.
        if v.flags & FRAG_F_PASS != 0 {
            return Err(pass(reason::PASS_FRAGMENT));
        }
        (v.src_port, v.dst_port)
    } else {
        let vip = lookup_vip(&ip.dst, 0, ip.proto).ok_or(drop_with(reason::DROP_FRAGMENT_ORPHAN))?;
        let flow = flow_key(&ip.src, &ip.dst, 0, 0, ip.proto);
        let (id, be, _) = pick_backend(&vip, &flow, false, false)?;
        forward(ctx, ip, &vip, id, &be, false, len, true)?;
        count_reason(reason::FWD_FRAGMENT, len);
        count_reason(reason::FWD_FRAGMENT_PORTLESS, len);
        return Ok(());
    };
    let vip = lookup_vip(&ip.dst, dport, ip.proto).ok_or(pass(reason::PASS_FRAGMENT))?;
    let flow = flow_key(&ip.src, &ip.dst, sport, dport, ip.proto);
    let (id, be, _) = pick_backend(&vip, &flow, true, false)?;
    forward(ctx, ip, &vip, id, &be, false, len, true)?;
    count_reason(reason::FWD_FRAGMENT, len);
    Ok(())
}

/// ICMP/ICMPv6 to a VIP address: echo requests are answered, errors about a VIP flow
/// go to that flow's backend, the rest passes.
#[inline(always)]
fn icmp(ctx: &XdpContext, ip: &Ip, len: u64) -> Result<(), Verdict> {
    let h: *const u8 = ptr_at::<[u8; 8]>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    if ip.l4_len < 8 {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    // SAFETY: 8 bytes of ICMP header in bounds.
    let (ty, code) = unsafe { (*h, *h.add(1)) };
    if ip.v6 {
        if ty == ICMPV6_ECHO_REQUEST && code == 0 {
            return echo_reply(ctx, ip);
        }
        if ty == ICMPV6_DEST_UNREACH || ty == ICMPV6_PKT_TOOBIG {
            return steer_icmp_error(ctx, ip, len);
        }
    } else {
        if ty == ICMP_ECHO && code == 0 {
            return echo_reply(ctx, ip);
        }
        if ty == ICMP_DEST_UNREACH {
            return steer_icmp_error(ctx, ip, len);
        }
    }
    Err(pass(reason::PASS_ICMP))
}

/// Whether any service (any port, any protocol) has this VIP address: one lookup in
/// VIP_ADDRS, which userspace keeps with the bloom filter.
#[inline(always)]
fn is_vip_address(addr: &[u32; 4]) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { VIP_ADDRS.get(addr).is_some() }
}

/// Takes one reply token from this CPU's bucket (rate per second, burst one second).
#[inline(always)]
fn reply_allowed() -> bool {
    let rate = match SETTINGS.get(0) {
        Some(s) if s.reply_rate != 0 => s.reply_rate as u64,
        _ => DEFAULT_REPLY_RATE as u64,
    };
    let Some(b) = REPLY_BUCKET.get_ptr_mut(0) else { return false };
    const NS: u64 = 1_000_000_000;
    // SAFETY: ktime is always callable; the bucket is this CPU's.
    unsafe {
        let now = bpf_ktime_get_ns();
        let mut elapsed = now.wrapping_sub((*b).last_ns);
        if elapsed > NS {
            elapsed = NS;
        }
        let mut credit = (*b).credit + elapsed * rate;
        if credit > rate * NS {
            credit = rate * NS;
        }
        (*b).last_ns = now;
        if credit < NS {
            (*b).credit = credit;
            return false;
        }
        (*b).credit = credit - NS;
    }
    true
}

/// A MAC address as one 32-bit and one 16-bit word: 4-byte aligned on the stack (the
/// verifier rejects misaligned stack access, unlike packet access).
#[derive(Clone, Copy)]
struct Mac {
    hi: u32,
    lo: u16,
}

impl Mac {
    /// # Safety
    /// `p` must point to 6 readable bytes.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> Self {
        unsafe { Mac { hi: ld32(p), lo: ld16(p.add(4)) } }
    }

    /// # Safety
    /// `p` must point to 6 writable bytes.
    #[inline(always)]
    unsafe fn store(self, p: *mut u8) {
        unsafe {
            st32(p, self.hi);
            st16(p.add(4), self.lo);
        }
    }
}

/// L2 fields of the frame as it arrived.
struct L2 {
    /// Destination MAC (our interface) and source MAC (the sender / router).
    ours: Mac,
    peer: Mac,
    tci: u16,
}

#[inline(always)]
fn save_l2(ctx: &XdpContext, tpid: u16) -> Result<L2, Verdict> {
    let e: *const u8 = ptr_at::<EthHdr>(ctx, 0).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 14 bytes in bounds.
    let mut l2 = unsafe { L2 { ours: Mac::load(e), peer: Mac::load(e.add(6)), tci: 0 } };
    if tpid != 0 {
        let v: *const u8 = ptr_at::<VlanHdr>(ctx, ETH_LEN).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
        // SAFETY: 4 bytes of VLAN header in bounds.
        l2.tci = unsafe { ld16(v) };
    }
    Ok(l2)
}

/// Writes the L2 header (with the tag if `tpid` is set) at the frame's start.
#[inline(always)]
fn write_l2(ctx: &XdpContext, tpid: u16, tci: u16, dst: Mac, src: Mac, ethertype: u16) -> Result<(), Verdict> {
    let eth: *mut u8 = ptr_at::<EthHdr>(ctx, 0).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 14 bytes in bounds (ptr_at above).
    unsafe {
        dst.store(eth);
        src.store(eth.add(6));
    }
    if tpid != 0 {
        let v: *mut u8 = ptr_at::<[u8; ETH_LEN + VLAN_LEN]>(ctx, 0).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
        // SAFETY: 18 bytes in bounds.
        unsafe {
            st16(v.add(12), tpid);
            st16(v.add(14), tci);
            st16(v.add(16), ethertype);
        }
    } else {
        // SAFETY: 14 bytes in bounds.
        unsafe { st16(eth.add(12), ethertype) };
    }
    Ok(())
}

/// Shrinks the frame to `want` bytes (never grows it).
#[inline(always)]
fn trim_to(ctx: &XdpContext, want: usize) -> Result<(), Verdict> {
    let cur = ctx.data_end() - ctx.data();
    if cur > want {
        // SAFETY: plain helper call on our own context.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((cur - want) as i32)) } != 0 {
            return Err(drop_with(reason::DROP_ADJUST_HEAD));
        }
    }
    Ok(())
}

/// Writes a 20-byte IPv4 header (no options, id 0) at `l3` with its checksum.
#[inline(always)]
fn write_ipv4(ctx: &XdpContext, l3: usize, tot_len: u16, frags: u16, proto: u8, src: u32, dst: u32) -> Result<(), Verdict> {
    let o: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 20 bytes in bounds.
    unsafe {
        *o = 0x45;
        *o.add(1) = 0;
        st16(o.add(2), tot_len.to_be());
        st16(o.add(4), 0);
        st16(o.add(6), frags);
        *o.add(8) = OUTER_TTL;
        *o.add(9) = proto;
        st16(o.add(10), 0);
        st32(o.add(12), src);
        st32(o.add(16), dst);
        st16(o.add(10), ipv4_csum20(o));
    }
    Ok(())
}

/// Writes a 40-byte IPv6 header (traffic class and flow label 0) at `l3`.
#[inline(always)]
fn write_ipv6(ctx: &XdpContext, l3: usize, payload_len: u16, nh: u8, src: &[u32; 4], dst: &[u32; 4]) -> Result<(), Verdict> {
    let o: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, l3).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 40 bytes in bounds.
    unsafe {
        st32(o, (6u32 << 28).to_be());
        st16(o.add(4), payload_len.to_be());
        *o.add(6) = nh;
        *o.add(7) = OUTER_TTL;
        let mut i = 0;
        while i < 4 {
            st32(o.add(8 + 4 * i), src[i]);
            st32(o.add(24 + 4 * i), dst[i]);
            i += 1;
        }
    }
    Ok(())
}

/// ICMP echo request to a VIP address: answered in place (MACs, addresses swapped,
/// type -> reply, checksum updated incrementally, TTL / hop limit 64). IPv4 options and
/// IPv6 extension headers: passed (the reply would have to mirror them).
#[inline(always)]
fn echo_reply(ctx: &XdpContext, ip: &Ip) -> Result<(), Verdict> {
    let l3 = ip.l3_off();
    let hdr = if ip.v6 { IPV6_LEN } else { IPV4_LEN };
    if ip.l4_off != l3 + hdr || !is_vip_address(&ip.dst) {
        return Err(pass(reason::PASS_ICMP));
    }
    if !reply_allowed() {
        return Err(drop_with(reason::DROP_REPLY_RATELIMITED));
    }
    let l2 = save_l2(ctx, ip.tpid)?;
    let ethertype = if ip.v6 { ETH_P_IPV6 } else { ETH_P_IP };
    write_l2(ctx, ip.tpid, l2.tci, l2.peer, l2.ours, ethertype)?;
    if ip.v6 {
        let o: *mut u8 = ptr_at::<[u8; IPV6_LEN + 8]>(ctx, l3).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
        // SAFETY: IPv6 header and ICMPv6 header in bounds.
        unsafe {
            *o.add(7) = OUTER_TTL;
            let mut i = 0;
            while i < 4 {
                st32(o.add(8 + 4 * i), ip.dst[i]);
                st32(o.add(24 + 4 * i), ip.src[i]);
                i += 1;
            }
            // The pseudo-header sum is unchanged by the swap: only the type changes.
            set_icmp_type(o.add(IPV6_LEN), ICMPV6_ECHO_REPLY);
        }
    } else {
        let o: *mut u8 = ptr_at::<[u8; IPV4_LEN + 8]>(ctx, l3).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
        // SAFETY: IPv4 header (IHL 5, checked above) and ICMP header in bounds.
        unsafe {
            *o.add(8) = OUTER_TTL;
            st32(o.add(12), ip.dst[3]);
            st32(o.add(16), ip.src[3]);
            st16(o.add(10), 0);
            st16(o.add(10), ipv4_csum20(o));
            set_icmp_type(o.add(IPV4_LEN), ICMP_ECHO_REPLY);
        }
    }
    Err(tx(reason::TX_ECHO_REPLY))
}

/// Sets the ICMP type and updates the checksum incrementally (RFC 1624, eqn. 3).
///
/// # Safety
/// `h` must point to 4 writable bytes (type, code, checksum).
#[inline(always)]
unsafe fn set_icmp_type(h: *mut u8, ty: u8) {
    unsafe {
        let old = ld16(h);
        *h = ty;
        let new = ld16(h);
        let hc = ld16(h.add(2));
        // Eqn. 3 yields 0x0000 where the message sums to zero (id 0, seq 0, zero
        // payload): the right checksum is then 0xffff, which Linux accepts; for any
        // other message 0xffff is equally valid, so the mapping is always safe.
        let sum = csum_fold((!hc) as u32 + (!old) as u32 + new as u32);
        st16(h.add(2), if sum == 0 { 0xffff } else { sum });
    }
}

/// ICMP error about a VIP flow (IPv4 destination unreachable incl. fragmentation
/// needed; ICMPv6 destination unreachable, packet too big): the embedded packet is one
/// the backend sent from the VIP to the client, so its addresses and ports swapped are
/// the client's flow. That flow's backend gets the whole ICMP packet.
#[inline(always)]
fn steer_icmp_error(ctx: &XdpContext, ip: &Ip, len: u64) -> Result<(), Verdict> {
    const BAD: Verdict = (XDP_PASS, reason::PASS_ICMP_ERROR);
    let inner = ip.l4_off + 8;
    let (vip_addr, client, l4, proto) = if ip.v6 {
        let h: *const u8 = ptr_at::<Ipv6Hdr>(ctx, inner).ok_or(BAD)? as *const u8;
        // SAFETY: 40 bytes of embedded IPv6 header in bounds.
        let (v, nh, s, d) = unsafe {
            (
                *h >> 4,
                *h.add(6),
                [ld32(h.add(8)), ld32(h.add(12)), ld32(h.add(16)), ld32(h.add(20))],
                [ld32(h.add(24)), ld32(h.add(28)), ld32(h.add(32)), ld32(h.add(36))],
            )
        };
        if v != 6 {
            return Err(BAD);
        }
        (s, d, inner + IPV6_LEN, nh)
    } else {
        let h: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner).ok_or(BAD)? as *const u8;
        // SAFETY: 20 bytes of embedded IPv4 header in bounds.
        let (vihl, frags, p, s, d) = unsafe { (*h, ld16(h.add(6)), *h.add(9), ld32(h.add(12)), ld32(h.add(16))) };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        // A non-first fragment quotes no ports.
        if vihl >> 4 != 4 || ihl < IPV4_LEN || frags & IP_OFFSET != 0 {
            return Err(BAD);
        }
        (v4_mapped_words(s), v4_mapped_words(d), inner + ihl, p)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(BAD);
    }
    // The first 8 bytes of the embedded L4 header, inside the ICMP packet.
    let p: *const u8 = ptr_at::<[u8; 8]>(ctx, l4).ok_or(BAD)? as *const u8;
    if l4 + 8 > ip.l4_off + ip.l4_len {
        return Err(BAD);
    }
    // SAFETY: 8 bytes in bounds.
    let (vip_port, client_port) = unsafe { (ld16(p), ld16(p.add(2))) };
    let vip = lookup_vip(&vip_addr, vip_port, proto).ok_or(BAD)?;
    let flow = flow_key(&client, &vip_addr, client_port, vip_port, proto);
    let (id, be, _) = pick_backend(&vip, &flow, true, false)?;
    // Never answer an ICMP error with one: too big is a plain drop here.
    forward(ctx, ip, &vip, id, &be, false, len, false)?;
    count_reason(reason::FWD_ICMP_ERROR, len);
    Ok(())
}

/// `pick_backend`'s third result: how the backend was found.
type Pick = u8;
/// The flow-table entry (an existing flow).
const PICK_EXISTING: Pick = 0;
/// The Maglev pick, recorded in the flow table: a new flow.
const PICK_RECORDED: Pick = 1;
/// The Maglev pick, not recorded (`create` false: RST, ICMP error, fragment).
const PICK_UNRECORDED: Pick = 2;
/// The Maglev pick, not recorded: this CPU is above its new-flow limit (flood mode).
const PICK_FLOOD: Pick = 3;
/// The Maglev pick, not recorded: the insert failed.
const PICK_INSERT_FAILED: Pick = 4;

/// The flow's backend: its flow-table entry (if `lookup`) when that backend still
/// serves this service, else the Maglev pick (recorded in the flow table if `create`
/// and this CPU is within its new-flow limit).
#[inline(always)]
fn pick_backend(vip: &VipValue, flow: &FlowKey, lookup: bool, create: bool) -> Result<(u32, BackendValue, Pick), Verdict> {
    if vip.service_id >= MAX_SERVICES {
        return Err(drop_with(reason::DROP_BAD_STATE));
    }
    if lookup && let Some(fv) = FLOWS.get_ptr_mut(flow) {
        // SAFETY: a live map value; its fields are read once.
        let (id, reported) = unsafe { ((*fv).backend_id, (*fv).created_ns) };
        if let Some(be) = BACKENDS.get(id)
            && be.flags & BACKEND_F_VALID != 0
            && be.service_id == vip.service_id
        {
            if create && reported == 0 {
                report_proven_flow(fv, flow, id, vip.service_id);
            }
            return Ok((id, *be, PICK_EXISTING));
        }
    }
    let m = vip.table_size;
    if m == 0 || m > MAX_TABLE_SIZE {
        return Err(drop_with(reason::DROP_BAD_STATE));
    }
    let pos = flow_hash(flow) % m;
    let id = *TABLES
        .get(table_index(vip.service_id, vip.active_slot, pos))
        .ok_or(drop_with(reason::DROP_BAD_STATE))?;
    if id == NO_BACKEND {
        return Err(drop_with(reason::DROP_NO_BACKEND));
    }
    let be = *BACKENDS.get(id).ok_or(drop_with(reason::DROP_BAD_STATE))?;
    if be.flags & BACKEND_F_VALID == 0 {
        return Err(drop_with(reason::DROP_BAD_STATE));
    }
    if !create {
        return Ok((id, be, PICK_UNRECORDED));
    }
    let settings = SETTINGS.get(0);
    let limit = settings.map_or(0, |s| s.max_new_flows);
    if limit != 0 && over_new_flow_limit(limit) {
        return Ok((id, be, PICK_FLOOD));
    }
    // No clock read: nothing reads a flow's age (the LRU evicts by use).
    let v = FlowValue { backend_id: id, _pad: 0, created_ns: 0 };
    // A failed insert (map full of in-flight updates) only costs stickiness for this
    // packet; the next packet retries.
    if FLOWS.insert(flow, v, 0).is_err() {
        return Ok((id, be, PICK_INSERT_FAILED));
    }
    // A new flow is one we recorded; a RST that misses is forwarded but not remembered.
    Ok((id, be, PICK_RECORDED))
}

/// Flood mode: counts one new flow in this CPU's one-second window and says whether the
/// window is over `limit`. The coarse clock (jiffies resolution, a few ns) is enough for
/// a one-second window; it is read only when a limit is set.
#[inline(always)]
fn over_new_flow_limit(limit: u32) -> bool {
    const NS: u64 = 1_000_000_000;
    let Some(m) = FLOOD_METER.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU value, no concurrent writer on this CPU; the helper is always
    // callable from XDP.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*m).window_ns) >= NS {
            (*m).window_ns = now;
            (*m).count = 0;
        }
        (*m).count += 1;
        (*m).count > limit as u64
    }
}

/// Flow sync reports a flow on its second packet, once it proves real: a flow whose
/// entry the datapath recorded (`created_ns` 0) is reported when a packet hits it while
/// sync is on, then marked with the (coarse) time of the report. A SYN flood therefore
/// costs the sync channel nothing; a flow synced in from the peer (lbd writes its clock)
/// is never reported back; a node that becomes active reports its live flows as their
/// next packets arrive. A flow that fails over before its second packet is steered by
/// its Maglev pick on the peer, the same backend while both nodes have the same set.
#[inline(always)]
fn report_proven_flow(fv: *mut FlowValue, flow: &FlowKey, backend_id: u32, service_id: u32) {
    if !SETTINGS.get(0).is_some_and(|s| s.flags & SETTINGS_F_FLOW_SYNC != 0) {
        return;
    }
    report_new_flow(flow, backend_id, service_id);
    // SAFETY: a live map value; a racing CPU at worst reports the flow twice (the peer
    // writes the same entry twice). The helper is always callable.
    unsafe { (*fv).created_ns = bpf_ktime_get_coarse_ns() | 1 };
}

/// Hands a flow to userspace for the peer balancer. The reader is not woken per
/// event (a wakeup costs the sender an IPI and the reader a context switch per flow):
/// lbd drains the ring on a short timer, and only a ring a quarter full wakes it at
/// once. A full ring (userspace behind) loses the event, counted in SYNC_STATS;
/// forwarding goes on.
#[inline(always)]
fn report_new_flow(flow: &FlowKey, backend_id: u32, service_id: u32) {
    let ev = FlowEvent { key: *flow, backend_id, service_id };
    let wake = if FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= FLOW_EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if FLOW_EVENTS.output::<FlowEvent>(&ev, wake as u64).is_err()
        && let Some(c) = SYNC_STATS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Sends the packet to its backend (dsr-l2 or ipip) and counts it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    ip: &Ip,
    vip: &VipValue,
    id: u32,
    be: &BackendValue,
    new_flow: bool,
    len: u64,
    may_answer_too_big: bool,
) -> Result<(), Verdict> {
    if vip.mode == MODE_DSR_L2 {
        rewrite_l2(ctx, be)?;
    } else {
        encapsulate(ctx, ip, be, may_answer_too_big)?;
    }
    count_traffic(&SERVICE_STATS, vip.service_id, len, new_flow);
    count_traffic(&BACKEND_STATS, id, len, new_flow);
    Ok(())
}

/// dsr-l2: destination MAC := backend's, source MAC := the address the frame was sent
/// to (this balancer's interface), so switches never learn a client's MAC on our port.
#[inline(always)]
fn rewrite_l2(ctx: &XdpContext, be: &BackendValue) -> Result<(), Verdict> {
    if be.flags & BACKEND_F_HAS_MAC == 0 {
        return Err(drop_with(reason::DROP_NO_NEXTHOP));
    }
    let eth: *mut u8 = ptr_at::<EthHdr>(ctx, 0).ok_or(drop_with(reason::DROP_MALFORMED))? as *mut u8;
    // SAFETY: 14 bytes of Ethernet header are in bounds.
    unsafe {
        Mac::load(eth).store(eth.add(6));
        Mac::load(be.mac.as_ptr()).store(eth);
    }
    Ok(())
}

/// ipip: prepend an outer IPv4 (proto 4/41) or IPv6 (next header 4/41) header from our
/// encap source to the backend, keep the VLAN tag, address the frame to the next hop.
/// Over the MTU: ICMP too big to the client when DF is set (IPv4) or always (IPv6),
/// unless the packet is itself an ICMP error (`may_answer_too_big` false); else dropped.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, ip: &Ip, be: &BackendValue, may_answer_too_big: bool) -> Result<(), Verdict> {
    let settings = SETTINGS.get(0).ok_or(drop_with(reason::DROP_BAD_STATE))?;
    // SAFETY: both MAC fields are 6 bytes at 4-byte aligned offsets.
    let nh_mac = if be.flags & BACKEND_F_HAS_MAC != 0 {
        unsafe { Mac::load(be.mac.as_ptr()) }
    } else if settings.flags & SETTINGS_F_HAS_GATEWAY != 0 {
        unsafe { Mac::load(settings.gateway_mac.as_ptr()) }
    } else {
        return Err(drop_with(reason::DROP_NO_NEXTHOP));
    };
    let outer_v6 = be.flags & BACKEND_F_V6 != 0;
    let hdr_len: usize = if outer_v6 { IPV6_LEN } else { IPV4_LEN };
    let mtu = if settings.mtu == 0 { 1500 } else { settings.mtu };
    if ip.ip_len + hdr_len as u32 > mtu {
        // Answered with or without DF (as Katran does): we never fragment, and the
        // sender can fragment once it knows the size; we forward fragments.
        if may_answer_too_big {
            let room = mtu.saturating_sub(hdr_len as u32);
            return if ip.v6 {
                icmp_error_reply(ctx, ip, ICMPV6_PKT_TOOBIG, 0, if room < 1280 { 1280 } else { room }, reason::TX_TOO_BIG)
            } else {
                icmp_error_reply(ctx, ip, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, if room < 68 { 68 } else { room }, reason::TX_TOO_BIG)
            };
        }
        return Err(drop_with(reason::DROP_TOO_BIG));
    }
    let src_v4 = settings.encap_src_v4;
    let src_v6 = settings.encap_src_v6;
    if (outer_v6 && src_v6 == [0; 4]) || (!outer_v6 && src_v4 == 0) {
        return Err(drop_with(reason::DROP_NO_ENCAP_SOURCE));
    }
    let inner_proto = if ip.v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };

    // Save the old L2 fields: the outer header overwrites them.
    let l2 = save_l2(ctx, ip.tpid)?;

    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr_len as i32)) } != 0 {
        return Err(drop_with(reason::DROP_ADJUST_HEAD));
    }
    // Layout now: [hdr_len new bytes][old eth (+vlan)][inner IP]. The new L2 header and
    // the outer header fill the first l3_off + hdr_len bytes, i.e. end where the inner
    // IP header starts.
    let l3_off = ip.l3_off();
    let outer_ethertype = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    write_l2(ctx, ip.tpid, l2.tci, nh_mac, l2.ours, outer_ethertype)?;

    if outer_v6 {
        let o: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
        // SAFETY: 40 bytes of outer header in bounds.
        unsafe {
            // Version 6, traffic class copied from the inner packet, flow label 0.
            st32(o, ((6u32 << 28) | ((ip.tos as u32) << 20)).to_be());
            st16(o.add(4), (ip.ip_len as u16).to_be());
            *o.add(6) = inner_proto;
            *o.add(7) = OUTER_TTL;
            let mut i = 0;
            while i < 4 {
                st32(o.add(8 + 4 * i), src_v6[i]);
                st32(o.add(24 + 4 * i), be.addr[i]);
                i += 1;
            }
        }
    } else {
        let o: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
        // SAFETY: 20 bytes of outer header in bounds.
        unsafe {
            *o = 0x45;
            *o.add(1) = ip.tos;
            st16(o.add(2), ((ip.ip_len + IPV4_LEN as u32) as u16).to_be());
            // Id 0 with DF: an atomic datagram (RFC 6864); we never fragment.
            st16(o.add(4), 0);
            st16(o.add(6), IP_DF);
            *o.add(8) = OUTER_TTL;
            *o.add(9) = inner_proto;
            st16(o.add(10), 0);
            st32(o.add(12), src_v4);
            st32(o.add(16), be.addr[3]);
            st16(o.add(10), ipv4_csum20(o));
        }
    }
    Ok(())
}

/// An ICMP error from the VIP to the client (port unreachable, too big) quoting the
/// start of the offending IP packet: trim the frame to L2 + quote, prepend the new IP
/// and ICMP headers, checksum. `info` is the ICMP header's second word (next-hop MTU).
#[inline(always)]
fn icmp_error_reply(ctx: &XdpContext, ip: &Ip, ty: u8, code: u8, info: u32, r: u32) -> Result<(), Verdict> {
    if !reply_allowed() {
        return Err(drop_with(reason::DROP_REPLY_RATELIMITED));
    }
    let l2 = save_l2(ctx, ip.tpid)?;
    let l3 = ip.l3_off();
    let (hdr, qmax) = if ip.v6 { (IPV6_LEN, QUOTE6_MAX) } else { (IPV4_LEN, QUOTE4_MAX) };
    let mut quote = ip.ip_len as usize;
    if quote > qmax {
        quote = qmax;
    }
    trim_to(ctx, l3 + quote)?;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((hdr + 8) as i32)) } != 0 {
        return Err(drop_with(reason::DROP_ADJUST_HEAD));
    }
    // Layout now: [l3 + hdr + 8 new bytes][quote]. Offsets from constants again.
    let l3 = ip.l3_off();
    let msg_len = 8 + quote;
    if ip.v6 {
        write_l2(ctx, ip.tpid, l2.tci, l2.peer, l2.ours, ETH_P_IPV6)?;
        write_ipv6(ctx, l3, msg_len as u16, IPPROTO_ICMPV6, &ip.dst, &ip.src)?;
    } else {
        write_l2(ctx, ip.tpid, l2.tci, l2.peer, l2.ours, ETH_P_IP)?;
        write_ipv4(ctx, l3, (IPV4_LEN + msg_len) as u16, 0, IPPROTO_ICMP, ip.dst[3], ip.src[3])?;
    }
    let off = l3 + hdr;
    let h: *mut u8 = ptr_at::<[u8; 8]>(ctx, off).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 8 bytes of ICMP header in bounds.
    unsafe {
        *h = ty;
        *h.add(1) = code;
        st16(h.add(2), 0);
        st32(h.add(4), info.to_be());
    }
    let mut sum = if ip.v6 { pseudo_sum(true, &ip.dst, &ip.src, IPPROTO_ICMPV6, msg_len as u32) } else { 0 };
    sum += if ip.v6 {
        csum_packet::<{ QUOTE6_MAX + 8 }>(ctx, off, msg_len)
    } else {
        csum_packet::<{ QUOTE4_MAX + 8 }>(ctx, off, msg_len)
    }
    .ok_or(drop_with(reason::DROP_INTERNAL))?;
    let h: *mut u8 = ptr_at::<[u8; 8]>(ctx, off).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: as above.
    unsafe { st16(h.add(2), csum_fold64(sum)) };
    Err(tx(r))
}

/// TCP to a service without backends: a RST from the VIP (RFC 793 reset generation):
/// with ACK set, seq = its ack and no ACK; else seq 0, ack = seq + segment length
/// (+1 for SYN, +1 for FIN), RST|ACK. Options, IPv4 options, IPv6 extension headers
/// and payload are not carried over.
#[inline(always)]
fn tcp_reset(ctx: &XdpContext, ip: &Ip) -> Result<(), Verdict> {
    let t: *const u8 = ptr_at::<TcpHdr>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 20 bytes of TCP header in bounds (parse_l4 checked the same).
    let (sport, dport, seq, ack, doff, flags) = unsafe {
        (ld16(t), ld16(t.add(2)), u32::from_be(ld32(t.add(4))), ld32(t.add(8)), (*t.add(12) >> 4) as usize, *t.add(13))
    };
    let seg_len = ip.l4_len.saturating_sub(doff * 4) as u32
        + (flags & TCP_SYN != 0) as u32
        + (flags & TCP_FIN != 0) as u32;
    let (rseq, rack, rflags) =
        if flags & TCP_ACK != 0 { (ack, 0, TCP_RST) } else { (0, seq.wrapping_add(seg_len).to_be(), TCP_RST | TCP_ACK) };
    if !reply_allowed() {
        return Err(drop_with(reason::DROP_REPLY_RATELIMITED));
    }
    let l2 = save_l2(ctx, ip.tpid)?;
    let l3 = ip.l3_off();
    let hdr = if ip.v6 { IPV6_LEN } else { IPV4_LEN };
    trim_to(ctx, l3 + hdr + 20)?;
    let l3 = ip.l3_off();
    if ip.v6 {
        write_l2(ctx, ip.tpid, l2.tci, l2.peer, l2.ours, ETH_P_IPV6)?;
        write_ipv6(ctx, l3, 20, IPPROTO_TCP, &ip.dst, &ip.src)?;
    } else {
        write_l2(ctx, ip.tpid, l2.tci, l2.peer, l2.ours, ETH_P_IP)?;
        write_ipv4(ctx, l3, (IPV4_LEN + 20) as u16, IP_DF, IPPROTO_TCP, ip.dst[3], ip.src[3])?;
    }
    let off = l3 + hdr;
    let o: *mut u8 = ptr_at::<TcpHdr>(ctx, off).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 20 bytes of TCP header in bounds.
    let sum = unsafe {
        st16(o, dport);
        st16(o.add(2), sport);
        st32(o.add(4), rseq);
        st32(o.add(8), rack);
        *o.add(12) = 5 << 4;
        *o.add(13) = rflags;
        st16(o.add(14), 0);
        st16(o.add(16), 0);
        st16(o.add(18), 0);
        let mut sum = pseudo_sum(ip.v6, &ip.dst, &ip.src, IPPROTO_TCP, 20);
        let mut i = 0;
        while i < 5 {
            sum += ld32(o.add(4 * i)) as u64;
            i += 1;
        }
        sum
    };
    // SAFETY: as above.
    unsafe { st16(o.add(16), csum_fold64(sum)) };
    Err(tx(reason::TX_RST))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
