//! Second chance in lb_decap (issue 15 item 3) with real sockets: every row runs
//! through BPF_PROG_TEST_RUN inside a network namespace of its own (prefix `gu-`) as if
//! it arrived on its veth, so the listener, the established connection, the route and
//! the neighbour of the next hop are the kernel's. Run as root, under the root-test lock.

use std::net::{IpAddr, TcpListener, TcpStream};
use std::process::Command;

use lb_common::decap_reason;
use lb_tests::netns::{cleanup_stale, in_ns, sysctl};
use lb_tests::packets::*;
use lb_tests::*;

const NS: &str = "gu-sc";
const LB4: &str = "10.0.0.5";
const LB6: &str = "2001:db8::5";
const ME: &str = "10.1.10.1";
const ME6: &str = "2001:db8:1::a1";
const NEXT: &str = "10.1.10.2";
const NEXT6: &str = "2001:db8:1::a2";
const NO_NEIGH: &str = "10.1.10.3";
const MY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x01];
const NEXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x02];
const VIP: &str = "10.0.0.110";
const VIP6: &str = "2001:db8::110";

/// Removes the namespace (and the veth in it) even when the test fails.
struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

fn ip_ns(args: &[&str]) {
    let st = Command::new("ip").args(["-n", NS]).args(args).status().expect("run ip");
    assert!(st.success(), "ip -n {NS} {args:?}: {st}");
}

/// A GUE frame from the balancer to this host carrying `inner` with `hops` (the
/// hop list's addresses, next = 0).
fn gue_with_hops(outer_src: &str, outer_dst: &str, hops: &[&str], inner: &[u8]) -> Vec<u8> {
    let mut list = vec![lb_common::gue::HOPS_VERSION, hops.len() as u8, 0, 0];
    for h in hops {
        list.extend_from_slice(&lb_common::addr_bytes(h.parse().unwrap()));
    }
    let proto = if inner[0] >> 4 == 6 { 41 } else { 4 };
    gue_frame(outer_src, outer_dst, 6080, [(1 + 4 * hops.len()) as u8, proto, 0, 0], &list, inner)
}

/// The same frame sent on: to the first hop, `next` 1, UDP checksum 0, MACs of the
/// veth and the next hop's neighbour entry (etherparse builds it from scratch).
fn passed_on(outer_src: &str, next: &str, hops: &[&str], inner: &[u8]) -> Vec<u8> {
    let mut f = gue_with_hops(outer_src, next, hops, inner);
    f[0..6].copy_from_slice(&NEXT_MAC);
    f[6..12].copy_from_slice(&MY_MAC);
    let udp = if f[14] >> 4 == 4 { 14 + 20 } else { 14 + 40 };
    f[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    f[udp + 8 + 4 + 2] = 1;
    f
}

fn decapsulated(frame: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&if inner[0] >> 4 == 6 { 0x86DDu16 } else { 0x0800u16 }.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

fn tcp4(src: IpAddr, sport: u16, dst: &str, dport: u16, t: Tcp) -> Vec<u8> {
    v4(&src.to_string(), dst, L4::Tcp(sport, dport, t), b"")[14..].to_vec()
}

fn tcp6(src: IpAddr, sport: u16, dst: &str, dport: u16, t: Tcp) -> Vec<u8> {
    v6(&src.to_string(), dst, L4::Tcp(sport, dport, t), b"")[14..].to_vec()
}

#[test]
fn second_chance_with_real_sockets() {
    require_root();
    cleanup_stale("gu-");
    let st = Command::new("ip").args(["netns", "add", NS]).status().expect("ip netns add");
    assert!(st.success());
    let _guard = Guard;
    ip_ns(&["link", "set", "lo", "up"]);
    ip_ns(&["link", "add", "gu-a", "address", "02:00:00:00:10:01", "type", "veth", "peer", "name", "gu-b"]);
    ip_ns(&["link", "set", "gu-a", "up"]);
    ip_ns(&["link", "set", "gu-b", "up"]);
    ip_ns(&["addr", "add", "10.1.10.1/24", "dev", "gu-a"]);
    ip_ns(&["addr", "add", "2001:db8:1::a1/64", "dev", "gu-a", "nodad"]);
    ip_ns(&["neigh", "add", NEXT, "lladdr", "02:00:00:00:10:02", "dev", "gu-a", "nud", "permanent"]);
    ip_ns(&["neigh", "add", NEXT6, "lladdr", "02:00:00:00:10:02", "dev", "gu-a", "nud", "permanent"]);
    ip_ns(&["addr", "add", "10.0.0.110/32", "dev", "lo"]);
    ip_ns(&["addr", "add", "2001:db8::110/128", "dev", "lo", "nodad"]);
    // bpf_fib_lookup answers only for an interface that forwards.
    sysctl(NS, "net.ipv4.conf.gu-a.forwarding", "1").expect("ipv4 forwarding on gu-a");
    sysctl(NS, "net.ipv6.conf.gu-a.forwarding", "1").expect("ipv6 forwarding on gu-a");

    in_ns(NS, || {
        let name = std::ffi::CString::new("gu-a").unwrap();
        // SAFETY: a NUL-terminated name; the lookup uses this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "gu-a's index");
        let listener = TcpListener::bind((VIP, 80)).expect("listen on the VIP");
        let listener6 = TcpListener::bind((VIP6, 443)).expect("listen on the IPv6 VIP");
        // An established connection to the VIP, from a local address.
        let client = TcpStream::connect((VIP, 80)).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let c = client.local_addr().unwrap();
        let client6 = TcpStream::connect((VIP6, 443)).expect("connect v6");
        let (_server6, _) = listener6.accept().expect("accept v6");
        let c6 = client6.local_addr().unwrap();
        let stranger: IpAddr = "192.0.2.10".parse().unwrap();
        let stranger6: IpAddr = "2001:db8:c::10".parse().unwrap();

        let mut decap = Decap::load();
        decap.allow(&[LB4, LB6]);
        decap.local(&[ME, ME6]);
        decap.gue_ports(&[6080]);

        let syn_free = tcp4(stranger, 40000, VIP, 8081, Tcp::Syn);
        let syn_listen = tcp4(stranger, 40001, VIP, 80, Tcp::Syn);
        let ack_held = tcp4(c.ip(), c.port(), VIP, 80, Tcp::Ack);
        let ack_stranger = tcp4(stranger, 40002, VIP, 80, Tcp::Ack);
        let ack_free = tcp4(stranger, 40003, VIP, 8081, Tcp::Ack);
        let syn6_free = tcp6(stranger6, 40004, VIP6, 8443, Tcp::Syn);
        let ack6_held = tcp6(c6.ip(), c6.port(), VIP6, 443, Tcp::Ack);
        let ack6_stranger = tcp6(stranger6, 40005, VIP6, 443, Tcp::Ack);
        let udp = v4("192.0.2.10", VIP, L4::Udp(5353, 53), b"q")[14..].to_vec();

        type Row<'a> = (&'a str, Vec<u8>, u32, Vec<u8>, u32);
        let local = |name, f: Vec<u8>, inner: &[u8], r| -> Row { let want = decapsulated(&f, inner); (name, f, XDP_PASS, want, r) };
        let rows: Vec<Row> = vec![
            ("SYN, no listener, a next hop: sent on", gue_with_hops(LB4, ME, &[NEXT], &syn_free), XDP_TX, passed_on(LB4, NEXT, &[NEXT], &syn_free), decap_reason::SECOND_CHANCE_SYN),
            ("SYN, no listener, two hops: the first taken", gue_with_hops(LB4, ME, &[NEXT, NO_NEIGH], &syn_free), XDP_TX, passed_on(LB4, NEXT, &[NEXT, NO_NEIGH], &syn_free), decap_reason::SECOND_CHANCE_SYN),
            local("SYN to a listening port: ours", gue_with_hops(LB4, ME, &[NEXT], &syn_listen), &syn_listen, decap_reason::DECAPSULATED_GUE),
            local("ACK of an established connection: ours", gue_with_hops(LB4, ME, &[NEXT], &ack_held), &ack_held, decap_reason::DECAPSULATED_GUE),
            ("ACK of a connection not held, listener up, no SYN cookie: sent on", gue_with_hops(LB4, ME, &[NEXT], &ack_stranger), XDP_TX, passed_on(LB4, NEXT, &[NEXT], &ack_stranger), decap_reason::SECOND_CHANCE_NOT_HELD),
            ("ACK to a port without any socket: sent on", gue_with_hops(LB4, ME, &[NEXT], &ack_free), XDP_TX, passed_on(LB4, NEXT, &[NEXT], &ack_free), decap_reason::SECOND_CHANCE_NOT_HELD),
            local("SYN, no listener, no hop left: ours (the stack answers RST)", gue_with_hops(LB4, ME, &[], &syn_free), &syn_free, decap_reason::DECAPSULATED_GUE),
            local("SYN, no listener, next hop without neighbour: ours, counted", gue_with_hops(LB4, ME, &[NO_NEIGH], &syn_free), &syn_free, decap_reason::SECOND_CHANCE_NO_ROUTE),
            local("SYN, no listener, IPv6 hop in an IPv4 outer: ours, counted", gue_with_hops(LB4, ME, &[NEXT6], &syn_free), &syn_free, decap_reason::SECOND_CHANCE_NO_ROUTE),
            local("UDP never takes a second chance", gue_with_hops(LB4, ME, &[NEXT], &udp), &udp, decap_reason::DECAPSULATED_GUE),
            ("IPv6: SYN, no listener: sent on", gue_with_hops(LB6, ME6, &[NEXT6], &syn6_free), XDP_TX, passed_on(LB6, NEXT6, &[NEXT6], &syn6_free), decap_reason::SECOND_CHANCE_SYN),
            local("IPv6: ACK of an established connection: ours", gue_with_hops(LB6, ME6, &[NEXT6], &ack6_held), &ack6_held, decap_reason::DECAPSULATED_GUE),
            ("IPv6: ACK not held: sent on", gue_with_hops(LB6, ME6, &[NEXT6], &ack6_stranger), XDP_TX, passed_on(LB6, NEXT6, &[NEXT6], &ack6_stranger), decap_reason::SECOND_CHANCE_NOT_HELD),
            ("IPv4 VIP in an IPv6 outer: sent on", gue_with_hops(LB6, ME6, &[NEXT6], &syn_free), XDP_TX, passed_on(LB6, NEXT6, &[NEXT6], &syn_free), decap_reason::SECOND_CHANCE_SYN),
        ];
        let mut failures = Vec::new();
        for (name, input, action, want, r) in rows {
            let before = decap.counts();
            let (got, out) = decap.run_on(&input, ifindex);
            let after = decap.counts();
            let deltas: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            let mut expect = vec![0u64; after.len()];
            expect[r as usize] = 1;
            if got != action || out != want || deltas != expect {
                failures.push(format!("{name}: action {} deltas {deltas:?} (want {} {expect:?})\n  out  {}\n  want {}", action_name(got), action_name(action), hex(&out), hex(&want)));
            } else {
                println!("fixture ok: second chance: {name}");
            }
        }
        // Forwarding off on the interface: the FIB helper refuses, the packet is ours.
        sysctl(NS, "net.ipv4.conf.gu-a.forwarding", "0").expect("ipv4 forwarding off");
        let f = gue_with_hops(LB4, ME, &[NEXT], &syn_free);
        let before = decap.counts();
        let (got, out) = decap.run_on(&f, ifindex);
        let after = decap.counts();
        let r = decap_reason::SECOND_CHANCE_NO_ROUTE as usize;
        if got != XDP_PASS || out != decapsulated(&f, &syn_free) || after[r] - before[r] != 1 {
            failures.push(format!("forwarding off: action {} out {}", action_name(got), hex(&out)));
        }
        assert!(failures.is_empty(), "second-chance rows failed:\n{}", failures.join("\n"));
    });
}
