//! Constant folding: an op whose inputs are all (uncompiled) constants is evaluated once, here,
//! on the CPU backend, and replaced by its result. A folded value that feeds a linear's weight
//! slot becomes a linear weight constant, so later passes can pack it.

use std::sync::Arc;

use super::Context;
use super::rewrite::{Rewriter, Uses};
use crate::backend::CpuBackend;
use crate::error::Result;
use crate::exec::{ExecOptions, Plan};
use crate::ir::{ConstRole, Graph, GraphBuilder, Op};

/// Results larger than this (in elements) are not folded: a big constant costs more memory and
/// plan-cache space than computing it per run saves.
const MAX_FOLDED_ELEMS: usize = 1 << 24;

fn foldable(op: &Op) -> bool {
    !matches!(
        op,
        Op::Input { .. } | Op::Constant { .. } | Op::Weight { .. }
    )
}

/// Evaluates node `i` of `g`, whose inputs are all constants.
fn evaluate(g: &Graph, i: usize) -> Result<crate::tensor::HostTensor> {
    let node = &g.nodes[i];
    let mut b = GraphBuilder::new();
    let mut inputs = Vec::new();
    for v in &node.inputs {
        let c = &g.nodes[v.0];
        inputs.push(b.push(c.op.clone(), &[], c.label.clone())?);
    }
    let out = b.push(node.op.clone(), &inputs, node.label.clone())?;
    let mini = b.finish(vec![("out".into(), out)])?;
    let plan = Plan::new(mini, CpuBackend::new(1), ExecOptions::default())?;
    Ok(plan.run(&[])?.remove(0).1)
}

pub(crate) fn run(g: Graph, _: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let uses = Uses::of(&g);
    // Which nodes fold: all inputs constants (or folded earlier), fixed result not too big.
    let mut constant = vec![false; g.nodes.len()];
    let mut fold = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        constant[i] = matches!(node.op, Op::Constant { .. });
        if foldable(&node.op)
            && !node.inputs.is_empty()
            && node.inputs.iter().all(|v| constant[v.0])
            && node
                .ty
                .fixed_shape()
                .is_some_and(|s| s.iter().product::<usize>() <= MAX_FOLDED_ELEMS)
        {
            constant[i] = true;
            fold[i] = true;
        }
    }
    let mut r = Rewriter::new(&g);
    let mut folded = Vec::new();
    // Values are evaluated on a copy of the graph where folded nodes became constants.
    let mut work = g.clone();
    for (i, &folded_here) in fold.iter().enumerate() {
        if !folded_here {
            r.copy(i)?;
            continue;
        }
        let value = evaluate(&work, i)?;
        let weight_slot = uses.readers[i].iter().any(|&(reader, pos)| {
            pos == 1 && matches!(g.nodes[reader].op, Op::Linear | Op::LinearAct { .. })
        });
        let role = if weight_slot {
            ConstRole::LinearWeight
        } else {
            ConstRole::Other
        };
        let label = g.nodes[i].label.clone();
        let op = Op::Constant {
            name: label.clone(),
            value: Arc::new(value),
            role,
        };
        work.nodes[i].op = op.clone();
        work.nodes[i].inputs.clear();
        let id = r.push(op, &[], label.clone())?;
        r.set(i, id);
        folded.push(format!("{label} ({})", g.nodes[i].op.name()));
    }
    let notes = if folded.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "folded {} ops: {}",
            folded.len(),
            folded.join(", ")
        )]
    };
    Ok((r.finish()?, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{DType, Dim};

    #[test]
    fn constant_subgraphs_become_one_constant() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Fixed(4)])
            .unwrap();
        // A weight computed from constants: folded into a linear weight.
        let w0 = g
            .constant("w0", tensor(&[3, 4], 3), ConstRole::Other)
            .unwrap();
        let w = g.push(Op::Scale { factor: 0.5 }, &[w0], "w").unwrap();
        let wide = g.push(Op::Linear, &[x, w], "lin").unwrap();
        let out_bias = g.constant("c", tensor(&[3], 4), ConstRole::Other).unwrap();
        let y = g.push(Op::Linear, &[x, w, out_bias], "lin2").unwrap();
        let both = g.push(Op::Add, &[wide, y], "sum").unwrap();
        let graph = g.finish(vec![("out".into(), both)]).unwrap();
        // `w` is a Scale of a non-weight constant: as built, the linear cannot run it, since it
        // is not a packed weight. Folding makes it one.
        let (out, notes) = ctx_run(run, graph);
        assert_eq!(count(&out, "scale"), 0);
        assert!(notes[0].starts_with("folded 1 ops: w (scale)"), "{notes:?}");
        let feeds = vec![("x".to_string(), tensor(&[2, 4], 5))];
        let got = eval(&out, &feeds);
        // Reference by hand: y = x·(w0/2)ᵀ twice plus the bias.
        let xs = tensor(&[2, 4], 5).into_f32().unwrap();
        let w0 = tensor(&[3, 4], 3).into_f32().unwrap();
        let c = tensor(&[3], 4).into_f32().unwrap();
        for r in 0..2 {
            for o in 0..3 {
                let dot: f32 = (0..4).map(|k| xs[r * 4 + k] * w0[o * 4 + k] * 0.5).sum();
                let want = 2.0 * dot + c[o];
                assert!((got[r * 3 + o] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn ops_reading_inputs_are_left_alone() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Fixed(4)])
            .unwrap();
        let s = g.push(Op::Scale { factor: 3.0 }, &[x], "s").unwrap();
        let graph = g.finish(vec![("out".into(), s)]).unwrap();
        let (out, notes) = ctx_run(run, graph);
        assert_eq!(count(&out, "scale"), 1);
        assert!(notes.is_empty());
    }
}
