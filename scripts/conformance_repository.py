"""Repository conformance, run by scripts/conformance.sh: the unmodified PyPI `tritonclient[http]`,
`tritonclient[grpc]` and `openai` against one kiln serving a repository folder of three models
(all-MiniLM-L6-v2, bert-tiny-cls, gpt2-tiny): each transport's repository index, inference on each
encoder by name (checked against the fixtures), unloading and loading back a model with each
transport (`--model-control explicit`; it is refused while out and answers like its fixtures once
back), and the OpenAI model list and routing by `model`."""
import argparse
import json
import pathlib
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from openai import NotFoundError, OpenAI
from tritonclient.utils import InferenceServerException

p = argparse.ArgumentParser()
p.add_argument("--url", required=True, help="http://host:port of kiln's HTTP port")
p.add_argument("--grpc", required=True, help="host:port of kiln's gRPC port")
p.add_argument("--fixtures", required=True, help="the shared fixtures folder")
args = p.parse_args()

fx = pathlib.Path(args.fixtures)
texts = [json.loads(l)["text"] for l in (fx / "minilm/inputs.jsonl").read_text().splitlines() if l.strip()]
want_embeddings = np.load(fx / "minilm/embeddings_normalized.npy")
cls = json.loads((fx / "tiny/bert-tiny-cls/reference.json").read_text())
want_logits = np.array(cls["outputs"]["logits"]["data"], dtype=np.float32)
gpt2 = json.loads((fx / "tiny/gpt2-tiny/reference.json").read_text())["greedy_generation"]["results"][0]
models = ["all-MiniLM-L6-v2", "bert-tiny-cls", "gpt2-tiny"]
failures = []


def expect(name, cond, detail=""):
    print(f"{'ok  ' if cond else 'FAIL'} {name} {detail}")
    if not cond:
        failures.append(name)


def expect_error(name, call, needle):
    try:
        call()
        expect(name, False, "no error raised")
    except InferenceServerException as e:
        expect(name, needle in e.message(), f"{e.status()}: {e.message()}")


def text_input(module, values):
    t = module.InferInput("text", [len(values)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode("utf-8") for s in values], dtype=np.object_))
    return t


for transport, module, client in [
    ("http", httpclient, httpclient.InferenceServerClient(args.url.removeprefix("http://"))),
    ("grpc", grpcclient, grpcclient.InferenceServerClient(args.grpc)),
]:
    index = client.get_model_repository_index()
    if transport == "grpc":
        index = json.loads(json.dumps([
            {"name": m.name, "version": m.version, "state": m.state} for m in index.models
        ]))
    expect(f"{transport}: get_model_repository_index",
           [(m["name"], m["state"]) for m in index] == [(m, "READY") for m in models], json.dumps(index))
    for m in models:
        expect(f"{transport}: is_model_ready({m})", client.is_model_ready(m))
    meta = (client.get_model_metadata("gpt2-tiny", as_json=True) if transport == "grpc"
            else client.get_model_metadata("gpt2-tiny"))
    expect(f"{transport}: get_model_metadata(gpt2-tiny)",
           [i["name"] for i in meta["inputs"]] == ["text_input"] and
           [o["name"] for o in meta["outputs"]] == ["text_output"], json.dumps(meta)[:160])
    out = client.infer("all-MiniLM-L6-v2", [text_input(module, texts)],
                       outputs=[module.InferRequestedOutput("normalized_embedding")])
    got = out.as_numpy("normalized_embedding")
    cos = (got * want_embeddings).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want_embeddings, axis=1))
    expect(f"{transport}: infer all-MiniLM-L6-v2 matches sentence-transformers", cos.min() >= 0.99999,
           f"min cosine {cos.min():.7f}")
    out = client.infer("bert-tiny-cls", [text_input(module, cls["texts"])],
                       outputs=[module.InferRequestedOutput("logits")])
    err = np.abs(out.as_numpy("logits") - want_logits).max()
    expect(f"{transport}: infer bert-tiny-cls matches PyTorch", err <= 1e-4, f"max abs error {err:.2e}")
    expect_error(f"{transport}: infer on an unknown model is refused",
                 lambda: client.infer("no-such-model", [text_input(module, ["a"])]), "no-such-model")
    client.unload_model("bert-tiny-cls")
    expect(f"{transport}: unload_model(bert-tiny-cls)", not client.is_model_ready("bert-tiny-cls"))
    expect_error(f"{transport}: infer on the unloaded model is refused",
                 lambda: client.infer("bert-tiny-cls", [text_input(module, ["a"])]), "not loaded")
    out = client.infer("all-MiniLM-L6-v2", [text_input(module, texts[:1])])
    expect(f"{transport}: the other models serve meanwhile", out.as_numpy("sentence_embedding").shape == (1, 384))
    client.load_model("bert-tiny-cls")
    expect(f"{transport}: load_model(bert-tiny-cls)", client.is_model_ready("bert-tiny-cls"))
    out = client.infer("bert-tiny-cls", [text_input(module, cls["texts"])],
                       outputs=[module.InferRequestedOutput("logits")])
    err = np.abs(out.as_numpy("logits") - want_logits).max()
    expect(f"{transport}: bert-tiny-cls answers like PyTorch once back", err <= 1e-4, f"max abs error {err:.2e}")

oa = OpenAI(base_url=f"{args.url}/v1", api_key="unused")
listed = sorted(m.id for m in oa.models.list().data)
expect("openai: models.list", listed == models, str(listed))
res = oa.embeddings.create(input=texts, model="all-MiniLM-L6-v2", encoding_format="float")
got = np.array([d.embedding for d in res.data], dtype=np.float32)
expect("openai: embeddings by model name", res.model == "all-MiniLM-L6-v2" and
       np.abs(got - want_embeddings).max() <= 1e-4)
c = oa.completions.create(model="gpt2-tiny", prompt=gpt2["prompt"], max_tokens=16, temperature=0)
expect("openai: completion by model name", c.choices[0].text == gpt2["generated_text"], repr(c.choices[0].text))
try:
    oa.embeddings.create(input="a", model="no-such-model")
    expect("openai: unknown model is 404", False, "no error raised")
except NotFoundError as e:
    expect("openai: unknown model is 404", "gpt2-tiny" in str(e), str(e)[:160])

if failures:
    print(f"{len(failures)} repository conformance check(s) failed: {failures}")
    sys.exit(1)
print("repository conformance: OK")
