//! One harness, every op, every backend: each op runs as a one-node graph on kiln's CPU backend
//! and on burn-flex, and the two must agree. Plus the IR's shape checks and the executor's input
//! validation, which must turn bad shapes and ids into errors before any backend call.

use kiln_engine::ir::{
    Activation, AttnMask, ConstRole, DType, Dim, Graph, GraphBuilder, Op, PoolMode, ValueId,
};
use kiln_engine::{DeviceKind, ExecOptions, HostTensor, SdpaKernel, SdpaKernelChoice, prepare};

mod common;
use common::{f32_tensor, values};

const B: usize = 2;
const S: usize = 5;
const H: usize = 12;

fn bs() -> [Dim; 2] {
    [Dim::Batch, Dim::Seq]
}

/// A padding mask for a batch of two with lengths 5 and 3.
fn mask() -> HostTensor {
    HostTensor::i64(vec![B, S], vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0]).unwrap()
}

/// Builds a graph with `build`, runs it with `feeds` on every device, and checks agreement.
fn agree(name: &str, build: impl Fn(&mut GraphBuilder) -> ValueId, feeds: &[(String, HostTensor)]) {
    let results: Vec<(DeviceKind, HostTensor)> = common::devices()
        .iter()
        .map(|&device| {
            let mut g = GraphBuilder::new();
            let out = build(&mut g);
            let graph = g.finish(vec![("out".into(), out)]).unwrap();
            let plan = prepare(graph, device, ExecOptions::default()).unwrap();
            let mut outputs = plan
                .run(feeds)
                .unwrap_or_else(|e| panic!("{name} on {device}: {e}"));
            (device, outputs.remove(0).1)
        })
        .collect();
    let (d0, reference) = &results[0];
    for (d, t) in &results[1..] {
        assert_eq!(t.shape, reference.shape, "{name}: {d} vs {d0} shape");
        let (a, b) = (t.as_f32().unwrap(), reference.as_f32().unwrap());
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-5, "{name}: {d} vs {d0} differ by {err}");
    }
}

fn x_input(g: &mut GraphBuilder) -> ValueId {
    g.input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(H)])
        .unwrap()
}

fn feeds_x() -> Vec<(String, HostTensor)> {
    vec![
        ("x".into(), f32_tensor(&[B, S, H], 1)),
        ("mask".into(), mask()),
    ]
}

#[test]
fn every_op_agrees_across_backends() {
    let feeds = feeds_x();
    agree(
        "linear",
        |g| {
            let x = x_input(g);
            let w = g
                .constant("w", f32_tensor(&[7, H], 2), ConstRole::LinearWeight)
                .unwrap();
            let b = g
                .constant("b", f32_tensor(&[7], 3), ConstRole::Other)
                .unwrap();
            g.push(Op::Linear, &[x, w, b], "linear").unwrap()
        },
        &feeds,
    );
    agree(
        "linear without bias",
        |g| {
            let x = x_input(g);
            let w = g
                .constant("w", f32_tensor(&[7, H], 2), ConstRole::LinearWeight)
                .unwrap();
            g.push(Op::Linear, &[x, w], "linear").unwrap()
        },
        &feeds,
    );
    agree(
        "add",
        |g| {
            let x = x_input(g);
            g.push(Op::Add, &[x, x], "add").unwrap()
        },
        &feeds,
    );
    agree(
        "layer_norm",
        |g| {
            let x = x_input(g);
            let gamma = g
                .constant("g", f32_tensor(&[H], 5), ConstRole::Other)
                .unwrap();
            let beta = g
                .constant("b", f32_tensor(&[H], 6), ConstRole::Other)
                .unwrap();
            g.push(Op::LayerNorm { eps: 1e-12 }, &[x, gamma, beta], "ln")
                .unwrap()
        },
        &feeds,
    );
    for act in [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
        Activation::Tanh,
        Activation::Silu,
    ] {
        agree(
            &format!("{act:?}"),
            |g| {
                let x = x_input(g);
                g.push(Op::Activation(act), &[x], "act").unwrap()
            },
            &feeds,
        );
    }
    agree(
        "split/merge heads",
        |g| {
            let x = x_input(g);
            let s = g.push(Op::SplitHeads { heads: 3 }, &[x], "split").unwrap();
            let s = g
                .push(Op::Activation(Activation::Tanh), &[s], "act")
                .unwrap();
            g.push(Op::MergeHeads, &[s], "merge").unwrap()
        },
        &feeds,
    );
    for mask_kind in [AttnMask::None, AttnMask::KeyPadding, AttnMask::Causal] {
        for kv_heads in [3, 1] {
            agree(
                &format!("sdpa {mask_kind:?} kv_heads {kv_heads}"),
                |g| {
                    let x = x_input(g);
                    let q = g.push(Op::SplitHeads { heads: 3 }, &[x], "q").unwrap();
                    let kw = g
                        .constant(
                            "kw",
                            f32_tensor(&[4 * kv_heads, H], 7),
                            ConstRole::LinearWeight,
                        )
                        .unwrap();
                    let kx = g.push(Op::Linear, &[x, kw], "kx").unwrap();
                    let k = g
                        .push(Op::SplitHeads { heads: kv_heads }, &[kx], "k")
                        .unwrap();
                    let m = g.input("mask", DType::I64, &bs()).unwrap();
                    let mut inputs = vec![q, k, k];
                    if mask_kind == AttnMask::KeyPadding {
                        inputs.push(m);
                    }
                    g.push(
                        Op::Sdpa {
                            mask: mask_kind,
                            scale: Some(0.3),
                        },
                        &inputs,
                        "sdpa",
                    )
                    .unwrap()
                },
                &feeds,
            );
        }
    }
    for mode in [PoolMode::Mean, PoolMode::Cls, PoolMode::Max] {
        agree(
            &format!("pool {mode:?}"),
            |g| {
                let x = x_input(g);
                let m = g.input("mask", DType::I64, &bs()).unwrap();
                g.push(Op::Pool { mode }, &[x, m], "pool").unwrap()
            },
            &feeds,
        );
    }
    agree(
        "l2_normalize",
        |g| {
            let x = x_input(g);
            g.push(Op::L2Normalize, &[x], "norm").unwrap()
        },
        &feeds,
    );
    agree(
        "softmax",
        |g| {
            let x = x_input(g);
            g.push(Op::Softmax, &[x], "softmax").unwrap()
        },
        &feeds,
    );
    let ids = HostTensor::i64(vec![B, S], vec![0, 3, 9, 2, 2, 1, 0, 4, 8, 7]).unwrap();
    agree(
        "embedding",
        |g| {
            let table = g
                .constant("table", f32_tensor(&[10, H], 8), ConstRole::Other)
                .unwrap();
            let ids = g.input("ids", DType::I64, &bs()).unwrap();
            g.push(Op::Embedding, &[table, ids], "emb").unwrap()
        },
        &[("ids".into(), ids)],
    );
}

/// The ops the compiler makes (and the generic ones spelled-out graphs use), on every backend.
#[test]
fn compiler_ops_agree_across_backends() {
    let feeds = feeds_x();
    let linear = |g: &mut GraphBuilder, out: usize| {
        let x = x_input(g);
        let w = g
            .constant("w", f32_tensor(&[out, H], 2), ConstRole::LinearWeight)
            .unwrap();
        let b = g
            .constant("b", f32_tensor(&[out], 3), ConstRole::Other)
            .unwrap();
        (x, w, b)
    };
    for act in [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Tanh,
    ] {
        agree(
            &format!("linear_act {act:?}"),
            |g| {
                let (x, w, b) = linear(g, 7);
                g.push(Op::LinearAct { act }, &[x, w, b], "la").unwrap()
            },
            &feeds,
        );
    }
    agree(
        "add_layer_norm",
        |g| {
            let x = x_input(g);
            let y = g.push(Op::Activation(Activation::Tanh), &[x], "t").unwrap();
            let gamma = g
                .constant("g", f32_tensor(&[H], 5), ConstRole::Other)
                .unwrap();
            let beta = g
                .constant("be", f32_tensor(&[H], 6), ConstRole::Other)
                .unwrap();
            g.push(Op::AddLayerNorm { eps: 1e-12 }, &[x, y, gamma, beta], "aln")
                .unwrap()
        },
        &feeds,
    );
    agree(
        "slice_last and slice_split_heads",
        |g| {
            let (x, w, b) = linear(g, 3 * H);
            let qkv = g.push(Op::Linear, &[x, w, b], "qkv").unwrap();
            let k = g
                .push(
                    Op::SliceSplitHeads {
                        heads: 3,
                        start: H,
                        width: H,
                    },
                    &[qkv],
                    "k",
                )
                .unwrap();
            let k = g.push(Op::MergeHeads, &[k], "merge").unwrap();
            let v = g
                .push(
                    Op::SliceLast {
                        start: 2 * H,
                        len: H,
                    },
                    &[qkv],
                    "v",
                )
                .unwrap();
            g.push(Op::Add, &[k, v], "sum").unwrap()
        },
        &feeds,
    );
    for (causal, factor) in [(true, 0.5), (false, -2.0)] {
        agree(
            &format!("matmul, scale {factor}, causal_mask {causal}, softmax, matmul"),
            |g| {
                let x = x_input(g);
                let q = g.push(Op::SplitHeads { heads: 3 }, &[x], "q").unwrap();
                let s = g
                    .push(Op::MatMul { transpose_b: true }, &[q, q], "qk")
                    .unwrap();
                let mut s = g.push(Op::Scale { factor }, &[s], "scale").unwrap();
                if causal {
                    s = g.push(Op::CausalMask, &[s], "mask").unwrap();
                }
                let p = g.push(Op::Softmax, &[s], "p").unwrap();
                g.push(Op::MatMul { transpose_b: false }, &[p, q], "pv")
                    .unwrap()
            },
            &feeds,
        );
    }
}

#[test]
fn compiled_graphs_agree_across_backends_with_every_pass_on_or_off() {
    use kiln_engine::compile::CompileOptions;
    use kiln_engine::device::compile;
    let build = || {
        let mut g = GraphBuilder::new();
        let x = x_input(&mut g);
        let mut proj = Vec::new();
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let w = g
                .constant(
                    name,
                    f32_tensor(&[H, H], 20 + i as u64),
                    ConstRole::LinearWeight,
                )
                .unwrap();
            let b = g
                .constant(
                    &format!("{name}.b"),
                    f32_tensor(&[H], 30 + i as u64),
                    ConstRole::Other,
                )
                .unwrap();
            let p = g.push(Op::Linear, &[x, w, b], *name).unwrap();
            proj.push(g.push(Op::SplitHeads { heads: 3 }, &[p], "split").unwrap());
        }
        let m = g.input("mask", DType::I64, &bs()).unwrap();
        proj.push(m);
        let a = g
            .push(
                Op::Sdpa {
                    mask: AttnMask::KeyPadding,
                    scale: None,
                },
                &proj,
                "sdpa",
            )
            .unwrap();
        let a = g.push(Op::MergeHeads, &[a], "merge").unwrap();
        let w = g
            .constant("up", f32_tensor(&[2 * H, H], 40), ConstRole::LinearWeight)
            .unwrap();
        let u = g.push(Op::Linear, &[a, w], "up").unwrap();
        let u = g
            .push(Op::Activation(Activation::Gelu), &[u], "gelu")
            .unwrap();
        let w = g
            .constant("down", f32_tensor(&[H, 2 * H], 41), ConstRole::LinearWeight)
            .unwrap();
        let d = g.push(Op::Linear, &[u, w], "down").unwrap();
        let r = g.push(Op::Add, &[d, x], "res").unwrap();
        let gamma = g
            .constant("g", f32_tensor(&[H], 42), ConstRole::Other)
            .unwrap();
        let beta = g
            .constant("be", f32_tensor(&[H], 43), ConstRole::Other)
            .unwrap();
        let out = g
            .push(Op::LayerNorm { eps: 1e-12 }, &[r, gamma, beta], "ln")
            .unwrap();
        g.finish(vec![("out".into(), out)]).unwrap()
    };
    let feeds = feeds_x();
    let mut results = Vec::new();
    for device in common::devices() {
        for options in [
            CompileOptions::default(),
            CompileOptions::none(),
            CompileOptions::no_fuse(),
        ] {
            let c = compile(build(), device, &options, ExecOptions::default()).unwrap();
            let plan = prepare(c.graph, device, ExecOptions::default()).unwrap();
            let out = plan.run(&feeds).unwrap().remove(0).1.into_f32().unwrap();
            results.push((format!("{device} {}", options.describe()), out));
        }
    }
    let (l0, r0) = &results[0];
    for (l, r) in &results[1..] {
        let err = r
            .iter()
            .zip(r0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-5, "{l} vs {l0}: {err}");
    }
}

#[test]
fn forcing_the_math_kernel_gives_the_same_answer() {
    let build = |g: &mut GraphBuilder| {
        let x = x_input(g);
        let q = g.push(Op::SplitHeads { heads: 4 }, &[x], "q").unwrap();
        let m = g.input("mask", DType::I64, &bs()).unwrap();
        g.push(
            Op::Sdpa {
                mask: AttnMask::KeyPadding,
                scale: None,
            },
            &[q, q, q, m],
            "sdpa",
        )
        .unwrap()
    };
    for device in common::devices() {
        let run = |kernel| {
            let mut g = GraphBuilder::new();
            let out = build(&mut g);
            let graph = g.finish(vec![("out".into(), out)]).unwrap();
            let plan = prepare(
                graph,
                device,
                ExecOptions {
                    sdpa_kernel: kernel,
                    ..Default::default()
                },
            )
            .unwrap();
            plan.run(&feeds_x())
                .unwrap()
                .remove(0)
                .1
                .into_f32()
                .unwrap()
        };
        let (auto, math) = (
            run(SdpaKernelChoice::Auto),
            run(SdpaKernelChoice::Force(SdpaKernel::Math)),
        );
        let err = auto
            .iter()
            .zip(&math)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-5, "{device}: auto vs math differ by {err}");
    }
}

#[test]
fn the_builder_rejects_ill_typed_graphs_with_a_reason() {
    let mut g = GraphBuilder::new();
    let x = x_input(&mut g);
    let w = g
        .constant("w", f32_tensor(&[7, 5], 1), ConstRole::LinearWeight)
        .unwrap();
    let err = g
        .push(Op::Linear, &[x, w], "bad_linear")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad_linear") && err.contains("input size 5"),
        "{err}"
    );

    let err = g
        .push(Op::SplitHeads { heads: 5 }, &[x], "bad_split")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not divisible by 5 heads"), "{err}");

    let m = g.input("m", DType::F32, &bs()).unwrap();
    let err = g
        .push(
            Op::Pool {
                mode: PoolMode::Mean,
            },
            &[x, m],
            "bad_pool",
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("mask must be I64"), "{err}");

    let err = g.push(Op::Add, &[x], "bad_add").unwrap_err().to_string();
    assert!(err.contains("expects 2 inputs"), "{err}");

    // A graph edited into an inconsistent state (as a buggy pass might) fails `check`.
    let mut g = GraphBuilder::new();
    let x = x_input(&mut g);
    let y = g
        .push(Op::Activation(Activation::Relu), &[x], "relu")
        .unwrap();
    let mut graph: Graph = g.finish(vec![("y".into(), y)]).unwrap();
    graph.nodes[1].ty.dims[2] = Dim::Fixed(99);
    let err = graph.check().unwrap_err().to_string();
    assert!(err.contains("recorded type"), "{err}");
}

#[test]
fn bad_inputs_are_errors_before_any_kernel_runs() {
    for device in common::devices() {
        let mut g = GraphBuilder::new();
        let table = g
            .constant("table", f32_tensor(&[10, H], 8), ConstRole::Other)
            .unwrap();
        let ids = g.input("ids", DType::I64, &bs()).unwrap();
        let m = g.input("mask", DType::I64, &bs()).unwrap();
        let e = g.push(Op::Embedding, &[table, ids], "emb").unwrap();
        let p = g
            .push(
                Op::Pool {
                    mode: PoolMode::Mean,
                },
                &[e, m],
                "pool",
            )
            .unwrap();
        let plan = prepare(
            g.finish(vec![("p".into(), p)]).unwrap(),
            device,
            ExecOptions::default(),
        )
        .unwrap();
        let ids_t = |v: Vec<i64>, shape: Vec<usize>| HostTensor::i64(shape, v).unwrap();
        let run = |ids: HostTensor, mask: HostTensor| {
            plan.run(&[("ids".into(), ids), ("mask".into(), mask)])
        };

        let err = run(
            ids_t(vec![1, 2, 10], vec![1, 3]),
            ids_t(vec![1; 3], vec![1, 3]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("id 10 is outside the vocabulary of 10"),
            "{device}: {err}"
        );
        let err = run(
            ids_t(vec![1, -1, 2], vec![1, 3]),
            ids_t(vec![1; 3], vec![1, 3]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("id -1"), "{device}: {err}");
        let err = run(
            ids_t(vec![1, 2, 3], vec![1, 3]),
            ids_t(vec![1; 4], vec![1, 4]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("seq is 4 here but 3"), "{device}: {err}");
        let err = run(ids_t(vec![1, 2, 3], vec![3]), ids_t(vec![1; 3], vec![1, 3]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected shape"), "{device}: {err}");
        let err = plan
            .run(&[
                ("ids".into(), f32_tensor(&[1, 3], 1)),
                ("mask".into(), ids_t(vec![1; 3], vec![1, 3])),
            ])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected I64"), "{device}: {err}");
        let err = run(ids_t(vec![], vec![0, 3]), ids_t(vec![], vec![0, 3]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty batch"), "{device}: {err}");
        let err = plan
            .run(&[("ids".into(), ids_t(vec![1], vec![1, 1]))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mask") && err.contains("missing"),
            "{device}: {err}"
        );
        // And the plan still runs good input afterwards.
        assert!(
            run(
                ids_t(vec![1, 2, 3], vec![1, 3]),
                ids_t(vec![1, 1, 0], vec![1, 3])
            )
            .is_ok()
        );
    }
}

/// Attention + pooling over a packed (padding-free) batch equals the padded batch with a
/// key-padding mask, on every device and with every kiln kernel forced; bad lengths are errors.
#[test]
fn packed_batches_equal_padded_batches() {
    let lens = [5usize, 3];
    let build = |packed: bool| {
        let mut g = GraphBuilder::new();
        let x = x_input(&mut g);
        let m = if packed {
            g.input("lengths", DType::I64, &[Dim::Sequences]).unwrap()
        } else {
            g.input("mask", DType::I64, &bs()).unwrap()
        };
        let q = g.push(Op::SplitHeads { heads: 3 }, &[x], "q").unwrap();
        let kw = g
            .constant("kw", f32_tensor(&[H, H], 7), ConstRole::LinearWeight)
            .unwrap();
        let kx = g.push(Op::Linear, &[x, kw], "kx").unwrap();
        let k = g.push(Op::SplitHeads { heads: 3 }, &[kx], "k").unwrap();
        let mask = if packed {
            AttnMask::Varlen
        } else {
            AttnMask::KeyPadding
        };
        let a = g
            .push(Op::Sdpa { mask, scale: None }, &[q, k, k, m], "sdpa")
            .unwrap();
        let a = g.push(Op::MergeHeads, &[a], "merge").unwrap();
        let p = g
            .push(
                Op::Pool {
                    mode: PoolMode::Mean,
                },
                &[a, m],
                "pool",
            )
            .unwrap();
        let c = g
            .push(
                Op::Pool {
                    mode: PoolMode::Cls,
                },
                &[a, m],
                "cls",
            )
            .unwrap();
        g.finish(vec![
            ("attn".into(), a),
            ("mean".into(), p),
            ("cls".into(), c),
        ])
        .unwrap()
    };
    let x = f32_tensor(&[B, S, H], 1);
    let xs = x.as_f32().unwrap();
    let packed_x: Vec<f32> = (0..B)
        .flat_map(|b| xs[b * S * H..(b * S + lens[b]) * H].to_vec())
        .collect();
    let total: usize = lens.iter().sum();
    let padded_feeds = feeds_x();
    let packed_feeds = vec![
        (
            "x".to_string(),
            HostTensor::f32(vec![1, total, H], packed_x).unwrap(),
        ),
        (
            "lengths".to_string(),
            HostTensor::i64(vec![2], lens.iter().map(|&l| l as i64).collect()).unwrap(),
        ),
    ];
    let choices = [
        SdpaKernelChoice::Auto,
        SdpaKernelChoice::Force(SdpaKernel::Math),
        SdpaKernelChoice::Force(SdpaKernel::Flash),
        SdpaKernelChoice::Force(SdpaKernel::MemEfficient),
    ];
    for device in common::devices() {
        for sdpa_kernel in choices {
            if device.is_gpu() && sdpa_kernel == SdpaKernelChoice::Force(SdpaKernel::MemEfficient) {
                // GPUs have no memory-efficient kernel; the selector's tests cover the refusal.
                continue;
            }
            let opts = ExecOptions {
                sdpa_kernel,
                ..Default::default()
            };
            let padded = prepare(build(false), device, opts.clone()).unwrap();
            let packed = prepare(build(true), device, opts).unwrap();
            let want = padded.run(&padded_feeds).unwrap();
            let got = packed.run(&packed_feeds).unwrap();
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len(), "{what}");
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(err <= 1e-5, "{device} {sdpa_kernel:?} {what}: {err}");
            };
            let wa = want[0].1.as_f32().unwrap();
            let valid: Vec<f32> = (0..B)
                .flat_map(|b| wa[b * S * H..(b * S + lens[b]) * H].to_vec())
                .collect();
            close(got[0].1.as_f32().unwrap(), &valid, "attention rows");
            close(
                got[1].1.as_f32().unwrap(),
                want[1].1.as_f32().unwrap(),
                "mean pool",
            );
            close(
                got[2].1.as_f32().unwrap(),
                want[2].1.as_f32().unwrap(),
                "cls pool",
            );
        }
        let packed = prepare(build(true), device, ExecOptions::default()).unwrap();
        for (lengths, why) in [
            (vec![5i64, 2], "sum to 7"),
            (vec![8i64, 0], "must be positive"),
            (vec![9i64, -1], "must be positive"),
        ] {
            let mut feeds = packed_feeds.clone();
            feeds[1].1 = HostTensor::i64(vec![2], lengths).unwrap();
            let err = packed.run(&feeds).unwrap_err().to_string();
            assert!(err.contains(why), "{device}: {err}");
        }
    }
}

/// The plan names the kernel for each attention node with its reason, refuses a forced kernel
/// that cannot run the graph, and counts the kernels that actually ran.
#[test]
fn attention_plan_logs_refuses_and_counts() {
    let build = |head_dim: usize| {
        let mut g = GraphBuilder::new();
        let x = g
            .input(
                "x",
                DType::F32,
                &[Dim::Batch, Dim::Seq, Dim::Fixed(2 * head_dim)],
            )
            .unwrap();
        let q = g.push(Op::SplitHeads { heads: 2 }, &[x], "q").unwrap();
        let a = g
            .push(
                Op::Sdpa {
                    mask: AttnMask::None,
                    scale: None,
                },
                &[q, q, q],
                "layer.sdpa",
            )
            .unwrap();
        g.finish(vec![("out".into(), a)]).unwrap()
    };
    let flash = ExecOptions {
        sdpa_kernel: SdpaKernelChoice::Force(SdpaKernel::Flash),
        ..Default::default()
    };
    for device in common::devices() {
        let auto = prepare(build(64), device, ExecOptions::default()).unwrap();
        let plan = auto.attention_plan(2048).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].0, "layer.sdpa");
        if device == DeviceKind::Cpu {
            assert_eq!(plan[0].1, "flash", "{}", plan[0].2);
            assert_eq!(auto.attention_plan(16).unwrap()[0].1, "math");
        }
        let wide = prepare(build(320), device, flash.clone()).unwrap();
        let err = wide.attention_plan(16).unwrap_err().to_string();
        assert!(err.contains("head_dim up to 256"), "{device}: {err}");

        let forced = prepare(build(64), device, flash.clone()).unwrap();
        let x = HostTensor::f32(vec![1, 300, 128], values(300 * 128, 3)).unwrap();
        forced.run(&[("x".into(), x.clone())]).unwrap();
        forced.run(&[("x".into(), x)]).unwrap();
        // On a GPU the forced flash is burn's fused kernel, counted under its own name.
        let ran = if device.is_gpu() {
            "burn-flash"
        } else {
            "flash"
        };
        assert_eq!(forced.sdpa_kernel_counts(), vec![(ran, 2)], "{device}");
    }
}

#[test]
fn after_one_run_at_a_shape_the_cpu_arena_allocates_no_intermediate_buffer() {
    use kiln_engine::Plan;
    use kiln_engine::backend::CpuBackend;
    use kiln_engine::compile::{CompileOptions, compile};
    let h = 64;
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(h)])
        .unwrap();
    let mut v = x;
    for layer in 0..3 {
        let w = g
            .constant(
                &format!("up{layer}"),
                f32_tensor(&[4 * h, h], 50 + layer),
                ConstRole::LinearWeight,
            )
            .unwrap();
        let u = g.push(Op::Linear, &[v, w], "up").unwrap();
        let u = g
            .push(Op::Activation(Activation::Gelu), &[u], "gelu")
            .unwrap();
        let w = g
            .constant(
                &format!("down{layer}"),
                f32_tensor(&[h, 4 * h], 60 + layer),
                ConstRole::LinearWeight,
            )
            .unwrap();
        let d = g.push(Op::Linear, &[u, w], "down").unwrap();
        let s = g.push(Op::Add, &[d, v], "res").unwrap();
        let gamma = g
            .constant(&format!("g{layer}"), f32_tensor(&[h], 70), ConstRole::Other)
            .unwrap();
        let beta = g
            .constant(&format!("b{layer}"), f32_tensor(&[h], 71), ConstRole::Other)
            .unwrap();
        v = g
            .push(Op::LayerNorm { eps: 1e-12 }, &[s, gamma, beta], "ln")
            .unwrap();
    }
    let graph = g.finish(vec![("out".into(), v)]).unwrap();
    for options in [CompileOptions::default(), CompileOptions::none()] {
        let backend = CpuBackend::new(2);
        let c = compile(graph.clone(), &backend, &options, ExecOptions::default()).unwrap();
        let plan = Plan::new(c.graph, backend.clone(), ExecOptions::default()).unwrap();
        let feed = |b: usize, s: usize| vec![("x".to_string(), f32_tensor(&[b, s, h], 9))];
        // The outputs are held, as a caller holds them while it reads them: each run hands its
        // output buffer to the caller, so at most that one buffer per run is new (none while the
        // free list still has spares); every intermediate comes back from the arena.
        let mut held = vec![plan.run(&feed(4, 32)).unwrap()];
        let after_first = backend.arena().allocations();
        assert!(after_first > 0);
        for _ in 0..3 {
            held.push(plan.run(&feed(4, 32)).unwrap());
        }
        held.push(plan.run(&feed(2, 9)).unwrap());
        let steady = backend.arena().allocations() - after_first;
        assert!(
            steady <= 4,
            "{}: 4 steady-state runs allocated {steady} buffers (intermediates not reused)",
            options.describe()
        );
    }
}
