//! The run's output files: every one is created before any guest starts (so a path that
//! cannot be written is a usage error, not a lost run), and written when the guests end.
//!
//! `--metrics FILE` and `--trace FILE` are files; `--results DIR` is a directory with
//! `metrics.json`, `trace.json` (under the Linux backend, the guests' events only),
//! `console.log` (every VM's console as printed) and `<vm>.console.log` (one VM's console).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::trace::Timeline;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{flag} {path}: cannot create it: {source}")]
    Create {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {what} to {path}: {source}")]
    Write {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the outputs go, each file already created.
#[derive(Debug, Default)]
pub struct Outputs {
    metrics: Vec<PathBuf>,
    traces: Vec<PathBuf>,
    results_dir: Option<PathBuf>,
}

/// Console log files under `--results`: all VMs as printed, and one per VM.
pub struct ConsoleLogs {
    pub all: Box<dyn Write + Send>,
    pub per_vm: Vec<Box<dyn Write + Send>>,
}

fn create(flag: &'static str, path: &Path) -> Result<File, OutputError> {
    File::create(path).map_err(|source| OutputError::Create {
        flag,
        path: path.to_owned(),
        source,
    })
}

impl Outputs {
    /// Creates every output file. Returns the console logs to fill during the run if `--results` was given.
    pub fn prepare(
        metrics: Option<&Path>,
        trace: Option<&Path>,
        results: Option<&Path>,
        vm_names: &[String],
    ) -> Result<(Outputs, Option<ConsoleLogs>), OutputError> {
        let mut out = Outputs::default();
        if let Some(p) = metrics {
            create("--metrics", p)?;
            out.metrics.push(p.to_owned());
        }
        if let Some(p) = trace {
            create("--trace", p)?;
            out.traces.push(p.to_owned());
        }
        let Some(dir) = results else {
            return Ok((out, None));
        };
        std::fs::create_dir_all(dir).map_err(|source| OutputError::Create {
            flag: "--results",
            path: dir.to_owned(),
            source,
        })?;
        create("--results", &dir.join("metrics.json"))?;
        out.metrics.push(dir.join("metrics.json"));
        create("--results", &dir.join("trace.json"))?;
        out.traces.push(dir.join("trace.json"));
        let all = Box::new(create("--results", &dir.join("console.log"))?);
        let per_vm = vm_names
            .iter()
            .map(|n| {
                let f = create("--results", &dir.join(format!("{n}.console.log")))?;
                Ok(Box::new(f) as Box<dyn Write + Send>)
            })
            .collect::<Result<_, OutputError>>()?;
        out.results_dir = Some(dir.to_owned());
        Ok((out, Some(ConsoleLogs { all, per_vm })))
    }

    pub fn wants_trace(&self) -> bool {
        !self.traces.is_empty()
    }

    pub fn results_dir(&self) -> Option<&Path> {
        self.results_dir.as_deref()
    }

    /// Writes the metrics JSON to every metrics path; the paths written.
    pub fn write_metrics(&self, json: &serde_json::Value) -> Result<&[PathBuf], OutputError> {
        let text = json.to_string() + "\n";
        for p in &self.metrics {
            std::fs::write(p, &text).map_err(|source| OutputError::Write {
                what: "metrics",
                path: p.clone(),
                source,
            })?;
        }
        Ok(&self.metrics)
    }

    /// Writes the trace (`run` describes the run, in its `otherData`) to every trace path;
    /// the paths written.
    pub fn write_trace(
        &self,
        timeline: &Timeline,
        run: serde_json::Value,
    ) -> Result<&[PathBuf], OutputError> {
        for p in &self.traces {
            let written = File::create(p).and_then(|f| {
                let mut w = std::io::BufWriter::new(f);
                crate::trace::json::write(timeline, run.clone(), &mut w)?;
                w.flush()
            });
            written.map_err(|source| OutputError::Write {
                what: "trace",
                path: p.clone(),
                source,
            })?;
        }
        Ok(&self.traces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritable_paths_are_refused_naming_the_flag() {
        let e = Outputs::prepare(Some(Path::new("/nonexistent/m.json")), None, None, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("--metrics /nonexistent/m.json: cannot create it"),
            "{e}"
        );
        let e = Outputs::prepare(None, None, Some(Path::new("/proc/nope")), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("--results /proc/nope"), "{e}");
    }

    #[test]
    fn a_results_dir_gets_every_file() {
        let dir = std::env::temp_dir().join(format!("pvsync-outputs-{}", std::process::id()));
        let names = ["a".to_string(), "b".to_string()];
        let (out, logs) = Outputs::prepare(None, None, Some(&dir), &names).unwrap();
        assert_eq!(logs.unwrap().per_vm.len(), 2);
        assert!(
            out.wants_trace(),
            "every backend has a trace (the guests' events)"
        );
        for f in [
            "metrics.json",
            "trace.json",
            "console.log",
            "a.console.log",
            "b.console.log",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
