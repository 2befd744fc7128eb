//! Flow keys, the service lookup and the backend pick: the flow table, the Maglev
//! table, flood mode and flow-sync reports.

use super::*;

/// `FlowKey` / `FragKey` as whole words: a struct literal with a zeroed `[u8; 3]` pad
/// makes LLVM emit a call to memset (a BPF-to-BPF call on the hot path).
#[repr(C)]
pub(crate) struct KeyWords {
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
    /// FlowKey: source port | destination port << 16 (source port first in memory).
    /// FragKey: the datagram id.
    pub(crate) w8: u32,
    /// Protocol and three zero pad bytes.
    pub(crate) proto: u32,
}

const _: () = assert!(core::mem::size_of::<KeyWords>() == core::mem::size_of::<FlowKey>());

const _: () = assert!(core::mem::size_of::<KeyWords>() == core::mem::size_of::<FragKey>());

#[inline(always)]
pub(crate) fn flow_key(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
    let w = KeyWords { src: *src, dst: *dst, w8: src_port as u32 | (dst_port as u32) << 16, proto: proto as u32 };
    // SAFETY: same size, alignment 4, every bit pattern valid, pad bytes zero.
    unsafe { core::mem::transmute::<KeyWords, FlowKey>(w) }
}

#[inline(always)]
pub(crate) fn frag_key(src: &[u32; 4], dst: &[u32; 4], id: u32, proto: u8) -> FragKey {
    let w = KeyWords { src: *src, dst: *dst, w8: id, proto: proto as u32 };
    // SAFETY: as above.
    unsafe { core::mem::transmute::<KeyWords, FragKey>(w) }
}

/// Bloom prefilter over VIP addresses.
#[inline(always)]
pub(crate) fn maybe_vip(addr: &[u32; 4]) -> bool {
    let bit = vip_addr_bit(addr);
    match VIP_BLOOM.get(0) {
        Some(b) => (b.words[(bit >> 6) as usize & 63] >> (bit & 63)) & 1 != 0,
        None => false,
    }
}

/// The service of (address, port, protocol), exact port first, then port 0.
#[inline(always)]
pub(crate) fn lookup_vip(addr: &[u32; 4], port: u16, proto: u8) -> Option<VipValue> {
    let mut vk = VipKey { addr: *addr, port, proto, _pad: 0 };
    if port != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(v) = unsafe { VIPS.get(vk) } {
            return Some(*v);
        }
        vk.port = 0;
    }
    // SAFETY: as above.
    unsafe { VIPS.get(vk) }.copied()
}

/// Whether any service (any port, any protocol) has this VIP address: one lookup in
/// VIP_ADDRS, which userspace keeps with the bloom filter.
#[inline(always)]
pub(crate) fn is_vip_address(addr: &[u32; 4]) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { VIP_ADDRS.get(addr).is_some() }
}

/// `pick_backend`'s third result: how the backend was found.
pub(crate) type Pick = u8;

/// The flow-table entry (an existing flow).
pub(crate) const PICK_EXISTING: Pick = 0;

/// The Maglev pick, recorded in the flow table: a new flow.
pub(crate) const PICK_RECORDED: Pick = 1;

/// The Maglev pick, not recorded (`create` false: RST, ICMP error, fragment).
pub(crate) const PICK_UNRECORDED: Pick = 2;

/// The Maglev pick, not recorded: this CPU is above its new-flow limit (flood mode).
pub(crate) const PICK_FLOOD: Pick = 3;

/// The Maglev pick, not recorded: the insert failed.
pub(crate) const PICK_INSERT_FAILED: Pick = 4;

/// The flow's backend: its flow-table entry (if `lookup`) when that backend still
/// serves this service, else the Maglev pick (recorded in the flow table if `create`
/// and this CPU is within its new-flow limit). With it, a gue service's second-chance
/// hop (`NO_BACKEND` for other modes): the slot's secondary, or for a flow-table hit
/// the slot's other backend. TCP of a `flow_table = "off"` gue service
/// (VIP_F_NO_FLOW_TABLE) never touches the flow table.
#[inline(always)]
pub(crate) fn pick_backend(vip: &VipValue, flow: &FlowKey, lookup: bool, create: bool) -> Result<(u32, BackendValue, Pick, u32), Verdict> {
    if vip.service_id >= MAX_SERVICES {
        return Err(drop_with(reason::DROP_BAD_STATE));
    }
    let gue = vip.mode & MODE_MASK == MODE_GUE;
    let stateless = gue && vip.flags & VIP_F_NO_FLOW_TABLE != 0 && flow.proto == PROTO_TCP;
    if lookup && !stateless && let Some(fv) = FLOWS.get_ptr_mut(flow) {
        // SAFETY: a live map value; its fields are read once.
        let (id, reported) = unsafe { ((*fv).backend_id, (*fv).created_ns) };
        if let Some(be) = BACKENDS.get(id)
            && be.flags & BACKEND_F_VALID != 0
            && be.service_id == vip.service_id
        {
            if create && reported == 0 {
                report_proven_flow(fv, flow, id, vip.service_id);
            }
            let hop = if gue {
                let e = table_entry(vip, flow)?;
                if e.primary != id { e.primary } else { e.secondary }
            } else {
                NO_BACKEND
            };
            return Ok((id, *be, PICK_EXISTING, hop));
        }
    }
    let e = table_entry(vip, flow)?;
    let id = e.primary;
    if id == NO_BACKEND {
        return Err(drop_with(reason::DROP_NO_BACKEND));
    }
    let hop = if gue { e.secondary } else { NO_BACKEND };
    let be = *BACKENDS.get(id).ok_or(drop_with(reason::DROP_BAD_STATE))?;
    if be.flags & BACKEND_F_VALID == 0 {
        return Err(drop_with(reason::DROP_BAD_STATE));
    }
    if !create || stateless {
        return Ok((id, be, PICK_UNRECORDED, hop));
    }
    let settings = SETTINGS.get(0);
    let limit = settings.map_or(0, |s| s.max_new_flows);
    if limit != 0 && over_new_flow_limit(limit) {
        return Ok((id, be, PICK_FLOOD, hop));
    }
    // No clock read: nothing reads a flow's age (the LRU evicts by use).
    let v = FlowValue { backend_id: id, _pad: 0, created_ns: 0 };
    // A failed insert (map full of in-flight updates) only costs stickiness for this
    // packet; the next packet retries.
    if FLOWS.insert(flow, v, 0).is_err() {
        return Ok((id, be, PICK_INSERT_FAILED, hop));
    }
    // A new flow is one we recorded; a RST that misses is forwarded but not remembered.
    Ok((id, be, PICK_RECORDED, hop))
}

/// The flow's (primary, secondary) in the service's live table.
#[inline(always)]
pub(crate) fn table_entry(vip: &VipValue, flow: &FlowKey) -> Result<TableEntry, Verdict> {
    let m = vip.table_size;
    if m == 0 || m > MAX_TABLE_SIZE {
        return Err(drop_with(reason::DROP_BAD_STATE));
    }
    let pos = flow_hash(flow) % m;
    TABLES.get(table_index(vip.service_id, vip.active_slot, pos)).copied().ok_or(drop_with(reason::DROP_BAD_STATE))
}

/// Flood mode: counts one new flow in this CPU's one-second window and says whether the
/// window is over `limit`. The coarse clock (jiffies resolution, a few ns) is enough for
/// a one-second window; it is read only when a limit is set.
#[inline(always)]
pub(crate) fn over_new_flow_limit(limit: u32) -> bool {
    const NS: u64 = 1_000_000_000;
    let Some(m) = FLOOD_METER.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU value, no concurrent writer on this CPU; the helper is always
    // callable from XDP.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*m).window_ns) >= NS {
            (*m).window_ns = now;
            (*m).count = 0;
        }
        (*m).count += 1;
        (*m).count > limit as u64
    }
}

/// Flow sync reports a flow on its second packet, once it proves real: a flow whose
/// entry the datapath recorded (`created_ns` 0) is reported when a packet hits it while
/// sync is on, then marked with the (coarse) time of the report. A SYN flood therefore
/// costs the sync channel nothing; a flow synced in from the peer (lbd writes its clock)
/// is never reported back; a node that becomes active reports its live flows as their
/// next packets arrive. A flow that fails over before its second packet is steered by
/// its Maglev pick on the peer, the same backend while both nodes have the same set.
#[inline(always)]
pub(crate) fn report_proven_flow(fv: *mut FlowValue, flow: &FlowKey, backend_id: u32, service_id: u32) {
    if !SETTINGS.get(0).is_some_and(|s| s.flags & SETTINGS_F_FLOW_SYNC != 0) {
        return;
    }
    report_new_flow(flow, backend_id, service_id);
    // SAFETY: a live map value; a racing CPU at worst reports the flow twice (the peer
    // writes the same entry twice). The helper is always callable.
    unsafe { (*fv).created_ns = bpf_ktime_get_coarse_ns() | 1 };
}

/// Hands a flow to userspace for the peer balancer. The reader is not woken per
/// event (a wakeup costs the sender an IPI and the reader a context switch per flow):
/// lbd drains the ring on a short timer, and only a ring a quarter full wakes it at
/// once. A full ring (userspace behind) loses the event, counted in SYNC_STATS;
/// forwarding goes on.
#[inline(always)]
pub(crate) fn report_new_flow(flow: &FlowKey, backend_id: u32, service_id: u32) {
    let ev = FlowEvent { key: *flow, backend_id, service_id };
    let wake = if FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= FLOW_EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if FLOW_EVENTS.output::<FlowEvent>(&ev, wake as u64).is_err()
        && let Some(c) = SYNC_STATS.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
