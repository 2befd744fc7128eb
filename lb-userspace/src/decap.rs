//! The decap program on a backend: attach, detach, counters.
//!
//! Pinned under `/sys/fs/bpf/lb-decap/<interface>/` (`link`, `DECAP_STATS`), so it keeps
//! running after the command exits and survives restarts of anything else; `detach`
//! removes the pins, which detaches it.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode, links::{FdLink, PinnedLink}};
use lb_common::{Counter, decap_reason, map_names, prog_names};

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

/// Attaches the decap program to `interface` in `mode` and pins it.
pub fn attach(interface: &str, mode: XdpMode) -> anyhow::Result<()> {
    attach_program(interface, mode, prog_names::DECAP)
}

/// Attaches the XDP_PASS program instead (same pins, same `detach`): for the peer of a
/// veth on which the balancer sends with native XDP_TX.
pub fn attach_pass(interface: &str, mode: XdpMode) -> anyhow::Result<()> {
    attach_program(interface, mode, prog_names::PASS)
}

fn attach_program(interface: &str, mode: XdpMode, name: &'static str) -> anyhow::Result<()> {
    check_interface_name(interface)?;
    ensure_bpffs()?;
    let dir = pin_dir(interface);
    if dir.join("link").exists() {
        bail!("decap is already attached to {interface} (pinned at {})", dir.display());
    }
    let mut ebpf = aya::Ebpf::load(crate::objects::DECAP).context("loading the decap object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the decap object"))?
        .try_into()
        .with_context(|| format!("{name} is not XDP"))?;
    prog.load().with_context(|| format!("loading {name} into the kernel (verifier)"))?;
    let link_id = prog.attach(interface, mode).with_context(|| format!("attaching {name} to {interface}"))?;
    let link: FdLink = prog.take_link(link_id)?.try_into().context("XDP link is not an fd link")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stats = ebpf.map(map_names::DECAP_STATS).context("DECAP_STATS missing")?;
    let pinned = (|| -> anyhow::Result<()> {
        stats.pin(dir.join(map_names::DECAP_STATS)).context("pinning DECAP_STATS")?;
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
