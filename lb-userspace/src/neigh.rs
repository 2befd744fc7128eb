//! Next-hop MACs for backends configured without `mac`: the kernel's own routing and
//! neighbour tables decide, as they would for a packet lbd sent itself. A backend on
//! a connected route resolves to its own MAC; a routed one to its gateway's.
//!
//! Read with `ip -j` (iproute2, installed by setup): one route dump per family and one
//! neighbour dump per round, whatever the number of backends. Main routing table only.
//! A next hop without a neighbour entry is nudged with an empty UDP datagram to the
//! backend's discard port (9), which makes the kernel resolve it.

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::process::Command;

use serde::Deserialize;

use crate::model::Mac;

#[derive(Debug, Deserialize)]
struct Route {
    dst: String,
    gateway: Option<IpAddr>,
    #[serde(default)]
    r#type: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Neigh {
    dst: IpAddr,
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// (prefix, length, gateway)
type Prefix = (IpAddr, u8, Option<IpAddr>);

fn parse_routes(json: &str) -> Result<Vec<Prefix>, String> {
    let routes: Vec<Route> = serde_json::from_str(json).map_err(|e| format!("parsing `ip -j route`: {e}"))?;
    let mut out = Vec::new();
    for r in routes {
        if r.r#type.as_deref().is_some_and(|t| t != "unicast") {
            continue;
        }
        let (addr, len) = match r.dst.as_str() {
            "default" => (None, 0),
            d => match d.split_once('/') {
                Some((a, l)) => (a.parse().ok(), l.parse().unwrap_or(255)),
                None => (d.parse().ok(), 255),
            },
        };
        match addr {
            Some(a) => {
                let full = if matches!(a, IpAddr::V4(_)) { 32 } else { 128 };
                out.push((a, if len == 255 { full } else { len }, r.gateway));
            }
            None if len == 0 => {
                // "default": family from the gateway (a default route without one is a device route).
                if let Some(g) = r.gateway {
                    let any = if g.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) };
                    out.push((any, 0, Some(g)));
                }
            }
            None => {}
        }
    }
    Ok(out)
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => (u32::from(v) as u128) << 96,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn in_prefix(a: IpAddr, p: IpAddr, len: u8) -> bool {
    if a.is_ipv4() != p.is_ipv4() {
        return false;
    }
    let width = if a.is_ipv4() { 32 } else { 128 };
    let len = len.min(width) as u32;
    if len == 0 {
        return true;
    }
    let shift = 128 - len;
    (bits(a) >> shift) == (bits(p) >> shift)
}

/// The next hop for `addr` by longest prefix match: its gateway, or itself when on-link.
/// None: no route.
pub fn next_hop(routes: &[Prefix], addr: IpAddr) -> Option<IpAddr> {
    routes.iter().filter(|(p, l, _)| in_prefix(addr, *p, *l)).max_by_key(|(_, l, _)| *l).map(|(_, _, g)| g.unwrap_or(addr))
}

fn parse_neighbours(json: &str) -> Result<BTreeMap<IpAddr, Mac>, String> {
    let ns: Vec<Neigh> = serde_json::from_str(json).map_err(|e| format!("parsing `ip -j neigh`: {e}"))?;
    Ok(ns
        .into_iter()
        .filter(|n| !n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE"))
        .filter_map(|n| Some((n.dst, n.lladdr?.parse().ok()?)))
        .collect())
}

fn ip_json(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").arg("-j").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip -j {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(if s.is_empty() { "[]".into() } else { s })
}

/// One resolution round for `addrs`: the MACs found; addresses without a neighbour
/// entry for which `nudge` says yes get a datagram that makes the kernel resolve them.
pub fn resolve(addrs: &[IpAddr], nudge: impl Fn(IpAddr) -> bool) -> Result<BTreeMap<IpAddr, Mac>, String> {
    if addrs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut routes = parse_routes(&ip_json(&["-4", "route", "show", "table", "main"])?)?;
    routes.extend(parse_routes(&ip_json(&["-6", "route", "show", "table", "main"])?)?);
    let neigh = parse_neighbours(&ip_json(&["neigh", "show"])?)?;
    let mut out = BTreeMap::new();
    for a in addrs {
        let Some(hop) = next_hop(&routes, *a) else { continue };
        match neigh.get(&hop) {
            Some(m) => {
                out.insert(*a, *m);
            }
            None if nudge(*a) => {
                let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                if let Ok(s) = UdpSocket::bind(bind) {
                    let _ = s.send_to(&[], (*a, 9));
                }
            }
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_picks_gateway_or_on_link() {
        let routes = parse_routes(
            r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0"},
                {"dst":"10.0.1.0/24","dev":"eth1","scope":"link"},
                {"dst":"10.0.0.0/8","gateway":"10.0.1.254","dev":"eth1"},
                {"dst":"10.9.9.9","dev":"eth1"},
                {"dst":"10.7.0.0/16","type":"blackhole"}]"#,
        )
        .unwrap();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(next_hop(&routes, ip("10.0.1.11")), Some(ip("10.0.1.11")), "on-link");
        assert_eq!(next_hop(&routes, ip("10.3.0.1")), Some(ip("10.0.1.254")), "via the /8 gateway");
        assert_eq!(next_hop(&routes, ip("10.9.9.9")), Some(ip("10.9.9.9")), "host route");
        assert_eq!(next_hop(&routes, ip("198.51.100.1")), Some(ip("192.0.2.1")), "default");
        assert_eq!(next_hop(&routes, ip("10.7.0.1")), Some(ip("10.0.1.254")), "blackhole ignored");
        assert_eq!(next_hop(&routes, ip("2001:db8::1")), None, "no v6 route");
        let v6 = parse_routes(r#"[{"dst":"fd00:1::/64","dev":"eth1"},{"dst":"default","gateway":"fe80::1","dev":"eth0"}]"#).unwrap();
        assert_eq!(next_hop(&v6, ip("fd00:1::5")), Some(ip("fd00:1::5")));
        assert_eq!(next_hop(&v6, ip("2001:db8::1")), Some(ip("fe80::1")));
    }

    #[test]
    fn neighbours_skip_failed_and_incomplete() {
        let n = parse_neighbours(
            r#"[{"dst":"10.0.1.11","dev":"eth1","lladdr":"02:00:00:00:01:11","state":["REACHABLE"]},
                {"dst":"10.0.1.12","dev":"eth1","lladdr":"02:00:00:00:01:12","state":["STALE"]},
                {"dst":"10.0.1.13","dev":"eth1","state":["FAILED"]},
                {"dst":"10.0.1.14","dev":"eth1","state":["INCOMPLETE"]}]"#,
        )
        .unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[&"10.0.1.12".parse::<IpAddr>().unwrap()].to_string(), "02:00:00:00:01:12");
    }
}
