//! Test support: the datapath under `BPF_PROG_TEST_RUN` (root), frame builders
//! (etherparse), and a fixture-table runner in the style of Katran's
//! `katran/lib/testing/fixtures/`: (name, input frame, expected action, expected output
//! frame, expected counter deltas). Adding a case is one table row.

pub mod netns;
pub mod packets;
pub mod pair;
pub mod lbd;
pub mod lab;
pub mod flood;
pub mod backend_down;
pub mod bgp;
pub mod lab_bgp;

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{FlowKey, FlowValue, MAX_FLOWS, Settings, map_names, prog_names, reason};
use lb_userspace::stats::Stats;
use lb_userspace::{AyaMaps, BackendSpec, ControlPlane, Mode, ServiceSpec};

pub use aya::programs::xdp::XdpError;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub fn action_name(a: u32) -> &'static str {
    ["XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT"].get(a as usize).copied().unwrap_or("?")
}

/// Panics with a clear message unless we are root (BPF_PROG_TEST_RUN needs it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "datapath tests load BPF programs: run them as root (cargo xtask test)");
}

/// Output buffer: input plus room for the outer header we add.
const OUT_ROOM: usize = 256;

/// The balancer loaded from the embedded object, with its maps driven by the real
/// control plane.
pub struct Datapath {
    pub ebpf: aya::Ebpf,
    pub control: ControlPlane<AyaMaps>,
    pub stats: Stats,
    pub flows: BpfHashMap<MapData, FlowKey, FlowValue>,
}

impl Datapath {
    /// Loads the balancer with a small flow table (tests do not need a million entries).
    pub fn load() -> Self {
        Self::load_with_flows(65536)
    }

    pub fn load_with_flows(flows: u32) -> Self {
        require_root();
        assert!(flows <= MAX_FLOWS);
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(map_names::FLOWS, flows)
            .load(lb_userspace::objects::BALANCER)
            .expect("load balancer object");
        let prog: &mut Xdp = ebpf.program_mut(prog_names::BALANCER).expect("lb_xdp").try_into().expect("xdp");
        prog.load().expect("verifier accepts lb_xdp");
        let maps = AyaMaps::from_ebpf(&mut ebpf).expect("maps");
        let stats = Stats::from_ebpf(&mut ebpf).expect("stats maps");
        let flows = match ebpf.take_map(map_names::FLOWS) {
            Some(Map::LruHashMap(m)) => BpfHashMap::try_from(Map::LruHashMap(m)).expect("FLOWS"),
            _ => panic!("FLOWS is not an LRU hash"),
        };
        Self { ebpf, control: ControlPlane::new(maps), stats, flows }
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(prog_names::BALANCER).expect("lb_xdp").try_into().expect("xdp")
    }

    /// Runs one frame; returns (action, output frame).
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_prog(self.program(), frame)
    }

    pub fn snapshot(&self) -> Snapshot {
        let reasons = self.stats.reasons().expect("reason stats");
        let mut traffic = BTreeMap::new();
        for s in self.control.services() {
            let c = self.stats.service(s.id).expect("service stats");
            traffic.insert(Counted::ServicePackets(s.spec.name.clone()), c.packets);
            traffic.insert(Counted::ServiceNewFlows(s.spec.name.clone()), c.new_flows);
            for (b, id) in &s.backends {
                let c = self.stats.backend(*id).expect("backend stats");
                traffic.insert(Counted::BackendPackets(s.spec.name.clone(), b.addr), c.packets);
                traffic.insert(Counted::BackendNewFlows(s.spec.name.clone(), b.addr), c.new_flows);
            }
        }
        Snapshot { reasons: reasons.iter().map(|c| c.packets).collect(), traffic }
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key, 0).ok()
    }

    /// The backend the service's Maglev table holds for `key`, computed in userspace
    /// (lb_common::maglev and flow_hash), independently of the datapath.
    pub fn predict(&self, service: &str, key: &FlowKey) -> IpAddr {
        use lb_common::maglev::predict;
        let view = self.control.service(service).expect("service");
        let bes = maglev_backends(&view.backends);
        let id = predict(&bes, view.spec.table_size, key).expect("maglev table");
        view.backends.iter().find(|(_, i)| *i == id).expect("backend of the table").0.addr
    }

    /// The (primary, secondary) pair of the service's table for `key`, computed in
    /// userspace (lb_common::maglev::predict_pair) from its backends and the set
    /// `before` its open change window (none for a service not changed since created).
    pub fn predict_pair(&self, service: &str, before: &[IpAddr], key: &FlowKey) -> (IpAddr, Option<IpAddr>) {
        use lb_common::maglev::predict_pair;
        let view = self.control.service(service).expect("service");
        let bes = maglev_backends(&view.backends);
        let before: Vec<_> = bes.iter().copied().filter(|b| before.iter().any(|a| lb_common::addr_bytes(*a) == b.addr)).collect();
        let e = predict_pair(&bes, &before, view.spec.table_size, key).expect("maglev table");
        let addr = |id: u32| view.backends.iter().find(|(_, i)| *i == id).map(|b| b.0.addr);
        (addr(e.primary).expect("primary of the table"), addr(e.secondary))
    }
}

/// Runs `frame` through `prog` once with BPF_PROG_TEST_RUN.
pub fn run_prog(prog: &Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + OUT_ROOM];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Runs `frame` through `prog` once as if it arrived on interface `ifindex` (of the
/// calling thread's network namespace): socket and FIB lookups see that namespace.
pub fn run_prog_on(prog: &Xdp, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + OUT_ROOM];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The decap program loaded from the embedded object (not attached).
pub struct Decap {
    pub ebpf: aya::Ebpf,
}

impl Decap {
    pub fn load() -> Self {
        require_root();
        let mut ebpf = aya::Ebpf::load(lb_userspace::objects::DECAP).expect("load decap object");
        let prog: &mut Xdp = ebpf.program_mut(prog_names::DECAP).expect("lb_decap").try_into().expect("xdp");
        prog.load().expect("verifier accepts lb_decap");
        Self { ebpf }
    }

    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program(prog_names::DECAP).expect("lb_decap").try_into().expect("xdp");
        run_prog(prog, frame)
    }

    /// `run` as if the frame arrived on interface `ifindex`.
    pub fn run_on(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program(prog_names::DECAP).expect("lb_decap").try_into().expect("xdp");
        run_prog_on(prog, frame, ifindex)
    }

    /// Sets the UDP ports decap reads as GUE (`DECAP_GUE_PORTS`).
    pub fn gue_ports(&mut self, ports: &[u16]) {
        lb_userspace::decap::write_gue_ports(&mut self.ebpf, ports).expect("write DECAP_GUE_PORTS");
    }

    /// Sets the balancers decap accepts IPIP from (`DECAP_ALLOW`).
    pub fn allow(&mut self, addrs: &[&str]) {
        self.write_set(map_names::DECAP_ALLOW, addrs);
    }

    /// Sets "this host's addresses" (`DECAP_LOCAL`).
    pub fn local(&mut self, addrs: &[&str]) {
        self.write_set(map_names::DECAP_LOCAL, addrs);
    }

    fn write_set(&mut self, name: &str, addrs: &[&str]) {
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| a.parse().expect("address")).collect();
        let m = self.ebpf.map_mut(name).expect("decap address set");
        let mut set = lb_userspace::decap::AddrSet::try_from(m).expect("hash of addresses");
        lb_userspace::decap::write_set(&mut set, &addrs).expect("write address set");
    }

    /// Packets per decap reason, summed over CPUs.
    pub fn counts(&self) -> Vec<u64> {
        let m = self.ebpf.map(map_names::DECAP_STATS).expect("DECAP_STATS");
        let arr: aya::maps::PerCpuArray<&MapData, lb_common::Counter> = aya::maps::PerCpuArray::try_from(m).expect("per-cpu");
        (0..lb_common::decap_reason::COUNT)
            .map(|r| lb_userspace::stats::sum_counters(arr.get(&r, 0).expect("get").iter()).packets)
            .collect()
    }
}

/// A counter a fixture row can name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counted {
    Reason(u32),
    ServicePackets(String),
    ServiceNewFlows(String),
    BackendPackets(String, IpAddr),
    BackendNewFlows(String, IpAddr),
}

impl Counted {
    fn describe(&self) -> String {
        match self {
            Counted::Reason(r) => reason::NAMES[*r as usize].to_string(),
            other => format!("{other:?}"),
        }
    }
}

/// Counter values at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    reasons: Vec<u64>,
    traffic: BTreeMap<Counted, u64>,
}

impl Snapshot {
    /// Every counter that changed since `before`, with its delta.
    pub fn deltas(&self, before: &Snapshot) -> BTreeMap<Counted, u64> {
        let mut d = BTreeMap::new();
        for (i, (a, b)) in self.reasons.iter().zip(&before.reasons).enumerate() {
            if a != b {
                d.insert(Counted::Reason(i as u32), a - b);
            }
        }
        for (k, v) in &self.traffic {
            let old = before.traffic.get(k).copied().unwrap_or(0);
            if *v != old {
                d.insert(k.clone(), v - old);
            }
        }
        d
    }
}

/// What a row expects of the output frame.
pub enum Expect {
    /// Byte for byte the input (every pass and every drop).
    Unchanged,
    /// Byte for byte this frame.
    Frame(Vec<u8>),
}

/// A state change applied before a row's packet (e.g. a new backend set).
pub type Step = Box<dyn Fn(&mut Datapath)>;

pub struct Case {
    pub name: &'static str,
    pub before: Option<Step>,
    pub input: Vec<u8>,
    pub action: u32,
    pub output: Expect,
    /// Every counter that must change, with its delta; every other counter must not.
    pub counters: Vec<(Counted, u64)>,
}

/// Runs every case in order on one datapath; panics listing every failing row.
pub fn run_cases(dp: &mut Datapath, cases: Vec<Case>) {
    let mut failures = Vec::new();
    let n = cases.len();
    for c in cases {
        if let Some(step) = &c.before {
            step(dp);
        }
        let before = dp.snapshot();
        let (action, out) = dp.run(&c.input);
        let deltas = dp.snapshot().deltas(&before);
        let mut errs = Vec::new();
        if action != c.action {
            errs.push(format!("action {} (expected {})", action_name(action), action_name(c.action)));
        }
        let want = match &c.output {
            Expect::Unchanged => &c.input,
            Expect::Frame(f) => f,
        };
        if &out != want {
            errs.push(format!("output frame differs:\n      got  {}\n      want {}", hex(&out), hex(want)));
        }
        let want_counts: BTreeMap<Counted, u64> = c.counters.iter().cloned().collect();
        if deltas != want_counts {
            let fmt = |m: &BTreeMap<Counted, u64>| m.iter().map(|(k, v)| format!("{}+{v}", k.describe())).collect::<Vec<_>>().join(", ");
            errs.push(format!("counters: got [{}], want [{}]", fmt(&deltas), fmt(&want_counts)));
        }
        if errs.is_empty() {
            println!("fixture ok: {}", c.name);
        } else {
            failures.push(format!("{}:\n    {}", c.name, errs.join("\n    ")));
        }
    }
    assert!(failures.is_empty(), "{} of {n} fixture rows failed:\n{}", failures.len(), failures.join("\n"));
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Shorthands for building the fixture's services.
pub fn service(name: &str, vip: &str, mode: Mode, table_size: u32) -> ServiceSpec {
    ServiceSpec { name: name.into(), vip: vip.parse().expect("vip"), mode, table_size, flow_table: true }
}

pub fn backend(addr: &str, weight: u32, mac: Option<[u8; 6]>) -> BackendSpec {
    BackendSpec { addr: addr.parse().expect("backend address"), weight, mac }
}

pub fn settings(encap_v4: &str, encap_v6: &str, gateway: Option<[u8; 6]>, mtu: u32) -> Settings {
    let v4: std::net::Ipv4Addr = encap_v4.parse().expect("v4");
    let v6: IpAddr = encap_v6.parse().expect("v6");
    Settings {
        encap_src_v4: u32::from_ne_bytes(v4.octets()),
        encap_src_v6: lb_common::addr_words(v6),
        gateway_mac: gateway.unwrap_or_default(),
        _pad: [0; 2],
        flags: if gateway.is_some() { lb_common::SETTINGS_F_HAS_GATEWAY } else { 0 },
        mtu,
        reply_rate: 0,
        ..Settings::default()
    }
}

/// A service's backends as the Maglev builder takes them: the one input both predictors
/// (`Datapath::predict`, `Datapath::predict_pair`) compute from.
fn maglev_backends(backends: &[(lb_userspace::BackendSpec, u32)]) -> Vec<lb_common::maglev::MaglevBackend> {
    backends.iter().map(|(b, id)| lb_common::maglev::MaglevBackend { addr: lb_common::addr_bytes(b.addr), weight: b.weight, id: *id }).collect()
}
