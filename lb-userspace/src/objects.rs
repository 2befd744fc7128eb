//! The eBPF objects, built by build.rs (aya-build) and embedded so lbd is one binary.

/// The balancer (`lb_xdp`) and every map of the contract in lb-common.
pub static BALANCER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The decapsulator for backends (`lb_decap`).
pub static DECAP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Benchmark-only programs: the frame-restoring harness, a no-op and the trivial baseline.
pub static BENCH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));
