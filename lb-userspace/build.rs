use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds lb-ebpf's objects (nightly + bpf-linker) into OUT_DIR so lbd embeds them and
/// ships as one binary. `AYA_BUILD_SKIP=1` skips it (clippy/doc jobs only).
fn main() -> anyhow::Result<()> {
    git_revision();
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
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

/// `LB_GIT_REV` for `lbd --version` / `lbctl --version`: the commit built, or
/// `LB_GIT_REV` from the environment (a build from a source tarball), else "unknown".
fn git_revision() {
    println!("cargo:rerun-if-env-changed=LB_GIT_REV");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = std::env::var("LB_GIT_REV").ok().or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Rerun when HEAD moves (a commit, a checkout). Only paths that exist: cargo
    // treats a missing one as always changed (a packed ref has no file).
    let head = git(&["rev-parse", "--git-path", "HEAD"]);
    let branch = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r]));
    for path in [head, branch].into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=LB_GIT_REV={}", rev.unwrap_or_else(|| "unknown".into()));
}
