//! Links the kernel with `linker.ld` (absolute path: cargo runs rustc from another directory).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    // Keep the relocations in the image: tests/tests/pbzip2.rs checks with them that the user
    // image (linker.ld) refers to nothing outside itself but panic paths.
    println!("cargo:rustc-link-arg-bins=--emit-relocs");
    println!("cargo:rerun-if-changed=linker.ld");
    for asm in [
        "boot.S",
        "trampoline.S",
        "traps.S",
        "switch.S",
        "user_entry.S",
        "user.S",
    ] {
        println!("cargo:rerun-if-changed=src/arch/{asm}");
    }
}
