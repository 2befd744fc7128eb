//! rtnetlink I/O: requests through one connection, events through another bound to
//! the link, neighbour and route multicast groups. Every request is bounded in time.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt as _;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, CacheInfo};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::AsyncSocket as _;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;
use tracing::warn;

use crate::model::Mac;

/// One netlink request, at most (the kernel answers in microseconds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: {0}")]
    Request(String),
    #[error("netlink: no answer within {0:?}")]
    Timeout(Duration),
    #[error("netlink: kernel error {code} ({what})")]
    Kernel { code: i32, what: String },
}

/// The kernel's route to one destination: output interface, gateway (None: on-link),
/// the source address it would pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub oif: u32,
    pub gateway: Option<IpAddr>,
    pub prefsrc: Option<IpAddr>,
}

impl Route {
    /// The address whose neighbour entry carries the next-hop MAC.
    pub fn next_hop(&self, dst: IpAddr) -> IpAddr {
        self.gateway.unwrap_or(dst)
    }
}

/// What the event stream reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// A neighbour entry: its MAC when usable, None when gone, failed or incomplete.
    Neigh { ifindex: u32, addr: IpAddr, mac: Option<Mac> },
    /// Some route changed: routes must be asked again.
    RouteChanged,
    /// A link appeared or changed (`up`: administratively up), or went away.
    Link { index: u32, name: String, present: bool, up: bool },
    /// The event socket overflowed (ENOBUFS): state must be read again.
    Resync,
}

/// Requests to the kernel. Cheap to clone.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

fn ip_of_route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn route_addr(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(v) => RouteAddress::Inet(v),
        IpAddr::V6(v) => RouteAddress::Inet6(v),
    }
}

fn neigh_addr(a: IpAddr) -> NeighbourAddress {
    match a {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }
}

/// Parses a route message into (oif, gateway, prefsrc). Multipath: the first hop
/// (a RTM_GETROUTE answer names the hop the kernel picked for this destination).
pub fn parse_route(m: &RouteMessage) -> Option<Route> {
    // Only a unicast route leads somewhere XDP can send to (a local address, a
    // blackhole or an unreachable route has no next hop).
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let (mut oif, mut gateway, mut prefsrc) = (None, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = ip_of_route_addr(g),
            RouteAttribute::Via(RouteVia::Inet(v)) => gateway = Some(IpAddr::V4(*v)),
            RouteAttribute::Via(RouteVia::Inet6(v)) => gateway = Some(IpAddr::V6(*v)),
            RouteAttribute::PrefSource(s) => prefsrc = ip_of_route_addr(s),
            RouteAttribute::MultiPath(hops) if oif.is_none() => {
                if let Some(h) = hops.first() {
                    oif = Some(h.interface_index);
                    for ha in &h.attributes {
                        match ha {
                            RouteAttribute::Gateway(g) => gateway = ip_of_route_addr(g),
                            RouteAttribute::Via(RouteVia::Inet(v)) => gateway = Some(IpAddr::V4(*v)),
                            RouteAttribute::Via(RouteVia::Inet6(v)) => gateway = Some(IpAddr::V6(*v)),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(Route { oif: oif?, gateway, prefsrc })
}

/// A neighbour message as (ifindex, address, usable MAC).
pub fn parse_neigh(m: &NeighbourMessage) -> Option<(u32, IpAddr, Option<Mac>)> {
    let mut addr = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => addr = Some(IpAddr::V4(*v)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => addr = Some(IpAddr::V6(*v)),
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(l);
                mac = Some(Mac(m));
            }
            _ => {}
        }
    }
    let usable = matches!(
        m.header.state,
        NeighbourState::Reachable | NeighbourState::Stale | NeighbourState::Delay | NeighbourState::Probe | NeighbourState::Permanent | NeighbourState::Noarp
    );
    Some((m.header.ifindex, addr?, if usable { mac } else { None }))
}

fn parse_link(m: &LinkMessage) -> Option<(u32, String, bool)> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some((m.header.index, name, m.header.flags.contains(LinkFlags::Up)))
}

fn kernel_error(e: rtnetlink::Error, what: &str) -> NetlinkError {
    match e {
        rtnetlink::Error::NetlinkError(m) => NetlinkError::Kernel { code: -m.raw_code(), what: what.to_string() },
        other => NetlinkError::Request(format!("{what}: {other}")),
    }
}

impl Netlink {
    /// A request connection, driven by a task on the current runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError::Request(format!("opening a netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Sends one request and collects the answers (or the error). Bounded in time.
    async fn request(&self, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        let mut h = self.handle.clone();
        let mut stream = h.request(req).map_err(|e| NetlinkError::Request(format!("{what}: {e}")))?;
        let collect = async {
            let mut out = Vec::new();
            while let Some(m) = stream.next().await {
                match m.payload {
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(kernel_error(rtnetlink::Error::NetlinkError(e), what));
                    }
                    _ => {}
                }
            }
            Ok(out)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, collect).await.map_err(|_| NetlinkError::Timeout(REQUEST_TIMEOUT))?
    }

    /// The kernel's own route decision for `dst` (`ip route get`). None: unreachable.
    pub async fn route_get(&self, dst: IpAddr) -> Result<Option<Route>, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst);
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes.push(RouteAttribute::Destination(route_addr(dst)));
        match self.request(RouteNetlinkMessage::GetRoute(m), 0, "route get").await {
            Ok(v) => Ok(v.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })),
            // No route, or an unreachable/prohibit route: no next hop.
            Err(NetlinkError::Kernel { code, .. }) if [libc::ENETUNREACH, libc::EHOSTUNREACH, libc::EACCES, libc::EINVAL, libc::ESRCH].contains(&code) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every neighbour entry with a usable MAC, by (ifindex, address).
    pub async fn neighbours(&self) -> Result<Vec<(u32, IpAddr, Option<Mac>)>, NetlinkError> {
        let v = self.request(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), NLM_F_DUMP, "neighbour dump").await?;
        Ok(v.iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neigh(n),
                _ => None,
            })
            .collect())
    }

    /// Asks the kernel to resolve `addr` on `ifindex` (ARP/ND) and to keep it resolved:
    /// a managed entry (`ip neigh replace ... use managed`), refreshed by the kernel and
    /// exempt from garbage collection, since XDP traffic never confirms it. The result
    /// arrives as a neighbour event. A kernel without managed entries gets a plain "use".
    pub async fn resolve(&self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let build = |managed: bool| {
            let mut m = NeighbourMessage::default();
            m.header.family = family(addr);
            m.header.ifindex = ifindex;
            m.header.state = NeighbourState::None;
            m.header.flags = NeighbourFlags::Use;
            m.attributes.push(NeighbourAttribute::Destination(neigh_addr(addr)));
            if managed {
                m.attributes.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            }
            RouteNetlinkMessage::NewNeighbour(m)
        };
        match self.request(build(true), NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK, "neighbour resolve").await {
            Ok(_) => Ok(()),
            Err(NetlinkError::Kernel { code, .. }) if code == libc::EINVAL || code == libc::EOPNOTSUPP => {
                self.request(build(false), NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK, "neighbour resolve").await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// Every link: (index, name, up).
    pub async fn links(&self) -> Result<Vec<(u32, String, bool)>, NetlinkError> {
        let v = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP, "link dump").await?;
        Ok(v.iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => parse_link(l),
                _ => None,
            })
            .collect())
    }

    /// The index of the link called `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.links().await?.into_iter().find(|(_, n, _)| n == name).map(|(i, _, _)| i))
    }

    /// Puts `vip` on link `ifindex` as a /32 or /128, deprecated (preferred_lft 0) so
    /// the kernel never picks it as a source address, without DAD (IPv6) so it is
    /// usable at once; or removes it (absent already is success).
    pub async fn set_vip(&self, ifindex: u32, vip: IpAddr, hold: bool) -> Result<(), NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = family(vip);
        m.header.prefix_len = if vip.is_ipv4() { 32 } else { 128 };
        m.header.index = ifindex;
        m.attributes.push(AddressAttribute::Local(vip));
        m.attributes.push(AddressAttribute::Address(vip));
        if hold {
            let mut ci = CacheInfo::default();
            ci.ifa_preferred = 0;
            ci.ifa_valid = u32::MAX; // forever
            m.attributes.push(AddressAttribute::CacheInfo(ci));
            if vip.is_ipv6() {
                m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            self.request(RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK, "address add").await.map(|_| ())
        } else {
            match self.request(RouteNetlinkMessage::DelAddress(m), NLM_F_ACK, "address del").await {
                Ok(_) => Ok(()),
                Err(NetlinkError::Kernel { code, .. }) if code == libc::EADDRNOTAVAIL || code == libc::ENOENT || code == libc::ENODEV => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

/// Opens the event socket (links, neighbours, IPv4/IPv6 routes) and forwards what it
/// reads to `tx` until `tx` closes. The socket is opened before this returns, so no
/// event after the caller's initial reads is missed.
pub fn events(tx: mpsc::Sender<KernelEvent>) -> Result<(), NetlinkError> {
    let groups = [MulticastGroup::Link, MulticastGroup::Neigh, MulticastGroup::Ipv4Route, MulticastGroup::Ipv6Route];
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&groups).map_err(|e| NetlinkError::Request(format!("subscribing to netlink events: {e}")))?;
    // A large buffer: a flood of neighbour events must not overflow it (ENOBUFS would
    // still be survived with a resync).
    let _ = conn.socket_mut().socket_mut().set_rx_buf_sz(4 << 20);
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((m, _)) = messages.next().await {
            let ev = match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                    parse_neigh(&n).map(|(ifindex, addr, mac)| KernelEvent::Neigh { ifindex, addr, mac })
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => {
                    parse_neigh(&n).map(|(ifindex, addr, _)| KernelEvent::Neigh { ifindex, addr, mac: None })
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_)) => Some(KernelEvent::RouteChanged),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    parse_link(&l).map(|(index, name, up)| KernelEvent::Link { index, name, present: true, up })
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    parse_link(&l).map(|(index, name, _)| KernelEvent::Link { index, name, present: false, up: false })
                }
                NetlinkPayload::Overrun(_) => Some(KernelEvent::Resync),
                _ => None,
            };
            if let Some(ev) = ev
                && tx.send(ev).await.is_err()
            {
                return;
            }
        }
        warn!("netlink event stream ended");
        let _ = tx.send(KernelEvent::Resync).await;
    });
    Ok(())
}
