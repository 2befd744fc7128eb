//! The control plane of the balancer as a library: the embedded eBPF objects, the map
//! writer (kernel maps or an in-memory fake for tests without root), the service and
//! backend model that builds Maglev tables and commits them atomically, statistics,
//! and the decap program's attach/detach for backends.

pub mod control;
pub mod decap;
pub mod maps;
pub mod objects;
pub mod stats;

pub use control::{BackendSpec, ControlError, ControlPlane, Mode, ServiceSpec, Vip};
pub use maps::{AyaMaps, MapWriter, MemMaps};
