"""Calls a kiln container the way its users do — OpenAI-style /v1/embeddings over HTTP, and
ModelInfer over gRPC with tritonclient (raw contents) — and compares both answers with the
sentence-transformers fixtures. Run by scripts/container-smoke.sh."""
import argparse
import json
import pathlib
import sys
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

p = argparse.ArgumentParser()
p.add_argument("--http", required=True)
p.add_argument("--grpc", required=True)
p.add_argument("--fixtures", required=True)
p.add_argument("--model", required=True)
args = p.parse_args()

fx = pathlib.Path(args.fixtures)
texts = [json.loads(l)["text"] for l in (fx / "inputs.jsonl").read_text().splitlines() if l.strip()]
want = np.load(fx / "embeddings_normalized.npy")
failed = False


def check(name, got):
    global failed
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        print(f"FAIL {name}: shape {got.shape}, want {want.shape}")
        failed = True
        return
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    err = np.abs(got - want).max()
    ok = cos.min() >= 0.99999 and err <= 1e-4
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {len(texts)} texts, min cosine {cos.min():.7f}, max abs error {err:.2e}")
    failed |= not ok


body = json.dumps({"input": texts, "model": args.model, "encoding_format": "float"}).encode()
req = urllib.request.Request(f"{args.http}/v1/embeddings", body, {"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    answer = json.load(r)
check("HTTP /v1/embeddings", [d["embedding"] for d in answer["data"]])

client = grpcclient.InferenceServerClient(args.grpc)
ok = client.is_server_ready() and client.is_model_ready(args.model)
print(f"{'ok  ' if ok else 'FAIL'} gRPC ServerReady and ModelReady")
failed |= not ok
t = grpcclient.InferInput("text", [len(texts)], "BYTES")
t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=np.object_))
r = client.infer(args.model, [t])
check("gRPC ModelInfer (tritonclient, raw contents)", r.as_numpy("sentence_embedding"))
sys.exit(1 if failed else 0)
