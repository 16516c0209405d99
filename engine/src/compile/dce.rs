//! Dead-code elimination: drops every node no graph output depends on (inputs stay, as the
//! graph's interface). Other passes leave their replaced nodes behind; this runs first, and
//! every rewrite also ends with the same pruning.

use super::Context;
use super::rewrite::prune;
use crate::error::Result;
use crate::ir::Graph;

pub(crate) fn run(g: Graph, _: &mut Context<'_>) -> Result<(Graph, Vec<String>)> {
    let before = g.nodes.len();
    let g = prune(g)?;
    let removed = before - g.nodes.len();
    let notes = if removed > 0 {
        vec![format!("removed {removed} nodes no output depends on")]
    } else {
        Vec::new()
    };
    Ok((g, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::ir::{Activation, DType, Dim, GraphBuilder, Op};

    #[test]
    fn unused_branches_go_and_inputs_stay() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Fixed(3)])
            .unwrap();
        let _unused_input = g
            .input("y", DType::F32, &[Dim::Batch, Dim::Fixed(3)])
            .unwrap();
        let a = g
            .push(Op::Activation(Activation::Relu), &[x], "relu")
            .unwrap();
        let dead = g
            .push(Op::Activation(Activation::Tanh), &[x], "dead")
            .unwrap();
        let _dead2 = g.push(Op::Add, &[dead, a], "dead2").unwrap();
        let graph = g.finish(vec![("out".into(), a)]).unwrap();
        let (out, notes) = ctx_run(run, graph.clone());
        assert_eq!(out.nodes.len(), 3, "x, y and relu remain");
        assert_eq!(count(&out, "add"), 0);
        assert_eq!(notes, vec!["removed 2 nodes no output depends on"]);
        let feeds = vec![
            ("x".to_string(), tensor(&[2, 3], 1)),
            ("y".to_string(), tensor(&[2, 3], 2)),
        ];
        assert_eq!(eval(&graph, &feeds), eval(&out, &feeds));
    }
}
