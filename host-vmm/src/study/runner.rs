//! Runs one configuration once: `pvsync run` as a child process (this same binary), its
//! console to a log file, its metrics JSON read back into a [`Sample`].

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::experiments::Config;
use super::sample::Sample;

/// The guests use none of KVM's own paravirtual features: the study compares pvsync's
/// policies, and PV TLB flush alone would hide the shootdown problem under every one of
/// them (what KVM's features add is `./run.sh bench stockkvm`'s, docs/design.md).
const GUEST_KVM: &str = "kvm=none";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("starting {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{config} did not end within {secs} s of its own timeout; killed")]
    Hung { config: String, secs: u64 },
    #[error("{path}: not the metrics JSON of a run ({why})")]
    Metrics { path: PathBuf, why: String },
}

/// How the runs are made.
#[derive(Clone, Debug)]
pub struct Runner {
    /// The `pvsync` binary.
    pub exe: PathBuf,
    pub kernel: PathBuf,
    /// Each run's `--timeout`.
    pub timeout_s: u64,
    /// Where metrics and console logs go.
    pub dir: PathBuf,
}

/// Guest RAM per VM, MiB: room for 16 vCPUs and a workload's buffers.
const MEM_MIB: u64 = 256;
/// Past the run's own timeout, the runner kills it.
const GRACE: Duration = Duration::from_secs(30);

impl Runner {
    /// The `pvsync run` arguments of `c` with `seed`, writing metrics to `metrics`.
    pub fn args(&self, c: &Config, seed: u64, metrics: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--timeout".into(),
            self.timeout_s.to_string(),
            "--backend".into(),
            c.backend.into(),
            "--policy".into(),
            c.policy.into(),
            "--metrics".into(),
            metrics.display().to_string(),
        ];
        if c.backend == "slots" {
            a.extend([
                "--slots".into(),
                c.cpus.to_string(),
                "--slice-us".into(),
                c.slice_us.to_string(),
                "--placement".into(),
                c.placement.into(),
            ]);
        }
        for v in &c.vms {
            a.push("--vm".into());
            a.push(format!(
                "name={},vcpus={},mem={MEM_MIB},cmdline={} {GUEST_KVM} seed={seed}",
                v.name, v.vcpus, v.cmdline
            ));
        }
        a
    }

    /// Runs `c` (repeat `repeat`, seed `seed`) to completion; the sample has status -1 and
    /// no figures if the run left no metrics.
    pub fn run(
        &self,
        c: &Config,
        workload: &str,
        repeat: usize,
        seed: u64,
    ) -> Result<Sample, RunError> {
        let stem = format!("{}-{repeat}", c.id.replace(['/', ' ', ':'], "_"));
        let metrics = self.dir.join("runs").join(format!("{stem}.json"));
        let log_path = self.dir.join("runs").join(format!("{stem}.log"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| RunError::Io { path, source }
        };
        std::fs::create_dir_all(self.dir.join("runs")).map_err(io(&self.dir))?;
        // A reused folder's metrics must never pass for this run's.
        match std::fs::remove_file(&metrics) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&metrics)(e)),
            _ => {}
        }
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let err = log.try_clone().map_err(io(&log_path))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(self.args(c, seed, &metrics))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: runs in the child between fork and exec, where only async-signal-safe
        // calls are allowed: prctl is one (a system call). The child then gets SIGTERM if
        // the study dies, so no run outlives it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        let deadline = Instant::now() + Duration::from_secs(self.timeout_s) + GRACE;
        let mut forwarded = false;
        let status = loop {
            let polled = match child.try_wait() {
                Ok(p) => p,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io(&self.exe)(e));
                }
            };
            if let Some(s) = polled {
                break s;
            }
            let interrupted = crate::signals::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
            if interrupted && !forwarded {
                // A signal sent to the study alone: the run stops its guests and reports.
                forwarded = true;
                // SAFETY: kill takes a pid and a signal number; the child is ours and not
                // yet reaped (try_wait just said so), so the pid names it.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Hung {
                    config: c.id.clone(),
                    secs: self.timeout_s,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut s = Sample::of(c, repeat, seed);
        s.status = status.code().unwrap_or(-1);
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        if !text.is_empty() {
            let m: Value = serde_json::from_str(&text).map_err(|e| RunError::Metrics {
                path: metrics.clone(),
                why: e.to_string(),
            })?;
            s.values = figures(&m, workload).map_err(|why| RunError::Metrics {
                path: metrics.clone(),
                why,
            })?;
        }
        Ok(s)
    }
}

/// The figures of one run's metrics: each numeric field of `workload`'s `RESULT` line (mean
/// over the VMs that printed one), `stacking_fraction` (mean over the VMs) and `elapsed_ms`
/// (the slowest VM).
pub fn figures(
    m: &Value,
    workload: &str,
) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let vms = m["vms"].as_array().ok_or("no vms array")?;
    let mut sums: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    let mut add = |k: &str, v: f64| {
        let e = sums.entry(k.to_string()).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    };
    let mut elapsed: Option<f64> = None;
    for vm in vms {
        if let Some(ns) = vm["elapsed_ns"].as_f64() {
            elapsed = Some(elapsed.unwrap_or(0.0).max(ns / 1e6));
        }
        if let Some(f) = vm["stacking_fraction"].as_f64() {
            add("stacking_fraction", f);
        }
        let lines = vm["results"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for r in lines.iter().filter(|r| r["test"] == workload) {
            for (k, v) in r["fields"].as_object().into_iter().flatten() {
                if let Some(x) = v.as_f64() {
                    add(k, x);
                }
            }
        }
    }
    let mut out: std::collections::BTreeMap<String, f64> = sums
        .into_iter()
        .map(|(k, (sum, n))| (k, sum / n as f64))
        .collect();
    if let Some(e) = elapsed {
        out.insert("elapsed_ms".into(), e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::experiments::{all, Scale};

    #[test]
    fn figures_average_the_vms_and_keep_the_slowest_elapsed() {
        let m = serde_json::json!({"vms": [
            {"elapsed_ns": 2e9, "stacking_fraction": 0.5,
             "results": [{"test": "ebizzy", "fields": {"records_per_s": 10, "x": "word"}},
                         {"test": "boot", "fields": {"cpus": 4}}]},
            {"elapsed_ns": 3e9, "stacking_fraction": 0.25,
             "results": [{"test": "ebizzy", "fields": {"records_per_s": 20}}]}
        ]});
        let f = figures(&m, "ebizzy").unwrap();
        assert_eq!(f["records_per_s"], 15.0);
        assert_eq!(f["stacking_fraction"], 0.375);
        assert_eq!(f["elapsed_ms"], 3000.0);
        assert!(!f.contains_key("cpus") && !f.contains_key("x"));
        assert!(figures(&serde_json::json!({}), "ebizzy").is_err());
    }

    #[test]
    fn args_name_every_vm_with_its_seed() {
        let r = Runner {
            exe: "pvsync".into(),
            kernel: "k".into(),
            timeout_s: 60,
            dir: "d".into(),
        };
        let e = all(Scale {
            cores: 2,
            quick: true,
        });
        let c = &e[1].configs[2]; // 2 VMs, wake-affine
        let a = r.args(c, 7, Path::new("m.json"));
        let vms: Vec<&String> = a.iter().filter(|x| x.starts_with("name=")).collect();
        assert_eq!(vms.len(), 2);
        assert!(
            vms[0].ends_with(" kvm=none seed=7") && vms[0].contains("vcpus=4"),
            "{vms:?}"
        );
        assert!(a
            .windows(2)
            .any(|w| w[0] == "--placement" && w[1] == c.placement));
    }
}
