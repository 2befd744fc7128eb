//! lbd's config file (TOML). Every key is documented in README.md ("Configuration").
//! Unknown keys are rejected with their name and line; `lbd --check` prints every
//! problem at once, each with the key (and line) it is about.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use lb_common::{SETTINGS_F_HAS_GATEWAY, Settings, addr_words};
use serde::{Deserialize, Serialize};

use crate::model::{Key, Mac, NodeEnv, ServiceDef};

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
    metrics: Option<MetricsConfig>,
    bgp: Option<toml::Spanned<crate::bgp::BgpConfig>>,
}

/// `[metrics]`: serve `GET /metrics` (Prometheus text) on `listen`. Absent: off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// "addr:port", e.g. "127.0.0.1:9469" (a fixed port: Prometheus is told where).
    pub listen: std::net::SocketAddr,
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
    /// The Prometheus endpoint; none = off.
    pub metrics: Option<MetricsConfig>,
    /// Active-active: VIPs announced over BGP by BIRD; none = no BGP.
    pub bgp: Option<crate::bgp::BgpConfig>,
}

/// Every problem found, one line each, naming the key and line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

fn with_line(src: &str, span: Option<std::ops::Range<usize>>, msg: &str) -> String {
    let at = span.map(|s| format!("line {}: ", line_of(src, s.start))).unwrap_or_default();
    format!("{at}{}", msg.trim_end())
}

/// One step of a path into the document: a key, or an array index.
enum Seg<'p> {
    K(&'p str),
    I(usize),
}
use Seg::{I, K};

/// Where each key of the file is, to print a problem at its key's own line.
struct Spans<'a> {
    src: &'a str,
    doc: &'a toml::de::DeTable<'a>,
}

type DeItem<'a> = toml::Spanned<toml::de::DeValue<'a>>;

fn table_get<'a>(t: &'a toml::de::DeTable<'a>, k: &str) -> Option<(&'a toml::Spanned<toml::de::DeString<'a>>, &'a DeItem<'a>)> {
    t.iter().find(|(key, _)| &**key.get_ref() == k)
}

impl<'a> Spans<'a> {
    /// The start of the deepest item of `path` present in the file: the key itself
    /// when the path ends at a key, else the table or array holding it.
    fn offset(&self, path: &[Seg]) -> Option<usize> {
        let mut best = None;
        let mut table = Some(self.doc);
        let mut array: Option<&toml::de::DeArray<'a>> = None;
        for seg in path {
            let item = match (seg, table, array) {
                (K(k), Some(t), _) => table_get(t, k).map(|(key, v)| {
                    best = Some(key.span().start);
                    v
                }),
                (I(i), _, Some(a)) => a.get(*i).inspect(|v| best = Some(v.span().start)),
                _ => None,
            };
            let Some(item) = item else { break };
            (table, array) = match item.get_ref() {
                toml::de::DeValue::Table(t) => (Some(t), None),
                toml::de::DeValue::Array(a) => (None, Some(a)),
                _ => (None, None),
            };
        }
        best
    }

    /// `msg` prefixed with the line of `path` (or of the nearest enclosing item).
    fn at(&self, path: &[Seg], msg: impl std::fmt::Display) -> String {
        match self.offset(path) {
            Some(o) => format!("line {}: {msg}", line_of(self.src, o)),
            None => msg.to_string(),
        }
    }

    /// At `path` if the file has that key, else at `fallback`.
    fn at_or(&self, path: &[Seg], fallback: &[Seg], msg: impl std::fmt::Display) -> String {
        let has = matches!(path, [K(k)] if table_get(self.doc, k).is_some());
        if has { self.at(path, msg) } else { self.at(fallback, msg) }
    }

    /// A type error: its line and the dotted key it is about (serde's message does
    /// not name it).
    fn type_error(&self, e: &toml::de::Error) -> String {
        let Some(span) = e.span() else {
            return e.message().trim_end().to_string();
        };
        // A key missing at the top level: serde points at the empty start of the file,
        // which is no key's line.
        if span.is_empty() && span.start == 0 {
            return format!("top level: {}", e.message().trim_end());
        }
        let mut path = Vec::new();
        let mut best = String::new();
        walk(self.doc, span.start, &mut path, &mut best);
        let msg = e.message().trim_end();
        if best.is_empty() || msg.contains(&format!("`{}`", best.rsplit('.').next().unwrap_or(""))) {
            with_line(self.src, Some(span), msg)
        } else {
            with_line(self.src, Some(span), &format!("{best}: {msg}"))
        }
    }
}

/// Required keys and a value of their type, to look past a type error in one.
const REQUIRED: [(&str, &str); 9] = [
    ("instance", "\"x\""),
    ("interfaces", "[\"x\"]"),
    ("name", "\"x\""),
    ("vip", "\"192.0.2.1:1/tcp\""),
    ("address", "\"192.0.2.1\""),
    ("node_id", "1"),
    ("peer", "\"192.0.2.1:1\""),
    ("listen", "\"192.0.2.1:1\""),
    ("secret_file", "\"/x\""),
];

/// Every type error, not only the first serde stops at: the offending `key = value`
/// line is commented out (a required key: given a value of its type) and the file
/// parsed again (line numbers stay), until it parses or the next error is not about a
/// single key line (a table header, a value spanning lines).
fn type_errors(src: &str, first_msg: String, first: toml::de::Error) -> Vec<String> {
    let mut out = vec![first_msg];
    let mut text = src.to_string();
    let mut removed: Vec<String> = Vec::new();
    let mut e = first;
    for _ in 0..64 {
        // A missing key is not on any line: commenting lines out cannot get past it.
        if e.message().starts_with("missing field") {
            break;
        }
        let Some(span) = e.span() else { break };
        let start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
        let line = text[start..].lines().next().unwrap_or("");
        let Some((key, _)) = line.split_once('=') else { break };
        let key = key.trim().trim_matches('"').to_string();
        if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
            break;
        }
        // A required key gets a value of the right type (only types are checked
        // here); any other is commented out, so its default applies.
        let end = start + line.len();
        match REQUIRED.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => text.replace_range(start..end, &format!("{key} = {v}")),
            None => text.insert(start, '#'),
        }
        removed.push(key);
        let Ok(doc) = toml::de::DeTable::parse(&text) else { break };
        match toml::from_str::<Raw>(&text) {
            Ok(_) => break,
            Err(next) => {
                if removed.iter().any(|k| next.message().starts_with(&format!("missing field `{k}`"))) {
                    break;
                }
                out.push(Spans { src: &text, doc: doc.get_ref() }.type_error(&next));
                e = next;
            }
        }
    }
    // In file order (serde visits keys in its own order).
    out.sort_by_key(|l| l.strip_prefix("line ").and_then(|r| r.split(':').next()).and_then(|n| n.parse::<usize>().ok()).unwrap_or(usize::MAX));
    out
}

/// The dotted name of the deepest key whose key or value contains `at`.
fn walk<'a>(t: &'a toml::de::DeTable<'a>, at: usize, path: &mut Vec<String>, best: &mut String) {
    for (k, v) in t.iter() {
        let inside = |s: std::ops::Range<usize>| s.start <= at && at < s.end.max(s.start + 1);
        if !(inside(k.span()) || inside(v.span()) || matches!(v.get_ref(), toml::de::DeValue::Table(_) | toml::de::DeValue::Array(_))) {
            continue;
        }
        path.push(k.get_ref().to_string());
        if inside(k.span()) || inside(v.span()) {
            *best = path.join(".");
        }
        match v.get_ref() {
            toml::de::DeValue::Table(t) => walk(t, at, path, best),
            toml::de::DeValue::Array(a) => {
                for e in a.iter() {
                    if let toml::de::DeValue::Table(t) = e.get_ref() {
                        walk(t, at, path, best);
                    } else if inside(e.span()) {
                        *best = path.join(".");
                    }
                }
            }
            _ => {}
        }
        path.pop();
    }
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
    /// Parses and checks `src` (the file's text). Every syntax error, or every type
    /// error naming its key, or every semantic problem, each at the line of the key it
    /// is about.
    pub fn parse(src: &str) -> Result<Config, ConfigErrors> {
        let (doc, syntax) = toml::de::DeTable::parse_recoverable(src);
        if !syntax.is_empty() {
            return Err(ConfigErrors(syntax.iter().map(|e| with_line(src, e.span(), e.message())).collect()));
        }
        let spans = Spans { src, doc: doc.get_ref() };
        let raw: Raw = toml::from_str(src).map_err(|e| ConfigErrors(type_errors(src, spans.type_error(&e), e)))?;
        let mut errs = Vec::new();
        if let Err(e) = check_instance_name(&raw.instance) {
            errs.push(spans.at(&[K("instance")], e));
        }
        if raw.interfaces.is_empty() {
            errs.push(spans.at(&[K("interfaces")], "interfaces: at least one interface is required"));
        }
        let mut seen = BTreeSet::new();
        for (n, i) in raw.interfaces.iter().enumerate() {
            if let Err(e) = check_interface_name(i) {
                errs.push(spans.at(&[K("interfaces"), I(n)], e));
            }
            if !seen.insert(i) {
                errs.push(spans.at(&[K("interfaces"), I(n)], format!("interfaces: {i:?} listed twice")));
            }
        }
        if raw.reply_rate > 1_000_000 {
            errs.push(spans.at(&[K("reply_rate")], format!("reply_rate {}: at most 1000000 per second per CPU (0 = default)", raw.reply_rate)));
        }
        if !(576..=9216).contains(&raw.mtu) {
            errs.push(spans.at(&[K("mtu")], format!("mtu {}: out of range 576..=9216", raw.mtu)));
        }
        // Per service: every problem, at its own key (the same rules as the CLI and
        // peer sync apply).
        let env = NodeEnv { encap_v4: raw.encap_source_v4.is_some(), encap_v6: raw.encap_source_v6.is_some(), mtu: raw.mtu };
        let services: Vec<ServiceDef> = raw.services.iter().map(|s| s.get_ref().clone()).collect();
        for (i, d) in services.iter().enumerate() {
            for (key, e) in d.problems(&env) {
                let msg = format!("service {:?}: {e}", d.name);
                errs.push(match key {
                    Key::Service(k) => spans.at(&[K("service"), I(i), K(k)], msg),
                    Key::Backend(j, k) => spans.at(&[K("service"), I(i), K("backend"), I(j), K(k)], msg),
                    Key::Mtu => spans.at_or(&[K("mtu")], &[K("service"), I(i), K("vip")], msg),
                });
            }
        }
        for (i, key, e) in crate::core::validate_across(&services) {
            errs.push(match i {
                Some(i) => spans.at(&[K("service"), I(i), K(key)], e),
                None => e,
            });
        }
        if let Some(c) = &raw.cluster {
            for e in c.get_ref().validate() {
                let key = match &e {
                    crate::cluster::ClusterConfigError::Invalid { key, .. } => key,
                    crate::cluster::ClusterConfigError::Secret { .. } => "secret_file",
                };
                errs.push(spans.at(&[K("cluster"), K(key)], e.to_string()));
            }
            // The election is for two nodes; more need the routers to spread the load.
            if raw.bgp.is_none() && c.get_ref().peer_list().len() > 1 {
                errs.push(spans.at(
                    &[K("cluster"), K("peers")],
                    format!(
                        "cluster.peers: {} peers without [bgp]: the active/backup election is for two nodes; \
                         for more, add [bgp] (active-active behind ECMP) or list one peer",
                        c.get_ref().peer_list().len()
                    ),
                ));
            }
            // The key is checked here too, so `lbd --check` catches a readable secret.
            if let Err(e) = crate::cluster::load_secret(&c.get_ref().secret_file) {
                errs.push(spans.at(&[K("cluster"), K("secret_file")], e.to_string()));
            }
        }
        if let Some(m) = &raw.metrics {
            if m.listen.port() == 0 {
                errs.push(spans.at(&[K("metrics"), K("listen")], format!("metrics.listen {}: needs a fixed port (Prometheus scrapes it)", m.listen)));
            }
            if m.listen.ip().is_multicast() {
                errs.push(spans.at(&[K("metrics"), K("listen")], format!("metrics.listen {}: not a unicast address", m.listen)));
            }
        }
        if let Some(b) = &raw.bgp {
            for e in b.get_ref().validate() {
                errs.push(spans.at(&[K("bgp"), K(e.key)], e.to_string()));
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
            metrics: raw.metrics,
            bgp: raw.bgp.map(|b| b.into_inner()),
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

    /// What a reload of `new` over the running `self` may not change: what lbd binds
    /// at start (instance lock, socket, state directory, the cluster socket, peer and
    /// secret). Each refusal says a restart is needed.
    pub fn check_reload(&self, new: &Config) -> Result<(), String> {
        if new.instance != self.instance || new.socket != self.socket || new.state_dir != self.state_dir {
            return Err("instance, socket and state_dir cannot change on reload: restart lbd".into());
        }
        if new.cluster != self.cluster {
            let keys = match (&self.cluster, &new.cluster) {
                (Some(a), Some(b)) => cluster_diff(a, b).join(", "),
                (None, Some(_)) => "section added".into(),
                (Some(_), None) => "section removed".into(),
                (None, None) => String::new(),
            };
            return Err(format!("[cluster] changed ({keys}): lbd reads [cluster] only at start, restart needed"));
        }
        if new.metrics != self.metrics {
            return Err("[metrics] changed: lbd binds metrics.listen only at start, restart needed".into());
        }
        if new.bgp.is_some() != self.bgp.is_some() {
            return Err("[bgp] added or removed: lbd starts its BGP task only at start, restart needed".into());
        }
        Ok(())
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
            let peers: Vec<String> = c.peer_list().iter().map(|p| p.node_id.map_or(p.address.to_string(), |n| format!("{} (node {n})", p.address))).collect();
            if self.bgp.is_some() {
                let _ = writeln!(
                    o,
                    "cluster active-active node {} listen {} peers {} heartbeat {} ms, dead after {} heartbeats",
                    c.node_id,
                    c.listen,
                    peers.join(", "),
                    c.heartbeat_ms,
                    c.dead_after
                );
            } else {
                let _ = writeln!(
                    o,
                    "cluster node {} priority {} listen {} peer {} heartbeat {} ms, dead after {} heartbeats, preempt {}",
                    c.node_id,
                    c.priority,
                    c.listen,
                    peers.join(", "),
                    c.heartbeat_ms,
                    c.dead_after,
                    c.preempt
                );
            }
            if let Some(n) = &c.notify {
                let _ = writeln!(o, "cluster notify {} (timeout {} ms)", n.display(), c.notify_timeout_ms);
            }
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(o, "metrics on http://{}/metrics", m.listen);
        }
        if let Some(b) = &self.bgp {
            let n: Vec<String> = b.neighbors.iter().map(|n| format!("{} as {}", n.address, n.asn)).collect();
            let _ = writeln!(
                o,
                "bgp as {} router id {} neighbours {}, bfd {}, drain {} ms, BIRD socket {}, file {}",
                b.local_as,
                b.router_id,
                n.join(", "),
                if b.bfd { format!("{} ms x {}", b.bfd_interval_ms, b.bfd_multiplier) } else { "off".into() },
                b.drain_ms,
                b.control_socket.display(),
                b.bird_config_path(&self.instance).display()
            );
        }
        for s in &self.services {
            let health = s.health.as_ref().map_or("none".to_string(), |h| {
                format!("{:?} every {} ms, timeout {} ms, rise {}, fall {}", h.kind, h.interval_ms, h.timeout_ms, h.rise, h.fall).to_lowercase()
            });
            let _ = writeln!(
                o,
                "service {} vip {} mode {} table {} flow-table {} health {} unhealthy-flows {}",
                s.name, s.vip, s.mode, s.table_size, s.flow_table, health, s.unhealthy
            );
            for b in &s.backends {
                let mac = b.mac.map_or("neighbour table".into(), |m| m.to_string());
                let _ = writeln!(o, "  backend {} weight {} mac {}", b.address, b.weight, mac);
            }
        }
        o
    }
}

/// The `[cluster]` keys that differ between `a` and `b`.
fn cluster_diff(a: &crate::cluster::ClusterConfig, b: &crate::cluster::ClusterConfig) -> Vec<&'static str> {
    let mut d = Vec::new();
    let mut cmp = |k, same: bool| {
        if !same {
            d.push(k)
        }
    };
    cmp("node_id", a.node_id == b.node_id);
    cmp("peer_id", a.peer_id == b.peer_id);
    cmp("priority", a.priority == b.priority);
    cmp("peer", a.peer == b.peer);
    cmp("peers", a.peers == b.peers);
    cmp("listen", a.listen == b.listen);
    cmp("secret_file", a.secret_file == b.secret_file);
    cmp("heartbeat_ms", a.heartbeat_ms == b.heartbeat_ms);
    cmp("dead_after", a.dead_after == b.dead_after);
    cmp("preempt", a.preempt == b.preempt);
    cmp("notify", a.notify == b.notify);
    cmp("notify_timeout_ms", a.notify_timeout_ms == b.notify_timeout_ms);
    d
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
    use crate::control::Mode;

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
        let gue = Config::parse(&GOOD.replacen("mode = \"ipip\"", "mode = \"gue:7000\"", 1)).unwrap();
        assert_eq!(gue.services[0].mode, Mode::Gue { port: 7000 }, "gue with its UDP port");
        assert!(c.describe().contains("backend 10.0.1.12 weight 1 mac neighbour table"));
    }

    #[test]
    fn bgp_section_parses_and_its_errors_name_key_and_line() {
        let bgp = "\n[bgp]\nlocal_as = 65001\nrouter_id = \"10.0.0.5\"\ndrain_ms = 500\n[[bgp.neighbor]]\naddress = \"10.0.0.254\"\nas = 65000\n";
        let c = Config::parse(&format!("{GOOD}{bgp}")).unwrap();
        let b = c.bgp.as_ref().unwrap();
        assert_eq!((b.local_as, b.drain_ms, b.bfd), (65001, 500, true));
        assert!(c.describe().contains("bgp as 65001 router id 10.0.0.5 neighbours 10.0.0.254 as 65000, bfd 100 ms x 3"), "{}", c.describe());
        assert!(Config::parse(GOOD).unwrap().bgp.is_none());
        let lines = GOOD.matches('\n').count() + 1;
        let e = Config::parse(&format!("{GOOD}{}", bgp.replace("drain_ms = 500", "drain_ms = 900000"))).unwrap_err().to_string();
        assert!(e.contains(&format!("line {}: bgp.drain_ms", lines + 4)), "{e}");
        let e = Config::parse(&format!("{GOOD}{}", bgp.replace("as = 65000", "as = 65000\npassword = \"a\\\"b\""))).unwrap_err().to_string();
        assert!(e.contains("bgp.neighbor: 10.0.0.254: password"), "{e}");
        let e = Config::parse(&format!("{GOOD}{}", bgp.replace("local_as", "localas"))).unwrap_err().to_string();
        assert!(e.contains("localas"), "{e}");
        // BGP is reloadable: a changed [bgp] is no restart.
        let other = Config::parse(&format!("{GOOD}{}", bgp.replace("drain_ms = 500", "drain_ms = 800"))).unwrap();
        assert!(c.check_reload(&other).is_ok());
    }

    #[test]
    fn bgp_with_a_cluster_peers_list_is_active_active_and_more_peers_need_bgp() {
        let dir = std::env::temp_dir().join(format!("lb-cfg-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let bgp = "\n[bgp]\nlocal_as = 65001\nrouter_id = \"10.0.0.5\"\n[[bgp.neighbor]]\naddress = \"10.0.0.254\"\nas = 65000\n";
        let cl = format!(
            "\n[cluster]\nnode_id = 1\nlisten = \"10.0.0.5:7946\"\nsecret_file = {secret:?}\n[[cluster.peers]]\naddress = \"10.0.0.6:7946\"\nnode_id = 2\n[[cluster.peers]]\naddress = \"10.0.0.7:7946\"\n"
        );
        // Both sections together: the N-node form (the refusal of [bgp] + [cluster] is gone).
        let c = Config::parse(&format!("{GOOD}{bgp}{cl}")).unwrap();
        assert_eq!(c.cluster.as_ref().unwrap().peer_list().len(), 2);
        assert!(c.describe().contains("cluster active-active node 1 listen 10.0.0.5:7946 peers 10.0.0.6:7946 (node 2), 10.0.0.7:7946"), "{}", c.describe());
        // The two-node form with [bgp] too.
        let pair = format!("\n[cluster]\nnode_id = 1\npeer = \"10.0.0.6:7946\"\nlisten = \"10.0.0.5:7946\"\nsecret_file = {secret:?}\n");
        assert!(Config::parse(&format!("{GOOD}{bgp}{pair}")).is_ok());
        // Without [bgp] the election is for two: a list of two is refused, naming line and why.
        let src = format!("{GOOD}{cl}");
        let e = Config::parse(&src).unwrap_err().to_string();
        let line = src.lines().position(|l| l == "[[cluster.peers]]").unwrap() + 1;
        assert!(e.contains(&format!("line {line}: cluster.peers: 2 peers without [bgp]")) && e.contains("election is for two nodes"), "{e}");
        // A list of one is the pair.
        let one = cl.split("[[cluster.peers]]\naddress = \"10.0.0.7:7946\"\n").next().unwrap().to_string();
        assert!(Config::parse(&format!("{GOOD}{one}")).is_ok());
        // Peers are read at start only.
        let fewer = Config::parse(&format!("{GOOD}{bgp}{}", one)).unwrap();
        let e = c.check_reload(&fewer).unwrap_err();
        assert!(e.contains("peers") && e.contains("restart needed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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
        // At the key's own line (table_size), not the [[service]] line.
        assert!(e.0.iter().any(|l| l.starts_with("line 11:") && l.contains("prime")), "{all}");
    }

    #[test]
    fn reload_refuses_cluster_changes_with_restart_needed() {
        let dir = std::env::temp_dir().join(format!("lb-cfg-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let cl = format!("\n[cluster]\nnode_id = 1\npeer = \"10.0.0.6:7946\"\nlisten = \"10.0.0.5:7946\"\nsecret_file = {secret:?}\n");
        let old = Config::parse(&format!("{GOOD}{cl}")).unwrap();
        // Services and settings may change.
        let new = Config::parse(&format!("{}{cl}", GOOD.replace("weight = 100", "weight = 7").replace("gateway_mac = \"02:00:00:00:00:01\"\n", ""))).unwrap();
        old.check_reload(&new).unwrap();
        for (to, key) in [
            (cl.replace("node_id = 1", "node_id = 3"), "node_id"),
            (cl.replace("10.0.0.6:7946", "10.0.0.7:7946"), "peer"),
            (format!("{cl}priority = 7\n"), "priority"),
            (String::new(), "section removed"),
        ] {
            let new = Config::parse(&format!("{GOOD}{to}")).unwrap();
            let e = old.check_reload(&new).unwrap_err();
            assert!(e.contains("restart needed") && e.contains(key), "{key}: {e}");
        }
        let e = Config::parse(GOOD).unwrap().check_reload(&old).unwrap_err();
        assert!(e.contains("section added") && e.contains("restart needed"), "{e}");
        let e = old.check_reload(&Config::parse(&format!("{}{cl}", GOOD.replace("\"lb0\"", "\"lb1\""))).unwrap()).unwrap_err();
        assert!(e.contains("restart lbd"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_and_notify_are_checked_and_fixed_at_start() {
        let m = Config::parse(&format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:9469\"\n")).unwrap();
        assert_eq!(m.metrics, Some(MetricsConfig { listen: "127.0.0.1:9469".parse().unwrap() }));
        assert!(m.describe().contains("metrics on http://127.0.0.1:9469/metrics"));
        assert_eq!(Config::parse(GOOD).unwrap().metrics, None, "absent: off");
        for (bad, want) in [
            ("listen = \"127.0.0.1:0\"", "needs a fixed port"),
            ("listen = \"127.0.0.1\"", "listen"),
            ("listen = \"224.0.0.1:9469\"", "not a unicast"),
            ("listen = \"127.0.0.1:9469\"\nport = 3", "port"),
        ] {
            let e = Config::parse(&format!("{GOOD}\n[metrics]\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("line "), "{bad}: {e}");
        }
        let e = Config::parse(GOOD).unwrap().check_reload(&m).unwrap_err();
        assert!(e.contains("[metrics]") && e.contains("restart needed"), "{e}");

        let dir = std::env::temp_dir().join(format!("lb-cfg-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let script = dir.join("notify.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let cl = |extra: &str| {
            format!("{GOOD}\n[cluster]\nnode_id = 1\npeer = \"10.0.0.6:7946\"\nlisten = \"10.0.0.5:7946\"\nsecret_file = {secret:?}\n{extra}\n")
        };
        let e = Config::parse(&cl(&format!("notify = {script:?}"))).unwrap_err().to_string();
        assert!(e.contains("cluster.notify") && e.contains("not an executable"), "{e}");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let c = Config::parse(&cl(&format!("notify = {script:?}\nnotify_timeout_ms = 2000"))).unwrap();
        let cc = c.cluster.as_ref().unwrap();
        assert_eq!((cc.notify.as_deref(), cc.notify_timeout_ms), (Some(script.as_path()), 2000));
        assert_eq!(Config::parse(&cl("")).unwrap().cluster.unwrap().notify_timeout_ms, 10_000);
        for (bad, want) in [
            ("notify = \"relative.sh\"", "absolute"),
            ("notify = \"/nonexistent/x.sh\"", "cluster.notify"),
            ("notify_timeout_ms = 5", "notify_timeout_ms"),
        ] {
            let e = Config::parse(&cl(bad)).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let e = c.check_reload(&Config::parse(&cl("")).unwrap()).unwrap_err();
        assert!(e.contains("notify") && e.contains("restart needed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, want) in [
            ("address = \"10.0.1.12\"", "address = \"10.0.1.300\"", "invalid IP address"),
            ("mac = \"02:00:00:00:01:11\"", "mac = \"02:00:00:00:01\"", "bad MAC"),
            ("mode = \"ipip\"", "mode = \"nat\"", "unknown mode"),
            ("mode = \"ipip\"", "mode = \"gue:0\"", "GUE port"),
            ("vip = \"10.0.0.100:80/tcp\"", "vip = \"10.0.0.100/tcp\"", "VIP"),
            ("xdp_mode = \"auto\"", "xdp_mode = \"fast\"", "fast"),
            ("interval_ms = 1000", "interval_ms = 5", "interval_ms"),
        ] {
            let e = Config::parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("line "), "{from} -> {to}: {e}");
        }
    }
}

/// Issue 11 items 3, 8 and 9: one list of refusals, the same from the config file
/// (`lbd --check`), the CLI and the peer's sync; each problem at its own key's line.
#[cfg(test)]
mod validation_tests {
    use super::*;
    use crate::control::{ControlPlane, Mode};
    use crate::core::{Change, Core};
    use crate::maps::MemMaps;
    use crate::model::{BackendDef, FlowPolicy, FlowTable};

    const HEAD: &str = "instance = \"lb0\"\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"10.0.0.5\"\n";

    fn def(vip: &str, backends: &[&str]) -> ServiceDef {
        ServiceDef {
            name: "svc".into(),
            vip: vip.parse().unwrap(),
            mode: Mode::Ipip,
            table_size: 251,
            flow_table: FlowTable::On,
            health: None,
            unhealthy: FlowPolicy::Keep,
            backends: backends.iter().map(|a| BackendDef { address: a.parse().unwrap(), weight: 1, mac: None, drained: false }).collect(),
        }
    }

    fn toml_of(head: &str, defs: &[ServiceDef]) -> String {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            service: &'a [ServiceDef],
        }
        format!("{head}{}", toml::to_string(&Doc { service: defs }).unwrap())
    }

    /// The refusal of `defs` by the file, by the CLI (adding the last one to a node
    /// holding the others) and by a peer's sync (`replace_all`).
    fn refusals(head: &str, defs: &[ServiceDef]) -> (String, String, String) {
        let file = Config::parse(&toml_of(head, defs)).map(|_| ()).unwrap_err().to_string();
        // The node runs with the file's settings (and no services).
        let settings = Config::parse(head).unwrap().settings();
        let node = || {
            let mut c = Core::new(ControlPlane::new(MemMaps::default()));
            c.set_settings(settings).unwrap();
            c
        };
        let mut c = node();
        let (last, others) = defs.split_last().unwrap();
        let cli = match c.replace_all(others.to_vec()) {
            Ok(_) => c.apply(Change::AddService(last.clone())).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        let writes = c.control().writer().writes;
        let sync = node().replace_all(defs.to_vec()).unwrap_err().to_string();
        assert_eq!(c.control().writer().writes, writes, "a refused change writes nothing");
        (file, cli, sync)
    }

    #[test]
    fn the_same_refusals_in_the_file_the_cli_and_peer_sync() {
        let v6 = "instance = \"lb0\"\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"10.0.0.5\"\nencap_source_v6 = \"2001:db8::5\"\n";
        let (v6_1300, v6_1299, v6_1320) = (format!("{v6}mtu = 1300\n"), format!("{v6}mtu = 1299\n"), format!("{v6}mtu = 1320\n"));
        let cases: Vec<(&str, Vec<ServiceDef>, &str)> = vec![
            (HEAD, vec![def("0.0.0.0:80/tcp", &["10.0.1.1"])], "the unspecified address cannot be a VIP"),
            (HEAD, vec![def("255.255.255.255:80/udp", &["10.0.1.1"])], "the broadcast address cannot be a VIP"),
            (HEAD, vec![def("224.0.0.5:80/udp", &["10.0.1.1"])], "a multicast address cannot be a VIP"),
            (HEAD, vec![def("127.0.0.1:80/tcp", &["10.0.1.1"])], "a loopback address cannot be a VIP"),
            (v6, vec![def("[::1]:80/tcp", &["10.0.1.1"])], "a loopback address cannot be a VIP"),
            (v6, vec![def("[ff02::1]:80/udp", &["10.0.1.1"])], "a multicast address cannot be a VIP"),
            (v6, vec![def("[::]:80/tcp", &["10.0.1.1"])], "the unspecified address cannot be a VIP"),
            (HEAD, vec![def("10.0.0.100:80/tcp", &["0.0.0.0"])], "the unspecified address cannot be a backend"),
            (HEAD, vec![def("10.0.0.100:80/tcp", &["239.1.1.1"])], "a multicast address cannot be a backend"),
            (HEAD, vec![def("10.0.0.100:80/tcp", &["255.255.255.255"])], "the broadcast address cannot be a backend"),
            (HEAD, vec![def("10.0.0.100:80/tcp", &["10.0.1.1", "10.0.0.100"])], "the VIP's own address cannot be a backend"),
            // Aliases: a mapped VIP beside its IPv4 twin, a mapped backend beside its twin.
            (
                v6,
                vec![def("10.0.0.100:80/tcp", &["10.0.1.1"]), ServiceDef { name: "twin".into(), ..def("[::ffff:10.0.0.100]:80/tcp", &["10.0.1.1"]) }],
                "IPv4-mapped",
            ),
            (v6, vec![def("10.0.0.100:80/tcp", &["10.0.1.1", "::ffff:10.0.1.1"])], "IPv4-mapped"),
            // An ipip IPv6 backend without encap_source_v6 (the datapath would drop it).
            (HEAD, vec![def("10.0.0.100:80/tcp", &["2001:db8::11"])], "is IPv6 in ipip mode: set encap_source_v6"),
            // IPv6 VIP, IPv6 backend: 1300 - 40 leaves 1260 < 1280.
            (&v6_1300, vec![def("[2001:db8::100]:80/tcp", &["2001:db8::11"])], "set mtu to at least 1320"),
            (&v6_1299, vec![def("[2001:db8::100]:80/tcp", &["10.0.1.1"])], "set mtu to at least 1300"),
            // gue: the same encap-source rule, and the MTU rule over its 56-byte outer.
            (HEAD, vec![ServiceDef { mode: Mode::Gue { port: 6080 }, ..def("10.0.0.100:80/tcp", &["2001:db8::11"]) }], "is IPv6 in gue mode: set encap_source_v6"),
            (&v6_1320, vec![ServiceDef { mode: Mode::Gue { port: 6080 }, ..def("[2001:db8::100]:80/tcp", &["2001:db8::11"]) }], "set mtu to at least 1352"),
        ];
        for (head, defs, want) in &cases {
            let (file, cli, sync) = refusals(head, defs);
            for (path, e) in [("file", &file), ("cli", &cli), ("sync", &sync)] {
                assert!(e.contains(want), "{want:?} via {path}: {e}");
            }
        }
        // The same settings with room enough, and the IPv4 twin alone, are fine.
        Config::parse(&toml_of(&v6_1320, &[def("[2001:db8::100]:80/tcp", &["2001:db8::11", "10.0.1.1"])])).unwrap();
        Config::parse(&toml_of(&v6_1300, &[def("[2001:db8::100]:80/tcp", &["10.0.1.1"])])).unwrap();
        Config::parse(&toml_of(HEAD, &[def("10.0.0.100:80/tcp", &["10.0.1.1"])])).unwrap();
    }

    #[test]
    fn check_reports_every_error_at_its_own_keys_line() {
        let src = "instance = \"lb0\"
interfaces = [\"eth0\"]
encap_source_v4 = \"10.0.0.5\"
mtu = 1300

[[service]]
name = \"web\"
vip = \"224.0.0.1:80/tcp\"
table_size = 100

[[service.backend]]
address = \"10.0.1.11\"
weight = 70000

[[service.backend]]
address = \"239.0.0.1\"

[[service]]
name = \"v6\"
vip = \"[2001:db8::1]:80/tcp\"

[[service.backend]]
address = \"2001:db8::11\"
";
        let e = Config::parse(src).unwrap_err();
        let all = e.to_string();
        for (line, what) in [
            (8, "multicast address cannot be a VIP"),
            (9, "must be a prime"),
            (13, "weight 70000"),
            (16, "multicast address cannot be a backend"),
            (23, "set encap_source_v6"),
            (4, "set mtu to at least 1320"),
        ] {
            assert!(e.0.iter().any(|l| l.starts_with(&format!("line {line}: ")) && l.contains(what)), "line {line} {what:?} in:\n{all}");
        }
        assert_eq!(e.0.len(), 6, "{all}");
    }

    #[test]
    fn type_errors_name_their_key() {
        let src =
            format!("{HEAD}\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100:80/tcp\"\n\n[[service.backend]]\naddress = \"10.0.1.11\"\nweight = \"heavy\"\n");
        let e = Config::parse(&src).unwrap_err().to_string();
        assert!(e.starts_with("line 11: service.backend.weight: ") && e.contains("invalid type"), "{e}");
        let e = Config::parse(&format!("{HEAD}mtu = \"big\"\n")).unwrap_err().to_string();
        assert!(e.starts_with("line 4: mtu: "), "{e}");
        // Every type error, not only the first.
        let src = format!("{HEAD}mtu = \"big\"\nreply_rate = -1\n\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100:80/tcp\"\ntable_size = \"x\"\n\n[[service.backend]]\naddress = \"10.0.1.300\"\nweight = 2\n");
        let e = Config::parse(&src).unwrap_err();
        let lines: Vec<&str> = e.0.iter().map(|l| l.split(':').next().unwrap()).collect();
        assert_eq!(lines, ["line 4", "line 5", "line 10", "line 13"], "{e}");
        assert!(e.0[2].contains("table_size") && e.0[3].contains("address") && e.0[3].contains("invalid IP address"), "{e}");
        // Syntax errors: every one, each at its line.
        let e = Config::parse("instance = \"lb0\"\ninterfaces = [\"eth0\"\nmtu = = 3\n").unwrap_err();
        assert!(!e.0.is_empty() && e.0.iter().all(|l| l.starts_with("line ")), "{e}");
    }

    /// A missing key is reported once, where it is missing: a top-level one was
    /// printed 65 times at line 1 under its neighbour's name.
    #[test]
    fn missing_keys_are_reported_once_at_their_table() {
        let e = Config::parse("interfaces = [\"lo\"]\n[[service]]\nname = \"w\"\nvip = \"10.0.0.1:80/tcp\"\n").unwrap_err();
        assert_eq!(e.0, ["top level: missing field `instance`"]);
        let e = Config::parse(&format!("{HEAD}[[service]]\nname = \"w\"\nvip = \"10.0.0.1:80/tcp\"\n[[service.backend]]\nweight = 2\n")).unwrap_err();
        assert_eq!(e.0, ["line 7: service.backend: missing field `address`"]);
        // With a type error before it: both, each once.
        let e = Config::parse("interfaces = [\"lo\"]\nmtu = \"big\"\n").unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(e.0[0].starts_with("line 2: mtu: ") && e.0[1] == "top level: missing field `instance`", "{e}");
    }

    /// Issue 15 item 4: `flow_table = "off"`, gue TCP services only, refused at its
    /// own line otherwise; the default is on and is not written out.
    #[test]
    fn flow_table_off_is_for_gue_tcp_only() {
        let svc = |mode: &str, vip: &str, ft: &str| {
            format!("{HEAD}\n[[service]]\nname = \"web\"\nvip = \"{vip}\"\nmode = \"{mode}\"\n{ft}\n[[service.backend]]\naddress = \"10.0.1.11\"\n")
        };
        let c = Config::parse(&svc("gue", "10.0.0.100:80/tcp", "flow_table = \"off\"")).unwrap();
        assert_eq!(c.services[0].flow_table, FlowTable::Off);
        assert!(!c.services[0].spec().flow_table);
        assert!(c.describe().contains("flow-table off"), "{}", c.describe());
        let c = Config::parse(&svc("gue:7000", "10.0.0.100:80/tcp", "flow_table = \"on\"")).unwrap();
        assert_eq!(c.services[0].flow_table, FlowTable::On);
        assert_eq!(Config::parse(&svc("ipip", "10.0.0.100:80/tcp", "")).unwrap().services[0].flow_table, FlowTable::On, "default on");
        // The key is on line 9 of each of these.
        for (mode, vip, want) in [
            ("ipip", "10.0.0.100:80/tcp", "flow_table = \"off\" needs mode gue (this service is ipip)"),
            ("dsr-l2", "10.0.0.100:80/tcp", "needs mode gue (this service is dsr-l2)"),
            ("gue", "10.0.0.100:53/udp", "applies to TCP services only"),
        ] {
            let e = Config::parse(&svc(mode, vip, "flow_table = \"off\"")).unwrap_err();
            assert!(e.0.iter().any(|l| l.starts_with("line 9: service \"web\": ") && l.contains(want)), "{mode} {vip}: {e}");
        }
        let e = Config::parse(&svc("gue", "10.0.0.100:80/tcp", "flow_table = \"none\"")).unwrap_err().to_string();
        assert!(e.starts_with("line 9: ") && e.contains("flow_table") && e.contains("off"), "{e}");
        let e = Config::parse(&svc("gue", "10.0.0.100:80/tcp", "flow_table = false")).unwrap_err().to_string();
        assert!(e.starts_with("line 9: ") && e.contains("flow_table"), "{e}");
        // The same refusal from the CLI and peer sync.
        let ipip_off = ServiceDef { flow_table: FlowTable::Off, ..def("10.0.0.100:80/tcp", &["10.0.1.1"]) };
        let (file, cli, sync) = refusals(HEAD, &[ipip_off]);
        for e in [file, cli, sync] {
            assert!(e.contains("needs mode gue"), "{e}");
        }
        // Written only when off: older readers see every default service unchanged.
        let gue = ServiceDef { mode: Mode::Gue { port: 6080 }, ..def("10.0.0.100:80/tcp", &["10.0.1.1"]) };
        assert!(!serde_json::to_string(&gue).unwrap().contains("flow_table"));
        let off = ServiceDef { flow_table: FlowTable::Off, ..gue };
        let j = serde_json::to_string(&off).unwrap();
        assert!(j.contains(r#""flow_table":"off""#), "{j}");
        assert_eq!(serde_json::from_str::<ServiceDef>(&j).unwrap(), off);
        assert_eq!(Config::parse(&toml_of(HEAD, std::slice::from_ref(&off))).unwrap().services, vec![off]);
    }
}

