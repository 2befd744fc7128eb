//! Parsing the IP packet (IPv4, IPv6 with extension headers) and the TCP/UDP ports.

use super::*;

/// Not a fragment, or an IPv6 atomic fragment (offset 0, no more fragments).
pub(crate) const FRAG_NONE: u8 = 0;

/// First fragment: carries the L4 header.
pub(crate) const FRAG_FIRST: u8 = 1;

/// Later fragment: no L4 header.
pub(crate) const FRAG_LATER: u8 = 2;

/// Extension headers walked before the upper-layer header (constant loop bound).
pub(crate) const MAX_IPV6_EXT: usize = 4;

/// What the parser learned about an IP packet addressed to a (maybe) VIP address.
pub(crate) struct Ip {
    /// The VLAN tag's TPID (native load) or 0 when untagged (IP header at 14 or 18).
    pub(crate) tpid: u16,
    pub(crate) v6: bool,
    /// Length of the IP packet (header included), host order.
    pub(crate) ip_len: u32,
    /// Traffic class / TOS byte of the packet, copied to the outer header.
    pub(crate) tos: u8,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub(crate) proto: u8,
    /// Offset of the upper-layer header in the frame, and bytes from it to the end of
    /// the IP packet.
    pub(crate) l4_off: usize,
    pub(crate) l4_len: usize,
    pub(crate) frag: u8,
    pub(crate) frag_id: u32,
    /// Client and VIP address (IPv4-mapped for IPv4), network order.
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
}

impl Ip {
    /// Offset of the IP header, a constant per tag (the verifier needs constants after
    /// bpf_xdp_adjust_head/tail).
    #[inline(always)]
    pub(crate) fn l3_off(&self) -> usize {
        if self.tpid != 0 { ETH_LEN + VLAN_LEN } else { ETH_LEN }
    }
}

#[inline(always)]
pub(crate) fn parse_v4(ctx: &XdpContext, l3_off: usize, tpid: u16) -> Result<Ip, Verdict> {
    let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 20 bytes of IPv4 header are in bounds.
    let (vihl, daddr) = unsafe { (*ip, ld32(ip.add(off!(Ipv4Hdr, dst_addr)))) };
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
        (*ip.add(off!(Ipv4Hdr, tos)), u16::from_be(ld16(ip.add(off!(Ipv4Hdr, tot_len)))) as usize, ld16(ip.add(off!(Ipv4Hdr, id))), ld16(ip.add(off!(Ipv4Hdr, frags))), *ip.add(off!(Ipv4Hdr, proto)), ld32(ip.add(off!(Ipv4Hdr, src_addr))))
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
pub(crate) fn parse_v6(ctx: &XdpContext, l3_off: usize, tpid: u16) -> Result<Ip, Verdict> {
    let ip: *const u8 = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 40 bytes of IPv6 header are in bounds.
    let v0 = unsafe { *ip };
    if v0 >> 4 != 6 {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    let dst = unsafe { [ld32(ip.add(off!(Ipv6Hdr, dst_addr))), ld32(ip.add(off!(Ipv6Hdr, dst_addr) + 4)), ld32(ip.add(off!(Ipv6Hdr, dst_addr) + 8)), ld32(ip.add(off!(Ipv6Hdr, dst_addr) + 12))] };
    if !maybe_vip(&dst) {
        return Err(pass(reason::PASS_NOT_VIP));
    }
    // SAFETY: as above.
    let (v1, payload_len, first_nh) = unsafe { (*ip.add(1), u16::from_be(ld16(ip.add(off!(Ipv6Hdr, payload_len)))) as usize, *ip.add(off!(Ipv6Hdr, next_hdr))) };
    if !fits(ctx, l3_off, IPV6_LEN + payload_len) {
        return Err(drop_with(reason::DROP_MALFORMED));
    }
    let src = unsafe { [ld32(ip.add(off!(Ipv6Hdr, src_addr))), ld32(ip.add(off!(Ipv6Hdr, src_addr) + 4)), ld32(ip.add(off!(Ipv6Hdr, src_addr) + 8)), ld32(ip.add(off!(Ipv6Hdr, src_addr) + 12))] };
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
pub(crate) fn parse_l4(ctx: &XdpContext, ip: &Ip) -> Result<(u16, u16, u8), Verdict> {
    if ip.proto == IPPROTO_TCP {
        let t: *const u8 = ptr_at::<TcpHdr>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
        // SAFETY: 20 bytes of TCP header are in bounds.
        let (sport, dport, doff, flags) = unsafe { (ld16(t), ld16(t.add(off!(TcpHdr, dest))), *t.add(off!(TcpHdr, _bitfield_1)) >> 4, *t.add(off!(TcpHdr, _bitfield_1) + 1)) };
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
        unsafe { Ok((ld16(u), ld16(u.add(off!(UdpHdr, dst))), 0)) }
    }
}
