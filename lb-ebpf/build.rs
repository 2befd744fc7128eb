use which::which;

/// Rebuild when bpf-linker changes (a new LLVM can change codegen), as aya-template does.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    // Packet fields sit at 2-byte-aligned offsets (14-byte Ethernet header). Without this
    // LLVM splits every 32-bit load into four byte loads; the verifier accepts misaligned
    // packet access on hosts with efficient unaligned access (x86_64, arm64), the only
    // ones we target. bpf-linker does the codegen, so the feature goes to it.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
