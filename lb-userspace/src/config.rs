//! lbd's config file (TOML). Every key is documented in README.md ("Configuration").
//! Unknown keys are rejected with their name and line; `lbd --check` prints every
//! problem at once, each with the key (and line) it is about.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use lb_common::{SETTINGS_F_HAS_GATEWAY, Settings, addr_words};
use serde::{Deserialize, Serialize};

use crate::control::Mode;
use crate::model::{Mac, ServiceDef};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeCfg {
    Native,
    Generic,
    /// Native, else generic (logged).
    #[default]
    Auto,
}

fn default_mtu() -> u32 {
    1500
}

fn default_max_new_flows() -> u32 {
    lb_common::DEFAULT_MAX_NEW_FLOWS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    instance: String,
    interfaces: Vec<String>,
    #[serde(default)]
    xdp_mode: XdpModeCfg,
    encap_source_v4: Option<Ipv4Addr>,
    encap_source_v6: Option<Ipv6Addr>,
    gateway_mac: Option<Mac>,
    #[serde(default = "default_mtu")]
    mtu: u32,
    #[serde(default)]
    reply_rate: u32,
    #[serde(default = "default_max_new_flows")]
    max_new_flows_per_cpu: u32,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    #[serde(default, rename = "service")]
    services: Vec<toml::Spanned<ServiceDef>>,
    cluster: Option<toml::Spanned<crate::cluster::ClusterConfig>>,
}

/// A checked config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub instance: String,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeCfg,
    pub encap_source_v4: Option<Ipv4Addr>,
    pub encap_source_v6: Option<Ipv6Addr>,
    pub gateway_mac: Option<Mac>,
    pub mtu: u32,
    /// Replies the datapath builds itself (RST, port unreachable, echo, too big) per
    /// second per CPU; 0 = the datapath's default.
    pub reply_rate: u32,
    /// Flood mode: new flows per second per CPU recorded in the flow table; beyond it
    /// new flows are steered by Maglev alone, unrecorded. 0 = no limit.
    pub max_new_flows_per_cpu: u32,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub services: Vec<ServiceDef>,
    /// Two-node failover; none = a standalone balancer.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Every problem found, one line each, naming the key and line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

pub fn check_instance_name(s: &str) -> Result<(), String> {
    if (1..=32).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_') {
        Ok(())
    } else {
        Err(format!("instance {s:?}: use 1-32 characters from [a-z0-9_-]"))
    }
}

pub fn check_interface_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 15 || s.contains('/') || s.contains(char::is_whitespace) || s == "." || s == ".." {
        Err(format!("interfaces: bad interface name {s:?}"))
    } else {
        Ok(())
    }
}

impl Config {
    /// Parses and checks `src` (the file's text).
    pub fn parse(src: &str) -> Result<Config, ConfigErrors> {
        let raw: Raw = toml::from_str(src).map_err(|e| {
            let at = e.span().map(|s| format!("line {}: ", line_of(src, s.start))).unwrap_or_default();
            ConfigErrors(vec![format!("{at}{}", e.message())])
        })?;
        let mut errs = Vec::new();
        if let Err(e) = check_instance_name(&raw.instance) {
            errs.push(e);
        }
        if raw.interfaces.is_empty() {
            errs.push("interfaces: at least one interface is required".into());
        }
        let mut seen = BTreeSet::new();
        for i in &raw.interfaces {
            if let Err(e) = check_interface_name(i) {
                errs.push(e);
            }
            if !seen.insert(i) {
                errs.push(format!("interfaces: {i:?} listed twice"));
            }
        }
        if raw.reply_rate > 1_000_000 {
            errs.push(format!("reply_rate {}: at most 1000000 per second per CPU (0 = default)", raw.reply_rate));
        }
        if !(576..=9216).contains(&raw.mtu) {
            errs.push(format!("mtu {}: out of range 576..=9216", raw.mtu));
        }
        // Per service, with the line of its [[service]] table.
        let mut services = Vec::new();
        for s in &raw.services {
            let line = line_of(src, s.span().start);
            let d = s.get_ref();
            for e in crate::core::validate_set(std::slice::from_ref(d)) {
                errs.push(format!("line {line}: {e}"));
            }
            for b in &d.backends {
                let v4 = b.address.is_ipv4();
                if d.mode == Mode::Ipip && v4 && raw.encap_source_v4.is_none() {
                    errs.push(format!(
                        "line {line}: service {:?}: backend {} is IPv4 in ipip mode: set encap_source_v4",
                        d.name, b.address
                    ));
                }
                if d.mode == Mode::Ipip && !v4 && raw.encap_source_v6.is_none() {
                    errs.push(format!(
                        "line {line}: service {:?}: backend {} is IPv6 in ipip mode: set encap_source_v6",
                        d.name, b.address
                    ));
                }
            }
            services.push(d.clone());
        }
        if let Some(c) = &raw.cluster {
            let line = line_of(src, c.span().start);
            for e in c.get_ref().validate() {
                errs.push(format!("line {line}: {e}"));
            }
            // The key is checked here too, so `lbd --check` catches a readable secret.
            if let Err(e) = crate::cluster::load_secret(&c.get_ref().secret_file) {
                errs.push(format!("line {line}: {e}"));
            }
        }
        // Across services: names, VIPs, capacity (per-service problems reported above).
        for e in crate::core::validate_set(&services) {
            if !errs.iter().any(|x| x.ends_with(&e)) {
                errs.push(e);
            }
        }
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        let instance = raw.instance;
        Ok(Config {
            state_dir: raw.state_dir.unwrap_or_else(|| PathBuf::from(format!("/var/lib/lb/{instance}"))),
            socket: raw.socket.unwrap_or_else(|| crate::api::default_socket(&instance)),
            instance,
            interfaces: raw.interfaces,
            xdp_mode: raw.xdp_mode,
            encap_source_v4: raw.encap_source_v4,
            encap_source_v6: raw.encap_source_v6,
            gateway_mac: raw.gateway_mac,
            mtu: raw.mtu,
            reply_rate: raw.reply_rate,
            max_new_flows_per_cpu: raw.max_new_flows_per_cpu,
            services,
            cluster: raw.cluster.map(|c| c.into_inner()),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<(Config, String), ConfigErrors> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigErrors(vec![format!("reading {}: {e}", path.display())]))?;
        let c = Self::parse(&src)?;
        Ok((c, src))
    }

    /// The datapath's settings entry.
    pub fn settings(&self) -> Settings {
        let mut s = Settings {
            mtu: self.mtu,
            reply_rate: self.reply_rate,
            max_new_flows: self.max_new_flows_per_cpu,
            ..Settings::default()
        };
        if let Some(a) = self.encap_source_v4 {
            s.encap_src_v4 = u32::from_ne_bytes(a.octets());
        }
        if let Some(a) = self.encap_source_v6 {
            s.encap_src_v6 = addr_words(IpAddr::V6(a));
        }
        if let Some(m) = self.gateway_mac {
            s.gateway_mac = m.0;
            s.flags |= SETTINGS_F_HAS_GATEWAY;
        }
        s
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    /// A summary for `lbd --check`: the effective services and backends.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(o, "instance {} on {} (xdp_mode {}, mtu {})", self.instance, self.interfaces.join(", "), format!("{:?}", self.xdp_mode).to_lowercase(), self.mtu);
        let _ = writeln!(
            o,
            "encap source v4 {} v6 {}, gateway MAC {}",
            self.encap_source_v4.map_or("-".into(), |a| a.to_string()),
            self.encap_source_v6.map_or("-".into(), |a| a.to_string()),
            self.gateway_mac.map_or("-".into(), |m| m.to_string())
        );
        let _ = writeln!(o, "pins /sys/fs/bpf/{}/, socket {}, state {}", self.instance, self.socket.display(), self.state_file().display());
        if let Some(c) = &self.cluster {
            let _ = writeln!(
                o,
                "cluster node {} priority {} listen {} peer {} heartbeat {} ms, dead after {} heartbeats, preempt {}",
                c.node_id, c.priority, c.listen, c.peer, c.heartbeat_ms, c.dead_after, c.preempt
            );
        }
        for s in &self.services {
            let health = s.health.as_ref().map_or("none".to_string(), |h| {
                format!("{:?} every {} ms, timeout {} ms, rise {}, fall {}", h.kind, h.interval_ms, h.timeout_ms, h.rise, h.fall).to_lowercase()
            });
            let _ = writeln!(o, "service {} vip {} mode {} table {} health {} unhealthy-flows {}", s.name, s.vip, s.mode, s.table_size, health, s.unhealthy);
            for b in &s.backends {
                let mac = b.mac.map_or("neighbour table".into(), |m| m.to_string());
                let _ = writeln!(o, "  backend {} weight {} mac {}", b.address, b.weight, mac);
            }
        }
        o
    }
}

/// FNV-1a of the file's text: tells whether the file changed since the state was saved.
pub fn content_hash(src: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in src.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
instance = "lb0"
interfaces = ["eth0"]
xdp_mode = "auto"
encap_source_v4 = "10.0.0.5"
gateway_mac = "02:00:00:00:00:01"

[[service]]
name = "web"
vip = "10.0.0.100:80/tcp"
mode = "ipip"
table_size = 65537
health = { kind = "tcp", interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3 }

[[service.backend]]
address = "10.0.1.11"
weight = 100
mac = "02:00:00:00:01:11"

[[service.backend]]
address = "10.0.1.12"

[[service]]
name = "db"
vip = "10.0.0.102:3306/tcp"
mode = "dsr-l2"
unhealthy = "reset"
health = { kind = "http", path = "/healthz", port = 8080 }

[[service.backend]]
address = "10.0.3.11"
mac = "02:00:00:00:03:11"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.instance, "lb0");
        assert_eq!(c.socket, PathBuf::from("/run/lb/lb0.sock"));
        assert_eq!(c.state_file(), PathBuf::from("/var/lib/lb/lb0/state.json"));
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.services.len(), 2);
        let web = &c.services[0];
        assert_eq!(web.backends[1].weight, 1, "default weight");
        assert_eq!(web.backends[1].mac, None);
        let db = &c.services[1];
        assert_eq!(db.mode, Mode::DsrL2);
        assert_eq!(db.unhealthy, crate::model::FlowPolicy::Reset);
        assert_eq!(db.table_size, 65537, "default table size");
        let h = db.health.as_ref().unwrap();
        assert_eq!((h.interval_ms, h.rise, h.fall, h.port), (2000, 2, 3, Some(8080)), "health defaults");
        let s = c.settings();
        assert_eq!(s.flags & SETTINGS_F_HAS_GATEWAY, SETTINGS_F_HAS_GATEWAY);
        assert_eq!(s.max_new_flows, lb_common::DEFAULT_MAX_NEW_FLOWS, "flood mode on by default");
        let off = Config::parse(&GOOD.replacen("instance", "max_new_flows_per_cpu = 0\ninstance", 1)).unwrap();
        assert_eq!(off.settings().max_new_flows, 0, "0 turns flood mode off");
        assert!(c.describe().contains("backend 10.0.1.12 weight 1 mac neighbour table"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let src = GOOD.replace("weight = 100", "wieght = 100");
        let e = Config::parse(&src).unwrap_err().to_string();
        assert!(e.contains("wieght") && e.contains("line 17"), "{e}");
        let e = Config::parse(&format!("{GOOD}\n[cluster]\nnode_id = 1\nnodeid = 2\n")).unwrap_err().to_string();
        assert!(e.contains("nodeid"), "{e}");
        let e = Config::parse(&GOOD.replace("kind = \"tcp\"", "kind = \"icmp\"")).unwrap_err().to_string();
        assert!(e.contains("icmp") && e.contains("line 13"), "{e}");
    }

    #[test]
    fn every_semantic_error_is_listed() {
        let src = GOOD
            .replace("instance = \"lb0\"", "instance = \"LB 0\"")
            .replace("table_size = 65537", "table_size = 65536")
            .replace("vip = \"10.0.0.102:3306/tcp\"", "vip = \"10.0.0.100:80/tcp\"")
            .replace("encap_source_v4 = \"10.0.0.5\"\n", "")
            .replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\", \"eth0\"]");
        let e = Config::parse(&src).unwrap_err();
        let all = e.to_string();
        for want in ["instance", "listed twice", "prime", "already used", "encap_source_v4"] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(e.0.len() >= 5, "{all}");
        assert!(e.0.iter().any(|l| l.starts_with("line 7:") && l.contains("prime")), "{all}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, want) in [
            ("address = \"10.0.1.12\"", "address = \"10.0.1.300\"", "invalid IP address"),
            ("mac = \"02:00:00:00:01:11\"", "mac = \"02:00:00:00:01\"", "bad MAC"),
            ("mode = \"ipip\"", "mode = \"nat\"", "unknown mode"),
            ("vip = \"10.0.0.100:80/tcp\"", "vip = \"10.0.0.100/tcp\"", "VIP"),
            ("xdp_mode = \"auto\"", "xdp_mode = \"fast\"", "fast"),
            ("interval_ms = 1000", "interval_ms = 5", "interval_ms"),
        ] {
            let e = Config::parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("line "), "{from} -> {to}: {e}");
        }
    }
}
