//! The decap program on a backend: attach, detach, counters, and its two address sets.
//!
//! Pinned under `/sys/fs/bpf/lb-decap/<interface>/` (`link`, `DECAP_STATS`,
//! `DECAP_ALLOW`, `DECAP_LOCAL`, `DECAP_GUE_PORTS`), so it keeps running after the command exits and
//! survives restarts of anything else; `detach` removes the pins, which detaches it.
//!
//! It decapsulates only packets from an allowed balancer (`DECAP_ALLOW`, given at
//! attach) to one of this host's addresses (`DECAP_LOCAL`). The host's addresses are
//! read from the kernel (getifaddrs, i.e. netlink) at attach and written to the map;
//! `refresh` rewrites both sets after an address change. The datapath cannot ask the
//! kernel itself: `bpf_fib_lookup` refuses on interfaces without forwarding (most
//! backends) and would count broadcast addresses as local.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
};
use lb_common::{Counter, DECAP_MAX_ALLOW, DECAP_MAX_GUE_PORTS, DECAP_MAX_LOCAL, addr_from_words, addr_words, decap_reason, map_names, prog_names};

/// One of the decap program's address sets (`DECAP_ALLOW`, `DECAP_LOCAL`).
pub type AddrSet<T> = BpfHashMap<T, [u32; 4], u32>;

pub const PIN_ROOT: &str = "/sys/fs/bpf/lb-decap";

pub fn pin_dir(interface: &str) -> PathBuf {
    PathBuf::from(PIN_ROOT).join(interface)
}

fn check_interface_name(interface: &str) -> anyhow::Result<()> {
    if interface.is_empty() || interface.len() > 15 || interface.contains('/') || interface.starts_with('.') {
        bail!("bad interface name {interface:?}");
    }
    Ok(())
}

/// Mounts the BPF filesystem on /sys/fs/bpf unless it is there (minimal hosts and
/// fresh network namespaces' mount trees may lack it).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: plain mount(2) call with static C strings.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), path.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mounting bpffs on /sys/fs/bpf: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Parses the balancers' addresses from `--allow` values (each may hold several,
/// comma-separated) and an optional file (addresses separated by white space or commas,
/// `#` starts a comment). At least one is required: decapsulating from anyone is what
/// the allow-list exists to prevent.
pub fn parse_allow(values: &[String], file: Option<&Path>) -> anyhow::Result<Vec<IpAddr>> {
    let mut words: Vec<(String, String)> = Vec::new();
    for v in values {
        words.extend(v.split(',').map(|w| (w.trim().to_string(), "--allow".to_string())));
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let at = format!("{}:{}", f.display(), n + 1);
            words.extend(line.split(|c: char| c == ',' || c.is_whitespace()).map(|w| (w.to_string(), at.clone())));
        }
    }
    let mut out = BTreeSet::new();
    for (w, at) in words.into_iter().filter(|(w, _)| !w.is_empty()) {
        let a: IpAddr = w.parse().map_err(|_| anyhow::anyhow!("{at}: {w:?} is not an IP address"))?;
        let a = a.to_canonical();
        if a.is_unspecified() || a.is_multicast() || a == IpAddr::from([255, 255, 255, 255]) {
            bail!("{at}: {a} cannot be a balancer's address");
        }
        out.insert(a);
    }
    if out.is_empty() {
        bail!("no balancer address given: --allow ADDR[,ADDR...] or --allow-file FILE (decap accepts IPIP only from them)");
    }
    if out.len() > DECAP_MAX_ALLOW as usize {
        bail!("{} balancer addresses: at most {DECAP_MAX_ALLOW}", out.len());
    }
    Ok(out.into_iter().collect())
}

/// This host's addresses (every interface of this network namespace), the outer
/// destinations decap accepts. Loopback addresses are left out: no balancer sends to
/// them, and accepting them would only widen what a spoofer can aim at.
pub fn host_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut out = BTreeSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!("reading this host's addresses (getifaddrs): {}", std::io::Error::last_os_error());
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned; ifa_addr may be null.
        let (addr, next) = unsafe { ((*p).ifa_addr, (*p).ifa_next) };
        if !addr.is_null() {
            // SAFETY: sa_family says which sockaddr this is.
            let a = match i32::from(unsafe { (*addr).sa_family }) {
                libc::AF_INET => Some(IpAddr::from(unsafe { (*(addr as *const libc::sockaddr_in)).sin_addr.s_addr }.to_ne_bytes())),
                libc::AF_INET6 => Some(IpAddr::from(unsafe { (*(addr as *const libc::sockaddr_in6)).sin6_addr.s6_addr })),
                _ => None,
            };
            if let Some(a) = a.filter(|a| !a.is_loopback()) {
                out.insert(a);
            }
        }
        p = next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    if out.len() > DECAP_MAX_LOCAL as usize {
        bail!("this host has {} addresses: decap holds at most {DECAP_MAX_LOCAL}", out.len());
    }
    Ok(out.into_iter().collect())
}

/// Makes `set` hold exactly `addrs`: new entries first, then stale ones removed, so an
/// address in both the old and the new set is never missing in between.
pub fn write_set<T: std::borrow::BorrowMut<MapData>>(set: &mut AddrSet<T>, addrs: &[IpAddr]) -> anyhow::Result<()> {
    let want: BTreeSet<[u32; 4]> = addrs.iter().map(|a| addr_words(*a)).collect();
    for k in &want {
        set.insert(k, 1, 0).with_context(|| format!("adding {}", addr_from_words(k)))?;
    }
    let stale: Vec<[u32; 4]> = set.keys().filter_map(Result::ok).filter(|k| !want.contains(k)).collect();
    for k in &stale {
        set.remove(k).with_context(|| format!("removing {}", addr_from_words(k)))?;
    }
    Ok(())
}

/// The addresses in one of the sets, sorted.
pub fn read_set<T: std::borrow::Borrow<MapData>>(set: &AddrSet<T>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = set.keys().filter_map(Result::ok).map(|k| addr_from_words(&k)).collect();
    v.sort();
    v
}

/// Attaches the decap program to `interface` in `mode` and pins it; it decapsulates
/// only from the balancers in `allow` to this host's addresses. GUE is read on the
/// default port (6080); `attach_gue` takes others.
pub fn attach(interface: &str, mode: XdpMode, allow: &[IpAddr]) -> anyhow::Result<()> {
    attach_gue(interface, mode, allow, &[lb_common::gue::DEFAULT_PORT])
}

/// `attach`, reading UDP to `gue_ports` as GUE (the ports of the balancers' `gue`
/// services); UDP to any other port passes untouched.
pub fn attach_gue(interface: &str, mode: XdpMode, allow: &[IpAddr], gue_ports: &[u16]) -> anyhow::Result<()> {
    if allow.is_empty() {
        bail!("no balancer address to allow: decap would drop every IPIP packet");
    }
    let local = host_addresses()?;
    attach_program(interface, mode, prog_names::DECAP, |ebpf| {
        write_set(&mut addr_set(ebpf, map_names::DECAP_ALLOW)?, allow).context("writing DECAP_ALLOW")?;
        write_set(&mut addr_set(ebpf, map_names::DECAP_LOCAL)?, &local).context("writing DECAP_LOCAL")?;
        write_gue_ports(ebpf, gue_ports)
    })
}

/// Writes the GUE ports of a loaded decap object (`DECAP_GUE_PORTS`, network order).
pub fn write_gue_ports(ebpf: &mut aya::Ebpf, ports: &[u16]) -> anyhow::Result<()> {
    if ports.len() > DECAP_MAX_GUE_PORTS as usize || ports.contains(&0) {
        bail!("GUE ports {ports:?}: 1 to {DECAP_MAX_GUE_PORTS} ports, each 1-65535");
    }
    let name = map_names::DECAP_GUE_PORTS;
    let m = ebpf.map_mut(name).with_context(|| format!("{name} missing from the decap object"))?;
    let mut set: BpfHashMap<_, u16, u32> = BpfHashMap::try_from(m).with_context(|| format!("{name} is not a hash of ports"))?;
    for p in ports {
        set.insert(p.to_be(), 1, 0).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// Attaches the XDP_PASS program instead (same pins, same `detach`): for the peer of a
/// veth on which the balancer sends with native XDP_TX.
pub fn attach_pass(interface: &str, mode: XdpMode) -> anyhow::Result<()> {
    attach_program(interface, mode, prog_names::PASS, |_| Ok(()))
}

fn addr_set<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<AddrSet<&'a mut MapData>> {
    let m = ebpf.map_mut(name).with_context(|| format!("{name} missing from the decap object"))?;
    AddrSet::try_from(m).with_context(|| format!("{name} is not a hash of addresses"))
}

/// Rewrites the host's addresses in `DECAP_LOCAL` (after an address change) and, when
/// `allow` is given, the balancers in `DECAP_ALLOW`. Returns (allowed, local) counts.
pub fn refresh(interface: &str, allow: Option<&[IpAddr]>) -> anyhow::Result<(usize, usize)> {
    check_interface_name(interface)?;
    let local = host_addresses()?;
    let mut local_set = pinned_set(interface, map_names::DECAP_LOCAL)?;
    let mut allow_set = pinned_set(interface, map_names::DECAP_ALLOW)?;
    if let Some(a) = allow {
        if a.is_empty() {
            bail!("no balancer address to allow");
        }
        write_set(&mut allow_set, a).context("writing DECAP_ALLOW")?;
    }
    write_set(&mut local_set, &local).context("writing DECAP_LOCAL")?;
    Ok((read_set(&allow_set).len(), local.len()))
}

/// The allowed balancers and the local addresses decap on `interface` uses now.
pub fn filter(interface: &str) -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    check_interface_name(interface)?;
    Ok((read_set(&pinned_set(interface, map_names::DECAP_ALLOW)?), read_set(&pinned_set(interface, map_names::DECAP_LOCAL)?)))
}

fn pinned_set(interface: &str, name: &str) -> anyhow::Result<AddrSet<MapData>> {
    let path = pin_dir(interface).join(name);
    let map = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is decap attached? one attached by an older lbd has no address sets: detach and attach it again)",
            path.display()
        )
    })?;
    AddrSet::try_from(aya::maps::Map::HashMap(map)).with_context(|| format!("{name} is not a hash of addresses"))
}

fn attach_program(
    interface: &str,
    mode: XdpMode,
    name: &'static str,
    fill: impl FnOnce(&mut aya::Ebpf) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    check_interface_name(interface)?;
    ensure_bpffs()?;
    let dir = pin_dir(interface);
    if dir.join("link").exists() {
        bail!("decap is already attached to {interface} (pinned at {})", dir.display());
    }
    let mut ebpf = aya::Ebpf::load(crate::objects::DECAP).context("loading the decap object")?;
    // Filled before the program can see a packet: attached with empty sets it would
    // drop every IPIP packet for a moment.
    fill(&mut ebpf)?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the decap object"))?
        .try_into()
        .with_context(|| format!("{name} is not XDP"))?;
    prog.load().with_context(|| format!("loading {name} into the kernel (verifier)"))?;
    let link_id = prog.attach(interface, mode).with_context(|| format!("attaching {name} to {interface}"))?;
    let link: FdLink = prog.take_link(link_id)?.try_into().context("XDP link is not an fd link")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pinned = (|| -> anyhow::Result<()> {
        for m in [map_names::DECAP_STATS, map_names::DECAP_ALLOW, map_names::DECAP_LOCAL, map_names::DECAP_GUE_PORTS] {
            let map = ebpf.map(m).with_context(|| format!("{m} missing"))?;
            map.pin(dir.join(m)).with_context(|| format!("pinning {m}"))?;
        }
        link.pin(dir.join("link")).context("pinning the XDP link")?;
        Ok(())
    })();
    if let Err(e) = pinned {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(())
}

/// Detaches the decap program from `interface` and removes its pins.
pub fn detach(interface: &str) -> anyhow::Result<()> {
    check_interface_name(interface)?;
    let dir = pin_dir(interface);
    let link_path = dir.join("link");
    if !link_path.exists() {
        bail!("decap is not attached to {interface} (no pin at {})", link_path.display());
    }
    let link = PinnedLink::from_pin(&link_path).with_context(|| format!("opening {}", link_path.display()))?;
    // Unpinning drops the last reference: the kernel detaches the program.
    drop(link.unpin().context("unpinning the XDP link")?);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    // Leave nothing behind once the last interface is detached (fails while others remain).
    let _ = std::fs::remove_dir(PIN_ROOT);
    Ok(())
}

/// The decap counters of `interface`, indexed by `decap_reason`.
pub fn stats(interface: &str) -> anyhow::Result<Vec<(&'static str, Counter)>> {
    check_interface_name(interface)?;
    let path = pin_dir(interface).join(map_names::DECAP_STATS);
    let map = MapData::from_pin(&path).with_context(|| format!("opening {} (is decap attached?)", path.display()))?;
    let arr: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))?;
    (0..decap_reason::COUNT)
        .map(|r| {
            let v = arr.get(&r, 0)?;
            Ok((decap_reason::NAMES[r as usize], crate::stats::sum_counters(v.iter())))
        })
        .collect()
}
