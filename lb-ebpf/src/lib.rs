//! Helpers shared by the XDP objects: bounds-checked packet access, header constants,
//! checksums. Everything is `#[inline(always)]`: BPF-to-BPF calls cost more than the
//! code they would save, and inlining lets the verifier see constant offsets.
#![no_std]

use aya_ebpf::programs::XdpContext;

pub use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// EtherTypes as the native (little-endian) load of their network-order bytes, so a
/// header field is compared without a byte swap.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD: u16 = 0x88A8u16.to_be();

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;
pub const IPPROTO_HIP: u8 = 139;
pub const IPPROTO_SHIM6: u8 = 140;

/// IPv4 `frags` field masks, as native loads of the network-order u16.
pub const IP_MF: u16 = 0x2000u16.to_be();
pub const IP_OFFSET: u16 = 0x1FFFu16.to_be();
pub const IP_DF: u16 = 0x4000u16.to_be();

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;

/// Default TTL / hop limit of the outer header we add (and of replies we generate).
pub const OUTER_TTL: u8 = 64;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_PORT_UNREACH: u8 = 4;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offset of a field of a typed header (network-types): `p.add(off!(Ipv4Hdr, dst_addr))`
/// names the field a raw `p.add(16)` would hide. A constant, so loads and stores keep
/// their constant offsets (the verifier needs them) and their native width.
#[macro_export]
macro_rules! off {
    ($t:ty, $f:ident) => {
        core::mem::offset_of!($t, $f)
    };
}

/// Pointer to a `T` at `off` bytes into the packet, or `None` if it does not fit.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The Ethernet header (and at most one VLAN tag) of a frame: shared by the balancer
/// and, once its allow-list work is merged, the decapsulator.
pub struct EthInfo {
    /// Offset of the IP header: 14, or 18 behind one tag.
    pub l3_off: usize,
    /// The tag's TPID as loaded (802.1Q or 802.1ad), or 0 when untagged.
    pub tpid: u16,
    /// The EtherType after the tag, as loaded (compare with `ETH_P_*`).
    pub ethertype: u16,
}

/// Why `parse_eth` gave up.
pub enum EthError {
    /// Ethernet header or tag cut by the frame.
    Truncated,
    /// A second VLAN tag (QinQ): not parsed.
    Stacked,
}

/// Parses the Ethernet header and at most one VLAN tag.
#[inline(always)]
pub fn parse_eth(ctx: &XdpContext) -> Result<EthInfo, EthError> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(EthError::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ethertype = unsafe { (*eth).ether_type };
    if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
        return Ok(EthInfo { l3_off: ETH_LEN, tpid: 0, ethertype });
    }
    let vlan: *const VlanHdr = ptr_at(ctx, ETH_LEN).ok_or(EthError::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { (*vlan).ether_type };
    if inner == ETH_P_8021Q || inner == ETH_P_8021AD {
        return Err(EthError::Stacked);
    }
    Ok(EthInfo { l3_off: ETH_LEN + VLAN_LEN, tpid: ethertype, ethertype: inner })
}

/// Whether `len` bytes from `off` are inside the packet.
#[inline(always)]
pub fn fits(ctx: &XdpContext, off: usize, len: usize) -> bool {
    ctx.data() + off + len <= ctx.data_end()
}

/// Native load of a 32-bit word that may be unaligned (packet offsets are 2-aligned).
///
/// # Safety
/// `p` must point to 4 readable bytes.
#[inline(always)]
pub unsafe fn ld32(p: *const u8) -> u32 {
    unsafe { core::ptr::read_unaligned(p as *const u32) }
}

/// Native store of a 32-bit word that may be unaligned.
///
/// # Safety
/// `p` must point to 4 writable bytes.
#[inline(always)]
pub unsafe fn st32(p: *mut u8, v: u32) {
    unsafe { core::ptr::write_unaligned(p as *mut u32, v) }
}

/// Native load of a 16-bit field.
///
/// # Safety
/// `p` must point to 2 readable bytes.
#[inline(always)]
pub unsafe fn ld16(p: *const u8) -> u16 {
    unsafe { core::ptr::read_unaligned(p as *const u16) }
}

/// Native store of a 16-bit field.
///
/// # Safety
/// `p` must point to 2 writable bytes.
#[inline(always)]
pub unsafe fn st16(p: *mut u8, v: u16) {
    unsafe { core::ptr::write_unaligned(p as *mut u16, v) }
}

/// Folds a 32-bit ones'-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Folds a 64-bit ones'-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn csum_fold64(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    csum_fold(((sum & 0xffff) + (sum >> 16)) as u32)
}

/// Unfolded ones'-complement sum of the `len` packet bytes at `off` (`2 <= len <= MAX`),
/// from native loads (the folded complement stored natively is the wire value). One
/// bounds check per 4-byte word: the loop bound is the constant `MAX / 4`.
#[inline(always)]
pub fn csum_packet<const MAX: usize>(ctx: &XdpContext, off: usize, len: usize) -> Option<u64> {
    if len > MAX || len < 2 {
        return None;
    }
    let words = len / 4;
    let mut sum = 0u64;
    let mut i = 0;
    while i < MAX / 4 {
        if i >= words {
            break;
        }
        let p = ptr_at::<u32>(ctx, off + 4 * i)? as *const u8;
        // SAFETY: 4 bytes in bounds (ptr_at).
        sum += unsafe { ld32(p) } as u64;
        i += 1;
    }
    if len & 2 != 0 {
        let p = ptr_at::<u16>(ctx, off + (len & !3))? as *const u8;
        // SAFETY: 2 bytes in bounds.
        sum += unsafe { ld16(p) } as u64;
    }
    if len & 1 != 0 {
        // The lone last byte, read as the second byte of a 16-bit load ending with it:
        // the verifier derives no range from a `p < end` check at offset 0, so a 1-byte
        // access after one is rejected. It is the high-order byte of a zero-padded
        // network word, i.e. its native (little-endian) value is the byte itself.
        // black_box: LLVM would otherwise fold `pos + 2 > end` back into `off + len > end`.
        let pos = core::hint::black_box(off + len - 2);
        let p = ptr_at::<u16>(ctx, pos)? as *const u8;
        // SAFETY: 2 bytes in bounds.
        sum += (unsafe { ld16(p) } >> 8) as u64;
    }
    Some(sum)
}

/// Ones'-complement sum of the pseudo-header of an upper-layer packet of `len` bytes.
/// `src`/`dst` are IPv4-mapped words for IPv4 (only the last word counts).
#[inline(always)]
pub fn pseudo_sum(v6: bool, src: &[u32; 4], dst: &[u32; 4], proto: u8, len: u32) -> u64 {
    let mut sum = 0u64;
    if v6 {
        let mut i = 0;
        while i < 4 {
            sum += src[i] as u64 + dst[i] as u64;
            i += 1;
        }
    } else {
        sum += src[3] as u64 + dst[3] as u64;
    }
    // Protocol and length are network-order fields: their native value is byte-swapped.
    sum + ((proto as u16).to_be() as u64) + ((len as u16).to_be() as u64) + (((len >> 16) as u16).to_be() as u64)
}

/// IPv4 header checksum of a 20-byte header (checksum field must be zero), from
/// native 16-bit loads; stored natively it is the right network-order value.
///
/// # Safety
/// `h` must point to 20 readable bytes.
#[inline(always)]
pub unsafe fn ipv4_csum20(h: *const u8) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += unsafe { ld16(h.add(2 * i)) } as u32;
        i += 1;
    }
    csum_fold(sum)
}

/// Whether an IPv6 next-header value is an extension header (walked or not).
#[inline(always)]
pub fn is_ipv6_ext(nh: u8) -> bool {
    matches!(
        nh,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_ESP
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            | IPPROTO_MH
            | IPPROTO_HIP
            | IPPROTO_SHIM6
    )
}
