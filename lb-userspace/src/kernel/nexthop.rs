//! From backend address to next-hop MAC, as the kernel would forward: the backend's
//! route (`RTM_GETROUTE`: output interface, gateway or on-link), then the neighbour
//! entry of that next hop on that interface. Pure bookkeeping; the kernel task feeds
//! it routes and neighbour events and reports what changed to the owner.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::netlink::Route;
use crate::model::Mac;

/// What the datapath needs to reach one backend, and the source address the kernel
/// would use towards it (health checks bind to it: never a VIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub mac: Mac,
    pub source: Option<IpAddr>,
}

#[derive(Default, Debug)]
pub struct NextHops {
    /// Tracked backends and their route (None: asked, no route).
    routes: BTreeMap<IpAddr, Option<Route>>,
    /// Usable neighbour entries by (interface, address).
    neigh: HashMap<(u32, IpAddr), Mac>,
    /// What the owner was last told, per backend.
    reported: BTreeMap<IpAddr, NextHop>,
}

impl NextHops {
    /// Tracks exactly `addrs`. Returns the addresses that need a route lookup.
    pub fn track(&mut self, addrs: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
        self.routes.retain(|a, _| addrs.contains(a));
        self.reported.retain(|a, _| addrs.contains(a));
        addrs.iter().filter(|a| !self.routes.contains_key(a)).copied().collect()
    }

    pub fn tracked(&self) -> Vec<IpAddr> {
        self.routes.keys().copied().collect()
    }

    pub fn set_route(&mut self, addr: IpAddr, r: Option<Route>) {
        if let Some(slot) = self.routes.get_mut(&addr) {
            *slot = r;
        } else {
            self.routes.insert(addr, r);
        }
    }

    /// A neighbour entry: usable MAC, or None (gone, failed, incomplete).
    pub fn set_neigh(&mut self, ifindex: u32, addr: IpAddr, mac: Option<Mac>) {
        match mac {
            Some(m) => {
                self.neigh.insert((ifindex, addr), m);
            }
            None => {
                self.neigh.remove(&(ifindex, addr));
            }
        }
    }

    /// Forgets every neighbour (before a full re-read).
    pub fn clear_neigh(&mut self) {
        self.neigh.clear();
    }

    /// Next hops with a route but no usable neighbour entry: to ask the kernel about.
    pub fn missing(&self) -> Vec<(u32, IpAddr)> {
        let mut v: Vec<(u32, IpAddr)> =
            self.routes.iter().filter_map(|(a, r)| r.map(|r| (r.oif, r.next_hop(*a)))).filter(|k| !self.neigh.contains_key(k)).collect();
        v.sort();
        v.dedup();
        v
    }

    fn current(&self, addr: IpAddr) -> Option<NextHop> {
        let r = (*self.routes.get(&addr)?)?;
        let mac = *self.neigh.get(&(r.oif, r.next_hop(addr)))?;
        Some(NextHop { mac, source: r.prefsrc })
    }

    /// What changed since the last call: (backend, next hop or None = unreachable).
    pub fn changes(&mut self) -> Vec<(IpAddr, Option<NextHop>)> {
        let mut out = Vec::new();
        for a in self.routes.keys() {
            let now = self.current(*a);
            if now != self.reported.get(a).copied() {
                out.push((*a, now));
            }
        }
        for (a, n) in &out {
            match n {
                Some(n) => {
                    self.reported.insert(*a, *n);
                }
                None => {
                    self.reported.remove(a);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn on_link_and_gateway_backends_follow_their_next_hop() {
        let mut h = NextHops::default();
        let (b1, b2, gw) = (ip("10.0.1.11"), ip("10.9.0.1"), ip("10.0.1.254"));
        let src = Some(ip("10.0.1.5"));
        let need = h.track(&BTreeSet::from([b1, b2]));
        assert_eq!(need, vec![b1, b2]);
        h.set_route(b1, Some(Route { oif: 2, gateway: None, prefsrc: src }));
        h.set_route(b2, Some(Route { oif: 2, gateway: Some(gw), prefsrc: src }));
        assert_eq!(h.missing(), vec![(2, b1), (2, gw)], "both next hops to resolve");
        assert!(h.changes().is_empty(), "nothing reachable yet");
        let m1: Mac = "02:00:00:00:01:11".parse().unwrap();
        let mg: Mac = "02:00:00:00:01:fe".parse().unwrap();
        h.set_neigh(2, b1, Some(m1));
        h.set_neigh(3, gw, Some(mg)); // other interface: not the route's
        assert_eq!(h.changes(), vec![(b1, Some(NextHop { mac: m1, source: src }))]);
        h.set_neigh(2, gw, Some(mg));
        assert_eq!(h.changes(), vec![(b2, Some(NextHop { mac: mg, source: src }))]);
        assert!(h.changes().is_empty(), "reported once");
        // The gateway fails: the routed backend becomes unreachable, the other stays.
        h.set_neigh(2, gw, None);
        assert_eq!(h.changes(), vec![(b2, None)]);
        assert_eq!(h.missing(), vec![(2, gw)]);
        // Its route goes away entirely.
        h.set_route(b1, None);
        assert_eq!(h.changes(), vec![(b1, None)]);
        // Untracked backends are forgotten; a tracked-again one is looked up again.
        assert!(h.track(&BTreeSet::from([b2])).is_empty());
        assert_eq!(h.tracked(), vec![b2]);
        assert_eq!(h.track(&BTreeSet::from([b1, b2])), vec![b1]);
    }
}
