//! Choosing the next token from a row of logits: penalties, then greedy or temperature /
//! top-k / top-p sampling with a per-request seeded generator (the order of Hugging Face's
//! logits processors).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How one request picks tokens. `temperature == 0` (or `top_k == 1`) is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 1 = off. Hugging Face's: a seen token's positive logit is divided by it, a negative one
    /// multiplied.
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// A sequence's sampling state: its parameters and random generator.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .finish()
    }
}

/// Index of the largest value; the first on ties (as `torch.argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::seed_from_u64(rand::random()),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `prompt` and `generated` feed the penalties.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, s) in logits.iter_mut().zip(seen) {
                if s {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, f32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1.0;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c;
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits) as u32;
        }
        // Candidates, most likely first, after temperature and top-k.
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits) as u32;
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= sum);
        }
        let mut u: f32 = self.rng.random();
        for (c, &x) in cand.iter().zip(&probs) {
            if u < x {
                return c.0;
            }
            u -= x;
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        f(&mut p);
        Sampler::new(p)
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(|_| {});
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_hugging_face() {
        // Token 0 (seen, positive) is divided, token 1 (seen, negative) multiplied.
        let mut s = sampler(|p| p.repetition_penalty = 2.0);
        let mut l = [2.0, -1.0, 1.5];
        assert_eq!(s.sample(&mut l, &[0, 1], &[]), 2);
        assert_eq!(l, [1.0, -2.0, 1.5]);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let mut s = sampler(|p| {
            p.temperature = 1.0;
            p.top_k = 2;
        });
        for _ in 0..200 {
            let t = s.sample(&mut [5.0, 4.9, 0.0, 4.8], &[], &[]);
            assert!(t == 0 || t == 1);
        }
        // Token 0 alone has 0.88 of the mass: top_p 0.5 keeps only it.
        let mut s = sampler(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5;
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 0.0], &[], &[]), 0);
        }
    }

    #[test]
    fn a_seed_repeats_and_temperature_spreads() {
        let run = |seed| {
            let mut s = sampler(|p| {
                p.temperature = 1.0;
                p.seed = Some(seed);
            });
            (0..64)
                .map(|_| s.sample(&mut [0.0; 8], &[], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let distinct: std::collections::HashSet<_> = run(3).into_iter().collect();
        assert!(
            distinct.len() >= 6,
            "uniform logits should spread: {distinct:?}"
        );
    }

    #[test]
    fn penalties_are_validated() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
    }
}
