//! The balancer: an XDP program on the load balancer's interfaces.
//!
//! parse -> VIP prefilter -> VIP lookup -> flow table (LRU) -> Maglev table ->
//! IPIP/IP6IP6 encapsulation or L2 rewrite -> XDP_TX. Everything that is not for a VIP
//! leaves with XDP_PASS, untouched. Every XDP_DROP and every unusual XDP_PASS is counted
//! under a named reason (lb_common::reason); forwarded packets are counted per service
//! and per backend.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_HAS_MAC, BACKEND_F_V6, BACKEND_F_VALID, BackendValue, Counter, FLOW_EVENTS_BYTES, FlowEvent, FlowKey, FlowValue,
    MAX_BACKENDS, MAX_FLOWS, MAX_SERVICES, MAX_TABLE_SIZE, MAX_VIPS, MODE_DSR_L2, NO_BACKEND,
    SETTINGS_F_FLOW_SYNC, SETTINGS_F_HAS_GATEWAY, Settings, TABLES_ENTRIES, TrafficCounter, VipBloom, VipKey, VipValue,
    flow_hash, reason, table_index, v4_mapped_words, vip_addr_bit,
};
use aya_log_ebpf::{error, warn};
use lb_ebpf::*;

// ---------------------------------------------------------------------------------
// Maps: the contract with userspace (types and sizes in lb-common). Pinned by lbd
// under /sys/fs/bpf/<instance>/ with these names.
// ---------------------------------------------------------------------------------

/// (VIP address, port or 0, protocol) -> service id, forwarding mode, live table slot.
#[map]
static VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_VIPS, 0);

/// One-entry bitmap over VIP addresses: a clear bit proves "not a VIP", so non-VIP
/// traffic costs one array lookup instead of two hash lookups.
#[map]
static VIP_BLOOM: Array<VipBloom> = Array::with_max_entries(1, 0);

/// Maglev rings: (service id * 2 + slot) * MAX_TABLE_SIZE + position -> backend id.
/// Two slots per service: userspace fills the idle one, then flips VipValue::active_slot.
/// Mmapable, so userspace writes a whole table with one memcpy.
#[map]
static TABLES: Array<u32> = Array::with_max_entries(TABLES_ENTRIES, BPF_F_MMAPABLE);

/// Backend id -> address, next-hop MAC, flags, owning service.
#[map]
static BACKENDS: Array<BackendValue> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Client 5-tuple -> backend id: keeps established flows on their backend when the
/// backend set changes. Shared (not per-CPU) so a flow that lands on another CPU, or is
/// synced from the peer, is still found.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// New flows for the peer balancer (`SETTINGS_F_FLOW_SYNC`), read by lbd.
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Entry 0: flow events lost to a full FLOW_EVENTS, per CPU.
#[map]
static SYNC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0: encap sources, gateway MAC, MTU.
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per reason (lb_common::reason) packets/bytes, per CPU.
#[map]
static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per service id packets/bytes/new flows, per CPU.
#[map]
static SERVICE_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per backend id packets/bytes/new flows, per CPU.
#[map]
static BACKEND_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

// ---------------------------------------------------------------------------------

/// Why we did not forward: (XDP action, reason).
type Verdict = (u32, u32);

#[inline(always)]
fn pass(r: u32) -> Verdict {
    (XDP_PASS, r)
}

#[inline(always)]
fn drop(r: u32) -> Verdict {
    (XDP_DROP, r)
}

#[xdp]
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

/// What the parser learned about a packet addressed to a VIP address.
struct Parsed {
    /// The VLAN tag's TPID (native load) or 0 when untagged (IP header at 14 or 18).
    tpid: u16,
    v6: bool,
    /// Length of the IP packet (header included), host order.
    ip_len: u32,
    /// Traffic class / TOS byte of the packet, copied to the outer header.
    tos: u8,
    /// TCP RST: never creates a flow entry (a stray RST must not pin a flow).
    rst: bool,
    flow: FlowKey,
}

#[inline(always)]
fn balance(ctx: &XdpContext, len: u64) -> Result<(), Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(drop(reason::DROP_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at.
    let mut ethertype = unsafe { (*eth).ether_type };
    let mut l3_off = ETH_LEN;
    let mut tpid = 0;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_LEN).ok_or(drop(reason::DROP_MALFORMED))?;
        tpid = ethertype;
        ethertype = unsafe { (*vlan).ether_type };
        l3_off += VLAN_LEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(pass(reason::PASS_VLAN_STACKED));
        }
    }
    let p = if ethertype == ETH_P_IP {
        parse_v4(ctx, l3_off, tpid)?
    } else if ethertype == ETH_P_IPV6 {
        parse_v6(ctx, l3_off, tpid)?
    } else {
        return Err(pass(reason::PASS_NOT_IP));
    };

    let mut vk = VipKey { addr: p.flow.dst, port: p.flow.dst_port, proto: p.flow.proto, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let vip = match unsafe { VIPS.get(&vk) } {
        Some(v) => *v,
        None => {
            vk.port = 0;
            match unsafe { VIPS.get(&vk) } {
                Some(v) => *v,
                None => return Err(pass(reason::PASS_NO_SERVICE)),
            }
        }
    };
    if vip.service_id >= MAX_SERVICES {
        return Err(drop(reason::DROP_BAD_STATE));
    }
    let (backend_id, be, new_flow) = pick_backend(&vip, &p.flow, !p.rst)?;
    if vip.mode == MODE_DSR_L2 {
        rewrite_l2(ctx, &be)?;
    } else {
        encapsulate(ctx, &p, &be)?;
    }
    count_traffic(&SERVICE_STATS, vip.service_id, len, new_flow);
    count_traffic(&BACKEND_STATS, backend_id, len, new_flow);
    Ok(())
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

/// Ports and RST flag of a TCP/UDP header at `off`; `ip_payload` is what the IP header
/// says follows it. ICMP and other protocols leave here (passed, counted).
#[inline(always)]
fn parse_l4(ctx: &XdpContext, proto: u8, off: usize, ip_payload: usize) -> Result<(u16, u16, bool), Verdict> {
    if proto == IPPROTO_TCP {
        let t: *const u8 = ptr_at::<TcpHdr>(ctx, off).ok_or(drop(reason::DROP_MALFORMED))? as *const u8;
        // SAFETY: 20 bytes of TCP header are in bounds.
        let (sport, dport, doff, flags) = unsafe { (ld16(t), ld16(t.add(2)), *t.add(12) >> 4, *t.add(13)) };
        if doff < 5 || ip_payload < (doff as usize) * 4 {
            return Err(drop(reason::DROP_MALFORMED));
        }
        Ok((sport, dport, flags & 0x04 != 0))
    } else if proto == IPPROTO_UDP {
        let u: *const u8 = ptr_at::<UdpHdr>(ctx, off).ok_or(drop(reason::DROP_MALFORMED))? as *const u8;
        if ip_payload < 8 {
            return Err(drop(reason::DROP_MALFORMED));
        }
        // SAFETY: 8 bytes of UDP header are in bounds.
        unsafe { Ok((ld16(u), ld16(u.add(2)), false)) }
    } else if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 {
        Err(pass(reason::PASS_ICMP))
    } else {
        Err(pass(reason::PASS_OTHER_PROTO))
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3_off: usize, tpid: u16) -> Result<Parsed, Verdict> {
    let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(drop(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 20 bytes of IPv4 header are in bounds.
    let (vihl, tos, tot_len, frags, proto, saddr, daddr) = unsafe {
        (*ip, *ip.add(1), u16::from_be(ld16(ip.add(2))) as usize, ld16(ip.add(6)), *ip.add(9), ld32(ip.add(12)), ld32(ip.add(16)))
    };
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || hlen < IPV4_LEN {
        return Err(drop(reason::DROP_MALFORMED));
    }
    let dst = v4_mapped_words(daddr);
    if !maybe_vip(&dst) {
        return Err(pass(reason::PASS_NOT_VIP));
    }
    if tot_len < hlen || !fits(ctx, l3_off, tot_len) {
        return Err(drop(reason::DROP_MALFORMED));
    }
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return Err(pass(reason::PASS_FRAGMENT));
    }
    let (sport, dport, rst) = parse_l4(ctx, proto, l3_off + hlen, tot_len - hlen)?;
    Ok(Parsed {
        tpid,
        v6: false,
        ip_len: tot_len as u32,
        tos,
        rst,
        flow: FlowKey { src: v4_mapped_words(saddr), dst, src_port: sport, dst_port: dport, proto, _pad: [0; 3] },
    })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3_off: usize, tpid: u16) -> Result<Parsed, Verdict> {
    let ip: *const u8 = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(drop(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 40 bytes of IPv6 header are in bounds.
    let (v0, v1, payload_len, nh) = unsafe { (*ip, *ip.add(1), u16::from_be(ld16(ip.add(4))) as usize, *ip.add(6)) };
    if v0 >> 4 != 6 {
        return Err(drop(reason::DROP_MALFORMED));
    }
    let dst = unsafe { [ld32(ip.add(24)), ld32(ip.add(28)), ld32(ip.add(32)), ld32(ip.add(36))] };
    if !maybe_vip(&dst) {
        return Err(pass(reason::PASS_NOT_VIP));
    }
    if !fits(ctx, l3_off, IPV6_LEN + payload_len) {
        return Err(drop(reason::DROP_MALFORMED));
    }
    if nh == IPPROTO_FRAGMENT {
        return Err(pass(reason::PASS_FRAGMENT));
    }
    if is_ipv6_ext(nh) {
        return Err(pass(reason::PASS_IPV6_EXT));
    }
    let (sport, dport, rst) = parse_l4(ctx, nh, l3_off + IPV6_LEN, payload_len)?;
    let src = unsafe { [ld32(ip.add(8)), ld32(ip.add(12)), ld32(ip.add(16)), ld32(ip.add(20))] };
    Ok(Parsed {
        tpid,
        v6: true,
        ip_len: (IPV6_LEN + payload_len) as u32,
        tos: (v0 << 4) | (v1 >> 4),
        rst,
        flow: FlowKey { src, dst, src_port: sport, dst_port: dport, proto: nh, _pad: [0; 3] },
    })
}

/// The flow's backend: its flow-table entry if that backend still serves this service,
/// else the Maglev pick (recorded in the flow table unless `create` is false).
#[inline(always)]
fn pick_backend(vip: &VipValue, flow: &FlowKey, create: bool) -> Result<(u32, BackendValue, bool), Verdict> {
    // SAFETY: the value is copied out at once.
    if let Some(fv) = unsafe { FLOWS.get(flow) } {
        let id = fv.backend_id;
        if let Some(be) = BACKENDS.get(id)
            && be.flags & BACKEND_F_VALID != 0
            && be.service_id == vip.service_id
        {
            return Ok((id, *be, false));
        }
    }
    let m = vip.table_size;
    if m == 0 || m > MAX_TABLE_SIZE {
        return Err(drop(reason::DROP_BAD_STATE));
    }
    let pos = flow_hash(flow) % m;
    let id = *TABLES
        .get(table_index(vip.service_id, vip.active_slot, pos))
        .ok_or(drop(reason::DROP_BAD_STATE))?;
    if id == NO_BACKEND {
        return Err(drop(reason::DROP_NO_BACKEND));
    }
    let be = *BACKENDS.get(id).ok_or(drop(reason::DROP_BAD_STATE))?;
    if be.flags & BACKEND_F_VALID == 0 {
        return Err(drop(reason::DROP_BAD_STATE));
    }
    if create {
        // SAFETY: ktime is always callable from XDP.
        let v = FlowValue { backend_id: id, _pad: 0, created_ns: unsafe { bpf_ktime_get_ns() } };
        // A failed insert (map full of in-flight updates) only costs stickiness for this
        // packet; the next packet retries.
        if FLOWS.insert(flow, &v, 0).is_ok() {
            report_new_flow(flow, id, vip.service_id);
        }
    }
    // A new flow is one we recorded; a RST that misses is forwarded but not remembered.
    Ok((id, be, create))
}

/// Hands a new flow to userspace for the peer balancer, when flow sync is on. A full
/// ring (userspace behind) loses the event, counted in SYNC_STATS; forwarding goes on.
#[inline(always)]
fn report_new_flow(flow: &FlowKey, backend_id: u32, service_id: u32) {
    let on = SETTINGS.get(0).is_some_and(|s| s.flags & SETTINGS_F_FLOW_SYNC != 0);
    if !on {
        return;
    }
    let ev = FlowEvent { key: *flow, backend_id, service_id };
    if FLOW_EVENTS.output::<FlowEvent>(&ev, 0).is_err()
        && let Some(c) = SYNC_STATS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Copies a MAC (6 bytes) between packet/stack locations.
///
/// # Safety
/// Both pointers must be valid for 6 bytes.
#[inline(always)]
unsafe fn copy_mac(dst: *mut u8, src: *const u8) {
    unsafe {
        st32(dst, ld32(src));
        st16(dst.add(4), ld16(src.add(4)));
    }
}

/// dsr-l2: destination MAC := backend's, source MAC := the address the frame was sent
/// to (this balancer's interface), so switches never learn a client's MAC on our port.
#[inline(always)]
fn rewrite_l2(ctx: &XdpContext, be: &BackendValue) -> Result<(), Verdict> {
    if be.flags & BACKEND_F_HAS_MAC == 0 {
        return Err(drop(reason::DROP_NO_NEXTHOP));
    }
    let eth: *mut u8 = ptr_at::<EthHdr>(ctx, 0).ok_or(drop(reason::DROP_MALFORMED))? as *mut u8;
    // SAFETY: 14 bytes of Ethernet header are in bounds.
    unsafe {
        copy_mac(eth.add(6), eth);
        copy_mac(eth, be.mac.as_ptr());
    }
    Ok(())
}

/// ipip: prepend an outer IPv4 (proto 4/41) or IPv6 (next header 4/41) header from our
/// encap source to the backend, keep the VLAN tag, address the frame to the next hop.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, p: &Parsed, be: &BackendValue) -> Result<(), Verdict> {
    let settings = SETTINGS.get(0).ok_or(drop(reason::DROP_BAD_STATE))?;
    let nh_mac = if be.flags & BACKEND_F_HAS_MAC != 0 {
        be.mac
    } else if settings.flags & SETTINGS_F_HAS_GATEWAY != 0 {
        settings.gateway_mac
    } else {
        return Err(drop(reason::DROP_NO_NEXTHOP));
    };
    let outer_v6 = be.flags & BACKEND_F_V6 != 0;
    let hdr_len: usize = if outer_v6 { IPV6_LEN } else { IPV4_LEN };
    let mtu = if settings.mtu == 0 { 1500 } else { settings.mtu };
    if p.ip_len + hdr_len as u32 > mtu {
        return Err(drop(reason::DROP_TOO_BIG));
    }
    let src_v4 = settings.encap_src_v4;
    let src_v6 = settings.encap_src_v6;
    if (outer_v6 && src_v6 == [0; 4]) || (!outer_v6 && src_v4 == 0) {
        return Err(drop(reason::DROP_NO_ENCAP_SOURCE));
    }
    let inner_proto = if p.v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };

    // Save the old L2 fields: the outer header overwrites them.
    let old: *const u8 = ptr_at::<EthHdr>(ctx, 0).ok_or(drop(reason::DROP_MALFORMED))? as *const u8;
    let mut our_mac = [0u8; 6];
    // SAFETY: 14 bytes of Ethernet header are in bounds.
    unsafe { copy_mac(our_mac.as_mut_ptr(), old) };
    let mut tci = 0u16;
    if p.tpid != 0 {
        let vlan: *const u8 = ptr_at::<VlanHdr>(ctx, ETH_LEN).ok_or(drop(reason::DROP_MALFORMED))? as *const u8;
        // SAFETY: 4 bytes of VLAN header are in bounds.
        tci = unsafe { ld16(vlan) };
    }

    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr_len as i32)) } != 0 {
        return Err(drop(reason::DROP_ADJUST_HEAD));
    }
    // Layout now: [hdr_len new bytes][old eth (+vlan)][inner IP]. The new L2 header and
    // the outer header fill the first l3_off + hdr_len bytes, i.e. end where the inner
    // IP header starts.
    // Derived from the tag, not carried in `p`: the verifier needs a constant here.
    let l3_off = if p.tpid != 0 { ETH_LEN + VLAN_LEN } else { ETH_LEN };
    let eth: *mut u8 = ptr_at::<EthHdr>(ctx, 0).ok_or(drop(reason::DROP_MALFORMED))? as *mut u8;
    let outer_ethertype = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY: 14 bytes in bounds (ptr_at above).
    unsafe {
        copy_mac(eth, nh_mac.as_ptr());
        copy_mac(eth.add(6), our_mac.as_ptr());
    }
    if p.tpid != 0 {
        let v: *mut u8 = ptr_at::<[u8; ETH_LEN + VLAN_LEN]>(ctx, 0).ok_or(drop(reason::DROP_MALFORMED))? as *mut u8;
        // SAFETY: 18 bytes in bounds.
        unsafe {
            st16(v.add(12), p.tpid);
            st16(v.add(14), tci);
            st16(v.add(16), outer_ethertype);
        }
    } else {
        // SAFETY: 14 bytes in bounds.
        unsafe { st16(eth.add(12), outer_ethertype) };
    }

    if outer_v6 {
        let o: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(drop(reason::DROP_MALFORMED))? as *mut u8;
        // SAFETY: 40 bytes of outer header in bounds.
        unsafe {
            // Version 6, traffic class copied from the inner packet, flow label 0.
            st32(o, ((6u32 << 28) | ((p.tos as u32) << 20)).to_be());
            st16(o.add(4), (p.ip_len as u16).to_be());
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
        let o: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(drop(reason::DROP_MALFORMED))? as *mut u8;
        // SAFETY: 20 bytes of outer header in bounds.
        unsafe {
            *o = 0x45;
            *o.add(1) = p.tos;
            st16(o.add(2), ((p.ip_len + IPV4_LEN as u32) as u16).to_be());
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
