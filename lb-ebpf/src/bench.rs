//! Benchmark-only XDP programs (never attached to an interface).
//!
//! `BPF_PROG_TEST_RUN` with `repeat` runs the program again on the frame the previous
//! iteration rewrote: after one IPIP encapsulation every later iteration would see an
//! IPIP packet and take another path (and a reply is addressed to the client, not the
//! VIP). `bench_harness` therefore restores the frame from
//! `TEMPLATE` before each iteration and tail-calls the program under test. Every case
//! and its baseline (`bench_trivial`) run behind the same harness, so their ratio is
//! honest; the harness alone (tail-calling `bench_noop`) is printed, not subtracted.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS, XDP_TX},
    helpers::{bpf_get_smp_processor_id, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_ebpf::*;

/// Every bench frame is exactly this long (shorter packets carry Ethernet padding).
pub const BENCH_FRAME_LEN: usize = 128;

#[repr(C)]
pub struct Template {
    /// 1: write an iteration counter into the IPv4 source address (high bits) and the
    /// TCP/UDP source port (low 16 bits), and the CPU into the address's second byte: a
    /// new flow every iteration, distinct across CPUs running at once. 2: the same with
    /// the counter halved (and bit 7 of the address's second byte set, so these flows
    /// never meet those of mode 1): every flow gets two packets in a row.
    pub vary: u32,
    /// 1: the program under test strips headers (lb_decap): a shorter frame is restored
    /// by growing the head back; 0: by growing the tail (a reply cut it).
    pub head_shrinks: u32,
    pub bytes: [u8; BENCH_FRAME_LEN],
}

/// Offsets in an untagged IPv4 frame: second byte and low half of the source address,
/// source port.
const SADDR_CPU_OFF: usize = ETH_LEN + 13;
const SADDR_LO_OFF: usize = ETH_LEN + 14;
const SPORT_OFF: usize = ETH_LEN + IPV4_LEN;

/// Entry 0: the frame every iteration starts from.
#[map]
static TEMPLATE: Array<Template> = Array::with_max_entries(1, 0);

/// Entry 0: the program under test.
#[map]
static PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Iteration counter for varied frames (new flow every iteration).
#[map]
static ITER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_harness(ctx: XdpContext) -> u32 {
    let Some(t) = TEMPLATE.get(0) else { return XDP_ABORTED };
    // Undo a previous iteration's encapsulation (head grew), decapsulation (head
    // shrank) or reply (tail cut: TCP RST, ICMP error built from a longer packet).
    let cur = (ctx.data_end() - ctx.data()) as i32;
    let delta = cur - BENCH_FRAME_LEN as i32;
    if delta > 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return XDP_ABORTED;
    }
    if delta < 0 && t.head_shrinks != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return XDP_ABORTED;
    }
    if delta < 0 && t.head_shrinks == 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -delta) } != 0 {
        return XDP_ABORTED;
    }
    let Some(dst) = ptr_at::<[u64; BENCH_FRAME_LEN / 8]>(&ctx, 0) else { return XDP_ABORTED };
    let src = t.bytes.as_ptr() as *const u64;
    let dst = dst as *mut u64;
    let mut i = 0;
    while i < BENCH_FRAME_LEN / 8 {
        // SAFETY: both sides hold BENCH_FRAME_LEN bytes.
        unsafe { core::ptr::write_unaligned(dst.add(i), core::ptr::read_unaligned(src.add(i))) };
        i += 1;
    }
    if t.vary != 0
        && let Some(n) = ITER.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value.
        let v = unsafe {
            *n = (*n).wrapping_add(1);
            *n
        };
        // v counts from 1 after an even number of iterations: (v + 1) >> 1 pairs them.
        let v = if t.vary == 2 { v.wrapping_add(1) >> 1 } else { v };
        let base = dst as *mut u8;
        // SAFETY: constant offsets inside the 128 bytes checked above; the helper is
        // always callable.
        unsafe {
            st16(base.add(SPORT_OFF), v as u16);
            st16(base.add(SADDR_LO_OFF), (v >> 16) as u16);
            // Pairs (vary 2) get flows of their own: bit 7 set.
            *base.add(SADDR_CPU_OFF) = bpf_get_smp_processor_id() as u8 | if t.vary == 2 { 0x80 } else { 0 };
        }
    }
    // SAFETY: tail call into the program under test; falls through on failure.
    unsafe { PROGS.tail_call(&ctx, 0) };
    XDP_ABORTED
}

/// Tail-call target that does nothing: measures the harness alone.
#[xdp]
pub fn bench_noop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The baseline: parse Ethernet/IPv4/TCP, swap MACs, XDP_TX.
#[xdp]
pub fn bench_trivial(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else { return XDP_PASS };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP {
        return XDP_PASS;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(&ctx, ETH_LEN) else { return XDP_PASS };
    let ip = ip as *const u8;
    // SAFETY: 20 bytes in bounds.
    let (vihl, proto) = unsafe { (*ip, *ip.add(9)) };
    if proto != IPPROTO_TCP {
        return XDP_PASS;
    }
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if ptr_at::<TcpHdr>(&ctx, ETH_LEN + hlen).is_none() {
        return XDP_PASS;
    }
    let e = eth as *mut u8;
    // SAFETY: 14 bytes in bounds.
    unsafe {
        let (d0, d1) = (ld32(e), ld16(e.add(4)));
        st32(e, ld32(e.add(6)));
        st16(e.add(4), ld16(e.add(10)));
        st32(e.add(6), d0);
        st16(e.add(10), d1);
    }
    XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
