//! The ops decoders add (RMSNorm, element-wise mul, RoPE, last-token pooling, attention over a
//! paged KV cache), each on every backend against a plain reference written here.

use kiln_engine::ir::{ConstRole, DType, Dim, GraphBuilder, Op, PoolMode, ValueId};
use kiln_engine::{
    DeviceKind, ExecOptions, HostTensor, KvCacheSpec, PagedBatch, SdpaKernel, SdpaKernelChoice,
    prepare,
};

mod common;
use common::{f32_tensor as t, values};

fn close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(err <= tol, "{name}: max error {err}");
}

/// Runs a one-output graph on every device and compares with `want`.
fn check(
    name: &str,
    build: impl Fn(&mut GraphBuilder) -> ValueId,
    feeds: &[(String, HostTensor)],
    want: &[f32],
) {
    for device in common::devices() {
        let mut g = GraphBuilder::new();
        let out = build(&mut g);
        let plan = prepare(
            g.finish(vec![("out".into(), out)]).unwrap(),
            device,
            ExecOptions::default(),
        )
        .unwrap();
        let got = plan.run(feeds).unwrap().remove(0).1;
        close(
            &format!("{name} on {device}"),
            got.as_f32().unwrap(),
            want,
            1e-5,
        );
    }
}

#[test]
fn rms_norm_mul_and_rope_match_their_references() {
    let (b, s, h) = (2, 3, 8);
    let x = t(&[b, s, h], 1);
    let gamma = t(&[h], 2);
    let xs = x.as_f32().unwrap();
    let gs = gamma.as_f32().unwrap();
    let mut want = Vec::new();
    for row in xs.chunks(h) {
        let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        want.extend(row.iter().zip(gs).map(|(v, g)| g * (v * inv)));
    }
    let feeds = vec![("x".to_string(), x.clone())];
    let input = |g: &mut GraphBuilder| {
        g.input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(h)])
            .unwrap()
    };
    check(
        "rms_norm",
        |g| {
            let x = input(g);
            let w = g.constant("g", gamma.clone(), ConstRole::Other).unwrap();
            g.push(Op::RmsNorm { eps: 1e-5 }, &[x, w], "rms").unwrap()
        },
        &feeds,
        &want,
    );
    let sq: Vec<f32> = xs.iter().map(|v| v * v).collect();
    check(
        "mul",
        |g| {
            let x = input(g);
            g.push(Op::Mul, &[x, x], "mul").unwrap()
        },
        &feeds,
        &sq,
    );

    // RoPE on [b, heads, s, d] with a partial rotary width r = 3 of d = 8.
    let (heads, d, r) = (2, 8, 3);
    let q = t(&[b, heads, s, d], 3);
    let angles: Vec<f32> = values(b * s * r, 4).iter().map(|a| a * 3.0).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let qs = q.as_f32().unwrap();
    let mut want = qs.to_vec();
    for bi in 0..b {
        for hi in 0..heads {
            for si in 0..s {
                let row = &mut want[((bi * heads + hi) * s + si) * d..][..d];
                let tab = (bi * s + si) * r;
                for j in 0..r {
                    let (a, c) = (row[j], row[j + r]);
                    row[j] = a * cos[tab + j] - c * sin[tab + j];
                    row[j + r] = c * cos[tab + j] + a * sin[tab + j];
                }
            }
        }
    }
    let feeds = vec![
        ("q".to_string(), q.clone()),
        (
            "cos".to_string(),
            HostTensor::f32(vec![b, s, r], cos).unwrap(),
        ),
        (
            "sin".to_string(),
            HostTensor::f32(vec![b, s, r], sin).unwrap(),
        ),
    ];
    check(
        "rope",
        |g| {
            let q = g
                .input(
                    "q",
                    DType::F32,
                    &[Dim::Batch, Dim::Fixed(heads), Dim::Seq, Dim::Fixed(d)],
                )
                .unwrap();
            let tab = [Dim::Batch, Dim::Seq, Dim::Fixed(r)];
            let c = g.input("cos", DType::F32, &tab).unwrap();
            let s = g.input("sin", DType::F32, &tab).unwrap();
            g.push(Op::Rope, &[q, c, s], "rope").unwrap()
        },
        &feeds,
        &want,
    );
}

#[test]
fn last_token_pooling_packed_and_padded() {
    let h = 4;
    // Packed: lengths 2, 3, 1 over 6 tokens → rows 1, 4, 5.
    let x = t(&[1, 6, h], 5);
    let xs = x.as_f32().unwrap();
    let want: Vec<f32> = [1, 4, 5]
        .iter()
        .flat_map(|&r| xs[r * h..(r + 1) * h].to_vec())
        .collect();
    let feeds = vec![
        ("x".to_string(), x.clone()),
        (
            "lengths".to_string(),
            HostTensor::i64(vec![3], vec![2, 3, 1]).unwrap(),
        ),
    ];
    check(
        "pool last (packed)",
        |g| {
            let x = g
                .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(h)])
                .unwrap();
            let l = g.input("lengths", DType::I64, &[Dim::Sequences]).unwrap();
            g.push(
                Op::Pool {
                    mode: PoolMode::Last,
                },
                &[x, l],
                "last",
            )
            .unwrap()
        },
        &feeds,
        &want,
    );
    // Padded: [2, 3] with masks 110 and 111 → rows (0, 1) and (1, 2).
    let x = t(&[2, 3, h], 6);
    let xs = x.as_f32().unwrap();
    let want: Vec<f32> = [1, 5]
        .iter()
        .flat_map(|&r| xs[r * h..(r + 1) * h].to_vec())
        .collect();
    let feeds = vec![
        ("x".to_string(), x.clone()),
        (
            "mask".to_string(),
            HostTensor::i64(vec![2, 3], vec![1, 1, 0, 1, 1, 1]).unwrap(),
        ),
    ];
    check(
        "pool last (padded)",
        |g| {
            let x = g
                .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(h)])
                .unwrap();
            let m = g
                .input("mask", DType::I64, &[Dim::Batch, Dim::Seq])
                .unwrap();
            g.push(
                Op::Pool {
                    mode: PoolMode::Last,
                },
                &[x, m],
                "last",
            )
            .unwrap()
        },
        &feeds,
        &want,
    );
}

/// Reference attention of `q` rows (new tokens at the end of the context) over all keys of one
/// sequence, bottom-right causal, GQA.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    keys: &[Vec<f32>],
    vals: &[Vec<f32>],
    q_rows: &[usize],
    hq: usize,
    hkv: usize,
    d: usize,
) -> Vec<Vec<f32>> {
    // q: per (head, row) d values; keys/vals: per position, [hkv * d]. Returns per head per
    // row the output.
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = Vec::new();
    for h in 0..hq {
        let kh = h / (hq / hkv);
        for (r, &pos) in q_rows.iter().enumerate() {
            let qv = &q[(h * q_rows.len() + r) * d..][..d];
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    let k = &keys[j][kh * d..(kh + 1) * d];
                    f64::from(qv.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            let mut o = vec![0.0f64; d];
            for (j, wj) in w.iter().enumerate() {
                for c in 0..d {
                    o[c] += wj / sum * f64::from(vals[j][kh * d + c]);
                }
            }
            out.push(o.into_iter().map(|x| x as f32).collect());
        }
    }
    out
}

#[test]
fn paged_attention_matches_the_reference_over_mixed_steps() {
    let (hq, hkv, d, bs) = (4, 2, 8, 2);
    let spec = KvCacheSpec {
        layers: 1,
        kv_heads: hkv,
        head_dim: d,
        block_size: bs,
        num_blocks: 10,
    };
    // Two sequences in scattered blocks.
    let tables = [vec![5u32, 2, 7, 9], vec![0u32, 3, 8]];
    // Steps: both prefill (5 and 3 tokens), both decode one, then a chunk of 2 and one token.
    let steps: [[usize; 2]; 4] = [[5, 3], [1, 1], [2, 1], [0, 1]];
    let mut configs: Vec<(String, DeviceKind, SdpaKernelChoice)> = vec![
        ("cpu/auto".into(), DeviceKind::Cpu, SdpaKernelChoice::Auto),
        (
            "burn-flex".into(),
            DeviceKind::BurnFlex,
            SdpaKernelChoice::Auto,
        ),
    ];
    for k in SdpaKernel::ALL {
        configs.push((
            format!("cpu/{k}"),
            DeviceKind::Cpu,
            SdpaKernelChoice::Force(k),
        ));
    }
    for (label, device, kernel) in configs {
        let mut g = GraphBuilder::new();
        let dims = |h| [Dim::Batch, Dim::Fixed(h), Dim::Seq, Dim::Fixed(d)];
        let q = g.input("q", DType::F32, &dims(hq)).unwrap();
        let k = g.input("k", DType::F32, &dims(hkv)).unwrap();
        let v = g.input("v", DType::F32, &dims(hkv)).unwrap();
        let out = g
            .push(
                Op::PagedSdpa {
                    layer: 0,
                    scale: None,
                },
                &[q, k, v],
                "attn",
            )
            .unwrap();
        let plan = prepare(
            g.finish(vec![("out".into(), out)]).unwrap(),
            device,
            ExecOptions {
                sdpa_kernel: kernel,
                ..Default::default()
            },
        )
        .unwrap();
        let mut cache = plan.new_kv_cache(spec).unwrap();
        let mut keys: [Vec<Vec<f32>>; 2] = [Vec::new(), Vec::new()];
        let mut vals: [Vec<Vec<f32>>; 2] = [Vec::new(), Vec::new()];
        for (n, step) in steps.iter().enumerate() {
            let seqs: Vec<usize> = (0..2).filter(|&s| step[s] > 0).collect();
            let tokens: usize = step.iter().sum();
            let seed = 100 * n as u64;
            let (qt, kt, vt) = (
                t(&[1, hq, tokens, d], seed + 1),
                t(&[1, hkv, tokens, d], seed + 2),
                t(&[1, hkv, tokens, d], seed + 3),
            );
            // Host copies: each token's keys [hkv * d], in sequence order.
            let mut off = 0;
            let mut rows = Vec::new();
            for &s in &seqs {
                for i in 0..step[s] {
                    let tok = off + i;
                    let take = |t: &HostTensor| -> Vec<f32> {
                        (0..hkv)
                            .flat_map(|h| {
                                t.as_f32().unwrap()[(h * tokens + tok) * d..][..d].to_vec()
                            })
                            .collect()
                    };
                    keys[s].push(take(&kt));
                    vals[s].push(take(&vt));
                }
                rows.push((s, off, step[s]));
                off += step[s];
            }
            let batch = PagedBatch {
                q_lens: seqs.iter().map(|&s| step[s]).collect(),
                context_lens: seqs.iter().map(|&s| keys[s].len()).collect(),
                block_tables: seqs.iter().map(|&s| tables[s].clone()).collect(),
            };
            let feeds = vec![
                ("q".to_string(), qt.clone()),
                ("k".to_string(), kt),
                ("v".to_string(), vt),
            ];
            let got = plan
                .run_paged(&feeds, &mut cache, &batch)
                .unwrap()
                .remove(0)
                .1;
            let got = got.as_f32().unwrap();
            for (s, off, n_new) in rows {
                let ctx = keys[s].len();
                let positions: Vec<usize> = (ctx - n_new..ctx).collect();
                // This sequence's q rows, [hq, n_new, d].
                let qs: Vec<f32> = (0..hq)
                    .flat_map(|h| {
                        qt.as_f32().unwrap()[(h * tokens + off) * d..][..n_new * d].to_vec()
                    })
                    .collect();
                let want = reference(&qs, &keys[s], &vals[s], &positions, hq, hkv, d);
                for h in 0..hq {
                    for r in 0..n_new {
                        let g = &got[(h * tokens + off + r) * d..][..d];
                        close(
                            &format!("{label}: step {n} sequence {s} head {h} row {r}"),
                            g,
                            &want[h * n_new + r],
                            2e-5,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn paged_batches_are_validated_before_any_write() {
    let mut g = GraphBuilder::new();
    let dims = [Dim::Batch, Dim::Fixed(2), Dim::Seq, Dim::Fixed(4)];
    let q = g.input("q", DType::F32, &dims).unwrap();
    let out = g
        .push(
            Op::PagedSdpa {
                layer: 0,
                scale: None,
            },
            &[q, q, q],
            "attn",
        )
        .unwrap();
    let plan = prepare(
        g.finish(vec![("out".into(), out)]).unwrap(),
        DeviceKind::Cpu,
        ExecOptions::default(),
    )
    .unwrap();
    let spec = KvCacheSpec {
        layers: 1,
        kv_heads: 2,
        head_dim: 4,
        block_size: 4,
        num_blocks: 2,
    };
    let mut cache = plan.new_kv_cache(spec).unwrap();
    let feeds = vec![("q".to_string(), t(&[1, 2, 3, 4], 1))];
    let bad = |batch: PagedBatch| {
        let mut cache2 = plan.new_kv_cache(spec).unwrap();
        plan.run_paged(&feeds, &mut cache2, &batch)
            .unwrap_err()
            .to_string()
    };
    let ok = PagedBatch {
        q_lens: vec![3],
        context_lens: vec![3],
        block_tables: vec![vec![1]],
    };
    plan.run_paged(&feeds, &mut cache, &ok).unwrap();
    assert!(
        bad(PagedBatch {
            q_lens: vec![2],
            ..ok.clone()
        })
        .contains("sum to 2")
    );
    assert!(
        bad(PagedBatch {
            block_tables: vec![vec![2]],
            ..ok.clone()
        })
        .contains("outside")
    );
    assert!(
        bad(PagedBatch {
            context_lens: vec![5],
            ..ok.clone()
        })
        .contains("cannot hold")
    );
    assert!(
        bad(PagedBatch {
            context_lens: vec![2],
            ..ok.clone()
        })
        .contains("context")
    );
    // Without a cache the graph refuses to run.
    assert!(
        plan.run(&feeds)
            .unwrap_err()
            .to_string()
            .contains("run_paged")
    );
}
