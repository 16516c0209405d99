"""Client conformance checks run by scripts/conformance.sh: tritonclient.http and openai, as
their users call them, against a running kiln serving all-MiniLM-L6-v2."""
import argparse
import json
import pathlib
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from openai import OpenAI, NotFoundError, UnprocessableEntityError, BadRequestError

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
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


# --- tritonclient.http ---------------------------------------------------------------------
host = args.url.removeprefix("http://")
tc = httpclient.InferenceServerClient(host)
expect("is_server_live", tc.is_server_live())
expect("is_server_ready", tc.is_server_ready())
expect("is_model_ready", tc.is_model_ready(args.model))
expect("is_model_ready(version 1)", tc.is_model_ready(args.model, "1"))
expect("is_model_ready(unknown model) is False", not tc.is_model_ready("no-such-model"))
meta = tc.get_model_metadata(args.model)
expect("get_model_metadata", meta["name"] == args.model and
       {"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, 384]} in meta["outputs"] and
       any(i["name"] == "text" and i["datatype"] == "BYTES" for i in meta["inputs"]), json.dumps(meta)[:120])
server_meta = tc.get_server_metadata()
expect("get_server_metadata", "binary_tensor_data" in server_meta["extensions"])
config = tc.get_model_config(args.model)
expect("get_model_config", config["name"] == args.model and config["max_batch_size"] >= 1)


def text_input(binary):
    t = httpclient.InferInput("text", [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode("utf-8") for s in texts], dtype=np.object_), binary_data=binary)
    return t


# Binary mode: tritonclient's default for inputs and outputs.
r = tc.infer(args.model, [text_input(True)])
check("tritonclient infer, binary (defaults)", r.as_numpy("sentence_embedding"))
# JSON mode, inputs and outputs.
out = httpclient.InferRequestedOutput("sentence_embedding", binary_data=False)
r = tc.infer(args.model, [text_input(False)], outputs=[out])
check("tritonclient infer, JSON", r.as_numpy("sentence_embedding"))
# gzip-compressed request body.
r = tc.infer(args.model, [text_input(True)], request_compression_algorithm="gzip")
check("tritonclient infer, gzip request", r.as_numpy("sentence_embedding"))
# Token ids with a padding mask, as a client that tokenizes itself sends them.
ids = httpclient.InferInput("input_ids", list(ids_padded.shape), "INT64")
ids.set_data_from_numpy(ids_padded)
mask = httpclient.InferInput("attention_mask", list(mask_padded.shape), "INT64")
mask.set_data_from_numpy(mask_padded)
r = tc.infer(args.model, [ids, mask], model_version="1")
check("tritonclient infer, INT64 input_ids + attention_mask", r.as_numpy("sentence_embedding"))
stats = tc.get_inference_statistics(args.model)
expect("get_inference_statistics", stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 4,
       json.dumps(stats["model_stats"][0]["inference_stats"]["success"]))
try:
    tc.infer("no-such-model", [text_input(True)])
    expect("unknown model raises", False)
except InferenceServerException as e:
    expect("unknown model raises InferenceServerException", "not served" in str(e), str(e))
bad = httpclient.InferInput("text", [1], "BYTES")
bad.set_data_from_numpy(np.array([b"only one"], dtype=np.object_), binary_data=False)
bad.set_shape([2])  # a shape that disagrees with the data
try:
    tc.infer(args.model, [bad])
    expect("shape mismatch raises", False)
except InferenceServerException as e:
    expect("shape mismatch raises InferenceServerException", "elements" in str(e), str(e))

# --- openai --------------------------------------------------------------------------------
oa = OpenAI(base_url=f"{args.url}/v1", api_key="unused")
res = oa.embeddings.create(input=texts, model=args.model)  # the client's default: base64
check("openai embeddings.create (default base64)", [d.embedding for d in res.data])
expect("openai usage", res.usage.prompt_tokens > len(texts), str(res.usage))
res = oa.embeddings.create(input=texts, model=args.model, encoding_format="float")
check("openai embeddings.create (float)", [d.embedding for d in res.data])
res = oa.embeddings.create(input=texts[0], model=args.model, dimensions=384)
expect("openai dimensions=384", len(res.data[0].embedding) == 384)
models = oa.models.list()
expect("openai models.list", [m.id for m in models.data] == [args.model])
try:
    oa.embeddings.create(input=[], model=args.model)
    expect("empty input raises", False)
except (UnprocessableEntityError, BadRequestError) as e:
    expect("openai empty input raises a 4xx APIStatusError", 400 <= e.status_code < 500, str(e.status_code))

if failures:
    print(f"{len(failures)} conformance check(s) failed: {failures}")
    sys.exit(1)
print("all conformance checks passed")
