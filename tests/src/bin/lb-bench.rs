//! `lb-bench datapath`: ns/packet of the balancer under BPF_PROG_TEST_RUN beside a
//! trivial parse-and-swap XDP program measured in the same run. Run through
//! `cargo xtask bench datapath` (root).
//!
//! Cases that rewrite the frame (encapsulation) run behind `bench_harness`, which
//! restores the frame before every iteration and tail-calls the balancer; the harness
//! alone (tail-calling a no-op) is measured too and subtracted. Counters prove every
//! iteration took the intended path.

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, ProgramArray};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{reason, MAX_FLOWS};
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

/// Median ns/iteration of `prog` over `rounds` runs of `repeat` iterations.
fn time(prog: &Xdp, frame: &[u8], repeat: u32, rounds: usize, want: u32) -> anyhow::Result<f64> {
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() }).context("BPF_PROG_TEST_RUN")?;
        ensure!(r.return_value == want, "program returned {} (expected {want})", r.return_value);
        v.push(r.duration.as_nanos() as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut repeat = 1_000_000u32;
    let mut rounds = 5usize;
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
    ensure!(repeat >= 1 && rounds >= 1, "--repeat and --rounds must be positive");

    // One CPU for the whole run: the harness's flow counter (ITER) and the reply bucket
    // are per CPU, so a migration between rounds would replay already-seen "new" flows
    // (the syn check then fails) and mix two CPUs' caches into the figures.
    // SAFETY: plain affinity syscall on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        ensure!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0, "pinning to CPU 0");
    }

    let flows = std::env::var("LB_BENCH_FLOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(MAX_FLOWS);
    let mut dp = Datapath::load_with_flows(flows);
    let mut s = settings("10.0.0.5", "2001:db8::5", Some(GW_MAC), 1500);
    // Measure the reply paths, not the rate limiter's drops.
    s.reply_rate = u32::MAX;
    dp.control.set_settings(s)?;
    let bes: Vec<_> = (1..=10).map(|i| backend(&format!("10.1.0.{i}"), 1, None)).collect();
    dp.control.add_service(service("web", "10.0.0.100:80/tcp", Mode::Ipip, 65537), bes.clone())?;
    dp.control.add_service(service("dns", "10.0.0.100:53/udp", Mode::Ipip, 65537), bes)?;
    dp.control.add_service(service("empty", "10.0.0.101:80/tcp", Mode::Ipip, 251), vec![])?;
    let web = dp.control.service("web").context("web")?.id;
    let dns = dp.control.service("dns").context("dns")?.id;

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

    let syn = padded(v4("192.0.2.10", "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b""));
    let ack = padded(v4("192.0.2.10", "10.0.0.100", L4::Tcp(40001, 80, Tcp::Ack), b""));
    let udp = padded(v4("192.0.2.10", "10.0.0.100", L4::Udp(40002, 53), b""));
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

    // Baselines.
    let trivial_ns = time(trivial, &ack, repeat, rounds, XDP_TX)?;
    templates.set(0, Template { vary: 0, _pad: 0, bytes: ack }, 0)?;
    progs.set(0, noop.fd()?, 0)?;
    let harness_ns = time(harness, &ack, repeat, rounds, XDP_PASS)?;
    progs.set(0, dp.program().fd()?, 0)?;

    let total = repeat as u64 * rounds as u64;
    let mut lines = Vec::new();
    let mut report = |case: &str, ns: f64| {
        lines.push(format!("datapath {case} ns={ns:.1} baseline_ns={trivial_ns:.1} ratio={:.2}", ns / trivial_ns));
    };

    // syn: a new flow every iteration (the harness writes a counter into the source
    // port and address), so every iteration does the Maglev pick and the LRU insert.
    templates.set(0, Template { vary: 1, _pad: 0, bytes: syn }, 0)?;
    let before = dp.stats.service(web)?;
    let ns = time(harness, &syn, repeat, rounds, XDP_TX)?;
    let after = dp.stats.service(web)?;
    ensure!(after.new_flows - before.new_flows == total, "syn: {} new flows for {total} iterations", after.new_flows - before.new_flows);
    report("syn", ns - harness_ns);

    // established: one flow, created once before timing; every iteration must hit it.
    for (case, frame, svc) in [("established", ack, web), ("udp", udp, dns)] {
        templates.set(0, Template { vary: 0, _pad: 0, bytes: frame }, 0)?;
        time(harness, &frame, 1, 1, XDP_TX)?;
        let before = dp.stats.service(svc)?;
        let ns = time(harness, &frame, repeat, rounds, XDP_TX)?;
        let after = dp.stats.service(svc)?;
        ensure!(after.packets - before.packets == total && after.new_flows == before.new_flows, "{case}: {} packets, {} new flows for {total} iterations", after.packets - before.packets, after.new_flows - before.new_flows);
        report(case, ns - harness_ns);
    }

    // The completeness paths, each proven by its own counter: ICMP error steered to the
    // flow's backend (flow-table hit), first fragment (FRAGS insert, port-less Maglev
    // pick), RST for an empty service, echo reply (VIPS walk).
    for (case, frame, r) in [
        ("icmp_ptb", ptb, reason::FWD_ICMP_ERROR),
        ("fragment", first_frag, reason::FWD_FRAGMENT),
        ("rst", empty_syn, reason::TX_RST),
        ("echo", ping, reason::TX_ECHO_REPLY),
    ] {
        templates.set(0, Template { vary: 0, _pad: 0, bytes: frame }, 0)?;
        let before = dp.stats.reason(r)?;
        let ns = time(harness, &frame, repeat, rounds, XDP_TX)?;
        let after = dp.stats.reason(r)?;
        ensure!(after.packets - before.packets == total, "{case}: {} counted for {total} iterations", after.packets - before.packets);
        report(case, ns - harness_ns);
    }

    // pass: the frame is not modified, so no harness is needed.
    let before = dp.stats.reason(reason::PASS_NOT_VIP)?;
    let ns = time(dp.program(), &other, repeat, rounds, XDP_PASS)?;
    let after = dp.stats.reason(reason::PASS_NOT_VIP)?;
    ensure!(after.packets - before.packets == total, "pass: {} counted for {total} iterations", after.packets - before.packets);
    report("pass", ns);

    for l in &lines {
        println!("{l}");
    }
    println!("datapath harness ns={harness_ns:.1} (frame restore + tail call, subtracted from every case but pass); repeat={repeat} rounds={rounds} median");
    Ok(())
}
