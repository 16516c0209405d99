"""gRPC client conformance, run by scripts/conformance.sh: the unmodified PyPI `tritonclient[grpc]`
against a running kiln serving all-MiniLM-L6-v2 on its gRPC port — live/ready/metadata,
ModelInfer with raw contents (what tritonclient sends), with typed InferTensorContents (through the
package's own generated stub), gzip, token ids, and error status codes."""
import argparse
import json
import pathlib
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

p = argparse.ArgumentParser()
p.add_argument("--grpc", required=True, help="host:port of kiln's gRPC port")
p.add_argument("--fixtures", required=True)
p.add_argument("--model", required=True)
args = p.parse_args()

fx = pathlib.Path(args.fixtures)
texts = [json.loads(l)["text"] for l in (fx / "inputs.jsonl").read_text().splitlines() if l.strip()]
want = np.load(fx / "embeddings_normalized.npy")
ids_padded = np.load(fx / "input_ids_padded.npy").astype(np.int64)
mask_padded = np.load(fx / "attention_mask_padded.npy").astype(np.int64)
failures = []


def check(name, got):
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        failures.append(f"{name}: shape {got.shape}, want {want.shape}")
        print(f"FAIL {name}: shape {got.shape}, want {want.shape}")
        return
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    err = np.abs(got - want).max()
    ok = cos.min() >= 0.99999 and err <= 1e-4
    print(f"{'ok  ' if ok else 'FAIL'} {name}: min cosine {cos.min():.7f}, max abs error {err:.2e}")
    if not ok:
        failures.append(name)


def expect(name, cond, detail=""):
    print(f"{'ok  ' if cond else 'FAIL'} {name} {detail}")
    if not cond:
        failures.append(name)


def expect_error(name, call, status, needle=""):
    try:
        call()
        expect(name, False, "no error raised")
    except InferenceServerException as e:
        expect(name, e.status() == status and needle in e.message(), f"{e.status()}: {e.message()}")


tc = grpcclient.InferenceServerClient(args.grpc)
expect("is_server_live", tc.is_server_live())
expect("is_server_ready", tc.is_server_ready())
expect("is_model_ready", tc.is_model_ready(args.model))
expect("is_model_ready(version 1)", tc.is_model_ready(args.model, "1"))
expect("is_model_ready(unknown model) is False", not tc.is_model_ready("no-such-model"))
meta = tc.get_model_metadata(args.model, as_json=True)
expect("get_model_metadata", meta["name"] == args.model and
       {"name": "sentence_embedding", "datatype": "FP32", "shape": ["-1", "384"]} in meta["outputs"] and
       any(i["name"] == "text" and i["datatype"] == "BYTES" for i in meta["inputs"]), json.dumps(meta)[:160])
server_meta = tc.get_server_metadata(as_json=True)
expect("get_server_metadata", server_meta["name"] == "kiln", json.dumps(server_meta))


def text_input(batch=texts):
    t = grpcclient.InferInput("text", [len(batch)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode("utf-8") for s in batch], dtype=np.object_))
    return t


# tritonclient sends every tensor as raw_input_contents and reads raw_output_contents.
r = tc.infer(args.model, [text_input()])
check("tritonclient.grpc infer, raw contents (defaults)", r.as_numpy("sentence_embedding"))
expect("response model name and version",
       r.get_response().model_name == args.model and r.get_response().model_version == "1")
r = tc.infer(args.model, [text_input()], outputs=[grpcclient.InferRequestedOutput("normalized_embedding")],
             request_id="req-7", model_version="1")
check("tritonclient.grpc infer, named output", r.as_numpy("normalized_embedding"))
expect("request id echoed", r.get_response().id == "req-7")
r = tc.infer(args.model, [text_input()], compression_algorithm="gzip")
check("tritonclient.grpc infer, gzip-compressed request", r.as_numpy("sentence_embedding"))
ids = grpcclient.InferInput("input_ids", list(ids_padded.shape), "INT64")
ids.set_data_from_numpy(ids_padded)
mask = grpcclient.InferInput("attention_mask", list(mask_padded.shape), "INT64")
mask.set_data_from_numpy(mask_padded)
r = tc.infer(args.model, [ids, mask])
check("tritonclient.grpc infer, INT64 input_ids + attention_mask", r.as_numpy("sentence_embedding"))

# Typed InferTensorContents, through the package's own generated stub and messages.
stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(args.grpc))
req = service_pb2.ModelInferRequest(model_name=args.model)
t = req.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
t.contents.bytes_contents.extend(s.encode("utf-8") for s in texts)
resp = stub.ModelInfer(req)
out = resp.outputs[0]
expect("typed request gets typed contents back", not resp.raw_output_contents and list(out.shape) == [len(texts), 384])
check("service_pb2 ModelInfer, InferTensorContents", np.array(out.contents.fp32_contents).reshape(len(texts), 384))

# Errors: tritonclient raises InferenceServerException carrying the gRPC status.
expect_error("unknown model is NOT_FOUND", lambda: tc.infer("no-such-model", [text_input()]),
             "StatusCode.NOT_FOUND", "not served")
expect_error("unknown version is NOT_FOUND", lambda: tc.get_model_metadata(args.model, "9"),
             "StatusCode.NOT_FOUND", "no version")
bad = grpcclient.InferInput("text", [2], "BYTES")
bad.set_data_from_numpy(np.array([b"x", b"y"], dtype=np.object_))
bad.set_shape([3])  # a shape that disagrees with the data
expect_error("shape mismatch is INVALID_ARGUMENT", lambda: tc.infer(args.model, [bad]),
             "StatusCode.INVALID_ARGUMENT", "BYTES elements for a shape of 3")
floats = grpcclient.InferInput("text", [1], "FP32")
floats.set_data_from_numpy(np.array([1.0], dtype=np.float32))
expect_error("FP32 text is INVALID_ARGUMENT", lambda: tc.infer(args.model, [floats]),
             "StatusCode.INVALID_ARGUMENT", "FP32")
expect_error("Triton-only ModelConfig is UNIMPLEMENTED", lambda: tc.get_model_config(args.model),
             "StatusCode.UNIMPLEMENTED")
# Still serving after the errors.
r = tc.infer(args.model, [text_input(texts[:1])])
expect("still serving", r.as_numpy("sentence_embedding").shape == (1, 384))
tc.close()

if failures:
    print(f"{len(failures)} gRPC conformance check(s) failed: {failures}")
    sys.exit(1)
print("all gRPC conformance checks passed")
