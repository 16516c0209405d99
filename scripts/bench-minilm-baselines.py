"""Same-day baselines for `kiln bench` on all-MiniLM-L6-v2: PyTorch eager fp32, PyTorch dynamic
int8 (x86 engine), ONNX Runtime fp32 and dynamic int8 (per-tensor and per-channel weights), each
with 2 threads, at the shapes given. Forward pass only (embedding + mean pooling + L2 normalise),
every position a real token, median of --reps runs after a warm-up: the same measurement as
`kiln bench` and ../shared/baselines, so rows can sit side by side when the machine's speed
drifts between days.

    python3 -m pip --python .venv-bench/bin/python install torch transformers onnx onnxruntime
    .venv-bench/bin/python scripts/bench-minilm-baselines.py --model models/local/all-MiniLM-L6-v2
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoModel

from minilm_embedder import Embedder, export_onnx

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--shapes", default="1x16,32x128")
p.add_argument("--reps", type=int, default=20)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)


emb = Embedder(AutoModel.from_pretrained(a.model).eval()).eval()
work = Path(tempfile.mkdtemp())
fp32 = work / "fp32.onnx"
export_onnx(emb, fp32)
int8, int8_pc = work / "int8.onnx", work / "int8_pc.onnx"
quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
quantize_dynamic(str(fp32), str(int8_pc), weight_type=QuantType.QInt8, per_channel=True)


def torch_run(mod):
    def run(i, m):
        with torch.inference_mode():
            return mod(torch.from_numpy(i), torch.from_numpy(m))
    return run


def ort_run(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda i, m: s.run(None, {"input_ids": i, "attention_mask": m})


variants = {
    "torch eager fp32": torch_run(emb),
    "torch dynamic int8 (x86)": torch_run(torch.ao.quantization.quantize_dynamic(emb, {torch.nn.Linear}, dtype=torch.qint8)),
    "ORT fp32": ort_run(fp32),
    "ORT dynamic int8": ort_run(int8),
    "ORT dynamic int8 per-channel": ort_run(int8_pc),
}
shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {a.threads} threads, median of {a.reps} runs, ms (tokens/s)")
print("| variant | " + " | ".join(f"{b}×{s}" for b, s in shapes) + " |")
print("|---|" + "---|" * len(shapes))
rng = np.random.default_rng(0)
for name, run in variants.items():
    cells = []
    for b, s in shapes:
        i = rng.integers(1000, 20000, size=(b, s), dtype=np.int64)
        i[:, 0], i[:, -1] = 101, 102
        m = np.ones_like(i)
        run(i, m)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            run(i, m)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        cells.append(f"{med * 1e3:.2f} ({b * s / med:.0f})")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
