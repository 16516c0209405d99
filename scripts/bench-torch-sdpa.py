#!/usr/bin/env python3
"""PyTorch's CPU scaled_dot_product_attention at kiln's benchmark shapes, on this machine.

Same shapes as `cargo bench -p kiln-attention --bench sdpa` (B=1, H=12, D=64, fp32, no mask), so
the two can be read side by side; `../shared/baselines/results.md` has the same measurement from
the baseline machine. Benchmark-only: kiln never runs Python.

    python scripts/bench-torch-sdpa.py [--lengths 128,512,2048,4096] [--threads 2]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="128,512,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| backend | S | median ms | min ms | runs |")
    print("|---|---|---|---|---|")
    for s in [int(x) for x in a.lengths.split(",")]:
        q = torch.randn(1, 12, s, 64)
        for name, be in [("MATH", SDPBackend.MATH), ("FLASH_ATTENTION", SDPBackend.FLASH_ATTENTION)]:
            with torch.inference_mode(), sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, q, q)
                times = []
                start = time.perf_counter()
                while len(times) < 5 or (time.perf_counter() - start < a.seconds and len(times) < 200):
                    t = time.perf_counter()
                    F.scaled_dot_product_attention(q, q, q)
                    times.append((time.perf_counter() - t) * 1e3)
            print(f"| {name} | {s} | {statistics.median(times):.2f} | {min(times):.2f} | {len(times)} |")


if __name__ == "__main__":
    main()
