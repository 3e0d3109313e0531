//! Fair share over time: how far a VM's run time fell behind its fair share of what the VMs
//! got together, over the worst interval of the run (not only per boost).
//!
//! Each VM's monitor records the VM's cumulative run time and runnable time (running, or
//! waiting for a CPU) as its backend schedules it. After the run, the series are put on one
//! time grid. Within each grid interval, the CPU time the VMs received together is shared
//! out in proportion to their runnable time: one share per runnable vCPU, the round robin
//! both backends approximate. A VM's shortfall over an interval is its share minus what it
//! received, and the report keeps the largest over any interval (Kadane's maximum sum).
//!
//! The ledger promises that this stays within `max_debt` plus the scheduler's granularity:
//! a VM that boosts takes turns ahead of the others, and while it owes, its turns go to VMs
//! that owe nothing (docs/scheduling.md, "What the ledger promises").
//!
//! ```
//! use host_vmm::sched::fair_share::{shortfalls, Progress, ProgressSeries};
//! // Two VMs, each runnable on one vCPU the whole second; the first got 0.75 of it.
//! let series = |run| {
//!     let mut s = ProgressSeries::default();
//!     s.push(Progress { at_ns: 0, run_ns: 0, runnable_ns: 0 });
//!     s.push(Progress { at_ns: 1_000_000_000, run_ns: run, runnable_ns: 1_000_000_000 });
//!     s
//! };
//! let (a, b) = (series(750_000_000), series(250_000_000));
//! let out = shortfalls(&[&a, &b], 1_000_000_000);
//! assert_eq!(out[0].max_ns, 0);
//! assert_eq!(out[1].max_ns, 250_000_000, "half of the 1 s the two received, less 0.25 s");
//! ```

use std::sync::OnceLock;
use std::time::Instant;

/// Points a series keeps at most; past that it keeps every other point (a coarser grid).
pub const MAX_POINTS: usize = 1 << 14;

/// Grid the shortfall is computed on, ns (coarser if a series had to thin out).
pub const GRID_NS: u64 = 20_000_000;

/// The instant every VM's series counts from (the first use in the process).
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A VM's cumulative run time and runnable time at `at_ns` after [`epoch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub at_ns: u64,
    pub run_ns: u64,
    pub runnable_ns: u64,
}

/// One VM's [`Progress`] over its run, bounded in size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgressSeries {
    points: Vec<Progress>,
    /// Points are at least this far apart (0 at first; doubles each time the series thins).
    spacing_ns: u64,
}

impl ProgressSeries {
    /// Adds a look. Counters never go back (a later smaller figure is taken as the earlier
    /// one) and time must move forward, or the look is ignored.
    pub fn push(&mut self, p: Progress) {
        let p = match self.points.last() {
            Some(last) if p.at_ns <= last.at_ns => return,
            Some(last) if p.at_ns - last.at_ns < self.spacing_ns => return,
            Some(last) => Progress {
                at_ns: p.at_ns,
                run_ns: p.run_ns.max(last.run_ns),
                runnable_ns: p.runnable_ns.max(last.runnable_ns).max(p.run_ns),
            },
            None => Progress {
                runnable_ns: p.runnable_ns.max(p.run_ns),
                ..p
            },
        };
        if self.points.len() == MAX_POINTS {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.spacing_ns = (2 * self.spacing_ns).max(GRID_NS);
        }
        self.points.push(p);
    }

    pub fn points(&self) -> &[Progress] {
        &self.points
    }

    /// The counters at `t`, interpolated; None outside the series.
    fn at(&self, t: u64) -> Option<(u64, u64)> {
        let i = self.points.partition_point(|p| p.at_ns < t);
        let b = self.points.get(i)?;
        if b.at_ns == t {
            return Some((b.run_ns, b.runnable_ns));
        }
        let a = self.points.get(i.checked_sub(1)?)?;
        let lerp = |x: u64, y: u64| {
            let f = (t - a.at_ns) as u128 * (y - x) as u128 / (b.at_ns - a.at_ns) as u128;
            x + f as u64
        };
        Some((lerp(a.run_ns, b.run_ns), lerp(a.runnable_ns, b.runnable_ns)))
    }
}

/// The worst interval of one VM: its share of what the VMs received there minus what it
/// received (0 if it never fell behind), and the totals over the whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shortfall {
    pub max_ns: u64,
    /// Where that interval lies, ns after [`epoch`].
    pub from_ns: u64,
    pub to_ns: u64,
    /// Over the intervals it shared with another VM: its share, and what it received.
    pub share_ns: u64,
    pub received_ns: u64,
}

/// Each VM's [`Shortfall`], on a grid of `grid_ns` (or coarser, as the series allow).
pub fn shortfalls(series: &[&ProgressSeries], grid_ns: u64) -> Vec<Shortfall> {
    let mut out = vec![Shortfall::default(); series.len()];
    let spans: Vec<(u64, u64)> = series
        .iter()
        .filter_map(|s| Some((s.points.first()?.at_ns, s.points.last()?.at_ns)))
        .collect();
    let (Some(start), Some(end)) = (
        spans.iter().map(|s| s.0).min(),
        spans.iter().map(|s| s.1).max(),
    ) else {
        return out;
    };
    let step = series
        .iter()
        .map(|s| s.spacing_ns)
        .fold(grid_ns.max(1), u64::max);
    // Kadane per VM: the worst sum ending at the current interval, and where it began.
    let mut current: Vec<(i128, u64)> = vec![(0, start); series.len()];
    let mut t = start;
    while t < end {
        let t1 = t.saturating_add(step).min(end);
        let deltas: Vec<Option<(u64, u64)>> = series
            .iter()
            .map(|s| {
                let (r0, q0) = s.at(t)?;
                let (r1, q1) = s.at(t1)?;
                Some((r1 - r0, q1 - q0))
            })
            .collect();
        let live = deltas.iter().flatten().count();
        let received: u128 = deltas.iter().flatten().map(|d| d.0 as u128).sum();
        let runnable: u128 = deltas.iter().flatten().map(|d| d.1 as u128).sum();
        if live >= 2 && runnable > 0 {
            for (i, d) in deltas.iter().enumerate() {
                let Some((ran, wanted)) = *d else { continue };
                let share = (wanted as u128 * received / runnable) as u64;
                out[i].share_ns += share;
                out[i].received_ns += ran;
                let (sum, from) = &mut current[i];
                if *sum <= 0 {
                    *sum = 0;
                    *from = t;
                }
                *sum += share as i128 - ran as i128;
                if *sum > out[i].max_ns as i128 {
                    out[i].max_ns = *sum as u64;
                    out[i].from_ns = *from;
                    out[i].to_ns = t1;
                }
            }
        }
        t = t1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A series from (ms, run ms, runnable ms) points.
    fn series(points: &[(u64, u64, u64)]) -> ProgressSeries {
        let mut s = ProgressSeries::default();
        for &(at, run, runnable) in points {
            s.push(Progress {
                at_ns: at * MS,
                run_ns: run * MS,
                runnable_ns: runnable * MS,
            });
        }
        s
    }

    #[test]
    fn equal_vms_fall_short_by_nothing() {
        let a = series(&[(0, 0, 0), (100, 50, 200), (200, 100, 400)]);
        let out = shortfalls(&[&a, &a.clone()], 20 * MS);
        assert_eq!(out[0].max_ns, 0);
        assert_eq!((out[0].share_ns, out[0].received_ns), (100 * MS, 100 * MS));
    }

    #[test]
    fn the_worst_interval_is_found_and_a_lead_elsewhere_does_not_hide_it() {
        // Both want the CPU the whole time. B gets 15 ms more than its share in the first
        // 100 ms, then 30 ms less over the next 100 ms, then they run evenly.
        let a = series(&[(0, 0, 0), (100, 35, 100), (200, 115, 200), (300, 165, 300)]);
        let b = series(&[(0, 0, 0), (100, 65, 100), (200, 85, 200), (300, 135, 300)]);
        let out = shortfalls(&[&a, &b], 100 * MS);
        assert_eq!(out[1].max_ns, 30 * MS, "B: 50 - 20 over [100, 200]");
        assert_eq!((out[1].from_ns, out[1].to_ns), (100 * MS, 200 * MS));
        assert_eq!(out[0].max_ns, 15 * MS, "A: 50 - 35 over [0, 100]");
    }

    #[test]
    fn shares_follow_runnable_time_and_a_lone_vm_is_never_short() {
        // A runnable on 3 vCPUs, B on 1; they received 2 CPUs' worth: A's share is 1.5.
        let a = series(&[(0, 0, 0), (100, 120, 300)]);
        let b = series(&[(0, 0, 0), (100, 80, 100)]);
        let out = shortfalls(&[&a, &b], 100 * MS);
        assert_eq!((out[0].max_ns, out[1].max_ns), (30 * MS, 0));
        // C runs alone before A and B start: not counted.
        let c = series(&[(0, 0, 0), (100, 0, 100), (200, 50, 200)]);
        let d = series(&[(100, 0, 0), (200, 50, 100)]);
        let out = shortfalls(&[&c, &d], 100 * MS);
        assert_eq!(out[0].share_ns, 50 * MS);
        assert_eq!(out[0].max_ns, 0);
    }

    #[test]
    fn a_long_series_thins_out_and_keeps_its_totals() {
        let mut s = ProgressSeries::default();
        for i in 0..(3 * MAX_POINTS as u64) {
            s.push(Progress {
                at_ns: i * MS,
                run_ns: i * MS / 2,
                runnable_ns: i * MS,
            });
        }
        assert!(s.points().len() <= MAX_POINTS);
        let last = *s.points().last().unwrap();
        assert!(last.at_ns >= (3 * MAX_POINTS as u64 - 1) * MS - s.spacing_ns);
        assert_eq!(last.run_ns * 2, last.runnable_ns);
    }

    #[test]
    fn counters_never_go_back_and_time_only_forward() {
        let s = series(&[(0, 10, 5), (10, 5, 5), (10, 50, 50), (5, 60, 60)]);
        let p = s.points();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].run_ns, p[0].runnable_ns), (10 * MS, 10 * MS));
        assert_eq!((p[1].run_ns, p[1].runnable_ns), (10 * MS, 10 * MS));
    }

    #[test]
    fn no_series_or_empty_series() {
        assert!(shortfalls(&[], GRID_NS).is_empty());
        let e = ProgressSeries::default();
        assert_eq!(
            shortfalls(&[&e, &e], GRID_NS),
            vec![Shortfall::default(); 2]
        );
    }
}
