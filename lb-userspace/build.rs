use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds lb-ebpf's objects (nightly + bpf-linker) into OUT_DIR so lbd embeds them and
/// ships as one binary. `AYA_BUILD_SKIP=1` skips it (clippy/doc jobs only).
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    // aya-build watches lb-ebpf only; the objects also compile lb-common (map types,
    // sizes, reasons), so a change there must rebuild them too.
    println!("cargo:rerun-if-changed={}", manifest_path.parent().and_then(|p| p.parent()).map(|p| p.join("lb-common").to_string()).unwrap_or_default());
    let root_dir = manifest_path.parent().ok_or_else(|| anyhow!("no parent for {manifest_path}"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
}
