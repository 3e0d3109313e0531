//! Facts about the host a run's results depend on, for the metrics: cores, kernel release
//! and which KVM this is (a PVM host, Intel or AMD hardware KVM, and whether the host itself
//! runs under a hypervisor, i.e. this KVM is nested).

use std::ffi::CStr;
use std::path::Path;

/// What the metrics record about the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// CPUs this process may run on.
    pub cores: usize,
    /// `uname -r`, or None if uname failed.
    pub kernel_release: Option<String>,
    /// KVM modules loaded (`/sys/module/kvm*`), sorted.
    pub kvm_modules: Vec<String>,
    /// `pvm` (kvm_pvm loaded), `intel`, `amd`, or `unknown`.
    pub kvm_flavour: &'static str,
    /// The CPU flags say a hypervisor runs this host (`hypervisor` in /proc/cpuinfo): the
    /// guests are nested.
    pub under_hypervisor: bool,
}

impl HostInfo {
    /// Reads the facts; what cannot be read is left empty, never an error.
    pub fn probe() -> Self {
        let kvm_modules = kvm_modules(Path::new("/sys/module"));
        HostInfo {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel_release: kernel_release(),
            kvm_flavour: flavour(&kvm_modules),
            kvm_modules,
            under_hypervisor: std::fs::read_to_string("/proc/cpuinfo")
                .is_ok_and(|s| cpuinfo_has_hypervisor(&s)),
        }
    }
}

fn kernel_release() -> Option<String> {
    // SAFETY: an all-zero utsname is valid (arrays of c_char) and is filled by uname.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates each field within its array.
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

fn kvm_modules(sys_module: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(sys_module)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n == "kvm" || n.starts_with("kvm_"))
        .collect();
    found.sort();
    found
}

fn flavour(modules: &[String]) -> &'static str {
    let has = |m: &str| modules.iter().any(|x| x == m);
    if has("kvm_pvm") {
        "pvm"
    } else if has("kvm_intel") {
        "intel"
    } else if has("kvm_amd") {
        "amd"
    } else {
        "unknown"
    }
}

fn cpuinfo_has_hypervisor(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|w| w == "hypervisor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_and_flags() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(flavour(&m(&["kvm", "kvm_pvm"])), "pvm");
        assert_eq!(flavour(&m(&["kvm", "kvm_intel"])), "intel");
        assert_eq!(flavour(&m(&[])), "unknown");
        assert!(cpuinfo_has_hypervisor(
            "processor\t: 0\nflags\t\t: fpu hypervisor lm\n"
        ));
        assert!(!cpuinfo_has_hypervisor(
            "flags\t\t: fpu lm\nmodel name : hypervisorish\n"
        ));
        assert!(HostInfo::probe().cores >= 1);
    }
}
