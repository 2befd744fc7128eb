//! The decapsulator: an XDP program for backends. It strips the outer IPv4/IPv6 header
//! the balancer added (IPIP, 4in6, 6in4, IP6IP6, or in mode gue the outer header, UDP
//! to a port of `DECAP_GUE_PORTS`, GUE and its hop list) and hands the inner packet to
//! the backend's own stack, which holds the VIP on loopback and answers the client directly.
//! Needed because many hosts (and this project's test kernel) have no ipip module.
//! Everything that is neither IP-in-IP nor GUE to one of those ports passes untouched.
//!
//! Only the balancers' packets to this host are decapsulated: the outer destination must
//! be in `DECAP_LOCAL` (this host's addresses, written by `lbd decap attach` from the
//! interface and refreshed by `lbd decap refresh`) and the outer source in `DECAP_ALLOW`
//! (the balancers' addresses, `--allow`). Anything else in IP-in-IP is dropped and
//! counted by reason: decapsulating it would let anyone inject packets with any inner
//! source (127.0.0.1 included) past this host's filters.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{Counter, DECAP_MAX_ALLOW, DECAP_MAX_GUE_PORTS, DECAP_MAX_LOCAL, V4_MAPPED_WORD, decap_reason, v4_mapped_words};
use lb_ebpf::*;

/// Per reason (lb_common::decap_reason) packets/bytes, per CPU.
#[map]
static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(decap_reason::COUNT, 0);

/// Outer sources we decapsulate from (the balancers), IPv6 or IPv4-mapped words.
#[map]
static DECAP_ALLOW: HashMap<[u32; 4], u32> = HashMap::with_max_entries(DECAP_MAX_ALLOW, 0);

/// This host's addresses: the outer destination must be one of them.
#[map]
static DECAP_LOCAL: HashMap<[u32; 4], u32> = HashMap::with_max_entries(DECAP_MAX_LOCAL, 0);

/// UDP destination ports (network order) that carry GUE from the balancers. UDP to
/// any other port is ordinary traffic and passes untouched.
#[map]
static DECAP_GUE_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(DECAP_MAX_GUE_PORTS, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (action, r) = decap(&ctx);
    if let Some(c) = DECAP_STATS.get_ptr_mut(r) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
    action
}

/// XDP_PASS and nothing else. Native XDP_TX on a veth is delivered only when the peer
/// veth runs an XDP program; this is the one to put there (bridge ports, test peers).
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

const NOT_ENCAP: (u32, u32) = (XDP_PASS, decap_reason::PASS_NOT_ENCAP);
const MALFORMED: (u32, u32) = (XDP_DROP, decap_reason::DROP_MALFORMED);

/// The verdict on the outer addresses: None when the packet is ours to decapsulate.
/// IPv4 addresses are keyed IPv4-mapped, so an IPv6 header naming `::ffff:a.b.c.d`
/// (never valid on the wire) must not match them.
#[inline(always)]
fn check_outer(src: &[u32; 4], dst: &[u32; 4], v6: bool) -> Option<(u32, u32)> {
    let mapped = |a: &[u32; 4]| v6 && a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD;
    if mapped(dst) {
        return Some((XDP_DROP, decap_reason::DROP_NOT_LOCAL));
    }
    if mapped(src) {
        return Some((XDP_DROP, decap_reason::DROP_SOURCE_NOT_ALLOWED));
    }
    // SAFETY: read-only lookups; the values are not used.
    if unsafe { DECAP_LOCAL.get(dst) }.is_none() {
        return Some((XDP_DROP, decap_reason::DROP_NOT_LOCAL));
    }
    // SAFETY: as above.
    if unsafe { DECAP_ALLOW.get(src) }.is_none() {
        return Some((XDP_DROP, decap_reason::DROP_SOURCE_NOT_ALLOWED));
    }
    None
}

/// An IPv6 address in the packet as map-key words.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline(always)]
unsafe fn addr6(p: *const u8) -> [u32; 4] {
    unsafe { [ld32(p), ld32(p.add(4)), ld32(p.add(8)), ld32(p.add(12))] }
}

/// Whether the UDP header at `off` goes to a GUE port. Ordinary UDP (and a UDP
/// header cut by the frame) is not ours.
#[inline(always)]
fn is_gue_port(ctx: &XdpContext, off: usize) -> bool {
    let Some(u) = ptr_at::<[u8; 8]>(ctx, off) else {
        return false;
    };
    // SAFETY: 8 bytes in bounds; read-only lookup.
    unsafe { DECAP_GUE_PORTS.get(ld16((u as *const u8).add(2))).is_some() }
}

/// The GUE header after the UDP header at `udp_off` (lb_common::gue): the bytes of
/// UDP + GUE + private data (the hop list) and the inner protocol. Variant 0 data
/// messages without flags only: the balancer sends nothing else.
#[inline(always)]
fn gue_header(ctx: &XdpContext, udp_off: usize) -> Result<(usize, u8), (u32, u32)> {
    let g = ptr_at::<[u8; 4]>(ctx, udp_off + 8).ok_or(MALFORMED)? as *const u8;
    // SAFETY: 4 bytes in bounds.
    let (b0, proto, flags) = unsafe { (*g, *g.add(1), ld16(g.add(2))) };
    // Version 0 and C (control) clear: the top three bits.
    if b0 & 0xe0 != 0 || flags != 0 || (proto != IPPROTO_IPIP && proto != IPPROTO_IPV6) {
        return Err(MALFORMED);
    }
    Ok((8 + 4 + ((b0 & 0x1f) as usize) * 4, proto))
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, u32) {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return NOT_ENCAP;
    };
    // SAFETY: bounds checked by ptr_at.
    let mut ethertype = unsafe { (*eth).ether_type };
    let mut l3_off = ETH_LEN;
    let mut tpid = 0u16;
    let mut tci = 0u16;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(vlan) = ptr_at::<[u8; VLAN_LEN]>(ctx, ETH_LEN) else {
            return NOT_ENCAP;
        };
        tpid = ethertype;
        // SAFETY: 4 bytes in bounds.
        unsafe {
            tci = ld16(vlan as *const u8);
            ethertype = ld16((vlan as *const u8).add(2));
        }
        l3_off += VLAN_LEN;
    }
    let (outer_len, inner_proto, gue) = if ethertype == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
            return NOT_ENCAP;
        };
        let ip = ip as *const u8;
        // SAFETY: 20 bytes in bounds.
        let (vihl, frags, proto) = unsafe { (*ip, ld16(ip.add(6)), *ip.add(9)) };
        let hlen = ((vihl & 0x0f) as usize) * 4;
        let udp = proto == IPPROTO_UDP;
        if vihl >> 4 != 4 || !(udp || proto == IPPROTO_IPIP || proto == IPPROTO_IPV6) {
            return NOT_ENCAP;
        }
        if udp {
            // UDP fragments and UDP to other ports are the stack's.
            if hlen < IPV4_LEN || frags & (IP_MF | IP_OFFSET) != 0 || !is_gue_port(ctx, l3_off + hlen) {
                return NOT_ENCAP;
            }
        } else if hlen < IPV4_LEN || frags & (IP_MF | IP_OFFSET) != 0 {
            // A fragmented outer packet cannot be decapsulated here (the balancer never
            // fragments: it sets DF and answers too-big instead).
            return MALFORMED;
        }
        // SAFETY: 20 bytes in bounds.
        let (src, dst) = unsafe { (v4_mapped_words(ld32(ip.add(12))), v4_mapped_words(ld32(ip.add(16)))) };
        if let Some(v) = check_outer(&src, &dst, false) {
            return v;
        }
        if udp {
            match gue_header(ctx, l3_off + hlen) {
                Ok((g, inner)) => (hlen + g, inner, true),
                Err(v) => return v,
            }
        } else {
            (hlen, proto, false)
        }
    } else if ethertype == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
            return NOT_ENCAP;
        };
        // SAFETY: 40 bytes in bounds.
        let nh = unsafe { *(ip as *const u8).add(6) };
        let udp = nh == IPPROTO_UDP;
        // The balancer adds no extension headers: UDP right after the header or not ours.
        if !(udp && is_gue_port(ctx, l3_off + IPV6_LEN)) && nh != IPPROTO_IPIP && nh != IPPROTO_IPV6 {
            return NOT_ENCAP;
        }
        // SAFETY: 40 bytes in bounds: source at 8, destination at 24.
        let (src, dst) = unsafe { (addr6((ip as *const u8).add(8)), addr6((ip as *const u8).add(24))) };
        if let Some(v) = check_outer(&src, &dst, true) {
            return v;
        }
        if udp {
            match gue_header(ctx, l3_off + IPV6_LEN) {
                Ok((g, inner)) => (IPV6_LEN + g, inner, true),
                Err(v) => return v,
            }
        } else {
            (IPV6_LEN, nh, false)
        }
    } else {
        return NOT_ENCAP;
    };

    // The inner header must be there and be of the family the outer header announces.
    let inner_off = l3_off + outer_len;
    let (inner_len, inner_version, inner_ethertype) =
        if inner_proto == IPPROTO_IPIP { (IPV4_LEN, 4u8, ETH_P_IP) } else { (IPV6_LEN, 6u8, ETH_P_IPV6) };
    if !fits(ctx, inner_off, inner_len) {
        return MALFORMED;
    }
    let Some(inner) = ptr_at::<u8>(ctx, inner_off) else {
        return MALFORMED;
    };
    // SAFETY: in bounds (checked just above).
    if unsafe { *inner } >> 4 != inner_version {
        return MALFORMED;
    }

    // Keep the MACs: the frame stays addressed to this host.
    let Some(old) = ptr_at::<EthHdr>(ctx, 0) else {
        return MALFORMED;
    };
    let old = old as *const u8;
    // SAFETY: 14 bytes in bounds.
    let (m0, m1, m2) = unsafe { (ld32(old), ld32(old.add(4)), ld32(old.add(8))) };
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return (XDP_DROP, decap_reason::DROP_ADJUST_HEAD);
    }
    let Some(eth) = ptr_at::<[u8; ETH_LEN + VLAN_LEN]>(ctx, 0) else {
        return MALFORMED;
    };
    let eth = eth as *mut u8;
    // SAFETY: 18 bytes in bounds (the inner IP header follows them).
    unsafe {
        st32(eth, m0);
        st32(eth.add(4), m1);
        st32(eth.add(8), m2);
        if tpid != 0 {
            st16(eth.add(12), tpid);
            st16(eth.add(14), tci);
            st16(eth.add(16), inner_ethertype);
        } else {
            st16(eth.add(12), inner_ethertype);
        }
    }
    (XDP_PASS, if gue { decap_reason::DECAPSULATED_GUE } else { decap_reason::DECAPSULATED })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
