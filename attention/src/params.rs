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
}

/// Which keys one query row may attend to (within its causal limit).
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowMask<'a> {
    All,
    Keys(&'a [bool]),
    /// A mask broadcast over keys: all or none.
    Uniform(bool),
}

impl RowMask<'_> {
    #[inline]
    pub(crate) fn allows(&self, j: usize) -> bool {
        match self {
            RowMask::All => true,
            RowMask::Keys(m) => m[j],
            RowMask::Uniform(v) => *v,
        }
    }
}

impl<'a> Mask<'a> {
    /// Number of keys query `i` may see from the start of the sequence (its causal limit).
    pub(crate) fn visible_keys(&self, i: usize, q_len: usize, kv_len: usize) -> usize {
        match self {
            Mask::Causal(CausalAlign::TopLeft) => (i + 1).min(kv_len),
            Mask::Causal(CausalAlign::BottomRight) => (i + 1 + kv_len - q_len).min(kv_len),
            Mask::None | Mask::KeyPadding(_) | Mask::Bool { .. } => kv_len,
        }
    }

    /// The keys query `i` of head `h` in batch `b` may attend to. Lengths were validated.
    pub(crate) fn row(&self, b: usize, h: usize, i: usize, kv_len: usize) -> RowMask<'a> {
        match *self {
            Mask::None | Mask::Causal(_) => RowMask::All,
            Mask::KeyPadding(m) => RowMask::Keys(&m[b * kv_len..(b + 1) * kv_len]),
            Mask::Bool { data, dims } => {
                // Strides over [batch, head, query, key]; 0 where the mask is broadcast.
                let mut strides = [0usize; 4];
                let mut acc = 1;
                for d in (0..4).rev() {
                    strides[d] = if dims[d] == 1 { 0 } else { acc };
                    acc *= dims[d];
                }
                let start = b * strides[0] + h * strides[1] + i * strides[2];
                if dims[3] == 1 {
                    RowMask::Uniform(data[start])
                } else {
                    RowMask::Keys(&data[start..start + kv_len])
                }
            }
        }
    }
}

impl Mask<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Mask::None => "none",
            Mask::Causal(CausalAlign::TopLeft) => "causal-top-left",
            Mask::Causal(CausalAlign::BottomRight) => "causal-bottom-right",
            Mask::KeyPadding(_) => "key-padding",
            Mask::Bool { .. } => "boolean",
        }
    }
}

/// One attention call: its shape, mask and softmax scale (default `1/sqrt(head_dim)`).
#[derive(Debug, Clone, Copy)]
pub struct SdpaParams<'a> {
    pub shape: SdpaShape,
    pub mask: Mask<'a>,
    pub scale: Option<f32>,
}

/// What the selector looks at: everything about a call except the data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProblemSummary {
    pub shape: SdpaShape,
    pub mask: &'static str,
}

impl SdpaParams<'_> {
    pub fn scale(&self) -> f32 {
        self.scale
            .unwrap_or(1.0 / (self.shape.head_dim as f32).sqrt())
    }

    pub fn summary(&self) -> ProblemSummary {
        ProblemSummary {
            shape: self.shape,
            mask: self.mask.name(),
        }
    }

    /// Checks that the shape is coherent and that every buffer has the length it implies.
    pub fn validate(&self, q: usize, k: usize, v: usize, out: usize) -> Result<(), SdpaError> {
        let s = &self.shape;
        if s.head_dim == 0 || s.q_heads == 0 || s.kv_heads == 0 {
            return Err(SdpaError::Shape(format!(
                "heads and head_dim must be positive ({s})"
            )));
        }
        if !s.q_heads.is_multiple_of(s.kv_heads) {
            return Err(SdpaError::Shape(format!(
                "q_heads {} is not a multiple of kv_heads {}",
                s.q_heads, s.kv_heads
            )));
        }
        if let Some(scale) = self.scale
            && !scale.is_finite()
        {
            return Err(SdpaError::Shape(format!("scale {scale} is not finite")));
        }
        if let Mask::Causal(CausalAlign::BottomRight) = self.mask
            && s.q_len > s.kv_len
        {
            return Err(SdpaError::Shape(format!(
                "bottom-right causal mask needs q_len {} <= kv_len {}",
                s.q_len, s.kv_len
            )));
        }
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
                let full = [s.batch, s.q_heads, s.q_len, s.kv_len];
                for (i, (&d, &f)) in dims.iter().zip(&full).enumerate() {
                    if d != 1 && d != f {
                        return Err(SdpaError::Shape(format!(
                            "boolean mask dims {dims:?} do not broadcast to {full:?} (dim {i})"
                        )));
                    }
                }
                check("boolean mask", data.len(), dims.iter().product())?;
            }
            Mask::None | Mask::Causal(_) => {}
        }
        Ok(())
    }
}
