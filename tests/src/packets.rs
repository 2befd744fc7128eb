//! Frames for fixtures, built with etherparse, and the expected outputs, derived from
//! the input independently of the datapath's code.

use etherparse::{IpDscp, IpEcn, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Header, PacketBuilder};
use std::net::IpAddr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
/// The balancer interface's MAC: clients (or the router) send VIP traffic to it.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
/// Default gateway for ipip backends without a MAC.
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[derive(Clone, Copy, Debug)]
pub enum Tcp {
    Syn,
    Ack,
    Rst,
}

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp(u16, u16, Tcp),
    Udp(u16, u16),
    IcmpEcho,
}

fn v4_octets(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().expect("IPv4 address").octets()
}

fn v6_octets(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().expect("IPv6 address").octets()
}

/// Client -> balancer frame with an IPv4 packet.
pub fn v4(src: &str, dst: &str, l4: L4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(v4_octets(src), v4_octets(dst), 64);
    finish(b, l4, payload)
}

/// Client -> balancer frame with an IPv6 packet.
pub fn v6(src: &str, dst: &str, l4: L4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(v6_octets(src), v6_octets(dst), 64);
    finish(b, l4, payload)
}

/// Client -> balancer IPv4 TCP SYN whose header carries `options` (IHL > 5).
pub fn v4_with_options(src: &str, dst: &str, sport: u16, dport: u16, options: &[u8]) -> Vec<u8> {
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, v4_octets(src), v4_octets(dst)).expect("header");
    h.options = Ipv4Options::try_from(options).expect("options: multiple of 4, at most 40 bytes");
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ip(IpHeaders::Ipv4(h, Default::default()));
    finish(b, L4::Tcp(sport, dport, Tcp::Syn), b"")
}

fn finish(b: etherparse::PacketBuilderStep<IpHeaders>, l4: L4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match l4 {
        L4::Tcp(s, d, flags) => {
            let t = b.tcp(s, d, 1000, 64240);
            let t = match flags {
                Tcp::Syn => t.syn(),
                Tcp::Ack => t.ack(5000),
                Tcp::Rst => t.rst(),
            };
            t.write(&mut out, payload).expect("write tcp");
        }
        L4::Udp(s, d) => b.udp(s, d).write(&mut out, payload).expect("write udp"),
        L4::IcmpEcho => b.icmpv4_echo_request(7, 1).write(&mut out, payload).expect("write icmp"),
    }
    out
}

/// Inserts one 802.1Q tag (VLAN `vid`) after the MAC addresses.
pub fn vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    vlan_tpid(frame, 0x8100, vid)
}

/// Inserts a tag with the given TPID (0x8100 or 0x88a8).
pub fn vlan_tpid(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// Offset of the IP header (after one optional tag).
pub fn l3_offset(frame: &[u8]) -> usize {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x8100 | 0x88a8 => 18,
        _ => 14,
    }
}

/// Length of the IP packet at `l3` according to its header.
fn ip_len(frame: &[u8], l3: usize) -> usize {
    match frame[l3] >> 4 {
        4 => u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as usize,
        6 => 40 + u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) as usize,
        v => panic!("not IP (version {v})"),
    }
}

/// Recomputes the IPv4 header checksum at `l3` (after a test edited the header).
pub fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let (h, _) = Ipv4Header::from_slice(&frame[l3..]).expect("IPv4 header");
    let c = h.calc_header_checksum();
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// What the balancer must emit in ipip mode for `input`: the input's IP packet (and any
/// trailing bytes) behind a new outer header from `outer_src` to `outer_dst`, in a frame
/// from `our_mac` to `next_hop`, with the input's VLAN tag kept.
pub fn ipip_expected(input: &[u8], outer_src: &str, outer_dst: &str, next_hop: [u8; 6], our_mac: [u8; 6]) -> Vec<u8> {
    encap_expected(input, outer_src, outer_dst, next_hop, our_mac, None, None)
}

/// What the balancer must emit in gue mode for `input` (a TCP or UDP packet without
/// IPv6 extension headers): as `ipip_expected`, with protocol 17, then UDP from the
/// flow hash's port to `port` (checksum 0), GUE variant 0 (hlen 1, proto 4/41, flags 0)
/// and an empty version-1 hop list (lb_common::gue) before the inner packet.
pub fn gue_expected(input: &[u8], outer_src: &str, outer_dst: &str, next_hop: [u8; 6], our_mac: [u8; 6], port: u16) -> Vec<u8> {
    encap_expected(input, outer_src, outer_dst, next_hop, our_mac, Some(port), None)
}

/// `gue_expected` with one hop (the slot's secondary, `hop`) in the hop list: GUE hlen
/// 5, hops 1, next 0, then the hop's 16-byte address (IPv4-mapped for IPv4).
pub fn gue_expected_hop(input: &[u8], outer_src: &str, outer_dst: &str, next_hop: [u8; 6], our_mac: [u8; 6], port: u16, hop: &str) -> Vec<u8> {
    encap_expected(input, outer_src, outer_dst, next_hop, our_mac, Some(port), Some(hop.parse().expect("hop")))
}

/// The client flow of a TCP/UDP frame, as the balancer keys it.
pub fn flow_of(frame: &[u8]) -> lb_common::FlowKey {
    let l3 = l3_offset(frame);
    let b = &frame[l3..];
    let (proto, l4) = if b[0] >> 4 == 4 { (b[9], ((b[0] & 0x0f) as usize) * 4) } else { (b[6], 40) };
    assert!(proto == 6 || proto == 17, "flow_of: protocol {proto} is not TCP/UDP (or an IPv6 extension header)");
    let (src, dst) = ip_addrs(frame);
    let port = |o: usize| u16::from_be_bytes([b[l4 + o], b[l4 + o + 1]]);
    lb_common::FlowKey::new(src, port(0), dst, port(2), proto)
}

fn encap_expected(input: &[u8], outer_src: &str, outer_dst: &str, next_hop: [u8; 6], our_mac: [u8; 6], gue_port: Option<u16>, hop: Option<IpAddr>) -> Vec<u8> {
    let l3 = l3_offset(input);
    let inner = &input[l3..];
    let len = ip_len(input, l3);
    let inner_v6 = inner[0] >> 4 == 6;
    let tos = if inner_v6 { (inner[0] << 4) | (inner[1] >> 4) } else { inner[1] };
    let inner_proto = if inner_v6 { IpNumber(41) } else { IpNumber(4) };
    let hops = hop.is_some() as usize;
    let (proto, extra) = if gue_port.is_some() { (IpNumber::UDP, lb_common::gue::overhead(hops)) } else { (inner_proto, 0) };
    let dst: IpAddr = outer_dst.parse().expect("outer dst");
    let mut out = next_hop.to_vec();
    out.extend_from_slice(&our_mac);
    if l3 == 18 {
        out.extend_from_slice(&input[12..16]);
    }
    match dst {
        IpAddr::V4(d) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut h = Ipv4Header::new((len + extra) as u16, 64, proto, v4_octets(outer_src), d.octets()).expect("outer v4");
            h.dscp = IpDscp::try_new(tos >> 2).expect("dscp");
            h.ecn = IpEcn::try_new(tos & 3).expect("ecn");
            h.identification = 0;
            h.dont_fragment = true;
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out).expect("write outer v4");
        }
        IpAddr::V6(d) => {
            out.extend_from_slice(&0x86DDu16.to_be_bytes());
            let h = Ipv6Header {
                traffic_class: tos,
                flow_label: Default::default(),
                payload_length: (len + extra) as u16,
                next_header: proto,
                hop_limit: 64,
                source: v6_octets(outer_src),
                destination: d.octets(),
            };
            h.write(&mut out).expect("write outer v6");
        }
    }
    if let Some(port) = gue_port {
        let sport = lb_common::gue::source_port(lb_common::flow_hash(&flow_of(input)));
        let udp = etherparse::UdpHeader { source_port: sport, destination_port: port, length: (len + extra) as u16, checksum: 0 };
        udp.write(&mut out).expect("write udp");
        // GUE: ver 0, C 0, hlen 1 + 4 per hop (the hop list's words); proto; flags 0.
        out.extend_from_slice(&[1 + 4 * hops as u8, inner_proto.0, 0, 0]);
        // Hop list: version 1, hops, next 0, reserved; the hop's address.
        out.extend_from_slice(&[lb_common::gue::HOPS_VERSION, hops as u8, 0, 0]);
        if let Some(h) = hop {
            out.extend_from_slice(&lb_common::addr_bytes(h));
        }
    }
    out.extend_from_slice(inner);
    out
}

/// What the balancer must emit in dsr-l2 mode: destination MAC := backend's, source
/// MAC := the address the frame was sent to; nothing else changes.
pub fn dsr_expected(input: &[u8], backend_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[6..12].copy_from_slice(&input[0..6]);
    out[0..6].copy_from_slice(&backend_mac);
    out
}

/// What the decap program must emit for an encapsulated frame: same MACs (and tag), the
/// inner packet's EtherType, the inner packet.
pub fn decap_expected(encapsulated: &[u8]) -> Vec<u8> {
    let l3 = l3_offset(encapsulated);
    let outer_len = match encapsulated[l3] >> 4 {
        4 => ((encapsulated[l3] & 0x0f) as usize) * 4,
        _ => 40,
    };
    let inner = &encapsulated[l3 + outer_len..];
    let mut out = encapsulated[..l3 - 2].to_vec();
    let ethertype: u16 = if inner[0] >> 4 == 6 { 0x86DD } else { 0x0800 };
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

/// Inserts an IPv6 extension header of `nh_type` (8 bytes) right after the IPv6 header.
pub fn with_ipv6_ext(frame: &[u8], nh_type: u8) -> Vec<u8> {
    let l3 = l3_offset(frame);
    let next = frame[l3 + 6];
    let mut out = frame[..l3 + 40].to_vec();
    out[l3 + 6] = nh_type;
    let plen = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + 8;
    out[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
    if nh_type == 44 {
        // Fragment header: offset 0, more fragments, id 0x1234.
        out.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0x12, 0x34]);
    } else {
        // Options header with a PadN option filling it.
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[l3 + 40..]);
    out
}

/// A UDP frame from `src` to `dst` (both IPv4 or both IPv6) to port `dport` whose
/// payload is `gue` (the 4-byte GUE header), `private` (the hop list) and `inner`.
pub fn gue_frame(src: &str, dst: &str, dport: u16, gue: [u8; 4], private: &[u8], inner: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let b = match (src.parse::<IpAddr>().expect("src"), dst.parse::<IpAddr>().expect("dst")) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("gue_frame: mixed families"),
    };
    let b = b.udp(49152, dport);
    let mut payload = gue.to_vec();
    payload.extend_from_slice(private);
    payload.extend_from_slice(inner);
    let mut out = Vec::new();
    b.write(&mut out, &payload).expect("write");
    out
}

/// An IPv4 frame from `src` to `dst` carrying `inner` (an IP packet) as protocol 4/41.
pub fn ipip_frame(src: &str, dst: &str, inner: &[u8]) -> Vec<u8> {
    let proto = if inner[0] >> 4 == 6 { IpNumber(41) } else { IpNumber(4) };
    let mut h = Ipv4Header::new(inner.len() as u16, 64, proto, v4_octets(src), v4_octets(dst)).expect("header");
    h.header_checksum = h.calc_header_checksum();
    let mut out = LB_MAC.to_vec();
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    h.write(&mut out).expect("write");
    out.extend_from_slice(inner);
    out
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 100]);
    f
}

// ---------------------------------------------------------------------------------
// Datapath completeness: ICMP, fragments, extension headers, generated replies. The
// expected replies are built with etherparse from the input's fields.
// ---------------------------------------------------------------------------------

use etherparse::{
    Icmpv4Type, Icmpv6Type, IcmpEchoHeader, NetSlice, SlicedPacket, TransportSlice,
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode,
};

/// The input's IP source and destination.
fn ip_addrs(frame: &[u8]) -> (IpAddr, IpAddr) {
    let l3 = l3_offset(frame);
    let b = &frame[l3..];
    if b[0] >> 4 == 4 {
        let s: [u8; 4] = b[12..16].try_into().unwrap();
        let d: [u8; 4] = b[16..20].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d))
    } else {
        let s: [u8; 16] = b[8..24].try_into().unwrap();
        let d: [u8; 16] = b[24..40].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d))
    }
}

/// Re-inserts the input's VLAN tag (if any) into an untagged frame.
fn retag(input: &[u8], untagged: Vec<u8>) -> Vec<u8> {
    if l3_offset(input) == 14 {
        return untagged;
    }
    let mut out = untagged[..12].to_vec();
    out.extend_from_slice(&input[12..16]);
    out.extend_from_slice(&untagged[12..]);
    out
}

/// Start of a reply to `input`: MACs swapped, IP from its destination to its source,
/// TTL/hop limit 64, IPv4 id 0 with DF as given.
fn reply_ip(input: &[u8], proto: IpNumber, df: bool) -> etherparse::PacketBuilderStep<IpHeaders> {
    let dst_mac: [u8; 6] = input[6..12].try_into().unwrap();
    let src_mac: [u8; 6] = input[0..6].try_into().unwrap();
    let b = PacketBuilder::ethernet2(src_mac, dst_mac);
    match ip_addrs(input) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(0, 64, proto, d.octets(), s.octets()).expect("v4");
            h.dont_fragment = df;
            b.ip(IpHeaders::Ipv4(h, Default::default()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(d.octets(), s.octets(), 64),
        _ => unreachable!(),
    }
}

/// The RST the balancer must send for a TCP segment to a service without backends
/// (RFC 793: ACK set -> seq = its ack; else seq 0, ack = seq + len (+SYN, +FIN), RST|ACK).
pub fn rst_expected(input: &[u8]) -> Vec<u8> {
    let p = SlicedPacket::from_ethernet(input).expect("parse");
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("not tcp") };
    let seg = t.payload().len() as u32 + t.syn() as u32 + t.fin() as u32;
    let b = reply_ip(input, IpNumber::TCP, true);
    let mut out = Vec::new();
    if t.ack() {
        b.tcp(t.destination_port(), t.source_port(), t.acknowledgment_number(), 0).rst().write(&mut out, &[]).unwrap();
    } else {
        b.tcp(t.destination_port(), t.source_port(), 0, 0).rst().ack(t.sequence_number().wrapping_add(seg)).write(&mut out, &[]).unwrap();
    }
    retag(input, out)
}

/// The start of `input`'s IP packet an ICMP error quotes (576 / 1280 bytes in all).
fn quote(input: &[u8]) -> &[u8] {
    let l3 = l3_offset(input);
    let len = ip_len(input, l3);
    let max = if input[l3] >> 4 == 4 { 576 - 28 } else { 1280 - 48 };
    &input[l3..l3 + len.min(max)]
}

/// ICMP port unreachable (IPv4) / ICMPv6 destination unreachable code 4 for `input`.
pub fn port_unreachable_expected(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match ip_addrs(input).0 {
        IpAddr::V4(_) => reply_ip(input, IpNumber::ICMP, false)
            .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
            .write(&mut out, quote(input))
            .unwrap(),
        IpAddr::V6(_) => reply_ip(input, IpNumber::IPV6_ICMP, false)
            .icmpv6(Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port))
            .write(&mut out, quote(input))
            .unwrap(),
    }
    retag(input, out)
}

/// ICMP fragmentation needed / ICMPv6 packet too big with `mtu` for `input`.
pub fn too_big_expected(input: &[u8], mtu: u32) -> Vec<u8> {
    let mut out = Vec::new();
    match ip_addrs(input).0 {
        IpAddr::V4(_) => reply_ip(input, IpNumber::ICMP, false)
            .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu as u16 }))
            .write(&mut out, quote(input))
            .unwrap(),
        IpAddr::V6(_) => reply_ip(input, IpNumber::IPV6_ICMP, false)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu })
            .write(&mut out, quote(input))
            .unwrap(),
    }
    retag(input, out)
}

/// The echo reply to an echo request: MACs and addresses swapped, TTL / hop limit 64,
/// the rest of the IPv4 header (id, flags, TOS) kept, same id/seq/data.
pub fn echo_reply_expected(input: &[u8]) -> Vec<u8> {
    let p = SlicedPacket::from_ethernet(input).expect("parse");
    let dst_mac: [u8; 6] = input[6..12].try_into().unwrap();
    let src_mac: [u8; 6] = input[0..6].try_into().unwrap();
    let b = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut out = Vec::new();
    match (p.net.expect("ip"), p.transport.expect("icmp")) {
        (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp)) => {
            let mut h = ip.header().to_header();
            std::mem::swap(&mut h.source, &mut h.destination);
            h.time_to_live = 64;
            let Icmpv4Type::EchoRequest(e) = icmp.icmp_type() else { panic!("not an echo request") };
            b.ip(IpHeaders::Ipv4(h, Default::default())).icmpv4(Icmpv4Type::EchoReply(e)).write(&mut out, icmp.payload()).unwrap();
        }
        (NetSlice::Ipv6(ip), TransportSlice::Icmpv6(icmp)) => {
            let h = ip.header();
            let Icmpv6Type::EchoRequest(e) = icmp.icmp_type() else { panic!("not an echo request") };
            b.ipv6(h.destination(), h.source(), 64).icmpv6(Icmpv6Type::EchoReply(e)).write(&mut out, icmp.payload()).unwrap();
        }
        _ => panic!("not ICMP"),
    }
    retag(input, out)
}

/// Client -> balancer ICMPv6 echo request.
pub fn v6_echo(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(v6_octets(src), v6_octets(dst), 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// Client -> balancer ICMP message of any type (IPv4).
pub fn v4_icmp(src: &str, dst: &str, t: Icmpv4Type, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(v4_octets(src), v4_octets(dst), 64).icmpv4(t).write(&mut out, payload).unwrap();
    out
}

/// Client -> balancer ICMPv6 message of any type.
pub fn v6_icmp(src: &str, dst: &str, t: Icmpv6Type, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(v6_octets(src), v6_octets(dst), 64).icmpv6(t).write(&mut out, payload).unwrap();
    out
}

/// The IP packet (no L2) a backend sends from the VIP to the client (direct server
/// return): what an ICMP error about the flow quotes.
pub fn from_vip(vip: &str, client: &str, l4: L4, payload: &[u8]) -> Vec<u8> {
    let f = if vip.contains(':') { v6(vip, client, l4, payload) } else { v4(vip, client, l4, payload) };
    f[14..].to_vec()
}

/// Echo request/reply header shorthand.
pub fn echo(id: u16, seq: u16) -> IcmpEchoHeader {
    IcmpEchoHeader { id, seq }
}

/// Splits the IPv4 packet of `frame` into two fragments (id `id`): the first carries
/// `split` bytes of the IP payload (a multiple of 8), the second the rest.
pub fn v4_fragments(frame: &[u8], split: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(split % 8, 0);
    let l3 = l3_offset(frame);
    let hl = ((frame[l3] & 0x0f) as usize) * 4;
    let len = ip_len(frame, l3);
    let payload = &frame[l3 + hl..l3 + len];
    let make = |data: &[u8], off: usize, mf: bool| {
        let mut f = frame[..l3 + hl].to_vec();
        f[l3 + 2..l3 + 4].copy_from_slice(&((hl + data.len()) as u16).to_be_bytes());
        f[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
        let frag = ((off / 8) as u16) | if mf { 0x2000 } else { 0 };
        f[l3 + 6..l3 + 8].copy_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(data);
        fix_ipv4_checksum(&mut f, l3);
        f
    };
    (make(&payload[..split], 0, true), make(&payload[split..], split, false))
}

/// Splits the IPv6 packet of `frame` (no extension headers) into two fragments with a
/// fragment header (id `id`); the first carries `split` bytes of the payload.
pub fn v6_fragments(frame: &[u8], split: usize, id: u32) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(split % 8, 0);
    let l3 = l3_offset(frame);
    let nh = frame[l3 + 6];
    let len = ip_len(frame, l3);
    let payload = &frame[l3 + 40..l3 + len];
    let make = |data: &[u8], off: usize, m: bool| {
        let mut f = frame[..l3 + 40].to_vec();
        f[l3 + 6] = 44;
        f[l3 + 4..l3 + 6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[nh, 0]);
        f.extend_from_slice(&((off as u16) | m as u16).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(data);
        f
    };
    (make(&payload[..split], 0, true), make(&payload[split..], split, false))
}

/// The same frame with the IP packet's TOS / traffic class set to `tos` (DSCP and ECN):
/// the balancer copies it into the outer header.
pub fn with_tos(frame: &[u8], tos: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    let l3 = l3_offset(&f);
    if f[l3] >> 4 == 4 {
        f[l3 + 1] = tos;
        fix_ipv4_checksum(&mut f, l3);
    } else {
        f[l3] = 0x60 | (tos >> 4);
        f[l3 + 1] = (tos << 4) | (f[l3 + 1] & 0x0f);
    }
    f
}
