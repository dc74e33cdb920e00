//! Links the `switchyard` executable with packed relative relocations
//! (`-z pack-relative-relocs`, DT_RELR) where the linker and C library
//! support them (GNU ld 2.38+, glibc 2.36+: Debian 12 and later).
//!
//! Why: a position-independent executable of this size carries about 1.1 MB
//! of relocation records (`.rela.dyn`) that the loader reads at every start
//! and that then stay resident; packed they take 14 KB. On the 2-core AMD
//! EPYC, `bench layer --memory-only`: the default job's file-backed peak
//! went from 14 to 10-11 MiB (docs/kernels.md, Memory). Where the probe
//! below fails the executable is linked as before.

use std::path::Path;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let native = std::env::var("TARGET").ok() == std::env::var("HOST").ok();
    if os == "linux" && env == "gnu" && native && linker_packs_relocations(Path::new(&out)) {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    }
}

/// Links and runs a one-line C program with the flag: an old linker warns
/// about an unknown `-z` option (made an error here), an old C library
/// refuses to load the result.
fn linker_packs_relocations(out: &Path) -> bool {
    let source = out.join("relr_probe.c");
    let exe = out.join("relr_probe");
    if std::fs::write(&source, "int main(void) { return 0; }\n").is_err() {
        return false;
    }
    let linked = Command::new("cc")
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .args(["-pie", "-fPIE", FLAG, "-Wl,--fatal-warnings"])
        .output()
        .is_ok_and(|o| o.status.success());
    linked && Command::new(&exe).status().is_ok_and(|s| s.success())
}
