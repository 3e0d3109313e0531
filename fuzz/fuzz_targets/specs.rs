//! Operator text: a `--vm` spec and a scenario file, any text, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = host_vmm::scenario::VmSpec::parse(text);
    let _ = toml::from_str::<host_vmm::scenario::Scenario>(text);
});
