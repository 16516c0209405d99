//! The tiny random-weight decoders (`$KILN_FIXTURES/tiny/gpt2-tiny` and `llama-tiny`): logits at
//! every valid position within 1e-4 of PyTorch's float64 reference, and greedy generation
//! token-for-token equal to the reference for each prompt alone and for both prompts in one
//! continuous batch, on every device and forced attention kernel; the detokenized text equals
//! the reference's `generated_text`, including the incomplete UTF-8 a random byte-level model
//! produces.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_engine::{DeviceKind, ExecOptions, SdpaKernel, SdpaKernelChoice};
use kiln_models::decoder::config::DECODER_ARCHITECTURES;
use kiln_models::{
    CausalLm, Event, GenerationLimits, GenerationRequest, Generator, LoadOptions, SamplingParams,
};
use kiln_tests::{fixtures, flatten, max_abs_diff, read_json};

const TOL: f32 = 1e-4;
/// The shared fixtures' gpt2-tiny and llama-tiny, and every folder of the decoder zoo
/// (`$KILN_DECODER_ZOO`, default `tests/fixtures/decoders`) whose architecture kiln runs; the
/// others are checked by `every_decoder_zoo_folder_runs_or_is_refused_by_name`.
fn models() -> Vec<String> {
    let mut names = vec!["gpt2-tiny".to_string(), "llama-tiny".to_string()];
    for (name, class) in decoder_zoo() {
        if DECODER_ARCHITECTURES.contains(&class.as_str()) {
            names.push(name);
        }
    }
    names
}

/// The decoder zoo's folders: (name, the reference's class).
fn decoder_zoo() -> Vec<(String, String)> {
    let zoo = kiln_tests::decoder_zoo();
    let mut all: Vec<(String, String)> = std::fs::read_dir(&zoo)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().join("reference.json").is_file())
        .map(|e| {
            let r = read_json(&e.path().join("reference.json"));
            (
                e.file_name().to_string_lossy().into_owned(),
                r["class"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    all.sort();
    all
}

fn dir(name: &str) -> PathBuf {
    let shared = fixtures().join("tiny").join(name);
    if shared.is_dir() {
        shared
    } else {
        kiln_tests::decoder_zoo().join(name)
    }
}

#[test]
fn every_decoder_zoo_folder_runs_or_is_refused_by_name() {
    let zoo = decoder_zoo();
    assert!(!zoo.is_empty(), "no decoder fixtures");
    for (name, class) in zoo {
        if DECODER_ARCHITECTURES.contains(&class.as_str()) {
            continue;
        }
        let err = CausalLm::load(&dir(&name), &LoadOptions::default(), None)
            .map(drop)
            .expect_err(&format!(
                "{name}: {class} loaded, but kiln does not list it"
            ));
        let err = err.to_string();
        assert!(
            err.contains(&class) && err.contains("kiln runs"),
            "{name}: the error does not name {class} and list what kiln runs: {err}"
        );
    }
}

/// Each device, and the cpu device with each attention kernel forced.
fn configurations() -> Vec<(String, LoadOptions)> {
    let mut all = vec![
        (
            "cpu/auto".to_string(),
            LoadOptions {
                device: DeviceKind::Cpu.into(),
                ..LoadOptions::default()
            },
        ),
        (
            "burn-flex".to_string(),
            LoadOptions {
                device: DeviceKind::BurnFlex.into(),
                ..LoadOptions::default()
            },
        ),
    ];
    for k in SdpaKernel::ALL {
        all.push((
            format!("cpu/{k}"),
            LoadOptions {
                device: DeviceKind::Cpu.into(),
                exec: ExecOptions {
                    sdpa_kernel: SdpaKernelChoice::Force(k),
                    ..Default::default()
                },
                ..LoadOptions::default()
            },
        ));
    }
    for gpu in kiln_tests::wgpu_devices() {
        all.push((
            format!("{gpu}/auto"),
            LoadOptions {
                device: gpu.into(),
                ..LoadOptions::default()
            },
        ));
    }
    all
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load(path: &Path, opts: &LoadOptions) -> Arc<CausalLm> {
    Arc::new(CausalLm::load(path, opts, None).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[test]
fn logits_match_the_reference_on_every_valid_position() {
    for name in models() {
        let name = name.as_str();
        let r = read_json(&dir(name).join("reference.json"));
        let vocab = r["outputs"]["logits"]["shape"][2].as_u64().unwrap() as usize;
        let seq = r["outputs"]["logits"]["shape"][1].as_u64().unwrap() as usize;
        let want = flatten(&r["outputs"]["logits"]["data"]);
        let masks: Vec<Vec<u32>> = r["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let prompts: Vec<Vec<u32>> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&masks)
            .map(|(row, m)| {
                let n = m.iter().filter(|&&x| x == 1).count();
                ids(row)[..n].to_vec()
            })
            .collect();
        for (label, opts) in configurations() {
            let model = load(&dir(name), &opts);
            let got = model.full_logits(&prompts).unwrap();
            for (b, rows) in got.iter().enumerate() {
                for (p, row) in rows.iter().enumerate() {
                    let at = (b * seq + p) * vocab;
                    let err = max_abs_diff(row, &want[at..at + vocab]);
                    assert!(
                        err <= TOL,
                        "{name} {label}: text {b} position {p}: max error {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_transformers_4_config_spelling_loads_the_same_llama() {
    let src = dir("llama-tiny");
    let tmp = std::env::temp_dir().join(format!("kiln-llama-t4-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    std::fs::copy(
        src.join("config.transformers4-style.json"),
        tmp.join("config.json"),
    )
    .unwrap();
    let t5 = kiln_models::decoder::DecoderConfig::load(&src.join("config.json")).unwrap();
    let t4 = kiln_models::decoder::DecoderConfig::load(&tmp.join("config.json")).unwrap();
    assert_eq!(t4, t5);
    let a = load(&src, &LoadOptions::default())
        .full_logits(&[vec![5, 6, 7]])
        .unwrap();
    let b = load(&tmp, &LoadOptions::default())
        .full_logits(&[vec![5, 6, 7]])
        .unwrap();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&tmp).ok();
}

fn greedy(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    }
}

/// Runs the generator until idle; per request: (tokens, text, finish reason).
fn drain(g: &mut Generator, n: usize) -> Vec<(Vec<u32>, String, Option<&'static str>)> {
    let mut out = vec![(Vec::new(), String::new(), None); n];
    while !g.is_idle() {
        for e in g.step() {
            match e {
                Event::Token {
                    id,
                    token,
                    text,
                    finish,
                    ..
                } => {
                    let o = &mut out[id as usize];
                    o.0.push(token);
                    o.1.push_str(&text);
                    o.2 = finish.map(|f| f.as_str());
                }
                Event::Failed { message, .. } => panic!("generation failed: {message}"),
            }
        }
    }
    out
}

#[test]
fn greedy_generation_matches_alone_and_in_one_continuous_batch() {
    // Small blocks so that sequences span several, and a prefill budget smaller than the longer
    // prompt so it is prefilled in two chunks while the other decodes.
    let limits = GenerationLimits {
        block_size: 4,
        max_batch_total_tokens: 256,
        max_batch_prefill_tokens: 8,
        max_waiting_tokens: 2,
        ..GenerationLimits::default()
    };
    for name in models() {
        let name = name.as_str();
        let r = read_json(&dir(name).join("reference.json"));
        let results = r["greedy_generation"]["results"].as_array().unwrap();
        let cases: Vec<(Vec<u32>, Vec<u32>, String)> = results
            .iter()
            .map(|c| {
                (
                    ids(&c["prompt_ids"]),
                    ids(&c["generated_ids"]),
                    c["generated_text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for (label, opts) in configurations() {
            let model = load(&dir(name), &opts);
            // Each prompt alone.
            for (prompt, want, text) in &cases {
                let mut g = Generator::new(model.clone(), limits).unwrap();
                g.submit(greedy(prompt.clone(), want.len())).unwrap();
                let out = drain(&mut g, 1);
                assert_eq!(&out[0].0, want, "{name} {label}: tokens alone");
                assert_eq!(&out[0].1, text, "{name} {label}: text alone");
                assert_eq!(out[0].2, Some("length"));
                assert_eq!(g.blocks_used().0, 0, "every block back in the pool");
            }
            // Both in one batch; the second joins after the first has decoded a few tokens.
            let mut g = Generator::new(model.clone(), limits).unwrap();
            g.submit(greedy(cases[0].0.clone(), cases[0].1.len()))
                .unwrap();
            let mut early = Vec::new();
            for _ in 0..3 {
                early.extend(g.step());
            }
            g.submit(greedy(cases[1].0.clone(), cases[1].1.len()))
                .unwrap();
            let mut out = drain(&mut g, 2);
            let first: Vec<u32> = early
                .iter()
                .filter_map(|e| match e {
                    Event::Token { token, .. } => Some(*token),
                    Event::Failed { .. } => None,
                })
                .collect();
            out[0].0.splice(0..0, first);
            for (i, (prompt, want, _)) in cases.iter().enumerate() {
                assert_eq!(
                    &out[i].0, want,
                    "{name} {label}: prompt {prompt:?} in a batch"
                );
            }
            assert_eq!(g.blocks_used().0, 0);
        }
    }
}

#[test]
fn cancelling_frees_blocks_and_oversized_requests_are_refused() {
    let model = load(&dir("gpt2-tiny"), &LoadOptions::default());
    let limits = GenerationLimits {
        block_size: 4,
        max_batch_total_tokens: 64,
        ..GenerationLimits::default()
    };
    let mut g = Generator::new(model.clone(), limits).unwrap();
    let a = g.submit(greedy(vec![1, 2, 3], 20)).unwrap();
    let b = g.submit(greedy(vec![4, 5], 20)).unwrap();
    g.step();
    assert_eq!(g.running(), 2);
    assert_eq!(g.blocks_used().0, 6 + 6);
    assert!(g.cancel(a));
    assert_eq!(g.blocks_used().0, 6);
    assert!(g.cancel(b));
    assert_eq!(g.blocks_used().0, 0);
    assert!(!g.cancel(b));
    // More than the whole cache, or than the context: refused at once, nothing held.
    let e = g.submit(greedy(vec![1; 10], 60)).unwrap_err().to_string();
    assert!(e.contains("max_batch_total_tokens"), "{e}");
    let e = g.submit(greedy(vec![1; 100], 60)).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    // A request that fits only later waits, then runs once memory frees up.
    let c = g.submit(greedy(vec![1; 4], 40)).unwrap();
    let d = g.submit(greedy(vec![2; 4], 40)).unwrap();
    let first = g.step();
    assert_eq!(first.len(), 1, "c's first token");
    assert_eq!((g.running(), g.waiting()), (1, 1));
    let out = drain(&mut g, (d + 1) as usize);
    assert_eq!(out[c as usize].0.len(), 39);
    assert_eq!(out[d as usize].0.len(), 40);
    assert_eq!(g.blocks_used().0, 0);
}

#[test]
fn stop_strings_tokens_and_sampling_seeds() {
    let model = load(&dir("gpt2-tiny"), &LoadOptions::default());
    let r = read_json(&dir("gpt2-tiny").join("reference.json"));
    let case = &r["greedy_generation"]["results"][0];
    let prompt = ids(&case["prompt_ids"]);
    let want = ids(&case["generated_ids"]);
    let limits = GenerationLimits::default();
    // Stop on the 2nd generated token (its first occurrence): generation ends there.
    let mut g = Generator::new(model.clone(), limits).unwrap();
    let mut req = greedy(prompt.clone(), 16);
    assert!(!want[..1].contains(&want[1]));
    req.stop_token_ids = vec![want[1]];
    g.submit(req).unwrap();
    let out = drain(&mut g, 1);
    assert_eq!(out[0].0, want[..2]);
    assert_eq!(out[0].2, Some("stop"));
    // A stop string: the text ends before it.
    let full = case["generated_text"].as_str().unwrap();
    let mut g = Generator::new(model.clone(), limits).unwrap();
    let mut req = greedy(prompt.clone(), 16);
    req.stop = vec![" P P".into()];
    g.submit(req).unwrap();
    let out = drain(&mut g, 1);
    assert_eq!(out[0].1, full[..full.find(" P P").unwrap()]);
    assert_eq!(out[0].2, Some("stop"));
    // Sampling with a seed repeats; another seed differs.
    let sample = |seed| {
        let mut g = Generator::new(model.clone(), limits).unwrap();
        let mut req = greedy(prompt.clone(), 16);
        req.sampling = SamplingParams {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        g.submit(req).unwrap();
        drain(&mut g, 1).remove(0).0
    };
    assert_eq!(sample(1), sample(1));
    assert_ne!(sample(1), sample(2));
}

/// Paged mode cuts to each sequence's last token right after the last layer's attention: that
/// layer's output projection and MLP run on `[sequences, h]`, every other layer's on all tokens,
/// and full mode (every position's logits) cuts nothing.
#[test]
fn paged_graph_runs_the_last_layers_mlp_on_last_tokens_only() {
    use kiln_engine::ir::{Dim, Op};
    use kiln_models::decoder::{DecoderConfig, GraphMode, graph, shards};
    for name in models() {
        let name = name.as_str();
        let d = dir(name);
        let cfg = DecoderConfig::load(&d.join("config.json")).unwrap();
        let weights = shards::Weights::open(&d).unwrap();
        let last = cfg.num_layers - 1;
        for mode in [GraphMode::Paged, GraphMode::Full] {
            let g = graph::build(&cfg, &weights, mode).unwrap();
            let linears: Vec<_> = g
                .nodes
                .iter()
                .filter(|n| matches!(n.op, Op::Linear) && n.label != "lm_head")
                .collect();
            assert!(!linears.is_empty(), "{name}: no linear layers");
            for n in linears {
                let pruned = mode == GraphMode::Paged
                    && n.label.contains(&format!(".{last}."))
                    && !["q", "k", "v", "q_proj", "k_proj", "v_proj"]
                        .iter()
                        .any(|p| n.label.ends_with(&format!(".{p}")));
                let rows = &n.ty.dims[..n.ty.dims.len() - 1];
                if pruned {
                    assert_eq!(rows, [Dim::Sequences], "{name} {mode:?}: {}", n.label);
                } else {
                    assert_eq!(rows, [Dim::Batch, Dim::Seq], "{name} {mode:?}: {}", n.label);
                }
            }
        }
    }
}

/// Decoder plans go through the plan cache as encoder plans do: a cold load stores the paged
/// plan (and the first `full_logits` the full one), a warm load reads both back without
/// building a graph, and the answers stay the reference's.
#[test]
fn decoder_plans_are_stored_in_and_read_from_the_plan_cache() {
    use kiln_models::CacheOutcome;
    let cache = std::env::temp_dir().join(format!("kiln-decoder-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let limits = GenerationLimits::default();
    for name in models() {
        let name = name.as_str();
        let r = read_json(&dir(name).join("reference.json"));
        let case = &r["greedy_generation"]["results"][0];
        let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["generated_ids"]));
        let opts = LoadOptions {
            device: DeviceKind::Cpu.into(),
            cache_dir: Some(cache.join(name)),
            ..LoadOptions::default()
        };
        let mut logits = Vec::new();
        for (round, expected) in [(0, CacheOutcome::Miss), (1, CacheOutcome::Hit)] {
            let model = load(&dir(name), &opts);
            let plan = &model.info().plan;
            assert_eq!(plan.cache, expected, "{name} load {round}");
            assert!(plan.key.is_some(), "{name} load {round}: no key");
            if expected == CacheOutcome::Hit {
                assert!(plan.build_time.is_zero() && plan.compile_time.is_zero());
            }
            let mut g = Generator::new(model.clone(), limits).unwrap();
            g.submit(greedy(prompt.clone(), want.len())).unwrap();
            assert_eq!(drain(&mut g, 1)[0].0, want, "{name} load {round}: tokens");
            logits.push(model.full_logits(std::slice::from_ref(&prompt)).unwrap());
        }
        assert_eq!(
            logits[0], logits[1],
            "{name}: the cached full plan's logits"
        );
        // One entry per graph mode (paged, full).
        let entries = std::fs::read_dir(cache.join(name).join("plans"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "kiln"))
            })
            .count();
        assert_eq!(entries, 2, "{name}: plan-cache entries");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// The memory estimate a server's budget uses: f32 weights (for these f32 files, the data
/// the file holds) plus a KV cache of the tokens asked for.
#[test]
fn memory_estimates_count_f32_weights_and_the_kv_cache() {
    for name in models() {
        let name = name.as_str();
        let d = dir(name);
        let file = std::fs::read(d.join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(file[..8].try_into().unwrap());
        let data = file.len() as u64 - 8 - header;
        assert_eq!(
            kiln_models::memory::estimate_bytes(&d, 0).unwrap(),
            data,
            "{name}"
        );
        let kv = kiln_models::memory::estimate_bytes(&d, 10).unwrap() - data;
        let model = CausalLm::load(&d, &LoadOptions::default(), None).unwrap();
        assert_eq!(
            kv,
            model.kv_spec(1, 10).total_bytes() as u64,
            "{name}: 10 tokens of KV cache"
        );
    }
}
