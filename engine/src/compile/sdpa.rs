//! Attention pattern → `Sdpa`: graphs that spell attention out —
//! `softmax(q·kᵀ [· scale] [causal mask]) · v`, as exported or hand-written models do — get one
//! `Sdpa` node, so the attention selector's kernels (flash, memory-efficient, math) run it
//! instead of materialising the scores through two GEMMs and a softmax.
//!
//! Matched: `MatMul{transpose_b}` → optional `Scale` and `CausalMask` (either order) →
//! `Softmax` → `MatMul` with `v`, each intermediate read only by the next, `q`/`k`/`v` 4-D.
//! The scale becomes the node's explicit scale (1 when there is none). Other spellings (an
//! additive mask tensor, dropout) are left as they are.

use super::Context;
use super::rewrite::{Rewriter, Uses};
use crate::error::Result;
use crate::ir::{AttnMask, Graph, Op, ValueId};

/// A matched attention: the nodes it replaces and what the `Sdpa` node needs.
struct Match {
    q: ValueId,
    k: ValueId,
    v: ValueId,
    scale: f32,
    mask: AttnMask,
    /// The intermediate nodes (scores, scale, mask, softmax) the match removes.
    inner: Vec<usize>,
}

/// Matches the attention that ends in node `out` (the `p · v` product).
fn match_at(g: &Graph, uses: &Uses, out: usize) -> Option<Match> {
    let Op::MatMul { transpose_b: false } = g.nodes[out].op else {
        return None;
    };
    let (probs, v) = (g.nodes[out].inputs[0], g.nodes[out].inputs[1]);
    let single = |node: usize| uses.sole_reader(node).map(|(r, _)| r);
    if !matches!(g.nodes[probs.0].op, Op::Softmax) || single(probs.0) != Some(out) {
        return None;
    }
    let mut inner = vec![probs.0];
    let (mut reader, mut cur) = (probs.0, g.nodes[probs.0].inputs[0].0);
    let (mut scale, mut mask, mut scaled) = (1.0f32, AttnMask::None, false);
    // Walk up from the softmax through at most one Scale and one CausalMask to q·kᵀ.
    loop {
        if single(cur) != Some(reader) {
            return None;
        }
        inner.push(cur);
        match g.nodes[cur].op {
            Op::Scale { factor } if !scaled => {
                scaled = true;
                scale = factor;
            }
            Op::CausalMask if mask == AttnMask::None => mask = AttnMask::Causal,
            Op::MatMul { transpose_b: true } => break,
            _ => return None,
        }
        (reader, cur) = (cur, g.nodes[cur].inputs[0].0);
    }
    let (q, k) = (g.nodes[cur].inputs[0], g.nodes[cur].inputs[1]);
    let four_d = |x: ValueId| g.nodes[x.0].ty.dims.len() == 4;
    if !(four_d(q) && four_d(k) && four_d(v)) {
        return None;
    }
    Some(Match {
        q,
        k,
        v,
        scale,
        mask,
        inner,
    })
}

pub(crate) fn run(g: Graph, _: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let uses = Uses::of(&g);
    let mut matches: Vec<Option<Match>> = (0..g.nodes.len()).map(|_| None).collect();
    let mut removed = vec![false; g.nodes.len()];
    for (i, slot) in matches.iter_mut().enumerate() {
        if let Some(m) = match_at(&g, &uses, i) {
            // The `Sdpa` node must type-check (k and v alike, heads compatible); else leave it.
            let ty = |v: ValueId| &g.nodes[v.0].ty;
            let op = Op::Sdpa {
                mask: m.mask,
                scale: Some(m.scale),
            };
            if crate::ir::infer(&op, &[ty(m.q), ty(m.k), ty(m.v)]).is_err() {
                continue;
            }
            for &n in &m.inner {
                removed[n] = true;
            }
            *slot = Some(m);
        }
    }
    let mut r = Rewriter::new(&g);
    let mut notes = Vec::new();
    for i in 0..g.nodes.len() {
        if removed[i] {
            continue;
        }
        match &matches[i] {
            Some(m) => {
                let inputs = [r.map(m.q)?, r.map(m.k)?, r.map(m.v)?];
                let op = Op::Sdpa {
                    mask: m.mask,
                    scale: Some(m.scale),
                };
                let id = r.push(op, &inputs, g.nodes[i].label.clone())?;
                r.set(i, id);
                notes.push(format!(
                    "{}: {} ops → sdpa (scale {}, mask {:?})",
                    g.nodes[i].label,
                    m.inner.len() + 1,
                    m.scale,
                    m.mask
                ));
            }
            None => {
                r.copy(i)?;
            }
        }
    }
    Ok((r.finish()?, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{DType, Dim, GraphBuilder};

    fn spelled_out(scale: Option<f32>, causal: bool, mask_first: bool) -> Graph {
        let mut g = GraphBuilder::new();
        let dims = [Dim::Batch, Dim::Fixed(2), Dim::Seq, Dim::Fixed(4)];
        let q = g.input("q", DType::F32, &dims).unwrap();
        let k = g.input("k", DType::F32, &dims).unwrap();
        let v = g.input("v", DType::F32, &dims).unwrap();
        let mut s = g
            .push(Op::MatMul { transpose_b: true }, &[q, k], "scores")
            .unwrap();
        let scale_op = |g: &mut GraphBuilder, s| match scale {
            Some(f) => g.push(Op::Scale { factor: f }, &[s], "scaled").unwrap(),
            None => s,
        };
        let mask_op = |g: &mut GraphBuilder, s| {
            if causal {
                g.push(Op::CausalMask, &[s], "masked").unwrap()
            } else {
                s
            }
        };
        if mask_first {
            s = mask_op(&mut g, s);
            s = scale_op(&mut g, s);
        } else {
            s = scale_op(&mut g, s);
            s = mask_op(&mut g, s);
        }
        let p = g.push(Op::Softmax, &[s], "probs").unwrap();
        let o = g
            .push(Op::MatMul { transpose_b: false }, &[p, v], "attn")
            .unwrap();
        g.finish(vec![("out".into(), o)]).unwrap()
    }

    fn feeds() -> Vec<(String, crate::tensor::HostTensor)> {
        ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), tensor(&[2, 2, 5, 4], 30 + i as u64)))
            .collect()
    }

    #[test]
    fn spelled_out_attention_becomes_one_sdpa_node() {
        for (scale, causal, mask_first) in [
            (Some(0.5), false, false),
            (None, false, false),
            (Some(0.5), true, false),
            (Some(0.25), true, true),
        ] {
            let graph = spelled_out(scale, causal, mask_first);
            let (out, notes) = ctx_run(run, graph.clone());
            assert_eq!(count(&out, "sdpa"), 1, "{scale:?} {causal}");
            assert_eq!(count(&out, "matmul") + count(&out, "softmax"), 0);
            assert_eq!(notes.len(), 1);
            let diff = max_diff(&eval(&graph, &feeds()), &eval(&out, &feeds()));
            assert!(diff <= 1e-5, "{scale:?} causal {causal}: differs by {diff}");
            let Op::Sdpa { mask, scale: s } =
                out.nodes.iter().find(|n| n.op.name() == "sdpa").unwrap().op
            else {
                unreachable!()
            };
            assert_eq!(mask == AttnMask::Causal, causal);
            assert_eq!(s, Some(scale.unwrap_or(1.0)));
        }
    }

    #[test]
    fn scores_read_elsewhere_are_not_fused() {
        let mut g = GraphBuilder::new();
        let dims = [Dim::Batch, Dim::Fixed(2), Dim::Seq, Dim::Fixed(4)];
        let q = g.input("q", DType::F32, &dims).unwrap();
        let k = g.input("k", DType::F32, &dims).unwrap();
        let v = g.input("v", DType::F32, &dims).unwrap();
        let s = g
            .push(Op::MatMul { transpose_b: true }, &[q, k], "scores")
            .unwrap();
        let p = g.push(Op::Softmax, &[s], "probs").unwrap();
        let o = g
            .push(Op::MatMul { transpose_b: false }, &[p, v], "attn")
            .unwrap();
        // The probabilities are an output too (as when a model returns attention weights).
        let graph = g
            .finish(vec![("out".into(), o), ("probs".into(), p)])
            .unwrap();
        let (out, notes) = ctx_run(run, graph);
        assert_eq!(count(&out, "sdpa"), 0);
        assert!(notes.is_empty());
    }
}
