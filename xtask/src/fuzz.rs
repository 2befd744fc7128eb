//! `cargo xtask fuzz [--secs N] [--parallel P] [--save] [TARGET...]`: runs the
//! coverage-guided targets of `fuzz/` (cargo-fuzz, libFuzzer, nightly) for N seconds
//! each, P at a time at low priority, and prints per target the executions, crashes,
//! coverage (libFuzzer's edge count `cov` and feature count `ft`) and corpus size.
//!
//! Each run starts from the committed corpus (`fuzz/corpus/TARGET`, replayed by
//! `cargo xtask test` on stable) in a work copy under `target/fuzz/`, so a run leaves the
//! repository unchanged; `--save` reduces the grown corpus to a set that covers the same
//! edges and writes it back. A crash leaves its input under `fuzz/artifacts/TARGET/`: fix the
//! product, then add that input to the corpus so the replay keeps it fixed.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{run, show, workspace_root};

pub const TARGETS: &[&str] = &["config", "api_request", "peer_wire", "flow_event"];

/// Safe Rust throughout: AddressSanitizer would halve the executions and find nothing
/// that the panics and overflow checks (on in cargo-fuzz builds) do not.
const FUZZ_FLAGS: &[&str] = &["--features", "libfuzzer", "--sanitizer", "none"];

#[derive(Default, Debug)]
struct Figures {
    execs: u64,
    cov: u64,
    ft: u64,
    corpus: usize,
    crashed: bool,
}

pub fn fuzz(secs: u64, parallel: usize, save: bool, only: &[String]) -> anyhow::Result<()> {
    for t in only {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", "));
        }
    }
    let targets: Vec<&str> = TARGETS.iter().copied().filter(|t| only.is_empty() || only.iter().any(|o| o == t)).collect();
    let root = workspace_root();
    run(Command::new("cargo").args(["+nightly", "fuzz", "build"]).args(FUZZ_FLAGS))?;
    let work = root.join("target/fuzz");
    let mut results = Vec::new();
    for chunk in targets.chunks(parallel.max(1)) {
        let mut running = Vec::new();
        for &t in chunk {
            let dir = work.join("corpus").join(t);
            let _ = std::fs::remove_dir_all(&dir);
            copy_dir(&root.join("fuzz/corpus").join(t), &dir)?;
            let log = work.join(format!("{t}.log"));
            let mut c = Command::new("nice");
            c.args(["-n", "10", "cargo", "+nightly", "fuzz", "run"]).args(FUZZ_FLAGS).arg(t).arg(&dir);
            c.args(["--", &format!("-max_total_time={secs}"), "-print_final_stats=1", "-rss_limit_mb=2048"]);
            c.current_dir(&root);
            println!("$ {} > {}", show(&c), log.display());
            let f = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let child = c.stdout(Stdio::from(f.try_clone()?)).stderr(Stdio::from(f)).spawn().context("starting cargo fuzz")?;
            running.push((t, child, log, dir));
        }
        for (t, mut child, log, dir) in running {
            let status = child.wait()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let mut fig = figures(&text);
            fig.crashed = !status.success();
            fig.corpus = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            if save && !fig.crashed {
                fig.corpus = save_corpus(t, &dir)?;
            }
            results.push((t, fig, log));
        }
    }
    println!("\n{:<12} {:>8} {:>14} {:>8} {:>8} {:>8}  CORPUS", "TARGET", "SECONDS", "EXECUTIONS", "CRASHES", "COV", "FT");
    for (t, f, _) in &results {
        println!(
            "{t:<12} {secs:>8} {:>14} {:>8} {:>8} {:>8}  {}{}",
            f.execs,
            u8::from(f.crashed),
            f.cov,
            f.ft,
            f.corpus,
            if save { " (minimized, saved)" } else { "" }
        );
    }
    let crashed: Vec<String> = results.iter().filter(|(_, f, _)| f.crashed).map(|(t, _, l)| format!("{t} (log {})", l.display())).collect();
    if !crashed.is_empty() {
        bail!("fuzz targets failed: {}; inputs are under fuzz/artifacts/", crashed.join(", "));
    }
    Ok(())
}

/// Replaces the committed corpus of `target` with a small one that still covers every
/// edge the grown corpus `dir` covers: libFuzzer's set-cover merge over edges only
/// (hit counters and value profiles would keep thousands of inputs). Returns its size.
fn save_corpus(target: &str, dir: &Path) -> anyhow::Result<usize> {
    let root = workspace_root();
    let merged = root.join("target/fuzz/merged").join(target);
    let _ = std::fs::remove_dir_all(&merged);
    std::fs::create_dir_all(&merged).with_context(|| format!("creating {}", merged.display()))?;
    run(Command::new("cargo").args(["+nightly", "fuzz", "run"]).args(FUZZ_FLAGS).arg(target).arg(&merged).arg(dir).args([
        "--",
        "-set_cover_merge=1",
        "-use_counters=0",
        "-use_value_profile=0",
    ]))?;
    let saved = root.join("fuzz/corpus").join(target);
    std::fs::remove_dir_all(&saved).with_context(|| format!("removing {}", saved.display()))?;
    copy_dir(&merged, &saved)?;
    Ok(std::fs::read_dir(&saved)?.count())
}

/// Executions from libFuzzer's final stats, cov/ft from its last status line.
fn figures(log: &str) -> Figures {
    let mut f = Figures::default();
    for line in log.lines() {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            f.execs = v.trim().parse().unwrap_or(0);
        }
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            match w {
                "cov:" => f.cov = words.next().and_then(|v| v.parse().ok()).unwrap_or(f.cov),
                "ft:" => f.ft = words.next().and_then(|v| v.parse().ok()).unwrap_or(f.ft),
                _ => {}
            }
        }
    }
    f
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name())).with_context(|| format!("copying {}", e.path().display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_a_libfuzzer_log() {
        let log = "#2\tINITED cov: 10 ft: 12 corp: 2/9b\n#4096\tpulse  cov: 431 ft: 1200 corp: 80/2Kb\n\
                   Done 123456 runs in 60 second(s)\nstat::number_of_executed_units: 123456\n";
        let f = figures(log);
        assert_eq!((f.execs, f.cov, f.ft), (123456, 431, 1200));
    }
}
