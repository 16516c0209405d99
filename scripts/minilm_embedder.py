"""all-MiniLM-L6-v2 as sentence-transformers computes it (mean pooling over the attention mask,
L2-normalised), as a torch module and as an ONNX file: shared by the baseline scripts
(`bench-minilm-baselines.py`, `minilm-int8-accuracy-baselines.py`)."""
import torch
import torch.nn.functional as F


class Embedder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)


def export_onnx(emb, path):
    """Writes `emb` to `path` with dynamic batch and sequence axes."""
    ids = torch.ones(2, 8, dtype=torch.int64)
    torch.onnx.export(emb, (ids, torch.ones_like(ids)), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
