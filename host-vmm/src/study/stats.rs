//! Medians and spreads over a configuration's repeats, and ratios to the ideal.

use super::sample::Sample;

/// A figure over a configuration's successful repeats: median and range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// Over `values` (None if empty; values that are not finite are ignored).
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// Every value divided by `d` (the ideal's median); None if `d` is not positive.
    pub fn over(self, d: f64) -> Option<Stat> {
        (d > 0.0).then(|| Stat {
            median: self.median / d,
            min: self.min / d,
            max: self.max / d,
            n: self.n,
        })
    }
}

/// `figure` over the successful repeats (status 0) of configuration `config`.
pub fn figure(samples: &[Sample], config: &str, figure: &str) -> Option<Stat> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.config == config && s.status == 0)
        .filter_map(|s| s.values.get(figure).copied())
        .collect();
    Stat::of(&v)
}

/// `figure` of `config` as a ratio to the median of `ideal`'s.
pub fn ratio(samples: &[Sample], config: &str, ideal: &str, fig: &str) -> Option<Stat> {
    let base = figure(samples, ideal, fig)?;
    figure(samples, config, fig)?.over(base.median)
}

/// Repeats of `config` that ran, and those that passed.
pub fn runs(samples: &[Sample], config: &str) -> (usize, usize) {
    let all = samples.iter().filter(|s| s.config == config);
    let ok = all.clone().filter(|s| s.status == 0).count();
    (all.count(), ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0, f64::NAN, f64::INFINITY]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of(&[]), None);
        let r = s.over(2.0).unwrap();
        assert_eq!((r.median, r.min, r.max), (1.0, 0.5, 1.5));
        assert_eq!(s.over(0.0), None);
    }
}
