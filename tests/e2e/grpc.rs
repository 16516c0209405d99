//! End to end, kiln's gRPC port (KServe v2 `inference.GRPCInferenceService`, grpc.health.v1,
//! reflection) on the real `kiln serve` binary, through tonic's client: metadata and readiness;
//! ModelInfer with typed contents, raw contents and token ids, against the fixtures and against
//! the HTTP API's answers; precise status codes for bad input, with the server serving on;
//! API keys, the concurrency limit and message-size limit shared with HTTP; SIGTERM drains
//! in-flight gRPC calls.

use std::time::Duration;

use kiln_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_server::grpc::pb::infer_parameter::ParameterChoice;
use kiln_server::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kiln_server::grpc::pb::*;
use kiln_tests::server::{Server, kiln_bin};
use kiln_tests::{cosine, fixtures, max_abs_diff, minilm_dir, read_jsonl, read_npy};
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request};

const MODEL: &str = "all-MiniLM-L6-v2";

fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--model-id", MODEL];
    args.extend_from_slice(extra);
    Server::start(&kiln_bin(env!("CARGO_BIN_EXE_kiln")), &minilm_dir(), &args)
}

async fn client(server: &Server) -> GrpcInferenceServiceClient<Channel> {
    let channel = Channel::from_shared(server.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port");
    GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

fn fixture_texts() -> Vec<String> {
    read_jsonl(&fixtures().join("minilm/inputs.jsonl"))
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

fn bytes_contents(texts: &[String]) -> InferTensorContents {
    InferTensorContents {
        bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

/// BYTES elements as raw contents: each a 4-byte little-endian length and its bytes.
fn raw_bytes(texts: &[String]) -> Vec<u8> {
    let mut raw = Vec::new();
    for t in texts {
        raw.extend_from_slice(&(t.len() as u32).to_le_bytes());
        raw.extend_from_slice(t.as_bytes());
    }
    raw
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn text_request(texts: &[String]) -> ModelInferRequest {
    let mut t = tensor("text", "BYTES", &[texts.len() as i64]);
    t.contents = Some(bytes_contents(texts));
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![t],
        ..Default::default()
    }
}

fn raw_text_request(texts: &[String]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![tensor("text", "BYTES", &[texts.len() as i64])],
        raw_input_contents: vec![raw_bytes(texts)],
        ..Default::default()
    }
}

/// The FP32 values of output `i`, from raw or typed contents.
fn output_values(r: &ModelInferResponse, i: usize) -> Vec<f32> {
    if r.raw_output_contents.is_empty() {
        r.outputs[i]
            .contents
            .as_ref()
            .unwrap()
            .fp32_contents
            .clone()
    } else {
        r.raw_output_contents[i]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn check_against_fixtures(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.chunks(384).zip(want.chunks(384)).enumerate() {
        let c = cosine(g, w);
        assert!(c >= 0.99999, "{what}: text {i} cosine {c}");
    }
    let err = max_abs_diff(got, want);
    assert!(err <= 1e-4, "{what}: max abs error {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_readiness_and_model_infer_match_the_fixtures_and_http() {
    let server = start(&[]);
    let mut c = client(&server).await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    for (name, version, ready) in [
        (MODEL, "", true),
        (MODEL, "1", true),
        (MODEL, "2", false),
        ("no-such-model", "", false),
    ] {
        let r = c
            .model_ready(ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ready, ready, "ModelReady({name}, {version:?})");
    }
    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "kiln");
    let m = c
        .model_metadata(ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (m.name.as_str(), m.versions.as_slice()),
        (MODEL, &["1".to_string()][..])
    );
    assert!(
        m.inputs
            .iter()
            .any(|t| t.name == "text" && t.datatype == "BYTES" && t.shape == [-1])
    );
    assert!(
        m.outputs.iter().any(|t| t.name == "sentence_embedding"
            && t.datatype == "FP32"
            && t.shape == [-1, 384])
    );
    let err = c
        .model_metadata(ModelMetadataRequest {
            name: "no-such-model".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let texts = fixture_texts();
    let (_, want) = read_npy(&fixtures().join("minilm/embeddings_normalized.npy"));

    // Typed contents in, typed contents out; the id comes back.
    let mut req = text_request(&texts);
    req.id = "typed-1".into();
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(
        (
            r.model_name.as_str(),
            r.model_version.as_str(),
            r.id.as_str()
        ),
        (MODEL, "1", "typed-1")
    );
    assert!(r.raw_output_contents.is_empty());
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, "sentence_embedding");
    assert_eq!(r.outputs[0].datatype, "FP32");
    assert_eq!(r.outputs[0].shape, [texts.len() as i64, 384]);
    let typed = output_values(&r, 0);
    check_against_fixtures("typed contents", &typed, &want);

    // Raw contents in, raw contents out.
    let r = c
        .model_infer(raw_text_request(&texts))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.raw_output_contents.len(), 1);
    assert!(r.outputs[0].contents.is_none());
    let raw = output_values(&r, 0);
    assert_eq!(raw, typed, "raw and typed answers differ");

    // The request can ask for the other form, and for several outputs by name.
    let mut req = raw_text_request(&texts[..2]);
    req.parameters.insert(
        "binary_data_output".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(false)),
        },
    );
    req.outputs = ["pooled_embedding", "normalized_embedding"]
        .iter()
        .map(|n| InferRequestedOutputTensor {
            name: (*n).into(),
            ..Default::default()
        })
        .collect();
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert!(r.raw_output_contents.is_empty());
    let names: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["pooled_embedding", "normalized_embedding"]);
    check_against_fixtures(
        "normalized_embedding",
        &output_values(&r, 1),
        &want[..2 * 384],
    );

    // Token ids with a right-padding mask, as a client that tokenizes itself sends them.
    let (shape, ids) = read_npy(&fixtures().join("minilm/input_ids_padded.npy"));
    let (_, mask) = read_npy(&fixtures().join("minilm/attention_mask_padded.npy"));
    let shape = [shape[0] as i64, shape[1] as i64];
    let as_i64 = |v: &[f32]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let mut ids_t = tensor("input_ids", "INT64", &shape);
    ids_t.contents = Some(InferTensorContents {
        int64_contents: as_i64(&ids),
        ..Default::default()
    });
    let mut mask_t = tensor("attention_mask", "INT64", &shape);
    mask_t.contents = Some(InferTensorContents {
        int64_contents: as_i64(&mask),
        ..Default::default()
    });
    let r = c
        .model_infer(ModelInferRequest {
            model_name: MODEL.into(),
            model_version: "1".into(),
            inputs: vec![ids_t, mask_t],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    check_against_fixtures(
        "INT64 input_ids + attention_mask",
        &output_values(&r, 0),
        &want,
    );

    // The same texts over HTTP get the same vectors, bit for bit: one batcher, one model.
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": texts, "model": MODEL }));
    assert_eq!(status, 200);
    let http: Vec<f32> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(http, typed, "HTTP and gRPC answers differ");

    // Counted in the shared metrics under api="grpc".
    assert_eq!(server.metric("kiln_request_total{api=\"grpc\"}"), 4.0);
    assert_eq!(
        server.metric("kiln_request_success_total{api=\"grpc\"}"),
        4.0
    );
    server.terminate();
}

fn with_param(mut req: ModelInferRequest, key: &str, v: ParameterChoice) -> ModelInferRequest {
    req.parameters.insert(
        key.into(),
        InferParameter {
            parameter_choice: Some(v),
        },
    );
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_status_codes_and_the_server_goes_on() {
    let server = start(&[
        "--max-client-batch-size",
        "4",
        "--grpc-max-message-size",
        "100000",
    ]);
    let mut c = client(&server).await;
    let two = vec!["a".to_string(), "b".to_string()];
    let typed = |inputs: Vec<InferInputTensor>| ModelInferRequest {
        model_name: MODEL.into(),
        inputs,
        ..Default::default()
    };
    let with_contents = |mut t: InferInputTensor, c: InferTensorContents| {
        t.contents = Some(c);
        t
    };
    let ints = |v: Vec<i64>| InferTensorContents {
        int64_contents: v,
        ..Default::default()
    };
    let mut cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        (
            "unknown model",
            ModelInferRequest {
                model_name: "nope".into(),
                ..text_request(&two)
            },
            Code::NotFound,
            "not served",
        ),
        (
            "unknown version",
            ModelInferRequest {
                model_version: "7".into(),
                ..text_request(&two)
            },
            Code::NotFound,
            "no version",
        ),
        (
            "no inputs",
            typed(vec![]),
            Code::InvalidArgument,
            "needs a `text`",
        ),
        (
            "no contents, no raw",
            typed(vec![tensor("text", "BYTES", &[1])]),
            Code::InvalidArgument,
            "no `contents`",
        ),
        (
            "shape disagrees with contents",
            typed(vec![with_contents(
                tensor("text", "BYTES", &[3]),
                bytes_contents(&two),
            )]),
            Code::InvalidArgument,
            "2 data elements for a shape of 3",
        ),
        (
            "negative dimension",
            typed(vec![with_contents(
                tensor("text", "BYTES", &[-2]),
                bytes_contents(&two),
            )]),
            Code::InvalidArgument,
            "negative dimension",
        ),
        (
            "shape overflows",
            typed(vec![with_contents(
                tensor("input_ids", "INT64", &[i64::MAX, i64::MAX]),
                ints(vec![1]),
            )]),
            Code::InvalidArgument,
            "too large",
        ),
        (
            "FP32 text",
            typed(vec![with_contents(
                tensor("text", "FP32", &[1]),
                InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                },
            )]),
            Code::InvalidArgument,
            "datatype `FP32` is not accepted",
        ),
        (
            "contents in the wrong field",
            typed(vec![with_contents(
                tensor("text", "BYTES", &[1]),
                ints(vec![5]),
            )]),
            Code::InvalidArgument,
            "go in `bytes_contents`, not `int64_contents`",
        ),
        (
            "invalid UTF-8",
            typed(vec![with_contents(
                tensor("text", "BYTES", &[1]),
                InferTensorContents {
                    bytes_contents: vec![vec![0xff, 0xfe]],
                    ..Default::default()
                },
            )]),
            Code::InvalidArgument,
            "not valid UTF-8",
        ),
        (
            "raw entries do not match the inputs",
            ModelInferRequest {
                raw_input_contents: vec![raw_bytes(&two), raw_bytes(&two)],
                ..raw_text_request(&two)
            },
            Code::InvalidArgument,
            "2 entries for 1 inputs",
        ),
        (
            "raw BYTES element overruns",
            ModelInferRequest {
                raw_input_contents: vec![vec![200, 0, 0, 0, b'x']],
                ..raw_text_request(&two[..1])
            },
            Code::InvalidArgument,
            "claims 200 bytes",
        ),
        (
            "raw INT64 of the wrong length",
            ModelInferRequest {
                model_name: MODEL.into(),
                inputs: vec![tensor("input_ids", "INT64", &[1, 3])],
                raw_input_contents: vec![vec![0; 20]],
                ..Default::default()
            },
            Code::InvalidArgument,
            "24 bytes expected",
        ),
        (
            "contents and raw together",
            ModelInferRequest {
                raw_input_contents: vec![raw_bytes(&two)],
                ..text_request(&two)
            },
            Code::InvalidArgument,
            "send one",
        ),
        (
            "unknown input",
            typed(vec![with_contents(
                tensor("pixels", "BYTES", &[1]),
                bytes_contents(&two[..1]),
            )]),
            Code::InvalidArgument,
            "has no input `pixels`",
        ),
        (
            "input twice",
            typed(vec![
                with_contents(tensor("text", "BYTES", &[1]), bytes_contents(&two[..1])),
                with_contents(tensor("text", "BYTES", &[1]), bytes_contents(&two[..1])),
            ]),
            Code::InvalidArgument,
            "appears twice",
        ),
        (
            "unknown output",
            ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor {
                    name: "logits".into(),
                    ..Default::default()
                }],
                ..text_request(&two)
            },
            Code::InvalidArgument,
            "has no output `logits`",
        ),
        (
            "token id outside the vocabulary",
            typed(vec![with_contents(
                tensor("input_ids", "INT64", &[1, 3]),
                ints(vec![101, 99_999_999, 102]),
            )]),
            Code::InvalidArgument,
            "not in the model's vocabulary",
        ),
        (
            "a parameter of the wrong type",
            with_param(
                text_request(&two),
                "truncate",
                ParameterChoice::StringParam("yes".into()),
            ),
            Code::InvalidArgument,
            "must be a bool_param",
        ),
        (
            "over-long input with truncate off",
            with_param(
                text_request(&["word ".repeat(400)]),
                "truncate",
                ParameterChoice::BoolParam(false),
            ),
            Code::InvalidArgument,
            "tokens",
        ),
        (
            "more inputs than --max-client-batch-size",
            text_request(&vec!["x".to_string(); 5]),
            Code::ResourceExhausted,
            "exceed the limit of 4",
        ),
        (
            "a message over --grpc-max-message-size",
            text_request(&["y".repeat(200_000)]),
            // tonic's decoder refuses it before kiln sees it, with OUT_OF_RANGE (grpc-core says
            // RESOURCE_EXHAUSTED); the README says so.
            Code::OutOfRange,
            "message length too large",
        ),
    ];
    for (what, req, code, needle) in cases.drain(..) {
        let err = c
            .model_infer(req)
            .await
            .expect_err(&format!("{what}: expected an error"));
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{what}: {:?}",
            err.message()
        );
    }
    // Still serving, and no failure was counted as an inference (server) error.
    let r = c
        .model_infer(text_request(&two))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output_values(&r, 0).len(), 2 * 384);
    assert_eq!(
        server.metric("kiln_request_failure_total{reason=\"inference\"}"),
        0.0
    );
    assert!(server.metric("kiln_request_failure_total{reason=\"validation\"}") >= 19.0);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_health_and_reflection() {
    let server = start(&["--api-key", "grpc-secret"]);
    let mut c = client(&server).await;
    let two = vec!["a".to_string(), "b".to_string()];
    // Liveness and readiness stay open, as /v2/health/* do over HTTP.
    assert!(c.server_live(ServerLiveRequest {}).await.is_ok());
    assert!(c.server_ready(ServerReadyRequest {}).await.is_ok());
    let err = c.model_infer(text_request(&two)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("missing API key"), "{err:?}");
    let mut req = Request::new(text_request(&two));
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("invalid API key"), "{err:?}");
    let mut req = Request::new(ModelMetadataRequest {
        name: MODEL.into(),
        version: String::new(),
    });
    req.metadata_mut()
        .insert("authorization", "Bearer grpc-secret".parse().unwrap());
    assert!(c.model_metadata(req).await.is_ok());
    let mut req = Request::new(text_request(&two));
    req.metadata_mut()
        .insert("authorization", "Bearer grpc-secret".parse().unwrap());
    assert!(c.model_infer(req).await.is_ok());

    // grpc.health.v1: the server ("") and the inference service are SERVING once ready.
    let channel = Channel::from_shared(server.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "inference.GRPCInferenceService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Reflection lists the services (what grpcurl and Postman ask first).
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![ask]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["inference.GRPCInferenceService", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    server.terminate();
}

/// Long requests that keep the backend busy for a while.
fn slow_request(n: usize) -> ModelInferRequest {
    text_request(&vec![
        "the quick brown fox jumps over the lazy dog "
            .repeat(40);
        n
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_resource_exhausted_and_sigterm_drains_in_flight_calls() {
    let mut server = start(&[
        "--max-concurrent-requests",
        "2",
        "--max-batch-requests",
        "1",
        "--max-queue-delay",
        "0",
    ]);
    let c = client(&server).await;
    // Ten at once with two slots: the ones over the limit are refused at once.
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.model_infer(slow_request(16)).await })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("concurrent"), "{e:?}");
                assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
                refused += 1;
            }
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    assert_eq!(
        server.metric("kiln_request_failure_total{reason=\"overloaded\"}"),
        refused as f64
    );

    // Two calls in flight when SIGTERM arrives both get their answers; then kiln exits 0.
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.model_infer(slow_request(16)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.sigterm();
    for call in in_flight {
        let r = call.await.unwrap().expect("in-flight call after SIGTERM");
        assert_eq!(output_values(&r.into_inner(), 0).len(), 16 * 384);
    }
    let code = server.wait_exit(Duration::from_secs(30));
    assert!(code.success(), "exit status {code} after SIGTERM");
}
