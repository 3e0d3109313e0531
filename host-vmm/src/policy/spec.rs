//! Which boost policy a VM runs: parsed once, where the name enters (`--policy`, a `--vm`
//! spec, a scenario file), then passed around typed and built into a fresh policy per VM.
//!
//! ```
//! use host_vmm::policy::PolicySpec;
//! let spec: PolicySpec = "pv, kvm".parse().unwrap();
//! assert_eq!(spec.to_string(), "pv,kvm");
//! assert_eq!(spec.build().name(), "pv,kvm");
//! assert!("pv,nope".parse::<PolicySpec>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use super::{BoostPolicy, Chain, KvmPolicy, NoBoost, PolicyError, PvPolicy, PvThresholds};

/// One boost policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Round robin only.
    None,
    /// KVM's directed yield.
    Kvm,
    /// KVM's directed yield with the upstream fix (user mode with an interrupt pending).
    KvmIpi,
    /// The paravirtual policy.
    Pv,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::None,
        PolicyKind::Kvm,
        PolicyKind::KvmIpi,
        PolicyKind::Pv,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PolicyKind::None => "none",
            PolicyKind::Kvm => "kvm",
            PolicyKind::KvmIpi => "kvm-ipi",
            PolicyKind::Pv => "pv",
        }
    }

    fn build(self) -> Box<dyn BoostPolicy> {
        match self {
            PolicyKind::None => Box::new(NoBoost),
            PolicyKind::Kvm => Box::new(KvmPolicy::new(false)),
            PolicyKind::KvmIpi => Box::new(KvmPolicy::new(true)),
            PolicyKind::Pv => Box::new(PvPolicy::new(PvThresholds::default())),
        }
    }
}

/// A policy, or a chain of them ("pv,kvm": on a spin the first that boosts wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    /// Never empty.
    parts: Vec<PolicyKind>,
}

impl PolicySpec {
    /// A fresh policy (each VM has its own state: round-robin position, grace-period watch).
    pub fn build(&self) -> Box<dyn BoostPolicy> {
        match self.parts.as_slice() {
            [one] => one.build(),
            parts => Box::new(Chain {
                name: self.to_string(),
                parts: parts.iter().map(|k| k.build()).collect(),
            }),
        }
    }
}

/// `pv`.
impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec {
            parts: vec![PolicyKind::Pv],
        }
    }
}

impl FromStr for PolicySpec {
    type Err = PolicyError;

    /// A name from [`super::POLICY_NAMES`], or several joined by commas (spaces around a
    /// name are ignored).
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let parts = s
            .split(',')
            .map(|name| {
                let name = name.trim();
                PolicyKind::ALL
                    .into_iter()
                    .find(|k| k.name() == name)
                    .ok_or_else(|| PolicyError::Unknown(name.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PolicySpec { parts })
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(k.name())?;
        }
        Ok(())
    }
}

/// Scenario files give the policy as a string; a bad name is a parse error with its line.
impl<'de> Deserialize<'de> for PolicySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
