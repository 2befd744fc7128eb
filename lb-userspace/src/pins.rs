//! The balancer's life on bpffs: maps and one XDP link per interface pinned under
//! `/sys/fs/bpf/<instance>/`, so the datapath keeps forwarding while lbd is stopped,
//! restarted (kill -9 included) or upgraded.
//!
//! Layout: `/sys/fs/bpf/<instance>/<MAP>` for every map in `map_names::PINNED`, and
//! `/sys/fs/bpf/<instance>/link_<interface>` for each attachment.
//!
//! A start with pins present adopts them: the object is loaded with its maps taken from
//! the pins (state, flows and counters survive), and the new program replaces the old
//! one on each pinned link atomically (`bpf_link_update`): no packet sees no program.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use lb_common::{
    BACKEND_F_HAS_MAC, BackendValue, Counter, FlowKey, FlowValue, MODE_DSR_L2, PROTO_TCP, Settings, TrafficCounter, VipBloom,
    VipKey, VipValue, addr_from_words, map_names, prog_names, reason,
};
use tracing::{info, warn};

use crate::config::XdpModeCfg;
use crate::control::{Adopted, BackendSpec, ControlPlane, Mode, ServiceSpec, Vip};
use crate::maps::AyaMaps;
use crate::model::ServiceDef;

pub const BPFFS: &str = "/sys/fs/bpf";

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(BPFFS).join(instance)
}

fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link_{interface}"))
}

/// (key size, value size) each pinned map must have for this build, and whether its
/// content may be dropped when it does not (counters: yes; state: no).
fn expected(name: &str) -> Option<(u32, u32, bool)> {
    use std::mem::size_of;
    let s = |k: usize, v: usize, counters: bool| Some((k as u32, v as u32, counters));
    match name {
        map_names::VIPS => s(size_of::<VipKey>(), size_of::<VipValue>(), false),
        map_names::VIP_BLOOM => s(4, size_of::<VipBloom>(), false),
        map_names::VIP_ADDRS => s(16, 4, false),
        map_names::TABLES => s(4, 4, false),
        map_names::BACKENDS => s(4, size_of::<BackendValue>(), false),
        map_names::FLOWS => s(size_of::<FlowKey>(), size_of::<FlowValue>(), false),
        map_names::SETTINGS => s(4, size_of::<Settings>(), false),
        map_names::REASON_STATS => s(4, size_of::<Counter>(), true),
        map_names::SERVICE_STATS | map_names::BACKEND_STATS => s(4, size_of::<TrafficCounter>(), true),
        _ => None,
    }
}

/// Checks pinned maps against this build before reusing them. A counters map of
/// another shape (an upgrade added a drop reason) is replaced; a state map of another
/// shape stops the start: reusing it would misread every entry.
fn check_pinned_maps(dir: &Path) -> anyhow::Result<()> {
    for name in map_names::PINNED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        let Some((k, v, counters)) = expected(name) else { continue };
        let entries_ok = *name != map_names::REASON_STATS || info.max_entries() == reason::COUNT;
        if info.key_size() == k && info.value_size() == v && entries_ok {
            continue;
        }
        if counters {
            warn!(map = name, "pinned counters map has another layout (upgrade): starting it from zero");
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        } else {
            bail!(
                "pinned map {} has key/value size {}/{}, this lbd needs {k}/{v}: the running datapath is from an \
                 incompatible build; detach it first (lbd --detach --config FILE), which drops its flows",
                path.display(),
                info.key_size(),
                info.value_size()
            );
        }
    }
    Ok(())
}

/// The balancer object loaded into the kernel with its maps pinned (reused when pins
/// exist). `adopted`: a previous run's datapath was found.
pub struct Loaded {
    pub ebpf: aya::Ebpf,
    pub adopted: bool,
    pub dir: PathBuf,
}

pub fn load(instance: &str) -> anyhow::Result<Loaded> {
    crate::decap::ensure_bpffs()?;
    let dir = pin_dir(instance);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    check_pinned_maps(&dir)?;
    let adopted = dir.join(map_names::VIPS).exists();
    let mut loader = aya::EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = map_names::PINNED.iter().map(|n| (*n, dir.join(n))).collect();
    for (n, p) in &paths {
        loader.map_pin_path(n, p.as_path());
    }
    let mut ebpf = loader.load(crate::objects::BALANCER).context("loading the balancer object (maps pinned under the instance)")?;
    let prog: &mut Xdp = ebpf.program_mut(prog_names::BALANCER).context("lb_xdp missing")?.try_into()?;
    prog.load().context("loading lb_xdp into the kernel (verifier)")?;
    Ok(Loaded { ebpf, adopted, dir })
}

fn program(ebpf: &mut aya::Ebpf) -> anyhow::Result<&mut Xdp> {
    Ok(ebpf.program_mut(prog_names::BALANCER).context("lb_xdp missing")?.try_into()?)
}

/// How an interface ended up with our program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// "native" | "generic" | "" when adopted and unknown.
    pub mode: String,
    /// false: an existing pinned link was taken over.
    pub attached_now: bool,
}

/// Puts the loaded program on `interface`: replaces the program of an existing pinned
/// link atomically, or attaches and pins a new link.
pub fn attach(ebpf: &mut aya::Ebpf, dir: &Path, interface: &str, mode: XdpModeCfg) -> anyhow::Result<Attached> {
    crate::config::check_interface_name(interface).map_err(anyhow::Error::msg)?;
    let pin = link_pin(dir, interface);
    let prog = program(ebpf)?;
    if pin.exists() {
        let replaced = (|| -> anyhow::Result<()> {
            let link: FdLink = PinnedLink::from_pin(&pin).context("opening the pinned link")?.into();
            let link = XdpLink::try_from(link).context("pinned link is not an XDP link")?;
            let id = prog.attach_to_link(link).context("bpf_link_update")?;
            // Dropping our handle leaves the pin (and the attachment) in place.
            drop(prog.take_link(id)?);
            Ok(())
        })();
        match replaced {
            Ok(()) => return Ok(Attached { mode: String::new(), attached_now: false }),
            Err(e) => {
                // The interface went away and came back, or the link is defunct.
                warn!(interface, error = %format!("{e:#}"), "pinned link not usable; attaching anew");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let tries: &[(XdpMode, &str)] = match mode {
        XdpModeCfg::Native => &[(XdpMode::Driver, "native")],
        XdpModeCfg::Generic => &[(XdpMode::Skb, "generic")],
        XdpModeCfg::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
    };
    let mut last = None;
    for (m, name) in tries {
        match prog.attach(interface, *m) {
            Ok(id) => {
                let link: FdLink = prog.take_link(id)?.try_into().context("XDP link is not an fd link")?;
                link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
                if mode == XdpModeCfg::Auto && *name == "generic" {
                    warn!(interface, "native XDP not available: attached in generic mode (slower)");
                }
                return Ok(Attached { mode: name.to_string(), attached_now: true });
            }
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("attaching lb_xdp to {interface} in {name} mode"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no XDP mode to try")))
}

/// Removes our program from one interface (unpinning the link detaches it).
pub fn detach_interface(dir: &Path, interface: &str) -> anyhow::Result<()> {
    let pin = link_pin(dir, interface);
    let link = PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    drop(link.unpin().with_context(|| format!("unpinning {}", pin.display()))?);
    Ok(())
}

/// Interfaces with a pinned link.
pub fn pinned_interfaces(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> =
        rd.filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_prefix("link_").map(str::to_string)).collect();
    v.sort();
    v
}

/// Detaches every interface and removes every pin of `instance`.
pub fn detach_all(instance: &str) -> anyhow::Result<Vec<String>> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        bail!("instance {instance:?} has nothing pinned ({} does not exist)", dir.display());
    }
    let ifaces = pinned_interfaces(&dir);
    for i in &ifaces {
        detach_interface(&dir, i)?;
    }
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    info!(instance, interfaces = ?ifaces, "detached; pins removed");
    Ok(ifaces)
}

fn vip_of(key: &VipKey) -> Vip {
    Vip { addr: addr_from_words(&key.addr), port: u16::from_be(key.port), proto: key.proto }
}

/// Rebuilds the control plane's model from the maps of a running datapath. Names and
/// weights come from `known` (the persisted services) where a VIP matches; a VIP that
/// nothing names gets a placeholder name so the next sync removes it cleanly.
pub fn adopt_control(maps: AyaMaps, known: &[ServiceDef]) -> anyhow::Result<ControlPlane<AyaMaps>> {
    let vips = maps.read_vips()?;
    let backends = maps.read_backends()?;
    let settings = maps.read_settings()?;
    let mut services = Vec::new();
    for (key, val) in vips {
        let vip = vip_of(&key);
        if key.proto != PROTO_TCP && key.proto != lb_common::PROTO_UDP {
            bail!("pinned VIPS holds an entry with protocol {}: not written by lbd", key.proto);
        }
        let def = known.iter().find(|d| d.vip == vip);
        let mode = if val.mode == MODE_DSR_L2 { Mode::DsrL2 } else { Mode::Ipip };
        let spec = match def {
            Some(d) => ServiceSpec { mode, table_size: val.table_size, ..d.spec() },
            None => ServiceSpec { name: format!("adopted-{}", val.service_id), vip, mode, table_size: val.table_size },
        };
        let bs = backends
            .iter()
            .filter(|(_, b)| b.service_id == val.service_id)
            .map(|(id, b)| {
                let addr = addr_from_words(&b.addr);
                let weight = def.and_then(|d| d.backend(addr)).map_or(1, |x| x.weight);
                let mac = (b.flags & BACKEND_F_HAS_MAC != 0).then_some(b.mac);
                (BackendSpec { addr, weight, mac }, *id)
            })
            .collect();
        services.push(Adopted { spec, id: val.service_id, active_slot: val.active_slot, backends: bs });
    }
    Ok(ControlPlane::adopt(maps, settings, services)?)
}
