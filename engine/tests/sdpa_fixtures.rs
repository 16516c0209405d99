//! PyTorch's float64 SDPA references (`$KILN_FIXTURES/sdpa`) through the engine's `Sdpa` op on
//! every device: kiln's CPU kernels, burn-flex and each wgpu adapter, with the selector's choice
//! and with each kernel the device offers forced. Every device must match the reference, and
//! the CPU, within 1e-4.
//!
//! The engine's op takes the masks models emit (none, causal, key padding, varlen); the two
//! fixture cases with an explicit dense mask (causal AND padding, bottom-right causal) have no
//! such spelling and are covered by the attention crate's own fixture test and by the paged
//! decoder tests.

use std::path::{Path, PathBuf};

use kiln_engine::ir::{AttnMask, DType, Dim, GraphBuilder, Op};
use kiln_engine::{DeviceKind, ExecOptions, HostTensor, SdpaKernel, SdpaKernelChoice, prepare};

mod common;

fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

fn read_npy(path: &Path) -> (Vec<usize>, npyz::NpyFile<std::io::Cursor<Vec<u8>>>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(std::io::Cursor::new(bytes)).unwrap();
    (npy.shape().iter().map(|&d| d as usize).collect(), npy)
}

fn read_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let (shape, npy) = read_npy(path);
    let data = match npy.dtype() {
        npyz::DType::Plain(t) if t.size_field() == 8 => npy
            .into_vec::<f64>()
            .unwrap()
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        _ => npy.into_vec::<f32>().unwrap(),
    };
    (shape, data)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Kernels to force on `device`, besides auto.
fn forced(device: DeviceKind) -> Vec<SdpaKernel> {
    match device {
        DeviceKind::Wgpu(_) => vec![SdpaKernel::Flash, SdpaKernel::Math],
        DeviceKind::Cpu => SdpaKernel::ALL.to_vec(),
        // burn-flex runs forced kernels on host copies (the CPU's), already covered above.
        DeviceKind::BurnFlex => Vec::new(),
    }
}

#[test]
fn sdpa_fixtures_match_on_every_device() {
    let dir = fixtures().join("sdpa");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut ran = 0;
    for case in manifest["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let file = |part: &str| dir.join(format!("{name}.{part}.npy"));
        let (qs, q) = read_f32(&file("q"));
        let (ks, k) = read_f32(&file("k"));
        let (_, v) = read_f32(&file("v"));
        let (_, want) = read_f32(&file("out"));
        let causal = case["is_causal"].as_bool().unwrap();
        let scale = case["scale"].as_f64().map(|s| s as f32);
        // A `[B, 1, 1, Sk]` boolean mask is key padding; anything else is dense (see top).
        let padding = if file("mask").exists() {
            let (ms, npy) = read_npy(&file("mask"));
            if ms != [ks[0], 1, 1, ks[2]] {
                eprintln!("{name}: dense {ms:?} mask, not an engine mask: skipped");
                continue;
            }
            let m: Vec<i64> = npy
                .into_vec::<bool>()
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            Some(HostTensor::i64(vec![ks[0], ks[2]], m).unwrap())
        } else {
            None
        };
        let mask = match (&padding, causal) {
            (Some(_), false) => AttnMask::KeyPadding,
            (None, true) => AttnMask::Causal,
            (None, false) => AttnMask::None,
            (Some(_), true) => unreachable!("torch takes a mask or is_causal, not both"),
        };
        let fixed = |s: &[usize]| s.iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>();
        let build = || {
            let mut g = GraphBuilder::new();
            let qi = g.input("q", DType::F32, &fixed(&qs)).unwrap();
            let ki = g.input("k", DType::F32, &fixed(&ks)).unwrap();
            let vi = g.input("v", DType::F32, &fixed(&ks)).unwrap();
            let mut inputs = vec![qi, ki, vi];
            if padding.is_some() {
                let dims = [Dim::Fixed(ks[0]), Dim::Fixed(ks[2])];
                inputs.push(g.input("mask", DType::I64, &dims).unwrap());
            }
            let out = g.push(Op::Sdpa { mask, scale }, &inputs, "sdpa").unwrap();
            g.finish(vec![("out".into(), out)]).unwrap()
        };
        let mut feeds = vec![
            (
                "q".to_string(),
                HostTensor::f32(qs.clone(), q.clone()).unwrap(),
            ),
            (
                "k".to_string(),
                HostTensor::f32(ks.clone(), k.clone()).unwrap(),
            ),
            (
                "v".to_string(),
                HostTensor::f32(ks.clone(), v.clone()).unwrap(),
            ),
        ];
        if let Some(m) = &padding {
            feeds.push(("mask".into(), m.clone()));
        }
        let mut cpu: Option<Vec<f32>> = None;
        for device in common::devices() {
            let choices = std::iter::once(SdpaKernelChoice::Auto)
                .chain(forced(device).into_iter().map(SdpaKernelChoice::Force));
            for choice in choices {
                let exec = ExecOptions {
                    sdpa_kernel: choice,
                    ..ExecOptions::default()
                };
                let label = format!("{name} on {device} (sdpa_kernel = {choice})");
                let plan = prepare(build(), device, exec).unwrap();
                let got = match plan.run(&feeds) {
                    Ok(mut out) => out.remove(0).1.into_f32().unwrap(),
                    // Only a forced flash may refuse, and only past its head-size limit.
                    Err(e) if choice == SdpaKernelChoice::Force(SdpaKernel::Flash) => {
                        assert!(e.to_string().contains("head_dim"), "{label}: {e}");
                        continue;
                    }
                    Err(e) => panic!("{label}: {e}"),
                };
                let err = max_abs(&got, &want);
                assert!(err <= 1e-4, "{label}: {err} from PyTorch's float64 output");
                match &cpu {
                    None => cpu = Some(got),
                    Some(c) => {
                        let err = max_abs(&got, c);
                        assert!(err <= 1e-4, "{label}: {err} from the CPU's output");
                    }
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= 9 * 5, "only {ran} case × device × kernel runs");
}
