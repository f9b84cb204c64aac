"""Shared pieces of the peer adapters: inputs, result, cost recorder, loaders, functional losses.

Adapters that run peer attribution libraries on OUR model, checkpoints and data.

Every adapter calls the library itself (no library code is copied here) and returns a
score matrix ``S[n_test, n_train]`` (float64) in Proponent's sign convention:
``S[q, i] > 0`` means training example ``i`` is a proponent of query ``q`` (upweighting
``i`` raises q's correct-class margin; removing it lowers it).

Measurement. Wherever a library lets us choose what is explained, we give it our
measurement, the correct-class margin ``f = z_y - logsumexp_{j!=y} z_j``, and the
training loss is cross-entropy. Libraries that then report
``grad(train loss) . M . grad(measurement)`` are negative for proponents (gradient
descent on a proponent's loss raises the query's margin, so the two gradients point in
opposite directions), and we flip their sign. Each flip below says why; the tests check
every orientation against real leave-one-out retraining.

cleanlab is the exception: it returns a per-training-example suspicion ``[n_train]``
(higher = more likely mislabeled).

No peer is a hard dependency: a peer that cannot be imported, or that fails on a given
model, comes back with ``skipped`` set to a one-line reason, never silently dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.autodiff.measurement import correct_class_margin, correct_class_probability
from engine.evaluate.memory import MemorySampler


@dataclass
class PeerInputs:
    build_model: Callable[[], nn.Module]        # fresh untrained module of the project's architecture
    checkpoints: list[dict[str, torch.Tensor]]  # state_dicts; checkpoints[-1] is the final model
    checkpoint_lrs: list[float]                 # learning rate at each checkpoint (TracIn weights)
    x_train: torch.Tensor
    y_train: torch.Tensor                       # int64 class indices 0..C-1
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    proj_dim: int = 512
    damping: float | None = None                # None: the peer's own default
    device: str = "cpu"
    seed: int = 0
    # for cleanlab: out-of-sample predicted probabilities of the training set (K-fold CV)
    cross_val_probs: Callable[[], np.ndarray] | None = None


@dataclass
class PeerResult:
    peer: str
    method: str
    scores: np.ndarray | None   # [n_test, n_train] float64, positive = proponent; cleanlab: [n_train] suspicion
    fit_seconds: float
    score_seconds: float
    peak_rss_mb: float
    settings: dict
    skipped: str | None = None  # one-line reason when the peer cannot run this setting



# Cap on (examples x parameters) floats held at once as per-example gradients when we pick
# batch sizes for the peers (about 200 MB in float32).
_GRAD_FLOATS_BUDGET = 50_000_000


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


class MarginLoss(nn.Module):
    """Per-example margin as a captum "loss" (captum reads the ``reduction`` attribute)."""

    reduction = "none"

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return correct_class_margin(logits, y.long())


class Recorder:
    """Times fit and scoring separately; peak memory from the engine's one memory meter."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_fit: float | None = None
        self._memory = MemorySampler().__enter__()

    def fit_done(self) -> None:
        if self.t_fit is None:
            self.t_fit = time.perf_counter()

    def finish(self) -> tuple[float, float, float, dict]:
        t_end = time.perf_counter()
        self._memory.__exit__(None, None, None)
        t_fit = self.t_fit if self.t_fit is not None else t_end
        notes = {"peak_rss_source": "process RSS sampled every 5 ms during the run (process-wide)"}
        return t_fit - self.t0, t_end - t_fit, self._memory.peak_mb, notes


def model_at(inputs: PeerInputs, state: dict[str, torch.Tensor]) -> nn.Module:
    model = inputs.build_model()
    model.load_state_dict(state)
    return model.to(inputs.device).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def grad_batch_size(n: int, n_params: int) -> int:
    return int(max(1, min(n, _GRAD_FLOATS_BUDGET // max(1, n_params))))


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    # unshuffled (dattri checks for a SequentialSampler), no worker processes
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, num_workers=0)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str):
    for s in range(0, len(x), batch_size):
        yield x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)


def functional_fns(model: nn.Module, x_ndim: int):
    """torch.func-style (params, data) -> scalar functions for dattri.

    dattri calls them on one example (vmap strips the batch axis) and, for the Hessian in
    IF-CG/LiSSA, on a whole batch; we re-add the batch axis when it is missing.
    """

    def _forward(params, x, y):
        if x.ndim == x_ndim - 1:  # a single example
            x, y = x.unsqueeze(0), y.reshape(1)
        return torch.func.functional_call(model, params, (x,)), y.long()

    def loss_ce(params, data):
        # the training loss: mean cross-entropy (labels may arrive as float from dattri's
        # LiSSA collate function, hence .long() in _forward)
        x, y = data
        logits, y = _forward(params, x, y)
        return torch.nn.functional.cross_entropy(logits, y)

    def margin(params, data):
        x, y = data
        logits, y = _forward(params, x, y)
        return correct_class_margin(logits, y).sum()

    def correct_prob(params, data):
        x, y = data
        logits, y = _forward(params, x, y)
        return correct_class_probability(logits, y).sum()

    return loss_ce, margin, correct_prob

