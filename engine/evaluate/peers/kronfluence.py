"""kronfluence (EK-FAC influence) at the final checkpoint."""
from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.module.utils import get_tracked_module_names
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn
from torch.utils.data import TensorDataset

from engine.autodiff.measurement import correct_class_margin
from engine.evaluate.peers.base import PeerInputs, Recorder, model_at


class _ClassificationTask(Task):
    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        if sample:
            # labels sampled from the model: the true Fisher, as EK-FAC asks
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1).squeeze(-1)
        # summed (not mean) cross-entropy: kronfluence divides its factors by the
        # number of examples itself
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return correct_class_margin(model(x), y.long()).sum()


def run(inputs: PeerInputs, method: str, rec: Recorder, opts: dict, settings: dict) -> np.ndarray:
    # EK-FAC is an influence function at the final model: one checkpoint
    model = model_at(inputs, inputs.checkpoints[-1])
    task = _ClassificationTask()
    model = prepare_model(model, task)
    bs = int(opts.get("batch_size", min(len(inputs.x_train), 512)))
    qbs = int(opts.get("query_batch_size", min(len(inputs.x_test), 64)))
    train_ds = TensorDataset(inputs.x_train, inputs.y_train)
    test_ds = TensorDataset(inputs.x_test, inputs.y_test)
    dl_kwargs = DataLoaderKwargs(num_workers=0)
    score_kwargs = {}
    if inputs.damping is not None:
        score_kwargs["damping_factor"] = float(inputs.damping)
    score_args = ScoreArguments(**score_kwargs)
    with tempfile.TemporaryDirectory(prefix="proponent_kronfluence_") as tmp:
        analyzer = Analyzer(
            analysis_name="proponent_peer",
            model=model,
            task=task,
            cpu=not str(inputs.device).startswith("cuda"),
            output_dir=tmp,
            disable_tqdm=True,
            log_level=logging.WARNING,
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train_ds,
            per_device_batch_size=bs,
            dataloader_kwargs=dl_kwargs,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        rec.fit_done()
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=test_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=qbs,
            per_device_train_batch_size=bs,
            dataloader_kwargs=dl_kwargs,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        raw = scores.detach().to(torch.float64).cpu().numpy()

    settings.update(
        checkpoints_used=1,
        strategy="ekfac",
        damping_factor=score_args.damping_factor,
        damping_applies_to="EK-FAC eigenvalues of the per-example (mean) Fisher",
        train_loss="sum cross-entropy (factors divided by n by kronfluence)",
        tracked_modules=list(get_tracked_module_names(model)),
        untracked_params="only nn.Linear / nn.Conv2d are tracked; other parameters are left out",
        batch_size=bs,
        query_batch_size=qbs,
        # kronfluence returns grad f(q)^T (G + lambda)^-1 grad loss(z_i): with f = margin this is
        # minus the derivative of q's margin w.r.t. upweighting i, i.e. positive for
        # opponents. Flip it.
        orientation="sign flipped (kronfluence score = -d margin_q / d upweight_i)",
    )
    return -raw

