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
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibParams, bpf_sock_tuple, tcphdr,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{Counter, DECAP_MAX_ALLOW, DECAP_MAX_GUE_PORTS, DECAP_MAX_LOCAL, V4_MAPPED_WORD, decap_reason, gue, v4_mapped_words};
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
    let (outer_len, inner_proto, is_gue, udp_off) = if ethertype == ETH_P_IP {
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
                Ok((g, inner)) => (hlen + g, inner, true, l3_off + hlen),
                Err(v) => return v,
            }
        } else {
            (hlen, proto, false, 0)
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
                Ok((g, inner)) => (IPV6_LEN + g, inner, true, l3_off + IPV6_LEN),
                Err(v) => return v,
            }
        } else {
            (IPV6_LEN, nh, false, 0)
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

    let mut decapsulated = decap_reason::DECAPSULATED;
    if is_gue {
        let at = GueAt { l3_off, udp_off, inner_off, outer_v6: ethertype == ETH_P_IPV6, inner_v6: inner_version == 6 };
        match second_chance(ctx, &at) {
            Ok(v) => return v,
            Err(r) => decapsulated = r,
        }
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
    (XDP_PASS, decapsulated)
}

const TCP_LISTEN: u32 = 10;

/// A stack struct handed to a helper, at an 8-byte aligned offset: LLVM may copy its
/// fields with 8-byte loads and stores, which the verifier refuses at misaligned stack
/// offsets (word-by-word writes into it go through `put_words`).
#[repr(C, align(8))]
struct Aligned<T>(T);

/// Copies 16 bytes from the packet to 4-byte words on the stack, one volatile store
/// each: LLVM would merge pairs into 8-byte stores at offsets the verifier refuses.
///
/// # Safety
/// `dst` must point to 4 writable words, `src` to 16 readable bytes.
#[inline(always)]
unsafe fn put_words(dst: *mut u32, src: *const u8) {
    unsafe {
        core::ptr::write_volatile(dst, ld32(src));
        core::ptr::write_volatile(dst.add(1), ld32(src.add(4)));
        core::ptr::write_volatile(dst.add(2), ld32(src.add(8)));
        core::ptr::write_volatile(dst.add(3), ld32(src.add(12)));
    }
}

/// Where a GUE packet's headers are (a BPF call takes at most five arguments).
#[derive(Clone, Copy)]
struct GueAt {
    l3_off: usize,
    udp_off: usize,
    inner_off: usize,
    outer_v6: bool,
    inner_v6: bool,
}

/// Second chance (issue 15): a GUE packet whose hop list names a next hop, carrying a
/// TCP packet this host cannot take (a SYN with no listening socket, or a non-SYN
/// packet of a connection it does not hold: no socket, or only the listener and no
/// valid SYN cookie), goes on to that hop: outer destination := the hop, `next` + 1,
/// MACs from the FIB, XDP_TX. Ok(verdict) when sent; Err(reason) to decapsulate and
/// pass (`decapsulated_gue`, or `second_chance_no_route`). UDP has no socket state to
/// ask and never takes a second chance. Not inlined: its stack (the socket tuple, the
/// FIB parameters) stays out of `decap`'s frame, whose 16-byte map keys it would
/// otherwise push to offsets the verifier refuses (misaligned 8-byte stores).
#[inline(never)]
fn second_chance(ctx: &XdpContext, at: &GueAt) -> Result<(u32, u32), u32> {
    const LOCAL: u32 = decap_reason::DECAPSULATED_GUE;
    let GueAt { l3_off, udp_off, inner_off, outer_v6, inner_v6 } = *at;
    let g = ptr_at::<[u8; 8]>(ctx, udp_off + 8).ok_or(LOCAL)? as *mut u8;
    // SAFETY: 8 bytes in bounds: GUE header, hop-list word.
    let (b0, ver, hops, next) = unsafe { (*g, *g.add(4), *g.add(5), *g.add(6)) };
    // An IPv4 outer with options is none of ours (its checksum would need them).
    if (!outer_v6 && udp_off != l3_off + IPV4_LEN) || ver != gue::HOPS_VERSION || hops > gue::MAX_HOPS || next >= hops || (b0 & 0x1f) as usize != 1 + 4 * hops as usize {
        return Err(LOCAL);
    }
    // The inner TCP header (IPv4 without fragments, IPv6 without extension headers).
    let (tcp_off, iph_len) = if inner_v6 {
        let ip = ptr_at::<[u8; IPV6_LEN]>(ctx, inner_off).ok_or(LOCAL)? as *const u8;
        // SAFETY: 40 bytes in bounds.
        if unsafe { *ip.add(6) } != IPPROTO_TCP {
            return Err(LOCAL);
        }
        (inner_off + IPV6_LEN, IPV6_LEN)
    } else {
        let ip = ptr_at::<[u8; IPV4_LEN]>(ctx, inner_off).ok_or(LOCAL)? as *const u8;
        // SAFETY: 20 bytes in bounds.
        let (vihl, frags, proto) = unsafe { (*ip, ld16(ip.add(6)), *ip.add(9)) };
        if proto != IPPROTO_TCP || frags & (IP_MF | IP_OFFSET) != 0 || vihl & 0x0f < 5 {
            return Err(LOCAL);
        }
        (inner_off + ((vihl & 0x0f) as usize) * 4, IPV4_LEN)
    };
    let th = ptr_at::<[u8; 20]>(ctx, tcp_off).ok_or(LOCAL)? as *mut u8;
    let iph = ptr_at::<[u8; IPV6_LEN]>(ctx, inner_off).map(|p| p as *mut u8);
    // SAFETY: 20 bytes of TCP header in bounds.
    let (ports, flags) = unsafe { (ld32(th), *th.add(13)) };
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    // The socket this packet would reach here, from the packet's own view.
    let mut t: core::mem::MaybeUninit<Aligned<bpf_sock_tuple>> = core::mem::MaybeUninit::uninit();
    let tp = t.as_mut_ptr() as *mut u8;
    let size = if inner_v6 {
        let ip = ptr_at::<[u8; IPV6_LEN]>(ctx, inner_off).ok_or(LOCAL)? as *const u8;
        // SAFETY: 40 bytes in bounds; the tuple is 36 bytes of stack.
        unsafe {
            put_words(tp as *mut u32, ip.add(8));
            put_words((tp as *mut u32).add(4), ip.add(24));
            core::ptr::write_volatile(tp.add(32) as *mut u32, ports);
        }
        36u32
    } else {
        let ip = ptr_at::<[u8; IPV4_LEN]>(ctx, inner_off).ok_or(LOCAL)? as *const u8;
        // SAFETY: 20 bytes in bounds; 12 bytes of the tuple written.
        unsafe {
            core::ptr::write_volatile(tp as *mut u32, ld32(ip.add(12)));
            core::ptr::write_volatile(tp.add(4) as *mut u32, ld32(ip.add(16)));
            core::ptr::write_volatile(tp.add(8) as *mut u32, ports);
        }
        12u32
    };
    // SAFETY: the tuple's first `size` bytes are written; the socket is released below.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.ctx as *mut _, t.as_mut_ptr() as *mut bpf_sock_tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    let pass_on = if sk.is_null() {
        true
    } else {
        // SAFETY: a live socket reference from the lookup; released once.
        unsafe {
            let listener = (*sk).state == TCP_LISTEN;
            // A listener only: ours if the packet is the ACK of a SYN cookie we sent.
            let mut not_held = false;
            if !syn && listener {
                not_held = match iph {
                    Some(h) => bpf_tcp_check_syncookie(sk as *mut _, h as *mut _, iph_len as u32, th as *mut tcphdr, 20) != 0,
                    None => true,
                };
            }
            bpf_sk_release(sk as *mut _);
            not_held
        }
    };
    if !pass_on {
        return Err(LOCAL);
    }

    // The next hop, of the outer header's family.
    let hop_off = if next == 0 { udp_off + 16 } else { udp_off + 32 };
    let hp = ptr_at::<[u8; 16]>(ctx, hop_off).ok_or(LOCAL)? as *const u8;
    // SAFETY: 16 bytes in bounds.
    // SAFETY: 16 bytes in bounds.
    let mapped = unsafe { ld32(hp) == 0 && ld32(hp.add(4)) == 0 && ld32(hp.add(8)) == V4_MAPPED_WORD };
    if mapped == outer_v6 {
        return Err(decap_reason::SECOND_CHANCE_NO_ROUTE);
    }
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut fib: Aligned<FibParams> = Aligned(unsafe { core::mem::zeroed() });
    let p = &mut fib.0;
    p.ifindex = ingress;
    p.l4_protocol = IPPROTO_UDP;
    let o = ptr_at::<[u8; IPV6_LEN]>(ctx, l3_off).ok_or(LOCAL)? as *mut u8;
    // SAFETY: 40 bytes of outer header in bounds (an IPv4 outer is followed by UDP and
    // GUE); the lookup writes only into `p`.
    unsafe {
        if outer_v6 {
            p.family = 10;
            put_words(p.__bindgen_anon_3.ipv6_src.as_mut_ptr(), o.add(24));
            put_words(p.__bindgen_anon_4.ipv6_dst.as_mut_ptr(), hp);
        } else {
            p.family = 2;
            p.__bindgen_anon_3.ipv4_src = ld32(o.add(16));
            p.__bindgen_anon_4.ipv4_dst = ld32(hp.add(12));
        }
        let rc = bpf_fib_lookup(ctx.ctx as *mut _, p as *mut FibParams, core::mem::size_of::<FibParams>() as i32, BPF_FIB_LOOKUP_OUTPUT);
        // Not found, no neighbour, forwarding off on this interface (the helper
        // insists on it), or another way out than the way in (XDP_TX only).
        if rc != 0 || p.ifindex != ingress {
            return Err(decap_reason::SECOND_CHANCE_NO_ROUTE);
        }
    }
    // Rewrite: outer destination, the hop taken, UDP checksum 0 (the destination is
    // in its pseudo-header), MACs.
    let u = ptr_at::<[u8; 16]>(ctx, udp_off).ok_or(LOCAL)? as *mut u8;
    let e = ptr_at::<EthHdr>(ctx, 0).ok_or(LOCAL)? as *mut u8;
    // SAFETY: every pointer was bounds-checked for the bytes written.
    unsafe {
        if outer_v6 {
            let mut i = 0;
            while i < 4 {
                st32(o.add(24 + 4 * i), ld32(hp.add(4 * i)));
                i += 1;
            }
        } else {
            st32(o.add(16), ld32(hp.add(12)));
            st16(o.add(10), 0);
            st16(o.add(10), ipv4_csum20(o));
        }
        st16(u.add(6), 0);
        *g.add(6) = next + 1;
        let (dmac, smac) = (p.dmac, p.smac);
        let mut i = 0;
        while i < 6 {
            *e.add(i) = dmac[i];
            *e.add(6 + i) = smac[i];
            i += 1;
        }
    }
    Ok((XDP_TX, if syn { decap_reason::SECOND_CHANCE_SYN } else { decap_reason::SECOND_CHANCE_NOT_HELD }))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
