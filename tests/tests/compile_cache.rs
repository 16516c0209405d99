//! The graph compiler and the plan cache on real models: all passes on versus off, cache round
//! trips, damaged entries, two processes compiling at once, and what changes the key.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_engine::compile::{CompileOptions, PassId};
use kiln_engine::{DeviceKind, MathMode, Quantize};
use kiln_models::{BatchLayout, CacheOutcome, EmbedOptions, EncoderModel, LoadOptions, TextInput};
use kiln_tests::{fixtures, max_abs_diff, minilm_dir, read_jsonl};

const TRUNCATE: EmbedOptions = EmbedOptions {
    truncate: true,
    normalize: None,
};

/// A fresh, empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn minilm_texts() -> Vec<String> {
    read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

/// Every float output of one run of `batch`, flattened, by name.
fn outputs(model: &EncoderModel, texts: &[String]) -> Vec<(String, Vec<f32>)> {
    let inputs: Vec<TextInput> = texts.iter().cloned().map(TextInput::Single).collect();
    let encoded = model.tokenize(&inputs, true).unwrap();
    let mut all = Vec::new();
    for chunk in encoded.chunks(16) {
        for (name, t) in model.run_batch(chunk).unwrap() {
            all.push((name, t.into_f32().unwrap()));
        }
    }
    all
}

fn assert_close(label: &str, a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], tol: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "{label}: output count");
    let mut worst = 0.0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = max_abs_diff(va, vb);
        assert!(d <= tol, "{label}: `{na}` differs by {d} (tolerance {tol})");
        worst = worst.max(d);
    }
    worst
}

fn bits(v: &[(String, Vec<f32>)]) -> Vec<u32> {
    v.iter()
        .flat_map(|(_, x)| x.iter().map(|f| f.to_bits()))
        .collect()
}

#[test]
fn all_passes_on_and_off_agree_within_1e_6_on_minilm() {
    let texts = minilm_texts();
    // CPU and burn-flex only: on a software GPU (lavapipe in CI) four MiniLM loads take minutes;
    // the tiny models below run every pass on and off on each wgpu adapter.
    for device in DeviceKind::ALL {
        for layout in [BatchLayout::Packed, BatchLayout::Padded] {
            let opts = |compile| LoadOptions {
                device: device.into(),
                layout,
                compile,
                ..LoadOptions::default()
            };
            let on = EncoderModel::load(&minilm_dir(), &opts(CompileOptions::default())).unwrap();
            let off = EncoderModel::load(&minilm_dir(), &opts(CompileOptions::none())).unwrap();
            let (a, b) = (outputs(&on, &texts), outputs(&off, &texts));
            let worst = assert_close(&format!("{device}/{layout:?}"), &a, &b, 1e-6);
            eprintln!("minilm {device}/{layout:?}: passes on vs off differ by at most {worst}");
        }
    }
}

#[test]
fn all_passes_on_and_off_and_each_pass_alone_off_agree_on_the_tiny_models() {
    for name in ["bert-tiny", "bert-tiny-cls"] {
        let dir = fixtures().join("tiny").join(name);
        let reference = kiln_tests::read_json(&dir.join("reference.json"));
        let texts: Vec<String> = reference["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        for device in kiln_tests::devices() {
            let load = |compile: CompileOptions| {
                let opts = LoadOptions {
                    device: device.into(),
                    compile,
                    ..LoadOptions::default()
                };
                outputs(&EncoderModel::load(&dir, &opts).unwrap(), &texts)
            };
            let off = load(CompileOptions::none());
            assert_close(
                &format!("{name} {device} all"),
                &load(CompileOptions::default()),
                &off,
                1e-6,
            );
            for pass in PassId::ALL {
                let mut only_off = CompileOptions::default();
                only_off.disabled.insert(pass);
                assert_close(
                    &format!("{name} {device} without {pass}"),
                    &load(only_off),
                    &off,
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn a_cache_round_trip_gives_bit_identical_outputs_without_reading_the_weights() {
    let cache = temp_dir("roundtrip");
    let texts: Vec<String> = minilm_texts().into_iter().take(24).collect();
    let opts = LoadOptions {
        cache_dir: Some(cache.clone()),
        ..LoadOptions::default()
    };
    let uncached = outputs(
        &EncoderModel::load(&minilm_dir(), &LoadOptions::default()).unwrap(),
        &texts,
    );
    let cold = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    assert_eq!(cold.info().plan.cache, CacheOutcome::Miss);
    let warm = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    let plan = &warm.info().plan;
    assert_eq!(plan.cache, CacheOutcome::Hit);
    assert_eq!(plan.key, cold.info().plan.key);
    assert!(plan.compile_time.is_zero());
    assert_eq!(
        plan.report,
        cold.info().plan.report,
        "the report comes back with the plan"
    );
    let (a, b) = (outputs(&cold, &texts), outputs(&warm, &texts));
    assert_eq!(bits(&a), bits(&b), "cold and warm plans differ");
    assert_eq!(
        bits(&uncached),
        bits(&b),
        "cached and uncached plans differ"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// The entry file of the only plan in `cache`.
fn only_entry(cache: &Path) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("plans"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "kiln"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

#[test]
fn truncated_corrupted_and_wrong_version_entries_are_rebuilt() {
    let dir = fixtures().join("tiny/bert-tiny-cls");
    let cache = temp_dir("damaged");
    let opts = LoadOptions {
        cache_dir: Some(cache.clone()),
        ..LoadOptions::default()
    };
    let texts = vec!["a cache entry".to_string(), "kiln".to_string()];
    let first = EncoderModel::load(&dir, &opts).unwrap();
    let want = outputs(&first, &texts);
    let entry = only_entry(&cache);
    let good = std::fs::read(&entry).unwrap();
    let mut damage: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 3].to_vec()),
        ("empty", Vec::new()),
    ];
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 100] ^= 0xff;
    damage.push(("a flipped data byte", flipped));
    let mut version = good.clone();
    version[8] = version[8].wrapping_add(1);
    damage.push(("another format version", version));
    for (what, bytes) in damage {
        std::fs::write(&entry, bytes).unwrap();
        let model = EncoderModel::load(&dir, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        let CacheOutcome::Rebuilt(why) = &model.info().plan.cache else {
            panic!(
                "{what}: expected a rebuild, got {:?}",
                model.info().plan.cache
            )
        };
        eprintln!("{what}: rebuilt ({why})");
        assert_eq!(bits(&outputs(&model, &texts)), bits(&want), "{what}");
        // The rebuilt entry is good again.
        let again = EncoderModel::load(&dir, &opts).unwrap();
        assert_eq!(again.info().plan.cache, CacheOutcome::Hit, "{what}");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// Set in the child processes of the next test: the cache folder to load MiniLM with.
const CHILD_ENV: &str = "KILN_TEST_CHILD_CACHE";

/// Runs only as a child of `two_processes_compiling_at_once_both_end_with_a_valid_entry`.
#[test]
fn child_process_loads_minilm_with_a_cache() {
    let Some(cache) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cache = PathBuf::from(cache);
    // Start together: wait for the parent's go file.
    while !cache.join("go").exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let opts = LoadOptions {
        cache_dir: Some(cache),
        ..LoadOptions::default()
    };
    let model = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    let v = model
        .embed(&["two processes".to_string()], TRUNCATE)
        .unwrap();
    println!(
        "CHILD outcome={} first={}",
        model.info().plan.cache.as_str(),
        v.vectors[0][0]
    );
}

#[test]
fn two_processes_compiling_at_once_both_end_with_a_valid_entry() {
    let cache = temp_dir("two-processes");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_process_loads_minilm_with_a_cache",
                    "--nocapture",
                ])
                .env(CHILD_ENV, &cache)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::fs::write(cache.join("go"), b"").unwrap();
    let mut firsts = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("CHILD"))
            .unwrap()
            .to_string();
        eprintln!("{line}");
        firsts.push(line.split("first=").nth(1).unwrap().to_string());
    }
    assert_eq!(
        firsts[0], firsts[1],
        "both processes computed the same embedding"
    );
    // One valid entry remains, no temporary files; a third load hits it.
    only_entry(&cache);
    let leftovers = std::fs::read_dir(cache.join("plans"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0);
    let opts = LoadOptions {
        cache_dir: Some(cache.clone()),
        ..LoadOptions::default()
    };
    let model = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    assert_eq!(model.info().plan.cache, CacheOutcome::Hit);
    let v = model
        .embed(&["two processes".to_string()], TRUNCATE)
        .unwrap();
    assert_eq!(v.vectors[0][0].to_string(), firsts[0]);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Copies a fixture model folder (small files) to `to`.
fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_changed_model_file_or_option_gives_a_new_key() {
    let root = temp_dir("keys");
    let model_dir = root.join("bert-tiny");
    copy_model(&fixtures().join("tiny/bert-tiny"), &model_dir);
    let cache = root.join("cache");
    let base = LoadOptions {
        cache_dir: Some(cache.clone()),
        ..LoadOptions::default()
    };
    let load = |opts: &LoadOptions| {
        let m = EncoderModel::load(&model_dir, opts).unwrap();
        let info = m.info().plan.clone();
        let out = outputs(&m, &["changing keys".to_string()]);
        (info.cache, info.key.unwrap(), out)
    };
    let (outcome, key, out) = load(&base);
    assert_eq!(outcome, CacheOutcome::Miss);
    assert_eq!(load(&base).0, CacheOutcome::Hit);

    // Each option that shapes the plan gives its own key.
    let mut seen = vec![key.clone()];
    let variants = [
        LoadOptions {
            compile: CompileOptions::no_fuse(),
            ..base.clone()
        },
        LoadOptions {
            layout: BatchLayout::Padded,
            ..base.clone()
        },
        LoadOptions {
            device: DeviceKind::BurnFlex.into(),
            ..base.clone()
        },
        LoadOptions {
            exec: kiln_engine::ExecOptions {
                sdpa_kernel: "math".parse().unwrap(),
                ..Default::default()
            },
            ..base.clone()
        },
        quantized(&base, Quantize::Int8Dynamic, MathMode::Precise, &[]),
        quantized(
            &base,
            Quantize::Int8Dynamic,
            MathMode::Precise,
            &["*.query"],
        ),
        quantized(&base, Quantize::None, MathMode::Bf16Fast, &[]),
    ];
    for opts in &variants {
        let (outcome, k, _) = load(opts);
        assert_eq!(outcome, CacheOutcome::Miss);
        assert!(!seen.contains(&k), "a new key for each option");
        seen.push(k);
    }
    // Back to the first options: the first entry is still there.
    assert_eq!(load(&base).1, key);

    // Rewriting config.json (same meaning, different bytes) changes the key.
    let config = model_dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n")).unwrap();
    let (outcome, k, out2) = load(&base);
    assert_eq!(outcome, CacheOutcome::Miss);
    assert!(!seen.contains(&k));
    seen.push(k);
    assert_eq!(bits(&out2), bits(&out));

    // Changing one weight changes the key.
    let weights = model_dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();
    let (outcome, k, _) = load(&base);
    assert_eq!(outcome, CacheOutcome::Miss);
    assert!(!seen.contains(&k));
    let _ = std::fs::remove_dir_all(&root);
}

/// `base` with int8 or bf16 linears, `skip` layers kept f32.
fn quantized(base: &LoadOptions, quantize: Quantize, math: MathMode, skip: &[&str]) -> LoadOptions {
    let mut opts = base.clone();
    opts.exec.quant.quantize = quantize;
    opts.exec.quant.math_mode = math;
    opts.exec.quant.layers.deny = skip.iter().map(|s| s.to_string()).collect();
    opts
}

/// An int8-dynamic plan goes through the cache like an f32 one: a miss compiles it (Q/K/V merged
/// into one int8 linear, GELU and the pooler's tanh as their linears' epilogues), a hit gives bit-identical
/// outputs, and the linears still run int8 after the hit.
#[test]
fn a_quantized_plan_round_trips_through_the_cache() {
    let cache = temp_dir("int8");
    let opts = quantized(
        &LoadOptions {
            cache_dir: Some(cache.clone()),
            ..LoadOptions::default()
        },
        Quantize::Int8Dynamic,
        MathMode::Precise,
        &[],
    );
    let texts = minilm_texts();
    let cold = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    assert_eq!(cold.info().plan.cache, CacheOutcome::Miss);
    let explain = cold.info().plan.report.explain();
    for want in [
        "merged 3 linears into one [384→1152] GEMM",
        "fused 7 linear + activation pairs",
        "quantize int8-dynamic",
        "int8 GEMM, weight s8 per channel",
    ] {
        assert!(explain.contains(want), "`{want}` missing from:\n{explain}");
    }
    let warm = EncoderModel::load(&minilm_dir(), &opts).unwrap();
    assert_eq!(warm.info().plan.cache, CacheOutcome::Hit);
    assert_eq!(bits(&outputs(&warm, &texts)), bits(&outputs(&cold, &texts)));
    let int8 = warm
        .linear_formats()
        .iter()
        .filter(|c| c.format.name() == "int8-dynamic")
        .count();
    assert_eq!(
        int8,
        warm.linear_formats().len(),
        "every linear runs int8 after a hit"
    );
    // The entry holds the linears as s8 (a quarter of their f32 bytes), not f32.
    let int8_entry = std::fs::metadata(only_entry(&cache)).unwrap().len();
    let f32_cache = temp_dir("int8-f32");
    let f32_opts = LoadOptions {
        cache_dir: Some(f32_cache.clone()),
        ..LoadOptions::default()
    };
    EncoderModel::load(&minilm_dir(), &f32_opts).unwrap();
    let f32_entry = std::fs::metadata(only_entry(&f32_cache)).unwrap().len();
    // MiniLM's linears hold 10.6M weights: 42.5 MB in f32, 10.6 MB in s8.
    assert!(
        f32_entry.saturating_sub(int8_entry) > 25_000_000,
        "int8 entry {int8_entry} bytes against f32 {f32_entry}"
    );
    let _ = std::fs::remove_dir_all(&f32_cache);
    let _ = std::fs::remove_dir_all(&cache);
}

/// In quantized plans the Q/K/V merge and the bias-activation epilogue run too, and change
/// nothing in the outputs: a merged linear quantizes its shared input once (per token, or with
/// the one calibrated scale its members share) and each output column is the same sum as in its
/// own linear. Members whose formats differ (here the key projection kept f32 by the deny list)
/// are not merged.
#[test]
fn quantized_plans_merge_qkv_only_when_the_formats_agree_and_match_uncompiled_plans() {
    let texts: Vec<String> = minilm_texts().into_iter().take(8).collect();
    let base = LoadOptions::default();
    // Static scales calibrated on a few texts: Q, K and V read one input, so they share a scale.
    let calibration: Vec<String> = minilm_texts().into_iter().skip(8).take(8).collect();
    let scales = std::sync::Arc::new(
        kiln_models::quantize::calibrate(
            &minilm_dir(),
            &LoadOptions::default(),
            &calibration,
            kiln_quant::observer::ObserverKind::MinMax,
        )
        .unwrap(),
    );
    let cases = [
        (Quantize::Int8Static, MathMode::Precise, vec![], true),
        (Quantize::Int8Dynamic, MathMode::Precise, vec![], true),
        (
            Quantize::Int8Dynamic,
            MathMode::Precise,
            vec!["*.self.key"],
            false,
        ),
        (Quantize::None, MathMode::Bf16Fast, vec![], true),
    ];
    for (quantize, math, skip, merges) in cases {
        let label = format!("{quantize}/{math}/skip {skip:?}");
        let mut opts = quantized(&base, quantize, math, &skip);
        if quantize == Quantize::Int8Static {
            opts.exec.quant.scales = Some(scales.clone());
        }
        let on = EncoderModel::load(&minilm_dir(), &opts).unwrap();
        let off = EncoderModel::load(
            &minilm_dir(),
            &LoadOptions {
                compile: CompileOptions::none(),
                ..opts.clone()
            },
        )
        .unwrap();
        let explain = on.info().plan.report.explain();
        assert_eq!(
            explain.contains("merged 3 linears"),
            merges,
            "{label}: merge expected {merges}:\n{explain}"
        );
        if !merges {
            assert!(
                explain.contains("merged 2 linears"),
                "{label}: Q and V still merge"
            );
        }
        // The same layers run quantized in both plans (a merged linear counts once).
        let count = |m: &EncoderModel| {
            m.linear_formats()
                .iter()
                .filter(|c| c.format.name() != "f32")
                .map(|c| kiln_engine::quantize::member_count(&c.label))
                .sum::<usize>()
        };
        assert_eq!(count(&on), count(&off), "{label}: quantized layers");
        let worst = assert_close(&label, &outputs(&on, &texts), &outputs(&off, &texts), 1e-6);
        eprintln!("{label}: compiled vs uncompiled differ by at most {worst}");
    }
}
