//! `lb-bench datapath`: ns/packet of the balancer under BPF_PROG_TEST_RUN beside a
//! trivial parse-and-swap XDP program. Run through `cargo xtask bench datapath` (root).
//!
//! Every case and the baseline run behind the same `bench_harness` (restores the frame
//! before every iteration, tail-calls the program), so the ratio compares like with
//! like; the harness alone is printed, never subtracted. This VM switches between a
//! fast and a slow state every few seconds, so each case is interleaved with its
//! baseline round by round (cases in rotated order, case and baseline in alternating
//! order), and a line reports the medians of the case's ns, the baseline's ns and the
//! same-round ratios, with the ratios' min and max. Counters prove every iteration took
//! the intended path.
//!
//! GUE lines (issue 15): `gue` (an established flow of a gue service), `gue_newflow`
//! (a new 5-tuple per packet into the full flow table, as `newflow`), `gue_stateless`
//! (the same on a `flow_table = "off"` service: VIP_F_NO_FLOW_TABLE, no flow-table
//! lookup or insert) and `gue_stateless_est` (one flow of that service: the same path,
//! every packet).
//!
//! `lb-bench decap`: `lb_decap` behind the same harness, in a namespace of its own
//! (`g5x-dc`) holding a listener on the VIP and a connection to it: plain IPIP
//! decapsulation against GUE whose SYN finds the listener (`bpf_skc_lookup_tcp`), GUE
//! whose ACK finds its connection, and GUE whose SYN finds no listener and is sent on
//! to its next hop (`bpf_fib_lookup`, XDP_TX); same-round ratios over the IPIP line.
//!
//! New-flow lines: `newflow` (a new 5-tuple per packet into a full flow table),
//! `newflow_flood` (the same above the new-flow limit: flood mode), `newflow_sync` (the
//! same with flow sync on and a reader thread draining FLOW_EVENTS as lbd does: timer
//! of FLOW_EVENTS_DRAIN_MS plus wakeups), `newflow_2cpu` (two CPUs inserting at once;
//! its slowdown is its ratio over `newflow`'s in the same round).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, MapData, ProgramArray, RingBuf};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{FLOW_EVENTS_DRAIN_MS, MAX_FLOWS, SETTINGS_F_FLOW_SYNC, map_names, reason};
use lb_tests::packets::{GW_MAC, L4, Tcp, from_vip, v4, v4_fragments, v4_icmp};
use lb_tests::{Datapath, XDP_PASS, XDP_TX, backend, service, settings};
use lb_userspace::{Mode, ServiceSpec};

const FRAME_LEN: usize = 128;

/// Mirror of `Template` in lb-ebpf/src/bench.rs.
#[repr(C)]
#[derive(Clone, Copy)]
struct Template {
    vary: u32,
    /// 1: the program strips headers (decap); see lb-ebpf/src/bench.rs.
    head_shrinks: u32,
    bytes: [u8; FRAME_LEN],
}
// SAFETY: repr(C) plain data.
unsafe impl aya::Pod for Template {}

fn padded(mut f: Vec<u8>) -> [u8; FRAME_LEN] {
    assert!(f.len() <= FRAME_LEN);
    f.resize(FRAME_LEN, 0);
    f.try_into().expect("128 bytes")
}

fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: plain affinity syscall on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0, "pinning to CPU {cpu}");
    }
    Ok(())
}

/// ns per iteration of one BPF_PROG_TEST_RUN of `repeat` iterations.
fn run_once(prog: &Xdp, frame: &[u8], repeat: u32, want: u32) -> anyhow::Result<f64> {
    run_once_on(prog, frame, repeat, want, None)
}

/// `run_once` as if the frame arrived on interface `ifindex` (the FIB helper needs
/// one that forwards).
fn run_once_on(prog: &Xdp, frame: &[u8], repeat: u32, want: u32, ifindex: Option<u32>) -> anyhow::Result<f64> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Option<Vec<u8>> = ifindex.map(|i| [0, frame.len() as u32, 0, i, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect());
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ctx_in: ctx.as_deref(), ..TestRunOptions::new() })
        .context("BPF_PROG_TEST_RUN")?;
    ensure!(r.return_value == want, "program returned {} (expected {want})", r.return_value);
    Ok(r.duration.as_nanos() as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// One frame, one CPU.
    Plain,
    /// Flood mode on (a limit of 1 new flow per second).
    Flood,
    /// Flow sync on, the reader thread draining.
    Sync,
    /// The same frame on two CPUs at once.
    TwoCpu,
}

struct Case {
    name: &'static str,
    frame: [u8; FRAME_LEN],
    /// Template::vary: 0 one flow, 1 a new flow per packet, 2 a new flow per two packets.
    vary: u32,
    want: u32,
    kind: Kind,
    /// (case ns, baseline ns, ratio) per round.
    samples: Vec<(f64, f64, f64)>,
}

/// The FLOW_EVENTS reader, as lbd runs it: wakes on the ring's fd or every
/// FLOW_EVENTS_DRAIN_MS, then drains everything.
fn spawn_reader(mut ring: RingBuf<MapData>, stop: Arc<AtomicBool>, read: Arc<AtomicU64>) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        pin_to(1)?;
        let fd = ring.as_raw_fd();
        while !stop.load(Ordering::Relaxed) {
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut p, 1, FLOW_EVENTS_DRAIN_MS as i32) };
            let mut n = 0;
            while let Some(item) = ring.next() {
                ensure!(item.len() == size_of::<lb_common::FlowEvent>(), "flow event of {} bytes", item.len());
                n += 1;
            }
            read.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut repeat = 200_000u32;
    let mut rounds = 9usize;
    let mut what = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--repeat" => repeat = it.next().context("--repeat N")?.parse().context("--repeat N")?,
            "--rounds" => rounds = it.next().context("--rounds N")?.parse().context("--rounds N")?,
            "datapath" => what = Some("datapath"),
            "decap" => what = Some("decap"),
            other => bail!("unknown argument {other:?} (usage: [LB_BENCH_FLOWS=N] lb-bench datapath|decap [--repeat N] [--rounds N])"),
        }
    }
    ensure!(repeat >= 2 && repeat.is_multiple_of(2) && rounds >= 1, "--repeat must be even and positive, --rounds positive");
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e).context("online CPUs")?;
    ensure!(cpus.contains(&0) && cpus.contains(&1), "the bench needs CPUs 0 and 1 online");
    match what {
        Some("datapath") => datapath(repeat, rounds),
        Some("decap") => decap(repeat, rounds),
        _ => bail!("usage: lb-bench datapath|decap [--repeat N] [--rounds N]"),
    }
}

fn datapath(repeat: u32, rounds: usize) -> anyhow::Result<()> {

    // The main thread runs every one-CPU case on CPU 0: the harness's flow counter, the
    // flood meter and the reply bucket are per CPU, and a migration would mix two CPUs'
    // caches into the figures.
    pin_to(0)?;

    let flows = std::env::var("LB_BENCH_FLOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(MAX_FLOWS);
    let mut dp = Datapath::load_with_flows(flows);
    let mut base_settings = settings("10.0.0.5", "2001:db8::5", Some(GW_MAC), 1500);
    // Measure the reply paths, not the rate limiter's drops.
    base_settings.reply_rate = u32::MAX;
    dp.control.set_settings(base_settings)?;
    let bes: Vec<_> = (1..=10).map(|i| backend(&format!("10.1.0.{i}"), 1, None)).collect();
    dp.control.add_service(service("web", "10.0.0.100:80/tcp", Mode::Ipip, 65537), bes.clone())?;
    dp.control.add_service(service("dns", "10.0.0.100:53/udp", Mode::Ipip, 65537), bes.clone())?;
    dp.control.add_service(service("gue", "10.0.0.102:80/tcp", Mode::Gue { port: lb_common::gue::DEFAULT_PORT }, 65537), bes.clone())?;
    let stateless = ServiceSpec { flow_table: false, ..service("gue_s", "10.0.0.103:80/tcp", Mode::Gue { port: lb_common::gue::DEFAULT_PORT }, 65537) };
    dp.control.add_service(stateless, bes)?;
    dp.control.add_service(service("empty", "10.0.0.101:80/tcp", Mode::Ipip, 251), vec![])?;
    let web = dp.control.service("web").context("web")?.id;
    let dns = dp.control.service("dns").context("dns")?.id;
    let gue = dp.control.service("gue").context("gue")?.id;
    let gue_s = dp.control.service("gue_s").context("gue_s")?.id;
    let ring = RingBuf::try_from(dp.ebpf.take_map(map_names::FLOW_EVENTS).context("FLOW_EVENTS")?)?;
    let sync_lost = || -> anyhow::Result<u64> {
        let m = dp.ebpf.map(map_names::SYNC_STATS).context("SYNC_STATS")?;
        let a: aya::maps::PerCpuArray<&MapData, u64> = aya::maps::PerCpuArray::try_from(m)?;
        Ok(a.get(&0, 0)?.iter().sum())
    };

    let mut bench = aya::Ebpf::load(lb_userspace::objects::BENCH).context("loading bench object")?;
    for name in ["bench_harness", "bench_noop", "bench_trivial"] {
        let p: &mut Xdp = bench.program_mut(name).context(name)?.try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    let mut templates: Array<_, Template> = Array::try_from(bench.take_map("TEMPLATE").context("TEMPLATE")?)?;
    let mut progs = ProgramArray::try_from(bench.take_map("PROGS").context("PROGS")?)?;
    let harness: &Xdp = bench.program("bench_harness").context("harness")?.try_into()?;
    let noop: &Xdp = bench.program("bench_noop").context("noop")?.try_into()?;
    let trivial: &Xdp = bench.program("bench_trivial").context("trivial")?.try_into()?;
    // Borrows dp.ebpf only, so dp.control stays writable.
    let lb: &Xdp = dp.ebpf.program(lb_common::prog_names::BALANCER).context("lb_xdp")?.try_into()?;

    let syn = padded(v4("192.0.2.10", "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b""));
    let ack = padded(v4("192.0.2.10", "10.0.0.100", L4::Tcp(40001, 80, Tcp::Ack), b""));
    let udp = padded(v4("192.0.2.10", "10.0.0.100", L4::Udp(40002, 53), b""));
    let gue_ack = padded(v4("192.0.2.10", "10.0.0.102", L4::Tcp(40006, 80, Tcp::Ack), b""));
    let gue_syn = padded(v4("192.0.2.10", "10.0.0.102", L4::Tcp(40007, 80, Tcp::Syn), b""));
    let gue_s_syn = padded(v4("192.0.2.10", "10.0.0.103", L4::Tcp(40008, 80, Tcp::Syn), b""));
    let gue_s_ack = padded(v4("192.0.2.10", "10.0.0.103", L4::Tcp(40009, 80, Tcp::Ack), b""));
    let other = padded(v4("192.0.2.10", "10.0.0.200", L4::Tcp(40003, 80, Tcp::Ack), b""));
    // ICMP frag-needed about the established flow (40001), quoting IP + TCP header.
    let inner = from_vip("10.0.0.100", "192.0.2.10", L4::Tcp(80, 40001, Tcp::Ack), b"");
    let ptb = padded(v4_icmp(
        "198.51.100.1",
        "10.0.0.100",
        etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }),
        &inner,
    ));
    let (first_frag, _) = v4_fragments(&v4("192.0.2.10", "10.0.0.100", L4::Udp(40004, 53), &[1u8; 48]), 32, 0x1234);
    let first_frag = padded(first_frag);
    let empty_syn = padded(v4("192.0.2.10", "10.0.0.101", L4::Tcp(40005, 80, Tcp::Syn), b""));
    let ping = padded(v4("192.0.2.10", "10.0.0.100", L4::IcmpEcho, b"ping"));

    let set = |templates: &mut Array<MapData, Template>, frame: [u8; FRAME_LEN], vary: u32| {
        templates.set(0, Template { vary, head_shrinks: 0, bytes: frame }, 0)
    };

    progs.set(0, lb.fd()?, 0)?;
    // A full flow table: each CPU's LRU list holds flows / possible CPUs entries, so
    // each CPU fills its own (CPU 1 for the two-CPU line).
    set(&mut templates, syn, 1)?;
    let fill = |cpu: usize| -> anyhow::Result<()> {
        pin_to(cpu)?;
        let mut left = flows as u64 + 1000;
        while left > 0 {
            let n = left.min(500_000) as u32;
            run_once(harness, &syn, n, XDP_TX)?;
            left -= n as u64;
        }
        Ok(())
    };
    std::thread::scope(|s| s.spawn(|| fill(1)).join().expect("fill thread"))?;
    fill(0)?;

    let mut cases = vec![
        Case { name: "established", frame: ack, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "udp", frame: udp, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "gue", frame: gue_ack, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "gue_newflow", frame: gue_syn, vary: 1, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "gue_stateless", frame: gue_s_syn, vary: 1, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "gue_stateless_est", frame: gue_s_ack, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "pass", frame: other, vary: 0, want: XDP_PASS, kind: Kind::Plain, samples: vec![] },
        Case { name: "newflow", frame: syn, vary: 1, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "newflow_flood", frame: syn, vary: 1, want: XDP_TX, kind: Kind::Flood, samples: vec![] },
        Case { name: "newflow_sync", frame: syn, vary: 1, want: XDP_TX, kind: Kind::Sync, samples: vec![] },
        Case { name: "newflow_pair", frame: ack, vary: 2, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "newflow_pair_sync", frame: ack, vary: 2, want: XDP_TX, kind: Kind::Sync, samples: vec![] },
        Case { name: "newflow_2cpu", frame: syn, vary: 1, want: XDP_TX, kind: Kind::TwoCpu, samples: vec![] },
        Case { name: "icmp_ptb", frame: ptb, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "fragment", frame: first_frag, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "rst", frame: empty_syn, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
        Case { name: "echo", frame: ping, vary: 0, want: XDP_TX, kind: Kind::Plain, samples: vec![] },
    ];
    let mut harness_ns = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let reader = spawn_reader(ring, stop.clone(), read.clone());
    let lost_before = sync_lost()?;
    let mut sync_iterations = 0u64;

    let two_cpu = |frame: [u8; FRAME_LEN], want: u32| -> anyhow::Result<f64> {
        let barrier = Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| -> anyhow::Result<f64> {
                pin_to(1)?;
                barrier.wait();
                run_once(harness, &frame, repeat, want)
            });
            barrier.wait();
            let a = run_once(harness, &frame, repeat, want);
            (a, other.join().expect("CPU 1 thread"))
        });
        Ok((a? + b?) / 2.0)
    };

    for round in 0..rounds {
        let n = cases.len();
        for k in 0..n {
            let c = &mut cases[(k + round) % n];
            let mut s = base_settings;
            match c.kind {
                Kind::Flood => s.max_new_flows = 1,
                Kind::Sync => s.flags |= SETTINGS_F_FLOW_SYNC,
                _ => {}
            }
            dp.control.set_settings(s)?;
            if c.vary == 0 {
                // The established flows exist before timing (the new-flow cases of the
                // same run may have evicted them from the LRU); every timed iteration
                // must then hit them.
                progs.set(0, lb.fd()?, 0)?;
                set(&mut templates, c.frame, 0)?;
                run_once(harness, &c.frame, 1, c.want)?;
            }
            let total = repeat as u64 * if c.kind == Kind::TwoCpu { 2 } else { 1 };
            let before_web = dp.stats.service(web)?;
            let before_dns = dp.stats.service(dns)?;
            let before_gue = dp.stats.service(gue)?;
            let before_gue_s = dp.stats.service(gue_s)?;
            let before_reasons = dp.stats.reasons()?;
            let mut case_ns = 0.0;
            let mut base_ns = 0.0;
            // Alternate which of the pair runs first, so drift within a round cancels.
            for first in [round % 2 == 0, round % 2 != 0] {
                if first {
                    progs.set(0, lb.fd()?, 0)?;
                    set(&mut templates, c.frame, c.vary)?;
                    case_ns = if c.kind == Kind::TwoCpu { two_cpu(c.frame, c.want)? } else { run_once(harness, &c.frame, repeat, c.want)? };
                } else {
                    progs.set(0, trivial.fd()?, 0)?;
                    set(&mut templates, ack, c.vary)?;
                    base_ns = if c.kind == Kind::TwoCpu { two_cpu(ack, XDP_TX)? } else { run_once(harness, &ack, repeat, XDP_TX)? };
                }
            }
            // What the iterations did, from the counters.
            let web_d = dp.stats.service(web)?;
            let dns_d = dp.stats.service(dns)?;
            let gue_d = dp.stats.service(gue)?;
            let gue_s_d = dp.stats.service(gue_s)?;
            let reasons = dp.stats.reasons()?;
            let rd = |r: u32| reasons[r as usize].packets - before_reasons[r as usize].packets;
            let new_flows = web_d.new_flows - before_web.new_flows;
            match c.name {
                "established" => ensure!(web_d.packets - before_web.packets == total && new_flows == 0, "established: {} packets, {new_flows} new flows for {total}", web_d.packets - before_web.packets),
                "udp" => ensure!(dns_d.packets - before_dns.packets == total && dns_d.new_flows == before_dns.new_flows, "udp: {} packets for {total}", dns_d.packets - before_dns.packets),
                "gue" => ensure!(gue_d.packets - before_gue.packets == total && gue_d.new_flows == before_gue.new_flows, "gue: {} packets for {total}", gue_d.packets - before_gue.packets),
                "gue_newflow" => ensure!(
                    gue_d.packets - before_gue.packets == total && gue_d.new_flows - before_gue.new_flows == total,
                    "gue_newflow: {} packets, {} new flows for {total}",
                    gue_d.packets - before_gue.packets,
                    gue_d.new_flows - before_gue.new_flows
                ),
                // Nothing recorded: every packet took its pair from the table.
                "gue_stateless" | "gue_stateless_est" => ensure!(
                    gue_s_d.packets - before_gue_s.packets == total && gue_s_d.new_flows == before_gue_s.new_flows,
                    "{}: {} packets, {} new flows for {total}",
                    c.name,
                    gue_s_d.packets - before_gue_s.packets,
                    gue_s_d.new_flows - before_gue_s.new_flows
                ),
                "pass" => ensure!(rd(reason::PASS_NOT_VIP) == total, "pass: {} counted for {total}", rd(reason::PASS_NOT_VIP)),
                "newflow" | "newflow_2cpu" => ensure!(new_flows == total, "{}: {new_flows} new flows for {total}", c.name),
                // Reported on their second packet: a flow of one packet never is.
                "newflow_sync" => ensure!(new_flows == total, "newflow_sync: {new_flows} new flows for {total}"),
                "newflow_pair" => ensure!(new_flows == total / 2, "{}: {new_flows} new flows for {total} packets", c.name),
                "newflow_pair_sync" => {
                    ensure!(new_flows == total / 2, "{}: {new_flows} new flows for {total} packets", c.name);
                    sync_iterations += total / 2;
                }
                // One flow per second per CPU is recorded; every other one is steered unrecorded.
                "newflow_flood" => ensure!(
                    rd(reason::FWD_FLOOD_UNRECORDED) + new_flows == total && new_flows <= 10,
                    "newflow_flood: {} unrecorded + {new_flows} recorded for {total}",
                    rd(reason::FWD_FLOOD_UNRECORDED)
                ),
                "icmp_ptb" => ensure!(rd(reason::FWD_ICMP_ERROR) == total, "icmp_ptb: {}", rd(reason::FWD_ICMP_ERROR)),
                "fragment" => ensure!(rd(reason::FWD_FRAGMENT) == total, "fragment: {}", rd(reason::FWD_FRAGMENT)),
                "rst" => ensure!(rd(reason::TX_RST) == total, "rst: {}", rd(reason::TX_RST)),
                "echo" => ensure!(rd(reason::TX_ECHO_REPLY) == total, "echo: {}", rd(reason::TX_ECHO_REPLY)),
                other => bail!("no check for {other}"),
            }
            c.samples.push((case_ns, base_ns, case_ns / base_ns));
        }
        // The harness alone, once per round.
        progs.set(0, noop.fd()?, 0)?;
        set(&mut templates, ack, 0)?;
        harness_ns.push(run_once(harness, &ack, repeat, XDP_PASS)?);
    }
    dp.control.set_settings(base_settings)?;
    // Let the reader drain what is left, then stop it.
    std::thread::sleep(std::time::Duration::from_millis(5 * FLOW_EVENTS_DRAIN_MS));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader thread")?;
    let lost = sync_lost()? - lost_before;
    let events = read.load(Ordering::Relaxed);

    let ratio_of = |name: &str| -> Vec<f64> { cases.iter().find(|c| c.name == name).expect("case").samples.iter().map(|s| s.2).collect() };
    for c in &cases {
        let ns: Vec<f64> = c.samples.iter().map(|s| s.0).collect();
        let base: Vec<f64> = c.samples.iter().map(|s| s.1).collect();
        let ratios: Vec<f64> = c.samples.iter().map(|s| s.2).collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        let mut extra = String::new();
        match c.name {
            "newflow_2cpu" => {
                // Same-round slowdown against one CPU: the two-CPU ratio over newflow's.
                let one = ratio_of("newflow");
                let slow: Vec<f64> = ratios.iter().zip(&one).map(|(a, b)| a / b).collect();
                extra = format!(
                    " slowdown_vs_1cpu={:.3} (min {:.3} max {:.3}; ns over newflow's ns {:.3})",
                    median(&slow),
                    slow.iter().copied().fold(f64::INFINITY, f64::min),
                    slow.iter().copied().fold(0.0, f64::max),
                    median(&ns) / median(&cases.iter().find(|c| c.name == "newflow").expect("newflow").samples.iter().map(|s| s.0).collect::<Vec<_>>())
                );
            }
            "newflow_sync" | "newflow_pair_sync" => {
                // Same-round difference, each side scaled by its own baseline.
                let plain = if c.name == "newflow_sync" { "newflow" } else { "newflow_pair" };
                let one = &cases.iter().find(|x| x.name == plain).expect("plain case").samples;
                let diff: Vec<f64> = c.samples.iter().zip(one).map(|(s, n)| s.0 / s.1 * n.1 - n.0).collect();
                extra = format!(" minus_{plain}_ns={:.1}", median(&diff));
                if c.name == "newflow_pair_sync" {
                    extra += &format!(" (per synced flow: {:.1} ns) events={events} lost={lost} of {sync_iterations} flows", 2.0 * median(&diff));
                }
            }
            "newflow_flood" | "gue" => {
                let est = ratio_of("established");
                let rel: Vec<f64> = ratios.iter().zip(&est).map(|(a, b)| a / b).collect();
                extra = format!(" over_established_ratio={:.2}", median(&rel));
            }
            // Same-round ratios against the lines each is the alternative to.
            "gue_newflow" | "gue_stateless" | "gue_stateless_est" => {
                let over = |name: &str| -> f64 {
                    let other = ratio_of(name);
                    median(&ratios.iter().zip(&other).map(|(a, b)| a / b).collect::<Vec<_>>())
                };
                extra = match c.name {
                    "gue_newflow" => format!(" over_newflow_ratio={:.2} over_gue_ratio={:.2}", over("newflow"), over("gue")),
                    "gue_stateless" => format!(" over_gue_newflow_ratio={:.2} over_gue_ratio={:.2}", over("gue_newflow"), over("gue")),
                    _ => format!(" over_gue_ratio={:.2}", over("gue")),
                };
            }
            _ => {}
        }
        println!(
            "datapath {} ns={:.1} baseline_ns={:.1} ratio={:.2} min={:.2} max={:.2}{extra}",
            c.name,
            median(&ns),
            median(&base),
            median(&ratios),
            min,
            max
        );
    }
    println!(
        "datapath harness ns={:.1} (frame restore + tail call; included in every line and its baseline, not subtracted); repeat={repeat} rounds={rounds}, medians over rounds",
        median(&harness_ns)
    );
    ensure!(events + lost == sync_iterations, "flow events: {events} read + {lost} lost != {sync_iterations} new flows");
    Ok(())
}

/// The decap bench's namespace (`g5x-dc`), removed on drop, also after a failure.
struct DecapNs;

const DECAP_NS: &str = "g5x-dc";

impl DecapNs {
    fn ip(args: &[&str]) -> anyhow::Result<()> {
        let st = std::process::Command::new("ip").args(["-n", DECAP_NS]).args(args).status().context("running ip")?;
        ensure!(st.success(), "ip -n {DECAP_NS} {args:?}: {st}");
        Ok(())
    }

    /// A veth pair (`g5x-dca` forwarding, the next hop a permanent neighbour on it) and
    /// the VIP on lo.
    fn new() -> anyhow::Result<DecapNs> {
        // A crashed run's namespace (usually none: the error is not shown).
        let _ = std::process::Command::new("ip").args(["netns", "del", DECAP_NS]).stderr(std::process::Stdio::null()).status();
        let st = std::process::Command::new("ip").args(["netns", "add", DECAP_NS]).status().context("ip netns add")?;
        ensure!(st.success(), "ip netns add {DECAP_NS}: {st}");
        let ns = DecapNs;
        Self::ip(&["link", "set", "lo", "up"])?;
        Self::ip(&["link", "add", "g5x-dca", "address", "02:00:00:00:10:01", "type", "veth", "peer", "name", "g5x-dcb"])?;
        Self::ip(&["link", "set", "g5x-dca", "up"])?;
        Self::ip(&["link", "set", "g5x-dcb", "up"])?;
        Self::ip(&["addr", "add", &format!("{DECAP_ME}/24"), "dev", "g5x-dca"])?;
        Self::ip(&["neigh", "add", DECAP_NEXT, "lladdr", "02:00:00:00:10:02", "dev", "g5x-dca", "nud", "permanent"])?;
        Self::ip(&["addr", "add", &format!("{DECAP_VIP}/32"), "dev", "lo"])?;
        lb_tests::netns::sysctl(DECAP_NS, "net.ipv4.conf.g5x-dca.forwarding", "1").context("forwarding on g5x-dca")?;
        Ok(ns)
    }
}

impl Drop for DecapNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", DECAP_NS]).status();
    }
}

const DECAP_LB: &str = "10.0.0.5";
const DECAP_ME: &str = "10.1.10.1";
const DECAP_NEXT: &str = "10.1.10.2";
const DECAP_VIP: &str = "10.0.0.110";

/// A GUE frame from the balancer with one hop (as lbd sends it), carrying `inner`.
fn gue_one_hop(inner: &[u8]) -> Vec<u8> {
    let mut list = vec![lb_common::gue::HOPS_VERSION, 1, 0, 0];
    list.extend_from_slice(&lb_common::addr_bytes(DECAP_NEXT.parse().expect("address")));
    lb_tests::packets::gue_frame(DECAP_LB, DECAP_ME, lb_common::gue::DEFAULT_PORT, [5, 4, 0, 0], &list, inner)
}

/// (name, frame, expected action, counted reason, ingress interface).
type DecapCase = (&'static str, [u8; FRAME_LEN], u32, u32, Option<u32>);

/// `lb-bench decap`: see the module doc.
fn decap(repeat: u32, rounds: usize) -> anyhow::Result<()> {
    use lb_common::decap_reason as dr;
    let _ns = DecapNs::new()?;
    pin_to(0)?;
    // This thread only: sockets, the test runs' loopback and the FIB lookups are the
    // namespace's from here on.
    lb_tests::netns::enter_ns(DECAP_NS).context("entering the bench namespace")?;
    let name = std::ffi::CString::new("g5x-dca")?;
    // SAFETY: a NUL-terminated name; the lookup uses this thread's namespace.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "g5x-dca's index");
    let listener = std::net::TcpListener::bind((DECAP_VIP, 80)).context("listening on the VIP")?;
    let client = std::net::TcpStream::connect((DECAP_VIP, 80)).context("connecting to the VIP")?;
    let (_server, _) = listener.accept()?;
    let held = client.local_addr()?;

    let mut decap = lb_tests::Decap::load();
    decap.allow(&[DECAP_LB]);
    decap.local(&[DECAP_ME]);
    decap.gue_ports(&[lb_common::gue::DEFAULT_PORT]);
    let mut bench = aya::Ebpf::load(lb_userspace::objects::BENCH).context("loading bench object")?;
    for name in ["bench_harness", "bench_trivial"] {
        let p: &mut Xdp = bench.program_mut(name).context(name)?.try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    let mut templates: Array<_, Template> = Array::try_from(bench.take_map("TEMPLATE").context("TEMPLATE")?)?;
    let mut progs = ProgramArray::try_from(bench.take_map("PROGS").context("PROGS")?)?;
    let harness: &Xdp = bench.program("bench_harness").context("harness")?.try_into()?;
    let trivial: &Xdp = bench.program("bench_trivial").context("trivial")?.try_into()?;
    let prog: &Xdp = decap.ebpf.program(lb_common::prog_names::DECAP).context("lb_decap")?.try_into()?;

    let tcp = |src: &str, sport: u16, dport: u16, t: Tcp| v4(src, DECAP_VIP, L4::Tcp(sport, dport, t), b"")[14..].to_vec();
    let syn_listen = tcp("192.0.2.10", 40001, 80, Tcp::Syn);
    let ack_held = tcp(&held.ip().to_string(), held.port(), 80, Tcp::Ack);
    let syn_free = tcp("192.0.2.10", 40000, 8081, Tcp::Syn);
    let baseline = padded(v4("192.0.2.10", "10.0.0.100", L4::Tcp(40001, 80, Tcp::Ack), b""));
    let cases: Vec<DecapCase> = vec![
        ("decap_ipip", padded(lb_tests::packets::ipip_frame(DECAP_LB, DECAP_ME, &syn_listen)), XDP_PASS, dr::DECAPSULATED, None),
        ("decap_gue_syn", padded(gue_one_hop(&syn_listen)), XDP_PASS, dr::DECAPSULATED_GUE, None),
        ("decap_gue_ack", padded(gue_one_hop(&ack_held)), XDP_PASS, dr::DECAPSULATED_GUE, None),
        ("decap_gue_second_chance", padded(gue_one_hop(&syn_free)), XDP_TX, dr::SECOND_CHANCE_SYN, Some(ifindex)),
    ];
    // (case ns, baseline ns, ratio) per round, per case.
    let mut samples: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let (name, frame, want, reason, ifindex) = cases[i];
            let before = decap.counts();
            let (mut case_ns, mut base_ns) = (0.0, 0.0);
            for first in [round % 2 == 0, round % 2 != 0] {
                if first {
                    progs.set(0, prog.fd()?, 0)?;
                    templates.set(0, Template { vary: 0, head_shrinks: 1, bytes: frame }, 0)?;
                    case_ns = run_once_on(harness, &frame, repeat, want, ifindex).with_context(|| name.to_string())?;
                } else {
                    progs.set(0, trivial.fd()?, 0)?;
                    templates.set(0, Template { vary: 0, head_shrinks: 0, bytes: baseline }, 0)?;
                    base_ns = run_once(harness, &baseline, repeat, XDP_TX)?;
                }
            }
            // Every iteration took the intended branch, and only it.
            let after = decap.counts();
            let deltas: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            let mut want_deltas = vec![0u64; deltas.len()];
            want_deltas[reason as usize] = repeat as u64;
            ensure!(deltas == want_deltas, "{name}: decap counters moved by {deltas:?}, want {want_deltas:?}");
            samples[i].push((case_ns, base_ns, case_ns / base_ns));
        }
    }
    let ipip: Vec<f64> = samples[0].iter().map(|s| s.2).collect();
    for ((name, ..), s) in cases.iter().zip(&samples) {
        let ns: Vec<f64> = s.iter().map(|x| x.0).collect();
        let base: Vec<f64> = s.iter().map(|x| x.1).collect();
        let ratios: Vec<f64> = s.iter().map(|x| x.2).collect();
        let over: Vec<f64> = ratios.iter().zip(&ipip).map(|(a, b)| a / b).collect();
        println!(
            "decap {name} ns={:.1} baseline_ns={:.1} ratio={:.2} min={:.2} max={:.2} over_ipip_ratio={:.2} (min {:.2} max {:.2})",
            median(&ns),
            median(&base),
            median(&ratios),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
            median(&over),
            over.iter().copied().fold(f64::INFINITY, f64::min),
            over.iter().copied().fold(0.0, f64::max)
        );
    }
    println!("decap: repeat={repeat} rounds={rounds}, medians over rounds; baseline = bench_trivial behind the same harness");
    Ok(())
}
