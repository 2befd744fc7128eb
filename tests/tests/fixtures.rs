//! Datapath fixtures: every row is (name, input frame, expected action, expected output
//! frame byte for byte, expected counter deltas), run through BPF_PROG_TEST_RUN on the
//! real balancer object with maps written by the real control plane. Run as root.

use lb_common::{decap_reason, reason};
use lb_tests::packets::*;
use lb_tests::*;
use lb_userspace::Mode;

use Counted::*;

const CLIENT: &str = "192.0.2.10";
const CLIENT6: &str = "2001:db8:c::10";
const ENCAP4: &str = "10.0.0.5";
const ENCAP6: &str = "2001:db8::5";
const BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x21];
const DSR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x41];
const DSR6_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x42];

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// Counter deltas of one forwarded packet.
fn fwd(svc: &str, be: &str, new_flow: bool) -> Vec<(Counted, u64)> {
    let mut v = vec![(ServicePackets(svc.into()), 1), (BackendPackets(svc.into(), ip(be)), 1)];
    if new_flow {
        v.push((ServiceNewFlows(svc.into()), 1));
        v.push((BackendNewFlows(svc.into(), ip(be)), 1));
    }
    v
}

fn counted(r: u32) -> Vec<(Counted, u64)> {
    vec![(Reason(r), 1)]
}

fn setup() -> Datapath {
    let mut dp = Datapath::load();
    let c = &mut dp.control;
    c.set_settings(settings(ENCAP4, ENCAP6, Some(GW_MAC), 1500)).unwrap();
    let add = |c: &mut lb_userspace::ControlPlane<_>, name, vip, mode, bes: Vec<_>| c.add_service(service(name, vip, mode, 251), bes).unwrap();
    add(c, "web4", "10.0.0.100:80/tcp", Mode::Ipip, vec![backend("10.1.0.11", 1, None)]);
    add(c, "dns4", "10.0.0.100:53/udp", Mode::Ipip, vec![backend("10.1.0.21", 1, Some(BE_MAC))]);
    add(c, "any4", "10.0.0.101:0/tcp", Mode::Ipip, vec![backend("10.1.0.31", 1, None)]);
    add(c, "web6", "[2001:db8::100]:80/tcp", Mode::Ipip, vec![backend("2001:db8:1::11", 1, None)]);
    add(c, "dsr4", "10.0.0.102:80/tcp", Mode::DsrL2, vec![backend("10.1.0.41", 1, Some(DSR_MAC))]);
    add(c, "dsr6", "[2001:db8::102]:443/tcp", Mode::DsrL2, vec![backend("2001:db8:1::41", 1, Some(DSR6_MAC))]);
    add(c, "empty", "10.0.0.103:80/tcp", Mode::Ipip, vec![]);
    add(c, "mixed", "10.0.0.104:80/tcp", Mode::Ipip, vec![backend("2001:db8:1::51", 1, None)]);
    add(c, "sticky", "10.0.0.105:80/tcp", Mode::Ipip, vec![backend("10.1.5.1", 1, None)]);
    add(c, "drained", "10.0.0.106:80/tcp", Mode::Ipip, vec![backend("10.1.6.1", 0, None), backend("10.1.6.2", 1, None)]);
    dp
}

fn row(name: &'static str, input: Vec<u8>, action: u32, output: Expect, counters: Vec<(Counted, u64)>) -> Case {
    Case { name, before: None, input, action, output, counters }
}

fn row_after(name: &'static str, step: Step, input: Vec<u8>, action: u32, output: Expect, counters: Vec<(Counted, u64)>) -> Case {
    Case { name, before: Some(step), input, action, output, counters }
}

fn ipip4(input: &[u8], backend: &str, nh: [u8; 6]) -> Expect {
    Expect::Frame(ipip_expected(input, ENCAP4, backend, nh, LB_MAC))
}

fn ipip6(input: &[u8], backend: &str, nh: [u8; 6]) -> Expect {
    Expect::Frame(ipip_expected(input, ENCAP6, backend, nh, LB_MAC))
}

#[test]
fn balancer_fixtures() {
    let mut dp = setup();
    let syn = v4(CLIENT, "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b"");
    let ack = v4(CLIENT, "10.0.0.100", L4::Tcp(40000, 80, Tcp::Ack), b"hello");
    let udp = v4(CLIENT, "10.0.0.100", L4::Udp(5353, 53), b"query");
    let any_8080 = v4(CLIENT, "10.0.0.101", L4::Tcp(40001, 8080, Tcp::Syn), b"");
    let any_443 = v4(CLIENT, "10.0.0.101", L4::Tcp(40002, 443, Tcp::Syn), b"");
    let syn6 = v6(CLIENT6, "2001:db8::100", L4::Tcp(40000, 80, Tcp::Syn), b"");
    let udp6 = v6(CLIENT6, "2001:db8::100", L4::Udp(40000, 80), b"x");
    let dsr = v4(CLIENT, "10.0.0.102", L4::Tcp(40003, 80, Tcp::Syn), b"");
    let dsr6 = v6(CLIENT6, "2001:db8::102", L4::Tcp(40004, 443, Tcp::Ack), b"data");
    let vlan_syn = vlan(&v4(CLIENT, "10.0.0.100", L4::Tcp(40005, 80, Tcp::Syn), b""), 42);
    let vlan_dsr = vlan_tpid(&v4(CLIENT, "10.0.0.102", L4::Tcp(40006, 80, Tcp::Ack), b"x"), 0x88a8, 7);
    let opts = v4_with_options(CLIENT, "10.0.0.100", 40007, 80, &[1, 1, 1, 0]); // NOP NOP NOP EOL
    let opts_long = v4_with_options(CLIENT, "10.0.0.100", 40008, 80, &[0x94, 4, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]); // router alert + pad
    let mixed = v4(CLIENT, "10.0.0.104", L4::Tcp(40009, 80, Tcp::Syn), b"");
    let rst = v4(CLIENT, "10.0.0.100", L4::Tcp(40010, 80, Tcp::Rst), b"");
    let after_rst = v4(CLIENT, "10.0.0.100", L4::Tcp(40010, 80, Tcp::Ack), b"");

    let mut truncated_ip = syn.clone();
    truncated_ip.truncate(14 + 10);
    let mut truncated_tcp = syn.clone();
    truncated_tcp.truncate(14 + 20 + 10);
    let mut truncated_udp = udp.clone();
    truncated_udp.truncate(14 + 20 + 4);
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    fix_ipv4_checksum_unchecked(&mut bad_ihl);
    let mut ihl_beyond = syn.clone();
    ihl_beyond[14] = 0x4f; // 60-byte header in a 40-byte packet
    let mut tot_len_beyond = syn.clone();
    tot_len_beyond[16..18].copy_from_slice(&1400u16.to_be_bytes());
    fix_ipv4_checksum(&mut tot_len_beyond, 14);
    let mut not_ip_version = syn.clone();
    not_ip_version[14] = 0x65;
    let mut frag = udp.clone();
    frag[20] |= 0x20; // more fragments
    fix_ipv4_checksum(&mut frag, 14);
    let mut truncated_vlan = syn[..14].to_vec();
    truncated_vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    let qinq = vlan(&vlan(&syn, 10), 20);
    let too_big = v4(CLIENT, "10.0.0.100", L4::Tcp(40011, 80, Tcp::Ack), &[0u8; 1500 - 40 - 19]);
    let fits_mtu = v4(CLIENT, "10.0.0.100", L4::Tcp(40012, 80, Tcp::Ack), &[0u8; 1500 - 40 - 20]);
    let ipip_to_vip = ipip_frame(CLIENT, "10.0.0.100", &syn[14..]);
    let ipip_to_other = ipip_frame(CLIENT, "10.9.9.9", &syn[14..]);

    let sticky_f = v4(CLIENT, "10.0.0.105", L4::Tcp(41000, 80, Tcp::Syn), b"");
    let sticky_f_ack = v4(CLIENT, "10.0.0.105", L4::Tcp(41000, 80, Tcp::Ack), b"more");
    let sticky_g = v4(CLIENT, "10.0.0.105", L4::Tcp(41001, 80, Tcp::Syn), b"");

    let cases = vec![
        row("tcp4 SYN to VIP: ipip to the only backend via the gateway", syn.clone(), XDP_TX, ipip4(&syn, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        row("tcp4 ACK of the same flow: flow-table hit, no new flow", ack.clone(), XDP_TX, ipip4(&ack, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", false)),
        row("udp4 to VIP: ipip to an on-link backend's own MAC", udp.clone(), XDP_TX, ipip4(&udp, "10.1.0.21", BE_MAC), fwd("dns4", "10.1.0.21", true)),
        row("port-0 VIP matches port 8080", any_8080.clone(), XDP_TX, ipip4(&any_8080, "10.1.0.31", GW_MAC), fwd("any4", "10.1.0.31", true)),
        row("port-0 VIP matches port 443", any_443.clone(), XDP_TX, ipip4(&any_443, "10.1.0.31", GW_MAC), fwd("any4", "10.1.0.31", true)),
        row("port-0 tcp VIP does not match udp", v4(CLIENT, "10.0.0.101", L4::Udp(1, 8080), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("tcp6 SYN to IPv6 VIP: ip6ip6", syn6.clone(), XDP_TX, ipip6(&syn6, "2001:db8:1::11", GW_MAC), fwd("web6", "2001:db8:1::11", true)),
        row("udp6 to a tcp-only IPv6 VIP: passed", udp6, XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("dsr-l2 tcp4: MACs rewritten, IP untouched", dsr.clone(), XDP_TX, Expect::Frame(dsr_expected(&dsr, DSR_MAC)), fwd("dsr4", "10.1.0.41", true)),
        row("dsr-l2 tcp6", dsr6.clone(), XDP_TX, Expect::Frame(dsr_expected(&dsr6, DSR6_MAC)), fwd("dsr6", "2001:db8:1::41", true)),
        row("802.1Q-tagged SYN: ipip keeps the tag", vlan_syn.clone(), XDP_TX, ipip4(&vlan_syn, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        row("802.1ad-tagged dsr-l2: tag kept", vlan_dsr.clone(), XDP_TX, Expect::Frame(dsr_expected(&vlan_dsr, DSR_MAC)), fwd("dsr4", "10.1.0.41", true)),
        row("IPv4 options (IHL 6): encapsulated whole", opts.clone(), XDP_TX, ipip4(&opts, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        row("IPv4 options (IHL 8, router alert)", opts_long.clone(), XDP_TX, ipip4(&opts_long, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        row("IPv4 VIP, IPv6 backend: 4in6", mixed.clone(), XDP_TX, ipip6(&mixed, "2001:db8:1::51", GW_MAC), fwd("mixed", "2001:db8:1::51", true)),
        row("RST of an unknown flow: forwarded, no flow created", rst.clone(), XDP_TX, ipip4(&rst, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", false)),
        row("ACK after that RST: still a new flow", after_rst.clone(), XDP_TX, ipip4(&after_rst, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        row("empty service: dropped, counted", v4(CLIENT, "10.0.0.103", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_DROP, Expect::Unchanged, counted(reason::DROP_NO_BACKEND)),
        row("drained backend gets no new flow", v4(CLIENT, "10.0.0.106", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_TX,
            ipip4(&v4(CLIENT, "10.0.0.106", L4::Tcp(1, 80, Tcp::Syn), b""), "10.1.6.2", GW_MAC), fwd("drained", "10.1.6.2", true)),
        row("VIP address, wrong port: passed", v4(CLIENT, "10.0.0.100", L4::Tcp(1, 81, Tcp::Syn), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("VIP address, wrong protocol (udp to tcp port)", v4(CLIENT, "10.0.0.100", L4::Udp(1, 80), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("non-VIP IPv4: passed untouched", v4(CLIENT, "10.0.0.200", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_VIP)),
        row("non-VIP IPv6: passed untouched", v6(CLIENT6, "2001:db8::200", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_VIP)),
        row("ARP: passed untouched", arp(), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_IP)),
        row("IPIP to a VIP address: passed (not tcp/udp)", ipip_to_vip, XDP_PASS, Expect::Unchanged, counted(reason::PASS_OTHER_PROTO)),
        row("IPIP to another address: passed", ipip_to_other, XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_VIP)),
        row("ICMP echo to VIP: passed, counted", v4(CLIENT, "10.0.0.100", L4::IcmpEcho, b"ping"), XDP_PASS, Expect::Unchanged, counted(reason::PASS_ICMP)),
        row("IPv4 fragment to VIP: passed, counted", frag, XDP_PASS, Expect::Unchanged, counted(reason::PASS_FRAGMENT)),
        row("IPv6 hop-by-hop header to VIP: passed, counted", with_ipv6_ext(&syn6, 0), XDP_PASS, Expect::Unchanged, counted(reason::PASS_IPV6_EXT)),
        row("IPv6 fragment header to VIP: passed, counted", with_ipv6_ext(&syn6, 44), XDP_PASS, Expect::Unchanged, counted(reason::PASS_FRAGMENT)),
        row("two VLAN tags: passed, counted", qinq, XDP_PASS, Expect::Unchanged, counted(reason::PASS_VLAN_STACKED)),
        row("truncated 802.1Q header: dropped", truncated_vlan, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("truncated IPv4 header: dropped", truncated_ip, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("truncated TCP header to VIP: dropped", truncated_tcp, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("truncated UDP header to VIP: dropped", truncated_udp, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IHL 4: dropped", bad_ihl, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IHL beyond the packet: dropped", ihl_beyond, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IPv4 total length beyond the frame: dropped", tot_len_beyond, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("EtherType IPv4 with version 6: dropped", not_ip_version, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("encapsulated packet over the MTU: dropped, counted", too_big, XDP_DROP, Expect::Unchanged, counted(reason::DROP_TOO_BIG)),
        row("encapsulated packet exactly at the MTU: forwarded", fits_mtu.clone(), XDP_TX, ipip4(&fits_mtu, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        // Stickiness: the flow keeps its backend while the set changes around it.
        row("sticky: flow F starts on 10.1.5.1", sticky_f.clone(), XDP_TX, ipip4(&sticky_f, "10.1.5.1", GW_MAC), fwd("sticky", "10.1.5.1", true)),
        row_after("sticky: 10.1.5.1 drained, 10.1.5.3 added; F stays", Box::new(|dp: &mut Datapath| {
                dp.control.set_backends("sticky", vec![backend("10.1.5.1", 0, None), backend("10.1.5.3", 1, None)]).unwrap();
            }), sticky_f_ack.clone(), XDP_TX, ipip4(&sticky_f_ack, "10.1.5.1", GW_MAC), fwd("sticky", "10.1.5.1", false)),
        row("sticky: new flow G follows the new set", sticky_g.clone(), XDP_TX, ipip4(&sticky_g, "10.1.5.3", GW_MAC), fwd("sticky", "10.1.5.3", true)),
        row_after("sticky: 10.1.5.1 removed; F re-steered to 10.1.5.3", Box::new(|dp: &mut Datapath| {
                dp.control.remove_backend("sticky", ip("10.1.5.1")).unwrap();
            }), sticky_f_ack.clone(), XDP_TX, ipip4(&sticky_f_ack, "10.1.5.3", GW_MAC), fwd("sticky", "10.1.5.3", true)),
        row_after("sticky: 10.1.5.4..7 added; F stays on 10.1.5.3", Box::new(|dp: &mut Datapath| {
                for a in ["10.1.5.4", "10.1.5.5", "10.1.5.6", "10.1.5.7"] {
                    dp.control.add_backend("sticky", backend(a, 1, None)).unwrap();
                }
            }), sticky_f_ack.clone(), XDP_TX, ipip4(&sticky_f_ack, "10.1.5.3", GW_MAC), fwd("sticky", "10.1.5.3", false)),
    ];
    assert!(cases.len() >= 25);
    run_cases(&mut dp, cases);
}

/// A frame whose IHL is too small cannot be parsed by etherparse: checksum by hand.
fn fix_ipv4_checksum_unchecked(frame: &mut [u8]) {
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = 0;
    for i in (14..34).step_by(2) {
        sum += u16::from_be_bytes([frame[i], frame[i + 1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn missing_next_hop_and_encap_source_are_counted_drops() {
    let mut dp = Datapath::load();
    // No gateway, no encap sources.
    dp.control.set_settings(settings("0.0.0.0", "::", None, 1500)).unwrap();
    dp.control.add_service(service("web", "10.0.0.100:80/tcp", Mode::Ipip, 251), vec![backend("10.1.0.11", 1, None)]).unwrap();
    dp.control.add_service(service("web2", "10.0.0.101:80/tcp", Mode::Ipip, 251), vec![backend("10.1.0.12", 1, Some(BE_MAC))]).unwrap();
    let a = v4(CLIENT, "10.0.0.100", L4::Tcp(1, 80, Tcp::Syn), b"");
    let b = v4(CLIENT, "10.0.0.101", L4::Tcp(1, 80, Tcp::Syn), b"");
    // The flow table records the pick even when forwarding fails (same backend next time).
    let drop_new = |r| vec![(Reason(r), 1)];
    run_cases(
        &mut dp,
        vec![
            row("ipip without MAC or gateway: dropped", a, XDP_DROP, Expect::Unchanged, drop_new(reason::DROP_NO_NEXTHOP)),
            row("ipip without encap source: dropped", b, XDP_DROP, Expect::Unchanged, drop_new(reason::DROP_NO_ENCAP_SOURCE)),
        ],
    );
}

#[test]
fn decap_fixtures() {
    let dp = setup();
    let decap = Decap::load();
    let syn = v4(CLIENT, "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b"payload");
    let syn6 = v6(CLIENT6, "2001:db8::100", L4::Tcp(40000, 80, Tcp::Syn), b"");
    let mixed = v4(CLIENT, "10.0.0.104", L4::Tcp(40009, 80, Tcp::Syn), b"");
    let vlan_syn = vlan(&syn, 42);

    let mut cases: Vec<(&str, Vec<u8>, u32, Vec<u8>, u32)> = Vec::new();
    // Round trip: what the balancer emits, the decap program turns back into the
    // client's packet addressed (at L2) to the backend.
    for (name, input) in [("ipip v4 round trip", &syn), ("ip6ip6 round trip", &syn6), ("4in6 round trip", &mixed), ("ipip with VLAN round trip", &vlan_syn)] {
        let (action, encapsulated) = dp.run(input);
        assert_eq!(action, XDP_TX, "{name}: balancer forwards");
        let l3_in = l3_offset(input);
        let mut want = encapsulated[..l3_in].to_vec();
        want[l3_in - 2..l3_in].copy_from_slice(&input[l3_in - 2..l3_in]);
        want.extend_from_slice(&input[l3_in..]);
        assert_eq!(want, decap_expected(&encapsulated), "{name}: helper agrees");
        cases.push((name, encapsulated, XDP_PASS, want, decap_reason::DECAPSULATED));
    }
    let plain = syn.clone();
    cases.push(("plain TCP: untouched", plain.clone(), XDP_PASS, plain, decap_reason::PASS_NOT_ENCAP));
    cases.push(("ARP: untouched", arp(), XDP_PASS, arp(), decap_reason::PASS_NOT_ENCAP));
    let short = ipip_frame("10.0.0.5", "10.1.0.11", &syn[14..24]);
    cases.push(("IPIP with a truncated inner header: dropped", short.clone(), XDP_DROP, short, decap_reason::DROP_MALFORMED));
    let mut wrong_inner = ipip_frame("10.0.0.5", "10.1.0.11", &syn[14..]);
    wrong_inner[9 + 14] = 41; // says IPv6 inside, carries IPv4
    fix_ipv4_checksum(&mut wrong_inner, 14);
    cases.push(("IPIP announcing the wrong inner family: dropped", wrong_inner.clone(), XDP_DROP, wrong_inner, decap_reason::DROP_MALFORMED));

    let mut failures = Vec::new();
    for (name, input, action, want, r) in cases {
        let before = decap.counts();
        let (got_action, out) = decap.run(&input);
        let after = decap.counts();
        let mut deltas = vec![0u64; after.len()];
        for i in 0..after.len() {
            deltas[i] = after[i] - before[i];
        }
        let mut expect = vec![0u64; after.len()];
        expect[r as usize] = 1;
        if got_action != action || out != want || deltas != expect {
            failures.push(format!("{name}: action {} out {} deltas {deltas:?} (want {} {} {expect:?})", action_name(got_action), hex(&out), action_name(action), hex(&want)));
        } else {
            println!("fixture ok: decap {name}");
        }
    }
    assert!(failures.is_empty(), "decap fixtures failed:\n{}", failures.join("\n"));
}

#[test]
fn datapath_picks_what_userspace_predicts_and_honours_weights() {
    use lb_common::maglev::{MaglevBackend, build};
    use lb_common::{FlowKey, PROTO_TCP, addr_bytes, flow_hash};
    let mut dp = Datapath::load();
    dp.control.set_settings(settings(ENCAP4, ENCAP6, Some(GW_MAC), 1500)).unwrap();
    let bes = [("10.2.0.1", 300), ("10.2.0.2", 100), ("10.2.0.3", 100)];
    dp.control
        .add_service(service("w", "10.0.0.110:80/tcp", Mode::Ipip, 65537), bes.iter().map(|(a, w)| backend(a, *w, None)).collect())
        .unwrap();
    let view = dp.control.service("w").unwrap();
    let table = build(
        &view.backends.iter().map(|(b, id)| MaglevBackend { addr: addr_bytes(b.addr), weight: b.weight, id: *id }).collect::<Vec<_>>(),
        65537,
    )
    .unwrap();
    let n = 3000u16;
    let mut per = std::collections::HashMap::<u32, u32>::new();
    for i in 0..n {
        let sport = 10000 + i;
        let f = v4("198.51.100.7", "10.0.0.110", L4::Tcp(sport, 80, Tcp::Syn), b"");
        let (action, out) = dp.run(&f);
        assert_eq!(action, XDP_TX);
        let outer_dst = std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let id = dp.control.backend_id("w", outer_dst.into()).expect("known backend");
        let key = FlowKey::new(ip("198.51.100.7"), sport, ip("10.0.0.110"), 80, PROTO_TCP);
        assert_eq!(id, table[(flow_hash(&key) % 65537) as usize], "flow {sport}: datapath and userspace Maglev agree");
        *per.entry(id).or_default() += 1;
    }
    let heavy = dp.control.backend_id("w", ip("10.2.0.1")).unwrap();
    let share = per[&heavy] as f64 / n as f64;
    assert!((0.55..0.65).contains(&share), "weight 300 of 500 should get ~60%, got {:.1}%", share * 100.0);
    for (a, _) in &bes[1..] {
        let s = per[&dp.control.backend_id("w", ip(a)).unwrap()] as f64 / n as f64;
        assert!((0.15..0.25).contains(&s), "{a}: weight 100 of 500 should get ~20%, got {:.1}%", s * 100.0);
    }
}
