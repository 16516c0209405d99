use crate::SdpaError;

/// Sizes of one attention problem. Layout is `[batch, heads, seq, head_dim]`, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdpaShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
}

impl SdpaShape {
    /// The shape of `q [batch, q_heads, q_len, d]` against `k [batch, kv_heads, kv_len, d]`.
    pub fn of(q: [usize; 4], k: [usize; 4]) -> SdpaShape {
        let [batch, q_heads, q_len, head_dim] = q;
        let [_, kv_heads, kv_len, _] = k;
        SdpaShape {
            batch,
            q_heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim,
        }
    }

    pub fn q_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len * self.head_dim
    }
    pub fn kv_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.head_dim
    }
}

impl std::fmt::Display for SdpaShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "q [{}, {}, {}, {}], k/v [{}, {}, {}, {}]",
            self.batch,
            self.q_heads,
            self.q_len,
            self.head_dim,
            self.batch,
            self.kv_heads,
            self.kv_len,
            self.head_dim
        )
    }
}

/// Where the causal diagonal sits when `q_len != kv_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CausalAlign {
    /// Query `i` sees keys `0..=i` (PyTorch's `is_causal=True`).
    TopLeft,
    /// Query `i` sees keys `0..=i + (kv_len - q_len)`: the last query sees every key. This is what
    /// decoding with a KV cache and chunked prefill need.
    BottomRight,
}

/// Which keys each query may attend to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mask<'a> {
    None,
    Causal(CausalAlign),
    /// `[batch, kv_len]`, `true` = attend. Padding keys are `false`.
    KeyPadding(&'a [bool]),
    /// A boolean mask broadcastable against `[batch, q_heads, q_len, kv_len]` (each of `dims` is
    /// either the full size or 1), `true` = attend, as in PyTorch.
    Bool {
        data: &'a [bool],
        dims: [usize; 4],
    },
    /// An additive float bias broadcastable against `[batch, q_heads, q_len, kv_len]` (ALiBi,
    /// relative-position biases, or a mask spelled as `0` / `-inf`), added to the scaled scores.
    Bias {
        data: &'a [f32],
        dims: [usize; 4],
    },
}

/// The kind of a mask, without its data: what the selector looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskKind {
    None,
    CausalTopLeft,
    CausalBottomRight,
    KeyPadding,
    Bool,
    Bias,
}

impl MaskKind {
    pub fn name(self) -> &'static str {
        match self {
            MaskKind::None => "none",
            MaskKind::CausalTopLeft => "causal-top-left",
            MaskKind::CausalBottomRight => "causal-bottom-right",
            MaskKind::KeyPadding => "key-padding",
            MaskKind::Bool => "boolean",
            MaskKind::Bias => "additive-bias",
        }
    }

    /// Masks that a tiled kernel can apply from indices alone (no dense `q × k` tensor).
    pub fn is_structured(self) -> bool {
        !matches!(self, MaskKind::Bool | MaskKind::Bias)
    }
}

/// Which keys one query row may attend to (within its causal limit), and what is added to its
/// scores.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowMask<'a> {
    All,
    Keys(&'a [bool]),
    /// A mask broadcast over keys: all or none.
    Uniform(bool),
    /// An additive bias per key.
    Bias(&'a [f32]),
    /// One additive bias for every key.
    UniformBias(f32),
}

impl RowMask<'_> {
    #[inline]
    pub(crate) fn allows(&self, j: usize) -> bool {
        match self {
            RowMask::All | RowMask::Bias(_) | RowMask::UniformBias(_) => true,
            RowMask::Keys(m) => m[j],
            RowMask::Uniform(v) => *v,
        }
    }

    /// Applies the row's mask and bias to already-scaled scores of keys `j0..j0 + row.len()`.
    #[inline]
    pub(crate) fn apply(&self, row: &mut [f32], j0: usize) {
        match *self {
            RowMask::All => {}
            RowMask::Keys(m) => {
                for (x, &keep) in row.iter_mut().zip(&m[j0..]) {
                    if !keep {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            RowMask::Uniform(true) => {}
            RowMask::Uniform(false) => row.fill(f32::NEG_INFINITY),
            RowMask::Bias(b) => row.iter_mut().zip(&b[j0..]).for_each(|(x, b)| *x += b),
            RowMask::UniformBias(b) => row.iter_mut().for_each(|x| *x += b),
        }
    }

    /// The bias added to key `j` (0 for boolean masks; masked keys are handled by `allows`).
    #[inline]
    pub(crate) fn bias(&self, j: usize) -> f32 {
        match *self {
            RowMask::Bias(b) => b[j],
            RowMask::UniformBias(b) => b,
            _ => 0.0,
        }
    }
}

/// Strides over `[batch, head, query, key]` for a mask broadcast from `dims` (0 on a broadcast
/// dimension).
fn broadcast_strides(dims: [usize; 4]) -> [usize; 4] {
    let mut strides = [0usize; 4];
    let mut acc = 1;
    for d in (0..4).rev() {
        strides[d] = if dims[d] == 1 { 0 } else { acc };
        acc *= dims[d];
    }
    strides
}

impl<'a> Mask<'a> {
    /// Number of keys query `i` may see from the start of the sequence (its causal limit).
    pub(crate) fn visible_keys(&self, i: usize, q_len: usize, kv_len: usize) -> usize {
        match self {
            Mask::Causal(CausalAlign::TopLeft) => (i + 1).min(kv_len),
            Mask::Causal(CausalAlign::BottomRight) => (i + 1 + kv_len - q_len).min(kv_len),
            Mask::None | Mask::KeyPadding(_) | Mask::Bool { .. } | Mask::Bias { .. } => kv_len,
        }
    }

    /// The keys query `i` of head `h` in batch `b` may attend to. Lengths were validated.
    pub(crate) fn row(&self, b: usize, h: usize, i: usize, kv_len: usize) -> RowMask<'a> {
        match *self {
            Mask::None | Mask::Causal(_) => RowMask::All,
            Mask::KeyPadding(m) => RowMask::Keys(&m[b * kv_len..(b + 1) * kv_len]),
            Mask::Bool { data, dims } => {
                let st = broadcast_strides(dims);
                let start = b * st[0] + h * st[1] + i * st[2];
                if dims[3] == 1 {
                    RowMask::Uniform(data[start])
                } else {
                    RowMask::Keys(&data[start..start + kv_len])
                }
            }
            Mask::Bias { data, dims } => {
                let st = broadcast_strides(dims);
                let start = b * st[0] + h * st[1] + i * st[2];
                if dims[3] == 1 {
                    RowMask::UniformBias(data[start])
                } else {
                    RowMask::Bias(&data[start..start + kv_len])
                }
            }
        }
    }
}

impl Mask<'_> {
    pub fn kind(&self) -> MaskKind {
        match self {
            Mask::None => MaskKind::None,
            Mask::Causal(CausalAlign::TopLeft) => MaskKind::CausalTopLeft,
            Mask::Causal(CausalAlign::BottomRight) => MaskKind::CausalBottomRight,
            Mask::KeyPadding(_) => MaskKind::KeyPadding,
            Mask::Bool { .. } => MaskKind::Bool,
            Mask::Bias { .. } => MaskKind::Bias,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// One attention call: its shape, mask and softmax scale (default `1/sqrt(head_dim)`).
#[derive(Debug, Clone, Copy)]
pub struct SdpaParams<'a> {
    pub shape: SdpaShape,
    pub mask: Mask<'a>,
    pub scale: Option<f32>,
}

/// What the selector looks at: everything about a call except the data. For a varlen call,
/// `shape.batch` is the number of sequences and `q_len`/`kv_len` are the longest ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProblemSummary {
    pub shape: SdpaShape,
    pub mask: MaskKind,
    pub varlen: bool,
}

impl SdpaParams<'_> {
    pub fn scale(&self) -> f32 {
        self.scale
            .unwrap_or(1.0 / (self.shape.head_dim as f32).sqrt())
    }

    pub fn summary(&self) -> ProblemSummary {
        ProblemSummary {
            shape: self.shape,
            mask: self.mask.kind(),
            varlen: false,
        }
    }

    /// Checks that the shape is coherent and that every buffer has the length it implies.
    pub fn validate(&self, q: usize, k: usize, v: usize, out: usize) -> Result<(), SdpaError> {
        let s = &self.shape;
        if let Mask::Causal(CausalAlign::BottomRight) = self.mask
            && s.q_len > s.kv_len
        {
            return Err(SdpaError::Shape(format!(
                "bottom-right causal mask needs q_len {} <= kv_len {}",
                s.q_len, s.kv_len
            )));
        }
        check_heads(s.q_heads, s.kv_heads, s.head_dim, self.scale)?;
        let shape = s.to_string();
        let check = |what, actual, expected| {
            if actual == expected {
                Ok(())
            } else {
                Err(SdpaError::Length {
                    what,
                    actual,
                    expected,
                    shape: shape.clone(),
                })
            }
        };
        check("q", q, s.q_elems())?;
        check("k", k, s.kv_elems())?;
        check("v", v, s.kv_elems())?;
        check("out", out, s.q_elems())?;
        match self.mask {
            Mask::KeyPadding(m) => check("key-padding mask", m.len(), s.batch * s.kv_len)?,
            Mask::Bool { data, dims } => {
                check_broadcast("boolean mask", dims, s)?;
                check("boolean mask", data.len(), dims.iter().product())?;
            }
            Mask::Bias { data, dims } => {
                check_broadcast("bias", dims, s)?;
                check("bias", data.len(), dims.iter().product())?;
            }
            Mask::None | Mask::Causal(_) => {}
        }
        Ok(())
    }
}

fn check_heads(
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: Option<f32>,
) -> Result<(), SdpaError> {
    if head_dim == 0 || q_heads == 0 || kv_heads == 0 {
        return Err(SdpaError::Shape(format!(
            "heads and head_dim must be positive (q_heads {q_heads}, kv_heads {kv_heads}, \
             head_dim {head_dim})"
        )));
    }
    if !q_heads.is_multiple_of(kv_heads) {
        return Err(SdpaError::Shape(format!(
            "q_heads {q_heads} is not a multiple of kv_heads {kv_heads}"
        )));
    }
    if let Some(scale) = scale
        && !scale.is_finite()
    {
        return Err(SdpaError::Shape(format!("scale {scale} is not finite")));
    }
    Ok(())
}

fn check_broadcast(what: &str, dims: [usize; 4], s: &SdpaShape) -> Result<(), SdpaError> {
    let full = [s.batch, s.q_heads, s.q_len, s.kv_len];
    for (i, (&d, &f)) in dims.iter().zip(&full).enumerate() {
        if d != 1 && d != f {
            return Err(SdpaError::Shape(format!(
                "{what} dims {dims:?} do not broadcast to {full:?} (dim {i})"
            )));
        }
    }
    Ok(())
}

/// A padding-free ("varlen") attention call: sequences packed back to back.
///
/// Layout: `q` is `[q_heads, total_q, head_dim]` and `k`/`v` are `[kv_heads, total_kv,
/// head_dim]`, where sequence `s` owns rows `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` of every head
/// (and likewise for keys). This is the engine's `[1, heads, tokens, head_dim]` after splitting
/// heads, so a packed batch needs no extra copy. Each sequence attends only to its own keys;
/// `causal` aligns within each sequence. Self-attention passes the same offsets twice.
#[derive(Debug, Clone, Copy)]
pub struct VarlenParams<'a> {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `n + 1` non-decreasing offsets starting at 0; the last is the total query rows.
    pub cu_seqlens_q: &'a [usize],
    pub cu_seqlens_k: &'a [usize],
    pub causal: Option<CausalAlign>,
    pub scale: Option<f32>,
}

impl VarlenParams<'_> {
    pub fn sequences(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }

    pub fn total_q(&self) -> usize {
        self.cu_seqlens_q.last().copied().unwrap_or(0)
    }

    pub fn total_kv(&self) -> usize {
        self.cu_seqlens_k.last().copied().unwrap_or(0)
    }

    pub fn scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    fn max_len(cu: &[usize]) -> usize {
        cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    pub fn summary(&self) -> ProblemSummary {
        ProblemSummary {
            shape: SdpaShape {
                batch: self.sequences(),
                q_heads: self.q_heads,
                kv_heads: self.kv_heads,
                q_len: Self::max_len(self.cu_seqlens_q),
                kv_len: Self::max_len(self.cu_seqlens_k),
                head_dim: self.head_dim,
            },
            mask: match self.causal {
                None => MaskKind::None,
                Some(CausalAlign::TopLeft) => MaskKind::CausalTopLeft,
                Some(CausalAlign::BottomRight) => MaskKind::CausalBottomRight,
            },
            varlen: true,
        }
    }

    /// Checks the offsets and that every buffer has the length they imply.
    pub fn validate(&self, q: usize, k: usize, v: usize, out: usize) -> Result<(), SdpaError> {
        check_heads(self.q_heads, self.kv_heads, self.head_dim, self.scale)?;
        for (what, cu) in [
            ("cu_seqlens_q", self.cu_seqlens_q),
            ("cu_seqlens_k", self.cu_seqlens_k),
        ] {
            if cu.first() != Some(&0) {
                return Err(SdpaError::Shape(format!(
                    "{what} must start at 0 and hold n + 1 offsets, got {cu:?}"
                )));
            }
            if cu.windows(2).any(|w| w[1] < w[0]) {
                return Err(SdpaError::Shape(format!(
                    "{what} must be non-decreasing, got {cu:?}"
                )));
            }
        }
        if self.cu_seqlens_q.len() != self.cu_seqlens_k.len() {
            return Err(SdpaError::Shape(format!(
                "cu_seqlens_q has {} sequences but cu_seqlens_k has {}",
                self.sequences(),
                self.cu_seqlens_k.len().saturating_sub(1)
            )));
        }
        if self.causal == Some(CausalAlign::BottomRight) {
            for (s, (wq, wk)) in self
                .cu_seqlens_q
                .windows(2)
                .zip(self.cu_seqlens_k.windows(2))
                .enumerate()
            {
                if wq[1] - wq[0] > wk[1] - wk[0] {
                    return Err(SdpaError::Shape(format!(
                        "bottom-right causal mask needs q_len <= kv_len, sequence {s} has {} > {}",
                        wq[1] - wq[0],
                        wk[1] - wk[0]
                    )));
                }
            }
        }
        let shape = format!(
            "varlen q [{}, {}, {}], k/v [{}, {}, {}]",
            self.q_heads,
            self.total_q(),
            self.head_dim,
            self.kv_heads,
            self.total_kv(),
            self.head_dim
        );
        let q_elems = self.q_heads * self.total_q() * self.head_dim;
        let kv_elems = self.kv_heads * self.total_kv() * self.head_dim;
        for (what, actual, expected) in [
            ("q", q, q_elems),
            ("k", k, kv_elems),
            ("v", v, kv_elems),
            ("out", out, q_elems),
        ] {
            if actual != expected {
                return Err(SdpaError::Length {
                    what,
                    actual,
                    expected,
                    shape: shape.clone(),
                });
            }
        }
        Ok(())
    }
}
