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

/// Default TTL / hop limit of the outer header we add.
pub const OUTER_TTL: u8 = 64;

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

/// Whether an IPv6 next-header value is an extension header we do not walk yet.
#[inline(always)]
pub fn is_ipv6_ext(nh: u8) -> bool {
    matches!(
        nh,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            | IPPROTO_MH
            | IPPROTO_HIP
            | IPPROTO_SHIM6
    )
}
