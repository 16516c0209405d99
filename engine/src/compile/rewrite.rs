//! The tool every pass uses: copy an old graph node by node into a new one, replacing the nodes
//! a pass matched, with old value ids mapped to new ones. Dead nodes are dropped at the end.

use crate::error::{Result, graph_err};
use crate::ir::{Graph, GraphBuilder, Node, Op, ValueId};

/// Who reads each value: `(node, input position)` pairs, and whether it is a graph output.
pub(crate) struct Uses {
    pub readers: Vec<Vec<(usize, usize)>>,
    pub is_output: Vec<bool>,
}

impl Uses {
    pub fn of(g: &Graph) -> Self {
        let mut readers = vec![Vec::new(); g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for (pos, v) in n.inputs.iter().enumerate() {
                readers[v.0].push((i, pos));
            }
        }
        let mut is_output = vec![false; g.nodes.len()];
        for (_, v) in &g.outputs {
            is_output[v.0] = true;
        }
        Self { readers, is_output }
    }

    /// The single node reading value `v` (at one input position), if `v` has exactly one
    /// reader and is not a graph output: the condition for fusing it into its reader.
    pub fn sole_reader(&self, v: usize) -> Option<(usize, usize)> {
        match self.readers[v][..] {
            [only] if !self.is_output[v] => Some(only),
            _ => None,
        }
    }
}

/// Builds a new graph from an old one.
pub(crate) struct Rewriter<'g> {
    pub old: &'g Graph,
    new: GraphBuilder,
    map: Vec<Option<ValueId>>,
}

impl<'g> Rewriter<'g> {
    pub fn new(old: &'g Graph) -> Self {
        Self {
            old,
            new: GraphBuilder::new(),
            map: vec![None; old.nodes.len()],
        }
    }

    /// The new id of old value `v` (which must have been copied or replaced already).
    pub fn map(&self, v: ValueId) -> Result<ValueId> {
        self.map[v.0].ok_or_else(|| {
            graph_err(format!(
                "rewrite: value {} ({}) is used before it is defined",
                v.0, self.old.nodes[v.0].label
            ))
        })
    }

    /// Copies old node `i` unchanged (inputs mapped).
    pub fn copy(&mut self, i: usize) -> Result<ValueId> {
        let node = &self.old.nodes[i];
        let inputs = node
            .inputs
            .iter()
            .map(|v| self.map(*v))
            .collect::<Result<Vec<_>>>()?;
        let id = self
            .new
            .push(node.op.clone(), &inputs, node.label.clone())?;
        self.map[i] = Some(id);
        Ok(id)
    }

    /// Adds a new node (inputs are new ids).
    pub fn push(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        label: impl Into<String>,
    ) -> Result<ValueId> {
        self.new.push(op, inputs, label)
    }

    /// Records that old value `old` is now computed by new value `new`.
    pub fn set(&mut self, old: usize, new: ValueId) {
        self.map[old] = Some(new);
    }

    /// The graph, with outputs mapped and dead nodes removed.
    pub fn finish(self) -> Result<Graph> {
        let outputs = self
            .old
            .outputs
            .iter()
            .map(|(name, v)| Ok((name.clone(), self.map(*v)?)))
            .collect::<Result<Vec<_>>>()?;
        prune(self.new.finish(outputs)?)
    }
}

/// Removes nodes no output depends on. Inputs always stay: they are the graph's interface.
pub(crate) fn prune(g: Graph) -> Result<Graph> {
    let n = g.nodes.len();
    let mut live = vec![false; n];
    for (_, v) in &g.outputs {
        live[v.0] = true;
    }
    for i in (0..n).rev() {
        if matches!(g.nodes[i].op, Op::Input { .. }) {
            live[i] = true;
        }
        if live[i] {
            for v in &g.nodes[i].inputs {
                live[v.0] = true;
            }
        }
    }
    if live.iter().all(|&l| l) {
        return Ok(g);
    }
    let mut map = vec![None; n];
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for (i, node) in g.nodes.into_iter().enumerate() {
        if !live[i] {
            continue;
        }
        let inputs = node
            .inputs
            .iter()
            .map(|v| map[v.0].ok_or_else(|| graph_err("prune: a live node reads a dead one")))
            .collect::<Result<Vec<ValueId>>>()?;
        map[i] = Some(ValueId(nodes.len()));
        nodes.push(Node { inputs, ..node });
    }
    let outputs = g
        .outputs
        .into_iter()
        .map(|(name, v)| (name, map[v.0].expect("outputs are live")))
        .collect();
    let g = Graph { nodes, outputs };
    g.check()?;
    Ok(g)
}

/// A readable label for a group of nodes: the common dotted prefix and the differing tails, e.g.
/// `layer.0.attention.self.{query,key,value}`.
pub(crate) fn group_label(labels: &[&str]) -> String {
    let first = labels.first().copied().unwrap_or_default();
    let mut prefix = first.len();
    for l in labels {
        prefix = prefix.min(
            first
                .bytes()
                .zip(l.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    // Cut at the last `.` inside the common part.
    let cut = first[..prefix].rfind('.').map_or(0, |p| p + 1);
    let tails: Vec<&str> = labels.iter().map(|l| &l[cut..]).collect();
    format!("{}{{{}}}", &first[..cut], tails.join(","))
}

/// The labels a [`group_label`] was made of (`a.{b,c}` → `a.b`, `a.c`); a plain label is its
/// own only member. Hugging Face parameter names hold no braces, so a label of the form
/// `prefix{…}` is always a group.
pub fn member_labels(label: &str) -> Vec<String> {
    if let Some(inner) = label.strip_suffix('}')
        && let Some(open) = inner.rfind('{')
    {
        let prefix = &inner[..open];
        return inner[open + 1..]
            .split(',')
            .map(|tail| format!("{prefix}{tail}"))
            .collect();
    }
    vec![label.to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_labels_invert_group_labels() {
        for labels in [
            vec!["a.self.query", "a.self.key", "a.self.value"],
            vec!["q", "k"],
        ] {
            assert_eq!(member_labels(&group_label(&labels)), labels);
        }
        assert_eq!(
            member_labels("encoder.layer.0.output.dense"),
            ["encoder.layer.0.output.dense"]
        );
    }

    #[test]
    fn group_labels_share_the_dotted_prefix() {
        assert_eq!(
            group_label(&["a.self.query", "a.self.key", "a.self.value"]),
            "a.self.{query,key,value}"
        );
        assert_eq!(group_label(&["q", "k"]), "{q,k}");
    }
}
