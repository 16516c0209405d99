//! Every op through burn-tensor on a burn `Device`.
//!
//! This is the device-agnostic path: burn-flex on the CPU, and the same code on a wgpu adapter
//! (built with the `wgpu` feature; see [`crate::gpu`]). On a GPU, attention asks the GPU selector
//! ([`kiln_attention::select_gpu`]) for flash (burn's fused attention) or math (burn ops
//! composed here), and the adapter's facts key the plan cache. Float tensors are held as rank-4
//! burn tensors padded with leading 1s (burn's rank is a const generic; one rank keeps this file free of rank dispatch),
//! and the logical rank travels beside them. Shapes are validated by the graph before any burn
//! call, because burn panics on a bad shape.

use burn_tensor::activation;
use burn_tensor::module;
use burn_tensor::ops::AttentionModuleOptions;
use burn_tensor::{Bool, Device, Int, Tensor, TensorData};
use kiln_attention::KernelChoice;

use super::{Backend, CpuBackend, KvStore, SdpaMaskArg, cumulative};
use crate::caps::CpuCaps;
use crate::compile::CompileTarget;
use crate::error::{EngineError, Result};
use crate::gpu;
use crate::ir::{Activation, ConstRole, DType, PoolMode};
use crate::kv::{KvCacheSpec, PagedBatch};
use crate::storage::{ElemType, StoredTensor, WeightFormat};
use crate::tensor::{HostData, HostTensor};

/// A tensor on [`BurnBackend`].
#[derive(Clone)]
pub enum BurnTensor {
    /// `t` is the logical tensor with `4 - rank` leading dimensions of size 1.
    Float { t: Tensor<4>, rank: usize },
    /// Ids and masks, held as `[rows, cols]`; `shape` is the logical shape.
    Int {
        t: Tensor<2, Int>,
        shape: Vec<usize>,
    },
}

impl std::fmt::Debug for BurnTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BurnTensor::Float { t, rank } => write!(f, "Float(rank {rank}, {:?})", t.dims()),
            BurnTensor::Int { shape, .. } => write!(f, "Int({shape:?})"),
        }
    }
}

fn pad4(shape: &[usize]) -> [usize; 4] {
    let mut out = [1usize; 4];
    out[4 - shape.len()..].copy_from_slice(shape);
    out
}

fn logical(t: &Tensor<4>, rank: usize) -> Vec<usize> {
    t.dims()[4 - rank..].to_vec()
}

/// Runs the graph's ops with burn on one device.
#[derive(Clone)]
pub struct BurnBackend {
    device: Device,
    label: String,
    /// The wgpu adapter when this backend runs on a GPU (`None` on burn-flex).
    adapter: Option<&'static gpu::Adapter>,
}

impl std::fmt::Debug for BurnBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BurnBackend({})", self.label)
    }
}

impl BurnBackend {
    /// burn's CPU backend.
    pub fn flex() -> Self {
        Self {
            device: Device::flex(),
            label: "burn-flex".into(),
            adapter: None,
        }
    }

    /// The wgpu adapter `wgpu:index` ([`gpu::adapters`]), opened once per process. An error if
    /// this build lacks wgpu or the machine lacks the adapter.
    pub fn wgpu(index: usize) -> Result<Self> {
        let adapter = gpu::adapter(index)?;
        Ok(Self {
            device: gpu::open(adapter)?,
            label: format!("wgpu:{index}"),
            adapter: Some(adapter),
        })
    }

    /// A GEMM and a softmax on the device, compared with the host: what `auto` runs before it
    /// trusts a GPU. A driver that panics inside burn counts as a failure, not a crash.
    pub fn self_test(&self) -> Result<()> {
        let (m, k, n) = (24usize, 40usize, 32usize);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 16.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 19) as f32 - 9.0) / 16.0)
            .collect();
        let run = || -> std::result::Result<Vec<f32>, String> {
            let ta = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &self.device);
            let tb = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &self.device);
            activation::softmax(ta.matmul(tb), 1)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| format!("{e:?}"))
        };
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|_| self.err("self-test: the device panicked"))?
            .map_err(|e| self.err(format!("self-test: reading back failed: {e}")))?;
        let mut worst = 0.0f64;
        for r in 0..m {
            let row: Vec<f64> = (0..n)
                .map(|c| {
                    (0..k)
                        .map(|i| f64::from(a[r * k + i]) * f64::from(b[i * n + c]))
                        .sum()
                })
                .collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
            for c in 0..n {
                let want = (row[c] - max).exp() / sum;
                worst = worst.max((f64::from(got[r * n + c]) - want).abs());
            }
        }
        if got.len() != m * n || !worst.is_finite() || worst > 1e-4 {
            return Err(self.err(format!(
                "self-test: GEMM + softmax differ from the host by {worst:e} (limit 1e-4)"
            )));
        }
        Ok(())
    }

    fn err(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Backend {
            backend: self.label.clone(),
            reason: reason.into(),
        }
    }

    fn float(&self, t: BurnTensor, what: &str) -> Result<(Tensor<4>, usize)> {
        match t {
            BurnTensor::Float { t, rank } => Ok((t, rank)),
            BurnTensor::Int { .. } => Err(self.err(format!("{what}: expected a float tensor"))),
        }
    }

    fn int(&self, t: BurnTensor, what: &str) -> Result<(Tensor<2, Int>, Vec<usize>)> {
        match t {
            BurnTensor::Int { t, shape } => Ok((t, shape)),
            BurnTensor::Float { .. } => Err(self.err(format!("{what}: expected an int tensor"))),
        }
    }

    /// Cumulative offsets `[0, l0, l0 + l1, ...]` from a packed batch's `[sequences]` lengths.
    fn lengths(&self, t: BurnTensor) -> Result<Vec<usize>> {
        let HostData::I64(lens) = self.download(t)?.data else {
            return Err(self.err("sequence lengths must be I64"));
        };
        cumulative(&lens).ok_or_else(|| self.err("negative sequence length"))
    }

    /// Pooling of a packed `[1, tokens, h]` batch: one slice per sequence.
    fn pool_packed(
        &self,
        x: BurnTensor,
        lengths: BurnTensor,
        mode: PoolMode,
    ) -> Result<BurnTensor> {
        let (x, _) = self.float(x, "pool input")?;
        let [_, b, s, h] = x.dims();
        let cu = self.lengths(lengths)?;
        if b != 1 || cu.last() != Some(&s) || cu.windows(2).any(|w| w[1] == w[0]) {
            return Err(self.err("pool: sequence lengths do not tile the packed batch"));
        }
        let x: Tensor<2> = x.reshape([s, h]);
        let rows: Vec<Tensor<2>> = cu
            .windows(2)
            .map(|w| {
                let seg = x.clone().slice([w[0]..w[1], 0..h]);
                match mode {
                    PoolMode::Cls => seg.slice([0..1, 0..h]),
                    PoolMode::Last => seg.slice([w[1] - w[0] - 1..w[1] - w[0], 0..h]),
                    PoolMode::Mean => seg.mean_dim(0),
                    PoolMode::Max => seg.max_dim(0),
                }
            })
            .collect();
        Ok(BurnTensor::Float {
            t: Tensor::cat(rows, 0).unsqueeze_dims::<4>(&[0, 0]),
            rank: 2,
        })
    }

    /// The attention selector's view of an `sdpa` call (shapes from the tensors, the mask kind
    /// from the argument).
    fn sdpa_problem(
        &self,
        q: &BurnTensor,
        k: &BurnTensor,
        mask: &SdpaMaskArg<BurnTensor>,
    ) -> Result<kiln_attention::ProblemSummary> {
        use kiln_attention::{MaskKind, ProblemSummary, SdpaShape};
        let (BurnTensor::Float { t: q, .. }, BurnTensor::Float { t: k, .. }) = (q, k) else {
            return Err(self.err("sdpa: q and k must be float tensors"));
        };
        let (mask, varlen) = match mask {
            SdpaMaskArg::None => (MaskKind::None, false),
            SdpaMaskArg::KeyPadding(_) => (MaskKind::KeyPadding, false),
            SdpaMaskArg::Causal => (MaskKind::CausalTopLeft, false),
            SdpaMaskArg::Varlen(_) => (MaskKind::None, true),
            SdpaMaskArg::VarlenCausal(_) => (MaskKind::CausalTopLeft, true),
        };
        Ok(ProblemSummary {
            shape: SdpaShape::of(q.dims(), k.dims()),
            mask,
            varlen,
        })
    }

    fn vec1(&self, t: BurnTensor, what: &str) -> Result<Tensor<1>> {
        let (t, _) = self.float(t, what)?;
        let n = t.dims()[3];
        Ok(t.reshape([n]))
    }

    fn data_f32(&self, t: Tensor<4>) -> Result<Vec<f32>> {
        t.into_data()
            .try_into_vec::<f32>()
            .map_err(|e| self.err(format!("download: {e:?}")))
    }
}

impl Backend for BurnBackend {
    type Tensor = BurnTensor;

    fn name(&self) -> String {
        self.label.clone()
    }

    fn compile_target(&self) -> CompileTarget {
        CompileTarget {
            linear_formats: vec![WeightFormat::F32InOut, WeightFormat::Plain],
        }
    }

    fn device_facts(&self) -> Vec<(String, String)> {
        if let Some(adapter) = self.adapter {
            let mut facts = vec![("backend".into(), "wgpu".to_string())];
            facts.extend(adapter.facts());
            return facts;
        }
        // burn-flex runs on this CPU.
        let caps = CpuCaps::detect();
        vec![
            ("backend".into(), self.name()),
            ("arch".into(), caps.arch.into()),
            ("cpu_features".into(), caps.feature_names().join(",")),
        ]
    }

    fn upload_stored(&self, t: &StoredTensor) -> Result<BurnTensor> {
        match (t.format, t.dtype) {
            (WeightFormat::Plain, _) => self.upload(&t.to_host()?, t.role),
            (WeightFormat::F32InOut, DType::F32) => {
                let buf = t.buffer("data")?;
                buf.check()?;
                let (Some(v), ElemType::F32, &[inn, out]) =
                    (buf.bytes.as_f32(), buf.elem, &buf.shape[..])
                else {
                    return Err(self.err("an [in, out] weight must be 2-D f32"));
                };
                let data = TensorData::new(v.to_vec(), [1, 1, inn, out]);
                Ok(BurnTensor::Float {
                    t: Tensor::<4>::from_data(data, &self.device),
                    rank: 2,
                })
            }
            (format, dtype) => Err(self.err(format!("cannot upload a {format} {dtype:?} tensor"))),
        }
    }

    fn upload(&self, t: &HostTensor, role: ConstRole) -> Result<BurnTensor> {
        if t.shape.len() > 4 || t.shape.is_empty() {
            return Err(self.err(format!("rank {} is not supported", t.shape.len())));
        }
        match &t.data {
            HostData::F32(v) => {
                // burn's linear wants `[in, out]`; transpose the HF `[out, in]` once here.
                let (shape, data) = match (role, &t.shape[..]) {
                    (ConstRole::LinearWeight, &[out, inn]) => {
                        (vec![inn, out], super::transpose(v, out, inn))
                    }
                    _ => (t.shape.clone(), v.clone()),
                };
                let data = TensorData::new(data, pad4(&shape).to_vec());
                Ok(BurnTensor::Float {
                    t: Tensor::<4>::from_data(data, &self.device),
                    rank: shape.len(),
                })
            }
            HostData::I64(v) => {
                let cols = *t.shape.last().unwrap_or(&1);
                let rows = t.len() / cols.max(1);
                let data = TensorData::new(v.clone(), [rows, cols]);
                Ok(BurnTensor::Int {
                    t: Tensor::<2, Int>::from_data(data, &self.device),
                    shape: t.shape.clone(),
                })
            }
        }
    }

    fn download(&self, t: BurnTensor) -> Result<HostTensor> {
        match t {
            BurnTensor::Float { t, rank } => {
                let shape = logical(&t, rank);
                HostTensor::f32(shape, self.data_f32(t)?)
            }
            BurnTensor::Int { t, shape } => {
                let data = t
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .map_err(|e| self.err(format!("download: {e:?}")))?;
                HostTensor::i64(shape, data)
            }
        }
    }

    fn embedding(&self, table: BurnTensor, ids: BurnTensor) -> Result<BurnTensor> {
        let (table, _) = self.float(table, "embedding table")?;
        let (ids, shape) = self.int(ids, "embedding ids")?;
        if shape.len() != 2 {
            return Err(self.err(format!("embedding ids must be 2-D, got {shape:?}")));
        }
        let [_, _, vocab, hidden] = table.dims();
        let table: Tensor<2> = table.reshape([vocab, hidden]);
        let out = module::embedding(table, ids);
        Ok(BurnTensor::Float {
            t: out.unsqueeze_dim::<4>(0),
            rank: 3,
        })
    }

    fn linear(&self, x: BurnTensor, w: BurnTensor, b: Option<BurnTensor>) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "linear input")?;
        let (w, _) = self.float(w, "linear weight")?;
        let [_, _, inn, out] = w.dims();
        let w: Tensor<2> = w.reshape([inn, out]);
        let b = b.map(|b| self.vec1(b, "linear bias")).transpose()?;
        Ok(BurnTensor::Float {
            t: module::linear(x, w, b),
            rank,
        })
    }

    fn add(&self, a: BurnTensor, b: BurnTensor) -> Result<BurnTensor> {
        let (a, rank) = self.float(a, "add lhs")?;
        let (b, _) = self.float(b, "add rhs")?;
        Ok(BurnTensor::Float { t: a.add(b), rank })
    }

    fn layer_norm(
        &self,
        x: BurnTensor,
        g: BurnTensor,
        b: BurnTensor,
        eps: f32,
    ) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "layer_norm input")?;
        let g = self.vec1(g, "gamma")?;
        let b = self.vec1(b, "beta")?;
        Ok(BurnTensor::Float {
            t: module::layer_norm(x, g, Some(b), f64::from(eps)),
            rank,
        })
    }

    fn activation(&self, x: BurnTensor, act: Activation) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "activation input")?;
        let t = match act {
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Relu => activation::relu(x),
            Activation::Tanh => activation::tanh(x),
            Activation::Silu => activation::silu(x),
        };
        Ok(BurnTensor::Float { t, rank })
    }

    fn split_heads(&self, x: BurnTensor, heads: usize) -> Result<BurnTensor> {
        let (x, _) = self.float(x, "split_heads input")?;
        let [_, b, s, w] = x.dims();
        let t = x.reshape([b, s, heads, w / heads]).swap_dims(1, 2);
        Ok(BurnTensor::Float { t, rank: 4 })
    }

    fn merge_heads(&self, x: BurnTensor) -> Result<BurnTensor> {
        let (x, _) = self.float(x, "merge_heads input")?;
        let [b, h, s, d] = x.dims();
        let t = x.swap_dims(1, 2).reshape([1, b, s, h * d]);
        Ok(BurnTensor::Float { t, rank: 3 })
    }

    fn sdpa_plan(
        &self,
        problem: &kiln_attention::ProblemSummary,
        choice: KernelChoice,
    ) -> Result<(&'static str, String)> {
        if let Some(adapter) = self.adapter {
            let s = kiln_attention::select_gpu(problem, &adapter.sdpa_caps(), choice)?;
            return Ok((BurnAttention::from(s.kernel).name(), s.reason));
        }
        match choice {
            KernelChoice::Auto => Ok((
                "burn",
                "burn-tensor's attention on this device (force a kiln kernel with sdpa_kernel)"
                    .into(),
            )),
            KernelChoice::Force(_) => {
                let s = kiln_attention::select(problem, kiln_attention::Isa::detect(), choice)?;
                Ok((s.kernel.name(), format!("{} (on host copies)", s.reason)))
            }
        }
    }

    fn sdpa(
        &self,
        q: BurnTensor,
        k: BurnTensor,
        v: BurnTensor,
        mask: SdpaMaskArg<BurnTensor>,
        scale: Option<f32>,
        kernel: KernelChoice,
    ) -> Result<(BurnTensor, &'static str)> {
        let how = match (self.adapter, kernel) {
            (Some(adapter), choice) => {
                let problem = self.sdpa_problem(&q, &k, &mask)?;
                let s = kiln_attention::select_gpu(&problem, &adapter.sdpa_caps(), choice)?;
                BurnAttention::from(s.kernel)
            }
            (None, KernelChoice::Auto) => BurnAttention::Fused,
            (None, KernelChoice::Force(_)) => {
                // burn-flex has one attention path; forcing one of kiln's kernels runs that
                // kernel on host copies, so the override means the same thing on every backend.
                let cpu = CpuBackend::default();
                let host = |t: BurnTensor| -> Result<_> {
                    cpu.upload(&self.download(t)?, ConstRole::Other)
                };
                let mask = match mask {
                    SdpaMaskArg::KeyPadding(m) => SdpaMaskArg::KeyPadding(host(m)?),
                    SdpaMaskArg::None => SdpaMaskArg::None,
                    SdpaMaskArg::Causal => SdpaMaskArg::Causal,
                    SdpaMaskArg::Varlen(m) => SdpaMaskArg::Varlen(host(m)?),
                    SdpaMaskArg::VarlenCausal(m) => SdpaMaskArg::VarlenCausal(host(m)?),
                };
                let (out, ran) = cpu.sdpa(host(q)?, host(k)?, host(v)?, mask, scale, kernel)?;
                return Ok((self.upload(&cpu.download(out)?, ConstRole::Other)?, ran));
            }
        };
        let (q, _) = self.float(q, "q")?;
        let (mut k, _) = self.float(k, "k")?;
        let (mut v, _) = self.float(v, "v")?;
        let [b, hq, sq, _] = q.dims();
        let [_, hkv, sk, d] = k.dims();
        if hq != hkv {
            // burn's attention wants K/V with Q's head count: repeat each KV head.
            let group = hq / hkv;
            let rep = |t: Tensor<4>| -> Tensor<4> {
                t.unsqueeze_dim::<5>(2)
                    .expand([b, hkv, group, sk, d])
                    .reshape([b, hq, sk, d])
            };
            k = rep(k);
            v = rep(v);
        }
        let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
        let attend = |q, k, v, mask, causal| how.run(q, k, v, mask, causal, scale);
        let causal_varlen = matches!(mask, SdpaMaskArg::VarlenCausal(_));
        let t = match mask {
            SdpaMaskArg::Varlen(lengths) | SdpaMaskArg::VarlenCausal(lengths) => {
                // One attention call per sequence slice of the packed tokens.
                let cu = self.lengths(lengths)?;
                if b != 1 || cu.last() != Some(&sq) {
                    return Err(self.err("sdpa: sequence lengths do not tile the packed batch"));
                }
                let parts: Vec<Tensor<4>> = cu
                    .windows(2)
                    .map(|w| {
                        let r = |t: &Tensor<4>| t.clone().slice([0..1, 0..hq, w[0]..w[1], 0..d]);
                        attend(r(&q), r(&k), r(&v), None, causal_varlen)
                    })
                    .collect();
                Tensor::cat(parts, 2)
            }
            SdpaMaskArg::None => attend(q, k, v, None, false),
            SdpaMaskArg::Causal => attend(q, k, v, None, true),
            SdpaMaskArg::KeyPadding(m) => {
                let (m, _) = self.int(m, "key-padding mask")?;
                // burn: `true` = masked out, the opposite of PyTorch and kiln.
                let masked = m
                    .equal_elem(0)
                    .reshape([b, 1, 1, sk])
                    .expand([b, hq, sq, sk]);
                attend(q, k, v, Some(masked), false)
            }
        };
        Ok((BurnTensor::Float { t, rank: 4 }, how.name()))
    }

    fn pool(&self, x: BurnTensor, mask: BurnTensor, mode: PoolMode) -> Result<BurnTensor> {
        if matches!(&mask, BurnTensor::Int { shape, .. } if shape.len() == 1) {
            return self.pool_packed(x, mask, mode);
        }
        if mode == PoolMode::Last {
            // The last valid token of each row: lengths from the mask, one slice per row.
            let HostData::I64(m) = self.download(mask)?.data else {
                return Err(self.err("pool mask must be I64"));
            };
            let (x, _) = self.float(x, "pool input")?;
            let [_, b, s, h] = x.dims();
            let x: Tensor<3> = x.reshape([b, s, h]);
            let rows: Vec<Tensor<2>> = (0..b)
                .map(|r| {
                    let last = (0..s).rfind(|&i| m[r * s + i] != 0).unwrap_or(0);
                    x.clone()
                        .slice([r..r + 1, last..last + 1, 0..h])
                        .reshape([1, h])
                })
                .collect();
            return Ok(BurnTensor::Float {
                t: Tensor::cat(rows, 0).unsqueeze_dims::<4>(&[0, 0]),
                rank: 2,
            });
        }
        let (x, _) = self.float(x, "pool input")?;
        let (m, _) = self.int(mask, "pool mask")?;
        let [_, b, s, h] = x.dims();
        let x: Tensor<3> = x.reshape([b, s, h]);
        let t: Tensor<2> = match mode {
            PoolMode::Last => unreachable!("handled above"),
            PoolMode::Cls => x.slice([0..b, 0..1, 0..h]).reshape([b, h]),
            PoolMode::Mean => {
                let mf: Tensor<3> = m.float().reshape([b, s, 1]);
                let sum = x.mul(mf.clone()).sum_dim(1).reshape([b, h]);
                let count = mf.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
                sum.div(count)
            }
            PoolMode::Max => {
                let pad = m.equal_elem(0).reshape([b, s, 1]).expand([b, s, h]);
                x.mask_fill(pad, -1e9).max_dim(1).reshape([b, h])
            }
        };
        Ok(BurnTensor::Float {
            t: t.unsqueeze_dims::<4>(&[0, 0]),
            rank: 2,
        })
    }

    fn l2_normalize(&self, x: BurnTensor) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "l2_normalize input")?;
        let norm = x.clone().square().sum_dim(3).sqrt().clamp_min(1e-12);
        Ok(BurnTensor::Float {
            t: x.div(norm),
            rank,
        })
    }

    fn matmul(&self, a: BurnTensor, b: BurnTensor, transpose_b: bool) -> Result<BurnTensor> {
        let (a, rank) = self.float(a, "matmul lhs")?;
        let (b, _) = self.float(b, "matmul rhs")?;
        let b = if transpose_b { b.swap_dims(2, 3) } else { b };
        Ok(BurnTensor::Float {
            t: a.matmul(b),
            rank,
        })
    }

    fn scale(&self, x: BurnTensor, factor: f32) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "scale input")?;
        Ok(BurnTensor::Float {
            t: x.mul_scalar(factor),
            rank,
        })
    }

    fn causal_mask(&self, x: BurnTensor) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "causal_mask input")?;
        let above = above_diagonal(x.dims(), &self.device);
        Ok(BurnTensor::Float {
            t: x.mask_fill(above, f32::NEG_INFINITY),
            rank,
        })
    }

    fn slice_last(&self, x: BurnTensor, start: usize, len: usize) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "slice_last input")?;
        if start + len > x.dims()[3] || len == 0 {
            return Err(self.err(format!("slice_last: columns {start}..{}", start + len)));
        }
        Ok(BurnTensor::Float {
            t: x.narrow(3, start, len),
            rank,
        })
    }

    fn softmax(&self, x: BurnTensor) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "softmax input")?;
        Ok(BurnTensor::Float {
            t: activation::softmax(x, 3),
            rank,
        })
    }

    fn rms_norm(&self, x: BurnTensor, g: BurnTensor, eps: f32) -> Result<BurnTensor> {
        let (x, rank) = self.float(x, "rms_norm input")?;
        let g = self.vec1(g, "gamma")?;
        let h = g.dims()[0];
        let ms = x.clone().square().mean_dim(3);
        let t = x
            .div(ms.add_scalar(eps).sqrt())
            .mul(g.reshape([1, 1, 1, h]));
        Ok(BurnTensor::Float { t, rank })
    }

    fn mul(&self, a: BurnTensor, b: BurnTensor) -> Result<BurnTensor> {
        let (a, rank) = self.float(a, "mul lhs")?;
        let (b, _) = self.float(b, "mul rhs")?;
        Ok(BurnTensor::Float { t: a.mul(b), rank })
    }

    fn rope(&self, x: BurnTensor, cos: BurnTensor, sin: BurnTensor) -> Result<BurnTensor> {
        let (x, _) = self.float(x, "rope input")?;
        let (cos, _) = self.float(cos, "rope cos")?;
        let (sin, _) = self.float(sin, "rope sin")?;
        let [b, h, s, d] = x.dims();
        let [_, _, _, r] = cos.dims();
        // Tables are [1, b, s, r]: one row per token, shared by every head.
        let cos = cos.reshape([b, 1, s, r]);
        let sin = sin.reshape([b, 1, s, r]);
        let part = |lo: usize, hi: usize| x.clone().slice([0..b, 0..h, 0..s, lo..hi]);
        let (x1, x2) = (part(0, r), part(r, 2 * r));
        let mut parts = vec![
            x1.clone().mul(cos.clone()).sub(x2.clone().mul(sin.clone())),
            x2.mul(cos).add(x1.mul(sin)),
        ];
        if 2 * r < d {
            parts.push(part(2 * r, d));
        }
        Ok(BurnTensor::Float {
            t: Tensor::cat(parts, 3),
            rank: 4,
        })
    }

    fn kv_cache_alloc(&self, spec: &KvCacheSpec) -> Result<Box<KvStore>> {
        let rows = spec.num_blocks * spec.block_size;
        let width = spec.kv_heads * spec.head_dim;
        let layers = (0..spec.layers)
            .map(|_| {
                let z = || Tensor::<2>::zeros([rows, width], &self.device);
                (z(), z())
            })
            .collect();
        Ok(Box::new(BurnKvStore { layers }))
    }

    fn paged_sdpa(
        &self,
        q: BurnTensor,
        k: BurnTensor,
        v: BurnTensor,
        cache: &mut KvStore,
        spec: &KvCacheSpec,
        layer: usize,
        batch: &PagedBatch,
        scale: Option<f32>,
        _kernel: KernelChoice,
    ) -> Result<(BurnTensor, &'static str)> {
        let store = cache
            .downcast_mut::<BurnKvStore>()
            .ok_or_else(|| self.err("the KV cache was not allocated by this burn backend"))?;
        let (q, _) = self.float(q, "q")?;
        let (k, _) = self.float(k, "k")?;
        let (v, _) = self.float(v, "v")?;
        let [_, hq, tokens, d] = q.dims();
        let [_, hkv, _, _] = k.dims();
        if hkv != spec.kv_heads || d != spec.head_dim {
            return Err(self.err("paged_sdpa: k does not match the cache's heads or head_dim"));
        }
        let width = hkv * d;
        // Cache rows are slots (block · block_size + offset), each [kv_heads · head_dim].
        let rows = |t: Tensor<4>| -> Tensor<2> { t.swap_dims(1, 2).reshape([tokens, width]) };
        let (k_rows, v_rows) = (rows(k), rows(v));
        let (kc, vc) = &mut store.layers[layer];
        let slots = batch.slots(spec.block_size);
        // Write runs of consecutive slots with one slice assignment each.
        let mut t = 0;
        while t < tokens {
            let mut end = t + 1;
            while end < tokens && slots[end] == slots[end - 1] + 1 {
                end += 1;
            }
            let (s0, n) = (slots[t], end - t);
            *kc = kc.clone().slice_assign(
                [s0..s0 + n, 0..width],
                k_rows.clone().slice([t..end, 0..width]),
            );
            *vc = vc.clone().slice_assign(
                [s0..s0 + n, 0..width],
                v_rows.clone().slice([t..end, 0..width]),
            );
            t = end;
        }
        let options = AttentionModuleOptions {
            scale: scale.map(f64::from),
            softcap: None,
            is_causal: false,
        };
        let cu = batch.cu_seqlens_q();
        let mut outs = Vec::with_capacity(batch.sequences());
        for s in 0..batch.sequences() {
            let (q_len, ctx) = (batch.q_lens[s], batch.context_lens[s]);
            let idx: Vec<i64> = (0..ctx)
                .map(|p| {
                    let b = batch.block_tables[s][p / spec.block_size] as i64;
                    b * spec.block_size as i64 + (p % spec.block_size) as i64
                })
                .collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ctx]), &self.device);
            let context = |c: &Tensor<2>| -> Tensor<4> {
                let t = c
                    .clone()
                    .select(0, idx.clone())
                    .reshape([1, ctx, hkv, d])
                    .swap_dims(1, 2);
                if hq == hkv {
                    t
                } else {
                    t.unsqueeze_dim::<5>(2)
                        .expand([1, hkv, hq / hkv, ctx, d])
                        .reshape([1, hq, ctx, d])
                }
            };
            let (ks, vs) = (context(kc), context(vc));
            let qs = q.clone().slice([0..1, 0..hq, cu[s]..cu[s + 1], 0..d]);
            // burn: `true` = masked. Bottom-right: query i sees keys 0..=i + ctx - q_len.
            let masked: Vec<bool> = (0..q_len)
                .flat_map(|i| (0..ctx).map(move |j| j > i + ctx - q_len))
                .collect();
            let mask = Tensor::<4, Bool>::from_data(
                TensorData::new(masked, [1, 1, q_len, ctx]),
                &self.device,
            )
            .expand([1, hq, q_len, ctx]);
            outs.push(module::attention(qs, ks, vs, Some(mask), None, options));
        }
        Ok((
            BurnTensor::Float {
                t: Tensor::cat(outs, 2),
                rank: 4,
            },
            "burn",
        ))
    }
}

/// `[b, h, sq, sk]` true strictly above the top-left diagonal: the keys a causal query may not
/// see, in burn's convention (`true` = masked out).
fn above_diagonal(dims: [usize; 4], device: &Device) -> Tensor<4, Bool> {
    let [b, h, sq, sk] = dims;
    Tensor::<2, Bool>::tril_mask([sq, sk], 0, device)
        .reshape([1, 1, sq, sk])
        .expand([b, h, sq, sk])
}

/// How [`BurnBackend::sdpa`] computes attention on one (sequence slice of a) batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BurnAttention {
    /// burn's fused attention (`module::attention`): flash kernels on a CubeCL device, burn's
    /// own tiled path on flex.
    Fused,
    /// Scores materialised with burn ops: `softmax(mask(Q·Kᵀ·scale))·V`.
    Math,
}

impl From<kiln_attention::Kernel> for BurnAttention {
    fn from(k: kiln_attention::Kernel) -> Self {
        match k {
            kiln_attention::Kernel::Flash => BurnAttention::Fused,
            // The GPU selector never returns mem_efficient (it refuses it).
            _ => BurnAttention::Math,
        }
    }
}

impl BurnAttention {
    /// The kernel name logs and the per-kernel metric report.
    fn name(self) -> &'static str {
        match self {
            BurnAttention::Fused => "burn-flash",
            BurnAttention::Math => "burn-math",
        }
    }

    /// `q`, `k`, `v` are `[b, h, s, d]` with equal head counts; `masked` is burn's convention
    /// (`true` = masked out); `causal` is top-left.
    fn run(
        self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        masked: Option<Tensor<4, Bool>>,
        causal: bool,
        scale: f32,
    ) -> Tensor<4> {
        let [b, h, sq, d] = q.dims();
        let sk = k.dims()[2];
        match self {
            BurnAttention::Fused => {
                // A custom scale forces burn's unfused path: fold it into Q and let burn apply
                // its default 1/sqrt(d).
                let default = 1.0 / (d as f32).sqrt();
                let q = if (scale - default).abs() > f32::EPSILON * default {
                    q.mul_scalar(scale / default)
                } else {
                    q
                };
                // burn's `is_causal` aligns the diagonal bottom-right when `q_len != kv_len`
                // (measured: the top-left fixture is off by 2.2); kiln's `Causal` is top-left,
                // so a rectangular causal mask goes in as an explicit mask.
                let (masked, is_causal) = if causal && sq != sk {
                    let above = above_diagonal([b, h, sq, sk], &q.device());
                    (
                        Some(masked.map_or(above.clone(), |m| m.bool_or(above))),
                        false,
                    )
                } else {
                    (masked, causal)
                };
                let options = AttentionModuleOptions {
                    scale: None,
                    softcap: None,
                    is_causal,
                };
                module::attention(q, k, v, masked, None, options)
            }
            BurnAttention::Math => {
                let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
                if causal {
                    let above = above_diagonal([b, h, sq, sk], &scores.device());
                    scores = scores.mask_fill(above, f32::NEG_INFINITY);
                }
                if let Some(m) = masked {
                    scores = scores.mask_fill(m, f32::NEG_INFINITY);
                }
                activation::softmax(scores, 3).matmul(v)
            }
        }
    }
}

/// burn's KV cache: per layer, keys and values as `[slots, kv_heads · head_dim]` tensors on the
/// device (slot = block · block_size + offset).
struct BurnKvStore {
    layers: Vec<(Tensor<2>, Tensor<2>)>,
}
