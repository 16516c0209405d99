//! The bodies of the fuzz targets (`fuzz/`, run by `scripts/fuzz.sh`) and of the test that
//! replays their seed corpus and every crash found so far (`tests/tests/fuzz_regressions.rs`).
//!
//! Each takes bytes as a client (or a damaged file) would supply them and runs exactly the code
//! the server runs on them before any model is involved: the KServe v2 REST body parser and
//! tensor decoder, the gRPC `ModelInfer` wire check and decoder, the OpenAI / TEI / TGI request
//! parsers with their checks, the safetensors reader and the plan-cache entry reader. None may
//! panic, and what they accept must respect the limits they were given: a target asserts that.

use std::path::PathBuf;

use prost::Message;

use crate::grpc::pb::ModelInferRequest;
use crate::routes::kserve::{Data, Input, TensorLimits};

/// The limits the targets check against: small, so the fuzzer reaches them.
pub(crate) const LIMITS: TensorLimits = TensorLimits { rows: 8, width: 64 };

/// A decoded input holds no more than its header's limits allow.
fn assert_within_limits(input: &Input) {
    let elements = match &input.data {
        Data::Bytes(t) => t.len(),
        Data::Int64(v) => v.len(),
    };
    assert!(
        elements <= LIMITS.rows * LIMITS.width,
        "input `{}` decoded {elements} elements past the limits",
        input.name
    );
    assert_eq!(
        input.shape.iter().product::<usize>(),
        elements,
        "input `{}`: shape and data disagree",
        input.name
    );
}

/// A KServe v2 REST infer body in the binary tensor data extension: the first two bytes
/// (little-endian) are its `Inference-Header-Content-Length`, the rest the body.
pub fn kserve_binary(data: &[u8]) {
    if let [a, b, body @ ..] = data {
        kserve_body(body, Some(u16::from_le_bytes([*a, *b]).to_string()));
    }
}

/// A KServe v2 REST infer body, all JSON.
pub fn kserve_json(data: &[u8]) {
    kserve_body(data, None);
}

fn kserve_body(body: &[u8], header: Option<String>) {
    let Ok((req, binary)) = crate::routes::kserve::split_body(body, header.as_deref()) else {
        return;
    };
    if let Ok(inputs) = crate::routes::kserve::decode_all(req.inputs, binary, LIMITS) {
        inputs.iter().for_each(assert_within_limits);
    }
}

/// A gRPC `ModelInfer` message as it arrives (after the gRPC frame): the wire check, then
/// prost, then the tensor decoder. A message the wire check passes must decode within limits.
pub fn grpc_infer(data: &[u8]) {
    if crate::grpc::check_infer_request(data, LIMITS).is_err() {
        return;
    }
    let Ok(req) = ModelInferRequest::decode(data) else {
        return;
    };
    assert!(req.inputs.len() <= crate::routes::kserve::MAX_TENSORS);
    for t in &req.inputs {
        let contents = t.contents.as_ref();
        let elements = contents.map_or(0, |c| {
            c.int64_contents.len()
                + c.bytes_contents.len()
                + c.bool_contents.len()
                + c.int_contents.len()
                + c.uint_contents.len()
                + c.uint64_contents.len()
                + c.fp32_contents.len()
                + c.fp64_contents.len()
        });
        assert!(
            elements <= LIMITS.rows * LIMITS.width,
            "the wire check let {elements} elements through"
        );
    }
    if let Ok(inputs) = crate::grpc::decode_inputs(req.inputs, req.raw_input_contents, LIMITS) {
        inputs.iter().for_each(assert_within_limits);
    }
}

/// An OpenAI, TEI or TGI request body. The first byte chooses the route.
pub fn openai_requests(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let max = LIMITS.rows;
    let _ = match route % 8 {
        0 => crate::routes::completions::check_body(false, body),
        1 => crate::routes::completions::check_body(true, body),
        2 => crate::routes::generate::check_body(body),
        3 => crate::routes::openai::check_body(body, max),
        4 => crate::routes::native::check_body("embed", body, max),
        5 => crate::routes::native::check_body("predict", body, max),
        6 => crate::routes::native::check_body("rerank", body, max),
        _ => crate::routes::native::check_body("tokenize", body, max),
    };
}

/// A scratch file for the readers that take a path (both map their file), one per thread.
fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{:?}", std::thread::current().id()));
    std::fs::write(&path, data).expect("write the fuzz scratch file");
    path
}

/// A `model.safetensors`: the header, then every tensor read as f32 at its recorded shape.
pub fn safetensors(data: &[u8]) {
    let path = scratch("model.safetensors", data);
    if let Ok(file) = kiln_models::weights::SafetensorsFile::open_plain(&path) {
        for name in file.names() {
            if let Some(shape) = file.shape(&name)
                && let Ok(t) = file.tensor(&name, &shape)
            {
                assert_eq!(t.len(), shape.iter().product::<usize>());
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A plan-cache entry file: read and verified, then prepared on the CPU when it checks out.
/// The bytes are read as they are, then resealed (every checksum recomputed), so that mutations
/// also reach the header's parse, the buffer records and the graph check behind the checksums.
pub fn plan_cache_entry(data: &[u8]) {
    use kiln_engine::cache::entry;
    let resealed = entry::reseal(data);
    for bytes in std::iter::once(data).chain(resealed.as_deref()) {
        let path = scratch("entry.kiln", bytes);
        if let Ok(plan) = entry::read(&path) {
            let _ = kiln_engine::prepare(
                plan.graph,
                kiln_engine::DeviceKind::Cpu,
                kiln_engine::exec::ExecOptions::default(),
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// A fuzz target: runs the server's code on arbitrary bytes; a panic is a finding.
pub type Target = fn(&[u8]);

/// Every target by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("kserve_binary", kserve_binary),
    ("kserve_json", kserve_json),
    ("grpc_infer", grpc_infer),
    ("openai_requests", openai_requests),
    ("safetensors", safetensors),
    ("plan_cache_entry", plan_cache_entry),
];

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use kiln_engine::HostTensor;
    use serde_json::json;

    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
    }

    /// Every file of the checked-in seed corpus and of the crashes found so far
    /// (`fuzz/regressions/<target>/`), through its target: none may panic.
    #[test]
    fn seeds_and_regressions_replay_without_a_panic() {
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let mut files = 0;
            for folder in ["seeds", "regressions"] {
                let Ok(dir) = std::fs::read_dir(fuzz_dir().join(folder).join(name)) else {
                    continue;
                };
                for entry in dir.flatten() {
                    let data = std::fs::read(entry.path()).unwrap();
                    let outcome = std::panic::catch_unwind(|| target(&data));
                    assert!(
                        outcome.is_ok(),
                        "{name}: {} panicked",
                        entry.path().display()
                    );
                    files += 1;
                }
            }
            assert!(files > 0, "target {name} has no seeds in fuzz/seeds/{name}");
            replayed += files;
        }
        eprintln!("replayed {replayed} fuzz inputs");
    }

    fn safetensors_seed() -> Vec<u8> {
        let header = json!({
            "__metadata__": { "format": "pt" },
            "a": { "dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16] },
            "b": { "dtype": "F16", "shape": [3], "data_offsets": [16, 22] },
            "c": { "dtype": "BF16", "shape": [1], "data_offsets": [22, 24] },
        })
        .to_string();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        for v in [1.0f32, -2.0, 0.5, 3.25] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0x00, 0x3c, 0x00, 0xc0, 0x00, 0x38, 0x80, 0x3f]);
        out
    }

    /// A small compiled plan (embedding, linear, layer norm) as its cache entry.
    fn plan_cache_seed() -> Vec<u8> {
        use kiln_engine::backend::CpuBackend;
        use kiln_engine::cache::{PlanCache, key::KeyMaterial};
        use kiln_engine::compile::{CompileOptions, compile};
        use kiln_engine::ir::{ConstRole, DType, Dim, GraphBuilder, Op};

        let values = |n: usize| (0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>();
        let mut g = GraphBuilder::new();
        let ids = g.input("ids", DType::I64, &[Dim::Batch, Dim::Seq]).unwrap();
        let table = HostTensor::f32(vec![11, 8], values(88)).unwrap();
        let table = g.constant("emb", table, ConstRole::Other).unwrap();
        let x = g.push(Op::Embedding, &[table, ids], "emb").unwrap();
        let w = HostTensor::f32(vec![4, 8], values(32)).unwrap();
        let w = g.constant("w", w, ConstRole::LinearWeight).unwrap();
        let b = g.constant(
            "b",
            HostTensor::f32(vec![4], values(4)).unwrap(),
            ConstRole::Other,
        );
        let y = g.push(Op::Linear, &[x, w, b.unwrap()], "lin").unwrap();
        let graph = g.finish(vec![("y".into(), y)]).unwrap();
        let compiled = compile(
            graph,
            &CpuBackend::new(1),
            &CompileOptions::default(),
            kiln_engine::ExecOptions::default(),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-seed-{}", std::process::id()));
        let cache = PlanCache::open(&dir).unwrap();
        let material = KeyMaterial {
            kiln_version: "seed".into(),
            kiln_build: "seed".into(),
            ir_version: kiln_engine::cache::key::IR_VERSION,
            entry_format: kiln_engine::cache::entry::FORMAT_VERSION,
            model_files: vec![],
            options: Default::default(),
            device: vec![],
        };
        cache
            .store(&material, "seed", &compiled.graph, &compiled.report)
            .unwrap();
        let entry = std::fs::read_dir(dir.join("plans"))
            .unwrap()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "kiln"))
            .unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    }

    /// Writes the seed corpus (`cargo test -p kiln-server --lib write_fuzz_seeds -- --ignored`):
    /// a few valid and nearly valid inputs per target, for the fuzzer to mutate.
    #[test]
    #[ignore = "writes fuzz/seeds; run by hand when the formats change"]
    fn write_fuzz_seeds() {
        let text = json!({ "name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"] });
        let ids = json!({ "name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [[101, 7592, 102]] });
        let json_bodies = [
            json!({ "inputs": [text] }),
            json!({ "id": "x", "inputs": [ids], "outputs": [{ "name": "embedding" }], "parameters": { "truncate": true } }),
            json!({ "inputs": [{ "name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [["nested"]] }] }),
        ];
        let binary_header = json!({ "inputs": [
            { "name": "text", "shape": [1], "datatype": "BYTES", "parameters": { "binary_data_size": 9 } },
            { "name": "input_ids", "shape": [1, 2], "datatype": "INT64", "parameters": { "binary_data_size": 16 } },
        ]})
        .to_string();
        let mut binary = (binary_header.len() as u16).to_le_bytes().to_vec();
        binary.extend_from_slice(binary_header.as_bytes());
        binary.extend_from_slice(&5u32.to_le_bytes());
        binary.extend_from_slice(b"hello");
        binary.extend_from_slice(&101i64.to_le_bytes());
        binary.extend_from_slice(&102i64.to_le_bytes());

        use crate::grpc::pb::model_infer_request::InferInputTensor;
        use crate::grpc::pb::{
            InferParameter, InferTensorContents, infer_parameter::ParameterChoice,
        };
        let grpc = [
            ModelInferRequest {
                model_name: "m".into(),
                inputs: vec![InferInputTensor {
                    name: "input_ids".into(),
                    datatype: "INT64".into(),
                    shape: vec![1, 3],
                    contents: Some(InferTensorContents {
                        int64_contents: vec![101, 7592, 102],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                parameters: [(
                    "truncate".to_string(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::BoolParam(true)),
                    },
                )]
                .into(),
                ..Default::default()
            },
            ModelInferRequest {
                model_name: "m".into(),
                inputs: vec![InferInputTensor {
                    name: "text".into(),
                    datatype: "BYTES".into(),
                    shape: vec![2],
                    ..Default::default()
                }],
                raw_input_contents: vec![
                    [
                        1u32.to_le_bytes().as_slice(),
                        b"a",
                        &1u32.to_le_bytes(),
                        b"b",
                    ]
                    .concat(),
                ],
                ..Default::default()
            },
        ];
        let openai: Vec<Vec<u8>> = [
            (0u8, json!({ "prompt": "hi", "max_tokens": 4, "stop": ["\n"], "temperature": 0.5 })),
            (1, json!({ "messages": [{ "role": "user", "content": [{ "type": "text", "text": "hi" }] }], "max_completion_tokens": 4 })),
            (2, json!({ "inputs": "hi", "parameters": { "max_new_tokens": 4, "stop": ["x"], "top_k": 5 } })),
            (3, json!({ "input": ["a", "b"], "encoding_format": "base64" })),
            (4, json!({ "inputs": ["a", "b"], "normalize": false })),
            (5, json!({ "inputs": [["a", "b"], ["c"]] })),
            (6, json!({ "query": "q", "texts": ["a", "b"] })),
            (7, json!({ "inputs": "a" })),
        ]
        .into_iter()
        .map(|(route, body)| [vec![route], body.to_string().into_bytes()].concat())
        .collect();

        let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
        for (i, b) in json_bodies.iter().enumerate() {
            seeds.push((
                "kserve_json",
                format!("{i}.json"),
                b.to_string().into_bytes(),
            ));
        }
        seeds.push(("kserve_binary", "0.bin".into(), binary));
        for (i, m) in grpc.iter().enumerate() {
            seeds.push(("grpc_infer", format!("{i}.pb"), m.encode_to_vec()));
        }
        for (i, b) in openai.into_iter().enumerate() {
            seeds.push(("openai_requests", format!("{i}.json"), b));
        }
        seeds.push(("safetensors", "0.safetensors".into(), safetensors_seed()));
        seeds.push(("plan_cache_entry", "0.kiln".into(), plan_cache_seed()));
        for (target, name, data) in seeds {
            let dir = fuzz_dir().join("seeds").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
