//! Weight pre-packing: every constant becomes a stored tensor in the format kernel selection
//! chose — a linear weight transposed to `[in, out]` for the f32 GEMM, everything else as it is.
//! The plan cache writes these bytes as they are and maps them back, so a warm start neither
//! decodes nor re-packs a weight. (With kernel selection off, linear weights stay `Plain` and the
//! backend packs them at upload, as for an uncompiled graph.)

use std::sync::Arc;

use super::Context;
use super::rewrite::Rewriter;
use crate::error::{Result, graph_err};
use crate::ir::{ConstRole, Graph, Op};
use crate::kernels::panel_gemm;
use crate::storage::{Blob, Buffer, ElemType, StoredTensor, WeightFormat};
use crate::tensor::{HostData, HostTensor};

/// `value` in `format`.
pub fn pack(value: &HostTensor, role: ConstRole, format: WeightFormat) -> Result<StoredTensor> {
    match format {
        WeightFormat::Plain => Ok(StoredTensor::plain(value, role)),
        WeightFormat::Int8PerChannel => {
            let (HostData::F32(v), &[out, inn]) = (&value.data, &value.shape[..]) else {
                return Err(graph_err(format!(
                    "an int8 weight must be 2-D f32, got {:?} {:?}",
                    value.dtype(),
                    value.shape
                )));
            };
            let (q, scales) = kiln_quant::int8::quantize_weights(v, out, inn);
            let q_bytes: Vec<u8> = q.iter().map(|&x| x as u8).collect();
            Ok(StoredTensor {
                dtype: value.dtype(),
                shape: value.shape.clone(),
                role,
                format,
                buffers: vec![
                    Buffer {
                        name: "q".into(),
                        elem: ElemType::I8,
                        shape: vec![out, inn],
                        bytes: Blob::from_bytes(&q_bytes),
                    },
                    Buffer::f32("scales", vec![out], scales),
                ],
            })
        }
        WeightFormat::F32InOut | WeightFormat::F32Panels16 => {
            let (HostData::F32(v), &[out, inn]) = (&value.data, &value.shape[..]) else {
                return Err(graph_err(format!(
                    "a {format} weight must be 2-D f32, got {:?} {:?}",
                    value.dtype(),
                    value.shape
                )));
            };
            let (shape, data) = match format {
                WeightFormat::F32InOut => (vec![inn, out], crate::backend::transpose(v, out, inn)),
                _ => (
                    vec![out.div_ceil(panel_gemm::NR), inn, panel_gemm::NR],
                    panel_gemm::pack(v, out, inn),
                ),
            };
            Ok(StoredTensor {
                dtype: value.dtype(),
                shape: value.shape.clone(),
                role,
                format,
                buffers: vec![Buffer::f32("data", shape, data)],
            })
        }
    }
}

pub(crate) fn run(g: Graph, cx: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let mut r = Rewriter::new(&g);
    let (mut packed, mut packed_bytes, mut plain, mut plain_bytes) = (0, 0, 0, 0);
    for (i, node) in g.nodes.iter().enumerate() {
        let Op::Constant { name, value, role } = &node.op else {
            r.copy(i)?;
            continue;
        };
        let format = cx.formats.get(&i).copied().unwrap_or(WeightFormat::Plain);
        let weight = pack(value, *role, format)?;
        if format == WeightFormat::Plain {
            plain += 1;
            plain_bytes += weight.nbytes();
        } else {
            packed += 1;
            packed_bytes += weight.nbytes();
        }
        let op = Op::Weight {
            name: name.clone(),
            weight: Arc::new(weight),
        };
        let id = r.push(op, &[], node.label.clone())?;
        r.set(i, id);
    }
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let notes = vec![format!(
        "packed {packed} linear weights ({:.1} MiB); stored {plain} other constants as they are \
         ({:.1} MiB)",
        mib(packed_bytes),
        mib(plain_bytes)
    )];
    Ok((r.finish()?, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{DType, Dim, GraphBuilder};

    #[test]
    fn constants_become_stored_weights_in_their_formats() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Fixed(3)])
            .unwrap();
        let w = g
            .constant("w", tensor(&[2, 3], 1), ConstRole::LinearWeight)
            .unwrap();
        let b = g.constant("b", tensor(&[2], 2), ConstRole::Other).unwrap();
        let y = g.push(Op::Linear, &[x, w, b], "lin").unwrap();
        let graph = g.finish(vec![("out".into(), y)]).unwrap();
        // Kernel selection first (it chooses the formats), then packing.
        let target = crate::backend::Backend::compile_target(&crate::backend::CpuBackend::new(1));
        let mut cx = super::super::Context::for_tests(&target);
        let (kernel_g, _) = super::super::kernels::run(graph.clone(), &mut cx).unwrap();
        let (out, notes) = run(kernel_g, &mut cx).unwrap();
        assert_eq!(count(&out, "constant"), 0);
        assert_eq!(count(&out, "weight"), 2);
        assert!(notes[0].starts_with("packed 1 linear weights"), "{notes:?}");
        let Op::Weight { weight, .. } = &out.nodes[1].op else {
            panic!("node 1 is the weight")
        };
        assert_eq!(weight.format, target.linear_formats[0]);
        let stored = weight.buffer("data").unwrap();
        let w = tensor(&[2, 3], 1).into_f32().unwrap();
        let (shape, want) = match weight.format {
            WeightFormat::F32Panels16 => (vec![1, 3, 16], panel_gemm::pack(&w, 2, 3)),
            _ => (vec![3, 2], crate::backend::transpose(&w, 2, 3)),
        };
        assert_eq!(stored.shape, shape);
        assert_eq!(stored.bytes.as_f32().unwrap(), &want[..]);
        let feeds = vec![("x".to_string(), tensor(&[4, 3], 3))];
        assert_eq!(eval(&graph, &feeds), eval(&out, &feeds));
    }

    #[test]
    fn an_int8_weight_is_stored_as_s8_per_channel_with_its_scales() {
        let w = tensor(&[5, 7], 4);
        let stored = pack(&w, ConstRole::LinearWeight, WeightFormat::Int8PerChannel).unwrap();
        assert_eq!(stored.shape, [5, 7], "the logical shape stays [out, in]");
        let (q, scales) = kiln_quant::int8::quantize_weights(&w.clone().into_f32().unwrap(), 5, 7);
        let qb = stored.buffer("q").unwrap();
        qb.check().unwrap();
        assert_eq!(
            (qb.elem, qb.shape.as_slice()),
            (ElemType::I8, &[5usize, 7][..])
        );
        let got: Vec<i8> = qb.bytes.as_bytes().iter().map(|&b| b as i8).collect();
        assert_eq!(got, q);
        let sb = stored.buffer("scales").unwrap();
        assert_eq!(sb.bytes.as_f32().unwrap(), &scales[..]);
        // Anything but a 2-D f32 weight is refused.
        let ids = crate::tensor::HostTensor::i64(vec![2], vec![1, 2]).unwrap();
        assert!(pack(&ids, ConstRole::LinearWeight, WeightFormat::Int8PerChannel).is_err());
    }
}
