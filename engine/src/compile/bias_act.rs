//! Bias + activation as the GEMM's epilogue: a `Linear` whose only reader is an activation
//! becomes one `LinearAct`. The CPU backend writes the bias into the output before the GEMM
//! adds onto it and applies the (vectorised) activation to the output right after, so the
//! separate activation op, its dispatch and its extra buffer hand-off disappear.

use super::Context;
use super::rewrite::{Rewriter, Uses};
use crate::error::Result;
use crate::ir::{Graph, Op};

pub(crate) fn run(g: Graph, _: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let uses = Uses::of(&g);
    // activation node → the linear it absorbs
    let mut fuse = vec![None; g.nodes.len()];
    let mut absorbed = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        if matches!(node.op, Op::Linear)
            && let Some((reader, _)) = uses.sole_reader(i)
            && matches!(g.nodes[reader].op, Op::Activation(_))
        {
            fuse[reader] = Some(i);
            absorbed[i] = true;
        }
    }
    let mut r = Rewriter::new(&g);
    let mut fused = 0;
    for i in 0..g.nodes.len() {
        if absorbed[i] {
            continue; // emitted with its activation
        }
        match (fuse[i], &g.nodes[i].op) {
            (Some(lin), Op::Activation(act)) => {
                let inputs = g.nodes[lin]
                    .inputs
                    .iter()
                    .map(|v| r.map(*v))
                    .collect::<Result<Vec<_>>>()?;
                let id = r.push(
                    Op::LinearAct { act: *act },
                    &inputs,
                    g.nodes[lin].label.clone(),
                )?;
                r.set(i, id);
                fused += 1;
            }
            _ => {
                r.copy(i)?;
            }
        }
    }
    let notes = if fused > 0 {
        vec![format!(
            "fused {fused} linear + activation pairs into linear_act"
        )]
    } else {
        Vec::new()
    };
    Ok((r.finish()?, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{Activation, ConstRole, DType, Dim, GraphBuilder};

    #[test]
    fn a_linear_read_only_by_its_activation_fuses() {
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Relu,
            Activation::Silu,
        ] {
            let mut g = GraphBuilder::new();
            let x = g
                .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(6)])
                .unwrap();
            let w = g
                .constant("w", tensor(&[10, 6], 1), ConstRole::LinearWeight)
                .unwrap();
            let b = g.constant("b", tensor(&[10], 2), ConstRole::Other).unwrap();
            let y = g.push(Op::Linear, &[x, w, b], "up").unwrap();
            let a = g.push(Op::Activation(act), &[y], "act").unwrap();
            let graph = g.finish(vec![("out".into(), a)]).unwrap();
            let (out, notes) = ctx_run(run, graph.clone());
            assert_eq!(count(&out, "linear_act"), 1);
            assert_eq!(count(&out, "activation") + count(&out, "linear"), 0);
            assert_eq!(
                notes,
                vec!["fused 1 linear + activation pairs into linear_act"]
            );
            let feeds = vec![("x".to_string(), tensor(&[2, 3, 6], 3))];
            assert_eq!(
                eval(&graph, &feeds),
                eval(&out, &feeds),
                "{act:?}: bit-identical"
            );
        }
    }

    #[test]
    fn a_linear_with_other_readers_or_an_output_stays() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Fixed(6)])
            .unwrap();
        let w = g
            .constant("w", tensor(&[6, 6], 1), ConstRole::LinearWeight)
            .unwrap();
        let y = g.push(Op::Linear, &[x, w], "lin").unwrap();
        let a = g
            .push(Op::Activation(Activation::Relu), &[y], "act")
            .unwrap();
        let s = g.push(Op::Add, &[a, y], "sum").unwrap();
        let graph = g.finish(vec![("out".into(), s)]).unwrap();
        let (out, notes) = ctx_run(run, graph);
        assert_eq!(count(&out, "linear_act"), 0);
        assert!(notes.is_empty());
    }
}
