//! The kernel's network state, over rtnetlink: routes (`RTM_GETROUTE` per backend),
//! neighbours (events, and asking the kernel to resolve a missing one), VIP
//! addresses (deprecated, so never a source address) and links. No `ip` process.
//!
//! `netlink` is the I/O (rtnetlink requests and the event stream); `nexthop` is the
//! pure bookkeeping from backend address to next-hop MAC, unit-tested without root.

pub mod netlink;
pub mod nexthop;
