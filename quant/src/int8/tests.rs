//! Every int8 kernel against the scalar reference, to exact equality: random shapes (k and n not
//! multiples of the vector width or the panel), dynamic and static activations, extreme values.

use super::*;
use crate::test_util::Rng;

/// The tiles this machine can run: every supported kernel, plus the emulated AVX-VNNI tile.
fn tiles() -> Vec<(String, TileFn, Int8Kernel)> {
    #[allow(unused_mut)]
    let mut out: Vec<(String, TileFn, Int8Kernel)> = Int8Kernel::ALL
        .into_iter()
        .filter(|k| k.is_supported())
        .map(|k| (k.name().to_string(), TileFn::Kernel(k), k))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if Int8Kernel::Avx2.is_supported() {
        // Packed like the scalar kernel (the same quads layout as AVX-VNNI).
        out.push((
            "avx-vnni (vpdpbusd emulated with AVX2)".into(),
            TileFn::AvxVnniEmulated,
            Int8Kernel::Scalar,
        ));
    }
    for k in Int8Kernel::ALL.into_iter().filter(|k| !k.is_supported()) {
        eprintln!(
            "int8 kernel {k} is not supported by this CPU: its real-instruction test is skipped"
        );
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check(
    label: &str,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    act: ActQuant,
) {
    let (q, scales) = quantize_weights(w, n, k);
    let want = reference::linear(x, m, k, &q, &scales, n, bias, act);
    for (name, tile, pack_for) in tiles() {
        let packed = Int8Weights::from_quantized(&q, &scales, n, k, pack_for).unwrap();
        assert_eq!(packed.unpacked(), q, "{name}: pack/unpack");
        for threads in [1, 2] {
            let mut got = vec![f32::NAN; m * n];
            linear_with(tile, x, m, &packed, bias, act, &mut got, threads, &|_| {}).unwrap();
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == r.to_bits(),
                    "{label} {name} threads={threads} m={m} k={k} n={n} {act:?}: \
                     out[{}][{}] = {g} but the reference gives {r}",
                    i / n,
                    i % n
                );
            }
        }
    }
}

#[test]
fn kernels_equal_the_reference_on_random_shapes() {
    let mut rng = Rng::new(7);
    let ks = [
        1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 384, 385,
    ];
    let ns = [1, 3, 15, 16, 17, 31, 33, 100];
    let ms = [1, 2, 3, 4, 5, 9, 17, 64, 65, 131];
    for case in 0..60 {
        let (m, k, n) = (rng.pick(&ms), rng.pick(&ks), rng.pick(&ns));
        let x = rng.normal_vec(m * k, 2.0);
        let w = rng.normal_vec(n * k, 0.1);
        let bias = rng.normal_vec(n, 1.0);
        let b = (case % 3 != 0).then_some(&bias[..]);
        check("random", &x, m, k, &w, n, b, ActQuant::Dynamic);
        let p = ActParams::from_range(-3.0, 5.0);
        check("random", &x, m, k, &w, n, b, ActQuant::Static(p));
    }
}

#[test]
fn extremes_saturate_nothing_and_clamp_static_inputs() {
    // All activations at the top of the u8 range (zero point 0) times weights at ±127: each
    // `vpmaddubsw` pair would be 2·255·127 = 64770 and saturate at 32767; the kernels must be exact.
    for k in [2, 3, 64, 333, 4096] {
        let (m, n) = (5, 17);
        let x = vec![1.0f32; m * k];
        let w: Vec<f32> = (0..n * k)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        check("saturating", &x, m, k, &w, n, None, ActQuant::Dynamic);
        let mut neg = x.clone();
        neg.iter_mut().step_by(2).for_each(|v| *v = -1.0);
        check("saturating", &neg, m, k, &w, n, None, ActQuant::Dynamic);
    }
    // Static parameters and inputs far outside their range (clamped to 0 and 255), huge and tiny
    // magnitudes, infinities, an all-zero weight channel and an all-zero input row.
    let mut rng = Rng::new(11);
    let (m, k, n) = (9, 37, 19);
    let mut x = rng.normal_vec(m * k, 1.0);
    for (i, v) in [
        1e30,
        -1e30,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-30,
        -0.0,
    ]
    .into_iter()
    .enumerate()
    {
        x[i * 5] = v;
    }
    x[2 * k..3 * k].fill(0.0);
    let mut w = rng.normal_vec(n * k, 1e-3);
    w[0] = 1e20; // one huge weight: the rest of channel 0 rounds to zero
    w[k..2 * k].fill(0.0);
    let p = ActParams::from_range(-1.0, 1.0);
    check("extreme static", &x, m, k, &w, n, None, ActQuant::Static(p));
    // Dynamic rows without infinities (a row with an infinity has no finite scale: scale 1).
    let finite: Vec<f32> = x
        .iter()
        .map(|v| if v.is_finite() { *v } else { 0.0 })
        .collect();
    check(
        "extreme dynamic",
        &finite,
        m,
        k,
        &w,
        n,
        None,
        ActQuant::Dynamic,
    );
    check("infinite dynamic", &x, m, k, &w, n, None, ActQuant::Dynamic);
}

#[test]
fn largest_k_stays_exact() {
    let k = MAX_K;
    let (m, n) = (4, 16);
    // Every product at its largest, 255 · 127, summed k times: just below i32::MAX.
    let x = vec![1.0f32; m * k];
    let w = vec![1.0f32; n * k];
    check(
        "max k",
        &x,
        m,
        k,
        &w,
        n,
        None,
        ActQuant::Static(ActParams::from_range(0.0, 1.0)),
    );
    assert!(Int8Weights::pack(&vec![0.0; k + 1], 1, k + 1, Int8Kernel::Scalar).is_err());
}

#[test]
fn int8_is_close_to_f32() {
    let mut rng = Rng::new(3);
    let (m, k, n) = (32, 384, 96);
    let x = rng.normal_vec(m * k, 1.0);
    let w = rng.normal_vec(n * k, 0.05);
    let packed = Int8Weights::pack(&w, n, k, Int8Kernel::detect()).unwrap();
    let mut y = vec![0.0; m * n];
    linear(&x, m, &packed, None, ActQuant::Dynamic, &mut y, 1).unwrap();
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for i in 0..m {
        for j in 0..n {
            let exact: f64 = (0..k)
                .map(|p| f64::from(x[i * k + p]) * f64::from(w[j * k + p]))
                .sum();
            err += (f64::from(y[i * n + j]) - exact).powi(2);
            norm += exact * exact;
        }
    }
    let rel = (err / norm).sqrt();
    assert!(rel < 0.02, "relative error {rel}");
}

#[test]
fn bytes_round_trip_across_kernels() {
    let mut rng = Rng::new(5);
    let (m, k, n) = (6, 45, 21);
    let x = rng.normal_vec(m * k, 1.0);
    let w = rng.normal_vec(n * k, 0.3);
    let first = Int8Weights::pack(&w, n, k, Int8Kernel::Scalar).unwrap();
    let bytes = first.to_bytes();
    let mut want = vec![0.0; m * n];
    linear(&x, m, &first, None, ActQuant::Dynamic, &mut want, 1).unwrap();
    for kernel in Int8Kernel::ALL.into_iter().filter(|k| k.is_supported()) {
        let again = Int8Weights::from_bytes(&bytes, kernel).unwrap();
        assert_eq!(again.to_bytes(), bytes);
        let mut got = vec![0.0; m * n];
        linear(&x, m, &again, None, ActQuant::Dynamic, &mut got, 1).unwrap();
        assert_eq!(got, want, "{kernel}");
    }
    assert!(Int8Weights::from_bytes(&bytes[..bytes.len() - 1], Int8Kernel::Scalar).is_err());
    assert!(Int8Weights::from_bytes(b"garbage", Int8Kernel::Scalar).is_err());
}

#[test]
fn bad_arguments_are_errors() {
    let w = Int8Weights::pack(&[1.0; 12], 3, 4, Int8Kernel::Scalar).unwrap();
    let mut out = vec![0.0; 6];
    assert!(linear(&[0.0; 7], 2, &w, None, ActQuant::Dynamic, &mut out, 1).is_err());
    assert!(
        linear(
            &[0.0; 8],
            2,
            &w,
            Some(&[0.0; 2]),
            ActQuant::Dynamic,
            &mut out,
            1
        )
        .is_err()
    );
    let bad = ActQuant::Static(ActParams {
        scale: 0.0,
        zero_point: 0,
    });
    assert!(linear(&[0.0; 8], 2, &w, None, bad, &mut out, 1).is_err());
    assert!(Int8Weights::pack(&[1.0; 11], 3, 4, Int8Kernel::Scalar).is_err());
    assert!(Int8Kernel::detect().is_supported());
}

#[test]
fn activation_params_cover_the_range_and_keep_zero_exact() {
    let p = ActParams::from_range(-1.0, 3.0);
    assert_eq!(p.quantize(0.0), p.zero_point);
    assert_eq!(p.quantize(-1.0), 0);
    assert_eq!(p.quantize(3.0), 255);
    assert_eq!(p.quantize(1e9), 255);
    assert_eq!(p.quantize(f32::NAN), 0);
    let flat = ActParams::from_range(0.0, 0.0);
    assert_eq!((flat.scale, flat.quantize(0.0)), (1.0, 0));
    let positive = ActParams::from_range(2.0, 4.0);
    assert_eq!(positive.zero_point, 0, "the range is widened to include 0");
}

/// `linear_then` runs its epilogue once over every output row, after the row is final: the
/// result equals `linear` followed by the same function over the whole output.
#[test]
fn the_epilogue_sees_every_finished_row_once() {
    let (m, k, n) = (300, 70, 45);
    let mut rng = Rng::new(11);
    let x = rng.normal_vec(m * k, 2.0);
    let w = rng.normal_vec(n * k, 0.1);
    let bias = rng.normal_vec(n, 1.0);
    let packed = Int8Weights::pack(&w, n, k, Int8Kernel::detect()).unwrap();
    for threads in [1, 2, 3] {
        let mut want = vec![0.0; m * n];
        linear(
            &x,
            m,
            &packed,
            Some(&bias),
            ActQuant::Dynamic,
            &mut want,
            threads,
        )
        .unwrap();
        want.iter_mut().for_each(|v| *v = v.max(0.0) + 1.0);
        let mut got = vec![f32::NAN; m * n];
        let relu_plus_one = |rows: &mut [f32]| {
            assert_eq!(rows.len() % n, 0, "whole rows");
            rows.iter_mut().for_each(|v| *v = v.max(0.0) + 1.0);
        };
        linear_then(
            &x,
            m,
            &packed,
            Some(&bias),
            ActQuant::Dynamic,
            &mut got,
            threads,
            &relu_plus_one,
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{threads} threads"
        );
    }
}
