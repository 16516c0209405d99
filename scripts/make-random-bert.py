#!/usr/bin/env python3
"""Writes a BERT model folder with random weights, in the Hugging Face layout kiln loads.

    scripts/make-random-bert.py OUT_DIR [--layers 12 --hidden 768 --heads 12
                                          --intermediate 3072] [--like models/local/all-MiniLM-L6-v2]

The defaults are BERT-base's shapes (110M parameters, a 438 MB model.safetensors in f32). The
tokenizer and sentence-transformers files (mean pooling, normalize) are copied from the `--like`
folder, whose vocabulary (30522, bert-base-uncased) the embedding table matches. The weights are
random but valid floats (|w| < 0.06, so activations stay finite): good for load and speed
benchmarks, meaningless as a model. Standard library only (no numpy); deterministic.
"""
import argparse
import json
import os
import random
import shutil
import struct


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--like", default="models/local/all-MiniLM-L6-v2")
    a = p.parse_args()
    h, inter, vocab, positions = a.hidden, a.intermediate, 30522, 512

    shapes = [
        ("embeddings.word_embeddings.weight", [vocab, h]),
        ("embeddings.position_embeddings.weight", [positions, h]),
        ("embeddings.token_type_embeddings.weight", [2, h]),
        ("embeddings.LayerNorm.weight", [h]),
        ("embeddings.LayerNorm.bias", [h]),
    ]
    for l in range(a.layers):
        pre = f"encoder.layer.{l}"
        for name in ["attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"]:
            shapes += [(f"{pre}.{name}.weight", [h, h]), (f"{pre}.{name}.bias", [h])]
        shapes += [(f"{pre}.attention.output.LayerNorm.weight", [h]),
                   (f"{pre}.attention.output.LayerNorm.bias", [h]),
                   (f"{pre}.intermediate.dense.weight", [inter, h]),
                   (f"{pre}.intermediate.dense.bias", [inter]),
                   (f"{pre}.output.dense.weight", [h, inter]),
                   (f"{pre}.output.dense.bias", [h]),
                   (f"{pre}.output.LayerNorm.weight", [h]),
                   (f"{pre}.output.LayerNorm.bias", [h])]
    shapes += [("pooler.dense.weight", [h, h]), ("pooler.dense.bias", [h])]

    # One 1 MiB block of random small floats; each tensor is a rotation of it, tiled.
    rng = random.Random(5)
    block = struct.pack("<262144f", *(rng.uniform(-0.06, 0.06) for _ in range(262144)))
    ones = struct.pack("<f", 1.0)

    header, offset = {}, 0
    for name, shape in shapes:
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, (name, shape) in enumerate(shapes):
            n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if name.endswith("LayerNorm.weight"):
                f.write(ones * (n // 4))
                continue
            start = (i * 4096) % len(block)
            rotated = block[start:] + block[:start]
            f.write(rotated * (n // len(block)) + rotated[: n % len(block)])

    config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "hidden_size": h, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "intermediate_size": inter, "max_position_embeddings": positions,
        "type_vocab_size": 2, "vocab_size": vocab, "layer_norm_eps": 1e-12,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                 "modules.json", "sentence_bert_config.json"]:
        src = os.path.join(a.like, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, name))
    pooling = os.path.join(a.like, "1_Pooling")
    if os.path.isdir(pooling):
        os.makedirs(os.path.join(a.out, "1_Pooling"), exist_ok=True)
        with open(os.path.join(pooling, "config.json")) as f:
            pc = json.load(f)
        pc["word_embedding_dimension"] = h
        with open(os.path.join(a.out, "1_Pooling", "config.json"), "w") as f:
            json.dump(pc, f, indent=2)
    print(f"wrote {a.out}: {offset / 1e6:.0f} MB of f32 weights")


if __name__ == "__main__":
    main()
