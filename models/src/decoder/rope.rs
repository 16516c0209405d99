//! Rotary position embedding tables: inverse frequencies for each RoPE scaling type (the
//! formulas of Hugging Face's `modeling_rope_utils`) and per-token cos/sin rows.
//!
//! The engine's `Rope` op only rotates by the tables it is given, so every scaling variant
//! lives here, on the host: a step needs `tokens × rotary_dim / 2` cosines and sines, which is
//! nothing next to one layer's matmuls.

use std::f64::consts::PI;

use super::config::{RopeConfig, RopeScaling};

/// Frequencies and the attention factor (YaRN scales cos and sin by it; 1 otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

/// `1 / base^(2i / dim)` for `i < dim / 2`, computed in f32 as PyTorch does.
fn base_inv_freq(base: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            f64::from(1.0f32 / (base as f32).powf(exponent))
        })
        .collect()
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeConfig {
    /// The inverse frequencies for a sequence whose longest position in this step is
    /// `seq_len - 1` (only `dynamic` depends on it).
    pub fn frequencies(&self, seq_len: usize) -> RopeFrequencies {
        let dim = self.rotary_dim;
        let base = self.theta;
        let plain = |inv: Vec<f64>| RopeFrequencies {
            inv_freq: inv.into_iter().map(|x| x as f32).collect(),
            attention_factor: 1.0,
        };
        match &self.scaling {
            RopeScaling::Default => plain(base_inv_freq(base, dim)),
            RopeScaling::Linear { factor } => plain(
                base_inv_freq(base, dim)
                    .into_iter()
                    .map(|f| f / factor)
                    .collect(),
            ),
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings: original,
            } => {
                let base = if seq_len > *original {
                    let ratio = factor * seq_len as f64 / *original as f64 - (factor - 1.0);
                    base * ratio.powf(dim as f64 / (dim as f64 - 2.0))
                } else {
                    base
                };
                plain(base_inv_freq(base, dim))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                let old = *original as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                plain(
                    base_inv_freq(base, dim)
                        .into_iter()
                        .map(|f| {
                            let wavelen = 2.0 * PI / f;
                            if wavelen < high_wavelen {
                                f
                            } else if wavelen > low_wavelen {
                                f / factor
                            } else {
                                let smooth = (old / wavelen - low_freq_factor)
                                    / (high_freq_factor - low_freq_factor);
                                (1.0 - smooth) * f / factor + smooth * f
                            }
                        })
                        .collect(),
                )
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let attention =
                    attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                        (Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => {
                            yarn_mscale(*factor, *m) / yarn_mscale(*factor, *all)
                        }
                        _ => yarn_mscale(*factor, 1.0),
                    });
                let d = dim as f64;
                let correction = |rotations: f64| {
                    d * (*original as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv = base_inv_freq(base, dim)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extrapolation)| {
                        let interpolation = extrapolation / factor;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_weight = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_weight)
                            + extrapolation * extrapolation_weight
                    })
                    .collect::<Vec<_>>();
                RopeFrequencies {
                    inv_freq: inv.into_iter().map(|x| x as f32).collect(),
                    attention_factor: attention as f32,
                }
            }
        }
    }

    /// Appends the cos and sin rows (`rotary_dim / 2` each) of `positions` to the tables. The
    /// angle is `position · inv_freq` rounded to f32, as PyTorch computes it.
    pub fn extend_tables(
        &self,
        freqs: &RopeFrequencies,
        positions: impl IntoIterator<Item = usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let a = freqs.attention_factor;
        for p in positions {
            for &f in &freqs.inv_freq {
                let angle = f64::from(p as f32 * f);
                cos.push(angle.cos() as f32 * a);
                sin.push(angle.sin() as f32 * a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling, dim: usize) -> RopeConfig {
        RopeConfig {
            theta: 10000.0,
            rotary_dim: dim,
            scaling,
            max_position_embeddings: 2048,
        }
    }

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!(
                (f64::from(*x) - y).abs() <= 1e-6 * y.abs().max(1e-3),
                "{a:?} vs {b:?}"
            );
        }
    }

    // Expected values: Hugging Face's `_compute_*_parameters` formulas evaluated in float64
    // (transcribed in Python, independent of this code).

    #[test]
    fn default_and_linear() {
        let d = rope(RopeScaling::Default, 8).frequencies(1);
        close(&d.inv_freq, &[1.0, 0.1, 0.01, 0.001]);
        assert_eq!(d.attention_factor, 1.0);
        let l = rope(RopeScaling::Linear { factor: 4.0 }, 8).frequencies(1);
        close(&l.inv_freq, &[0.25, 0.025, 0.0025, 0.00025]);
    }

    #[test]
    fn dynamic_grows_the_base_only_past_the_original_context() {
        let r = rope(
            RopeScaling::Dynamic {
                factor: 2.0,
                original_max_position_embeddings: 16,
            },
            8,
        );
        close(&r.frequencies(16).inv_freq, &[1.0, 0.1, 0.01, 0.001]);
        // base' = 10000 · (2·32/16 − 1)^(8/6) = 10000 · 3^(4/3)
        close(
            &r.frequencies(32).inv_freq,
            &[
                1.0,
                0.069_336_127_435_063_47,
                0.004_807_498_567_691_361,
                0.000_333_333_333_333_333_4,
            ],
        );
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let r = rope(
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
            8,
        );
        // wavelengths 2π/f: 6.28 (< 16: kept), 62.8 (medium: smoothed), 628 and 6283 (> 64:
        // divided by 8).
        let smooth = (64.0 / (2.0 * PI / 0.1) - 1.0) / 3.0;
        let medium = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        close(
            &r.frequencies(1).inv_freq,
            &[1.0, medium, 0.01 / 8.0, 0.001 / 8.0],
        );
    }

    #[test]
    fn yarn_blends_and_scales_attention() {
        let r = rope(
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None,
                mscale: None,
                mscale_all_dim: None,
                truncate: true,
            },
            16,
        );
        let f = r.frequencies(1);
        // low = floor(16·ln(64/(64π))/(2 ln 1e4)) = −1, clamped to 0; high = ceil(16·ln(64/2π)
        // /(2 ln 1e4)) = ceil(2.016) = 3. Ramp (i − 0)/3: extrapolation weights 1, 2/3, 1/3, 0...
        let base: Vec<f64> = (0..8)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0))
            .collect();
        let want: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                let w = 1.0 - (i as f64 / 3.0).clamp(0.0, 1.0);
                e / 4.0 * (1.0 - w) + e * w
            })
            .collect();
        close(&f.inv_freq, &want);
        assert!((f64::from(f.attention_factor) - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn tables_hold_cos_and_sin_per_position() {
        let r = rope(RopeScaling::Default, 4);
        let f = r.frequencies(3);
        let (mut c, mut s) = (Vec::new(), Vec::new());
        r.extend_tables(&f, [0, 2], &mut c, &mut s);
        close(&c, &[1.0, 1.0, 2f64.cos(), (0.02f64).cos()]);
        close(&s, &[0.0, 0.0, 2f64.sin(), (0.02f64).sin()]);
    }
}
