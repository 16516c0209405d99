//! Host tensors: the currency between the engine and its callers (inputs, outputs, weights).

use crate::error::{EngineError, Result};
use crate::ir::DType;

/// Element storage of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A dense, row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(data))
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Result<Self> {
        Self::new(shape, HostData::I64(data))
    }

    pub fn new(shape: Vec<usize>, data: HostData) -> Result<Self> {
        let expected = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let actual = match &data {
            HostData::F32(v) => v.len(),
            HostData::I64(v) => v.len(),
        };
        if expected != Some(actual) {
            let expected =
                expected.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string());
            return Err(EngineError::Graph(format!(
                "tensor of shape {shape:?} needs {expected} elements, got {actual}"
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::I64(_) => DType::I64,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            HostData::F32(v) => Some(v),
            HostData::I64(_) => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            HostData::I64(v) => Some(v),
            HostData::F32(_) => None,
        }
    }

    pub fn into_f32(self) -> Option<Vec<f32>> {
        match self.data {
            HostData::F32(v) => Some(v),
            HostData::I64(_) => None,
        }
    }
}
