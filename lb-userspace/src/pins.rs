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
use lb_common::contract::{self, Keep, MapSpec};
use lb_common::{
    BACKEND_F_HAS_MAC, MODE_DSR_L2, MODE_GUE, MODE_MASK, PROTO_TCP, VIP_F_NO_FLOW_TABLE, VipKey, addr_from_words, map_names, prog_names, vip_gue_port,
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

/// A pinned map's shape as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl PinnedShape {
    fn of(info: &aya::maps::MapInfo) -> Self {
        Self {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }
}

/// Every way a pinned map differs from the contract (`MapSpec::differences`).
pub fn shape_differences(spec: &MapSpec, got: &PinnedShape) -> Vec<String> {
    spec.differences(got.map_type, got.key_size, got.value_size, got.max_entries, got.flags)
}

/// What to do with pins found under the instance's directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Every pinned map fits: adopt them. `replace`: counters maps of another layout,
    /// to be removed and created afresh.
    Adopt { replace: Vec<&'static str> },
    /// A state map (or the layout version) differs: refuse, with this message.
    Refuse(String),
}

/// The decision of the adoption check, from each pinned map's shape (None: not pinned)
/// and the layout version read from the pinned LAYOUT map (None: none pinned).
pub fn decide_adoption(shapes: &[(&'static str, Option<PinnedShape>)], layout: Option<u32>) -> Adoption {
    let mut replace = Vec::new();
    let mut problems = Vec::new();
    let any_state = shapes.iter().any(|(n, s)| s.is_some() && contract::balancer_map(n).is_some_and(|m| m.keep == Keep::State));
    for (name, shape) in shapes {
        let (Some(shape), Some(spec)) = (shape, contract::balancer_map(name)) else { continue };
        let diff = shape_differences(spec, shape);
        if diff.is_empty() {
            continue;
        }
        match spec.keep {
            Keep::Counters => replace.push(*name),
            _ => problems.push(format!("  {name}: {}", diff.join("; "))),
        }
    }
    if any_state && layout != Some(contract::MAP_LAYOUT_VERSION) {
        problems.push(match layout {
            Some(v) => format!("  layout version: pinned {v}, this lbd {}", contract::MAP_LAYOUT_VERSION),
            None => format!("  layout version: none pinned (a build before layout versions), this lbd {}", contract::MAP_LAYOUT_VERSION),
        });
    }
    if problems.is_empty() {
        return Adoption::Adopt { replace };
    }
    Adoption::Refuse(format!(
        "the pinned datapath maps were created by an incompatible build and cannot be adopted:\n{}\n\
         to proceed, detach the running datapath first (lbd --detach --config FILE: it stops forwarding and drops \
         its flows until lbd starts again), then start this lbd; or start the lbd build that created them",
        problems.join("\n")
    ))
}

/// Checks pinned maps against the map contract before reusing them. A counters map of
/// another shape (an upgrade added a drop reason) is replaced; a state map of another
/// shape, or pins of another layout version, stop the start: reusing them would misread
/// every entry.
fn check_pinned_maps(dir: &Path) -> anyhow::Result<()> {
    let mut shapes = Vec::new();
    for name in map_names::PINNED {
        let path = dir.join(name);
        let shape = if path.exists() {
            let info = aya::maps::MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
            Some(PinnedShape::of(&info))
        } else {
            None
        };
        shapes.push((*name, shape));
    }
    let layout = read_layout(dir)?;
    match decide_adoption(&shapes, layout) {
        Adoption::Adopt { replace } => {
            for name in replace {
                let path = dir.join(name);
                warn!(map = name, "pinned counters map has another layout (upgrade): starting it from zero");
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
            Ok(())
        }
        Adoption::Refuse(msg) => bail!("{msg}"),
    }
}

/// The layout version in the pinned LAYOUT map, if one is pinned.
fn read_layout(dir: &Path) -> anyhow::Result<Option<u32>> {
    let path = dir.join(map_names::LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let spec = contract::balancer_map(map_names::LAYOUT).context("LAYOUT in the contract")?;
    let info = aya::maps::MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
    if !shape_differences(spec, &PinnedShape::of(&info)).is_empty() {
        return Ok(None);
    }
    let data = aya::maps::MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let arr: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    Ok(Some(arr.get(&0, 0).with_context(|| format!("reading {}", path.display()))?))
}

/// Records this build's layout version in the (pinned) LAYOUT map.
fn write_layout(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    let m = ebpf.map_mut(map_names::LAYOUT).context("LAYOUT missing from the object")?;
    let mut arr: aya::maps::Array<_, u32> = aya::maps::Array::try_from(m)?;
    arr.set(0, contract::MAP_LAYOUT_VERSION, 0).context("writing LAYOUT")?;
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
    write_layout(&mut ebpf)?;
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
        let mode = match val.mode & MODE_MASK {
            MODE_DSR_L2 => Mode::DsrL2,
            MODE_GUE => Mode::Gue { port: vip_gue_port(val.mode) },
            _ => Mode::Ipip,
        };
        // As the datapath has it, so a reload that differs rewrites the VIP.
        let flow_table = val.flags & VIP_F_NO_FLOW_TABLE == 0;
        let spec = match def {
            Some(d) => ServiceSpec { mode, table_size: val.table_size, flow_table, ..d.spec() },
            None => ServiceSpec { name: format!("adopted-{}", val.service_id), vip, mode, table_size: val.table_size, flow_table },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fits(name: &str) -> PinnedShape {
        let m = contract::balancer_map(name).unwrap();
        PinnedShape { map_type: m.map_type, key_size: m.key_size, value_size: m.value_size, max_entries: m.max_entries, flags: m.flags }
    }

    fn all_fitting() -> Vec<(&'static str, Option<PinnedShape>)> {
        map_names::PINNED.iter().map(|n| (*n, Some(fits(n)))).collect()
    }

    #[test]
    fn matching_pins_are_adopted() {
        assert_eq!(decide_adoption(&all_fitting(), Some(contract::MAP_LAYOUT_VERSION)), Adoption::Adopt { replace: vec![] });
        // Nothing pinned: a first start.
        let none: Vec<_> = map_names::PINNED.iter().map(|n| (*n, None)).collect();
        assert_eq!(decide_adoption(&none, None), Adoption::Adopt { replace: vec![] });
    }

    /// Issue 11 item 7: each field of a state map is compared (type, key, value,
    /// max_entries, flags), and the message says what differs and how to proceed.
    #[test]
    fn every_field_of_a_state_map_is_compared() {
        type Change = (&'static str, fn(&mut PinnedShape));
        let changes: [Change; 5] = [
            ("type: pinned hash (1), this lbd lru_hash (9)", |s| s.map_type = contract::BPF_MAP_TYPE_HASH),
            ("key size: pinned 36, this lbd 40", |s| s.key_size = 36),
            ("value size: pinned 8, this lbd 16", |s| s.value_size = 8),
            ("max_entries: pinned 65536, this lbd 1048576", |s| s.max_entries = 65536),
            ("flags: pinned 0x0, this lbd 0x2 (BPF_F_NO_COMMON_LRU)", |s| s.flags = 0),
        ];
        for (want, change) in changes {
            let mut shapes = all_fitting();
            let flows = shapes.iter_mut().find(|(n, _)| *n == map_names::FLOWS).unwrap();
            change(flows.1.as_mut().unwrap());
            let Adoption::Refuse(msg) = decide_adoption(&shapes, Some(contract::MAP_LAYOUT_VERSION)) else {
                panic!("{want}: adopted")
            };
            assert!(msg.contains(&format!("FLOWS: {want}")), "{msg}");
            assert!(msg.contains("lbd --detach --config FILE"), "{msg}");
        }
    }

    #[test]
    fn another_layout_version_is_refused() {
        let Adoption::Refuse(msg) = decide_adoption(&all_fitting(), Some(1)) else { panic!("adopted") };
        assert!(msg.contains(&format!("layout version: pinned 1, this lbd {}", contract::MAP_LAYOUT_VERSION)), "{msg}");
        let Adoption::Refuse(msg) = decide_adoption(&all_fitting(), None) else { panic!("adopted") };
        assert!(msg.contains("none pinned"), "{msg}");
    }

    #[test]
    fn counters_of_another_layout_are_replaced_not_refused() {
        let mut shapes = all_fitting();
        shapes.iter_mut().find(|(n, _)| *n == map_names::REASON_STATS).unwrap().1.as_mut().unwrap().max_entries = 23;
        assert_eq!(
            decide_adoption(&shapes, Some(contract::MAP_LAYOUT_VERSION)),
            Adoption::Adopt { replace: vec![map_names::REASON_STATS] }
        );
    }
}
