//! Operator text: a `--vm` spec and a scenario file, any text, never panic; then what the
//! VMM does with them before it reads any kernel: `count` expansion and every range check
//! of the run's plan (the kernel paths are dropped, so no file is read and the plan stops
//! at "no kernel" once every value has passed its checks).
#![no_main]

use std::path::Path;
use std::time::Duration;

use host_vmm::plan::{resolve, Defaults};
use host_vmm::policy::PolicySpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = host_vmm::scenario::VmSpec::parse(text);
    let policy = PolicySpec::default();
    let defaults = Defaults {
        kernel: None,
        vcpus: 4,
        mem_mib: 128,
        cmdline: "",
        policy: &policy,
        timeout: Duration::from_secs(60),
    };
    // The text as one `--vm` spec.
    if !text.contains("kernel") {
        let _ = resolve(&defaults, None, &[text.to_string()]);
    }
    if let Ok(mut s) = toml::from_str::<host_vmm::scenario::Scenario>(text) {
        let _ = s.expand();
        for v in &mut s.vms {
            v.kernel = None;
        }
        let _ = resolve(&defaults, Some((Path::new("fuzz.toml"), &s)), &[]);
    }
});
