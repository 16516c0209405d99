#!/usr/bin/env python3
"""Make the model-zoo fixtures in tests/fixtures/models/<name>/.

Each folder is a tiny random-weight Hugging Face model (hidden 32-64, 2 layers, 4 heads, vocab ~600) with a
tokenizer trained here by the `tokenizers` library (the Hugging Face hub is never contacted), saved the way
transformers 5 / sentence-transformers 6 save it, plus a `reference.json` with the outputs that transformers /
sentence-transformers compute on CPU. A Rust loader runs every folder and compares against reference.json.

Usage (CPU only, about 15 seconds):
    python3 -m venv /tmp/zoo-venv
    /tmp/zoo-venv/bin/pip install -r scripts/zoo-fixtures-requirements.txt
    /tmp/zoo-venv/bin/python scripts/make-zoo-fixtures.py [--out DIR] [--only NAME ...]

Made with (pinned in scripts/zoo-fixtures-requirements.txt; torch is the plain PyPI wheel):
    torch==2.15.0 transformers==5.25.0 sentence-transformers==6.3.0 tokenizers==0.23.3
    safetensors==0.8.0 numpy==2.4.6 huggingface_hub==2.4.0 (python 3.11.7)

Conventions (as in ../shared/fixtures/tiny):
- Every parameter is overwritten from a generator seeded per model: matrices and embeddings N(0, 0.1^2), norm
  weights 1 + 0.2 N(0,1), biases 0.1 N(0,1), so norm/bias/scale bugs in a loader show up. Weights are float32.
- Outputs are computed in float64 (the saved float32 weights upcast exactly, `model.double()`), one text at a time
  without padding, then rounded to float32 and written as the shortest decimal that reads back as that float32.
  The float32 run is checked to agree within 1e-4, and a padded float32 batch is checked to agree with the
  one-at-a-time float32 run within 1e-5 (`batched_max_abs_diff` records it).
- `input_ids` are what the saved tokenizer gives with add_special_tokens=True (truncated at the model's max
  length); the script checks that `tokenizers.Tokenizer.from_file(tokenizer.json)` gives the same ids.
- Re-running the script gives byte-identical files (torch runs on one thread; no timestamps are written).
- Tokenizers are trained on CORPUS below. The `tokenizers` WordPiece and Unigram trainers are not reproducible
  (hash-map order), so WordPiece is learnt by a small trainer here and the Unigram scores are canonicalised.
Each model is made by its own function; a failure in one is reported and does not stop the others (exit code 1).
See tests/fixtures/models/README.md for what each folder exercises.

Decoders (DECODERS below; written to tests/fixtures/decoders/<name>/, `--decoders-out DIR`): qwen2-tiny,
qwen3-tiny and mistral-tiny, tiny random-weight causal LMs whose reference.json has the format of
../shared/fixtures/tiny/llama-tiny (logits of a right-padded batch plus 16-step greedy generation, checked to give
the same ids in an fp64 and an fp32 full-recompute loop and in HF generate() with KV cache). `--only` takes
decoder names too. See tests/fixtures/decoders/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

import transformers  # noqa: E402
import sentence_transformers  # noqa: E402
import tokenizers as tokenizers_lib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "models"
DEFAULT_DECODERS_OUT = REPO / "tests" / "fixtures" / "decoders"
SEED = 20240601

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

# ---------------------------------------------------------------------------------------------------------------
# Corpus and texts
# ---------------------------------------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A sentence embedding maps a piece of text to a single vector.",
    "Search engines rank documents by how similar they are to the query.",
    "Serving transformer models on CPUs needs careful batching and padding masks.",
    "The weather today is sunny with a light breeze from the west.",
    "She reads a book in the garden while the children play football.",
    "How do I reset my password if I forgot the old one?",
    "Click the link in the email to confirm your new account.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "The river flows through the old town towards the sea.",
    "Neural networks learn representations from large amounts of data.",
    "Attention layers let every token look at every other token in the sequence.",
    "Normalization keeps the length of each embedding vector equal to one.",
    "A reranker scores a query and a document together and returns one number.",
    "Mean pooling averages the token vectors, ignoring the padding positions.",
    "The cat sleeps on the warm windowsill all afternoon.",
    "We measured the latency of the server under heavy load.",
    "Tokenizers split words into smaller pieces that the model knows.",
    "Rust programs are fast and memory safe without a garbage collector.",
    "Please return the library books before the end of the month.",
    "Questions and answers: what is the tallest mountain in the world?",
    "Mount Everest is the tallest mountain above sea level.",
    "Le café est très chaud, fais attention à ne pas te brûler.",
    "Où est la gare ? Je voudrais acheter un billet pour Genève.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Müller und Schröder trinken Kaffee in München.",
    "El niño comió una manzana en la mañana soleada.",
    "¿Dónde está la biblioteca? Está cerca de la estación.",
    "Ação, coração e informação são palavras portuguesas.",
    "Zażółć gęślą jaźń — a Polish pangram with many accents.",
    "Привет, как дела? Сегодня хорошая погода.",
    "東京は日本の首都です。",
    "我喜欢喝茶和看书。",
    "北京和上海是中国的大城市。",
    "서울은 한국의 수도입니다.",
    "今日はいい天気ですね。",
    "Emoji are text too 🙂 🚀 ❤️ 👍 🎉",
    "I love pizza 🍕 and coffee ☕ in the morning 🌅.",
    "Numbers like 3.14, 42, 2024 and 1,000,000 appear in text.",
    "Email me at someone@example.com or visit https://example.com/docs.",
]

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé — 東京 and 北京 🙂🚀 emoji too.",
    "How do I reset my password?",
    (
        "Serving transformer models on CPUs needs careful batching and padding masks, because every token looks at "
        "every other token in the sequence; mean pooling averages the token vectors while ignoring the padding "
        "positions, and normalization keeps the length of each embedding vector equal to one, so search engines "
        "can rank documents by how similar they are to the query."
    ),
]

PAIRS = [
    ["What is the capital of France?", "Paris is the capital of France and Berlin is the capital of Germany."],
    ["What is the capital of France?", "The cat sleeps on the warm windowsill all afternoon."],
    ["how tall is mount everest", "Mount Everest is the tallest mountain above sea level, about 8849 metres high."],
    ["Où est la gare ?", "東京は日本の首都です。 The station is near the library 🚉."],
]


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence-transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers_lib.__version__,
    }


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer training (all local, deterministic)
# ---------------------------------------------------------------------------------------------------------------


def train_wordpiece(special: list[str], vocab_size: int = 600, lowercase: bool = True) -> dict[str, int]:
    """BERT-style WordPiece vocab, learnt by BPE merges with a "##" continuation prefix.

    The `tokenizers` WordPieceTrainer numbers the "##" pieces in hash-map order, so ties between merges come out
    differently from run to run. This small trainer breaks ties by the pieces' text, so the vocab is reproducible.
    """
    from collections import Counter

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for line in CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    words = [[w[0]] + ["##" + c for c in w[1:]] for w in sorted(counts)]
    freqs = [counts[w] for w in sorted(counts)]
    alphabet = sorted({p for w in words for p in w}, key=lambda p: (p.startswith("##"), p))
    vocab = list(special) + [p for p in alphabet if p not in special]
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, f in zip(words, freqs):
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[2:]
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [merged]
                i += 1
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return {p: i for i, p in enumerate(vocab)}


def train_byte_bpe(special: list[str], vocab_size: int = 600) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return _ordered_vocab(tok), merges


def train_unigram(special: list[str], vocab_size: int = 600) -> list[tuple[str, float]]:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=special, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    # Not reproducible as trained: the EM sums run in hash-map order, so scores jitter in the last digits, and the
    # characters that pruning dropped are put back with scores min, min + 1e-4, min + 2e-4, ... in hash-map order.
    # So: round the scores, give those put-back characters (the chain of single characters going up from the
    # lowest score in steps of 1e-4) the lowest score minus 1e-3, and sort by (score, piece).
    pieces = [(p, round(float(s), 6)) for p, s in data["model"]["vocab"] if p not in special]
    chain_top = min(s for _, s in pieces)
    put_back = set()
    for p, s in sorted((ps for ps in pieces if len(ps[0]) == 1), key=lambda ps: ps[1]):
        if s > chain_top + 1.5e-4:
            break
        put_back.add(p)
        chain_top = max(chain_top, s)
    low = round(min(s for _, s in pieces) - 1e-3, 6)
    pieces = [(p, low if p in put_back else s) for p, s in pieces]
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    return [(p, 0.0) for p in special] + pieces


def _ordered_vocab(tok: Tokenizer) -> dict[str, int]:
    vocab = tok.get_vocab(with_added_tokens=True)
    return dict(sorted(vocab.items(), key=lambda kv: kv[1]))


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter: matrices/embeddings N(0,0.1²), norm weights 1+0.2·N(0,1), biases 0.1·N(0,1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are visited once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("bias"):
                value = 0.1 * noise
            elif p.dim() == 1 and "norm" in name.lower():
                value = 1.0 + 0.2 * noise
            elif p.dim() == 1:
                raise ValueError(f"unexpected 1-D parameter {name}")
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


def check_fresh_weights(folder: Path, model: torch.nn.Module) -> None:
    """The saved safetensors must hold exactly the randomized weights (no silent re-init)."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    for key, tensor in saved.items():
        if key in state:
            assert torch.equal(state[key].to(tensor.dtype), tensor), key


# ---------------------------------------------------------------------------------------------------------------
# Helpers for references
# ---------------------------------------------------------------------------------------------------------------


def f32(x: float) -> float:
    """Round to float32 and return the shortest decimal that reads back as that float32."""
    v = np.float32(x)
    out = float(str(v))
    assert np.float32(out) == v, (x, out)
    return out


def to_list(t):
    """Nested lists of numbers: fp64 results rounded to float32, written as shortest float32 decimals."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    a = np.asarray(t, dtype=np.float64)
    if a.ndim == 0:
        return f32(a)
    return [to_list(x) for x in a]


def check_tokenizer_json(folder: Path, hf_tok, inputs, ids: list[list[int]], max_length: int) -> None:
    """tokenizers' own loader on tokenizer.json must give the same ids as the transformers tokenizer."""
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    for inp, expected in zip(inputs, ids):
        enc = raw.encode(*inp) if isinstance(inp, (list, tuple)) else raw.encode(inp)
        got = enc.ids
        if len(got) > max_length:
            got = got[: max_length - 1] + [got[-1]]  # truncation keeps the final special token
        assert got == expected, (folder.name, inp, got, expected)


def write_reference(folder: Path, ref: dict) -> None:
    text = json.dumps(ref, ensure_ascii=False, separators=(", ", ": "))
    (folder / "reference.json").write_text(text + "\n", encoding="utf-8")


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def st_reference(folder: Path, name: str, architecture: str, max_length: int | None = None, task: str = "embedding",
                 encode_kwargs: dict | None = None) -> dict:
    """Reference for a sentence-transformers folder: encode() per text in fp64 and fp32, plus token embeddings."""
    from sentence_transformers import SentenceTransformer

    encode_kwargs = encode_kwargs or {}
    st = SentenceTransformer(str(folder), device="cpu")
    st.eval()
    first = st[0]
    tok = first.tokenizer
    max_len = max_length or st.max_seq_length
    enc = [tok(t, add_special_tokens=True, truncation=True, max_length=max_len) for t in TEXTS]
    input_ids = [e["input_ids"] for e in enc]
    check_tokenizer_json(folder, tok, TEXTS, input_ids, max_len)
    assert any(len(ids) > 40 for ids in input_ids), [len(i) for i in input_ids]

    def run(model, dtype):
        embs, toks = [], []
        for t in TEXTS:
            e = model.encode([t], convert_to_tensor=True, batch_size=1, **encode_kwargs)[0]
            te = model.encode([t], output_value="token_embeddings", batch_size=1, **encode_kwargs)[0]
            embs.append(e.to(dtype))
            toks.append(te.to(dtype))
        return embs, toks

    embs32, toks32 = run(st, torch.float32)
    batched = st.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS), **encode_kwargs)
    batched_diff = max(float((batched[i] - embs32[i]).abs().max()) for i in range(len(TEXTS)))
    assert batched_diff < 1e-5, (name, batched_diff)

    st64 = st.double()
    embs64, toks64 = run(st64, torch.float64)
    fp_diff = max(float((a.double() - b).abs().max()) for a, b in zip(embs32 + toks32, embs64 + toks64))
    assert fp_diff < 1e-4, (name, fp_diff)
    print(f"   fp32 vs fp64 max |diff| {fp_diff:.1e}, padded batch vs one at a time {batched_diff:.1e}")
    for ids, te in zip(input_ids, toks64):
        assert te.shape[0] == len(ids), (te.shape, len(ids))

    ref = {
        "model": name,
        "architecture": architecture,
        "task": task,
        "library": "sentence-transformers",
        "versions": versions(),
        "texts": TEXTS,
        "input_ids": input_ids,
    }
    if "token_type_ids" in enc[0]:
        ref["token_type_ids"] = [e["token_type_ids"] for e in enc]
    ref["outputs"] = {
        "embeddings": [to_list(e) for e in embs64],
        "token_embeddings": [to_list(t) for t in toks64],
    }
    ref["batched_max_abs_diff"] = batched_diff
    return ref


def build_st(staging: Path, out: Path, extra_modules) -> None:
    """Transformer(staging) -> extra modules, saved by the installed sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer

    transformer = Transformer(str(staging))
    st = SentenceTransformer(modules=[transformer, *extra_modules(transformer)], device="cpu")
    st.save(str(out))


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def make_bert_st6_dense(out_root: Path, tmp: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    name = "bert-st6-dense"
    staging = fresh_dir(tmp / name)
    vocab = train_wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, type_vocab_size=2, pad_token_id=0,
    )
    model = BertModel(config, add_pooling_layer=False)
    randomize(model, SEED + 1)
    save_staging(staging, model, tok)

    def extra(transformer):
        dense = Dense(48, 24, activation_function=torch.nn.Tanh())
        randomize(dense, SEED + 2)
        return [Pooling(48, pooling_mode="mean"), dense, Normalize()]

    folder = fresh_dir(out_root / name)
    build_st(staging, folder, extra)
    check_fresh_weights(folder, model)
    write_reference(folder, st_reference(folder, name, "BertModel"))


def save_staging(staging: Path, model, tok) -> None:
    model.save_pretrained(staging)
    tok.save_pretrained(staging)


def make_roberta_st_mean(out_root: Path, tmp: Path) -> None:
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    from sentence_transformers.sentence_transformer.modules import Pooling

    name = "roberta-st-mean"
    staging = fresh_dir(tmp / name)
    vocab, merges = train_byte_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    vocab["<mask>"] = len(vocab)  # last id, as in roberta-base
    tok = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=128)
    config = RobertaConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    model = RobertaModel(config, add_pooling_layer=False)
    randomize(model, SEED + 10)
    save_staging(staging, model, tok)
    folder = fresh_dir(out_root / name)
    build_st(staging, folder, lambda t: [Pooling(64, pooling_mode="mean")])
    check_fresh_weights(folder, model)
    write_reference(folder, st_reference(folder, name, "RobertaModel"))


def unigram_tokenizer():
    from transformers import XLMRobertaTokenizer

    vocab = train_unigram(["<s>", "<pad>", "</s>", "<unk>"])
    vocab.append(("<mask>", 0.0))  # last id, as in xlm-roberta-base
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=128), len(vocab)


def xlmr_config(vocab_size: int, **kw):
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, **kw,
    )


def make_xlm_roberta_st_cls(out_root: Path, tmp: Path) -> None:
    from transformers import XLMRobertaModel
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    name = "xlm-roberta-st-cls"
    staging = fresh_dir(tmp / name)
    tok, vocab_size = unigram_tokenizer()
    model = XLMRobertaModel(xlmr_config(vocab_size), add_pooling_layer=False)
    randomize(model, SEED + 20)
    save_staging(staging, model, tok)
    folder = fresh_dir(out_root / name)
    build_st(staging, folder, lambda t: [Pooling(64, pooling_mode="cls"), Normalize()])
    check_fresh_weights(folder, model)
    write_reference(folder, st_reference(folder, name, "XLMRobertaModel"))


def classifier_logits(folder: Path, inputs: list) -> tuple:
    """Reloads the classifier saved in `folder` and runs it on `inputs` (texts, or [a, b] pairs), one at a time,
    in float32 and float64; checks a padded float32 batch against the one-at-a-time run (1e-5) and float32
    against float64 (1e-4). Returns (input_ids, logits32, logits64, batched_max_abs_diff)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    max_len = tok.model_max_length
    parts = [tuple(x) if isinstance(x, list) else (x,) for x in inputs]
    input_ids = [tok(*p, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"] for p in parts]
    check_tokenizer_json(folder, tok, inputs, input_ids, max_len)

    def run(m):
        with torch.no_grad():
            return [m(input_ids=torch.tensor([ids])).logits[0] for ids in input_ids]

    logits32 = run(model)
    seconds = [p[1] for p in parts] if all(len(p) == 2 for p in parts) else None
    batch = tok([p[0] for p in parts], seconds, padding=True, truncation=True, max_length=max_len,
                return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits
    batched_diff = max(float((batched[i] - logits32[i]).abs().max()) for i in range(len(inputs)))
    assert batched_diff < 1e-5, batched_diff
    logits64 = run(model.double())
    assert max(float((a.double() - b).abs().max()) for a, b in zip(logits32, logits64)) < 1e-4
    return input_ids, logits32, logits64, batched_diff


def make_xlm_roberta_reranker(out_root: Path, tmp: Path) -> None:
    """Plain transformers save (config + weights + tokenizer); no sentence-transformers files."""
    from transformers import XLMRobertaForSequenceClassification

    name = "xlm-roberta-reranker"
    tok, vocab_size = unigram_tokenizer()
    model = XLMRobertaForSequenceClassification(xlmr_config(vocab_size, num_labels=1))
    randomize(model, SEED + 30)
    folder = fresh_dir(out_root / name)
    save_staging(folder, model, tok)
    check_fresh_weights(folder, model)

    input_ids, logits32, logits64, batched_diff = classifier_logits(folder, PAIRS)

    # sentence-transformers' CrossEncoder reads the same folder (sigmoid on top for num_labels=1)
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(folder), device="cpu")
    scores = ce.predict([tuple(p) for p in PAIRS], batch_size=1, convert_to_tensor=True)
    expected = torch.sigmoid(torch.stack(logits32)[:, 0])
    assert float((scores.float() - expected).abs().max()) < 1e-5, (scores, expected)

    ref = {
        "model": name,
        "architecture": "XLMRobertaForSequenceClassification",
        "task": "classification",
        "library": "transformers",
        "versions": versions(),
        "pairs": PAIRS,
        "input_ids": input_ids,
        "outputs": {"logits": [to_list(l) for l in logits64]},
        "batched_max_abs_diff": batched_diff,
    }
    write_reference(folder, ref)


def make_distilbert_st_mean(out_root: Path, tmp: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    name = "distilbert-st-mean"
    staging = fresh_dir(tmp / name)
    vocab = train_wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = DistilBertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = DistilBertConfig(
        vocab_size=len(vocab), dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128,
        sinusoidal_pos_embds=False, pad_token_id=0,
    )
    model = DistilBertModel(config)
    randomize(model, SEED + 40)
    save_staging(staging, model, tok)
    folder = fresh_dir(out_root / name)
    build_st(staging, folder, lambda t: [Pooling(64, pooling_mode="mean"), Normalize()])
    check_fresh_weights(folder, model)
    write_reference(folder, st_reference(folder, name, "DistilBertModel"))


def make_distilbert_cls(out_root: Path, tmp: Path) -> None:
    """DistilBertForSequenceClassification (pre_classifier + ReLU + classifier), three labels, on single
    texts; a plain transformers save."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizer

    name = "distilbert-cls"
    vocab = train_wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = DistilBertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = DistilBertConfig(
        vocab_size=len(vocab), dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128,
        sinusoidal_pos_embds=False, pad_token_id=0, num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    model = DistilBertForSequenceClassification(config)
    randomize(model, SEED + 45)
    folder = fresh_dir(out_root / name)
    save_staging(folder, model, tok)
    check_fresh_weights(folder, model)

    input_ids, _, logits64, batched_diff = classifier_logits(folder, TEXTS)
    ref = {
        "model": name,
        "architecture": "DistilBertForSequenceClassification",
        "task": "classification",
        "library": "transformers",
        "versions": versions(),
        "texts": TEXTS,
        "input_ids": input_ids,
        "outputs": {"logits": [to_list(l) for l in logits64]},
        "batched_max_abs_diff": batched_diff,
    }
    write_reference(folder, ref)


def make_mpnet_st_mean(out_root: Path, tmp: Path) -> None:
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    name = "mpnet-st-mean"
    staging = fresh_dir(tmp / name)
    vocab = train_wordpiece(["<s>", "<pad>", "</s>", "[UNK]"])
    vocab["<mask>"] = len(vocab)  # last id, as in mpnet-base
    tok = MPNetTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = MPNetConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=130, relative_attention_num_buckets=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, layer_norm_eps=1e-5,
    )
    model = MPNetModel(config, add_pooling_layer=False)
    randomize(model, SEED + 50)
    save_staging(staging, model, tok)
    folder = fresh_dir(out_root / name)
    build_st(staging, folder, lambda t: [Pooling(64, pooling_mode="mean"), Normalize()])
    check_fresh_weights(folder, model)
    write_reference(folder, st_reference(folder, name, "MPNetModel"))


def make_bert_st_legacy_flags(out_root: Path, tmp: Path) -> None:
    """Old (sentence-transformers 2.x) layout written by hand; the reference comes from the installed version."""
    from transformers import BertConfig, BertModel, BertTokenizer

    name = "bert-st-legacy-flags"
    vocab = train_wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
    )
    model = BertModel(config, add_pooling_layer=True)
    randomize(model, SEED + 60)
    folder = fresh_dir(out_root / name)
    save_staging(folder, model, tok)
    check_fresh_weights(folder, model)

    def dump(path: Path, obj) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    dump(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    dump(folder / "sentence_bert_config.json", {"max_seq_length": 64, "do_lower_case": False})
    dump(folder / "config_sentence_transformers.json",
         {"__version__": {"sentence_transformers": "2.0.0", "transformers": "4.6.1", "pytorch": "1.8.1"}})
    dump(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    # 2_Normalize has no files, so (as on the hub) the folder does not exist.
    ref = st_reference(folder, name, "BertModel")
    assert max(len(ids) for ids in ref["input_ids"]) == 64, "the long text must be truncated at 64"
    write_reference(folder, ref)


def make_splade_bert(out_root: Path, tmp: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    name = "splade-bert"
    staging = fresh_dir(tmp / name)
    vocab = train_wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, type_vocab_size=2, pad_token_id=0,
    )
    model = BertForMaskedLM(config)
    randomize(model, SEED + 70)
    # A random MLM head makes about half the logits positive, so every vocab entry would be active. Shift the
    # output bias down (the one departure from the 0.1·N(0,1) bias rule) so that, as with a trained SPLADE model,
    # only a few dozen entries per text survive relu.
    with torch.no_grad():
        model.cls.predictions.bias -= 2.0
    assert torch.equal(model.cls.predictions.decoder.bias, model.cls.predictions.bias)
    save_staging(staging, model, tok)
    transformer = Transformer(str(staging), transformer_task="fill-mask")
    pooling = SpladePooling(pooling_strategy="max", activation_function="relu", embedding_dimension=len(vocab))
    folder = fresh_dir(out_root / name)
    SparseEncoder(modules=[transformer, pooling], device="cpu").save(str(folder))
    check_fresh_weights(folder, model)

    se = SparseEncoder(str(folder), device="cpu").eval()
    hf_tok = se[0].tokenizer
    max_len = se.max_seq_length
    enc = [hf_tok(t, add_special_tokens=True, truncation=True, max_length=max_len) for t in TEXTS]
    input_ids = [e["input_ids"] for e in enc]
    check_tokenizer_json(folder, hf_tok, TEXTS, input_ids, max_len)

    def run(m):
        return [m.encode([t], convert_to_tensor=True, convert_to_sparse_tensor=False, batch_size=1)[0] for t in TEXTS]

    dense32 = run(se)
    batched = se.encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False, batch_size=len(TEXTS))
    batched_diff = max(float((batched[i] - dense32[i]).abs().max()) for i in range(len(TEXTS)))
    assert batched_diff < 1e-5, batched_diff
    dense64 = run(se.double())
    assert max(float((a.double() - b).abs().max()) for a, b in zip(dense32, dense64)) < 1e-4
    # the definition: max over tokens of log(1 + relu(MLM logits))
    mlm = se[0].model
    for ids, d in zip(input_ids, dense64):
        with torch.no_grad():
            logits = mlm(input_ids=torch.tensor([ids]), token_type_ids=torch.zeros(1, len(ids), dtype=torch.long)).logits[0]
        manual = torch.log1p(torch.relu(logits)).max(dim=0).values
        assert float((manual - d).abs().max()) < 1e-12

    def sparse(v):
        nz = torch.nonzero(v).flatten().tolist()
        return [{"index": i, "value": f32(v[i])} for i in nz]

    ref = {
        "model": name,
        "architecture": "BertForMaskedLM",
        "task": "sparse",
        "library": "sentence-transformers",
        "versions": versions(),
        "texts": TEXTS,
        "input_ids": input_ids,
        "token_type_ids": [e["token_type_ids"] for e in enc],
        "outputs": {"sparse": [sparse(d) for d in dense64]},
        "batched_max_abs_diff": batched_diff,
    }
    write_reference(folder, ref)


def make_qwen3_embedding(out_root: Path, tmp: Path) -> None:
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    name = "qwen3-embedding"
    staging = fresh_dir(tmp / name)
    vocab, merges = train_byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=128, padding_side="left")
    # As Qwen3-Embedding: <|endoftext|> is appended to every input, and pooling takes that last token.
    tok._tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=False, trim_offsets=False),
        processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", vocab["<|endoftext|>"])],
        ),
    ])
    config = Qwen3Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    model = Qwen3Model(config)
    randomize(model, SEED + 80)
    save_staging(staging, model, tok)
    transformer = Transformer(str(staging))
    st = SentenceTransformer(
        modules=[transformer, Pooling(64, pooling_mode="lasttoken"), Normalize()], device="cpu",
        prompts={"query": "Instruct: find\nQuery: ", "document": ""}, default_prompt_name=None,
    )
    folder = fresh_dir(out_root / name)
    st.save(str(folder))
    check_fresh_weights(folder, model)
    ref = st_reference(folder, name, "Qwen3Model")
    for ids in ref["input_ids"]:
        assert ids[-1] == vocab["<|endoftext|>"]
    # Extra output (not in the other folders): encode(prompt_name="query"), i.e. the "query" prompt from
    # config_sentence_transformers.json prepended to the text before tokenization, computed the same way.
    st = SentenceTransformer(str(folder), device="cpu").eval()
    q32 = [st.encode([t], prompt_name="query", convert_to_tensor=True)[0] for t in TEXTS]
    st = st.double()
    q64 = [st.encode([t], prompt_name="query", convert_to_tensor=True)[0] for t in TEXTS]
    assert max(float((a.double() - b).abs().max()) for a, b in zip(q32, q64)) < 1e-4
    plain = ref["outputs"]["embeddings"]
    assert all(max(abs(x - y) for x, y in zip(to_list(q), p)) > 1e-3 for q, p in zip(q64, plain))
    ref["outputs"]["query_embeddings"] = [to_list(q) for q in q64]
    write_reference(folder, ref)


def make_modernbert_st_mean(out_root: Path, tmp: Path) -> None:
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast
    from sentence_transformers.sentence_transformer.modules import Pooling

    name = "modernbert-st-mean"
    staging = fresh_dir(tmp / name)
    vocab, merges = train_byte_bpe(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_max_length=128, model_input_names=["input_ids", "attention_mask"],
    )
    config = ModernBertConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=16,
        pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"],
        cls_token_id=vocab["[CLS]"], sep_token_id=vocab["[SEP]"],
    )
    model = ModernBertModel(config)
    randomize(model, SEED + 90)
    save_staging(staging, model, tok)
    folder = fresh_dir(out_root / name)
    build_st(staging, folder, lambda t: [Pooling(64, pooling_mode="mean")])
    check_fresh_weights(folder, model)
    ref = st_reference(folder, name, "ModernBertModel")
    longest = max(ref["input_ids"], key=len)
    assert len(longest) > 2 * 16, "the window must matter"
    # check that it does: the same weights with both layers global give different token vectors
    all_global = ModernBertModel.from_pretrained(str(folder), layer_types=["full_attention"] * 2).eval()
    with torch.no_grad():
        g = all_global(input_ids=torch.tensor([longest])).last_hidden_state[0]
    assert float((g.double() - torch.tensor(ref["outputs"]["token_embeddings"][-1], dtype=torch.float64)).abs().max()) > 1e-2
    write_reference(folder, ref)


# ---------------------------------------------------------------------------------------------------------------
# Decoders (tests/fixtures/decoders/<name>/): causal LMs with logits and greedy-generation references, in the
# reference.json format of ../shared/fixtures/tiny/llama-tiny (one Rust loader reads both sets).
# ---------------------------------------------------------------------------------------------------------------

DECODER_TEXTS = ["Hello world!", "Hello", "How do I reset my password?"]  # 7, 4 and 14 tokens
DECODER_PROMPTS = ["The model reads tokens", "def add(a, b):"]
DECODER_NEW_TOKENS = 16
DECODER_MIN_MARGIN = 1e-2  # top-1 minus top-2 logit at every greedy step; fp32 error is ~3e-6
DECODER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def decoder_versions() -> dict:
    import platform
    import safetensors

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers_lib.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def decoder_tokenizer():
    """Byte-level BPE (vocab 500) in the Qwen2 layout: NFC, the Qwen regex split, ByteLevel; <|endoftext|> = 0
    is bos/eos/pad and the only added token, and nothing is added to the ids (no BOS, no EOS). All three decoders
    share it (real Mistral checkpoints use a SentencePiece-style tokenizer with a BOS; not exercised here)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_byte_bpe(DECODER_SPECIALS, vocab_size=500)
    assert vocab["<|endoftext|>"] == 0
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=256, padding_side="right",
    )
    return tok, len(vocab)


def decoder_common(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )


def top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.double(), 2).values
    return float(top[0] - top[1])


def greedy_full_recompute(model, prompt_ids: list[int], steps: int):
    """argmax loop that re-runs the whole sequence each step (no cache); returns ids and last-position logits."""
    ids = list(prompt_ids)
    out, rows = [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        rows.append(logits)
        ids.append(nxt)
    return out, rows


def decoder_reference(folder: Path, name: str, cls, load_kwargs: dict) -> tuple[dict, object]:
    """logits for DECODER_TEXTS (right-padded batch) and greedy generation for DECODER_PROMPTS, computed in fp64
    from the saved fp32 weights; checked against fp32 runs and HF generate() with KV cache."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(folder))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    m32 = cls.from_pretrained(str(folder), attn_implementation="eager", **load_kwargs).eval()
    m64 = cls.from_pretrained(str(folder), attn_implementation="eager", **load_kwargs).eval().double()
    # The padded batch runs with sdpa: with right padding and a sliding window, a pad query late in a short row
    # sees only pad keys, eager softmax gives NaN there, and the NaN reaches the valid positions of the next layer
    # through 0 * NaN in probs @ V. sdpa gives finite values. Valid positions are checked against eager runs.
    s32 = cls.from_pretrained(str(folder), attn_implementation="sdpa", **load_kwargs).eval()
    s64 = cls.from_pretrained(str(folder), attn_implementation="sdpa", **load_kwargs).eval().double()
    vocab_size = m32.config.vocab_size

    # --- logits on a right-padded batch
    ids_list = [tok(t, add_special_tokens=True)["input_ids"] for t in DECODER_TEXTS]
    for t, ids in zip(DECODER_TEXTS, ids_list):
        assert raw.encode(t).ids == ids, (name, t)
        assert ids[0] != 0, "no BOS may be added"
    lens = [len(i) for i in ids_list]
    assert len(set(lens)) == 3 and max(lens) >= 12, lens
    width = max(lens)
    input_ids = [ids + [0] * (width - len(ids)) for ids in ids_list]
    mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids in ids_list]
    with torch.no_grad():
        l64 = s64(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask)).logits
        l32 = s32(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask)).logits
    assert bool(torch.isfinite(l64).all()) and bool(torch.isfinite(l32).all()), name
    l64r = l64.float().double()  # what the file holds
    fp32_diff = 0.0
    for b, n in enumerate(lens):
        fp32_diff = max(fp32_diff, float((l32[b, :n].double() - l64r[b, :n]).abs().max()))
        # Each row alone (no padding, eager) gives the same valid positions. Not to 1e-15: HF computes the RoPE cos/sin
        # in float32 even in a float64 model, and torch's vectorised float32 cos/sin can differ by an ulp from the
        # scalar tail loop, so a different sequence length moves the logits by a few 1e-7.
        with torch.no_grad():
            alone = m64(input_ids=torch.tensor([ids_list[b]])).logits[0]
        assert float((alone - l64[b, :n]).abs().max()) < 1e-5, (name, b)
    assert fp32_diff < 1e-4, (name, fp32_diff)

    # --- greedy generation, each prompt alone
    gen_cfg = GenerationConfig(
        max_new_tokens=DECODER_NEW_TOKENS, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0,
        bos_token_id=0,
    )
    results = []
    for prompt in DECODER_PROMPTS:
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        assert raw.encode(prompt).ids == p_ids
        g64, rows64 = greedy_full_recompute(m64, p_ids, DECODER_NEW_TOKENS)
        g32, _ = greedy_full_recompute(m32, p_ids, DECODER_NEW_TOKENS)
        with torch.no_grad():
            hf = m32.generate(input_ids=torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                              generation_config=gen_cfg, use_cache=True)[0, len(p_ids):].tolist()
        with torch.no_grad():
            hf_sdpa = s32.generate(input_ids=torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                                   generation_config=gen_cfg, use_cache=True)[0, len(p_ids):].tolist()
        assert g64 == g32 == hf == hf_sdpa, (name, prompt, g64, g32, hf, hf_sdpa)
        margins = [top2_margin(r) for r in rows64]
        assert min(margins) > DECODER_MIN_MARGIN, (name, prompt, min(margins))
        text = raw.decode(g64, skip_special_tokens=False)
        full = raw.decode(p_ids + g64, skip_special_tokens=False)
        assert text == tok.decode(g64, skip_special_tokens=False)
        results.append({
            "prompt": prompt,
            "prompt_ids": p_ids,
            "generated_ids": g64,
            "generated_text": text,
            "full_text": full,
            "min_top1_top2_logit_margin": min(margins),
            "per_step_top1_top2_margin": margins,
            "step_logits_last_position": {
                "shape": [DECODER_NEW_TOKENS, vocab_size],
                "dtype": "float32",
                "note": "logits of the last position at each greedy step (fp64 ref, rounded)",
                "data": [to_list(r) for r in rows64],
            },
        })
    print(f"   logits fp32 vs fp64 {fp32_diff:.1e}; min top1-top2 margin "
          f"{min(r['min_top1_top2_logit_margin'] for r in results):.4f}; text lengths {lens}")

    ref = {
        "model": name,
        "class": cls.__name__,
        "versions": decoder_versions(),
        "save_note": "save_pretrained() (transformers 5 always writes model.safetensors)",
        "tokenizer": (
            f"byte-level BPE trained with tokenizers {tokenizers_lib.__version__} on the CORPUS of "
            "scripts/make-zoo-fixtures.py; vocab 500; Qwen2 layout (NFC normalizer, Qwen regex Split + ByteLevel "
            "pre-tokenizer, ByteLevel decoder); <|endoftext|>=0 is the one added special token (bos/eos/pad); ids 1 "
            "and 2 are <|im_start|> and <|im_end|> as plain vocab entries; no BOS is added automatically"
        ),
        "texts": DECODER_TEXTS,
        "input_ids": input_ids,
        "attention_mask": mask,
        "padding": ("right padding with <|endoftext|> (id 0); position_ids = 0..L-1 for every row (HF default), "
                    "so valid positions equal unpadded runs (checked)"),
        "outputs": {
            "logits": {
                "shape": [len(DECODER_TEXTS), width, vocab_size],
                "dtype": "float32",
                "note": "compare only positions where attention_mask==1",
                "max_abs_diff_torch_fp32_vs_this": fp32_diff,
                "data": to_list(l64),
            },
        },
        "greedy_generation": {
            "max_new_tokens": DECODER_NEW_TOKENS,
            "stop_on_eos": False,
            "batch": "each prompt alone (batch=1, no padding)",
            "check": ("identical ids from: fp64 full-recompute loop, fp32 full-recompute loop, HF "
                      "generate(do_sample=False) fp32 with KV cache (eager and sdpa attention)"),
            "results": results,
        },
        "reference_precision": "computed in float64 from the saved float32 weights, rounded to float32",
    }
    return ref, m64


def save_decoder(out_root: Path, name: str, model, tok) -> Path:
    folder = fresh_dir(out_root / name)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    check_fresh_weights(folder, model)
    return folder


def make_qwen2_tiny(out_root: Path, tmp: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    name = "qwen2-tiny"
    tok, vocab_size = decoder_tokenizer()
    config = Qwen2Config(
        **decoder_common(vocab_size), rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config)
    randomize(model, SEED + 117)  # seeds picked: greedy margins > 1e-2, generations not one repeated id
    folder = save_decoder(out_root, name, model, tok)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys, "tied head is not saved"
    biases = sorted(k for k in keys if k.endswith(".bias"))
    assert biases == sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"), biases
    ref, _ = decoder_reference(folder, name, Qwen2ForCausalLM, {})
    write_reference(folder, ref)


def make_qwen3_tiny(out_root: Path, tmp: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    name = "qwen3-tiny"
    tok, vocab_size = decoder_tokenizer()
    config = Qwen3Config(
        **decoder_common(vocab_size), head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
    )
    model = Qwen3ForCausalLM(config)
    randomize(model, SEED + 135)
    folder = save_decoder(out_root, name, model, tok)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and not any(k.endswith(".bias") for k in keys)
    assert "model.layers.0.self_attn.q_norm.weight" in keys and "model.layers.0.self_attn.k_norm.weight" in keys
    ref, _ = decoder_reference(folder, name, Qwen3ForCausalLM, {})
    write_reference(folder, ref)


def make_mistral_tiny(out_root: Path, tmp: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    name = "mistral-tiny"
    window = 8
    tok, vocab_size = decoder_tokenizer()
    config = MistralConfig(
        **decoder_common(vocab_size), head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, sliding_window=window,
    )
    model = MistralForCausalLM(config)
    randomize(model, SEED + 123)
    folder = save_decoder(out_root, name, model, tok)
    ref, m64 = decoder_reference(folder, name, MistralForCausalLM, {})
    # The window must matter: the same weights without a window give different logits from position `window` on,
    # and identical ones before it (so a query attends to itself and the window - 1 keys before it).
    full = MistralForCausalLM.from_pretrained(str(folder), attn_implementation="eager", sliding_window=None).eval()
    full = full.double()
    assert full.config.sliding_window is None and m64.config.sliding_window == window
    longest = max(range(len(DECODER_TEXTS)), key=lambda i: sum(ref["attention_mask"][i]))
    n = sum(ref["attention_mask"][longest])
    assert n > window
    ids = torch.tensor([ref["input_ids"][longest][:n]])
    with torch.no_grad():
        per_pos = (m64(input_ids=ids).logits[0] - full(input_ids=ids).logits[0]).abs().amax(dim=-1)
    assert float(per_pos[:window].max()) < 1e-12, per_pos
    assert float(per_pos[window]) > 1e-3 and float(per_pos[window:].min()) > 1e-3, per_pos
    for r in ref["greedy_generation"]["results"]:
        seq = r["prompt_ids"] + r["generated_ids"]
        assert len(seq) > window
        no_window, _ = greedy_full_recompute(full, r["prompt_ids"], DECODER_NEW_TOKENS)
        r_changed = no_window != r["generated_ids"]
        print(f"   {r['prompt']!r}: no-window greedy ids differ: {r_changed}")
    print(f"   no-window logits differ by up to {float(per_pos.max()):.3f} (positions >= {window}), 0 before")
    write_reference(folder, ref)


DECODERS = {
    "qwen2-tiny": make_qwen2_tiny,
    "qwen3-tiny": make_qwen3_tiny,
    "mistral-tiny": make_mistral_tiny,
}


MODELS = {
    "bert-st6-dense": make_bert_st6_dense,
    "roberta-st-mean": make_roberta_st_mean,
    "xlm-roberta-st-cls": make_xlm_roberta_st_cls,
    "xlm-roberta-reranker": make_xlm_roberta_reranker,
    "distilbert-st-mean": make_distilbert_st_mean,
    "distilbert-cls": make_distilbert_cls,
    "mpnet-st-mean": make_mpnet_st_mean,
    "bert-st-legacy-flags": make_bert_st_legacy_flags,
    "splade-bert": make_splade_bert,
    "qwen3-embedding": make_qwen3_embedding,
    "modernbert-st-mean": make_modernbert_st_mean,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--decoders-out", type=Path, default=DEFAULT_DECODERS_OUT)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    if args.only:
        unknown = set(args.only) - set(MODELS) - set(DECODERS)
        if unknown:
            parser.error(f"unknown model(s): {', '.join(sorted(unknown))}")
    jobs = [(name, fn, args.out) for name, fn in MODELS.items()]
    jobs += [(name, fn, args.decoders_out) for name, fn in DECODERS.items()]
    failed = []
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        for name, fn, out in jobs:
            if args.only and name not in args.only:
                continue
            print(f"== {name}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(SEED)
            try:
                fn(out, Path(tmp))
            except Exception:
                traceback.print_exc()
                failed.append(name)
    if failed:
        print("FAILED:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
