//! Replies the balancer builds itself: echo reply, TCP RST, ICMP errors (port
//! unreachable, too big), all rate-limited per CPU.

use super::*;

/// Largest quote of the offending packet in an ICMP error we generate: the whole
/// reply stays within 576 bytes (IPv4, RFC 1812) / 1280 bytes (IPv6, RFC 4443).
pub(crate) const QUOTE4_MAX: usize = 576 - IPV4_LEN - 8;

pub(crate) const QUOTE6_MAX: usize = 1280 - IPV6_LEN - 8;

/// Takes one reply token from this CPU's bucket (rate per second, burst one second).
#[inline(always)]
pub(crate) fn reply_allowed() -> bool {
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

/// ICMP echo request to a VIP address: answered in place (MACs, addresses swapped,
/// type -> reply, checksum updated incrementally, TTL / hop limit 64). IPv4 options and
/// IPv6 extension headers: passed (the reply would have to mirror them).
#[inline(always)]
pub(crate) fn echo_reply(ctx: &XdpContext, ip: &Ip) -> Result<(), Verdict> {
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
pub(crate) unsafe fn set_icmp_type(h: *mut u8, ty: u8) {
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

/// An ICMP error from the VIP to the client (port unreachable, too big) quoting the
/// start of the offending IP packet: trim the frame to L2 + quote, prepend the new IP
/// and ICMP headers, checksum. `info` is the ICMP header's second word (next-hop MTU).
#[inline(always)]
pub(crate) fn icmp_error_reply(ctx: &XdpContext, ip: &Ip, ty: u8, code: u8, info: u32, r: u32) -> Result<(), Verdict> {
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
pub(crate) fn tcp_reset(ctx: &XdpContext, ip: &Ip) -> Result<(), Verdict> {
    let t: *const u8 = ptr_at::<TcpHdr>(ctx, ip.l4_off).ok_or(drop_with(reason::DROP_MALFORMED))? as *const u8;
    // SAFETY: 20 bytes of TCP header in bounds (parse_l4 checked the same).
    let (sport, dport, seq, ack, doff, flags) = unsafe {
        (ld16(t), ld16(t.add(off!(TcpHdr, dest))), u32::from_be(ld32(t.add(off!(TcpHdr, seq)))), ld32(t.add(off!(TcpHdr, ack_seq))), (*t.add(off!(TcpHdr, _bitfield_1)) >> 4) as usize, *t.add(off!(TcpHdr, _bitfield_1) + 1))
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
        st16(o.add(off!(TcpHdr, dest)), sport);
        st32(o.add(off!(TcpHdr, seq)), rseq);
        st32(o.add(off!(TcpHdr, ack_seq)), rack);
        *o.add(off!(TcpHdr, _bitfield_1)) = 5 << 4;
        *o.add(off!(TcpHdr, _bitfield_1) + 1) = rflags;
        st16(o.add(off!(TcpHdr, window)), 0);
        st16(o.add(off!(TcpHdr, check)), 0);
        st16(o.add(off!(TcpHdr, urg_ptr)), 0);
        let mut sum = pseudo_sum(ip.v6, &ip.dst, &ip.src, IPPROTO_TCP, 20);
        let mut i = 0;
        while i < 5 {
            sum += ld32(o.add(4 * i)) as u64;
            i += 1;
        }
        sum
    };
    // SAFETY: as above.
    unsafe { st16(o.add(off!(TcpHdr, check)), csum_fold64(sum)) };
    Err(tx(reason::TX_RST))
}
