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

/// Counter deltas of one forwarded fragment (never a new flow).
fn fwd_frag(svc: &str, be: &str) -> Vec<(Counted, u64)> {
    let mut v = fwd(svc, be, false);
    v.push((Reason(reason::FWD_FRAGMENT), 1));
    v
}

/// Counter deltas of one forwarded ICMP error (never a new flow).
fn fwd_icmp(svc: &str, be: &str) -> Vec<(Counted, u64)> {
    let mut v = fwd(svc, be, false);
    v.push((Reason(reason::FWD_ICMP_ERROR), 1));
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
    add(c, "empty_udp", "10.0.0.103:53/udp", Mode::Ipip, vec![]);
    add(c, "empty6", "[2001:db8::103]:80/tcp", Mode::Ipip, vec![]);
    add(c, "empty6_udp", "[2001:db8::103]:53/udp", Mode::Ipip, vec![]);
    let four = |p: &str| (1..=4).map(|i| backend(&format!("{p}{i}"), 1, None)).collect::<Vec<_>>();
    add(c, "multi", "10.0.0.107:80/tcp", Mode::Ipip, four("10.1.7."));
    add(c, "frag", "10.0.0.108:0/udp", Mode::Ipip, four("10.1.8."));
    add(c, "multi6", "[2001:db8::107]:80/tcp", Mode::Ipip, four("2001:db8:1::7"));
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

    let empty_syn = v4(CLIENT, "10.0.0.103", L4::Tcp(1, 80, Tcp::Syn), b"");
    let ping = v4(CLIENT, "10.0.0.100", L4::IcmpEcho, b"ping");
    let hbh = with_ipv6_ext(&syn6, 0);
    let frag6 = with_ipv6_ext(&syn6, 44);

    let sticky_f = v4(CLIENT, "10.0.0.105", L4::Tcp(41000, 80, Tcp::Syn), b"");
    let sticky_f_ack = v4(CLIENT, "10.0.0.105", L4::Tcp(41000, 80, Tcp::Ack), b"more");
    let sticky_g = v4(CLIENT, "10.0.0.105", L4::Tcp(41001, 80, Tcp::Syn), b"");

    // DSCP EF + ECT(0) / DSCP AF41 + CE: copied into the outer header.
    let tos4 = with_tos(&v4(CLIENT, "10.0.0.100", L4::Tcp(40013, 80, Tcp::Syn), b""), 0xba);
    let tos6 = with_tos(&v6(CLIENT6, "2001:db8::100", L4::Udp(40014, 80), b""), 0x8b);
    let tos6_tcp = with_tos(&v6(CLIENT6, "2001:db8::100", L4::Tcp(40015, 80, Tcp::Syn), b""), 0x8b);
    let tos_4in6 = with_tos(&v4(CLIENT, "10.0.0.104", L4::Tcp(40016, 80, Tcp::Syn), b""), 0x2e);
    let cases = vec![
        row("tcp4 SYN with TOS 0xba: outer IPv4 header carries it", tos4.clone(), XDP_TX, ipip4(&tos4, "10.1.0.11", GW_MAC), fwd("web4", "10.1.0.11", true)),
        row("udp6 with traffic class 0x8b to a tcp VIP: passed untouched", tos6, XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("tcp6 SYN with traffic class 0x8b: outer IPv6 header carries it", tos6_tcp.clone(), XDP_TX, ipip6(&tos6_tcp, "2001:db8:1::11", GW_MAC), fwd("web6", "2001:db8:1::11", true)),
        row("tcp4 with TOS 0x2e to an IPv6 backend: outer traffic class 0x2e", tos_4in6.clone(), XDP_TX, ipip6(&tos_4in6, "2001:db8:1::51", GW_MAC), fwd("mixed", "2001:db8:1::51", true)),
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
        row("empty service: SYN answered with RST|ACK", empty_syn.clone(), XDP_TX, Expect::Frame(rst_expected(&empty_syn)), counted(reason::TX_RST)),
        row("drained backend gets no new flow", v4(CLIENT, "10.0.0.106", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_TX,
            ipip4(&v4(CLIENT, "10.0.0.106", L4::Tcp(1, 80, Tcp::Syn), b""), "10.1.6.2", GW_MAC), fwd("drained", "10.1.6.2", true)),
        row("VIP address, wrong port: passed", v4(CLIENT, "10.0.0.100", L4::Tcp(1, 81, Tcp::Syn), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("VIP address, wrong protocol (udp to tcp port)", v4(CLIENT, "10.0.0.100", L4::Udp(1, 80), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NO_SERVICE)),
        row("non-VIP IPv4: passed untouched", v4(CLIENT, "10.0.0.200", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_VIP)),
        row("non-VIP IPv6: passed untouched", v6(CLIENT6, "2001:db8::200", L4::Tcp(1, 80, Tcp::Syn), b""), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_VIP)),
        row("ARP: passed untouched", arp(), XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_IP)),
        row("IPIP to a VIP address: passed (not tcp/udp)", ipip_to_vip, XDP_PASS, Expect::Unchanged, counted(reason::PASS_OTHER_PROTO)),
        row("IPIP to another address: passed", ipip_to_other, XDP_PASS, Expect::Unchanged, counted(reason::PASS_NOT_VIP)),
        row("ICMP echo to VIP: answered", ping.clone(), XDP_TX, Expect::Frame(echo_reply_expected(&ping)), counted(reason::TX_ECHO_REPLY)),
        row("IPv4 first fragment to an exact-port VIP: forwarded", frag.clone(), XDP_TX, ipip4(&frag, "10.1.0.21", BE_MAC), fwd_frag("dns4", "10.1.0.21")),
        row("IPv6 hop-by-hop header to VIP: walked, forwarded (a SYN: Maglev pick, re-recorded)", hbh.clone(), XDP_TX, ipip6(&hbh, "2001:db8:1::11", GW_MAC), fwd("web6", "2001:db8:1::11", true)),
        row("IPv6 first fragment to VIP: forwarded by the port-less hash", frag6.clone(), XDP_TX, ipip6(&frag6, "2001:db8:1::11", GW_MAC), fwd_frag("web6", "2001:db8:1::11")),
        row("two VLAN tags: passed, counted", qinq, XDP_PASS, Expect::Unchanged, counted(reason::PASS_VLAN_STACKED)),
        row("truncated 802.1Q header: dropped", truncated_vlan, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("truncated IPv4 header: dropped", truncated_ip, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("truncated TCP header to VIP: dropped", truncated_tcp, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("truncated UDP header to VIP: dropped", truncated_udp, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IHL 4: dropped", bad_ihl, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IHL beyond the packet: dropped", ihl_beyond, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IPv4 total length beyond the frame: dropped", tot_len_beyond, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("EtherType IPv4 with version 6: dropped", not_ip_version, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("encapsulated packet over the MTU with DF: ICMP frag-needed (MTU 1480)", too_big.clone(), XDP_TX, Expect::Frame(too_big_expected(&too_big, 1480)), counted(reason::TX_TOO_BIG)),
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

/// The balancer with gue services: IPv4 and IPv6 outers, 4in6 and 6in4, two ports.
fn gue_setup() -> Datapath {
    let mut dp = Datapath::load();
    let c = &mut dp.control;
    c.set_settings(settings(ENCAP4, ENCAP6, Some(GW_MAC), 1500)).unwrap();
    let add = |c: &mut lb_userspace::ControlPlane<_>, name, vip, mode, bes: Vec<_>| c.add_service(service(name, vip, mode, 251), bes).unwrap();
    let gue = Mode::Gue { port: lb_common::gue::DEFAULT_PORT };
    add(c, "gue4", "10.0.0.110:80/tcp", gue, vec![backend("10.1.10.1", 1, None)]);
    add(c, "gue4_udp", "10.0.0.110:53/udp", Mode::Gue { port: 7000 }, vec![backend("10.1.10.2", 1, Some(BE_MAC))]);
    add(c, "gue6", "[2001:db8::110]:443/tcp", gue, vec![backend("2001:db8:1::a1", 1, None)]);
    add(c, "gue4in6", "10.0.0.111:80/tcp", gue, vec![backend("2001:db8:1::a2", 1, None)]);
    add(c, "gue6in4", "[2001:db8::111]:80/tcp", gue, vec![backend("10.1.10.3", 1, None)]);
    add(c, "gue_pair", "10.0.0.112:80/tcp", gue, vec![backend("10.1.10.4", 1, None), backend("10.1.10.5", 1, None)]);
    dp
}

/// Mode gue: outer IPv4/IPv6 + UDP (source port from the flow hash, destination port
/// per service) + GUE variant 0 with an empty hop list, under the ipip rules: DF, TOS /
/// traffic class copied, the VLAN tag kept, too big answered at the MTU minus the
/// whole outer overhead (36 bytes over IPv4, 56 over IPv6).
#[test]
fn gue_fixtures() {
    let mut dp = gue_setup();
    let gue4 = |input: &[u8], be: &str, nh, port| Expect::Frame(gue_expected(input, ENCAP4, be, nh, LB_MAC, port));
    let gue6 = |input: &[u8], be: &str, nh, port| Expect::Frame(gue_expected(input, ENCAP6, be, nh, LB_MAC, port));


    let syn = v4(CLIENT, "10.0.0.110", L4::Tcp(41000, 80, Tcp::Syn), b"");
    let ack = v4(CLIENT, "10.0.0.110", L4::Tcp(41000, 80, Tcp::Ack), b"hello");
    let other = v4(CLIENT, "10.0.0.110", L4::Tcp(41001, 80, Tcp::Syn), b"");
    let udp = v4(CLIENT, "10.0.0.110", L4::Udp(5353, 53), b"query");
    let syn6 = v6(CLIENT6, "2001:db8::110", L4::Tcp(41002, 443, Tcp::Syn), b"");
    let syn4in6 = v4(CLIENT, "10.0.0.111", L4::Tcp(41003, 80, Tcp::Syn), b"");
    let syn6in4 = v6(CLIENT6, "2001:db8::111", L4::Tcp(41004, 80, Tcp::Syn), b"");
    let tos = with_tos(&v4(CLIENT, "10.0.0.110", L4::Tcp(41005, 80, Tcp::Ack), b"x"), 0xb9);
    let tos6 = with_tos(&v6(CLIENT6, "2001:db8::110", L4::Tcp(41006, 443, Tcp::Ack), b"x"), 0x2a);
    let tagged = vlan(&v4(CLIENT, "10.0.0.110", L4::Tcp(41007, 80, Tcp::Syn), b""), 42);
    // The largest inner packets that fit: MTU 1500 minus 20 + 8 + 4 + 4 (IPv4 outer)
    // or 40 + 8 + 4 + 4 (IPv6 outer).
    let fits = v4(CLIENT, "10.0.0.110", L4::Tcp(41008, 80, Tcp::Ack), &[0u8; 1464 - 40]);
    let big = v4(CLIENT, "10.0.0.110", L4::Tcp(41009, 80, Tcp::Ack), &[0u8; 1464 - 40 + 1]);
    let fits6 = v6(CLIENT6, "2001:db8::110", L4::Tcp(41010, 443, Tcp::Ack), &[0u8; 1444 - 60]);
    let big6 = v6(CLIENT6, "2001:db8::110", L4::Tcp(41011, 443, Tcp::Ack), &[0u8; 1444 - 60 + 1]);
    let big4in6 = v4(CLIENT, "10.0.0.111", L4::Tcp(41012, 80, Tcp::Ack), &[0u8; 1444 - 40 + 1]);
    // Two backends: every packet of a TCP flow carries the slot's secondary as its hop.
    let pair_syn = v4(CLIENT, "10.0.0.112", L4::Tcp(41013, 80, Tcp::Syn), b"");
    let pair_ack = v4(CLIENT, "10.0.0.112", L4::Tcp(41013, 80, Tcp::Ack), b"x");
    let (pp, ps) = dp.predict_pair("gue_pair", &[], &flow_of(&pair_syn));
    let (pp, ps) = (pp.to_string(), ps.expect("two backends: a secondary").to_string());
    assert_ne!(pp, ps);
    let hop4 = |input: &[u8], be: &str, hop: &str| Expect::Frame(gue_expected_hop(input, ENCAP4, be, GW_MAC, LB_MAC, 6080, hop));

    // Two flows of one service leave from different UDP source ports (ECMP / RSS
    // entropy), each in the dynamic range; the byte-exact rows pin the exact values.
    let (a, b) = (flow_of(&syn), flow_of(&other));
    let (pa, pb) = (lb_common::gue::source_port(lb_common::flow_hash(&a)), lb_common::gue::source_port(lb_common::flow_hash(&b)));
    assert_ne!(pa, pb, "two flows, one source port");
    assert!(pa >= 49152 && pb >= 49152);

    let cases = vec![
        row("gue v4: SYN in UDP 6080 + GUE to the backend via the gateway", syn.clone(), XDP_TX, gue4(&syn, "10.1.10.1", GW_MAC, 6080), fwd("gue4", "10.1.10.1", true)),
        row("gue v4: the flow's next packet, same outer header", ack.clone(), XDP_TX, gue4(&ack, "10.1.10.1", GW_MAC, 6080), fwd("gue4", "10.1.10.1", false)),
        row("gue v4: another flow, another source port", other.clone(), XDP_TX, gue4(&other, "10.1.10.1", GW_MAC, 6080), fwd("gue4", "10.1.10.1", true)),
        row("gue v4: udp service on its own GUE port, backend MAC", udp.clone(), XDP_TX, gue4(&udp, "10.1.10.2", BE_MAC, 7000), fwd("gue4_udp", "10.1.10.2", true)),
        row("gue v6: IPv6 outer, next header 17", syn6.clone(), XDP_TX, gue6(&syn6, "2001:db8:1::a1", GW_MAC, 6080), fwd("gue6", "2001:db8:1::a1", true)),
        row("gue: IPv4 VIP, IPv6 backend (GUE proto 4 in IPv6)", syn4in6.clone(), XDP_TX, gue6(&syn4in6, "2001:db8:1::a2", GW_MAC, 6080), fwd("gue4in6", "2001:db8:1::a2", true)),
        row("gue: IPv6 VIP, IPv4 backend (GUE proto 41 in IPv4)", syn6in4.clone(), XDP_TX, gue4(&syn6in4, "10.1.10.3", GW_MAC, 6080), fwd("gue6in4", "10.1.10.3", true)),
        row("gue v4: TOS copied to the outer header", tos.clone(), XDP_TX, gue4(&tos, "10.1.10.1", GW_MAC, 6080), fwd("gue4", "10.1.10.1", true)),
        row("gue v6: traffic class copied to the outer header", tos6.clone(), XDP_TX, gue6(&tos6, "2001:db8:1::a1", GW_MAC, 6080), fwd("gue6", "2001:db8:1::a1", true)),
        row("gue v4: tagged frame keeps its tag", tagged.clone(), XDP_TX, gue4(&tagged, "10.1.10.1", GW_MAC, 6080), fwd("gue4", "10.1.10.1", true)),
        row("gue v4: exactly at the MTU: forwarded", fits.clone(), XDP_TX, gue4(&fits, "10.1.10.1", GW_MAC, 6080), fwd("gue4", "10.1.10.1", true)),
        row("gue v4: one byte over: frag-needed (MTU 1464)", big.clone(), XDP_TX, Expect::Frame(too_big_expected(&big, 1464)), counted(reason::TX_TOO_BIG)),
        row("gue v6: exactly at the MTU: forwarded", fits6.clone(), XDP_TX, gue6(&fits6, "2001:db8:1::a1", GW_MAC, 6080), fwd("gue6", "2001:db8:1::a1", true)),
        row("gue v6: one byte over: packet too big (MTU 1444)", big6.clone(), XDP_TX, Expect::Frame(too_big_expected(&big6, 1444)), counted(reason::TX_TOO_BIG)),
        row("gue: IPv4 VIP, IPv6 backend, over: frag-needed (MTU 1444)", big4in6.clone(), XDP_TX, Expect::Frame(too_big_expected(&big4in6, 1444)), counted(reason::TX_TOO_BIG)),
        row("gue pair: SYN carries the slot's secondary as its one hop", pair_syn.clone(), XDP_TX, hop4(&pair_syn, &pp, &ps), fwd("gue_pair", &pp, true)),
        row("gue pair: the flow-table hit carries the same hop", pair_ack.clone(), XDP_TX, hop4(&pair_ack, &pp, &ps), fwd("gue_pair", &pp, false)),
    ];
    run_cases(&mut dp, cases);
}

/// ICMP steering, echo, fragments, extension headers, too big, empty-service replies.
#[test]
fn completeness_fixtures() {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode};
    use lb_common::{FlowKey, PROTO_TCP, PROTO_UDP};
    let mut dp = setup();
    let predict = |dp: &Datapath, svc: &str, key: FlowKey| dp.predict(svc, &key).to_string();
    let key = |c: &str, cp: u16, v: &str, vp: u16, proto: u8| FlowKey::new(ip(c), cp, ip(v), vp, proto);

    // --- ICMP errors about a VIP flow go to the flow's backend. ---
    // Flow F on the 4-backend service; G: a flow never seen, on another backend than F.
    let f = v4(CLIENT, "10.0.0.107", L4::Tcp(42000, 80, Tcp::Syn), b"");
    let be_f = predict(&dp, "multi", key(CLIENT, 42000, "10.0.0.107", 80, PROTO_TCP));
    let g_port = (42001..43000).find(|p| predict(&dp, "multi", key(CLIENT, *p, "10.0.0.107", 80, PROTO_TCP)) != be_f).unwrap();
    let be_g = predict(&dp, "multi", key(CLIENT, g_port, "10.0.0.107", 80, PROTO_TCP));
    // What routers send: the quoted packet is the backend's reply, VIP -> client.
    let frag_needed = |inner: &[u8]| {
        v4_icmp("198.51.100.1", "10.0.0.107", Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }), inner)
    };
    let reply_f = from_vip("10.0.0.107", CLIENT, L4::Tcp(80, 42000, Tcp::Ack), &[0u8; 64]);
    let ptb_f = frag_needed(&reply_f);
    let ptb_f_short = frag_needed(&reply_f[..28]); // IP header + 8 bytes: the minimum quote
    let ptb_g = frag_needed(&from_vip("10.0.0.107", CLIENT, L4::Tcp(80, g_port, Tcp::Ack), b""));
    let unreach_udp = v4_icmp("198.51.100.1", "10.0.0.100", Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host),
        &from_vip("10.0.0.100", CLIENT, L4::Udp(53, 5353), b"answer"));
    // IPv6: flow F6 on a 4-backend IPv6 service.
    let f6 = v6(CLIENT6, "2001:db8::107", L4::Tcp(42000, 80, Tcp::Syn), b"");
    let be_f6 = predict(&dp, "multi6", key(CLIENT6, 42000, "2001:db8::107", 80, PROTO_TCP));
    let reply_f6 = from_vip("2001:db8::107", CLIENT6, L4::Tcp(80, 42000, Tcp::Ack), &[0u8; 100]);
    let ptb6 = v6_icmp("2001:db8:ff::1", "2001:db8::107", Icmpv6Type::PacketTooBig { mtu: 1280 }, &reply_f6);
    let unreach6 = v6_icmp("2001:db8:ff::1", "2001:db8::107", Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address), &reply_f6);
    let g6_port = (42001..43000).find(|p| predict(&dp, "multi6", key(CLIENT6, *p, "2001:db8::107", 80, PROTO_TCP)) != be_f6).unwrap();
    let be_g6 = predict(&dp, "multi6", key(CLIENT6, g6_port, "2001:db8::107", 80, PROTO_TCP));
    let ptb6_g = v6_icmp("2001:db8:ff::1", "2001:db8::107", Icmpv6Type::PacketTooBig { mtu: 1280 },
        &from_vip("2001:db8::107", CLIENT6, L4::Tcp(80, g6_port, Tcp::Ack), b""));
    // Not about a VIP flow / malformed quote / other ICMP types.
    let not_vip_flow = frag_needed(&from_vip("10.0.0.100", CLIENT, L4::Tcp(81, 42000, Tcp::Ack), b""));
    let truncated_quote = frag_needed(&reply_f[..24]);
    let quoted_icmp = frag_needed(&from_vip("10.0.0.107", CLIENT, L4::IcmpEcho, b""));
    let mut bad_inner_version = ptb_f.clone();
    bad_inner_version[14 + 20 + 8] = 0x65;
    let timestamp = v4_icmp(CLIENT, "10.0.0.100", Icmpv4Type::TimestampRequest(etherparse::icmpv4::TimestampMessage { id: 1, seq: 1, originate_timestamp: 0, receive_timestamp: 0, transmit_timestamp: 0 }), b"");
    let echo_reply_in = v4_icmp(CLIENT, "10.0.0.100", Icmpv4Type::EchoReply(echo(1, 1)), b"x");
    let about_empty = frag_needed(&from_vip("10.0.0.103", CLIENT, L4::Tcp(80, 1, Tcp::Ack), b""));
    let about_empty = {
        let mut f = about_empty;
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 103]);
        fix_ipv4_checksum(&mut f, 14);
        f
    };

    // --- Echo. ---
    let ping6 = v6_echo(CLIENT6, "2001:db8::100", b"ping6");
    let ping_zero = v4_icmp(CLIENT, "10.0.0.100", etherparse::Icmpv4Type::EchoRequest(echo(0, 0)), b"");
    let ping_vlan = vlan(&v4(CLIENT, "10.0.0.107", L4::IcmpEcho, b"tagged"), 42);
    let ping_opts = {
        let mut h = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::ICMP, [192, 0, 2, 10], [10, 0, 0, 100]).unwrap();
        h.options = etherparse::Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ip(etherparse::IpHeaders::Ipv4(h, Default::default())).icmpv4_echo_request(1, 1).write(&mut out, b"x").unwrap();
        out
    };
    // An address that is no VIP but shares a VIP's prefilter bit: the VIPS walk says no.
    let vip_bit = lb_common::vip_addr_bit(&lb_common::addr_words(ip("10.0.0.100")));
    let collider = (0..=u16::MAX)
        .map(|i| format!("10.9.{}.{}", i >> 8, i & 0xff))
        .find(|a| lb_common::vip_addr_bit(&lb_common::addr_words(ip(a))) == vip_bit)
        .unwrap();
    let ping_collider = v4(CLIENT, &collider, L4::IcmpEcho, b"");

    // --- Fragments. ---
    let dgram = v4("192.0.2.77", "10.0.0.108", L4::Udp(1111, 2222), &[7u8; 40]);
    let (frag1, frag2) = v4_fragments(&dgram, 24, 0x4242);
    // Fragments hash with the datagram's ports (kept from the first fragment).
    let be_frag = predict(&dp, "frag", key("192.0.2.77", 1111, "10.0.0.108", 2222, PROTO_UDP));
    // Issue 11 item 5: a UDP flow whose port-less pick differs from its full pick. Its
    // whole datagrams and its fragments must reach the same backend.
    let split_port = (20000..21000)
        .find(|p| predict(&dp, "frag", key(CLIENT, *p, "10.0.0.108", 4444, PROTO_UDP)) != predict(&dp, "frag", key(CLIENT, 0, "10.0.0.108", 0, PROTO_UDP)))
        .unwrap();
    let be_split = predict(&dp, "frag", key(CLIENT, split_port, "10.0.0.108", 4444, PROTO_UDP));
    let be_portless = predict(&dp, "frag", key(CLIENT, 0, "10.0.0.108", 0, PROTO_UDP));
    let whole = v4(CLIENT, "10.0.0.108", L4::Udp(split_port, 4444), &[1u8; 40]);
    let (split1, split2) = v4_fragments(&whole, 24, 0x7171);
    // Issue 11 item 11: a later fragment whose first was never seen.
    let (_, orphan_any) = v4_fragments(&v4(CLIENT, "10.0.0.108", L4::Udp(split_port, 4444), &[2u8; 40]), 24, 0x7272);
    // A datagram to a VIP port without service: its first fragment passes, and so must
    // its later ones (the stack reassembles them).
    let (nosvc1, nosvc2) = v4_fragments(&v4(CLIENT, "10.0.0.100", L4::Udp(5353, 99), &[3u8; 40]), 16, 0x7373);
    let exact = v4(CLIENT, "10.0.0.100", L4::Udp(5353, 53), &[9u8; 40]);
    let (exact1, exact2) = v4_fragments(&exact, 16, 0x5151);
    let (_, orphan) = v4_fragments(&v4(CLIENT, "10.0.0.100", L4::Udp(5353, 53), &[9u8; 40]), 16, 0x6161);
    let syn6_data = v6(CLIENT6, "2001:db8::100", L4::Tcp(40100, 80, Tcp::Ack), &[3u8; 64]);
    let (f6a, f6b) = v6_fragments(&syn6_data, 32, 0xdead_beef);

    // --- IPv6 extension headers. ---
    let ack6 = v6(CLIENT6, "2001:db8::100", L4::Tcp(40200, 80, Tcp::Ack), b"ext");
    let dst_rt = with_ipv6_ext(&with_ipv6_ext(&ack6, 60), 43);
    let four_ext = with_ipv6_ext(&with_ipv6_ext(&with_ipv6_ext(&with_ipv6_ext(&ack6, 60), 60), 43), 0);
    let five_ext = with_ipv6_ext(&four_ext, 60);
    let ah = with_ipv6_ext(&ack6, 51);
    let mut ext_too_long = with_ipv6_ext(&ack6, 60);
    ext_too_long[14 + 40 + 1] = 200; // 1608 bytes announced in a small packet
    let ext_truncated = {
        let mut f = with_ipv6_ext(&ack6, 60);
        f.truncate(14 + 40 + 4);
        f[18..20].copy_from_slice(&4u16.to_be_bytes());
        f
    };
    let ext_then_frag = with_ipv6_ext(&with_ipv6_ext(&syn6_data, 44), 0);
    // Katran's case: next header 44, but a UDP header follows (source port 31337 reads
    // as a reserved byte 0x69, destination port 80 as fragment offset 10).
    let bogus_frag6 = {
        let mut f = v6(CLIENT6, "2001:db8::100", L4::Udp(31337, 80), b"katran");
        f[14 + 6] = 44;
        f
    };
    let frag6_beyond = {
        let mut f = with_ipv6_ext(&syn6_data, 44);
        for t in [60, 60, 43, 0] {
            f = with_ipv6_ext(&f, t);
        }
        f
    };

    // --- Too big. ---
    let big6 = v6(CLIENT6, "2001:db8::100", L4::Tcp(40300, 80, Tcp::Ack), &[0u8; 1500 - 40 - 20 - 39]);
    let fits6 = v6(CLIENT6, "2001:db8::100", L4::Tcp(40301, 80, Tcp::Ack), &[0u8; 1500 - 40 - 20 - 40]);
    let big_no_df = {
        let mut f = v4(CLIENT, "10.0.0.100", L4::Tcp(40302, 80, Tcp::Ack), &[0u8; 1500 - 40 - 19]);
        f[20] &= !0x40;
        fix_ipv4_checksum(&mut f, 14);
        f
    };
    let big_4in6 = v4(CLIENT, "10.0.0.104", L4::Tcp(40303, 80, Tcp::Ack), &[0u8; 1500 - 40 - 39]);
    let big_vlan = vlan(&v4(CLIENT, "10.0.0.100", L4::Udp(40304, 53), &[1u8; 1500 - 28 - 19]), 42);
    let big_icmp_error = frag_needed(&from_vip("10.0.0.107", CLIENT, L4::Tcp(80, 42000, Tcp::Ack), &[0u8; 1500 - 40 - 28 - 19]));

    // --- Empty service replies. ---
    let e_ack = v4(CLIENT, "10.0.0.103", L4::Tcp(2, 80, Tcp::Ack), b"hello");
    let e_rst = v4(CLIENT, "10.0.0.103", L4::Tcp(3, 80, Tcp::Rst), b"");
    let e_fin = {
        // FIN without ACK, with data: ack = seq + 4 + 1.
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4([192, 0, 2, 10], [10, 0, 0, 103], 64).tcp(4, 80, 0xffff_fffe, 100).fin().write(&mut out, b"data").unwrap();
        out
    };
    let e_syn6 = v6(CLIENT6, "2001:db8::103", L4::Tcp(5, 80, Tcp::Syn), b"");
    let e_syn_vlan = vlan(&v4(CLIENT, "10.0.0.103", L4::Tcp(6, 80, Tcp::Syn), b""), 7);
    let e_syn_opts = v4_with_options(CLIENT, "10.0.0.103", 7, 80, &[1, 1, 1, 0]);
    let e_syn6_ext = with_ipv6_ext(&v6(CLIENT6, "2001:db8::103", L4::Tcp(8, 80, Tcp::Syn), b""), 0);
    let e_udp = v4(CLIENT, "10.0.0.103", L4::Udp(5353, 53), b"query");
    let e_udp_big = v4(CLIENT, "10.0.0.103", L4::Udp(5354, 53), &[5u8; 1000]);
    let e_udp6 = v6(CLIENT6, "2001:db8::103", L4::Udp(5353, 53), b"query6");
    let e_udp6_big = v6(CLIENT6, "2001:db8::103", L4::Udp(5354, 53), &[6u8; 1400]);
    let e_udp_vlan = vlan(&v4(CLIENT, "10.0.0.103", L4::Udp(5355, 53), b"q"), 9);

    let pass_icmp_err = || counted(reason::PASS_ICMP_ERROR);
    let cases = vec![
        row("flow F's SYN: Maglev pick", f.clone(), XDP_TX, ipip4(&f, &be_f, GW_MAC), fwd("multi", &be_f, true)),
        row("ICMP frag-needed about F: to F's backend", ptb_f.clone(), XDP_TX, ipip4(&ptb_f, &be_f, GW_MAC), fwd_icmp("multi", &be_f)),
        row("ICMP frag-needed quoting only IP + 8 bytes: to F's backend", ptb_f_short.clone(), XDP_TX, ipip4(&ptb_f_short, &be_f, GW_MAC), fwd_icmp("multi", &be_f)),
        row("ICMP frag-needed about unseen flow G: G's Maglev backend (not F's)", ptb_g.clone(), XDP_TX, ipip4(&ptb_g, &be_g, GW_MAC), fwd_icmp("multi", &be_g)),
        row("ICMP host unreachable about a udp4 flow: to its backend", unreach_udp.clone(), XDP_TX, ipip4(&unreach_udp, "10.1.0.21", BE_MAC), fwd_icmp("dns4", "10.1.0.21")),
        row("flow F6's SYN: Maglev pick", f6.clone(), XDP_TX, ipip6(&f6, &be_f6, GW_MAC), fwd("multi6", &be_f6, true)),
        row("ICMPv6 packet too big about F6: to F6's backend", ptb6.clone(), XDP_TX, ipip6(&ptb6, &be_f6, GW_MAC), fwd_icmp("multi6", &be_f6)),
        row("ICMPv6 destination unreachable about F6: to F6's backend", unreach6.clone(), XDP_TX, ipip6(&unreach6, &be_f6, GW_MAC), fwd_icmp("multi6", &be_f6)),
        row("ICMPv6 packet too big about unseen G6: G6's Maglev backend", ptb6_g.clone(), XDP_TX, ipip6(&ptb6_g, &be_g6, GW_MAC), fwd_icmp("multi6", &be_g6)),
        row("ICMP error about a VIP port without service: passed", not_vip_flow, XDP_PASS, Expect::Unchanged, pass_icmp_err()),
        row("ICMP error with a quote shorter than IP + 8: passed", truncated_quote, XDP_PASS, Expect::Unchanged, pass_icmp_err()),
        row("ICMP error quoting an ICMP packet: passed", quoted_icmp, XDP_PASS, Expect::Unchanged, pass_icmp_err()),
        row("ICMP error quoting a non-IPv4 header: passed", bad_inner_version, XDP_PASS, Expect::Unchanged, pass_icmp_err()),
        row("ICMP error about a flow of an empty service: dropped", about_empty, XDP_DROP, Expect::Unchanged, counted(reason::DROP_NO_BACKEND)),
        row("ICMP timestamp request to VIP: passed", timestamp, XDP_PASS, Expect::Unchanged, counted(reason::PASS_ICMP)),
        row("ICMP echo reply to VIP: passed", echo_reply_in, XDP_PASS, Expect::Unchanged, counted(reason::PASS_ICMP)),
        row("ICMPv6 echo to VIP: answered", ping6.clone(), XDP_TX, Expect::Frame(echo_reply_expected(&ping6)), counted(reason::TX_ECHO_REPLY)),
        row("tagged ICMP echo to VIP: answered with the tag", ping_vlan.clone(), XDP_TX, Expect::Frame(echo_reply_expected(&ping_vlan)), counted(reason::TX_ECHO_REPLY)),
        row("ICMP echo id 0 seq 0, no payload: reply checksum 0xffff, not 0x0000", ping_zero.clone(), XDP_TX, Expect::Frame(echo_reply_expected(&ping_zero)), counted(reason::TX_ECHO_REPLY)),
        row("ICMP echo with IPv4 options: passed", ping_opts, XDP_PASS, Expect::Unchanged, counted(reason::PASS_ICMP)),
        row("ICMP echo to a non-VIP sharing a VIP's bloom bit: passed", ping_collider, XDP_PASS, Expect::Unchanged, counted(reason::PASS_ICMP)),
        row("port-0 udp VIP, first fragment: port-less hash", frag1.clone(), XDP_TX, ipip4(&frag1, &be_frag, GW_MAC), fwd_frag("frag", &be_frag)),
        row("port-0 udp VIP, second fragment: same backend", frag2.clone(), XDP_TX, ipip4(&frag2, &be_frag, GW_MAC), fwd_frag("frag", &be_frag)),
        row("exact-port VIP, first fragment", exact1.clone(), XDP_TX, ipip4(&exact1, "10.1.0.21", BE_MAC), fwd_frag("dns4", "10.1.0.21")),
        row("exact-port VIP, second fragment: port remembered", exact2.clone(), XDP_TX, ipip4(&exact2, "10.1.0.21", BE_MAC), fwd_frag("dns4", "10.1.0.21")),
        row("exact-port VIP, later fragment of an unseen datagram: dropped as an orphan", orphan, XDP_DROP, Expect::Unchanged, counted(reason::DROP_FRAGMENT_ORPHAN)),
        row("udp flow: whole datagram, full 5-tuple pick", whole.clone(), XDP_TX, ipip4(&whole, &be_split, GW_MAC), fwd("frag", &be_split, true)),
        row("udp flow: its first fragment reaches the same backend", split1.clone(), XDP_TX, ipip4(&split1, &be_split, GW_MAC), fwd_frag("frag", &be_split)),
        row("udp flow: its later fragment too (ports kept from the first)", split2.clone(), XDP_TX, ipip4(&split2, &be_split, GW_MAC), fwd_frag("frag", &be_split)),
        row("port-0 VIP, later fragment before its first: port-less hash, counted", orphan_any.clone(), XDP_TX, ipip4(&orphan_any, &be_portless, GW_MAC),
            { let mut v = fwd_frag("frag", &be_portless); v.push((Reason(reason::FWD_FRAGMENT_PORTLESS), 1)); v }),
        row("first fragment to a VIP port without service: passed", nosvc1, XDP_PASS, Expect::Unchanged, counted(reason::PASS_FRAGMENT)),
        row("its later fragment: passed too", nosvc2, XDP_PASS, Expect::Unchanged, counted(reason::PASS_FRAGMENT)),
        row("IPv6 next header 44 over a UDP header (no fragment header): dropped, not a later fragment", bogus_frag6, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IPv6 fragment header beyond the extension-header walk: dropped", frag6_beyond, XDP_DROP, Expect::Unchanged, counted(reason::DROP_FRAGMENT_ORPHAN)),
        row("IPv6 first fragment", f6a.clone(), XDP_TX, ipip6(&f6a, "2001:db8:1::11", GW_MAC), fwd_frag("web6", "2001:db8:1::11")),
        row("IPv6 second fragment: same backend", f6b.clone(), XDP_TX, ipip6(&f6b, "2001:db8:1::11", GW_MAC), fwd_frag("web6", "2001:db8:1::11")),
        row("IPv6 hop-by-hop then fragment header", ext_then_frag.clone(), XDP_TX, ipip6(&ext_then_frag, "2001:db8:1::11", GW_MAC), fwd_frag("web6", "2001:db8:1::11")),
        row("IPv6 routing + destination options: walked, forwarded", dst_rt.clone(), XDP_TX, ipip6(&dst_rt, "2001:db8:1::11", GW_MAC), fwd("web6", "2001:db8:1::11", true)),
        row("IPv6 four extension headers: walked, forwarded", four_ext.clone(), XDP_TX, ipip6(&four_ext, "2001:db8:1::11", GW_MAC), fwd("web6", "2001:db8:1::11", false)),
        row("IPv6 five extension headers: beyond the bound, passed", five_ext, XDP_PASS, Expect::Unchanged, counted(reason::PASS_IPV6_EXT)),
        row("IPv6 AH: passed", ah, XDP_PASS, Expect::Unchanged, counted(reason::PASS_IPV6_EXT)),
        row("IPv6 extension header longer than the payload: dropped", ext_too_long, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IPv6 truncated extension header: dropped", ext_truncated, XDP_DROP, Expect::Unchanged, counted(reason::DROP_MALFORMED)),
        row("IPv6 over the MTU: packet too big (MTU 1460)", big6.clone(), XDP_TX, Expect::Frame(too_big_expected(&big6, 1460)), counted(reason::TX_TOO_BIG)),
        row("IPv6 exactly at the MTU: forwarded", fits6.clone(), XDP_TX, ipip6(&fits6, "2001:db8:1::11", GW_MAC), fwd("web6", "2001:db8:1::11", true)),
        row("IPv4 over the MTU without DF: frag-needed too (MTU 1480)", big_no_df.clone(), XDP_TX, Expect::Frame(too_big_expected(&big_no_df, 1480)), counted(reason::TX_TOO_BIG)),
        row("IPv4 VIP, IPv6 backend, over the MTU: frag-needed (MTU 1460)", big_4in6.clone(), XDP_TX, Expect::Frame(too_big_expected(&big_4in6, 1460)), counted(reason::TX_TOO_BIG)),
        row("tagged udp4 over the MTU: frag-needed with the tag", big_vlan.clone(), XDP_TX, Expect::Frame(too_big_expected(&big_vlan, 1480)), counted(reason::TX_TOO_BIG)),
        row("ICMP error over the MTU: dropped, never answered", big_icmp_error, XDP_DROP, Expect::Unchanged, counted(reason::DROP_TOO_BIG)),
        row("empty service: ACK with data gets RST seq=ack", e_ack.clone(), XDP_TX, Expect::Frame(rst_expected(&e_ack)), counted(reason::TX_RST)),
        row("empty service: RST is never answered", e_rst, XDP_DROP, Expect::Unchanged, counted(reason::DROP_NO_BACKEND)),
        row("empty service: FIN with data, no ACK: ack = seq + 5 (wraps)", e_fin.clone(), XDP_TX, Expect::Frame(rst_expected(&e_fin)), counted(reason::TX_RST)),
        row("empty IPv6 service: SYN gets RST|ACK", e_syn6.clone(), XDP_TX, Expect::Frame(rst_expected(&e_syn6)), counted(reason::TX_RST)),
        row("empty service: tagged SYN, tag kept", e_syn_vlan.clone(), XDP_TX, Expect::Frame(rst_expected(&e_syn_vlan)), counted(reason::TX_RST)),
        row("empty service: SYN with IPv4 options, RST without", e_syn_opts.clone(), XDP_TX, Expect::Frame(rst_expected(&strip_v4_options(&e_syn_opts))), counted(reason::TX_RST)),
        row("empty IPv6 service: SYN behind hop-by-hop, RST without", e_syn6_ext.clone(), XDP_TX,
            Expect::Frame(rst_expected(&v6(CLIENT6, "2001:db8::103", L4::Tcp(8, 80, Tcp::Syn), b""))), counted(reason::TX_RST)),
        row("empty udp service: ICMP port unreachable", e_udp.clone(), XDP_TX, Expect::Frame(port_unreachable_expected(&e_udp)), counted(reason::TX_PORT_UNREACHABLE)),
        row("empty udp service: large datagram, quote cut at 576", e_udp_big.clone(), XDP_TX, Expect::Frame(port_unreachable_expected(&e_udp_big)), counted(reason::TX_PORT_UNREACHABLE)),
        row("empty udp6 service: ICMPv6 port unreachable", e_udp6.clone(), XDP_TX, Expect::Frame(port_unreachable_expected(&e_udp6)), counted(reason::TX_PORT_UNREACHABLE)),
        row("empty udp6 service: large datagram, quote cut at 1280", e_udp6_big.clone(), XDP_TX, Expect::Frame(port_unreachable_expected(&e_udp6_big)), counted(reason::TX_PORT_UNREACHABLE)),
        row("empty udp service: tagged, tag kept", e_udp_vlan.clone(), XDP_TX, Expect::Frame(port_unreachable_expected(&e_udp_vlan)), counted(reason::TX_PORT_UNREACHABLE)),
    ];
    run_cases(&mut dp, cases);
    // Fragments never create flow-table entries (with or without ports).
    for k in [key("192.0.2.77", 0, "10.0.0.108", 0, PROTO_UDP), key("192.0.2.77", 1111, "10.0.0.108", 2222, PROTO_UDP), key(CLIENT6, 0, "2001:db8::100", 0, PROTO_TCP)] {
        assert!(dp.flow(&k).is_none(), "fragment created a flow entry {k:?}");
    }
    // ICMP errors never create flow-table entries either (G was never seen).
    assert!(dp.flow(&key(CLIENT, g_port, "10.0.0.107", 80, PROTO_TCP)).is_none());
}

/// The same IPv4 frame without its header options (what a RST to it quotes nothing of).
fn strip_v4_options(frame: &[u8]) -> Vec<u8> {
    let hl = ((frame[14] & 0x0f) as usize) * 4;
    let mut out = frame[..34].to_vec();
    out[14] = 0x45;
    let tot = u16::from_be_bytes([frame[16], frame[17]]) - (hl as u16 - 20);
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    out.extend_from_slice(&frame[14 + hl..]);
    fix_ipv4_checksum(&mut out, 14);
    out
}

/// Replies are rate-limited per CPU: with a rate of 1/s the second reply in a row is
/// dropped and counted. The thread is pinned so both runs use the same CPU's bucket.
#[test]
fn replies_are_rate_limited() {
    // SAFETY: plain affinity syscall on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU 0");
    }
    let mut dp = setup();
    let mut s = settings(ENCAP4, ENCAP6, Some(GW_MAC), 1500);
    s.reply_rate = 1;
    dp.control.set_settings(s).unwrap();
    let syn = v4(CLIENT, "10.0.0.103", L4::Tcp(1, 80, Tcp::Syn), b"");
    let udp = v4(CLIENT, "10.0.0.103", L4::Udp(1, 53), b"");
    let ping = v4(CLIENT, "10.0.0.100", L4::IcmpEcho, b"");
    run_cases(
        &mut dp,
        vec![
            row("first reply: within the burst", syn.clone(), XDP_TX, Expect::Frame(rst_expected(&syn)), counted(reason::TX_RST)),
            row("second RST within a second: dropped", syn, XDP_DROP, Expect::Unchanged, counted(reason::DROP_REPLY_RATELIMITED)),
            row("port unreachable shares the bucket: dropped", udp, XDP_DROP, Expect::Unchanged, counted(reason::DROP_REPLY_RATELIMITED)),
            row("echo reply shares the bucket: dropped", ping, XDP_DROP, Expect::Unchanged, counted(reason::DROP_REPLY_RATELIMITED)),
        ],
    );
}

/// Flood mode: above `max_new_flows` new flows per second on this CPU, a new flow is
/// forwarded to its Maglev pick without being recorded (counted as
/// fwd_flood_unrecorded); flows recorded before keep their entries. The thread is
/// pinned so every run uses the same CPU's meter.
#[test]
fn flood_mode_steers_new_flows_unrecorded() {
    use lb_common::{FlowKey, PROTO_TCP};
    // SAFETY: plain affinity syscall on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU 0");
    }
    let mut dp = setup();
    let mut s = settings(ENCAP4, ENCAP6, Some(GW_MAC), 1500);
    s.max_new_flows = 2;
    dp.control.set_settings(s).unwrap();
    let key = |p: u16| FlowKey::new(ip(CLIENT), p, ip("10.0.0.107"), 80, PROTO_TCP);
    let be = |p: u16| dp.predict("multi", &key(p)).to_string();
    let (b1, b2, b3) = (be(43001), be(43002), be(43003));
    let syn = |p: u16| v4(CLIENT, "10.0.0.107", L4::Tcp(p, 80, Tcp::Syn), b"");
    let ack = |p: u16| v4(CLIENT, "10.0.0.107", L4::Tcp(p, 80, Tcp::Ack), b"x");
    let flood = |b: &str| {
        let mut v = fwd("multi", b, false);
        v.push((Reason(reason::FWD_FLOOD_UNRECORDED), 1));
        v
    };
    run_cases(
        &mut dp,
        vec![
            row("1st new flow this second: recorded", syn(43001), XDP_TX, ipip4(&syn(43001), &b1, GW_MAC), fwd("multi", &b1, true)),
            row("2nd new flow: recorded (at the limit)", syn(43002), XDP_TX, ipip4(&syn(43002), &b2, GW_MAC), fwd("multi", &b2, true)),
            row("3rd new flow: over the limit, Maglev pick, unrecorded", syn(43003), XDP_TX, ipip4(&syn(43003), &b3, GW_MAC), flood(&b3)),
            row("3rd flow's next packet: still unrecorded, same backend", ack(43003), XDP_TX, ipip4(&ack(43003), &b3, GW_MAC), flood(&b3)),
            row("1st flow's next packet: its entry, no new flow", ack(43001), XDP_TX, ipip4(&ack(43001), &b1, GW_MAC), fwd("multi", &b1, false)),
        ],
    );
    assert!(dp.flow(&key(43001)).is_some() && dp.flow(&key(43002)).is_some(), "flows within the limit are recorded");
    assert!(dp.flow(&key(43003)).is_none(), "a flow over the limit is not recorded");
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
    let mut decap = Decap::load();
    decap.allow(&[ENCAP4, ENCAP6]);
    decap.local(&["10.1.0.11", "2001:db8:1::11", "2001:db8:1::51"]);
    let syn = v4(CLIENT, "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b"payload");
    let syn6 = v6(CLIENT6, "2001:db8::100", L4::Tcp(40000, 80, Tcp::Syn), b"");
    let mixed = v4(CLIENT, "10.0.0.104", L4::Tcp(40009, 80, Tcp::Syn), b"");
    let vlan_syn = vlan(&syn, 42);

    let mut cases: Vec<DecapCase> = Vec::new();
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

    run_decap_cases(&decap, cases);
}

/// GUE in lb_decap: what the balancer's gue mode emits comes back as the client's
/// packet; the allow-list and local checks apply as for IPIP; UDP to other ports and
/// GUE it does not send (another version, a control message, flags, an unknown inner
/// protocol) are told apart; a hop list of any length is skipped.
#[test]
fn gue_decap_fixtures() {
    let dp = gue_setup();
    let mut decap = Decap::load();
    decap.allow(&[ENCAP4, ENCAP6]);
    decap.local(&["10.1.10.1", "10.1.10.2", "2001:db8:1::a1", "2001:db8:1::a2"]);
    decap.gue_ports(&[6080, 7000]);
    let syn = v4(CLIENT, "10.0.0.110", L4::Tcp(41000, 80, Tcp::Syn), b"payload");
    let udp = v4(CLIENT, "10.0.0.110", L4::Udp(5353, 53), b"query");
    let syn6 = v6(CLIENT6, "2001:db8::110", L4::Tcp(41002, 443, Tcp::Syn), b"");
    let syn4in6 = v4(CLIENT, "10.0.0.111", L4::Tcp(41003, 80, Tcp::Syn), b"");
    let tagged = vlan(&syn, 42);

    let mut cases: Vec<DecapCase> = Vec::new();
    for (name, input) in [("gue v4 round trip", &syn), ("gue v4 on port 7000 round trip", &udp), ("gue v6 round trip", &syn6), ("gue 4in6 round trip", &syn4in6), ("gue with VLAN round trip", &tagged)] {
        let (action, encapsulated) = dp.run(input);
        assert_eq!(action, XDP_TX, "{name}: balancer forwards");
        let l3_in = l3_offset(input);
        let mut want = encapsulated[..l3_in].to_vec();
        want[l3_in - 2..l3_in].copy_from_slice(&input[l3_in - 2..l3_in]);
        want.extend_from_slice(&input[l3_in..]);
        cases.push((name, encapsulated, XDP_PASS, want, decap_reason::DECAPSULATED_GUE));
    }
    let inner = &syn[14..];
    // UDP never takes a second chance (no socket state to ask): decapsulated whatever
    // its hop list holds. TCP second chances: gue_second_chance.rs, with real sockets.
    let inner_udp = &udp[14..];
    let hop = lb_common::addr_bytes(ip("10.1.10.2"));
    let mut two_hops = vec![1, 2, 0, 0];
    two_hops.extend_from_slice(&hop);
    two_hops.extend_from_slice(&hop);
    let with_hops = gue_frame(ENCAP4, "10.1.10.1", 6080, [9, 4, 0, 0], &two_hops, inner_udp);
    let mut want = with_hops[..12].to_vec();
    want.extend_from_slice(&0x0800u16.to_be_bytes());
    want.extend_from_slice(inner_udp);
    cases.push(("gue udp with a two-hop list: list skipped whole, no second chance", with_hops, XDP_PASS, want, decap_reason::DECAPSULATED_GUE));
    let untouched: Vec<(&str, Vec<u8>, u32)> = vec![
        ("UDP to another port from a balancer: untouched", gue_frame(ENCAP4, "10.1.10.1", 6081, [1, 4, 0, 0], &[1, 0, 0, 0], inner), decap_reason::PASS_NOT_ENCAP),
        ("plain UDP: untouched", v4(CLIENT, "10.1.10.1", L4::Udp(5353, 53), b"query"), decap_reason::PASS_NOT_ENCAP),
    ];
    for (name, f, r) in untouched {
        cases.push((name, f.clone(), XDP_PASS, f, r));
    }
    let dropped: Vec<(&str, Vec<u8>, u32)> = vec![
        ("gue from a source not allowed: dropped", gue_frame("10.9.9.9", "10.1.10.1", 6080, [1, 4, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_SOURCE_NOT_ALLOWED),
        ("gue v6 from a source not allowed: dropped", gue_frame("2001:db8::99", "2001:db8:1::a1", 6080, [1, 4, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_SOURCE_NOT_ALLOWED),
        ("gue to another host: dropped", gue_frame(ENCAP4, "10.1.10.9", 6080, [1, 4, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_NOT_LOCAL),
        ("gue version 1: dropped", gue_frame(ENCAP4, "10.1.10.1", 6080, [0x41, 4, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_MALFORMED),
        ("gue control message: dropped", gue_frame(ENCAP4, "10.1.10.1", 6080, [0x21, 4, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_MALFORMED),
        ("gue with flags: dropped", gue_frame(ENCAP4, "10.1.10.1", 6080, [1, 4, 0x80, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_MALFORMED),
        ("gue carrying protocol 17: dropped", gue_frame(ENCAP4, "10.1.10.1", 6080, [1, 17, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_MALFORMED),
        ("gue announcing IPv6, carrying IPv4: dropped", gue_frame(ENCAP4, "10.1.10.1", 6080, [1, 41, 0, 0], &[1, 0, 0, 0], inner), decap_reason::DROP_MALFORMED),
        ("gue hop list beyond the frame: dropped", gue_frame(ENCAP4, "10.1.10.1", 6080, [31, 4, 0, 0], &[1, 0, 0, 0], &inner[..20]), decap_reason::DROP_MALFORMED),
    ];
    for (name, f, r) in dropped {
        cases.push((name, f.clone(), XDP_DROP, f, r));
    }
    run_decap_cases(&decap, cases);
}

/// A decap row: name, input, action, output, the one reason counted.
type DecapCase<'a> = (&'a str, Vec<u8>, u32, Vec<u8>, u32);

fn run_decap_cases(decap: &Decap, cases: Vec<DecapCase>) {
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
    use lb_common::{FlowKey, PROTO_TCP, addr_bytes};
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
        assert_eq!(id, lb_common::maglev::pick(&table, &key), "flow {sport}: datapath and userspace Maglev agree");
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

/// The map contract (lb_common::contract) is what the built object declares: every map
/// with its type, key and value size, max_entries and flags, as the kernel created it.
#[test]
fn map_contract_matches_the_object() {
    use aya::maps::Map;
    use lb_common::contract::{BALANCER_MAPS, balancer_map};
    require_root();
    let ebpf = aya::Ebpf::load(lb_userspace::objects::BALANCER).expect("load balancer object");
    let mut seen = Vec::new();
    let mut errs = Vec::new();
    for (name, map) in ebpf.maps() {
        if name.starts_with("AYA_") || name.starts_with('.') {
            continue; // aya-log's own map, data sections (.rodata: log strings)
        }
        let info = match map {
            Map::HashMap(m) | Map::Array(m) | Map::PerCpuArray(m) | Map::LruHashMap(m) | Map::RingBuf(m) => m.info().expect("map info"),
            other => panic!("{name}: map kind {other:?} not in the contract"),
        };
        let Some(spec) = balancer_map(name) else {
            errs.push(format!("{name}: in the object, not in lb_common::contract"));
            continue;
        };
        seen.push(spec.name);
        let got = (info.map_type().expect("map type") as u32, info.key_size(), info.value_size(), info.max_entries(), info.map_flags());
        let want = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags);
        if got != want {
            errs.push(format!("{name}: object (type, key, value, max_entries, flags) {got:?}, contract {want:?}"));
        }
    }
    for m in BALANCER_MAPS {
        if !seen.contains(&m.name) {
            errs.push(format!("{}: in the contract, not in the object", m.name));
        }
    }
    assert!(errs.is_empty(), "map contract and object disagree:\n{}", errs.join("\n"));
}
