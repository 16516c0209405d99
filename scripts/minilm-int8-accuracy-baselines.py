"""Accuracy of the int8 baselines on the MiniLM fixtures, measured the way kiln's
`tests/tests/quantization.rs` measures kiln: the cosine of each fixture text's embedding (mean
pooling, L2-normalised) to sentence-transformers' fp32 reference, min and mean over the texts.

Puts PyTorch's x86 dynamic int8 and ONNX Runtime's `quantize_dynamic` (per-tensor and
per-channel weights, with and without `reduce_range`) beside kiln's bounds (min >= 0.99,
mean >= 0.995), so the speed rows in docs/BENCHMARKS.md can be read with their accuracy.
Not in CI (needs torch, transformers, onnx and onnxruntime).

    .venv-bench/bin/python scripts/minilm-int8-accuracy-baselines.py \
        --model models/local/all-MiniLM-L6-v2 [--fixtures ../shared/fixtures]
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoModel

from minilm_embedder import Embedder, export_onnx

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--fixtures", default=os.environ.get("KILN_FIXTURES", "../shared/fixtures"))
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
fx = Path(a.fixtures) / "minilm"
ids = np.load(fx / "input_ids_padded.npy").astype(np.int64)
mask = np.load(fx / "attention_mask_padded.npy").astype(np.int64)
want = np.load(fx / "embeddings_normalized.npy").astype(np.float64)


emb = Embedder(AutoModel.from_pretrained(a.model).eval()).eval()
work = Path(tempfile.mkdtemp())
fp32 = work / "fp32.onnx"
export_onnx(emb, fp32)


def torch_run(mod):
    with torch.inference_mode():
        return mod(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def ort_run(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def ort_int8(per_channel, reduce_range):
    out = work / f"int8_{int(per_channel)}{int(reduce_range)}.onnx"
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8,
                     per_channel=per_channel, reduce_range=reduce_range)
    return lambda: ort_run(out)


variants = {
    "torch eager fp32": lambda: torch_run(emb),
    "torch dynamic int8 (x86)": lambda: torch_run(
        torch.ao.quantization.quantize_dynamic(emb, {torch.nn.Linear}, dtype=torch.qint8)),
    "ORT fp32": lambda: ort_run(fp32),
    "ORT dynamic int8 (per-tensor; the speed row)": ort_int8(False, False),
    "ORT dynamic int8, per-channel": ort_int8(True, False),
    "ORT dynamic int8, reduce_range (7-bit)": ort_int8(False, True),
    "ORT dynamic int8, per-channel + reduce_range": ort_int8(True, True),
}
print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {len(ids)} fixture texts")
print("| variant | min cosine | mean cosine | within kiln's int8 bounds (min >= 0.99, mean >= 0.995) |")
print("|---|---|---|---|")
for name, run in variants.items():
    got = run().astype(np.float64)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    ok = "yes" if cos.min() >= 0.99 and cos.mean() >= 0.995 else "**no**"
    print(f"| {name} | {cos.min():.6f} | {cos.mean():.6f} | {ok} |", flush=True)
