//! The kernel task: follows the next hop of every tracked backend. Routes come from
//! `RTM_GETROUTE` (asked again after any route event), MACs from neighbour events; a
//! next hop without a usable entry is handed to the kernel to resolve (a managed
//! entry: the kernel keeps it fresh although XDP traffic never confirms it). Changes
//! go to the owner; link events are passed on.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::owner::Msg;
use crate::kernel::netlink::{KernelEvent, Netlink};
use crate::kernel::nexthop::NextHops;

/// Route lookups in flight at once.
const PARALLEL: usize = 32;
/// Route events are coalesced over this long before every route is asked again.
const ROUTE_SETTLE: Duration = Duration::from_millis(50);
/// A next hop still unresolved is handed to the kernel again after this long.
const RESOLVE_AGAIN: Duration = Duration::from_secs(5);

pub enum KernelCmd {
    Track(BTreeSet<IpAddr>),
}

async fn lookup(nl: &Netlink, hops: &mut NextHops, addrs: Vec<IpAddr>) {
    let results: Vec<_> = futures::stream::iter(addrs)
        .map(|a| {
            let nl = nl.clone();
            async move { (a, nl.route_get(a).await) }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for (a, r) in results {
        match r {
            Ok(r) => hops.set_route(a, r),
            Err(e) => warn!(backend = %a, error = %e, "route lookup"),
        }
    }
}

async fn read_neighbours(nl: &Netlink, hops: &mut NextHops) {
    match nl.neighbours().await {
        Ok(ns) => {
            hops.clear_neigh();
            for (i, a, m) in ns {
                hops.set_neigh(i, a, m);
            }
        }
        Err(e) => warn!(error = %e, "reading the neighbour table"),
    }
}

/// The first resolution, before the owner writes any table: neighbours, then the
/// route of every backend.
pub async fn initial(nl: &Netlink, addrs: &BTreeSet<IpAddr>) -> NextHops {
    let mut hops = NextHops::default();
    read_neighbours(nl, &mut hops).await;
    let need = hops.track(addrs);
    lookup(nl, &mut hops, need).await;
    hops
}

async fn resolve_missing(nl: &Netlink, hops: &NextHops, asked: &mut HashMap<(u32, IpAddr), Instant>) {
    let now = Instant::now();
    let missing = hops.missing();
    asked.retain(|k, _| missing.contains(k));
    for k in missing {
        if asked.get(&k).is_some_and(|t| now.duration_since(*t) < RESOLVE_AGAIN) {
            continue;
        }
        asked.insert(k, now);
        if let Err(e) = nl.resolve(k.0, k.1).await {
            debug!(next_hop = %k.1, ifindex = k.0, error = %e, "asking the kernel to resolve a next hop");
        }
    }
}

pub async fn run(
    nl: Netlink,
    mut hops: NextHops,
    mut cmds: mpsc::UnboundedReceiver<KernelCmd>,
    mut events: mpsc::Receiver<KernelEvent>,
    owner: mpsc::Sender<Msg>,
) {
    let mut asked = HashMap::new();
    let mut routes_dirty: Option<tokio::time::Instant> = None;
    let mut again = tokio::time::interval(Duration::from_secs(1));
    again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        resolve_missing(&nl, &hops, &mut asked).await;
        let changes = hops.changes();
        if !changes.is_empty() && owner.send(Msg::NextHops(changes)).await.is_err() {
            return;
        }
        let settle = async {
            match routes_dirty {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            c = cmds.recv() => match c {
                None => return,
                Some(KernelCmd::Track(addrs)) => {
                    let need = hops.track(&addrs);
                    lookup(&nl, &mut hops, need).await;
                }
            },
            ev = events.recv() => match ev {
                None => return,
                Some(KernelEvent::Neigh { ifindex, addr, mac }) => hops.set_neigh(ifindex, addr, mac),
                Some(KernelEvent::RouteChanged) => {
                    routes_dirty.get_or_insert(tokio::time::Instant::now() + ROUTE_SETTLE);
                }
                Some(KernelEvent::Link { index, name, present, up: _ }) => {
                    routes_dirty.get_or_insert(tokio::time::Instant::now() + ROUTE_SETTLE);
                    if owner.send(Msg::Link { index, name, present }).await.is_err() {
                        return;
                    }
                }
                Some(KernelEvent::Resync) => {
                    read_neighbours(&nl, &mut hops).await;
                    routes_dirty = Some(tokio::time::Instant::now());
                }
            },
            _ = settle => {
                routes_dirty = None;
                let all = hops.tracked();
                lookup(&nl, &mut hops, all).await;
            }
            _ = again.tick() => {}
        }
    }
}
