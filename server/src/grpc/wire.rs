//! `ModelInfer`'s own decoding path: the message's wire bytes are checked against the request
//! limits *before* prost expands them.
//!
//! Why. prost decodes a whole message into Rust values before a handler sees it, and protobuf
//! packs small integers into one byte each: a 60 MB `ModelInfer` of token ids becomes a 480 MB
//! `Vec<i64>`, and a message of a million empty `bytes_contents` a million `Vec`s, whatever the
//! handler later refuses. So `ModelInfer` runs through [`InferCodec`], which walks the message's
//! fields (no allocation) and refuses, with the same messages and codes as the decoded path:
//! more than [`MAX_TENSORS`] inputs or outputs, more than [`MAX_PARAMETERS`] parameters, shapes
//! of more than [`MAX_DIMS`] dimensions, shapes over the batch and token limits
//! ([`check_header`]), and contents holding more elements than their shape declares. Only then
//! does prost decode it. The other methods keep tonic's generated path.

// Sizes here come from clients or files: arithmetic on them must be checked.
#![warn(clippy::arithmetic_side_effects)]

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, CompressionEncoding, DecodeBuf, Decoder};
use tonic::server::{NamedService, UnaryService};
use tonic::{Response, Status};
use tonic_prost::ProstCodec;

use super::pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use super::pb::{ModelInferRequest, ModelInferResponse};
use super::service::InferenceService;
use super::{SERVICE_NAME, status_of};
use crate::app::AppState;
use crate::error::AppError;
use crate::routes::kserve::{
    MAX_DIMS, MAX_PARAMETERS, MAX_TENSORS, TensorLimits, bad, check_header, tensor_limits,
};

const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// One protobuf field value, as the wire carries it.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Fixed32,
    Bytes(&'a [u8]),
}

/// A reader of protobuf fields over a message's bytes.
struct Fields<'a> {
    buf: &'a [u8],
}

fn malformed(what: &str) -> AppError {
    bad(format!("malformed ModelInferRequest: {what}"))
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, AppError> {
        let mut value = 0u64;
        // Ten 7-bit groups at most: shifts 0, 7, ..., 63.
        for shift in (0..64u32).step_by(7) {
            let (&byte, rest) = self
                .buf
                .split_first()
                .ok_or_else(|| malformed("truncated varint"))?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f).wrapping_shl(shift);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AppError> {
        if n > self.buf.len() {
            return Err(malformed("a field runs past the end of its message"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field's number and value; `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, AppError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| malformed("a length over the address space"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed32
            }
            _ => return Err(malformed("an unsupported wire type")),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// Counts one more of something capped, refusing the one over the cap.
fn bump(n: &mut usize, max: usize, what: &str) -> Result<(), AppError> {
    *n = n.saturating_add(1);
    if *n > max {
        return Err(bad(format!(
            "more than {max} {what} (the most kiln accepts)"
        )));
    }
    Ok(())
}

/// The number of elements a repeated scalar field's value holds.
fn scalar_count(field: u64, value: &Value) -> Result<usize, AppError> {
    Ok(match value {
        // Packed: varints end at each byte without the continuation bit.
        Value::Bytes(b) if (1..=5).contains(&field) => b.iter().filter(|&&x| x & 0x80 == 0).count(),
        Value::Bytes(b) if field == 6 => b.len() / 4,
        Value::Bytes(b) if field == 7 => b.len() / 8,
        // bytes_contents: one element per occurrence; unknown fields count nothing.
        Value::Bytes(_) => usize::from(field == 8),
        Value::Varint(_) | Value::Fixed32 | Value::Fixed64 => usize::from((1..=7).contains(&field)),
    })
}

/// An input tensor's header and the number of elements its `contents` hold.
struct Tensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    elements: usize,
}

fn count_parameters(n: &mut usize) -> Result<(), AppError> {
    bump(n, MAX_PARAMETERS, "parameters")
}

fn scan_tensor(bytes: &[u8]) -> Result<Tensor, AppError> {
    let mut t = Tensor {
        name: String::new(),
        datatype: String::new(),
        shape: Vec::new(),
        elements: 0,
    };
    let mut params = 0;
    let mut fields = Fields { buf: bytes };
    while let Some((field, value)) = fields.next()? {
        match (field, value) {
            (1, Value::Bytes(b)) => t.name = String::from_utf8_lossy(b).into_owned(),
            (2, Value::Bytes(b)) => t.datatype = String::from_utf8_lossy(b).into_owned(),
            (3, Value::Varint(d)) => {
                if t.shape.len() == MAX_DIMS {
                    return Err(too_many_dims(&t.name));
                }
                t.shape.push(d as i64);
            }
            (3, Value::Bytes(b)) => {
                let mut packed = Fields { buf: b };
                while !packed.buf.is_empty() {
                    if t.shape.len() == MAX_DIMS {
                        return Err(too_many_dims(&t.name));
                    }
                    t.shape.push(packed.varint()? as i64);
                }
            }
            (4, _) => count_parameters(&mut params)?,
            (5, Value::Bytes(b)) => {
                let mut contents = Fields { buf: b };
                while let Some((f, v)) = contents.next()? {
                    t.elements = t.elements.saturating_add(scalar_count(f, &v)?);
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

fn too_many_dims(name: &str) -> AppError {
    bad(format!(
        "input `{name}`: shape has more than {MAX_DIMS} dimensions (the most kiln accepts)"
    ))
}

/// Checks a `ModelInferRequest`'s wire bytes against `limits` without decoding it.
pub(crate) fn check_infer_request(message: &[u8], limits: TensorLimits) -> Result<(), AppError> {
    let mut fields = Fields { buf: message };
    let (mut params, mut outputs) = (0, 0);
    let mut inputs: Vec<Tensor> = Vec::new();
    let mut raw: Vec<usize> = Vec::new();
    while let Some((field, value)) = fields.next()? {
        match (field, value) {
            (4, _) => count_parameters(&mut params)?,
            (5, Value::Bytes(b)) => {
                if inputs.len() == MAX_TENSORS {
                    return Err(bad(format!(
                        "more than {MAX_TENSORS} inputs (the most kiln accepts)"
                    )));
                }
                inputs.push(scan_tensor(b)?);
            }
            (6, Value::Bytes(b)) => {
                bump(&mut outputs, MAX_TENSORS, "outputs")?;
                let mut output_params = 0;
                let mut f = Fields { buf: b };
                while let Some((field, _)) = f.next()? {
                    if field == 2 {
                        count_parameters(&mut output_params)?;
                    }
                }
            }
            (7, Value::Bytes(b)) => {
                if raw.len() == MAX_TENSORS {
                    return Err(bad(format!(
                        "raw_input_contents has more than {MAX_TENSORS} entries"
                    )));
                }
                raw.push(b.len());
            }
            _ => {}
        }
    }
    for (i, t) in inputs.iter().enumerate() {
        let (_, count) = check_header(&t.name, &t.datatype, &t.shape, limits)?;
        if t.elements > count {
            return Err(bad(format!(
                "input `{}`: {} data elements for a shape of {count} elements",
                t.name, t.elements
            )));
        }
        // Raw INT64 data must be 8 bytes an element; BYTES elements have lengths of their own.
        if let Some(&len) = raw.get(i)
            && t.datatype == "INT64"
            && count.checked_mul(8).is_none_or(|bytes| len > bytes)
        {
            return Err(bad(format!(
                "input `{}`: {len} bytes of INT64 data for a shape of {count} elements",
                t.name
            )));
        }
    }
    Ok(())
}

/// prost's codec for `ModelInfer`, with [`check_infer_request`] before each decode.
#[derive(Clone)]
struct InferCodec {
    state: AppState,
}

impl Codec for InferCodec {
    type Encode = ModelInferResponse;
    type Decode = ModelInferRequest;
    type Encoder = <ProstCodec<ModelInferResponse, ModelInferRequest> as Codec>::Encoder;
    type Decoder = InferDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<ModelInferResponse, ModelInferRequest>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InferDecoder {
            state: self.state.clone(),
            inner: ProstCodec::<ModelInferResponse, ModelInferRequest>::default().decoder(),
        }
    }
}

struct InferDecoder {
    state: AppState,
    inner: <ProstCodec<ModelInferResponse, ModelInferRequest> as Codec>::Decoder,
}

impl Decoder for InferDecoder {
    type Item = ModelInferRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<ModelInferRequest>, Status> {
        use prost::bytes::Buf;
        let max_batch = self.state.config().max_client_batch_size;
        // Before any encoder is ready every call is refused anyway, with the reason.
        let checked = widest_limits(&self.state, max_batch)
            // tonic hands the decoder one whole message in one contiguous buffer.
            .and_then(|limits| check_infer_request(buf.chunk(), limits));
        if let Err(e) = checked {
            // Refused before the handler runs, so counted here as the handler would.
            tracing::debug!(error = %e.message, "gRPC ModelInfer refused before decoding");
            self.state
                .metrics()
                .start_request("grpc")
                .finish(Some(e.kind));
            return Err(status_of(&e));
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// The loosest tensor limits among the ready encoders. The message is checked before it is
/// decoded, so before its model name is known; the handler checks the tensors against its own
/// model's limits again as it decodes them.
fn widest_limits(state: &AppState, max_batch: usize) -> Result<TensorLimits, AppError> {
    let width = state
        .models()
        .all()
        .iter()
        .filter_map(|m| m.encoder().ok())
        .map(|ready| tensor_limits(&ready, max_batch).width)
        .max();
    match width {
        Some(width) => Ok(TensorLimits {
            rows: max_batch,
            width,
        }),
        // No encoder is ready: the reason the handler would give (loading, a causal LM).
        None => Err(state
            .encoder(None, crate::registry::Want::Encoder)
            .err()
            .unwrap_or_else(|| AppError::unavailable("no encoder model is ready"))),
    }
}

/// `inference.GRPCInferenceService`: `ModelInfer` through [`InferCodec`], every other method
/// through the generated server.
#[derive(Clone)]
pub(crate) struct Inference {
    generated: GrpcInferenceServiceServer<InferenceService>,
    service: Arc<InferenceService>,
    state: AppState,
    limit: usize,
}

impl Inference {
    pub(crate) fn new(state: AppState) -> Self {
        let limit = state.config().grpc_max_message_size;
        let service = Arc::new(InferenceService::new(state.clone()));
        let generated = GrpcInferenceServiceServer::from_arc(service.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
            // gzip-compressed requests (tritonclient's `compression_algorithm="gzip"`).
            // Answers are not compressed: float embeddings barely shrink, and most clients
            // (grpcio by default) would accept gzip and make every answer cost CPU for nothing.
            .accept_compressed(CompressionEncoding::Gzip);
        Self {
            generated,
            service,
            state,
            limit,
        }
    }
}

impl NamedService for Inference {
    const NAME: &'static str = SERVICE_NAME;
}

/// `ModelInfer` as a unary service over the shared handler.
struct ModelInfer(Arc<InferenceService>);

impl UnaryService<ModelInferRequest> for ModelInfer {
    type Response = ModelInferResponse;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Response<ModelInferResponse>, Status>> + Send + 'static>,
    >;

    fn call(&mut self, request: tonic::Request<ModelInferRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.model_infer(request).await })
    }
}

impl tower::Service<Request<Body>> for Inference {
    type Response = axum::http::Response<Body>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if req.uri().path() != MODEL_INFER {
            return Box::pin(tower::Service::call(&mut self.generated, req));
        }
        let codec = InferCodec {
            state: self.state.clone(),
        };
        let method = ModelInfer(self.service.clone());
        let limit = self.limit;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(codec)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit);
            Ok(grpc.unary(method, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use crate::grpc::pb::{InferParameter, InferTensorContents};

    const LIMITS: TensorLimits = TensorLimits { rows: 4, width: 8 };

    fn ids(shape: Vec<i64>, values: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape,
            contents: Some(InferTensorContents {
                int64_contents: values,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn check(req: &ModelInferRequest) -> Result<(), String> {
        check_infer_request(&req.encode_to_vec(), LIMITS).map_err(|e| e.message)
    }

    #[test]
    fn accepts_a_request_within_the_limits() {
        let req = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![ids(vec![2, 3], vec![1, 2, 3, 4, 5, 6])],
            outputs: vec![InferRequestedOutputTensor {
                name: "embedding".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(check(&req), Ok(()));
    }

    #[test]
    fn refuses_sizes_over_the_limits_before_decoding() {
        let over_rows = ModelInferRequest {
            inputs: vec![ids(vec![5, 1], vec![1; 5])],
            ..Default::default()
        };
        assert!(
            check(&over_rows)
                .unwrap_err()
                .contains("exceed the limit of 4")
        );
        let over_width = ModelInferRequest {
            inputs: vec![ids(vec![1, 9], vec![1; 9])],
            ..Default::default()
        };
        assert!(check(&over_width).unwrap_err().contains("at most 8"));
        let more_data_than_shape = ModelInferRequest {
            inputs: vec![ids(vec![1, 2], vec![1; 1000])],
            ..Default::default()
        };
        assert!(
            check(&more_data_than_shape)
                .unwrap_err()
                .contains("1000 data elements for a shape of 2")
        );
        let overflowing_shape = ModelInferRequest {
            inputs: vec![ids(vec![1, 1 << 61], vec![])],
            raw_input_contents: vec![vec![]],
            ..Default::default()
        };
        assert!(check(&overflowing_shape).is_err());
        let too_many_inputs = ModelInferRequest {
            inputs: vec![ids(vec![1, 1], vec![1]); MAX_TENSORS + 1],
            ..Default::default()
        };
        assert!(check(&too_many_inputs).unwrap_err().contains("inputs"));
        let too_many_dims = ModelInferRequest {
            inputs: vec![ids(vec![1; MAX_DIMS + 1], vec![1])],
            ..Default::default()
        };
        assert!(check(&too_many_dims).unwrap_err().contains("dimensions"));
        let too_many_params = ModelInferRequest {
            parameters: (0..=MAX_PARAMETERS)
                .map(|i| (i.to_string(), InferParameter::default()))
                .collect(),
            ..Default::default()
        };
        assert!(check(&too_many_params).unwrap_err().contains("parameters"));
        let empty_bytes = ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: "text".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![Vec::new(); 100_000],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            check(&empty_bytes)
                .unwrap_err()
                .contains("100000 data elements")
        );
    }

    #[test]
    fn refuses_malformed_bytes_without_panicking() {
        for bytes in [
            &[0x2a, 0xff][..],
            &[0x2a, 0x05, 0x01],
            &[0x08, 0x80, 0x80],
            &[0x0b],
            &[
                0x2a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ] {
            assert!(check_infer_request(bytes, LIMITS).is_err(), "{bytes:?}");
        }
    }
}
