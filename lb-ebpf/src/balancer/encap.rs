//! Forwarding: dsr-l2 MAC rewrite or IPIP / IP6IP6 encapsulation, and the header
//! writers every rewrite uses (one writer per header).

use super::*;

/// Sends the packet to its backend (dsr-l2, ipip or gue) and counts it. `flow` is the
/// 5-tuple the backend was picked by; gue derives its UDP source port from its hash,
/// and carries `hop` (a backend id, or NO_BACKEND) as its hop list when that entry may
/// be a hop of this service.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn forward(
    ctx: &XdpContext,
    ip: &Ip,
    vip: &VipValue,
    flow: &FlowKey,
    id: u32,
    be: &BackendValue,
    hop: u32,
    new_flow: bool,
    len: u64,
    may_answer_too_big: bool,
) -> Result<(), Verdict> {
    let mode = vip.mode & MODE_MASK;
    if mode == MODE_DSR_L2 {
        rewrite_l2(ctx, be)?;
    } else if mode == MODE_GUE {
        let mut udp = GueUdp { sport: gue::source_port(flow_hash(flow)).to_be(), dport: vip_gue_port(vip.mode).to_be(), hop: [0; 4], has_hop: false };
        if hop != id
            && let Some(h) = BACKENDS.get(hop)
            && h.flags & (BACKEND_F_VALID | BACKEND_F_HOP) != 0
            && h.service_id == vip.service_id
        {
            udp.hop = h.addr;
            udp.has_hop = true;
        }
        encapsulate(ctx, ip, be, may_answer_too_big, &udp)?;
    } else {
        encapsulate(ctx, ip, be, may_answer_too_big, &GueUdp { sport: 0, dport: 0, hop: [0; 4], has_hop: false })?;
    }
    count_traffic(&SERVICE_STATS, vip.service_id, len, new_flow);
    count_traffic(&BACKEND_STATS, id, len, new_flow);
    Ok(())
}

/// The outer UDP ports of a gue packet (network order), `dport` 0 meaning ipip, and
/// its one hop (the second-chance backend's address words) when `has_hop`.
#[derive(Clone, Copy)]
pub(crate) struct GueUdp {
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) hop: [u32; 4],
    pub(crate) has_hop: bool,
}

/// Bytes gue adds between the outer IP header and the inner packet (UDP, GUE, a hop
/// list without hops); each hop adds `gue::HOP_LEN`.
pub(crate) const GUE_OVERHEAD: usize = gue::overhead(0);

/// dsr-l2: destination MAC := backend's, source MAC := the address the frame was sent
/// to (this balancer's interface), so switches never learn a client's MAC on our port.
#[inline(always)]
pub(crate) fn rewrite_l2(ctx: &XdpContext, be: &BackendValue) -> Result<(), Verdict> {
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
/// gue (`udp.dport` set): the same outer header with protocol 17, then UDP, GUE and the
/// hop list (lb_common::gue), then the inner packet. Over the MTU: ICMP too big to the
/// client when DF is set (IPv4) or always (IPv6), unless the packet is itself an ICMP
/// error (`may_answer_too_big` false); else dropped.
#[inline(always)]
pub(crate) fn encapsulate(ctx: &XdpContext, ip: &Ip, be: &BackendValue, may_answer_too_big: bool, udp: &GueUdp) -> Result<(), Verdict> {
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
    let is_gue = udp.dport != 0;
    let ip_hdr_len: usize = if outer_v6 { IPV6_LEN } else { IPV4_LEN };
    let gue_len: usize = if !is_gue {
        0
    } else if udp.has_hop {
        GUE_OVERHEAD + gue::HOP_LEN
    } else {
        GUE_OVERHEAD
    };
    let hdr_len: usize = ip_hdr_len + gue_len;
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
    let outer_proto = if is_gue { IPPROTO_UDP } else { inner_proto };

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
            st16(o.add(off!(Ipv6Hdr, payload_len)), ((ip.ip_len as usize + hdr_len - IPV6_LEN) as u16).to_be());
            *o.add(off!(Ipv6Hdr, next_hdr)) = outer_proto;
            *o.add(off!(Ipv6Hdr, hop_limit)) = OUTER_TTL;
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
            *o.add(off!(Ipv4Hdr, tos)) = ip.tos;
            st16(o.add(off!(Ipv4Hdr, tot_len)), ((ip.ip_len as usize + hdr_len) as u16).to_be());
            // Id 0 with DF: an atomic datagram (RFC 6864); we never fragment.
            st16(o.add(off!(Ipv4Hdr, id)), 0);
            st16(o.add(off!(Ipv4Hdr, frags)), IP_DF);
            *o.add(off!(Ipv4Hdr, ttl)) = OUTER_TTL;
            *o.add(off!(Ipv4Hdr, proto)) = outer_proto;
            st16(o.add(off!(Ipv4Hdr, check)), 0);
            st32(o.add(off!(Ipv4Hdr, src_addr)), src_v4);
            st32(o.add(off!(Ipv4Hdr, dst_addr)), be.addr[3]);
            st16(o.add(off!(Ipv4Hdr, check)), ipv4_csum20(o));
        }
    }
    if is_gue {
        write_gue(ctx, l3_off + ip_hdr_len, ip.ip_len as usize + gue_len, udp, inner_proto)?;
    }
    Ok(())
}

/// Writes UDP, the GUE header and the hop list (no hop, or `udp.hop`) at `off`
/// (lb_common::gue). `udp_len` is the UDP length (header included). The UDP checksum
/// is 0: the inner packet carries its own, and recomputing one over the payload would
/// cost a pass over every byte (IPv6 tunnels may do this, RFC 6935/6936).
#[inline(always)]
pub(crate) fn write_gue(ctx: &XdpContext, off: usize, udp_len: usize, udp: &GueUdp, inner_proto: u8) -> Result<(), Verdict> {
    let u: *mut u8 = ptr_at::<[u8; GUE_OVERHEAD]>(ctx, off).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    let hops: u8 = if udp.has_hop { 1 } else { 0 };
    // SAFETY: GUE_OVERHEAD (16) bytes in bounds.
    unsafe {
        st16(u, udp.sport);
        st16(u.add(2), udp.dport);
        st16(u.add(4), (udp_len as u16).to_be());
        st16(u.add(6), 0);
        // ver 0, C 0, hlen: the hop list's words; proto: the inner packet's; flags 0.
        *u.add(8) = ((gue::HOPS_HDR_LEN + gue::HOP_LEN * hops as usize) / 4) as u8;
        *u.add(9) = inner_proto;
        st16(u.add(10), 0);
        // Hop list: version, hops, next (the first hop), reserved.
        *u.add(12) = gue::HOPS_VERSION;
        *u.add(13) = hops;
        *u.add(14) = 0;
        *u.add(15) = 0;
    }
    if udp.has_hop {
        let h: *mut u8 = ptr_at::<[u8; gue::HOP_LEN]>(ctx, off + GUE_OVERHEAD).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
        // SAFETY: HOP_LEN (16) bytes in bounds.
        unsafe {
            let mut i = 0;
            while i < 4 {
                st32(h.add(4 * i), udp.hop[i]);
                i += 1;
            }
        }
    }
    Ok(())
}

/// A MAC address as one 32-bit and one 16-bit word: 4-byte aligned on the stack (the
/// verifier rejects misaligned stack access, unlike packet access).
#[derive(Clone, Copy)]
pub(crate) struct Mac {
    pub(crate) hi: u32,
    pub(crate) lo: u16,
}

impl Mac {
    /// # Safety
    /// `p` must point to 6 readable bytes.
    #[inline(always)]
    pub(crate) unsafe fn load(p: *const u8) -> Self {
        unsafe { Mac { hi: ld32(p), lo: ld16(p.add(4)) } }
    }

    /// # Safety
    /// `p` must point to 6 writable bytes.
    #[inline(always)]
    pub(crate) unsafe fn store(self, p: *mut u8) {
        unsafe {
            st32(p, self.hi);
            st16(p.add(4), self.lo);
        }
    }
}

/// L2 fields of the frame as it arrived.
pub(crate) struct L2 {
    /// Destination MAC (our interface) and source MAC (the sender / router).
    pub(crate) ours: Mac,
    pub(crate) peer: Mac,
    pub(crate) tci: u16,
}

#[inline(always)]
pub(crate) fn save_l2(ctx: &XdpContext, tpid: u16) -> Result<L2, Verdict> {
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
pub(crate) fn write_l2(ctx: &XdpContext, tpid: u16, tci: u16, dst: Mac, src: Mac, ethertype: u16) -> Result<(), Verdict> {
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
pub(crate) fn trim_to(ctx: &XdpContext, want: usize) -> Result<(), Verdict> {
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
pub(crate) fn write_ipv4(ctx: &XdpContext, l3: usize, tot_len: u16, frags: u16, proto: u8, src: u32, dst: u32) -> Result<(), Verdict> {
    let o: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 20 bytes in bounds.
    unsafe {
        *o = 0x45;
        *o.add(off!(Ipv4Hdr, tos)) = 0;
        st16(o.add(off!(Ipv4Hdr, tot_len)), tot_len.to_be());
        st16(o.add(off!(Ipv4Hdr, id)), 0);
        st16(o.add(off!(Ipv4Hdr, frags)), frags);
        *o.add(off!(Ipv4Hdr, ttl)) = OUTER_TTL;
        *o.add(off!(Ipv4Hdr, proto)) = proto;
        st16(o.add(off!(Ipv4Hdr, check)), 0);
        st32(o.add(off!(Ipv4Hdr, src_addr)), src);
        st32(o.add(off!(Ipv4Hdr, dst_addr)), dst);
        st16(o.add(off!(Ipv4Hdr, check)), ipv4_csum20(o));
    }
    Ok(())
}

/// Writes a 40-byte IPv6 header (traffic class and flow label 0) at `l3`.
#[inline(always)]
pub(crate) fn write_ipv6(ctx: &XdpContext, l3: usize, payload_len: u16, nh: u8, src: &[u32; 4], dst: &[u32; 4]) -> Result<(), Verdict> {
    let o: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, l3).ok_or(drop_with(reason::DROP_INTERNAL))? as *mut u8;
    // SAFETY: 40 bytes in bounds.
    unsafe {
        st32(o, (6u32 << 28).to_be());
        st16(o.add(off!(Ipv6Hdr, payload_len)), payload_len.to_be());
        *o.add(off!(Ipv6Hdr, next_hdr)) = nh;
        *o.add(off!(Ipv6Hdr, hop_limit)) = OUTER_TTL;
        let mut i = 0;
        while i < 4 {
            st32(o.add(8 + 4 * i), src[i]);
            st32(o.add(24 + 4 * i), dst[i]);
            i += 1;
        }
    }
    Ok(())
}
