"""Writes a GPT-2-small-shaped causal LM with random weights (124M parameters: 12 layers, hidden
768, 12 heads, 1024 positions, vocab 50257) in the Hugging Face layout, for generation
benchmarks. Weights follow GPT-2's initialisation (N(0, 0.02), LayerNorm 1/0, biases 0) from a
fixed seed. The tokenizer is the tiny GPT-2 fixture's byte-level BPE (1000 tokens): benchmarks
feed token ids, and ids beyond it detokenize to nothing.

    python scripts/make-gpt2-small.py --out bench-models/gpt2-small-random --fixtures ../shared/fixtures
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--fixtures", default="../shared/fixtures")
p.add_argument("--seed", type=int, default=20261130)
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
V, P, H, L, NH = 50257, 1024, 768, 12, 12
rng = np.random.default_rng(a.seed)
w = lambda *s: (rng.standard_normal(s, dtype=np.float32) * 0.02)
t = {"transformer.wte.weight": w(V, H), "transformer.wpe.weight": w(P, H),
     "transformer.ln_f.weight": np.ones(H, np.float32), "transformer.ln_f.bias": np.zeros(H, np.float32)}
for l in range(L):
    b = f"transformer.h.{l}."
    t[b + "ln_1.weight"] = np.ones(H, np.float32); t[b + "ln_1.bias"] = np.zeros(H, np.float32)
    t[b + "ln_2.weight"] = np.ones(H, np.float32); t[b + "ln_2.bias"] = np.zeros(H, np.float32)
    t[b + "attn.c_attn.weight"] = w(H, 3 * H); t[b + "attn.c_attn.bias"] = np.zeros(3 * H, np.float32)
    t[b + "attn.c_proj.weight"] = w(H, H); t[b + "attn.c_proj.bias"] = np.zeros(H, np.float32)
    t[b + "mlp.c_fc.weight"] = w(H, 4 * H); t[b + "mlp.c_fc.bias"] = np.zeros(4 * H, np.float32)
    t[b + "mlp.c_proj.weight"] = w(4 * H, H); t[b + "mlp.c_proj.bias"] = np.zeros(H, np.float32)
save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": P,
          "n_embd": H, "n_layer": L, "n_head": NH, "n_inner": None, "activation_function": "gelu_new",
          "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "bos_token_id": 50256,
          "eos_token_id": 50256, "torch_dtype": "float32"}
(out / "config.json").write_text(json.dumps(config, indent=2))
(out / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
tiny = Path(a.fixtures) / "tiny" / "gpt2-tiny"
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(tiny / f, out / f)
print(f"wrote {out}: {sum(v.size for v in t.values()) / 1e6:.1f}M parameters")
