//! Flow sync, the parts that touch this node's datapath: `FLOW_EVENTS` records and
//! the `FLOWS` write of a synced flow. The tasks around them are in `daemon::flows`,
//! the I/O-free rules in `cluster::flow_sync`.

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{FlowEvent, FlowKey, FlowValue};

use crate::maps::MapWriteError;

/// Parses one FLOW_EVENTS record.
pub fn parse_event(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() != size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: length checked; FlowEvent is repr(C) plain data, any bit pattern valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlowEvent) })
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes synced flows into this node's FLOWS.
pub struct FlowWriter {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
}

impl FlowWriter {
    pub fn new(flows: BpfHashMap<MapData, FlowKey, FlowValue>) -> Self {
        Self { flows }
    }

    /// The one place a synced flow enters this node's flow table.
    pub fn insert(&mut self, key: FlowKey, backend_id: u32) -> Result<(), MapWriteError> {
        let v = FlowValue { backend_id, _pad: 0, created_ns: monotonic_ns() };
        self.flows.insert(key, v, 0).map_err(|e| MapWriteError { map: lb_common::map_names::FLOWS, detail: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_records_parse() {
        assert!(parse_event(&[0u8; 47]).is_none());
        assert_eq!(parse_event(&[0u8; 48]), Some(FlowEvent::default()));
    }
}
