"""PyTorch eager generation on the same shapes as `kiln bench-generate`: the model folder written
by make-gpt2-small.py, loaded into a plain GPT-2 (nanoGPT-style, F.scaled_dot_product_attention)
with a KV cache that grows by concatenation, greedy decoding. Reports time to first token (the
prefill of the whole batch plus its first token) and decode tokens/s (the remaining tokens of the
batch over the time after the first token), the median of --iters runs, torch with 2 threads.

    .venv-bench/bin/python scripts/bench-generation.py --model bench-models/gpt2-small-random
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", default="1,8")
p.add_argument("--prompt-tokens", type=int, default=128)
p.add_argument("--new-tokens", type=int, default=128)
p.add_argument("--iters", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
cfg = json.load(open(a.model + "/config.json"))
W = load_file(a.model + "/model.safetensors")
H, NH, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
D = H // NH


def ln(x, name):
    return F.layer_norm(x, (H,), W[name + ".weight"], W[name + ".bias"], 1e-5)


@torch.inference_mode()
def forward(ids, pos0, cache):
    B, T = ids.shape
    x = W["transformer.wte.weight"][ids] + W["transformer.wpe.weight"][pos0:pos0 + T]
    for l in range(L):
        b = f"transformer.h.{l}."
        h = ln(x, b + "ln_1")
        qkv = torch.addmm(W[b + "attn.c_attn.bias"], h.view(-1, H), W[b + "attn.c_attn.weight"]).view(B, T, 3, NH, D)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        if cache[l] is not None:
            k = torch.cat([cache[l][0], k], 2)
            v = torch.cat([cache[l][1], v], 2)
        cache[l] = (k, v)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        o = o.transpose(1, 2).reshape(B * T, H)
        x = x + torch.addmm(W[b + "attn.c_proj.bias"], o, W[b + "attn.c_proj.weight"]).view(B, T, H)
        h = ln(x, b + "ln_2").view(-1, H)
        m = F.gelu(torch.addmm(W[b + "mlp.c_fc.bias"], h, W[b + "mlp.c_fc.weight"]), approximate="tanh")
        x = x + torch.addmm(W[b + "mlp.c_proj.bias"], m, W[b + "mlp.c_proj.weight"]).view(B, T, H)
    x = ln(x[:, -1], "transformer.ln_f")
    return x @ W["transformer.wte.weight"].T


def run(B, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (B, a.prompt_tokens), generator=g)
    cache = [None] * L
    t0 = time.perf_counter()
    nxt = forward(ids, 0, cache).argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    pos = a.prompt_tokens
    for _ in range(a.new_tokens - 1):
        nxt = forward(nxt, pos, cache).argmax(-1, keepdim=True)
        pos += 1
    total = time.perf_counter() - t0
    return ttft, B * (a.new_tokens - 1) / (total - ttft), total


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {a.prompt_tokens}, {a.new_tokens} new, greedy")
print("| batch | time to first token ms | decode tokens/s | total s | runs |")
print("|---|---|---|---|---|")
for B in [int(b) for b in a.batch.split(",")]:
    run(B, 0)  # warm-up
    runs = [run(B, 7 + i) for i in range(a.iters)]
    med = lambda i: statistics.median(r[i] for r in runs)
    print(f"| {B} | {med(0) * 1e3:.1f} | {med(1):.1f} | {med(2):.2f} | {len(runs)} |")
