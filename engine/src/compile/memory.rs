//! The memory plan: which intermediate values can share a buffer, from their lifetimes.
//!
//! Every intermediate `F32` value gets a slot; a slot is reused by a later value once the value
//! in it has been read for the last time, and an op that works in place (element-wise ops,
//! LayerNorm, the left operand of an add) writes into its input's slot when that input dies
//! there. Sizes stay symbolic: a slot holds `coeff · batch^i · seq^j · sequences^k` floats, with
//! one monomial per slot, so the same plan serves every request shape. Before a run the executor
//! asks the backend to [`reserve`](crate::backend::Backend::reserve) the slots' sizes at the
//! run's shape; the CPU backend's arena then serves every op from buffers it already holds.

use serde::{Deserialize, Serialize};

use crate::ir::{Bindings, DType, Dim, Graph, Op};

/// `batch^b · seq^s · sequences^q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Monomial {
    pub batch: u8,
    pub seq: u8,
    pub sequences: u8,
}

impl Monomial {
    fn eval(self, b: &Bindings) -> usize {
        b.batch.pow(u32::from(self.batch))
            * b.seq.pow(u32::from(self.seq))
            * b.sequences.pow(u32::from(self.sequences))
    }
}

/// Size of one slot: `coeff` floats per unit of `monomial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSize {
    pub coeff: usize,
    pub monomial: Monomial,
}

fn size_of(dims: &[Dim]) -> SlotSize {
    let mut coeff = 1usize;
    let mut m = Monomial {
        batch: 0,
        seq: 0,
        sequences: 0,
    };
    for d in dims {
        match d {
            Dim::Fixed(n) => coeff *= n,
            Dim::Batch => m.batch += 1,
            Dim::Seq => m.seq += 1,
            Dim::Sequences => m.sequences += 1,
        }
    }
    SlotSize { coeff, monomial: m }
}

/// Whether the CPU backend computes this op into its first input's buffer.
fn in_place(op: &Op) -> bool {
    matches!(
        op,
        Op::Add
            | Op::LayerNorm { .. }
            | Op::AddLayerNorm { .. }
            | Op::Activation(_)
            | Op::Scale { .. }
            | Op::CausalMask
            | Op::Softmax
            | Op::L2Normalize
    )
}

/// Slots and which value lives in which.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub slots: Vec<SlotSize>,
    /// Slot of each value (`None` for inputs, constants, non-F32 values).
    pub slot_of: Vec<Option<usize>>,
}

impl MemoryPlan {
    pub fn of(g: &Graph) -> Self {
        let n = g.nodes.len();
        let mut last_use = vec![0usize; n];
        for (i, node) in g.nodes.iter().enumerate() {
            for v in &node.inputs {
                last_use[v.0] = i;
            }
        }
        for (_, v) in &g.outputs {
            last_use[v.0] = usize::MAX;
        }
        let mut slots: Vec<SlotSize> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut slot_of: Vec<Option<usize>> = vec![None; n];
        for (i, node) in g.nodes.iter().enumerate() {
            let intermediate = node.ty.dtype == DType::F32
                && !matches!(node.op, Op::Input { .. })
                && !node.op.is_constant();
            let mut reused = None;
            if intermediate {
                let want = size_of(&node.ty.dims);
                // In place: the first input's slot, if that input dies here.
                if in_place(&node.op)
                    && let Some(first) = node.inputs.first()
                    && last_use[first.0] == i
                    && !node.inputs[1..].contains(first)
                    && let Some(s) = slot_of[first.0]
                    && slots[s].monomial == want.monomial
                {
                    slots[s].coeff = slots[s].coeff.max(want.coeff);
                    slot_of[i] = Some(s);
                    reused = Some(s);
                } else {
                    let pick = free
                        .iter()
                        .position(|&s| slots[s].monomial == want.monomial)
                        .map(|p| free.swap_remove(p));
                    let s = match pick {
                        Some(s) => {
                            slots[s].coeff = slots[s].coeff.max(want.coeff);
                            s
                        }
                        None => {
                            slots.push(want);
                            slots.len() - 1
                        }
                    };
                    slot_of[i] = Some(s);
                }
            }
            // Inputs read for the last time here free their slots (after the output took one:
            // an op reads its inputs while it writes its output).
            let mut seen = Vec::new();
            for v in &node.inputs {
                if last_use[v.0] == i
                    && !seen.contains(&v.0)
                    && let Some(s) = slot_of[v.0]
                    && Some(s) != reused
                {
                    free.push(s);
                }
                seen.push(v.0);
            }
        }
        Self { slots, slot_of }
    }

    /// Each slot's size in floats for one run's shape.
    pub fn buffer_elems(&self, b: &Bindings) -> Vec<usize> {
        self.slots
            .iter()
            .map(|s| s.coeff * s.monomial.eval(b))
            .collect()
    }

    /// Bytes of all slots for one run's shape.
    pub fn bytes(&self, b: &Bindings) -> usize {
        self.buffer_elems(b).iter().sum::<usize>() * 4
    }

    /// What keeping every intermediate alive at once would take (no reuse), for comparison.
    pub fn unshared_bytes(g: &Graph, b: &Bindings) -> usize {
        g.nodes
            .iter()
            .filter(|n| {
                n.ty.dtype == DType::F32 && !matches!(n.op, Op::Input { .. }) && !n.op.is_constant()
            })
            .map(|n| {
                let s = size_of(&n.ty.dims);
                s.coeff * s.monomial.eval(b) * 4
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Activation, ConstRole, GraphBuilder};
    use crate::tensor::HostTensor;

    #[test]
    fn a_chain_reuses_two_buffers_and_works_in_place() {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", DType::F32, &[Dim::Batch, Dim::Seq, Dim::Fixed(4)])
            .unwrap();
        let w = HostTensor::f32(vec![8, 4], vec![0.5; 32]).unwrap();
        let w = g.constant("w", w, ConstRole::LinearWeight).unwrap();
        let w2 = HostTensor::f32(vec![4, 8], vec![0.5; 32]).unwrap();
        let w2 = g.constant("w2", w2, ConstRole::LinearWeight).unwrap();
        let mut v = x;
        for i in 0..3 {
            let h = g.push(Op::Linear, &[v, w], format!("up{i}")).unwrap();
            let a = g
                .push(Op::Activation(Activation::Gelu), &[h], format!("act{i}"))
                .unwrap();
            v = g.push(Op::Linear, &[a, w2], format!("down{i}")).unwrap();
        }
        let graph = g.finish(vec![("out".into(), v)]).unwrap();
        let plan = MemoryPlan::of(&graph);
        // up/act share a slot (in place); each down reuses the previous down's slot, freed when
        // the next up read it.
        assert_eq!(plan.slots.len(), 2, "{plan:?}");
        let up0 = graph.nodes.iter().position(|n| n.label == "up0").unwrap();
        let act0 = graph.nodes.iter().position(|n| n.label == "act0").unwrap();
        assert_eq!(plan.slot_of[up0], plan.slot_of[act0]);
        let b = Bindings {
            batch: 2,
            seq: 3,
            sequences: 0,
        };
        assert_eq!(plan.buffer_elems(&b).iter().sum::<usize>(), 6 * (8 + 4));
        assert!(plan.bytes(&b) < MemoryPlan::unshared_bytes(&graph, &b));
    }
}
