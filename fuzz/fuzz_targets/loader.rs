//! Any bytes as a kernel image: the ELF/PVH inspection never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = host_vmm::loader::inspect(data);
});
