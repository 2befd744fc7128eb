//! The control plane of the balancer as a library: the embedded eBPF objects, the map
//! writer (kernel maps or an in-memory fake for tests without root), the service and
//! backend model that builds Maglev tables and commits them atomically, statistics,
//! and the decap program's attach/detach for backends.

pub mod announce;
pub mod api;
pub mod bgp;
pub mod cluster;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod decap;
pub mod flowsync;
pub mod health;
pub mod hooks;
pub mod kernel;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod objects;
pub mod persist;
pub mod pins;
pub mod stats;
pub mod systemd;

pub use control::{BackendSpec, ControlError, ControlPlane, Mode, ServiceSpec, Vip};
pub use maps::{AyaMaps, MapWriter, MemMaps};
