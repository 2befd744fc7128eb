//! `cargo xtask dist`: a Debian package (`target/dist/lb_VERSION_ARCH.deb`) that installs
//! and runs without a Rust toolchain: lbd and lbctl (the eBPF objects are embedded), the
//! systemd units of `dist/`, man pages (clap_mangen, through the binaries' hidden `man`
//! subcommand), bash/zsh/fish completions and the example configs of `dist/examples/`.
//! Built with Debian's own `dpkg-deb` from a staged tree; no packaging crate needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{probe, run, workspace_root};

pub const PACKAGE: &str = "lb";

/// Builds the package and returns its path.
pub fn dist() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    run(Command::new("cargo").args(["build", "--release", "--package", "lb-userspace", "--bins"]))?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = probe(Command::new("dpkg").arg("--print-architecture"))?.context("dpkg --print-architecture failed: is this Debian?")?;
    let arch = arch.trim();
    let stage = root.join("target/dist/stage");
    let _ = std::fs::remove_dir_all(&stage);
    let bin = root.join("target/release");

    install(&bin.join("lbd"), &stage.join("usr/sbin/lbd"), 0o755)?;
    install(&bin.join("lbctl"), &stage.join("usr/bin/lbctl"), 0o755)?;
    for unit in ["lbd@.service", "lb-decap@.service"] {
        install(&root.join("dist").join(unit), &stage.join("lib/systemd/system").join(unit), 0o644)?;
    }
    let examples = stage.join("usr/share/doc/lb/examples");
    for e in std::fs::read_dir(root.join("dist/examples")).context("reading dist/examples")? {
        let e = e?;
        install(&e.path(), &examples.join(e.file_name()), 0o644)?;
    }

    // Man pages, gzipped as Debian policy wants.
    let man = stage.join("usr/share/man/man1");
    for b in ["lbd", "lbctl"] {
        run(Command::new(bin.join(b)).arg("man").arg(&man))?;
    }
    for e in std::fs::read_dir(&man)? {
        run(Command::new("gzip").args(["-9n"]).arg(e?.path()))?;
    }
    // Completions where Debian's shells look for them.
    for b in ["lbd", "lbctl"] {
        for (shell, path) in [
            ("bash", format!("usr/share/bash-completion/completions/{b}")),
            ("zsh", format!("usr/share/zsh/vendor-completions/_{b}")),
            ("fish", format!("usr/share/fish/vendor_completions.d/{b}.fish")),
        ] {
            let out = Command::new(bin.join(b)).args(["completions", shell]).output().with_context(|| format!("{b} completions"))?;
            if !out.status.success() {
                bail!("{b} completions {shell} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            write(&stage.join(path), &out.stdout, 0o644)?;
        }
    }

    let size_kib: u64 = walk(&stage)?.iter().map(|p| p.metadata().map_or(0, |m| m.len().div_ceil(1024))).sum();
    let control = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: lb developers <lb@localhost>\n\
         Depends: libc6, libgcc-s1\nSection: net\nPriority: optional\nInstalled-Size: {size_kib}\n\
         Description: XDP/eBPF L4 load balancer (lbd, lbctl)\n \
         Maglev-consistent L4 load balancing in XDP with IPIP or L2 direct server return,\n \
         health checks, an active/backup pair, and a decapsulator for backends.\n"
    );
    write(&stage.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    let deb = root.join(format!("target/dist/{PACKAGE}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    println!("dist: {}", deb.display());
    Ok(deb)
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &data, mode)
}

fn write(to: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(to, data).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", to.display()))
}

/// Every file under `dir`.
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() { out.extend(walk(&p)?) } else { out.push(p) }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command's output, asserting success.
    fn ok(cmd: &mut Command) -> String {
        let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(o.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Builds the .deb, installs it with dpkg into a fresh root this test makes (the
    /// host's package database and files stay untouched), then runs the installed lbd:
    /// `--version`, and `--check` on every example. Verifies the units.
    #[test]
    fn deb_installs_into_a_fresh_root_and_its_lbd_checks_every_example() {
        let deb = dist().expect("cargo xtask dist");
        let root = std::env::temp_dir().join(format!("tl-dist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
        std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
        // The fresh root has no libc6 package: its dependencies are the host's.
        ok(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-depends", "--force-script-chrootless", "--log=/dev/null", "-i"])
            .arg(&deb));
        let listed = ok(Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-L", PACKAGE]));
        for f in [
            "/usr/sbin/lbd",
            "/usr/bin/lbctl",
            "/lib/systemd/system/lbd@.service",
            "/lib/systemd/system/lb-decap@.service",
            "/usr/share/man/man1/lbd.1.gz",
            "/usr/share/man/man1/lbctl.1.gz",
            "/usr/share/man/man1/lbctl-backend-add.1.gz",
            "/usr/share/man/man1/lbd-decap-attach.1.gz",
            "/usr/share/bash-completion/completions/lbctl",
            "/usr/share/zsh/vendor-completions/_lbd",
            "/usr/share/fish/vendor_completions.d/lbctl.fish",
            "/usr/share/doc/lb/examples/standalone.toml",
            "/usr/share/doc/lb/examples/pair.toml",
            "/usr/share/doc/lb/examples/dsr-l2.toml",
            "/usr/share/doc/lb/examples/balancers",
        ] {
            assert!(listed.lines().any(|l| l == f), "{f} not installed:\n{listed}");
            assert!(root.join(&f[1..]).exists(), "{f} listed but absent");
        }

        let lbd = root.join("usr/sbin/lbd");
        let v = ok(Command::new(&lbd).arg("--version"));
        assert!(v.starts_with(&format!("lbd {}", env!("CARGO_PKG_VERSION"))) && v.contains("(git "), "{v}");
        let ex = root.join("usr/share/doc/lb/examples");
        // The pair's key file is the operator's; a test-made one stands in for it.
        let key = root.join("cluster.key");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        for name in ["standalone.toml", "pair.toml", "dsr-l2.toml"] {
            let mut path = ex.join(name);
            if name == "pair.toml" {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.contains("/etc/lb/cluster.key"));
                path = root.join("pair-with-test-key.toml");
                std::fs::write(&path, text.replace("/etc/lb/cluster.key", key.to_str().unwrap())).unwrap();
            }
            let out = ok(Command::new(&lbd).arg("--check").arg("--config").arg(&path));
            assert!(out.contains("configuration is valid"), "{name}: {out}");
        }
        // The decap unit's allow file parses as the unit will read it.
        let b = std::fs::read_to_string(ex.join("balancers")).unwrap();
        assert!(b.lines().any(|l| l.trim() == "10.0.0.5"));

        if probe(Command::new("systemd-analyze").arg("--version")).unwrap().is_some() {
            // The installed units with their /usr/sbin/lbd pointing into the fresh root
            // (the host has no lbd there); everything else as installed.
            let units = root.join("verify");
            std::fs::create_dir_all(&units).unwrap();
            let mut args = Vec::new();
            for u in ["lbd@.service", "lb-decap@.service"] {
                let text = std::fs::read_to_string(root.join("lib/systemd/system").join(u)).unwrap();
                std::fs::write(units.join(u), text.replace("/usr/sbin/lbd", lbd.to_str().unwrap())).unwrap();
                args.push(units.join(u));
            }
            let o = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
