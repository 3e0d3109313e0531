//! The study's experiments: which runs answer which question, the published figure each is
//! set beside, and the ideal each is measured against (the same work at 1:1).

/// One VM of a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    pub name: String,
    pub vcpus: usize,
    /// The guest command line, without `seed=` (the runner adds the repeat's seed).
    pub cmdline: String,
}

/// One way of running the same work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Unique: `experiment/label`.
    pub id: String,
    pub experiment: &'static str,
    pub label: String,
    /// `slots` or `linux`.
    pub backend: &'static str,
    /// Host CPUs given to the VMs (the slot count; the host's cores under `linux`).
    pub cpus: usize,
    pub slice_us: u64,
    pub placement: &'static str,
    pub policy: &'static str,
    /// vCPUs per CPU: 1 is the ideal (the same work, the same CPUs, nobody waiting).
    pub overcommit: usize,
    pub vms: Vec<VmPlan>,
    /// The configuration whose figures are this one's ideal.
    pub ideal: Option<String>,
}

impl Config {
    /// The guest test its VMs run (`test=` of the first VM's command line): its `RESULT`
    /// line carries the figures.
    pub fn workload(&self) -> &str {
        self.vms
            .first()
            .and_then(|v| {
                v.cmdline
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("test="))
            })
            .unwrap_or("boot")
    }
}

/// A figure the report sets beside a published one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Published {
    /// The figure (a `RESULT` field, or `stacking_fraction`) it is set beside.
    pub field: &'static str,
    /// What the number is, in the report's words.
    pub what: &'static str,
    pub value: f64,
    /// Its unit: `x` (a ratio to 1:1) or `%`.
    pub unit: &'static str,
    pub source: &'static str,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Experiment {
    pub name: &'static str,
    pub title: &'static str,
    /// The guest test most of its configurations run.
    pub workload: &'static str,
    /// The figure that says how well a run went, and whether lower is better.
    pub primary: &'static str,
    pub lower_is_better: bool,
    pub configs: Vec<Config>,
    pub published: Vec<Published>,
}

/// What the plans depend on.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Host cores: the 1:1 runs use this many vCPUs on as many slots.
    pub cores: usize,
    /// Small amounts of work (CI), else a real study's.
    pub quick: bool,
}

/// The policies compared, KVM's stock directed yield first.
pub const POLICIES: [&str; 4] = ["none", "kvm", "kvm-ipi", "pv"];

/// Every experiment, in the report's order.
pub fn all(s: Scale) -> Vec<Experiment> {
    vec![ipi(s), stacking(s), rcu(s)]
}

/// The experiments named (all if `names` is empty); an unknown name is returned as the error.
pub fn select(s: Scale, names: &[String]) -> Result<Vec<Experiment>, String> {
    let all = all(s);
    if let Some(bad) = names.iter().find(|n| !all.iter().any(|e| e.name == *n)) {
        return Err(bad.clone());
    }
    Ok(all
        .into_iter()
        .filter(|e| names.is_empty() || names.iter().any(|n| n == e.name))
        .collect())
}

/// The same run with the vCPU threads under the host's Linux scheduler (the policies do not
/// act there yet: it is the stock host as a reference).
fn on_linux(mut c: Config) -> Config {
    c.backend = "linux";
    c.placement = "host";
    c.label = format!("{} linux", c.label.split(' ').next().unwrap_or(""));
    c.id = format!("{}/{}", c.experiment, c.label);
    c
}

fn one_vm(vcpus: usize, cmdline: String) -> Vec<VmPlan> {
    vec![VmPlan {
        name: "vm".into(),
        vcpus,
        cmdline,
    }]
}

#[allow(clippy::too_many_arguments)]
fn config(
    experiment: &'static str,
    label: String,
    cpus: usize,
    slice_us: u64,
    placement: &'static str,
    policy: &'static str,
    overcommit: usize,
    vms: Vec<VmPlan>,
    ideal: Option<String>,
) -> Config {
    Config {
        id: format!("{experiment}/{label}"),
        experiment,
        label,
        backend: "slots",
        cpus,
        slice_us,
        placement,
        policy,
        overcommit,
        vms,
        ideal,
    }
}

/// The same work (`cmdline`) at 1:1 (as many vCPUs as host cores, on as many slots: the
/// ideal), then with `overs` times as many vCPUs under each policy, and 2x overcommitted
/// under the host's Linux scheduler.
fn overcommitted(
    experiment: &'static str,
    cores: usize,
    slice: u64,
    cmdline: &str,
    overs: &[usize],
) -> Vec<Config> {
    let base = format!("{experiment}/1:1");
    let mut configs = vec![config(
        experiment,
        "1:1".into(),
        cores,
        slice,
        "spread",
        "none",
        1,
        one_vm(cores, cmdline.to_string()),
        None,
    )];
    for &over in overs {
        for policy in POLICIES {
            configs.push(config(
                experiment,
                format!("{over}x {policy}"),
                cores,
                slice,
                "spread",
                policy,
                over,
                one_vm(over * cores, cmdline.to_string()),
                Some(base.clone()),
            ));
        }
    }
    configs.push(on_linux(configs[1].clone()));
    configs
}

/// Experiment 1, IPI receivers in user mode: pbzip2 at 1:1, then 2x and 4x overcommitted
/// under each policy. 20 ms slices: a preempted receiver then waits long enough to matter,
/// as a vCPU waits for a host scheduler tick.
fn ipi(s: Scale) -> Experiment {
    // 32 KiB blocks: the full size takes about 2 s at 1:1 on this host.
    let work = if s.quick { 12 } else { 48 };
    let slice = 20_000;
    let configs = overcommitted(
        "ipi",
        s.cores,
        slice,
        &format!("test=pbzip2 work={work}"),
        &[2, 4],
    );
    Experiment {
        name: "ipi",
        title: "IPI receivers in user mode (pbzip2)",
        workload: "pbzip2",
        primary: "elapsed_us",
        lower_is_better: true,
        configs,
        published: vec![Published {
            // A speed-up, not a figure this study measures as such: no line on a plot.
            field: "speed-up",
            what: "pbzip2 speed-up from boosting user-mode IPI receivers (96 vCPUs)",
            value: 10.0,
            unit: "%",
            source: "KVM Forum 2021 (the upstream fix)",
        }],
    }
}

/// Experiment 2, vCPU stacking: 1, 2 and 3 VMs of 4 vCPUs on 4 slots, every vCPU busy,
/// wake-affine vs spread; then ebizzy's throughput under both.
fn stacking(s: Scale) -> Experiment {
    // cpu-bound: rounds of a user-mode loop; ebizzy: lock-protected operations. The full
    // sizes take about 1-2 s at 1:1 with 4 vCPUs on this host.
    let rounds = if s.quick { 20_000 } else { 60_000 };
    let records = if s.quick { 1000 } else { 3000 };
    let mut configs = Vec::new();
    for vms in 1..=3 {
        for placement in ["wake-affine", "spread"] {
            let plans = (0..vms)
                .map(|i| VmPlan {
                    name: format!("vm{i}"),
                    vcpus: 4,
                    cmdline: format!("test=cpu-bound work={rounds}"),
                })
                .collect();
            configs.push(config(
                "stacking",
                format!("{vms} VM {placement}"),
                4,
                3000,
                placement,
                "none",
                vms,
                plans,
                None,
            ));
        }
    }
    for placement in ["wake-affine", "spread"] {
        let plans = (0..2)
            .map(|i| VmPlan {
                name: format!("vm{i}"),
                vcpus: 4,
                cmdline: format!("test=ebizzy work={records}"),
            })
            .collect();
        configs.push(config(
            "stacking",
            format!("ebizzy 2 VM {placement}"),
            4,
            3000,
            placement,
            "none",
            2,
            plans,
            None,
        ));
    }
    // The same two VMs as host threads on the real cores (the Linux scheduler places them).
    let mut linux = config(
        "stacking",
        "ebizzy 2 VM linux".into(),
        s.cores,
        3000,
        "host",
        "none",
        8usize.div_ceil(s.cores.max(1)),
        (0..2)
            .map(|i| VmPlan {
                name: format!("vm{i}"),
                vcpus: 4,
                cmdline: format!("test=ebizzy work={records}"),
            })
            .collect(),
        None,
    );
    linux.backend = "linux";
    configs.push(linux);
    Experiment {
        name: "stacking",
        title: "vCPU stacking (cpu-bound, ebizzy)",
        workload: "cpu-bound",
        primary: "stacking_fraction",
        lower_is_better: true,
        configs,
        published: vec![
            Published {
                field: "stacking_fraction",
                what: "siblings stacked, 1 VM",
                value: 5.6,
                unit: "%",
                source: "KVM Forum 2021, 4-vCPU VMs on 4 pCPUs",
            },
            Published {
                field: "stacking_fraction",
                what: "siblings stacked, 2 VMs",
                value: 43.1,
                unit: "%",
                source: "KVM Forum 2021, 4-vCPU VMs on 4 pCPUs",
            },
            Published {
                field: "stacking_fraction",
                what: "siblings stacked, 3 VMs",
                value: 45.9,
                unit: "%",
                source: "KVM Forum 2021, 4-vCPU VMs on 4 pCPUs",
            },
        ],
    }
}

/// Experiment 3, RCU-reader preemption: postmark at 1:1, then 2x overcommitted under each
/// policy.
fn rcu(s: Scale) -> Experiment {
    // Transactions: the full size takes about 2 s at 1:1 with 4 vCPUs on this host.
    let work = if s.quick { 500 } else { 2000 };
    let slice = 20_000;
    let configs = overcommitted(
        "rcu",
        s.cores,
        slice,
        &format!("test=postmark work={work}"),
        &[2],
    );
    let src = "KVM Forum 2021, Postmark under overcommit";
    Experiment {
        name: "rcu",
        title: "RCU-reader preemption (postmark)",
        workload: "postmark",
        primary: "gp_max_us",
        lower_is_better: true,
        configs,
        published: vec![
            Published {
                field: "gp_max_us",
                what: "max grace period / 1:1",
                value: 26.37,
                unit: "x",
                source: src,
            },
            Published {
                field: "gp_avg_us",
                what: "average grace period / 1:1",
                value: 2.18,
                unit: "x",
                source: src,
            },
            Published {
                field: "gp_cpu_us",
                what: "CPU time per grace period / 1:1",
                value: 2.9,
                unit: "x",
                source: src,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_ideals_exist() {
        let s = Scale {
            cores: 2,
            quick: true,
        };
        let all = all(s);
        let ids: Vec<&str> = all
            .iter()
            .flat_map(|e| e.configs.iter().map(|c| c.id.as_str()))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "{ids:?}");
        for c in all.iter().flat_map(|e| &e.configs) {
            if let Some(i) = &c.ideal {
                assert!(ids.contains(&i.as_str()), "{} names {i}", c.id);
            }
            let vcpus: usize = c.vms.iter().map(|v| v.vcpus).sum();
            assert!(vcpus >= c.cpus || c.backend == "linux", "{}", c.id);
        }
    }

    #[test]
    fn select_refuses_an_unknown_name() {
        let s = Scale {
            cores: 2,
            quick: true,
        };
        assert_eq!(select(s, &["rcu".into()]).unwrap().len(), 1);
        assert_eq!(select(s, &[]).unwrap().len(), 3);
        assert_eq!(select(s, &["nope".into()]), Err("nope".into()));
    }
}
