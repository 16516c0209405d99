//! Residual add + LayerNorm: an `Add` whose only reader is a LayerNorm (as its input) becomes
//! one `AddLayerNorm`, which adds and normalises each row in one pass while the row is in
//! cache, instead of a full pass over the activations for the add and another for the norm.

use super::Context;
use super::rewrite::{Rewriter, Uses};
use crate::error::Result;
use crate::ir::{Graph, Op};

pub(crate) fn run(g: Graph, _: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let uses = Uses::of(&g);
    let mut fuse = vec![None; g.nodes.len()];
    let mut absorbed = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        if matches!(node.op, Op::Add)
            && let Some((reader, 0)) = uses.sole_reader(i)
            && matches!(g.nodes[reader].op, Op::LayerNorm { .. })
        {
            fuse[reader] = Some(i);
            absorbed[i] = true;
        }
    }
    let mut r = Rewriter::new(&g);
    let mut fused = Vec::new();
    for i in 0..g.nodes.len() {
        if absorbed[i] {
            continue;
        }
        match (fuse[i], &g.nodes[i].op) {
            (Some(add), Op::LayerNorm { eps }) => {
                let ins = &g.nodes[add].inputs;
                let norm = &g.nodes[i].inputs;
                let inputs = [ins[0], ins[1], norm[1], norm[2]]
                    .iter()
                    .map(|v| r.map(*v))
                    .collect::<Result<Vec<_>>>()?;
                let id = r.push(
                    Op::AddLayerNorm { eps: *eps },
                    &inputs,
                    g.nodes[i].label.clone(),
                )?;
                r.set(i, id);
                fused.push(g.nodes[i].label.clone());
            }
            _ => {
                r.copy(i)?;
            }
        }
    }
    let notes = if fused.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "fused {} residual add + layer_norm pairs (e.g. {})",
            fused.len(),
            fused[0]
        )]
    };
    Ok((r.finish()?, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{ConstRole, DType, Dim, GraphBuilder};

    fn graph(add_is_output: bool) -> crate::ir::Graph {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(5)])
            .unwrap();
        let r = g
            .input("r", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(5)])
            .unwrap();
        let gamma = g.constant("g", tensor(&[5], 1), ConstRole::Other).unwrap();
        let beta = g.constant("b", tensor(&[5], 2), ConstRole::Other).unwrap();
        let s = g.push(Op::Add, &[x, r], "residual").unwrap();
        let n = g
            .push(Op::LayerNorm { eps: 1e-12 }, &[s, gamma, beta], "ln")
            .unwrap();
        let mut outputs = vec![("out".to_string(), n)];
        if add_is_output {
            outputs.push(("sum".to_string(), s));
        }
        g.finish(outputs).unwrap()
    }

    #[test]
    fn residual_add_then_norm_fuses_bit_identically() {
        let graph = graph(false);
        let (out, notes) = ctx_run(run, graph.clone());
        assert_eq!(count(&out, "add_layer_norm"), 1);
        assert_eq!(count(&out, "add") + count(&out, "layer_norm"), 0);
        assert!(notes[0].starts_with("fused 1 residual add"));
        let feeds = vec![
            ("x".to_string(), tensor(&[2, 3, 5], 3)),
            ("r".to_string(), tensor(&[2, 3, 5], 4)),
        ];
        assert_eq!(eval(&graph, &feeds), eval(&out, &feeds));
    }

    #[test]
    fn an_add_that_is_also_an_output_stays() {
        let (out, notes) = ctx_run(run, graph(true));
        assert_eq!(count(&out, "add_layer_norm"), 0);
        assert!(notes.is_empty());
    }
}
