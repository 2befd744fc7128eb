//! Active-active behind ECMP: each node announces its VIPs over BGP while it is fit to
//! serve them. lbd does not speak BGP: BIRD 2 does, as its own service on the node.
//!
//! How lbd drives BIRD (ARCHITECTURE.md "BGP (active-active)"): lbd owns one file of
//! BIRD statements (`bird_config`, included by BIRD's main config). It holds the router
//! id, a BFD protocol, one BGP protocol per neighbour and a `protocol static` per
//! address family with exactly the VIP routes to announce now. On every change lbd
//! rewrites the file (atomically) and sends `configure` on BIRD's control socket.
//! BIRD diffs the new config against the running one: the BGP sessions and BFD are
//! unchanged and stay up, only the static protocol's routes change, and BGP sends
//! the updates and withdrawals. Chosen over enabling/disabling a per-VIP protocol
//! because VIPs come and go at run time (`lbctl service add`): with per-VIP protocols
//! the set of protocols would still have to be written and reloaded, and the file
//! would not say what should be announced. The file is the single truth: a BIRD that
//! restarts reads the current set, and a BIRD unreachable when lbd changes it picks it
//! up at start.
//!
//! Pieces: `BgpConfig` (`[bgp]`), `render` (the file), `birdc` (the control-socket
//! protocol), `task` (the tokio task that applies the wanted routes and retries).

pub mod birdc;
pub mod task;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

fn default_true() -> bool {
    true
}
fn default_bfd_interval_ms() -> u32 {
    100
}
fn default_bfd_multiplier() -> u32 {
    3
}
fn default_hold_time() -> u32 {
    90
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/bird/bird.ctl")
}
fn default_drain_ms() -> u32 {
    2000
}

/// One BGP neighbour (`[[bgp.neighbor]]`), usually the top-of-rack router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub address: IpAddr,
    #[serde(rename = "as")]
    pub asn: u32,
    /// TCP MD5 password of the session (RFC 2385).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `[bgp]` in lbd's config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    #[serde(rename = "neighbor")]
    pub neighbors: Vec<Neighbor>,
    /// BFD on every session: a dead node's routes go within interval × multiplier.
    #[serde(default = "default_true")]
    pub bfd: bool,
    #[serde(default = "default_bfd_interval_ms")]
    pub bfd_interval_ms: u32,
    #[serde(default = "default_bfd_multiplier")]
    pub bfd_multiplier: u32,
    /// BGP hold time in seconds (what withdraws a dead node's routes without BFD).
    #[serde(default = "default_hold_time")]
    pub hold_time_s: u32,
    /// BIRD's control socket.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// The file of BIRD statements lbd writes; BIRD's config includes it. Default
    /// `/run/lb/<instance>.bird.conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bird_config: Option<PathBuf>,
    /// After withdrawing (stop, detach, `lbctl node drain`), how long lbd waits for
    /// the routers to move traffic away before it stops or detaches.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("bgp.{key}: {msg}")]
pub struct BgpConfigError {
    pub key: &'static str,
    pub msg: String,
}

fn invalid(key: &'static str, msg: impl Into<String>) -> BgpConfigError {
    BgpConfigError {
        key,
        msg: msg.into(),
    }
}

/// AS numbers reserved by RFC 7607 (0), RFC 6793 (AS_TRANS) and RFC 7300 (last).
fn reserved_as(a: u32) -> Option<&'static str> {
    match a {
        0 => Some("AS 0 is reserved"),
        23456 => Some("AS 23456 is AS_TRANS"),
        65535 | 4_294_967_295 => Some("reserved (last AS of a range)"),
        _ => None,
    }
}

/// Characters that may not appear in a password: it is written between quotes into
/// BIRD's config.
fn bad_password(p: &str) -> Option<String> {
    if p.is_empty() || p.len() > 80 {
        return Some(format!(
            "{} characters: 1..=80 (TCP MD5 keys are at most 80 bytes)",
            p.len()
        ));
    }
    if p.chars()
        .any(|c| c == '"' || c == '\\' || c.is_control() || !c.is_ascii())
    {
        return Some("printable ASCII without '\"' or '\\' only".into());
    }
    None
}

impl BgpConfig {
    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<BgpConfigError> {
        let mut e = Vec::new();
        if let Some(why) = reserved_as(self.local_as) {
            e.push(invalid("local_as", format!("{}: {why}", self.local_as)));
        }
        if self.router_id.is_unspecified()
            || self.router_id.is_broadcast()
            || self.router_id.is_multicast()
        {
            e.push(invalid(
                "router_id",
                format!("{} is not a usable router id", self.router_id),
            ));
        }
        if self.neighbors.is_empty() {
            e.push(invalid(
                "neighbor",
                "at least one [[bgp.neighbor]] is required",
            ));
        }
        let mut seen = BTreeSet::new();
        for n in &self.neighbors {
            let a = n.address;
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                e.push(invalid(
                    "neighbor",
                    format!("address {a} is not a unicast neighbour address"),
                ));
            }
            if !seen.insert(a) {
                e.push(invalid("neighbor", format!("address {a} listed twice")));
            }
            if let Some(why) = reserved_as(n.asn) {
                e.push(invalid("neighbor", format!("{a}: as {}: {why}", n.asn)));
            }
            if let Some(why) = n.password.as_deref().and_then(bad_password) {
                e.push(invalid("neighbor", format!("{a}: password: {why}")));
            }
        }
        if !(10..=10_000).contains(&self.bfd_interval_ms) {
            e.push(invalid(
                "bfd_interval_ms",
                format!("{} is outside 10..=10000", self.bfd_interval_ms),
            ));
        }
        if !(2..=255).contains(&self.bfd_multiplier) {
            e.push(invalid(
                "bfd_multiplier",
                format!("{} is outside 2..=255", self.bfd_multiplier),
            ));
        }
        // RFC 4271: 0 (no keepalives) or at least 3 s.
        if self.hold_time_s != 0 && !(3..=65535).contains(&self.hold_time_s) {
            e.push(invalid(
                "hold_time_s",
                format!("{}: 0 or 3..=65535", self.hold_time_s),
            ));
        }
        if self.drain_ms > 600_000 {
            e.push(invalid(
                "drain_ms",
                format!("{} is above 600000 (10 minutes)", self.drain_ms),
            ));
        }
        if !self.control_socket.is_absolute() {
            e.push(invalid(
                "control_socket",
                format!(
                    "{}: must be an absolute path",
                    self.control_socket.display()
                ),
            ));
        }
        if let Some(p) = &self.bird_config
            && (!p.is_absolute() || p.to_str().is_none_or(|s| s.contains('"')))
        {
            e.push(invalid(
                "bird_config",
                format!("{}: must be an absolute path without '\"'", p.display()),
            ));
        }
        e
    }

    /// Where lbd writes BIRD's statements.
    pub fn bird_config_path(&self, instance: &str) -> PathBuf {
        self.bird_config
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{instance}.bird.conf")))
    }
}

/// Names of the protocols lbd writes (an export filter may use them).
pub const STATIC_V4: &str = "lb_vips4";
pub const STATIC_V6: &str = "lb_vips6";

/// The BIRD statements lbd owns: router id, BFD, one BGP session per neighbour (each
/// exporting only lbd's static VIP routes of its address family, importing nothing)
/// and the static VIP routes (`routes`: announced now, /32 or /128 each).
pub fn render(c: &BgpConfig, instance: &str, routes: &BTreeSet<IpAddr>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Written by lbd (instance {instance}); rewritten on every change, do not edit."
    );
    let _ = writeln!(o, "# Include it from bird.conf: include \"<this file>\";");
    let _ = writeln!(o, "router id {};\n", c.router_id);
    let _ = writeln!(o, "protocol device lb_device {{\n}}\n");
    if c.bfd {
        let _ = writeln!(
            o,
            "protocol bfd lb_bfd {{\n  interface \"*\" {{\n    min rx interval {ms} ms;\n    min tx interval {ms} ms;\n    idle tx interval 1000 ms;\n    multiplier {m};\n  }};\n}}\n",
            ms = c.bfd_interval_ms,
            m = c.bfd_multiplier
        );
    }
    for (name, v6) in [(STATIC_V4, false), (STATIC_V6, true)] {
        let _ = writeln!(
            o,
            "protocol static {name} {{\n  {};",
            if v6 { "ipv6" } else { "ipv4" }
        );
        for r in routes.iter().filter(|r| r.is_ipv6() == v6) {
            let _ = writeln!(o, "  route {r}/{} blackhole;", if v6 { 128 } else { 32 });
        }
        let _ = writeln!(o, "}}\n");
    }
    for (i, n) in c.neighbors.iter().enumerate() {
        let v6 = n.address.is_ipv6();
        let _ = writeln!(o, "protocol bgp lb_peer{} {{", i + 1);
        let _ = writeln!(
            o,
            "  local as {};\n  neighbor {} as {};",
            c.local_as, n.address, n.asn
        );
        let _ = writeln!(o, "  hold time {};", c.hold_time_s);
        if c.hold_time_s != 0 {
            let _ = writeln!(o, "  keepalive time {};", (c.hold_time_s / 3).max(1));
        }
        // BIRD waits 5 s after start before its first connect by default: a node that
        // starts or returns would take that long to get its share again.
        let _ = writeln!(o, "  connect delay time 1;\n  connect retry time 1;\n  error wait time 1, 10;");
        if c.bfd {
            let _ = writeln!(o, "  bfd on;");
        }
        if let Some(p) = &n.password {
            let _ = writeln!(o, "  password \"{p}\";");
        }
        let (fam, proto) = if v6 {
            ("ipv6", STATIC_V6)
        } else {
            ("ipv4", STATIC_V4)
        };
        let _ = writeln!(
            o,
            "  {fam} {{\n    import none;\n    export where proto = \"{proto}\";\n  }};\n}}\n"
        );
    }
    o
}

/// Writes `text` to `path` atomically (a temporary file renamed over it), so BIRD
/// never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
local_as = 65001
router_id = "10.0.0.1"
bfd_interval_ms = 100
control_socket = "/run/bird/bird.ctl"
drain_ms = 1500

[[neighbor]]
address = "10.0.0.254"
as = 65000
password = "s3cret"
"#;

    #[test]
    fn parses_with_defaults() {
        let c: BgpConfig = toml::from_str(GOOD).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(
            (c.bfd, c.bfd_multiplier, c.hold_time_s, c.drain_ms),
            (true, 3, 90, 1500)
        );
        assert_eq!(c.neighbors[0].asn, 65000);
        assert_eq!(
            c.bird_config_path("lb0"),
            PathBuf::from("/run/lb/lb0.bird.conf")
        );
        let e = toml::from_str::<BgpConfig>(&format!("{GOOD}\nasn = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("asn"), "{e}");
    }

    #[test]
    fn every_invalid_value_names_its_key() {
        let cases = [
            ("local_as = 65001", "local_as = 0", "bgp.local_as: 0"),
            ("local_as = 65001", "local_as = 23456", "AS_TRANS"),
            (
                "router_id = \"10.0.0.1\"",
                "router_id = \"0.0.0.0\"",
                "bgp.router_id",
            ),
            (
                "bfd_interval_ms = 100",
                "bfd_interval_ms = 5",
                "bgp.bfd_interval_ms",
            ),
            (
                "bfd_interval_ms = 100",
                "bfd_interval_ms = 100\nbfd_multiplier = 1",
                "bgp.bfd_multiplier",
            ),
            (
                "bfd_interval_ms = 100",
                "bfd_interval_ms = 100\nhold_time_s = 2",
                "bgp.hold_time_s",
            ),
            ("drain_ms = 1500", "drain_ms = 700000", "bgp.drain_ms"),
            (
                "\"/run/bird/bird.ctl\"",
                "\"bird.ctl\"",
                "bgp.control_socket",
            ),
            ("10.0.0.254", "224.0.0.5", "bgp.neighbor: address 224.0.0.5"),
            ("as = 65000", "as = 0", "bgp.neighbor: 10.0.0.254: as 0"),
            ("s3cret", "a\\\"b", "password: printable"),
            ("s3cret", "", "password: 0 characters"),
        ];
        for (from, to, want) in cases {
            let c: BgpConfig =
                toml::from_str(&GOOD.replace(from, to)).unwrap_or_else(|e| panic!("{to}: {e}"));
            let errs: Vec<String> = c.validate().iter().map(|e| e.to_string()).collect();
            assert!(errs.iter().any(|e| e.contains(want)), "{to}: {errs:?}");
        }
        let twice = format!("{GOOD}\n[[neighbor]]\naddress = \"10.0.0.254\"\nas = 65002\n");
        let c: BgpConfig = toml::from_str(&twice).unwrap();
        assert!(
            c.validate()
                .iter()
                .any(|e| e.to_string().contains("listed twice"))
        );
        let none = GOOD.split("[[neighbor]]").next().unwrap().to_string() + "neighbor = []\n";
        let c: BgpConfig = toml::from_str(&none).unwrap();
        assert!(
            c.validate()
                .iter()
                .any(|e| e.to_string().contains("at least one"))
        );
    }

    #[test]
    fn render_writes_sessions_bfd_and_exactly_the_wanted_routes() {
        let mut c: BgpConfig = toml::from_str(GOOD).unwrap();
        c.neighbors.push(Neighbor {
            address: "fd00::fe".parse().unwrap(),
            asn: 65000,
            password: None,
        });
        let routes: BTreeSet<IpAddr> = ["10.201.0.1", "10.201.0.2", "fd00:201::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let t = render(&c, "lb0", &routes);
        for want in [
            "router id 10.0.0.1;",
            "multiplier 3;",
            "min rx interval 100 ms;",
            "route 10.201.0.1/32 blackhole;",
            "route 10.201.0.2/32 blackhole;",
            "route fd00:201::1/128 blackhole;",
            "neighbor 10.0.0.254 as 65000;",
            "password \"s3cret\";",
            "bfd on;",
            "export where proto = \"lb_vips4\";",
            "neighbor fd00::fe as 65000;",
            "export where proto = \"lb_vips6\";",
            "hold time 90;",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
        // Withdrawn: the static protocols stay (BIRD keeps the sessions), empty.
        let t = render(&c, "lb0", &BTreeSet::new());
        assert!(!t.contains("route "), "{t}");
        assert!(t.contains("protocol static lb_vips4") && t.contains("protocol static lb_vips6"));
        c.bfd = false;
        assert!(!render(&c, "lb0", &routes).contains("bfd"));
    }
}
