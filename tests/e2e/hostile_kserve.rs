//! End to end, hostile KServe v2 tensors over HTTP and gRPC against the real `kiln serve` with
//! all-MiniLM-L6-v2: shapes whose byte counts overflow, shapes over the batch and token limits,
//! more data than the shape declares, too many tensors, dimensions or parameters. Each gets a
//! 4xx with a JSON body (or the documented gRPC status) while honest clients running at the same
//! moment all get their exact answers; and oversized requests (a 60 MB gRPC message of token
//! ids, HTTP bodies at the payload limit full of tiny tensors or texts) are refused with the server's
//! peak memory (`VmHWM`) growing by less than a stated bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_server::grpc::pb::model_infer_request::InferInputTensor;
use kiln_server::grpc::pb::*;
use kiln_tests::minilm_dir;
use kiln_tests::server::{Server, kiln_bin};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "all-MiniLM-L6-v2";
/// How much the server's peak resident memory may grow while it refuses the oversized requests.
const MEMORY_BOUND_MIB: u64 = 256;

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

fn infer_path() -> String {
    format!("/v2/models/{MODEL}/infer")
}

/// A binary-extension request: the JSON header, then `binary`.
fn binary_request(server: &Server, header: &Value, binary: &[u8]) -> (u16, Value) {
    let json = header.to_string();
    let mut body = json.clone().into_bytes();
    body.extend_from_slice(binary);
    let len = json.len().to_string();
    let r = server.request(
        "POST",
        &infer_path(),
        &[
            ("content-type", "application/octet-stream"),
            ("inference-header-content-length", &len),
        ],
        Some(&body),
    );
    (r.status, r.json())
}

fn ids_tensor(shape: Vec<i64>, contents: Option<Vec<i64>>) -> InferInputTensor {
    InferInputTensor {
        name: "input_ids".into(),
        datatype: "INT64".into(),
        shape,
        contents: contents.map(|v| InferTensorContents {
            int64_contents: v,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn infer_request(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// A hostile HTTP request: what it is, its body, its `Inference-Header-Content-Length`, the
/// status expected and words the error must contain.
type HostileHttp = (&'static str, Vec<u8>, Option<usize>, u16, &'static str);

fn hostile_http() -> Vec<HostileHttp> {
    let tensor = |shape: Value, data: Value| json!({ "name": "input_ids", "shape": shape, "datatype": "INT64", "data": data });
    let one_text = json!({ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"] });
    let header = json!({ "inputs": [{
        "name": "input_ids", "shape": [1, 1u64 << 61], "datatype": "INT64",
        "parameters": { "binary_data_size": 0 }
    }]})
    .to_string();
    let header_len = header.len();
    vec![
        (
            "INT64 shape whose byte count overflows, binary extension",
            header.into_bytes(),
            Some(header_len),
            400,
            "input_ids",
        ),
        (
            "shape whose element count overflows",
            json!({ "inputs": [tensor(json!([1u64 << 62, 8]), json!([1]))] })
                .to_string()
                .into_bytes(),
            None,
            400,
            "too large",
        ),
        (
            "more rows than --max-client-batch-size",
            json!({ "inputs": [tensor(json!([100, 1]), json!(vec![101; 100]))] })
                .to_string()
                .into_bytes(),
            None,
            413,
            "max_client_batch_size",
        ),
        (
            "rows longer than the model's token limit",
            json!({ "inputs": [tensor(json!([1, 100_000]), json!([101]))] })
                .to_string()
                .into_bytes(),
            None,
            400,
            "at most",
        ),
        (
            "more data than the shape declares",
            json!({ "inputs": [tensor(json!([1, 3]), json!(vec![101; 5000]))] })
                .to_string()
                .into_bytes(),
            None,
            400,
            "more than 3 data elements",
        ),
        (
            "too many input tensors",
            json!({ "inputs": vec![one_text.clone(); 17] }).to_string().into_bytes(),
            None,
            400,
            "more than 16 tensors",
        ),
        (
            "too many dimensions",
            json!({ "inputs": [tensor(json!(vec![1; 9]), json!([101]))] })
                .to_string()
                .into_bytes(),
            None,
            400,
            "more than 8 dimensions",
        ),
        (
            "too many parameters",
            json!({
                "inputs": [one_text.clone()],
                "parameters": (0..65).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>(),
            })
            .to_string()
            .into_bytes(),
            None,
            400,
            "more than 64 parameters",
        ),
    ]
}

/// Honest clients: each sends the same texts over and over (alternating HTTP and gRPC) and
/// checks every answer is exactly the first one. Returns how many answers each checked.
fn honest_clients(
    server: &Server,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<usize>> {
    (0..n)
        .map(|i| {
            let (url, grpc_url, stop) = (server.url(&infer_path()), server.grpc_url.clone(), stop.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let mut grpc = runtime.block_on(async {
                    let channel = Channel::from_shared(grpc_url).unwrap().connect().await.unwrap();
                    GrpcInferenceServiceClient::new(channel)
                });
                let text = format!("honest client {i} asks for an embedding");
                let body = json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": [text] }] });
                let mut first: Option<Vec<f32>> = None;
                let mut checked = 0;
                while !stop.load(Ordering::Relaxed) || checked < 4 {
                    let got: Vec<f32> = if checked % 2 == 0 {
                        let resp = ureq::post(&url)
                            .set("content-type", "application/json")
                            .send_string(&body.to_string())
                            .unwrap_or_else(|e| panic!("honest HTTP request failed: {e}"));
                        let v: Value = resp.into_json().unwrap();
                        v["outputs"][0]["data"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_f64().unwrap() as f32)
                            .collect()
                    } else {
                        let req = infer_request(
                            vec![InferInputTensor {
                                name: "text".into(),
                                datatype: "BYTES".into(),
                                shape: vec![1],
                                contents: Some(InferTensorContents {
                                    bytes_contents: vec![text.clone().into_bytes()],
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            vec![],
                        );
                        let resp = runtime
                            .block_on(grpc.model_infer(req))
                            .unwrap_or_else(|e| panic!("honest gRPC request failed: {e}"))
                            .into_inner();
                        resp.outputs[0].contents.as_ref().unwrap().fp32_contents.clone()
                    };
                    match &first {
                        None => first = Some(got),
                        Some(want) => {
                            let diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                            assert!(diff < 1e-5, "client {i}: answer changed by {diff}");
                        }
                    }
                    checked += 1;
                }
                checked
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tensors_get_4xx_while_honest_clients_get_their_answers() {
    let server = start(&["--max-client-batch-size", "8"]);
    let stop = Arc::new(AtomicBool::new(false));
    let honest = honest_clients(&server, 3, &stop);

    for (what, body, header_len, status, words) in hostile_http() {
        let mut headers = vec![("content-type", "application/json")];
        let len;
        if let Some(n) = header_len {
            len = n.to_string();
            headers.push(("inference-header-content-length", &len));
        }
        let r = server.request("POST", &infer_path(), &headers, Some(&body));
        let v = r.json();
        assert_eq!(r.status, status, "{what}: {v}");
        let message = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no JSON error: {v}"));
        assert!(
            message.contains(words),
            "{what}: `{message}` lacks `{words}`"
        );
    }
    let (status, v) = binary_request(
        &server,
        &json!({ "inputs": [{ "name": "input_ids", "shape": [1, 1u64 << 61], "datatype": "INT64", "parameters": { "binary_data_size": 8 } }] }),
        &1i64.to_le_bytes(),
    );
    assert_eq!(status, 400, "{v}");

    let mut grpc = client(&server).await;
    let cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        (
            "INT64 shape whose byte count overflows, raw contents",
            infer_request(vec![ids_tensor(vec![1, 1 << 61], None)], vec![vec![]]),
            Code::InvalidArgument,
            "input_ids",
        ),
        (
            "shape whose element count overflows",
            infer_request(vec![ids_tensor(vec![1 << 62, 8], Some(vec![1]))], vec![]),
            Code::InvalidArgument,
            "too large",
        ),
        (
            "more rows than --max-client-batch-size",
            infer_request(vec![ids_tensor(vec![100, 1], Some(vec![101; 100]))], vec![]),
            Code::ResourceExhausted,
            "max_client_batch_size",
        ),
        (
            "more data than the shape declares",
            infer_request(vec![ids_tensor(vec![1, 3], Some(vec![101; 5000]))], vec![]),
            Code::InvalidArgument,
            "5000 data elements for a shape of 3",
        ),
        (
            "too many inputs",
            infer_request(vec![ids_tensor(vec![1, 1], Some(vec![101])); 17], vec![]),
            Code::InvalidArgument,
            "more than 16 inputs",
        ),
        (
            "a million empty BYTES elements",
            infer_request(
                vec![InferInputTensor {
                    name: "text".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    contents: Some(InferTensorContents {
                        bytes_contents: vec![Vec::new(); 1_000_000],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                vec![],
            ),
            Code::InvalidArgument,
            "1000000 data elements for a shape of 1",
        ),
    ];
    for (what, req, code, words) in cases {
        let status = grpc.model_infer(req).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(words),
            "{what}: `{}` lacks `{words}`",
            status.message()
        );
    }

    stop.store(true, Ordering::Relaxed);
    for h in honest {
        assert!(h.join().expect("an honest client failed") >= 4);
    }
    // Still serving, on both ports.
    let (status, _) = server.get("/v2/health/ready");
    assert_eq!(status, 200);
    let ok = grpc
        .model_infer(infer_request(
            vec![ids_tensor(vec![1, 3], Some(vec![101, 7592, 102]))],
            vec![],
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// The server's peak resident set size, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/pid/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_in_bounded_memory() {
    const LIMIT: usize = 64 << 20;
    let limit = LIMIT.to_string();
    let server = start(&["--payload-limit", &limit, "--grpc-max-message-size", &limit]);
    let mut grpc = client(&server).await;
    // Warm up both paths, so the baseline includes normal serving.
    for _ in 0..3 {
        let ok = grpc
            .model_infer(infer_request(
                vec![ids_tensor(vec![1, 3], Some(vec![101, 7592, 102]))],
                vec![],
            ))
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        let (status, v) = server.post(
            &infer_path(),
            &json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["warm up"] }] }),
        );
        assert_eq!(status, 200, "{v}");
    }
    let before = vm_hwm_kib(server.pid());

    // 60 MB of int64 token ids (one byte each on the wire): 480 MB once decoded.
    let ids = vec![1i64; 60_000_000];
    for (what, shape) in [
        ("declared", vec![1, 60_000_000]),
        ("undeclared", vec![1, 8]),
    ] {
        let req = infer_request(vec![ids_tensor(shape, Some(ids.clone()))], vec![]);
        let status = grpc.model_infer(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    // The same as raw contents: 8 bytes an id.
    let raw = vec![0u8; 60_000_000];
    let status = grpc
        .model_infer(infer_request(
            vec![ids_tensor(vec![1, 7_500_000], None)],
            vec![raw],
        ))
        .await
        .expect_err("raw");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // HTTP bodies just under the payload limit, full of tiny things.
    let fill = |head: &str, item: &str, tail: &str| {
        let n = (LIMIT - head.len() - tail.len() - 16) / (item.len() + 1);
        let mut body = String::with_capacity(LIMIT);
        body.push_str(head);
        for i in 0..n {
            if i > 0 {
                body.push(',');
            }
            body.push_str(item);
        }
        body.push_str(tail);
        body
    };
    let bodies = [
        (
            "tiny tensors",
            fill(
                r#"{"inputs":["#,
                r#"{"name":"text","shape":[1],"datatype":"BYTES","data":["a"]}"#,
                "]}",
            ),
        ),
        (
            "tiny data elements",
            fill(
                r#"{"inputs":[{"name":"input_ids","shape":[1,4],"datatype":"INT64","data":["#,
                "1",
                "]}]}",
            ),
        ),
        (
            "tiny parameters",
            fill(r#"{"inputs":[],"parameters":{"stop":["#, r#""a""#, "]}}"),
        ),
    ];
    for (what, body) in bodies {
        assert!(body.len() <= LIMIT);
        let (status, v) = server.post_raw(&infer_path(), Some("application/json"), body.as_bytes());
        assert_eq!(status, 400, "{what}: {v}");
        assert!(v["error"].is_string(), "{what}: {v}");
    }
    // The JSON APIs (TEI, OpenAI): tiny texts, and tiny nested lists.
    for (path, body) in [
        ("/embed", fill(r#"{"inputs":["#, r#""a""#, "]}")),
        ("/v1/embeddings", fill(r#"{"input":["#, "[]", "]}")),
    ] {
        let (status, v) = server.post_raw(path, Some("application/json"), body.as_bytes());
        assert_eq!(status, 413, "{path}: {v}");
    }

    let after = vm_hwm_kib(server.pid());
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "VmHWM {} MiB before, {} MiB after: grew {grown_mib} MiB",
        before / 1024,
        after / 1024
    );
    assert!(
        grown_mib < MEMORY_BOUND_MIB,
        "peak memory grew by {grown_mib} MiB refusing oversized requests (bound {MEMORY_BOUND_MIB} MiB)"
    );
    // And the server still answers.
    let ok = grpc
        .model_infer(infer_request(
            vec![ids_tensor(vec![1, 3], Some(vec![101, 7592, 102]))],
            vec![],
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}
