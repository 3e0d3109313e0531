//! `test=pbzip2`: user-mode workers compress blocks (round trip checked) while the kernel
//! maps and unmaps their buffers, shooting the old ones down on the other CPUs. And the
//! check that makes running the Rust user programs at CPL 3 dependable: the user image of
//! the linked guest (linker.ld, `__user_image_start..__user_image_end`) refers to nothing
//! outside itself but panic paths, and holds every function of the user crates.
//! (The block round trip itself has unit tests in `guest-kernel/user`, on the host.)

use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget};
use pvsync_tests::{field, guest_kernel, num, pvsync_guest, require_kvm};
use shared_abi::ExitCode;

fn us(line: &str, key: &str) -> f64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn pbzip2_round_trips_every_block_and_shoots_down() {
    if !require_kvm("pbzip2_round_trips_every_block_and_shoots_down") {
        return;
    }
    let work = 12;
    let out = pvsync_guest(4, 128, &format!("test=pbzip2 work={work} seed=7"));
    out.check(
        out.status == Some(host_vmm::cli::guest_exit_status(ExitCode::Success as u32)),
        "pbzip2 must succeed",
    );
    let line = out.line("RESULT pbzip2").expect("RESULT pbzip2 line");
    assert_eq!(num(line, "workers"), 4, "{line}");
    assert_eq!(num(line, "blocks"), work, "{line}");
    assert_eq!(num(line, "verified"), work, "{line}");
    assert_eq!(
        num(line, "in_bytes"),
        work * num(line, "block_bytes"),
        "{line}"
    );
    assert!(num(line, "shootdowns") > 0, "{line}");
    assert!(num(line, "out_bytes") < num(line, "in_bytes"), "{line}");
    let (p50, p99, max) = (
        us(line, "sd_p50_us"),
        us(line, "sd_p99_us"),
        us(line, "sd_max_us"),
    );
    assert!(p50 <= p99 && p99 <= max, "{line}");
}

/// Whether a symbol outside the user image may be referred to from inside it: the panic
/// paths of `core` (bounds, overflow, unwrap), which user mode never runs normally and
/// which fault at their first instruction fetch if it does (kernel text is supervisor-only).
fn panic_path(name: &str) -> bool {
    name.contains("4core") && (name.contains("panic") || name.contains("_fail"))
}

#[test]
fn user_image_refers_only_to_itself() {
    let path = guest_kernel();
    let data = std::fs::read(path).expect("reading the guest kernel");
    let file = object::File::parse(&*data).expect("parsing the guest kernel");
    let sym = |n: &str| {
        file.symbols()
            .find(|s| s.name() == Ok(n))
            .unwrap_or_else(|| panic!("no symbol {n}"))
            .address()
    };
    let (start, end) = (sym("__user_image_start"), sym("__user_image_end"));
    let inside = |a: u64| (start..end).contains(&a);
    assert!(start < end && start % 4096 == 0 && end % 4096 == 0);
    // The worker and everything of the user crates is in the image.
    let mut user_fns = 0;
    for s in file.symbols() {
        let name = s.name().unwrap_or("");
        if (name.contains("11pvsync_user") || name.contains("4lzss")) && s.address() != 0 {
            assert!(
                inside(s.address()),
                "{name} at {:#x} is outside the user image {start:#x}..{end:#x}",
                s.address()
            );
            user_fns += 1;
        }
    }
    assert!(user_fns > 0, "no pvsync_user symbols in the guest image");
    for s in ["memcpy", "memset", "memmove", "memcmp", "bcmp"] {
        if let Some(s) = file.symbols().find(|x| x.name() == Ok(s)) {
            assert!(
                inside(s.address()),
                "{:?} is outside the user image",
                s.name()
            );
        }
    }
    if let Some(got) = file.section_by_name(".got") {
        assert!(
            inside(got.address()) && got.address() + got.size() <= end,
            ".got is outside the user image"
        );
    }
    // Every relocation made inside the image points inside it, or at a panic path.
    let mut relocs = 0;
    let mut outside = Vec::new();
    // Only sections that are loaded (an address of their own): a debug section's relocation
    // offsets are offsets into that section, not addresses, and may fall in the image's
    // range by chance.
    let loaded = |s: &object::Section| s.address() != 0;
    for section in file.sections().filter(loaded) {
        for (offset, r) in section.relocations() {
            if !inside(offset) {
                continue;
            }
            relocs += 1;
            let (target, name) = match r.target() {
                RelocationTarget::Symbol(i) => {
                    let s = file.symbol_by_index(i).expect("relocation symbol");
                    (s.address(), s.name().unwrap_or("?").to_string())
                }
                // An assembler constant (`.equ`, e.g. a message length in user.S): a value,
                // not an address.
                RelocationTarget::Absolute => continue,
                other => panic!("relocation at {offset:#x} to {other:?}"),
            };
            let pc_relative = matches!(
                r.flags(),
                RelocationFlags::Elf { r_type } if [
                    object::elf::R_X86_64_PC32,
                    object::elf::R_X86_64_PLT32,
                    object::elf::R_X86_64_GOTPCREL,
                    object::elf::R_X86_64_GOTPCRELX,
                    object::elf::R_X86_64_REX_GOTPCRELX,
                ].contains(&r_type)
            );
            // A PC-relative addend counts from the end of the 4-byte field.
            let at = target
                .wrapping_add_signed(r.addend())
                .wrapping_add(if pc_relative { 4 } else { 0 });
            let named = !name.is_empty() && !name.starts_with('.');
            if !(inside(at) || (named && inside(target)) || (named && panic_path(&name))) {
                outside.push(format!("{offset:#x} -> {name}+{} = {at:#x}", r.addend()));
            }
        }
    }
    assert!(
        relocs > 0,
        "no relocations in the user image: is the guest linked with --emit-relocs?"
    );
    assert!(
        outside.is_empty(),
        "the user image {start:#x}..{end:#x} refers outside itself:\n{}",
        outside.join("\n")
    );
}
