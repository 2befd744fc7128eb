//! Datapath fuzzing under BPF_PROG_TEST_RUN (root): valid frames of every kind the
//! balancer handles, mutated (truncations, byte flips, length fields, random tails,
//! garbage), pushed through the real balancer object. For every frame:
//! - the action is XDP_PASS, XDP_DROP or XDP_TX;
//! - PASS and DROP leave the frame byte for byte untouched;
//! - every XDP_TX output is one of: the input encapsulated (outer header well-formed,
//!   IPv4 checksum right, TOS / traffic class copied from the input, TTL 64, DF and id
//!   0 on IPv4, inner = the input's IP packet), the input with MACs rewritten
//!   (dsr-l2), or a reply (echo reply, TCP RST, ICMP error) that parses with etherparse
//!   with right IPv4/ICMP/TCP checksums and, for ICMP errors, quotes the input.
//!
//! At the end the counters add up: every pass/drop/tx action is matched by its reason
//! counter (forwarded packets by the service counters).
//!
//! Seed: fixed (printed); `LB_FUZZ_SEED=<u64>` overrides it, `LB_FUZZ_FRAMES=<n>` the
//! frame count (default 1,000,000, about 2.5 s in release).

use std::net::IpAddr;
use std::time::Instant;

use etherparse::{SlicedPacket, TransportSlice};
use lb_common::reason;
use lb_tests::packets::*;
use lb_tests::*;
use lb_userspace::Mode;

const ENCAP4: [u8; 4] = [10, 0, 0, 5];
const ENCAP6: &str = "2001:db8::5";
const BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x21];
const DSR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x41];
const DSR6_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x42];
const DEFAULT_SEED: u64 = 0x1b_f00d_5eed;

/// SplitMix64: small, fast, good enough to drive mutations; no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn setup() -> Datapath {
    let mut dp = Datapath::load();
    let c = &mut dp.control;
    let mut s = settings("10.0.0.5", ENCAP6, Some(GW_MAC), 1500);
    // Replies are tested here, not the rate limit (fixtures do that).
    s.reply_rate = 1_000_000_000;
    c.set_settings(s).unwrap();
    let four = |p: &str| (1..=4).map(|i| backend(&format!("{p}{i}"), 1, None)).collect::<Vec<_>>();
    let add = |c: &mut lb_userspace::ControlPlane<_>, name, vip, mode, bes: Vec<_>| c.add_service(service(name, vip, mode, 251), bes).unwrap();
    add(c, "web4", "10.0.0.100:80/tcp", Mode::Ipip, four("10.1.0."));
    add(c, "dns4", "10.0.0.100:53/udp", Mode::Ipip, vec![backend("10.1.0.21", 1, Some(BE_MAC))]);
    add(c, "any4", "10.0.0.101:0/tcp", Mode::Ipip, vec![backend("10.1.0.31", 1, None)]);
    add(c, "web6", "[2001:db8::100]:80/tcp", Mode::Ipip, four("2001:db8:1::1"));
    add(c, "dsr4", "10.0.0.102:80/tcp", Mode::DsrL2, vec![backend("10.1.0.41", 1, Some(DSR_MAC))]);
    add(c, "dsr6", "[2001:db8::102]:443/tcp", Mode::DsrL2, vec![backend("2001:db8:1::41", 1, Some(DSR6_MAC))]);
    add(c, "empty", "10.0.0.103:80/tcp", Mode::Ipip, vec![]);
    add(c, "empty_udp", "10.0.0.103:53/udp", Mode::Ipip, vec![]);
    add(c, "empty6", "[2001:db8::103]:0/tcp", Mode::Ipip, vec![]);
    add(c, "empty6_udp", "[2001:db8::103]:0/udp", Mode::Ipip, vec![]);
    add(c, "mixed", "10.0.0.104:80/tcp", Mode::Ipip, vec![backend("2001:db8:1::51", 1, None)]);
    add(c, "frag", "10.0.0.108:0/udp", Mode::Ipip, four("10.1.8."));
    add(c, "udp6", "[2001:db8::100]:53/udp", Mode::Ipip, vec![backend("10.1.9.1", 1, None)]);
    dp
}

/// Valid frames of every kind.
fn corpus() -> Vec<Vec<u8>> {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode};
    let c = "192.0.2.10";
    let c6 = "2001:db8:c::10";
    let mut v = Vec::new();
    for (dst, port) in [("10.0.0.100", 80), ("10.0.0.101", 8080), ("10.0.0.102", 80), ("10.0.0.103", 80), ("10.0.0.104", 80), ("10.0.0.200", 80)] {
        for t in [Tcp::Syn, Tcp::Ack, Tcp::Rst] {
            v.push(v4(c, dst, L4::Tcp(40000, port, t), b"payload"));
        }
    }
    for (dst, port) in [("10.0.0.100", 53), ("10.0.0.103", 53), ("10.0.0.108", 9999)] {
        v.push(v4(c, dst, L4::Udp(5353, port), b"query"));
        v.push(v4(c, dst, L4::Udp(5353, port), &[1u8; 700]));
    }
    for (dst, port) in [("2001:db8::100", 80), ("2001:db8::102", 443), ("2001:db8::103", 80), ("2001:db8::200", 80)] {
        for t in [Tcp::Syn, Tcp::Ack, Tcp::Rst] {
            v.push(v6(c6, dst, L4::Tcp(40000, port, t), b"payload6"));
        }
    }
    for dst in ["2001:db8::100", "2001:db8::103"] {
        v.push(v6(c6, dst, L4::Udp(5353, 53), b"q6"));
        v.push(v6(c6, dst, L4::Udp(5353, 53), &[2u8; 1300]));
    }
    // Too big (v4 DF, v6, 4in6).
    v.push(v4(c, "10.0.0.100", L4::Tcp(40001, 80, Tcp::Ack), &[0u8; 1470]));
    v.push(v6(c6, "2001:db8::100", L4::Tcp(40001, 80, Tcp::Ack), &[0u8; 1430]));
    v.push(v4(c, "10.0.0.104", L4::Tcp(40001, 80, Tcp::Ack), &[0u8; 1450]));
    // VLAN.
    let tagged: Vec<_> = v.iter().take(12).map(|f| vlan(f, 42)).collect();
    v.extend(tagged);
    v.push(vlan_tpid(&v4(c, "10.0.0.102", L4::Tcp(1, 80, Tcp::Ack), b"x"), 0x88a8, 7));
    v.push(vlan(&vlan(&v4(c, "10.0.0.100", L4::Tcp(1, 80, Tcp::Syn), b""), 1), 2));
    // ICMP: echo, errors about flows, other types.
    v.push(v4(c, "10.0.0.100", L4::IcmpEcho, b"ping"));
    v.push(vlan(&v4(c, "10.0.0.103", L4::IcmpEcho, b"ping"), 5));
    v.push(v6_echo(c6, "2001:db8::100", b"ping6"));
    v.push(v6_echo(c6, "2001:db8::103", &[7u8; 200]));
    let inner = from_vip("10.0.0.100", c, L4::Tcp(80, 40000, Tcp::Ack), &[0u8; 32]);
    v.push(v4_icmp("198.51.100.1", "10.0.0.100", Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }), &inner));
    v.push(v4_icmp("198.51.100.1", "10.0.0.100", Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port), &inner[..28]));
    v.push(v4_icmp("198.51.100.1", "10.0.0.100", Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host), &from_vip("10.0.0.100", c, L4::Udp(53, 5353), b"a")));
    let inner6 = from_vip("2001:db8::100", c6, L4::Tcp(80, 40000, Tcp::Ack), &[0u8; 32]);
    v.push(v6_icmp("2001:db8:ff::1", "2001:db8::100", Icmpv6Type::PacketTooBig { mtu: 1280 }, &inner6));
    v.push(v6_icmp("2001:db8:ff::1", "2001:db8::100", Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port), &inner6[..48]));
    v.push(v4_icmp(c, "10.0.0.100", Icmpv4Type::EchoReply(echo(1, 2)), b"r"));
    // Fragments.
    let (a, b) = v4_fragments(&v4(c, "10.0.0.108", L4::Udp(1, 2), &[3u8; 64]), 32, 0x77);
    v.push(a);
    v.push(b);
    let (a, b) = v4_fragments(&v4(c, "10.0.0.100", L4::Udp(1, 53), &[3u8; 64]), 16, 0x78);
    v.push(a);
    v.push(b);
    let (a, b) = v6_fragments(&v6(c6, "2001:db8::100", L4::Tcp(1, 80, Tcp::Ack), &[4u8; 64]), 40, 0x79);
    v.push(a);
    v.push(b);
    // Extension headers.
    let base6 = v6(c6, "2001:db8::100", L4::Tcp(2, 80, Tcp::Syn), b"");
    for chain in [&[0u8][..], &[60, 43], &[0, 60, 43, 60], &[0, 60, 43, 60, 60], &[51], &[44], &[0, 44]] {
        let mut f = base6.clone();
        for nh in chain.iter().rev() {
            f = with_ipv6_ext(&f, *nh);
        }
        v.push(f);
    }
    v.push(with_ipv6_ext(&v6(c6, "2001:db8::103", L4::Udp(1, 53), b"x"), 60));
    // Non-zero TOS / traffic class (DSCP + ECN), copied into the outer header.
    v.push(with_tos(&v4(c, "10.0.0.100", L4::Tcp(40002, 80, Tcp::Syn), b"tos"), 0xba));
    v.push(with_tos(&v4(c, "10.0.0.104", L4::Tcp(40002, 80, Tcp::Ack), b"tos"), 0x2e));
    v.push(with_tos(&v6(c6, "2001:db8::100", L4::Tcp(40002, 80, Tcp::Syn), b"tc"), 0x8b));
    v.push(with_tos(&v4(c, "10.0.0.100", L4::Udp(40002, 53), b"tos"), 0x01));
    // Others.
    v.push(v4_with_options(c, "10.0.0.100", 3, 80, &[0x94, 4, 0, 0]));
    v.push(v4_with_options(c, "10.0.0.103", 3, 80, &[1, 1, 1, 0]));
    v.push(ipip_frame(c, "10.0.0.100", &v4(c, "10.0.0.100", L4::Tcp(1, 80, Tcp::Syn), b"")[14..]));
    v.push(arp());
    v
}

fn l3_of(f: &[u8]) -> Option<usize> {
    if f.len() < 14 {
        return None;
    }
    Some(match u16::from_be_bytes([f[12], f[13]]) {
        0x8100 | 0x88a8 => 18,
        _ => 14,
    })
}

fn fix_v4(f: &mut [u8]) {
    if let Some(l3) = l3_of(f)
        && f.len() >= l3 + 20
        && f[l3] >> 4 == 4
    {
        let hl = (((f[l3] & 0x0f) as usize) * 4).max(20);
        if f.len() >= l3 + hl {
            f[l3 + 10] = 0;
            f[l3 + 11] = 0;
            let c = !fold(sum16(&f[l3..l3 + hl]));
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        match rng.below(10) {
            0 => {}
            1 => {
                let n = 14 + rng.below(f.len().saturating_sub(14).max(1));
                f.truncate(n);
            }
            2 | 3 => {
                // Flip bytes in the headers (first 100 bytes), where parsing happens.
                for _ in 0..1 + rng.below(4) {
                    let i = 12 + rng.below(f.len().min(100).saturating_sub(12).max(1));
                    if i < f.len() {
                        f[i] ^= 1 << rng.below(8);
                    }
                }
            }
            4 => {
                let i = 12 + rng.below(f.len().min(120).saturating_sub(12).max(1));
                if i < f.len() {
                    f[i] = rng.byte();
                }
                fix_v4(&mut f);
            }
            5 => {
                // IP length fields.
                if let Some(l3) = l3_of(&f)
                    && f.len() > l3 + 6
                {
                    let at = if f[l3] >> 4 == 6 { l3 + 4 } else { l3 + 2 };
                    let v = rng.below(2000) as u16;
                    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
                    fix_v4(&mut f);
                }
            }
            6 => {
                let n = rng.below(200);
                f.extend((0..n).map(|_| rng.byte()));
            }
            7 => {
                // Keep a prefix, random tail.
                let keep = 14 + rng.below(f.len().saturating_sub(14).max(1));
                f.truncate(keep);
                let n = rng.below(300);
                f.extend((0..n).map(|_| rng.byte()));
            }
            8 => {
                // Garbage behind a plausible L2 + IP version.
                let n = 14 + rng.below(1500);
                let mut g: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                g[0..6].copy_from_slice(&LB_MAC);
                let (et, ver) = [(0x0800u16, 0x45u8), (0x86dd, 0x60), (0x8100, 0x45)][rng.below(3)];
                g[12..14].copy_from_slice(&et.to_be_bytes());
                let l3 = if et == 0x8100 { 18 } else { 14 };
                if g.len() > l3 + 20 {
                    if et == 0x8100 {
                        g[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
                    }
                    g[l3] = ver;
                    if ver == 0x45 {
                        // Aim at a VIP address half of the time.
                        if rng.below(2) == 0 {
                            g[l3 + 16..l3 + 20].copy_from_slice(&[10, 0, 0, 100 + rng.below(9) as u8]);
                        }
                    } else if g.len() > l3 + 40 && rng.below(2) == 0 {
                        let vip: std::net::Ipv6Addr = "2001:db8::100".parse().unwrap();
                        g[l3 + 24..l3 + 40].copy_from_slice(&vip.octets());
                        g[l3 + 39] = [0x00, 0x02, 0x03][rng.below(3)];
                    }
                }
                f = g;
                fix_v4(&mut f);
            }
            _ => {
                // Random next header / protocol.
                if let Some(l3) = l3_of(&f)
                    && f.len() > l3 + 10
                {
                    let at = if f[l3] >> 4 == 6 { l3 + 6 } else { l3 + 9 };
                    f[at] = [0u8, 1, 4, 6, 17, 41, 43, 44, 50, 51, 58, 60, 59, rng.byte()][rng.below(14)];
                    fix_v4(&mut f);
                }
            }
        }
    }
    if f.len() < 14 {
        f.resize(14, 0);
    }
    f.truncate(1600);
    f
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Ones'-complement sum of an upper-layer packet with its pseudo-header (0xffff: valid).
fn l4_sum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let addr = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut s = sum16(&addr(src)) + sum16(&addr(dst)) + proto as u32 + (l4.len() as u32 & 0xffff) + (l4.len() as u32 >> 16);
    s += sum16(l4);
    fold(s)
}

/// The IP packet of a frame, parsed by hand with bounds checks (inputs are mutated:
/// etherparse rightly refuses many of them): addresses, protocol of the base header,
/// whether the IPv4 header checksum is right, the bytes after the base header within
/// the IP length.
struct Net<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &'a [u8],
    v4_header_ok: bool,
}

fn net(frame: &[u8]) -> Result<Net<'_>, String> {
    let l3 = l3_of(frame).ok_or("short frame")?;
    let ip = frame.get(l3..).ok_or("no IP")?;
    match ip.first().map(|v| v >> 4) {
        Some(4) if ip.len() >= 20 => {
            let hl = ((ip[0] & 0x0f) as usize) * 4;
            let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if hl < 20 || tot < hl || tot > ip.len() {
                return Err("bad IPv4 lengths".into());
            }
            let s: [u8; 4] = ip[12..16].try_into().unwrap();
            let d: [u8; 4] = ip[16..20].try_into().unwrap();
            Ok(Net { src: s.into(), dst: d.into(), proto: ip[9], l4: &ip[hl..tot], v4_header_ok: fold(sum16(&ip[..hl])) == 0xffff })
        }
        Some(6) if ip.len() >= 40 => {
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if 40 + plen > ip.len() {
                return Err("bad IPv6 length".into());
            }
            let s: [u8; 16] = ip[8..24].try_into().unwrap();
            let d: [u8; 16] = ip[24..40].try_into().unwrap();
            Ok(Net { src: s.into(), dst: d.into(), proto: ip[6], l4: &ip[40..40 + plen], v4_header_ok: true })
        }
        _ => Err("not IP".into()),
    }
}

/// What an XDP_TX output was.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Tx {
    Forwarded,
    Reply,
}

/// Checks one XDP_TX output against its input; returns what it was.
fn check_tx(input: &[u8], out: &[u8]) -> Result<Tx, String> {
    let l3_in = l3_of(input).ok_or("short input")?;
    let l3_out = l3_of(out).ok_or("short output")?;
    if l3_in != l3_out || (l3_in == 18 && out[12..16] != input[12..16]) {
        return Err("VLAN tag changed".into());
    }
    let ethertype = u16::from_be_bytes([out[l3_out - 2], out[l3_out - 1]]);
    // dsr-l2: only the MACs change.
    if out.len() == input.len() && out[12..] == input[12..] {
        if out[6..12] != input[0..6] || ![DSR_MAC, DSR6_MAC].contains(&out[0..6].try_into().unwrap()) {
            return Err("dsr-l2 MACs wrong".into());
        }
        return Ok(Tx::Forwarded);
    }
    // ipip: outer header from our encap source, the input's IP packet inside.
    let outer_len = match ethertype {
        0x0800 if out.len() > l3_out + 20 && out[l3_out + 12..l3_out + 16] == ENCAP4 => 20,
        0x86dd if out.len() > l3_out + 40 && out[l3_out + 8..l3_out + 24] == ENCAP6.parse::<std::net::Ipv6Addr>().unwrap().octets() => 40,
        _ => 0,
    };
    if outer_len != 0 {
        if out[l3_out + outer_len..] != input[l3_in..] {
            return Err("inner packet is not the input's IP packet".into());
        }
        if out[6..12] != input[0..6] {
            return Err("encap source MAC is not the address the frame was sent to".into());
        }
        let n = net(out)?;
        if !n.v4_header_ok || (outer_len == 20 && out[l3_out] != 0x45) {
            return Err("outer IPv4 header wrong".into());
        }
        if n.proto != 4 && n.proto != 41 {
            return Err(format!("outer protocol {}", n.proto));
        }
        if (n.proto == 4) != (input[l3_in] >> 4 == 4) {
            return Err("outer protocol does not match the inner family".into());
        }
        if n.l4.len() + outer_len > 1500 {
            return Err("encapsulated packet over the MTU".into());
        }
        // The outer header: the inner packet's TOS / traffic class, TTL 64, and (IPv4)
        // DF with id 0: we never fragment.
        let ip_in = &input[l3_in..];
        let tos_in = if ip_in[0] >> 4 == 4 { ip_in[1] } else { (ip_in[0] << 4) | (ip_in[1] >> 4) };
        let o = &out[l3_out..];
        let (tos_out, ttl) = if outer_len == 20 { (o[1], o[8]) } else { ((o[0] << 4) | (o[1] >> 4), o[7]) };
        if tos_out != tos_in {
            return Err(format!("outer TOS {tos_out:#04x}, inner {tos_in:#04x}"));
        }
        if ttl != 64 {
            return Err(format!("outer TTL {ttl}"));
        }
        if outer_len == 20 && (o[6..8] != [0x40, 0] || o[4..6] != [0, 0]) {
            return Err("outer IPv4 header without DF (or with an id)".into());
        }
        if outer_len == 40 && (o[1] & 0x0f != 0 || o[2..4] != [0, 0]) {
            return Err("outer IPv6 flow label not zero".into());
        }
        return Ok(Tx::Forwarded);
    }
    // A reply: back to the sender, from the address it was sent to, well-formed.
    if out[0..6] != input[6..12] || out[6..12] != input[0..6] {
        return Err("reply MACs not swapped".into());
    }
    SlicedPacket::from_ethernet(out).map_err(|e| format!("reply does not parse: {e}"))?;
    let i = net(input)?;
    let o = net(out)?;
    if o.src != i.dst || o.dst != i.src {
        return Err("reply addresses not swapped".into());
    }
    if !o.v4_header_ok {
        return Err("reply IPv4 header checksum wrong".into());
    }
    let v6 = matches!(o.src, IpAddr::V6(_));
    let icmp_ok = |n: &Net| if v6 { l4_sum(n.src, n.dst, 58, n.l4) == 0xffff } else { fold(sum16(n.l4)) == 0xffff };
    match (o.proto, o.l4.first().copied()) {
        (6, _) => {
            let p = SlicedPacket::from_ethernet(out).map_err(|e| e.to_string())?;
            let Some(TransportSlice::Tcp(t)) = p.transport else { return Err("reply TCP does not parse".into()) };
            if !t.rst() || !t.payload().is_empty() {
                return Err("TCP reply is not a bare RST".into());
            }
            if l4_sum(o.src, o.dst, 6, o.l4) != 0xffff {
                return Err("RST checksum wrong".into());
            }
        }
        (1, Some(0)) | (58, Some(129)) => {
            // Echo reply: valid checksum exactly when the request's was; same data.
            if icmp_ok(&o) != icmp_ok(&i) || o.l4.len() != i.l4.len() || o.l4[1] != i.l4[1] || o.l4[4..] != i.l4[4..] {
                return Err("echo reply checksum/data does not match the request".into());
            }
        }
        (1, Some(3)) | (58, Some(1)) | (58, Some(2)) => {
            if !icmp_ok(&o) {
                return Err("ICMP error checksum wrong".into());
            }
            let ip_in = &input[l3_in..];
            let len = if ip_in[0] >> 4 == 4 { u16::from_be_bytes([ip_in[2], ip_in[3]]) as usize } else { 40 + u16::from_be_bytes([ip_in[4], ip_in[5]]) as usize };
            let max = if v6 { 1232 } else { 548 };
            if o.l4[8..] != ip_in[..len.min(max)] {
                return Err("ICMP error does not quote the input".into());
            }
        }
        (p, t) => return Err(format!("unexpected reply protocol {p} type {t:?}")),
    }
    Ok(Tx::Reply)
}

#[test]
fn fuzz_datapath() {
    let seed = std::env::var("LB_FUZZ_SEED").ok().map(|s| s.parse::<u64>().expect("LB_FUZZ_SEED: a u64")).unwrap_or(DEFAULT_SEED);
    let frames: usize = std::env::var("LB_FUZZ_FRAMES").ok().map(|s| s.parse().expect("LB_FUZZ_FRAMES: a number")).unwrap_or(1_000_000);
    println!("fuzz: seed {seed} (LB_FUZZ_SEED={seed} reproduces), {frames} frames");
    let dp = setup();
    let corpus = corpus();
    let mut rng = Rng(seed);
    let before = dp.snapshot();
    let service_packets = |dp: &Datapath| -> u64 { dp.control.services().iter().map(|s| dp.stats.service(s.id).unwrap().packets).sum() };
    let fwd_before = service_packets(&dp);
    let reasons_before = dp.stats.reasons().unwrap();

    let start = Instant::now();
    let (mut n_pass, mut n_drop, mut n_fwd, mut n_reply) = (0u64, 0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for i in 0..frames {
        // 1 in 20 unmutated, so every valid path keeps being exercised.
        let s = &corpus[rng.below(corpus.len())];
        let f = if rng.below(20) == 0 { s.clone() } else { mutate(&mut rng, s) };
        let (action, out) = dp.run(&f);
        let verdict = match action {
            XDP_PASS | XDP_DROP => {
                if action == XDP_PASS { n_pass += 1 } else { n_drop += 1 }
                if out == f { Ok(()) } else { Err("frame modified on pass/drop".to_string()) }
            }
            XDP_TX => check_tx(&f, &out).map(|k| if k == Tx::Forwarded { n_fwd += 1 } else { n_reply += 1 }),
            a => Err(format!("action {}", action_name(a))),
        };
        if let Err(e) = verdict
            && failures.len() < 20
        {
            failures.push(format!("frame {i}: {e}\n    in  {}\n    out {}", hex(&f), hex(&out)));
        }
    }
    let elapsed = start.elapsed();

    let after = dp.stats.reasons().unwrap();
    let delta = |r: u32| after[r as usize].packets - reasons_before[r as usize].packets;
    let by_prefix = |p: &str| -> u64 { (0..reason::COUNT).filter(|r| reason::NAMES[*r as usize].starts_with(p)).map(delta).sum() };
    let fwd = service_packets(&dp) - fwd_before;
    let verdicts: u64 = (0..reason::COUNT).filter(|r| reason::is_verdict(*r)).map(delta).sum();
    println!(
        "fuzz: {frames} frames in {:.1}s: pass {n_pass}, drop {n_drop}, forwarded {n_fwd}, replies {n_reply}",
        elapsed.as_secs_f64()
    );
    let deltas = dp.snapshot().deltas(&before);
    for (k, v) in &deltas {
        if let Counted::Reason(r) = k {
            println!("fuzz:   {} +{v}", reason::NAMES[*r as usize]);
        }
    }
    assert!(failures.is_empty(), "{} bad outputs (first ones):\n{}", failures.len(), failures.join("\n"));
    assert_eq!(verdicts + fwd, frames as u64, "every frame has exactly one verdict reason or is forwarded");
    assert_eq!(by_prefix("pass_"), n_pass, "pass actions = pass_* counters");
    assert_eq!(by_prefix("drop_"), n_drop, "drop actions = drop_* counters");
    assert_eq!(by_prefix("tx_"), n_reply, "replies = tx_* counters");
    assert_eq!(fwd, n_fwd, "forwarded = service counters");
    assert!(n_fwd > 0 && n_reply > 0 && n_pass > 0 && n_drop > 0, "every outcome reached");
    for r in [reason::TX_ECHO_REPLY, reason::TX_RST, reason::TX_PORT_UNREACHABLE, reason::TX_TOO_BIG, reason::FWD_ICMP_ERROR, reason::FWD_FRAGMENT] {
        assert!(delta(r) > 0, "{} never reached", reason::NAMES[r as usize]);
    }
}
