//! Which VMs to run, resolved from `[[vm]]` tables, `--vm` specs and the flags, and checked
//! before any guest starts: counts, names, vCPU and memory ranges, and each kernel (readable,
//! a PVH image of our ABI, fits in the VM's memory). Every error names where the bad value
//! came from: the flag, the `--vm` spec or the scenario table, and the VM.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shared_abi::MAX_VCPUS;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::loader::{self, KernelInfo, LoaderError};
use crate::policy::PolicySpec;
use crate::printable::{printable, printable_short};
use crate::scenario::{Scenario, ScenarioError, VmSpec, MAX_VMS};
use crate::vm::{self, VmConfig, MAX_MEM_MIB};

const MIB: u64 = 1 << 20;
/// Longest VM name (it becomes a console prefix and a file name under `--results`).
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("{0}: count=0 starts no VM (count must be at least 1)")]
    ZeroCount(Origin),
    #[error("at most {MAX_VMS} VMs per process, these flags and scenario ask for more")]
    TooManyVms,
    #[error("VM '{0}' has no kernel: give --kernel, or kernel= in every --vm or [[vm]]")]
    NoKernel(String),
    #[error("VM '{vm}': {what}: {reason} (printable ASCII, at most {max} bytes)", max = CMDLINE_MAX_SIZE - 1)]
    Cmdline {
        vm: String,
        what: String,
        reason: linux_loader::cmdline::Error,
    },
    #[error("VM '{vm}': {what}: {source}")]
    Kernel {
        vm: String,
        what: String,
        source: LoaderError,
    },
    #[error("VM '{vm}': {what} is outside 1..={MAX_VCPUS}")]
    Vcpus { vm: String, what: String },
    #[error("VM '{vm}': {what} MiB is too large: guest RAM must end below the 3 GiB MMIO gap (at most {MAX_MEM_MIB} MiB)")]
    TooMuchMemory { vm: String, what: String },
    #[error("VM '{vm}': {what} MiB is too small for kernel {kernel} with {vcpus} vCPUs: it needs at least {needed_mib} MiB")]
    TooLittleMemory {
        vm: String,
        what: String,
        kernel: PathBuf,
        vcpus: u32,
        needed_mib: u64,
    },
    #[error("{origin}: VM name '{name}' must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ - (not starting with '.')")]
    BadName { origin: Origin, name: String },
    #[error(
        "two VMs are named '{0}': VM names must be unique (count=N names them NAME-0, NAME-1, ...)"
    )]
    DuplicateName(String),
}

/// Where a VM's spec came from, for error messages.
#[derive(Clone, Debug)]
pub enum Origin {
    /// The flags alone (`--kernel`, `--vcpus`, ...).
    Flags,
    /// `--vm SPEC`.
    VmFlag(String),
    /// The `n`th (from 1) `[[vm]]` table of a scenario file.
    Scenario(PathBuf, usize),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flags => f.write_str("the flags"),
            // Escaped: operator text must not reach the terminal with control characters.
            Origin::VmFlag(spec) => write!(f, "--vm '{}'", printable(spec)),
            Origin::Scenario(path, n) => write!(
                f,
                "scenario {}, [[vm]] #{n}",
                printable(&path.display().to_string())
            ),
        }
    }
}

impl Origin {
    /// How to name a value: the spec's own `key=value` if the spec gave it, else the flag.
    fn what(&self, in_spec: bool, key: &str, flag: &str, value: impl fmt::Display) -> String {
        match self {
            Origin::Flags => format!("{flag} {value}"),
            _ if !in_spec => format!("{flag} {value} (the default for {self})"),
            _ => format!("{self}: {key}={value}"),
        }
    }
}

/// The flags' values, the defaults of every VM.
pub struct Defaults<'a> {
    pub kernel: Option<&'a Path>,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub cmdline: &'a str,
    pub policy: &'a PolicySpec,
    pub timeout: Duration,
}

/// The VMs to run: scenario `[[vm]]` tables, then `--vm` specs, else one VM of the flags.
pub fn resolve(
    d: &Defaults,
    scenario: Option<(&Path, &Scenario)>,
    vm_flags: &[String],
) -> Result<Vec<VmConfig>, PlanError> {
    let mut specs: Vec<(Origin, VmSpec)> = Vec::new();
    if let Some((path, s)) = scenario {
        for (i, v) in s.vms.iter().enumerate() {
            specs.push((Origin::Scenario(path.to_owned(), i + 1), v.clone()));
        }
    }
    for text in vm_flags {
        specs.push((Origin::VmFlag(text.clone()), VmSpec::parse(text)?));
    }
    if specs.is_empty() {
        specs.push((Origin::Flags, VmSpec::default()));
    }
    let mut expanded = Vec::new();
    for (origin, spec) in specs {
        if spec.count == Some(0) {
            return Err(PlanError::ZeroCount(origin));
        }
        for one in spec.expand() {
            expanded.push((origin.clone(), one));
            if expanded.len() > MAX_VMS {
                return Err(PlanError::TooManyVms);
            }
        }
    }
    // Names first: a duplicate is reported whatever else is wrong with the VMs.
    let many = expanded.len() > 1;
    let mut names: Vec<String> = Vec::with_capacity(expanded.len());
    for (i, (origin, v)) in expanded.iter().enumerate() {
        let name = match &v.name {
            Some(n) => check_name(origin, n)?,
            None if many => format!("vm{i}"),
            None => "vm".into(),
        };
        if names.contains(&name) {
            return Err(PlanError::DuplicateName(name));
        }
        names.push(name);
    }
    let mut kernels = KernelCache::default();
    expanded
        .into_iter()
        .zip(names)
        .map(|((origin, v), name)| vm_config(d, &origin, v, name, &mut kernels))
        .collect()
}

fn check_name(origin: &Origin, name: &str) -> Result<String, PlanError> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        Err(PlanError::BadName {
            origin: origin.clone(),
            name: printable(name),
        })
    }
}

/// One VM, its values checked.
fn vm_config(
    d: &Defaults,
    origin: &Origin,
    v: VmSpec,
    name: String,
    kernels: &mut KernelCache,
) -> Result<VmConfig, PlanError> {
    let vcpus = v.vcpus.unwrap_or(d.vcpus);
    if vcpus == 0 || vcpus as usize > MAX_VCPUS {
        let what = origin.what(v.vcpus.is_some(), "vcpus", "--vcpus", vcpus);
        return Err(PlanError::Vcpus { vm: name, what });
    }
    let mem_mib = v.mem.unwrap_or(d.mem_mib);
    let mem_what = || origin.what(v.mem.is_some(), "mem", "--mem", mem_mib);
    if mem_mib > MAX_MEM_MIB {
        let what = mem_what();
        return Err(PlanError::TooMuchMemory { vm: name, what });
    }
    let kernel_in_spec = v.kernel.is_some();
    let kernel = match v.kernel.or_else(|| d.kernel.map(Path::to_path_buf)) {
        Some(k) => k,
        None => return Err(PlanError::NoKernel(name)),
    };
    let info = kernels.get(&kernel).map_err(|source| PlanError::Kernel {
        what: origin.what(kernel_in_spec, "kernel", "--kernel", kernel.display()),
        vm: name.clone(),
        source,
    })?;
    let needed = vm::min_mem_bytes(&info, vcpus);
    if mem_mib.saturating_mul(MIB) < needed {
        return Err(PlanError::TooLittleMemory {
            what: mem_what(),
            vm: name,
            kernel,
            vcpus,
            needed_mib: needed.div_ceil(MIB),
        });
    }
    let cmdline_in_spec = v.cmdline.is_some();
    let cmdline = v.cmdline.unwrap_or_else(|| d.cmdline.to_string());
    // The rule the boot path applies, checked here: a usage error, not a failed boot.
    if let Err(reason) = check_cmdline(&cmdline) {
        let shown = printable_short(&cmdline, 60);
        let what = origin.what(
            cmdline_in_spec,
            "cmdline",
            "--cmdline",
            format!("'{shown}'"),
        );
        return Err(PlanError::Cmdline {
            vm: name,
            what,
            reason,
        });
    }
    Ok(VmConfig {
        name,
        kernel,
        vcpus,
        mem_mib,
        cmdline,
        timeout: d.timeout,
        policy: v.policy.unwrap_or_else(|| d.policy.clone()),
        // Set once the outputs are known (a trace asks the guests for their events).
        guest_events: false,
    })
}

/// Whether `cmdline` fits the guest's command-line area as the boot path writes it.
fn check_cmdline(cmdline: &str) -> Result<(), linux_loader::cmdline::Error> {
    let mut cl = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)?;
    }
    Ok(())
}

/// Each kernel path read and inspected once, however many VMs boot it.
#[derive(Default)]
struct KernelCache(HashMap<PathBuf, KernelInfo>);

impl KernelCache {
    fn get(&mut self, path: &Path) -> Result<KernelInfo, LoaderError> {
        if let Some(info) = self.0.get(path) {
            return Ok(info.clone());
        }
        let info = loader::read_kernel(path)?.info;
        self.0.insert(path.to_owned(), info.clone());
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(policy: &PolicySpec) -> Defaults<'_> {
        Defaults {
            kernel: None,
            vcpus: 1,
            mem_mib: 128,
            cmdline: "",
            policy,
            timeout: Duration::from_secs(1),
        }
    }

    fn err(vms: &[&str]) -> String {
        let p = PolicySpec::default();
        let vms: Vec<String> = vms.iter().map(|s| s.to_string()).collect();
        resolve(&defaults(&p), None, &vms).unwrap_err().to_string()
    }

    // Checks that come before the kernel is read (these VMs have none to read).
    #[test]
    fn spec_mistakes_are_refused_naming_the_spec() {
        assert!(err(&["count=0"]).contains("--vm 'count=0': count=0 starts no VM"));
        assert!(err(&["count=17"]).contains("at most 16 VMs"));
        assert!(err(&["name=a", "name=a"]).contains("two VMs are named 'a'"));
        assert!(err(&["name=a,count=2", "name=a-1"]).contains("two VMs are named 'a-1'"));
        assert!(err(&["name=../x"]).contains("VM name '../x'"));
        assert!(err(&["vcpus=2,vcpus=3"]).contains("given twice"));
        assert!(err(&["name=a"]).contains("VM 'a' has no kernel"));
        let e = err(&["vcpus=5000"]);
        assert!(
            e.contains("--vm 'vcpus=5000': vcpus=5000 is outside 1..=4096"),
            "{e}"
        );
        let e = err(&["mem=4000"]);
        assert!(
            e.contains("--vm 'mem=4000': mem=4000 MiB is too large"),
            "{e}"
        );
    }
}
