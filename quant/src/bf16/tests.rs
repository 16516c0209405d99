//! Every bf16 kernel this CPU runs against the reference (bf16-rounded inputs, f64 sums), over
//! random shapes with k and n off the vector widths, and extreme values.

use super::*;
use crate::test_util::Rng;

fn kernels() -> Vec<Bf16Kernel> {
    for k in Bf16Kernel::ALL.into_iter().filter(|k| !k.is_supported()) {
        crate::test_util::skipped(k.name());
    }
    Bf16Kernel::ALL
        .into_iter()
        .filter(|k| k.is_supported())
        .collect()
}

fn check(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) {
    let want = reference_linear(x, m, k, w, n, bias);
    for kernel in kernels() {
        let packed = Bf16Weights::pack(w, n, k, kernel).unwrap();
        let bits: Vec<u16> = w.iter().map(|&v| to_bf16(v)).collect();
        assert_eq!(packed.unpacked(), bits, "{kernel}: pack/unpack");
        for threads in [1, 2] {
            let mut got = vec![f32::NAN; m * n];
            linear(x, m, &packed, bias, &mut got, threads).unwrap();
            for i in 0..m {
                for j in 0..n {
                    // f32 sums of k products: error within a few ulps of Σ|a·b|.
                    let mag: f64 = (0..k)
                        .map(|p| {
                            f64::from(round_to_bf16(x[i * k + p]).abs())
                                * f64::from(round_to_bf16(w[j * k + p]).abs())
                        })
                        .sum::<f64>()
                        + f64::from(bias.map_or(0.0, |b| b[j].abs()));
                    let (g, r) = (got[i * n + j], want[i * n + j]);
                    let tol = 1e-5 * mag + 1e-30;
                    assert!(
                        g == r || (f64::from(g) - f64::from(r)).abs() <= tol,
                        "{kernel} threads={threads} m={m} k={k} n={n}: out[{i}][{j}] = {g}, want {r} (tol {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn kernels_match_the_reference_on_random_shapes() {
    let mut rng = Rng::new(9);
    let ks = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 64, 100, 385];
    let ns = [1, 3, 15, 16, 17, 33, 70];
    let ms = [1, 2, 3, 4, 5, 9, 17, 65, 130];
    for case in 0..40 {
        let (m, k, n) = (rng.pick(&ms), rng.pick(&ks), rng.pick(&ns));
        let x = rng.normal_vec(m * k, 3.0);
        let w = rng.normal_vec(n * k, 0.2);
        let bias = rng.normal_vec(n, 1.0);
        check(&x, m, k, &w, n, (case % 2 == 0).then_some(&bias[..]));
    }
}

#[test]
fn extreme_values() {
    let mut rng = Rng::new(2);
    let (m, k, n) = (6, 19, 18);
    let mut x = rng.normal_vec(m * k, 1.0);
    x[0] = 1e30;
    x[1] = -3e38; // near bf16's largest finite value; products overflow f32 to -inf
    x[2] = 1e-30;
    let mut w = rng.normal_vec(n * k, 1.0);
    w[5] = 1e-20;
    w[k..2 * k].fill(0.0);
    check(&x, m, k, &w, n, None);
}

#[test]
fn conversion_rounds_to_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3F80);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
    assert_eq!(to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
    // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (0x3F82).
    assert_eq!(to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
    assert_eq!(to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
    assert_eq!(round_to_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
}

#[test]
fn bytes_round_trip_and_bad_input() {
    let mut rng = Rng::new(4);
    let (k, n) = (13, 20);
    let w = rng.normal_vec(n * k, 1.0);
    let packed = Bf16Weights::pack(&w, n, k, Bf16Kernel::Portable).unwrap();
    let bytes = packed.to_bytes();
    for kernel in kernels() {
        let again = Bf16Weights::from_bytes(&bytes, kernel).unwrap();
        assert_eq!(again.unpacked(), packed.unpacked());
    }
    assert!(Bf16Weights::from_bytes(&bytes[..9], Bf16Kernel::Portable).is_err());
    assert!(Bf16Weights::pack(&w, n, k + 1, Bf16Kernel::Portable).is_err());
    let mut out = vec![0.0; 2 * n];
    assert!(linear(&[0.0; 5], 2, &packed, None, &mut out, 1).is_err());
}
