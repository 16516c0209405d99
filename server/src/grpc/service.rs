//! `inference.GRPCInferenceService` over the shared server state.

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::pb::grpc_inference_service_server::GrpcInferenceService;
use super::pb::model_metadata_response::TensorMetadata;
use super::pb::*;
use super::status_of;
use super::tensors::{bool_param, decode_inputs, encode_outputs};
use crate::app::AppState;
use crate::auth::check_authorization;
use crate::error::AppError;
use crate::routes::kserve::{
    MODEL_VERSION, TEXT_INPUT, TEXT_OUTPUT, execute, generation_model, index, inputs_of, model,
    outputs_of, served, tensor_limits,
};

/// The protocol's methods over the same state as the HTTP API.
pub struct InferenceService {
    state: AppState,
}

impl InferenceService {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// The API-key check HTTP applies to every route but its health probes: the `authorization`
    /// metadata must carry `Bearer <key>` when keys are configured.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        check_authorization(self.state.keys(), authorization).map_err(Status::unauthenticated)
    }

    async fn infer(&self, req: ModelInferRequest) -> Result<ModelInferResponse, AppError> {
        let ready = model(&self.state, &req.model_name, version(&req.model_version))?;
        let truncate = bool_param(&req.parameters, "truncate", "request")?;
        // Answer in the form the request came in, unless it says otherwise.
        let raw_out = bool_param(&req.parameters, "binary_data_output", "request")?
            .unwrap_or(!req.raw_input_contents.is_empty());
        let requested: Option<Vec<String>> = if req.outputs.is_empty() {
            None
        } else {
            Some(req.outputs.into_iter().map(|o| o.name).collect())
        };
        // The message's sizes were checked against the same limits before it was decoded
        // (`wire.rs`); its tensors are expanded only once the request holds a slot.
        let max_batch = self.state.config().max_client_batch_size;
        let limits = tensor_limits(&ready, max_batch);
        let slot = ready.infer.admit()?;
        let inputs = decode_inputs(req.inputs, req.raw_input_contents, limits)?;
        let answer = execute(
            &ready,
            slot,
            max_batch,
            inputs,
            requested.as_deref(),
            truncate,
        )
        .await?;
        let (outputs, raw_output_contents) = encode_outputs(answer, raw_out);
        Ok(ModelInferResponse {
            model_name: ready.info.id.clone(),
            model_version: MODEL_VERSION.into(),
            id: req.id,
            outputs,
            raw_output_contents,
            ..Default::default()
        })
    }
}

/// The protocol's empty version means "the server's choice".
fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    /// Open, like `/v2/health/live`.
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    /// Open, like `/v2/health/ready`: true once every model is loaded and warmed up.
    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    /// False (not an error) for a model or version this server does not serve, as Triton
    /// answers, so `is_model_ready` returns False rather than raising.
    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let ready = served(&self.state, &r.name, version(&r.version)).is_ok_and(|m| m.is_ready());
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(ServerMetadataResponse {
            name: "kiln".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let v = version(&r.version);
        if generation_model(&self.state, &r.name, v)
            .map_err(|e| status_of(&e))?
            .is_some()
        {
            // A causal LM takes and gives one text per row, as over HTTP.
            let text = |name: &str| TensorMetadata {
                name: name.into(),
                datatype: "BYTES".into(),
                shape: vec![-1],
            };
            return Ok(Response::new(ModelMetadataResponse {
                name: r.name,
                versions: vec![MODEL_VERSION.into()],
                platform: "kiln".into(),
                inputs: vec![text(TEXT_INPUT)],
                outputs: vec![text(TEXT_OUTPUT)],
            }));
        }
        let ready = model(&self.state, &r.name, v).map_err(|e| status_of(&e))?;
        let inputs = inputs_of(&ready)
            .into_iter()
            .map(|t| TensorMetadata {
                name: t.name.into(),
                datatype: t.datatype.into(),
                shape: t.shape,
            })
            .collect();
        let outputs = outputs_of(&ready)
            .0
            .into_iter()
            .map(|(name, width)| TensorMetadata {
                name: name.into(),
                datatype: "FP32".into(),
                shape: vec![-1, width as i64],
            })
            .collect();
        Ok(Response::new(ModelMetadataResponse {
            name: ready.info.id.clone(),
            versions: vec![MODEL_VERSION.into()],
            platform: "kiln".into(),
            inputs,
            outputs,
        }))
    }

    /// Counted in the request metrics (`api="grpc"`) like an HTTP inference request: a call
    /// whose client goes away before the answer counts as cancelled.
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.authorize(&request)?;
        let header = request
            .metadata()
            .get(crate::request_id::HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let req = request.into_inner();
        // The request's own id, else the metadata's, else a new one; echoed in both places.
        let id = crate::request_id::from_client([Some(req.id.as_str()), header.as_deref()]);
        let span = tracing::info_span!(
            "grpc_infer",
            request_id = %id,
            model = tracing::field::Empty
        );
        let result = crate::request_id::scope(id.clone(), async {
            let tracker = self.state.metrics().start_request("grpc");
            crate::supervise::maybe_inject("grpc-handler");
            let result = self.infer(req).await;
            tracker.finish(result.as_ref().err().map(|e| e.kind));
            result
        })
        .instrument(span)
        .await;
        let mut response = result.map(Response::new).map_err(|e| {
            tracing::debug!(request_id = %id, error = %e.message, "gRPC ModelInfer failed");
            let mut status = status_of(&e);
            if let Ok(v) = id.parse() {
                status.metadata_mut().insert(crate::request_id::HEADER, v);
            }
            status
        })?;
        if let Ok(v) = id.parse() {
            response.metadata_mut().insert(crate::request_id::HEADER, v);
        }
        response.get_mut().id = id;
        Ok(response)
    }

    /// The repository extension's index, as `tritonclient.grpc`'s `get_model_repository_index`
    /// reads it.
    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let models = index(&self.state, r.ready)
            .into_iter()
            .map(|e| repository_index_response::ModelIndex {
                name: e.name,
                version: MODEL_VERSION.into(),
                state: e.state.into(),
                reason: e.reason.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        self.state
            .load_model(&r.model_name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        self.state
            .unload_model(&r.model_name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}
