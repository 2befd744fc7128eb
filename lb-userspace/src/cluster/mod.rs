//! The cluster plane between two lbd nodes, as pure logic: the authenticated wire
//! format (`wire`), the election (`election`), config replication order
//! (`config_sync`), the flow-sync queue and id mapping (`flow_sync`), and the
//! `[cluster]` config section. Sockets, timers and VIP announcement live in the daemon.

pub mod config_sync;
pub mod election;
pub mod flow_sync;
pub mod wire;
