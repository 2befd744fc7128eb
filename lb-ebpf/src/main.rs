//! The balancer: an XDP program on the load balancer's interfaces.
//!
//! parse (Ethernet, one VLAN tag, IPv4 / IPv6 + extension headers) -> VIP prefilter ->
//! fragment / ICMP / TCP-UDP -> VIP lookup -> flow table (LRU) -> Maglev table ->
//! IPIP/IP6IP6 or GUE encapsulation or L2 rewrite -> XDP_TX. The balancer answers some packets
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
    MAX_VIPS, MODE_DSR_L2, MODE_GUE, MODE_MASK, NO_BACKEND, ReplyBucket, SETTINGS_F_FLOW_SYNC, SETTINGS_F_HAS_GATEWAY, Settings,
    TABLES_ENTRIES, TableEntry, TrafficCounter, VIP_F_NO_FLOW_TABLE, BACKEND_F_HOP, PROTO_TCP, VipBloom, VipKey, VipValue, flow_hash, reason, table_index, v4_mapped_words,
    vip_addr_bit, vip_gue_port,
    contract::{FLOWS_FLAGS, TABLES_FLAGS},
    gue,
};
use aya_log_ebpf::{error, warn};
use lb_ebpf::*;

// Split by concern, like Katran's lib/bpf: maps, parsing, flow keys and the backend
// pick, forwarding (encap), replies, counters. Everything is #[inline(always)]: one
// program, no BPF-to-BPF calls.
#[path = "balancer/counters.rs"]
mod counters;
#[path = "balancer/encap.rs"]
mod encap;
#[path = "balancer/flow.rs"]
mod flow;
#[path = "balancer/maps.rs"]
mod maps;
#[path = "balancer/parse.rs"]
mod parse;
#[path = "balancer/replies.rs"]
mod replies;

use counters::*;
use encap::*;
use flow::*;
use maps::*;
use parse::*;
use replies::*;

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

#[inline(always)]
fn balance(ctx: &XdpContext, len: u64) -> Result<(), Verdict> {
    let EthInfo { l3_off, tpid, ethertype } = parse_eth(ctx).map_err(|e| match e {
        EthError::Truncated => drop_with(reason::DROP_MALFORMED),
        EthError::Stacked => pass(reason::PASS_VLAN_STACKED),
    })?;
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
    let (id, be, pick, hop) = match pick_backend(&vip, &flow, !syn, !rst) {
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
    forward(ctx, ip, &vip, &flow, id, &be, if tcp { hop } else { NO_BACKEND }, pick == PICK_RECORDED, len, true)?;
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
        let (id, be, _, _) = pick_backend(&vip, &flow, false, false)?;
        forward(ctx, ip, &vip, &flow, id, &be, NO_BACKEND, false, len, true)?;
        count_reason(reason::FWD_FRAGMENT, len);
        count_reason(reason::FWD_FRAGMENT_PORTLESS, len);
        return Ok(());
    };
    let vip = lookup_vip(&ip.dst, dport, ip.proto).ok_or(pass(reason::PASS_FRAGMENT))?;
    let flow = flow_key(&ip.src, &ip.dst, sport, dport, ip.proto);
    let (id, be, _, _) = pick_backend(&vip, &flow, true, false)?;
    forward(ctx, ip, &vip, &flow, id, &be, NO_BACKEND, false, len, true)?;
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
                *h.add(off!(Ipv6Hdr, next_hdr)),
                [ld32(h.add(off!(Ipv6Hdr, src_addr))), ld32(h.add(off!(Ipv6Hdr, src_addr) + 4)), ld32(h.add(off!(Ipv6Hdr, src_addr) + 8)), ld32(h.add(off!(Ipv6Hdr, src_addr) + 12))],
                [ld32(h.add(off!(Ipv6Hdr, dst_addr))), ld32(h.add(off!(Ipv6Hdr, dst_addr) + 4)), ld32(h.add(off!(Ipv6Hdr, dst_addr) + 8)), ld32(h.add(off!(Ipv6Hdr, dst_addr) + 12))],
            )
        };
        if v != 6 {
            return Err(BAD);
        }
        (s, d, inner + IPV6_LEN, nh)
    } else {
        let h: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner).ok_or(BAD)? as *const u8;
        // SAFETY: 20 bytes of embedded IPv4 header in bounds.
        let (vihl, frags, p, s, d) = unsafe { (*h, ld16(h.add(off!(Ipv4Hdr, frags))), *h.add(off!(Ipv4Hdr, proto)), ld32(h.add(off!(Ipv4Hdr, src_addr))), ld32(h.add(off!(Ipv4Hdr, dst_addr)))) };
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
    let (id, be, _, _) = pick_backend(&vip, &flow, true, false)?;
    // Never answer an ICMP error with one: too big is a plain drop here.
    forward(ctx, ip, &vip, &flow, id, &be, NO_BACKEND, false, len, false)?;
    count_reason(reason::FWD_ICMP_ERROR, len);
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

