//! Telling the L2 segment where a VIP lives after a takeover: a gratuitous ARP for an
//! IPv4 VIP, an unsolicited neighbour advertisement (override flag set) for an IPv6
//! one, sent from our interface's MAC. Switches move the MAC, neighbours update their
//! caches, and traffic for the VIP reaches the new active node at once instead of
//! after the old entries expire.
//!
//! Frames are built here (unit-tested byte by byte) and sent on an AF_PACKET socket.
//! The VIP addresses themselves are added and removed over netlink (`kernel::netlink`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];

/// A gratuitous ARP request (sender = target = `vip`), the form RFC 5227 recommends.
pub fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f
}

fn csum16(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An unsolicited neighbour advertisement for `vip` to all-nodes (ff02::1), override
/// set, with our MAC as target link-layer address (RFC 4861 7.2.6).
pub fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0]; // type NA, code 0, csum, flags O
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    icmp.extend_from_slice(&mac);
    // Pseudo-header: src, dst, upper-layer length, next header 58.
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&vip.octets());
    pseudo.extend_from_slice(&all_nodes.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = csum16(&pseudo, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]); // ICMPv6, hop limit 255 (required for ND)
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The MAC of `interface` in the caller's network namespace (ioctl, not sysfs: lbd may
/// run in a namespace whose /sys shows another one's interfaces).
pub fn interface_mac(interface: &str) -> std::io::Result<[u8; 6]> {
    if interface.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("interface name {interface:?} too long")));
    }
    // SAFETY: a datagram socket only used for the ioctl below; owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the ifreq we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union member SIOCGIFHWADDR wrote.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

/// Announces `vip` on `interface` with the interface's MAC.
pub fn announce(interface: &str, vip: std::net::IpAddr) -> std::io::Result<()> {
    let mac = interface_mac(interface)?;
    let frame = match vip {
        std::net::IpAddr::V4(a) => garp_frame(mac, a),
        std::net::IpAddr::V6(a) => unsolicited_na_frame(mac, a),
    };
    send_frame(interface, &frame)
}

/// Sends `frame` as is on `interface` (in the caller's network namespace).
pub fn send_frame(interface: &str, frame: &[u8]) -> std::io::Result<()> {
    let name = std::ffi::CString::new(interface).map_err(|_| std::io::Error::other("interface name with NUL"))?;
    // SAFETY: if_nametoindex on a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: sendto with a buffer and address we own, lengths matching.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 5];

    #[test]
    fn garp_is_a_request_from_and_for_the_vip() {
        let f = garp_frame(MAC, Ipv4Addr::new(10, 0, 0, 100));
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let eth = p.link.unwrap();
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &BROADCAST);
        match eth {
            etherparse::LinkSlice::Ethernet2(e) => {
                assert_eq!(e.ether_type(), etherparse::EtherType::ARP)
            }
            _ => panic!("not ethernet"),
        }
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &[10, 0, 0, 100], "sender IP = VIP");
        assert_eq!(&f[38..42], &[10, 0, 0, 100], "target IP = VIP");
    }

    #[test]
    fn na_parses_and_its_checksum_verifies() {
        let vip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let f = unsolicited_na_frame(MAC, vip);
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else { panic!("not IPv6") };
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(ip.header().source_addr(), vip);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = p.transport else { panic!("not ICMPv6") };
        assert_eq!(icmp.type_u8(), 136);
        let want = icmp.icmp_type().calc_checksum(ip.header().source(), ip.header().destination(), icmp.payload()).unwrap();
        assert_eq!(icmp.checksum(), want, "checksum");
        let body = icmp.payload();
        assert_eq!(&body[0..16], &vip.octets(), "target = VIP");
        assert_eq!(&body[16..18], &[2, 1], "target link-layer address option");
        assert_eq!(&body[18..24], &MAC);
        assert_eq!(f[14 + 40 + 4] & 0x20, 0x20, "override flag");
    }
}
