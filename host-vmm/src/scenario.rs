//! What to run when several VMs share the host: `--vm` specs on the command line, or a TOML
//! scenario file.
//!
//! ```
//! use host_vmm::scenario::{Scenario, VmSpec};
//! let s: Scenario = toml::from_str(r#"
//!     [sched]
//!     slots = 4
//!     placement = "wake-affine"
//!
//!     [[vm]]
//!     name = "db"
//!     vcpus = 4
//!     cmdline = "test=locktorture lock=mcs"
//!
//!     [[vm]]
//!     vcpus = 4
//!     count = 2
//! "#).unwrap();
//! assert_eq!(s.sched.slots, Some(4));
//! assert_eq!(s.expand().len(), 3);
//! let one = VmSpec::parse("vcpus=2,mem=64,cmdline=test=selftest smp=2").unwrap();
//! assert_eq!(one.cmdline.as_deref(), Some("test=selftest smp=2"));
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::{PolicyError, PolicySpec};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario: {0}")]
    Read(#[from] crate::files::FileError),
    #[error("scenario {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("--vm '{spec}': {why}")]
    BadSpec { spec: String, why: String },
    #[error("scenario {0} has no [[vm]]")]
    NoVms(PathBuf),
    #[error("a scenario may start at most {max} VMs, this one starts {got}")]
    TooManyVms { got: usize, max: usize },
}

/// Largest scenario file read (a scenario is a few hundred bytes).
pub const MAX_SCENARIO_BYTES: u64 = 1 << 20;

/// Most VMs one process runs.
pub const MAX_VMS: usize = 16;

/// Scheduler settings a scenario may give (command-line flags win).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SchedSection {
    pub backend: Option<String>,
    pub slots: Option<usize>,
    pub slice_us: Option<u64>,
    pub placement: Option<String>,
    pub policy: Option<PolicySpec>,
    pub timeout: Option<u64>,
}

/// One VM; missing fields come from the command line's `--kernel`, `--vcpus`, `--mem`,
/// `--cmdline` and `--policy`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: Option<String>,
    pub kernel: Option<PathBuf>,
    pub vcpus: Option<u32>,
    pub mem: Option<u64>,
    pub cmdline: Option<String>,
    pub policy: Option<PolicySpec>,
    /// This many identical VMs (default 1).
    pub count: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub sched: SchedSection,
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmSpec>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = crate::files::read_text(path, MAX_SCENARIO_BYTES)?;
        let s: Scenario = toml::from_str(&text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        if s.vms.is_empty() {
            return Err(ScenarioError::NoVms(path.to_owned()));
        }
        Ok(s)
    }

    /// One spec per VM (`count` expanded, see [`VmSpec::expand`]), capped at [`MAX_VMS`] + 1
    /// so the caller can refuse.
    pub fn expand(&self) -> Vec<VmSpec> {
        let mut out: Vec<VmSpec> = self.vms.iter().flat_map(VmSpec::expand).collect();
        out.truncate(MAX_VMS + 1);
        out
    }
}

impl VmSpec {
    /// `count` copies of this spec (at most [`MAX_VMS`] + 1, so the caller can refuse; none
    /// for `count=0`, which the caller refuses), each with `count` cleared; a named spec
    /// with a count gives `name-0`, `name-1`, ...
    pub fn expand(&self) -> Vec<VmSpec> {
        let Some(count) = self.count else {
            return vec![self.clone()];
        };
        (0..count.min(MAX_VMS + 1))
            .map(|i| VmSpec {
                count: None,
                name: self.name.as_ref().map(|n| format!("{n}-{i}")),
                ..self.clone()
            })
            .collect()
    }

    /// Parses `key=value,...`; `cmdline=` must come last and takes the rest of the text
    /// (kernel command lines contain spaces and `=`).
    pub fn parse(spec: &str) -> Result<Self, ScenarioError> {
        // Escaped: a control character in the spec must not reach the terminal as one.
        let bad = |why: String| ScenarioError::BadSpec {
            spec: crate::printable::printable(spec),
            why: crate::printable::printable(&why),
        };
        let mut v = VmSpec::default();
        let mut rest = spec;
        let mut seen: Vec<&str> = Vec::new();
        while !rest.is_empty() {
            let (key, after) = rest
                .split_once('=')
                .ok_or_else(|| bad(format!("'{rest}' is not key=value")))?;
            // A repeated key is a typo or a pasted spec; neither should silently win.
            if seen.contains(&key) {
                return Err(bad(format!("key '{key}' is given twice")));
            }
            seen.push(key);
            if key == "cmdline" {
                v.cmdline = Some(after.to_string());
                break;
            }
            let (value, next) = after.split_once(',').unwrap_or((after, ""));
            rest = next;
            let num = |what: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{what}='{value}' is not a number")))
            };
            match key {
                "name" => v.name = Some(value.to_string()),
                "kernel" => v.kernel = Some(PathBuf::from(value)),
                "vcpus" => {
                    v.vcpus = Some(
                        u32::try_from(num("vcpus")?)
                            .map_err(|_| bad(format!("vcpus={value} is out of range")))?,
                    )
                }
                "mem" => v.mem = Some(num("mem")?),
                "policy" => v.policy = Some(value.parse().map_err(|e: PolicyError| bad(e.to_string()))?),
                "count" => v.count = Some(num("count")? as usize),
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (known: name, kernel, vcpus, mem, policy, count, cmdline)"
                    )))
                }
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_refuse_garbage_with_a_reason() {
        for (spec, why) in [
            ("vcpus", "not key=value"),
            ("vcpus=four", "not a number"),
            ("vcpus=5000000000", "out of range"),
            ("color=red", "unknown key"),
            ("vcpus=2,mem=64,vcpus=4", "key 'vcpus' is given twice"),
        ] {
            let e = VmSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
        assert_eq!(VmSpec::parse("").unwrap(), VmSpec::default());
    }

    #[test]
    fn policies_are_parsed_where_they_are_read() {
        let v = VmSpec::parse("policy=kvm-ipi,vcpus=2").unwrap();
        assert_eq!(v.policy, Some("kvm-ipi".parse().unwrap()));
        let e = VmSpec::parse("policy=fastest").unwrap_err().to_string();
        assert!(e.contains("unknown boost policy 'fastest'"), "{e}");
        let s: Scenario = toml::from_str("[sched]\npolicy = \"pv,kvm\"\n").unwrap();
        assert_eq!(s.sched.policy.unwrap().to_string(), "pv,kvm");
        let e = toml::from_str::<Scenario>("[[vm]]\npolicy = \"nope\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown boost policy 'nope'"), "{e}");
    }

    #[test]
    fn scenarios_refuse_unknown_fields_and_cap_the_vm_count() {
        assert!(toml::from_str::<Scenario>("[[vm]]\nvcpu = 4\n").is_err());
        let s: Scenario = toml::from_str("[[vm]]\ncount = 1000000\n").unwrap();
        assert_eq!(s.expand().len(), MAX_VMS + 1);
    }

    #[test]
    fn counted_specs_get_numbered_names() {
        let v = VmSpec::parse("name=db,count=3,vcpus=2").unwrap();
        let names: Vec<_> = v.expand().into_iter().map(|s| s.name.unwrap()).collect();
        assert_eq!(names, ["db-0", "db-1", "db-2"]);
        assert!(VmSpec::parse("count=0").unwrap().expand().is_empty());
        let plain = VmSpec::parse("name=x").unwrap();
        assert_eq!(plain.expand(), vec![plain.clone()]);
    }
}
