//! Projection merge: linears that read the same input (attention's query, key and value) become
//! one GEMM on their weights stacked along the output dimension. Head splits of a projection
//! read their heads straight out of the merged output (`SliceSplitHeads`); any other reader gets
//! a `SliceLast` copy of the projection's columns.
//!
//! Why: one `[m, 3h]` GEMM streams the input once instead of three times, and at small batches
//! (1×16) one call costs one thread hand-off instead of three. In an int8 plan it also
//! quantizes the shared input once instead of three times; members merge only when the
//! quantization options give them the same format (the merged node's label, `prefix{q,k,v}`,
//! names them, and [`crate::quantize::linear_formats`] resolves it through them).

use std::collections::HashMap;
use std::sync::Arc;

use super::Context;
use super::rewrite::{Rewriter, Uses, group_label};
use crate::error::Result;
use crate::ir::{ConstRole, Graph, Op, ValueId};
use crate::quantize::{LinearFormat, layer_format};
use crate::tensor::{HostData, HostTensor};

/// A linear this pass may merge: its weight (and bias, if any) are uncompiled f32 constants.
struct Member {
    node: usize,
    weight: Arc<HostTensor>,
    bias: Option<Arc<HostTensor>>,
    out: usize,
}

fn member(g: &Graph, i: usize) -> Option<Member> {
    let node = &g.nodes[i];
    if !matches!(node.op, Op::Linear) {
        return None;
    }
    let constant = |v: ValueId, want: ConstRole| match &g.nodes[v.0].op {
        Op::Constant { value, role, .. } if *role == want && value.as_f32().is_some() => {
            Some(value.clone())
        }
        _ => None,
    };
    let weight = constant(node.inputs[1], ConstRole::LinearWeight)?;
    let bias = match node.inputs.get(2) {
        Some(b) => Some(constant(*b, ConstRole::Other)?),
        None => None,
    };
    Some(Member {
        node: i,
        out: weight.shape[0],
        weight,
        bias,
    })
}

fn concat(parts: &[&HostTensor], shape: Vec<usize>) -> Result<HostTensor> {
    let mut data = Vec::with_capacity(shape.iter().product());
    for p in parts {
        if let HostData::F32(v) = &p.data {
            data.extend_from_slice(v);
        }
    }
    HostTensor::f32(shape, data)
}

/// Where a member projection's columns sit in its group's merged output.
#[derive(Clone, Copy)]
struct Columns {
    group: usize,
    start: usize,
    width: usize,
}

pub(crate) fn run(g: Graph, cx: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let uses = Uses::of(&g);
    // Group mergeable linears by (input, input width, has bias), in order of appearance.
    let mut groups: Vec<Vec<Member>> = Vec::new();
    let mut index: HashMap<(usize, usize, bool), usize> = HashMap::new();
    for i in 0..g.nodes.len() {
        if let Some(m) = member(&g, i) {
            let key = (g.nodes[i].inputs[0].0, m.weight.shape[1], m.bias.is_some());
            let gi = *index.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[gi].push(m);
        }
    }
    groups.retain(|gr| gr.len() >= 2);
    // In a quantized plan a merged linear runs in its members' format (int8 with one activation
    // quantization of the shared input, or bf16), so a group splits into members that agree
    // (Q and V merge when the layer filter keeps K in f32); a member whose format is an error
    // stays alone, for the `kernels` pass to report.
    if !cx.quant.is_f32() {
        let mut agreeing = Vec::new();
        for group in groups {
            let mut parts: Vec<(LinearFormat, Vec<Member>)> = Vec::new();
            for m in group {
                let Ok(f) = layer_format(&g.nodes[m.node].label, cx.quant) else {
                    continue;
                };
                match parts.iter_mut().find(|(pf, _)| *pf == f) {
                    Some((_, part)) => part.push(m),
                    None => parts.push((f, vec![m])),
                }
            }
            agreeing.extend(parts.into_iter().map(|(_, part)| part));
        }
        groups = agreeing;
        groups.retain(|gr| gr.len() >= 2);
    }
    // The merged GEMM goes where its group's first member was; each member becomes a column
    // slice of it, except that head splits of a member read their heads from it directly.
    let mut merge_at: HashMap<usize, usize> = HashMap::new();
    // Members, with whether a SliceLast copy is needed (some reader is not a head split).
    let mut members: HashMap<usize, (Columns, bool)> = HashMap::new();
    let mut splits: HashMap<usize, (Columns, usize)> = HashMap::new();
    for (gi, group) in groups.iter().enumerate() {
        merge_at.insert(group[0].node, gi);
        let mut start = 0;
        for m in group {
            let cols = Columns {
                group: gi,
                start,
                width: m.out,
            };
            // Head splits read their heads from the merged output; any other reader (or an
            // output) needs the member's own columns.
            let mut needs_copy = uses.is_output[m.node];
            for &(r, _) in &uses.readers[m.node] {
                match g.nodes[r].op {
                    Op::SplitHeads { heads } => {
                        splits.insert(r, (cols, heads));
                    }
                    _ => needs_copy = true,
                }
            }
            members.insert(m.node, (cols, needs_copy));
            start += m.out;
        }
    }

    let mut r = Rewriter::new(&g);
    let mut merged: Vec<Option<ValueId>> = vec![None; groups.len()];
    let mut notes = Vec::new();
    for i in 0..g.nodes.len() {
        if let Some(&gi) = merge_at.get(&i) {
            let (id, note) = emit_merged(&mut r, &g, &groups[gi])?;
            merged[gi] = Some(id);
            notes.push(note);
        }
        if let Some(&(cols, needs_copy)) = members.get(&i) {
            if needs_copy {
                let src = merged[cols.group].expect("merged at its first member");
                let op = Op::SliceLast {
                    start: cols.start,
                    len: cols.width,
                };
                let id = r.push(op, &[src], g.nodes[i].label.clone())?;
                r.set(i, id);
            }
        } else if let Some(&(cols, heads)) = splits.get(&i) {
            let src = merged[cols.group].expect("merged before its readers");
            let op = Op::SliceSplitHeads {
                heads,
                start: cols.start,
                width: cols.width,
            };
            let id = r.push(op, &[src], g.nodes[i].label.clone())?;
            r.set(i, id);
        } else {
            r.copy(i)?;
        }
    }
    Ok((r.finish()?, notes))
}

/// The merged linear of one group, on stacked weights and biases.
fn emit_merged(r: &mut Rewriter<'_>, g: &Graph, group: &[Member]) -> Result<(ValueId, String)> {
    let labels: Vec<&str> = group
        .iter()
        .map(|m| g.nodes[m.node].label.as_str())
        .collect();
    let label = group_label(&labels);
    let total: usize = group.iter().map(|m| m.out).sum();
    let inn = group[0].weight.shape[1];
    let w = concat(
        &group.iter().map(|m| &*m.weight).collect::<Vec<_>>(),
        vec![total, inn],
    )?;
    let name = format!("{label}.weight");
    let op = Op::Constant {
        name: name.clone(),
        value: Arc::new(w),
        role: ConstRole::LinearWeight,
    };
    let w = r.push(op, &[], name)?;
    let mut inputs = vec![r.map(g.nodes[group[0].node].inputs[0])?, w];
    if group[0].bias.is_some() {
        let parts: Vec<&HostTensor> = group.iter().filter_map(|m| m.bias.as_deref()).collect();
        let name = format!("{label}.bias");
        let op = Op::Constant {
            name: name.clone(),
            value: Arc::new(concat(&parts, vec![total])?),
            role: ConstRole::Other,
        };
        inputs.push(r.push(op, &[], name)?);
    }
    let id = r.push(Op::Linear, &inputs, label.clone())?;
    let widths: Vec<String> = group.iter().map(|m| m.out.to_string()).collect();
    let note = format!(
        "merged {} linears into one [{inn}→{total}] GEMM: {label} (widths {})",
        group.len(),
        widths.join("+")
    );
    Ok((id, note))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{AttnMask, DType, Dim, GraphBuilder};

    /// x → q, k, v linears → split heads → sdpa; plus an extra reader of v.
    fn attention_graph(extra_reader: bool) -> Graph {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(8)])
            .unwrap();
        let mut proj = Vec::new();
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let w = g
                .constant(
                    &format!("{name}.w"),
                    tensor(&[8, 8], 10 + i as u64),
                    ConstRole::LinearWeight,
                )
                .unwrap();
            let b = g
                .constant(
                    &format!("{name}.b"),
                    tensor(&[8], 20 + i as u64),
                    ConstRole::Other,
                )
                .unwrap();
            proj.push(
                g.push(Op::Linear, &[x, w, b], format!("attn.{name}"))
                    .unwrap(),
            );
        }
        let heads: Vec<ValueId> = proj
            .iter()
            .map(|&p| g.push(Op::SplitHeads { heads: 2 }, &[p], "split").unwrap())
            .collect();
        let a = g
            .push(
                Op::Sdpa {
                    mask: AttnMask::None,
                    scale: None,
                },
                &heads,
                "sdpa",
            )
            .unwrap();
        let mut out = g.push(Op::MergeHeads, &[a], "merge").unwrap();
        if extra_reader {
            out = g.push(Op::Add, &[out, proj[2]], "plus_v").unwrap();
        }
        g.finish(vec![("out".into(), out)]).unwrap()
    }

    #[test]
    fn q_k_v_become_one_gemm_read_by_head() {
        for extra in [false, true] {
            let graph = attention_graph(extra);
            let (out, notes) = ctx_run(run, graph.clone());
            assert_eq!(count(&out, "linear"), 1, "{notes:?}");
            assert_eq!(count(&out, "split_heads"), 0);
            assert_eq!(count(&out, "slice_split_heads"), 3);
            assert_eq!(
                count(&out, "slice_last"),
                usize::from(extra),
                "v's extra reader"
            );
            assert!(notes[0].contains("merged 3 linears into one [8→24] GEMM: attn.{q,k,v}"));
            let feeds = vec![("x".to_string(), tensor(&[2, 3, 8], 7))];
            let diff = max_diff(&eval(&graph, &feeds), &eval(&out, &feeds));
            assert!(diff <= 1e-6, "merged differs by {diff}");
        }
    }

    #[test]
    fn linears_on_different_inputs_or_without_constant_weights_stay() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Fixed(4)])
            .unwrap();
        let y = g
            .input("y", DType::F32, &[Dim::Batch, Dim::Fixed(4)])
            .unwrap();
        let w = g
            .constant("w", tensor(&[4, 4], 1), ConstRole::LinearWeight)
            .unwrap();
        let a = g.push(Op::Linear, &[x, w], "a").unwrap();
        let b = g.push(Op::Linear, &[y, w], "b").unwrap();
        let s = g.push(Op::Add, &[a, b], "s").unwrap();
        let graph = g.finish(vec![("out".into(), s)]).unwrap();
        let (out, notes) = ctx_run(run, graph);
        assert_eq!(count(&out, "linear"), 2);
        assert!(notes.is_empty());
    }
}
