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
use lb_userspace::Mode;

const FRAME_LEN: usize = 128;

/// Mirror of `Template` in lb-ebpf/src/bench.rs.
#[repr(C)]
#[derive(Clone, Copy)]
struct Template {
    vary: u32,
    _pad: u32,
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
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() }).context("BPF_PROG_TEST_RUN")?;
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
            other => bail!("unknown argument {other:?} (usage: [LB_BENCH_FLOWS=N] lb-bench datapath [--repeat N] [--rounds N])"),
        }
    }
    ensure!(what == Some("datapath"), "usage: lb-bench datapath [--repeat N] [--rounds N]");
    ensure!(repeat >= 2 && repeat.is_multiple_of(2) && rounds >= 1, "--repeat must be even and positive, --rounds positive");
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e).context("online CPUs")?;
    ensure!(cpus.contains(&0) && cpus.contains(&1), "the bench needs CPUs 0 and 1 online");

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
    dp.control.add_service(service("gue", "10.0.0.102:80/tcp", Mode::Gue { port: lb_common::gue::DEFAULT_PORT }, 65537), bes)?;
    dp.control.add_service(service("empty", "10.0.0.101:80/tcp", Mode::Ipip, 251), vec![])?;
    let web = dp.control.service("web").context("web")?.id;
    let dns = dp.control.service("dns").context("dns")?.id;
    let gue = dp.control.service("gue").context("gue")?.id;
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
        templates.set(0, Template { vary, _pad: 0, bytes: frame }, 0)
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
            let reasons = dp.stats.reasons()?;
            let rd = |r: u32| reasons[r as usize].packets - before_reasons[r as usize].packets;
            let new_flows = web_d.new_flows - before_web.new_flows;
            match c.name {
                "established" => ensure!(web_d.packets - before_web.packets == total && new_flows == 0, "established: {} packets, {new_flows} new flows for {total}", web_d.packets - before_web.packets),
                "udp" => ensure!(dns_d.packets - before_dns.packets == total && dns_d.new_flows == before_dns.new_flows, "udp: {} packets for {total}", dns_d.packets - before_dns.packets),
                "gue" => ensure!(gue_d.packets - before_gue.packets == total && gue_d.new_flows == before_gue.new_flows, "gue: {} packets for {total}", gue_d.packets - before_gue.packets),
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
