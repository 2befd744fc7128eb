//! Decap's address filter, through BPF_PROG_TEST_RUN on the real object (root, nothing
//! pinned or attached): IPIP/IP6IP6 is decapsulated only from an allowed balancer to one
//! of this host's addresses; everything else encapsulated is dropped with its reason.

use etherparse::{IpNumber, Ipv6Header};
use lb_common::decap_reason::*;
use lb_tests::packets::*;
use lb_tests::*;

const BALANCER4: &str = "10.0.0.5";
const BALANCER6: &str = "2001:db8::5";
const OTHER4: &str = "10.0.0.66";
const OTHER6: &str = "2001:db8::66";
const HOST4: &str = "10.1.0.11";
const HOST6: &str = "2001:db8:1::11";
const CLIENT: &str = "192.0.2.10";

/// An IPv6 frame from `src` to `dst` carrying `inner` as next header 4/41.
fn ip6_frame(src: &str, dst: &str, inner: &[u8]) -> Vec<u8> {
    let nh = if inner[0] >> 4 == 6 { IpNumber(41) } else { IpNumber(4) };
    let h = Ipv6Header {
        payload_length: inner.len() as u16,
        next_header: nh,
        hop_limit: 64,
        source: src.parse::<std::net::Ipv6Addr>().unwrap().octets(),
        destination: dst.parse::<std::net::Ipv6Addr>().unwrap().octets(),
        ..Default::default()
    };
    let mut out = LB_MAC.to_vec();
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    h.write(&mut out).expect("write");
    out.extend_from_slice(inner);
    out
}

/// One row: (name, frame, whether it is decapsulated, else the drop/pass reason).
type Row = (String, Vec<u8>, u32);

fn run_rows(decap: &Decap, rows: Vec<Row>) {
    let mut failures = Vec::new();
    for (name, input, r) in rows {
        let (action, want) = match r {
            DECAPSULATED => (XDP_PASS, decap_expected(&input)),
            PASS_NOT_ENCAP => (XDP_PASS, input.clone()),
            _ => (XDP_DROP, input.clone()),
        };
        let before = decap.counts();
        let (got, out) = decap.run(&input);
        let after = decap.counts();
        let deltas: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let mut expect = vec![0u64; after.len()];
        expect[r as usize] = 1;
        if got != action || out != want || deltas != expect {
            failures.push(format!(
                "{name}: {} deltas {deltas:?} out {} (want {} {expect:?} {})",
                action_name(got),
                hex(&out),
                action_name(action),
                hex(&want)
            ));
        } else {
            println!("fixture ok: decap filter: {name}");
        }
    }
    assert!(failures.is_empty(), "decap filter fixtures failed:\n{}", failures.join("\n"));
}

#[test]
fn decapsulates_only_from_allowed_balancers_to_this_host() {
    let mut decap = Decap::load();
    decap.allow(&[BALANCER4, BALANCER6]);
    decap.local(&[HOST4, HOST6]);
    let tcp4 = v4(CLIENT, "10.0.0.100", L4::Tcp(40000, 80, Tcp::Syn), b"hello");
    let tcp6 = v6("2001:db8:c::10", "2001:db8::100", L4::Tcp(40000, 80, Tcp::Syn), b"hello");
    // What the spoofer wants delivered: a packet from the backend's own loopback.
    let spoofed = v4("127.0.0.1", "10.0.0.100", L4::Tcp(1, 80, Tcp::Syn), b"");
    let inner = |f: &[u8]| f[14..].to_vec();
    let rows: Vec<Row> = vec![
        ("ipip from the balancer to this host".into(), ipip_frame(BALANCER4, HOST4, &inner(&tcp4)), DECAPSULATED),
        ("6in4 from the balancer to this host".into(), ipip_frame(BALANCER4, HOST4, &inner(&tcp6)), DECAPSULATED),
        ("ip6ip6 from the balancer to this host".into(), ip6_frame(BALANCER6, HOST6, &inner(&tcp6)), DECAPSULATED),
        ("4in6 from the balancer to this host".into(), ip6_frame(BALANCER6, HOST6, &inner(&tcp4)), DECAPSULATED),
        ("ipip inner 127.0.0.1 from an unknown source".into(), ipip_frame(OTHER4, HOST4, &inner(&spoofed)), DROP_SOURCE_NOT_ALLOWED),
        ("ipip from an unknown source".into(), ipip_frame(OTHER4, HOST4, &inner(&tcp4)), DROP_SOURCE_NOT_ALLOWED),
        ("6in4 from an unknown source".into(), ipip_frame(OTHER4, HOST4, &inner(&tcp6)), DROP_SOURCE_NOT_ALLOWED),
        ("ip6ip6 from an unknown source".into(), ip6_frame(OTHER6, HOST6, &inner(&tcp6)), DROP_SOURCE_NOT_ALLOWED),
        ("4in6 inner 127.0.0.1 from an unknown source".into(), ip6_frame(OTHER6, HOST6, &inner(&spoofed)), DROP_SOURCE_NOT_ALLOWED),
        ("ipip from the balancer to another host".into(), ipip_frame(BALANCER4, "10.1.0.12", &inner(&tcp4)), DROP_NOT_LOCAL),
        ("ip6ip6 from the balancer to another host".into(), ip6_frame(BALANCER6, "2001:db8:1::12", &inner(&tcp6)), DROP_NOT_LOCAL),
        ("ipip from an unknown source to another host".into(), ipip_frame(OTHER4, "10.1.0.12", &inner(&tcp4)), DROP_NOT_LOCAL),
        // The IPv4 sets are keyed IPv4-mapped: an IPv6 header naming ::ffff:a.b.c.d
        // must not pass as the IPv4 balancer or host.
        ("ip6ip6 from ::ffff:<balancer>".into(), ip6_frame("::ffff:10.0.0.5", HOST6, &inner(&tcp6)), DROP_SOURCE_NOT_ALLOWED),
        ("ip6ip6 to ::ffff:<host>".into(), ip6_frame(BALANCER6, "::ffff:10.1.0.11", &inner(&tcp6)), DROP_NOT_LOCAL),
        // Not encapsulated: the filter does not apply, whoever sent it.
        ("plain TCP from anyone".into(), tcp4.clone(), PASS_NOT_ENCAP),
    ];
    run_rows(&decap, rows);

    // A new balancer list replaces the old one (as `lbd decap refresh --allow` does).
    decap.allow(&[OTHER4]);
    run_rows(
        &decap,
        vec![
            ("ipip from the new balancer".into(), ipip_frame(OTHER4, HOST4, &inner(&tcp4)), DECAPSULATED),
            ("ipip from the removed balancer".into(), ipip_frame(BALANCER4, HOST4, &inner(&tcp4)), DROP_SOURCE_NOT_ALLOWED),
            ("ip6ip6 from the removed balancer".into(), ip6_frame(BALANCER6, HOST6, &inner(&tcp6)), DROP_SOURCE_NOT_ALLOWED),
        ],
    );
}
