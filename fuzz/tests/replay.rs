//! Replays the saved corpus of every fuzz target through the same functions the
//! libFuzzer binaries call, on stable, so `cargo xtask test` keeps every input that
//! once crashed (saved in the corpus with its fix) from crashing again.

use std::path::Path;

#[test]
fn every_corpus_file_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in lb_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        // A corpus that lost its files would make this test pass on nothing.
        assert!(files.len() >= 5, "{}: only {} inputs", dir.display(), files.len());
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
            if let Err(p) = std::panic::catch_unwind(|| target(&data)) {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!("{name}: {} panics: {}", f.display(), msg.unwrap_or_default());
            }
        }
        println!("{name}: {} inputs replayed", files.len());
    }
}
