//! Verdicts and counters: every drop, unusual pass and reply has a named reason
//! (lb_common::reason) counted per CPU; forwarded packets are counted per service and
//! per backend.

use super::*;

/// Why we did not forward: (XDP action, reason). XDP_TX here is a reply we generated.
pub(crate) type Verdict = (u32, u32);

#[inline(always)]
pub(crate) fn pass(r: u32) -> Verdict {
    (XDP_PASS, r)
}

#[inline(always)]
pub(crate) fn drop_with(r: u32) -> Verdict {
    (XDP_DROP, r)
}

#[inline(always)]
pub(crate) fn tx(r: u32) -> Verdict {
    (XDP_TX, r)
}

/// Counts one packet under reason `r`; returns this CPU's count after it.
#[inline(always)]
pub(crate) fn count_reason(r: u32, bytes: u64) -> u64 {
    if let Some(c) = REASON_STATS.get_ptr_mut(r) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            return (*c).packets;
        }
    }
    0
}

/// Drops that only a config or control-plane problem causes are also logged (lbd
/// forwards these into its own log), on the 1st, 2nd, 4th, 8th, ... occurrence per
/// CPU: an operator sees the cause at once, and a flood costs a logarithmic number of
/// log records, never one per packet.
#[inline(always)]
pub(crate) fn log_config_error(ctx: &XdpContext, r: u32, n: u64) {
    if n == 0 || n & (n - 1) != 0 {
        return;
    }
    match r {
        reason::DROP_NO_NEXTHOP => {
            warn!(ctx, "drop_no_nexthop: a backend has no next-hop MAC (none configured, not in the neighbour table, no gateway_mac); {} dropped on this CPU", n)
        }
        reason::DROP_NO_ENCAP_SOURCE => {
            warn!(ctx, "drop_no_encap_source: no encap source for the backend's address family (set encap_source_v4/v6); {} dropped on this CPU", n)
        }
        reason::DROP_BAD_STATE => {
            error!(ctx, "drop_bad_state: a table names a backend without a valid entry (control-plane inconsistency); {} dropped on this CPU", n)
        }
        _ => {}
    }
}

#[inline(always)]
pub(crate) fn count_traffic(map: &PerCpuArray<TrafficCounter>, idx: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}
