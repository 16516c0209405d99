//! Activation-range observers for static quantization: they watch a layer's inputs over a
//! calibration set and choose one u8 scale and zero point for the tensor.
//!
//! - **min-max**: the smallest and largest value seen. Nothing is clipped, but one outlier
//!   stretches the scale for every other value.
//! - **percentile** (histogram): a 2048-bin histogram over the range seen so far (re-binned when
//!   the range grows), cut at the given percentile at each tail. Clips rare outliers to give the
//!   bulk of the values finer steps.

use crate::int8::ActParams;

const BINS: usize = 2048;

/// Which observer to use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ObserverKind {
    MinMax,
    /// Keep this fraction of the values inside the range at each tail, e.g. `0.9999`.
    Percentile(f64),
}

impl std::str::FromStr for ObserverKind {
    type Err = String;

    /// `minmax`, `percentile` (99.99%) or `percentile:P` with P in (50, 100].
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minmax" | "min-max" => Ok(ObserverKind::MinMax),
            "percentile" | "histogram" => Ok(ObserverKind::Percentile(0.9999)),
            _ => {
                let p = s
                    .strip_prefix("percentile:")
                    .and_then(|p| p.parse::<f64>().ok())
                    .filter(|p| *p > 50.0 && *p <= 100.0)
                    .ok_or_else(|| {
                        format!("unknown observer `{s}` (minmax, percentile, percentile:99.9)")
                    })?;
                Ok(ObserverKind::Percentile(p / 100.0))
            }
        }
    }
}

impl std::fmt::Display for ObserverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObserverKind::MinMax => f.write_str("minmax"),
            ObserverKind::Percentile(p) => write!(f, "percentile:{}", p * 100.0),
        }
    }
}

/// Watches one tensor's values.
#[derive(Debug, Clone)]
pub struct Observer {
    kind: ObserverKind,
    min: f32,
    max: f32,
    /// Histogram over `[lo, hi)`, present for the percentile observer once values were seen.
    hist: Vec<u64>,
    lo: f32,
    hi: f32,
}

impl Observer {
    pub fn new(kind: ObserverKind) -> Self {
        Self {
            kind,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            hist: Vec::new(),
            lo: 0.0,
            hi: 0.0,
        }
    }

    /// Records values (non-finite ones are ignored).
    pub fn observe(&mut self, xs: &[f32]) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in xs.iter().filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            return;
        }
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        if let ObserverKind::Percentile(_) = self.kind {
            self.grow(lo, hi);
            let width = (self.hi - self.lo) / BINS as f32;
            for &v in xs.iter().filter(|v| v.is_finite()) {
                let b = (((v - self.lo) / width) as usize).min(BINS - 1);
                self.hist[b] += 1;
            }
        }
    }

    /// Widens the histogram's range to cover `[lo, hi]`, moving old counts by their bin centres.
    fn grow(&mut self, lo: f32, hi: f32) {
        if !self.hist.is_empty() && lo >= self.lo && hi < self.hi {
            return;
        }
        let (new_lo, new_hi) = if self.hist.is_empty() {
            (lo, hi)
        } else {
            (self.lo.min(lo), self.hi.max(hi))
        };
        // Leave headroom so that a slowly growing range does not re-bin on every batch.
        let span = (new_hi - new_lo).max(1e-6);
        let (new_lo, new_hi) = (new_lo - 0.125 * span, new_hi + 0.125 * span);
        let mut hist = vec![0u64; BINS];
        if !self.hist.is_empty() {
            let old_w = (self.hi - self.lo) / BINS as f32;
            let new_w = (new_hi - new_lo) / BINS as f32;
            for (i, &c) in self.hist.iter().enumerate().filter(|(_, c)| **c > 0) {
                let centre = self.lo + (i as f32 + 0.5) * old_w;
                hist[(((centre - new_lo) / new_w) as usize).min(BINS - 1)] += c;
            }
        }
        self.hist = hist;
        self.lo = new_lo;
        self.hi = new_hi;
    }

    /// The smallest and largest values seen, if any.
    pub fn range(&self) -> Option<(f32, f32)> {
        (self.min <= self.max).then_some((self.min, self.max))
    }

    /// The range this observer chooses: min-max, or the percentile cut (never beyond min-max).
    pub fn chosen_range(&self) -> Option<(f32, f32)> {
        let (min, max) = self.range()?;
        let ObserverKind::Percentile(p) = self.kind else {
            return Some((min, max));
        };
        let total: u64 = self.hist.iter().sum();
        let tail = ((1.0 - p) * total as f64).floor() as u64;
        let width = (self.hi - self.lo) / BINS as f32;
        let (mut below, mut lo_bin) = (0u64, 0usize);
        for (i, &c) in self.hist.iter().enumerate() {
            if below + c > tail {
                lo_bin = i;
                break;
            }
            below += c;
        }
        let (mut above, mut hi_bin) = (0u64, BINS - 1);
        for (i, &c) in self.hist.iter().enumerate().rev() {
            if above + c > tail {
                hi_bin = i;
                break;
            }
            above += c;
        }
        let lo = (self.lo + lo_bin as f32 * width).max(min);
        let hi = (self.lo + (hi_bin + 1) as f32 * width).min(max);
        Some((lo.min(hi), hi.max(lo)))
    }

    /// The u8 parameters for the chosen range (`None` if nothing was observed).
    pub fn params(&self) -> Option<ActParams> {
        self.chosen_range()
            .map(|(lo, hi)| ActParams::from_range(lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    #[test]
    fn min_max_sees_every_value() {
        let mut o = Observer::new(ObserverKind::MinMax);
        assert!(o.params().is_none());
        o.observe(&[1.0, -2.0, f32::NAN, f32::INFINITY]);
        o.observe(&[5.0]);
        assert_eq!(o.range(), Some((-2.0, 5.0)));
        let p = o.params().unwrap();
        assert_eq!(p.quantize(-2.0), 0);
        assert_eq!(p.quantize(5.0), 255);
    }

    #[test]
    fn percentile_clips_rare_outliers() {
        let mut rng = Rng::new(1);
        let mut o = Observer::new(ObserverKind::Percentile(0.999));
        let mut m = Observer::new(ObserverKind::MinMax);
        // Batches whose range grows, then one huge outlier.
        for batch in 0..20 {
            let xs = rng.normal_vec(5000, 1.0 + batch as f32 * 0.05);
            o.observe(&xs);
            m.observe(&xs);
        }
        o.observe(&[1000.0]);
        m.observe(&[1000.0]);
        let (lo, hi) = o.chosen_range().unwrap();
        assert!(hi < 10.0 && lo > -10.0, "percentile range {lo}..{hi}");
        assert!(
            hi > 2.0 && lo < -2.0,
            "percentile range {lo}..{hi} too tight"
        );
        assert_eq!(m.chosen_range().unwrap().1, 1000.0);
        // 100% keeps everything.
        let mut all = Observer::new(ObserverKind::Percentile(1.0));
        all.observe(&[-1.0, 0.5, 3.0]);
        let (lo, hi) = all.chosen_range().unwrap();
        assert!(lo <= -1.0 && hi >= 3.0);
    }

    #[test]
    fn parses_names() {
        assert_eq!(
            "minmax".parse::<ObserverKind>().unwrap(),
            ObserverKind::MinMax
        );
        assert!(matches!(
            "percentile:99.9".parse::<ObserverKind>().unwrap(),
            ObserverKind::Percentile(p) if (p - 0.999).abs() < 1e-12
        ));
        assert!("percentile:20".parse::<ObserverKind>().is_err());
        assert!("median".parse::<ObserverKind>().is_err());
    }
}
