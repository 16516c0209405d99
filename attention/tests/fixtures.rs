//! Every kernel against PyTorch's float64 references in `$KILN_FIXTURES/sdpa`, and against the
//! safe reference on random problems (shapes, masks, biases, GQA, varlen).
//!
//! `manifest.json` drives the fixture cases, so new cases in the same format are picked up
//! without code changes; a boolean `*.mask.npy` becomes a boolean mask and a float one an
//! additive bias.

use std::path::{Path, PathBuf};

use kiln_attention::{
    CausalAlign, Isa, Kernel, KernelChoice, Mask, MaskKind, ProblemSummary, SdpaParams, SdpaShape,
    VarlenParams, scaled_dot_product_attention, scaled_dot_product_attention_varlen, select,
    unsupported,
};

fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

fn read_npy_f32(path: &PathBuf) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = match npy.dtype() {
        npyz::DType::Plain(t) if t.size_field() == 8 && t.type_char() == npyz::TypeChar::Float => {
            npy.into_vec::<f64>()
                .unwrap()
                .into_iter()
                .map(|x| x as f32)
                .collect()
        }
        _ => npy.into_vec::<f32>().unwrap(),
    };
    (shape, data)
}

/// One fixture case's inputs, float64 reference output (as f32) and shape.
struct Case {
    shape: SdpaShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    want: Vec<f32>,
}

fn load_case(dir: &Path, name: &str) -> Case {
    let (qs, q) = read_npy_f32(&dir.join(format!("{name}.q.npy")));
    let (ks, k) = read_npy_f32(&dir.join(format!("{name}.k.npy")));
    let (_, v) = read_npy_f32(&dir.join(format!("{name}.v.npy")));
    let (_, want) = read_npy_f32(&dir.join(format!("{name}.out.npy")));
    let shape = SdpaShape {
        batch: qs[0],
        q_heads: qs[1],
        q_len: qs[2],
        head_dim: qs[3],
        kv_heads: ks[1],
        kv_len: ks[2],
    };
    Case {
        shape,
        q,
        k,
        v,
        want,
    }
}

enum MaskData {
    Bool(Vec<bool>),
    Bias(Vec<f32>),
}

fn read_npy_mask(path: &PathBuf) -> (Vec<usize>, MaskData) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let is_float =
        matches!(npy.dtype(), npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float);
    if is_float {
        (shape, MaskData::Bias(read_npy_f32(path).1))
    } else {
        (shape, MaskData::Bool(npy.into_vec::<bool>().unwrap()))
    }
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max)
}

#[test]
fn every_kernel_matches_torch_float64_references() {
    let dir = fixtures().join("sdpa");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().expect("manifest.cases");
    let mut ran = 0;
    let mut ran_cases = 0;
    let (mut flash_cases, mut dense_cases) = (0, 0);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let Case {
            shape,
            q,
            k,
            v,
            want,
        } = load_case(&dir, name);
        let causal = case["is_causal"].as_bool().unwrap_or(false);
        let align = match case["causal_alignment"].as_str() {
            Some("bottom_right") => CausalAlign::BottomRight,
            _ => CausalAlign::TopLeft,
        };
        let mask_file = dir.join(format!("{name}.mask.npy"));
        let mask_data;
        let mask = if mask_file.exists() {
            let (ms, m) = read_npy_mask(&mask_file);
            assert!(
                !causal,
                "{name}: a mask file together with is_causal is not a torch input"
            );
            // torch broadcasts lower-rank masks from the right.
            assert!(ms.len() <= 4, "{name}: mask rank {} > 4", ms.len());
            let mut dims = [1usize; 4];
            dims[4 - ms.len()..].copy_from_slice(&ms);
            mask_data = m;
            match &mask_data {
                // A [B, 1, 1, Sk] boolean mask is a key-padding mask: PyTorch has no other way
                // to say it, kiln does (and flash takes it).
                MaskData::Bool(data) if dims[1] == 1 && dims[2] == 1 && dims[0] == shape.batch => {
                    Mask::KeyPadding(data)
                }
                MaskData::Bool(data) => Mask::Bool { data, dims },
                MaskData::Bias(data) => Mask::Bias { data, dims },
            }
        } else if causal {
            Mask::Causal(align)
        } else {
            Mask::None
        };
        let scale = case["scale"].as_f64().map(|s| s as f32);
        let params = SdpaParams { shape, mask, scale };
        for kernel in Kernel::ALL {
            let mut out = vec![f32::NAN; shape.q_elems()];
            let choice = KernelChoice::Force(kernel);
            match scaled_dot_product_attention(&q, &k, &v, &mut out, &params, choice) {
                Ok(ran) => {
                    assert_eq!(ran, kernel);
                    let worst = max_rel_err(&out, &want);
                    assert!(
                        worst <= 1e-5,
                        "{name} [{kernel}]: relative error {worst} > 1e-5"
                    );
                    ran_cases += 1;
                    flash_cases += usize::from(kernel == Kernel::Flash);
                }
                Err(e) => {
                    // Only flash may refuse, and only a dense mask, with the reason.
                    assert_eq!(kernel, Kernel::Flash, "{name}: {kernel} refused: {e}");
                    assert!(!mask.kind().is_structured(), "{name}: flash refused: {e}");
                    assert!(e.to_string().contains("index-computable"), "{e}");
                    dense_cases += 1;
                }
            }
        }
        ran += 1;
    }
    assert_eq!(ran, cases.len(), "every manifest case must run");
    assert!(
        ran_cases >= 2 * cases.len(),
        "math and mem_efficient run every case"
    );
    assert!(
        flash_cases + dense_cases == cases.len() && flash_cases > 0,
        "flash runs every case without a dense mask ({flash_cases} run, {dense_cases} dense)"
    );
}

/// A key-padding mask and the same mask spelled as a broadcast boolean mask agree, and a
/// bottom-right causal mask equals its explicit boolean form.
#[test]
fn mask_spellings_agree() {
    let shape = SdpaShape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 5,
        kv_len: 9,
        head_dim: 24,
    };
    let fill = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    };
    let (q, k, v) = (
        fill(shape.q_elems(), 1),
        fill(shape.kv_elems(), 2),
        fill(shape.kv_elems(), 3),
    );
    let run = |mask: Mask<'_>| {
        let mut out = vec![0.0f32; shape.q_elems()];
        let params = SdpaParams {
            shape,
            mask,
            scale: None,
        };
        scaled_dot_product_attention(&q, &k, &v, &mut out, &params, KernelChoice::Auto).unwrap();
        out
    };
    let lens = [9usize, 4];
    let pad: Vec<bool> = lens
        .iter()
        .flat_map(|&l| (0..9).map(move |j| j < l))
        .collect();
    assert_eq!(
        run(Mask::KeyPadding(&pad)),
        run(Mask::Bool {
            data: &pad,
            dims: [2, 1, 1, 9]
        })
    );
    let offset = shape.kv_len - shape.q_len;
    let br: Vec<bool> = (0..5)
        .flat_map(|i| (0..9).map(move |j| j <= i + offset))
        .collect();
    assert_eq!(
        run(Mask::Causal(CausalAlign::BottomRight)),
        run(Mask::Bool {
            data: &br,
            dims: [1, 1, 5, 9]
        })
    );
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let shape = SdpaShape {
        batch: 1,
        q_heads: 3,
        kv_heads: 2,
        q_len: 2,
        kv_len: 2,
        head_dim: 4,
    };
    let params = SdpaParams {
        shape,
        mask: Mask::None,
        scale: None,
    };
    let buf = vec![0.0f32; 64];
    let mut out = vec![0.0f32; 24];
    let err = scaled_dot_product_attention(
        &buf[..24],
        &buf[..16],
        &buf[..16],
        &mut out,
        &params,
        KernelChoice::Auto,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
    let shape = SdpaShape {
        q_heads: 2,
        ..shape
    };
    let params = SdpaParams {
        shape,
        mask: Mask::None,
        scale: None,
    };
    let err = scaled_dot_product_attention(
        &buf[..15],
        &buf[..16],
        &buf[..16],
        &mut out[..16],
        &params,
        KernelChoice::Auto,
    )
    .unwrap_err();
    assert!(err.to_string().contains("q has 15 elements"), "{err}");
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.below(2001) as f32 / 1000.0 - 1.0)
            .collect()
    }
}

/// Every kernel against the safe reference over random shapes, masks (incl. additive biases),
/// GQA and head sizes that are not multiples of the vector width. Lengths reach past one flash
/// key tile (512) and several query blocks so tile boundaries and skipped tiles are exercised.
#[test]
fn every_kernel_matches_reference_on_random_problems() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for case in 0..40 {
        let kv_heads = 1 + rng.below(2);
        let long = case % 8 == 0;
        let len = |rng: &mut Rng| 1 + if long { rng.below(700) } else { rng.below(80) };
        let shape = SdpaShape {
            batch: 1 + rng.below(2),
            q_heads: kv_heads * (1 + rng.below(3)),
            kv_heads,
            q_len: len(&mut rng),
            kv_len: len(&mut rng),
            head_dim: [1, 7, 16, 33, 64, 80, 96, 128, 256][rng.below(9)],
        };
        let (q, k, v) = (
            rng.values(shape.q_elems()),
            rng.values(shape.kv_elems()),
            rng.values(shape.kv_elems()),
        );
        let pad: Vec<bool> = (0..shape.batch * shape.kv_len)
            .map(|i| i % shape.kv_len <= (i * 31) % shape.kv_len)
            .collect();
        let dense: Vec<bool> = (0..shape.q_len * shape.kv_len)
            .map(|i| (i * 13) % 5 != 0)
            .collect();
        let bias: Vec<f32> = (0..shape.q_heads * shape.q_len * shape.kv_len)
            .map(|i| match i % 11 {
                0 => f32::NEG_INFINITY,
                r => r as f32 * 0.3 - 1.5,
            })
            .collect();
        let mut masks = vec![
            Mask::None,
            Mask::Causal(CausalAlign::TopLeft),
            Mask::KeyPadding(&pad),
            Mask::Bool {
                data: &dense,
                dims: [1, 1, shape.q_len, shape.kv_len],
            },
            Mask::Bias {
                data: &bias,
                dims: [1, shape.q_heads, shape.q_len, shape.kv_len],
            },
            Mask::Bias {
                data: &bias[..shape.kv_len],
                dims: [1, 1, 1, shape.kv_len],
            },
        ];
        if shape.q_len <= shape.kv_len {
            masks.push(Mask::Causal(CausalAlign::BottomRight));
        }
        for mask in masks {
            let params = SdpaParams {
                shape,
                mask,
                scale: if case % 3 == 0 { Some(0.7) } else { None },
            };
            let mut want = vec![0.0f32; shape.q_elems()];
            kiln_attention::reference::sdpa(&q, &k, &v, &mut want, &params);
            for kernel in Kernel::ALL {
                let mut got = vec![f32::NAN; shape.q_elems()];
                let choice = KernelChoice::Force(kernel);
                let result = scaled_dot_product_attention(&q, &k, &v, &mut got, &params, choice);
                if kernel == Kernel::Flash && !mask.kind().is_structured() {
                    assert!(result.is_err(), "flash must refuse a {} mask", mask.name());
                    continue;
                }
                assert_eq!(result.unwrap(), kernel);
                let err = max_rel_err(&got, &want);
                assert!(
                    err <= 1e-5,
                    "case {case} {shape} mask {} [{kernel}]: relative error {err}",
                    mask.name()
                );
            }
        }
    }
}

/// Varlen output equals running each sequence alone, for every kernel, with GQA, cross-attention
/// lengths and both causal alignments.
#[test]
fn varlen_equals_each_sequence_alone() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..12 {
        let kv_heads = 1 + rng.below(2);
        let q_heads = kv_heads * (1 + rng.below(2));
        let head_dim = [8, 32, 64, 80][rng.below(4)];
        let n = 1 + rng.below(5);
        let cross = case % 3 == 2;
        let q_lens: Vec<usize> = (0..n)
            .map(|_| 1 + rng.below(if case % 4 == 0 { 600 } else { 60 }))
            .collect();
        let kv_lens: Vec<usize> = if cross {
            q_lens.iter().map(|&l| l + rng.below(20)).collect()
        } else {
            q_lens.clone()
        };
        let cu = |lens: &[usize]| -> Vec<usize> {
            std::iter::once(0)
                .chain(lens.iter().scan(0, |acc, &l| {
                    *acc += l;
                    Some(*acc)
                }))
                .collect()
        };
        let (cu_q, cu_k) = (cu(&q_lens), cu(&kv_lens));
        let (tq, tk) = (cu_q[n], cu_k[n]);
        let q = rng.values(q_heads * tq * head_dim);
        let k = rng.values(kv_heads * tk * head_dim);
        let v = rng.values(kv_heads * tk * head_dim);
        for causal in [
            None,
            Some(CausalAlign::TopLeft),
            Some(CausalAlign::BottomRight),
        ] {
            let params = VarlenParams {
                q_heads,
                kv_heads,
                head_dim,
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &cu_k,
                causal,
                scale: None,
            };
            // Each sequence alone, through the padded API with batch 1.
            let mut want = vec![0.0f32; q.len()];
            for s in 0..n {
                let (ql, kl) = (q_lens[s], kv_lens[s]);
                let gather = |x: &[f32], heads: usize, total: usize, start: usize, len: usize| {
                    (0..heads)
                        .flat_map(|h| {
                            x[(h * total + start) * head_dim..(h * total + start + len) * head_dim]
                                .to_vec()
                        })
                        .collect::<Vec<f32>>()
                };
                let qs = gather(&q, q_heads, tq, cu_q[s], ql);
                let ks = gather(&k, kv_heads, tk, cu_k[s], kl);
                let vs = gather(&v, kv_heads, tk, cu_k[s], kl);
                let shape = SdpaShape {
                    batch: 1,
                    q_heads,
                    kv_heads,
                    q_len: ql,
                    kv_len: kl,
                    head_dim,
                };
                let one = SdpaParams {
                    shape,
                    mask: causal.map_or(Mask::None, Mask::Causal),
                    scale: None,
                };
                let mut o = vec![0.0f32; qs.len()];
                kiln_attention::reference::sdpa(&qs, &ks, &vs, &mut o, &one);
                for h in 0..q_heads {
                    let dst = (h * tq + cu_q[s]) * head_dim;
                    want[dst..dst + ql * head_dim]
                        .copy_from_slice(&o[h * ql * head_dim..(h + 1) * ql * head_dim]);
                }
            }
            for kernel in Kernel::ALL {
                let mut got = vec![f32::NAN; q.len()];
                let ran = scaled_dot_product_attention_varlen(
                    &q,
                    &k,
                    &v,
                    &mut got,
                    &params,
                    KernelChoice::Force(kernel),
                )
                .unwrap();
                assert_eq!(ran, kernel);
                let err = max_rel_err(&got, &want);
                assert!(
                    err <= 1e-5,
                    "case {case} lens {q_lens:?}/{kv_lens:?} causal {causal:?} [{kernel}]: {err}"
                );
            }
        }
    }
}

#[test]
fn varlen_offsets_are_validated() {
    let q = vec![0.0f32; 2 * 5 * 4];
    let mut out = q.clone();
    let bad = |cu_q: &[usize], cu_k: &[usize]| {
        let params = VarlenParams {
            q_heads: 2,
            kv_heads: 2,
            head_dim: 4,
            cu_seqlens_q: cu_q,
            cu_seqlens_k: cu_k,
            causal: None,
            scale: None,
        };
        scaled_dot_product_attention_varlen(
            &q,
            &q,
            &q,
            &mut out.clone(),
            &params,
            KernelChoice::Auto,
        )
        .unwrap_err()
        .to_string()
    };
    assert!(bad(&[1, 5], &[1, 5]).contains("start at 0"));
    assert!(bad(&[0, 3, 2, 5], &[0, 3, 2, 5]).contains("non-decreasing"));
    assert!(bad(&[0, 5], &[0, 2, 5]).contains("sequences"));
    assert!(bad(&[0, 2, 4], &[0, 2, 4]).contains("q has 40 elements"));
    let ok = VarlenParams {
        q_heads: 2,
        kv_heads: 2,
        head_dim: 4,
        cu_seqlens_q: &[0, 2, 5],
        cu_seqlens_k: &[0, 2, 5],
        causal: None,
        scale: None,
    };
    scaled_dot_product_attention_varlen(&q, &q, &q, &mut out, &ok, KernelChoice::Auto).unwrap();
}

/// The selector is a pure function: it answers "is this supported" and names the constraint.
#[test]
fn selector_priorities_and_constraints() {
    let problem = |len: usize, head_dim: usize, mask: MaskKind| ProblemSummary {
        shape: SdpaShape {
            batch: 1,
            q_heads: 12,
            kv_heads: 12,
            q_len: len,
            kv_len: len,
            head_dim,
        },
        mask,
        varlen: false,
    };
    let auto = |p: &ProblemSummary| select(p, Isa::Portable, KernelChoice::Auto).unwrap();
    assert_eq!(
        auto(&problem(16, 64, MaskKind::KeyPadding)).kernel,
        Kernel::Math
    );
    assert_eq!(
        auto(&problem(2048, 64, MaskKind::None)).kernel,
        Kernel::Flash
    );
    assert_eq!(
        auto(&problem(2048, 64, MaskKind::CausalBottomRight)).kernel,
        Kernel::Flash
    );
    let biased = auto(&problem(2048, 64, MaskKind::Bias));
    assert_eq!(biased.kernel, Kernel::MemEfficient);
    assert!(biased.reason.contains("not flash"), "{}", biased.reason);
    assert_eq!(
        auto(&problem(2048, 512, MaskKind::None)).kernel,
        Kernel::MemEfficient
    );
    let forced = select(
        &problem(16, 64, MaskKind::Bool),
        Isa::Portable,
        KernelChoice::Force(Kernel::Flash),
    )
    .unwrap_err();
    assert!(forced.to_string().contains("flash cannot run"), "{forced}");
    assert!(forced.to_string().contains("boolean"), "{forced}");
    let forced = select(
        &problem(16, 320, MaskKind::None),
        Isa::Portable,
        KernelChoice::Force(Kernel::Flash),
    )
    .unwrap_err();
    assert!(
        forced.to_string().contains("head_dim up to 256"),
        "{forced}"
    );
    for kernel in [Kernel::Math, Kernel::MemEfficient] {
        for mask in [MaskKind::Bias, MaskKind::Bool, MaskKind::CausalTopLeft] {
            let p = problem(4096, 320, mask);
            assert!(unsupported(kernel, &p).is_none());
            assert_eq!(
                select(&p, Isa::Portable, KernelChoice::Force(kernel))
                    .unwrap()
                    .kernel,
                kernel
            );
        }
    }
    for (s, want) in [
        ("auto", KernelChoice::Auto),
        ("flash", KernelChoice::Force(Kernel::Flash)),
        ("mem_efficient", KernelChoice::Force(Kernel::MemEfficient)),
        ("math", KernelChoice::Force(Kernel::Math)),
    ] {
        assert_eq!(s.parse::<KernelChoice>().unwrap(), want);
        assert_eq!(want.to_string(), s);
    }
    assert!(
        "fast"
            .parse::<KernelChoice>()
            .unwrap_err()
            .contains("expected auto")
    );
}

/// The reference itself against the float64 fixtures (so it is a reference worth the name).
#[test]
fn reference_matches_torch_float64_too() {
    let dir = fixtures().join("sdpa");
    let name = "gqa_causal_d64";
    let Case {
        shape,
        q,
        k,
        v,
        want,
    } = load_case(&dir, name);
    let params = SdpaParams {
        shape,
        mask: Mask::Causal(CausalAlign::TopLeft),
        scale: None,
    };
    let mut out = vec![0.0f32; shape.q_elems()];
    kiln_attention::reference::sdpa(&q, &k, &v, &mut out, &params);
    let err = max_rel_err(&out, &want);
    assert!(err <= 1e-5, "reference vs torch: {err}");
}

/// Under `auto`, each packed sequence runs the kernel for its own length, so its output is
/// bit-for-bit what it is alone (here a 40-token sequence runs math and a 1100-token one flash).
#[test]
fn auto_varlen_is_bit_identical_to_each_sequence_alone() {
    let (heads, d) = (2usize, 32usize);
    let lens = [40usize, 1100, 7];
    let mut rng = Rng(7);
    let total: usize = lens.iter().sum();
    let q = rng.values(heads * total * d);
    let run = |q: &[f32], lens: &[usize]| {
        let mut cu = vec![0usize];
        for l in lens {
            cu.push(cu.last().unwrap() + l);
        }
        let params = VarlenParams {
            q_heads: heads,
            kv_heads: heads,
            head_dim: d,
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
            causal: None,
            scale: None,
        };
        let mut out = vec![0.0f32; q.len()];
        let k = scaled_dot_product_attention_varlen(q, q, q, &mut out, &params, KernelChoice::Auto)
            .unwrap();
        (out, k)
    };
    let (packed, kernel) = run(&q, &lens);
    assert_eq!(
        kernel,
        Kernel::Flash,
        "the longest sequence decides the reported kernel"
    );
    let mut start = 0;
    for &l in &lens {
        let one: Vec<f32> = (0..heads)
            .flat_map(|h| q[(h * total + start) * d..(h * total + start + l) * d].to_vec())
            .collect();
        let (alone, _) = run(&one, &[l]);
        for h in 0..heads {
            assert_eq!(
                &packed[(h * total + start) * d..(h * total + start + l) * d],
                &alone[h * l * d..(h + 1) * l * d],
                "sequence of {l} tokens, head {h}"
            );
        }
        start += l;
    }
}
