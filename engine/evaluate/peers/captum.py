"""captum TracInCP over the recorded trajectory."""
from __future__ import annotations

import numpy as np
import torch
from captum.influence import TracInCP
from torch import nn
from torch.utils.data import TensorDataset

from engine.evaluate.peers.base import MarginLoss, PeerInputs, Recorder


def run(inputs: PeerInputs, method: str, rec: Recorder, opts: dict, settings: dict) -> np.ndarray:
    if len(inputs.checkpoint_lrs) != len(inputs.checkpoints):
        raise ValueError(f"{len(inputs.checkpoints)} checkpoints but {len(inputs.checkpoint_lrs)} learning rates")
    model = inputs.build_model().to(inputs.device)
    # captum wants checkpoint "paths"; we hand it sortable keys and a loader that returns the lr
    keys = [f"ckpt_{i:06d}" for i in range(len(inputs.checkpoints))]
    table = {k: (sd, float(lr)) for k, sd, lr in zip(keys, inputs.checkpoints, inputs.checkpoint_lrs)}

    def load(m: nn.Module, key: str) -> float:
        sd, lr = table[key]
        m.load_state_dict(sd)
        m.eval()
        return lr

    bs = int(opts.get("batch_size", min(len(inputs.x_train), 256)))
    train_ds = TensorDataset(inputs.x_train.to(inputs.device), inputs.y_train.to(inputs.device))
    tracin = TracInCP(
        model,
        train_ds,
        checkpoints=keys,
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=bs,
        test_loss_fn=MarginLoss(),  # our measurement on the query side
        sample_wise_grads_per_batch=False,  # per-example loss; works for any layer type
    )
    rec.fit_done()  # TracInCP precomputes nothing
    raw = tracin.influence((inputs.x_test.to(inputs.device), inputs.y_test.to(inputs.device)), k=None)
    settings.update(
        checkpoints_used=len(inputs.checkpoints),
        weights=[float(w) for w in inputs.checkpoint_lrs],
        batch_size=bs,
        loss_fn="CrossEntropyLoss(reduction='none')",
        test_loss_fn="margin",
        # captum returns sum_t lr_t <grad test_loss_fn(q), grad loss_fn(z_i)>, already
        # [n_test, n_train]. With the margin as the query's "loss" a proponent scores
        # negative (with CE on both sides it would be positive). Flip it.
        orientation="sign flipped (query side is the margin gradient, train side the loss gradient)",
    )
    return -raw.detach().to(torch.float64).cpu().numpy()

