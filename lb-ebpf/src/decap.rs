//! The decapsulator: an XDP program for backends. It strips the outer IPv4/IPv6 header
//! the balancer added (IPIP, 4in6, 6in4, IP6IP6) and hands the inner packet to the
//! backend's own stack, which holds the VIP on loopback and answers the client directly.
//! Needed because many hosts (and this project's test kernel) have no ipip module.
//! Everything that is not IP-in-IP passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{Counter, decap_reason};
use lb_ebpf::*;

/// Per reason (lb_common::decap_reason) packets/bytes, per CPU.
#[map]
static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(decap_reason::COUNT, 0);

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

#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, u32) {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return NOT_ENCAP };
    // SAFETY: bounds checked by ptr_at.
    let mut ethertype = unsafe { (*eth).ether_type };
    let mut l3_off = ETH_LEN;
    let mut tpid = 0u16;
    let mut tci = 0u16;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(vlan) = ptr_at::<[u8; VLAN_LEN]>(ctx, ETH_LEN) else { return NOT_ENCAP };
        tpid = ethertype;
        // SAFETY: 4 bytes in bounds.
        unsafe {
            tci = ld16(vlan as *const u8);
            ethertype = ld16((vlan as *const u8).add(2));
        }
        l3_off += VLAN_LEN;
    }
    let (outer_len, inner_proto) = if ethertype == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else { return NOT_ENCAP };
        let ip = ip as *const u8;
        // SAFETY: 20 bytes in bounds.
        let (vihl, frags, proto) = unsafe { (*ip, ld16(ip.add(6)), *ip.add(9)) };
        if vihl >> 4 != 4 || (proto != IPPROTO_IPIP && proto != IPPROTO_IPV6) {
            return NOT_ENCAP;
        }
        let hlen = ((vihl & 0x0f) as usize) * 4;
        // A fragmented outer packet cannot be decapsulated here (the balancer never
        // fragments: it sets DF and answers too-big instead).
        if hlen < IPV4_LEN || frags & (IP_MF | IP_OFFSET) != 0 {
            return MALFORMED;
        }
        (hlen, proto)
    } else if ethertype == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else { return NOT_ENCAP };
        // SAFETY: 40 bytes in bounds.
        let nh = unsafe { *(ip as *const u8).add(6) };
        if nh != IPPROTO_IPIP && nh != IPPROTO_IPV6 {
            return NOT_ENCAP;
        }
        (IPV6_LEN, nh)
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
    let Some(inner) = ptr_at::<u8>(ctx, inner_off) else { return MALFORMED };
    // SAFETY: in bounds (checked just above).
    if unsafe { *inner } >> 4 != inner_version {
        return MALFORMED;
    }

    // Keep the MACs: the frame stays addressed to this host.
    let Some(old) = ptr_at::<EthHdr>(ctx, 0) else { return MALFORMED };
    let old = old as *const u8;
    // SAFETY: 14 bytes in bounds.
    let (m0, m1, m2) = unsafe { (ld32(old), ld32(old.add(4)), ld32(old.add(8))) };
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return (XDP_DROP, decap_reason::DROP_ADJUST_HEAD);
    }
    let Some(eth) = ptr_at::<[u8; ETH_LEN + VLAN_LEN]>(ctx, 0) else { return MALFORMED };
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
    (XDP_PASS, decap_reason::DECAPSULATED)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
