"""Adapters that run peer attribution libraries on OUR model, checkpoints and data.

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

import importlib
import importlib.metadata
import logging
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "PEER_METHODS",
    "PeerInputs",
    "PeerResult",
    "available_peers",
    "featurize_throughput_traker",
    "run_peer",
]


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


PEER_METHODS: dict[str, list[str]] = {
    "traker": ["trak"],
    "kronfluence": ["ekfac"],
    "dattri": ["trak", "tracin", "if-cg", "if-lissa", "grad-dot", "grad-cos"],
    "captum": ["tracincp"],
    "cleanlab": ["label-quality"],
}

# import name and distribution name of each peer
_IMPORT_NAME = {
    "traker": "trak",
    "kronfluence": "kronfluence",
    "dattri": "dattri",
    "captum": "captum.influence",
    "cleanlab": "cleanlab",
}
_DIST_NAME = {
    "traker": "traker",
    "kronfluence": "kronfluence",
    "dattri": "dattri",
    "captum": "captum",
    "cleanlab": "cleanlab",
}

# Cap on (examples x parameters) floats held at once as per-example gradients when we pick
# batch sizes for the peers (about 200 MB in float32).
_GRAD_FLOATS_BUDGET = 50_000_000


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


def _import_error(peer: str) -> str | None:
    try:
        importlib.import_module(_IMPORT_NAME[peer])
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return _one_line(e)


def available_peers() -> dict[str, str | None]:
    """peer -> None if importable, else the import error as one line."""
    return {peer: _import_error(peer) for peer in _IMPORT_NAME}


# --------------------------------------------------------------------------------------
# measurement and loss (batched [B, C] or a single example [C]; vmap-safe: no one_hot,
# no data-dependent indexing)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct-class margin z_y - logsumexp_{j!=y} z_j, per row."""
    y = y.long()
    classes = torch.arange(logits.shape[-1], device=logits.device)
    mask = classes == y.unsqueeze(-1)
    z_y = torch.where(mask, logits, torch.zeros_like(logits)).sum(-1)
    others = logits.masked_fill(mask, float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def _correct_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.long()
    classes = torch.arange(logits.shape[-1], device=logits.device)
    mask = classes == y.unsqueeze(-1)
    return torch.where(mask, torch.softmax(logits, -1), torch.zeros_like(logits)).sum(-1)


class _MarginLoss(nn.Module):
    """Per-example margin as a captum "loss" (captum reads the ``reduction`` attribute)."""

    reduction = "none"

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _margin(logits, y)


# --------------------------------------------------------------------------------------
# cost accounting


class _Recorder:
    """Times fit and scoring separately and samples the process RSS in the background."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_fit: float | None = None
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss_source = "resource.ru_maxrss (process lifetime max)"
        try:
            import psutil

            self._proc = psutil.Process()
            self.peak_rss = self._proc.memory_info().rss
            self.rss_source = "psutil RSS sampled every 5 ms during the run (process-wide)"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        except Exception:  # noqa: BLE001 - psutil missing: fall back to ru_maxrss
            self._proc = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                return
            self._stop.wait(0.005)

    def fit_done(self) -> None:
        if self.t_fit is None:
            self.t_fit = time.perf_counter()

    def finish(self) -> tuple[float, float, float, dict]:
        t_end = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        t_fit = self.t_fit if self.t_fit is not None else t_end
        # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1.0 if sys.platform == "darwin" else 1024.0
        ru_max_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        if self._proc is not None:
            try:
                self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                pass
            peak_mb = self.peak_rss / 2**20
        else:
            peak_mb = ru_max_mb
        notes = {"peak_rss_source": self.rss_source, "ru_maxrss_mb_process_lifetime": round(ru_max_mb, 1)}
        return t_fit - self.t0, t_end - t_fit, peak_mb, notes


# --------------------------------------------------------------------------------------
# shared helpers


def _model_at(inputs: PeerInputs, state: dict[str, torch.Tensor]) -> nn.Module:
    model = inputs.build_model()
    model.load_state_dict(state)
    return model.to(inputs.device).eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _grad_batch_size(n: int, n_params: int) -> int:
    return int(max(1, min(n, _GRAD_FLOATS_BUDGET // max(1, n_params))))


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    # unshuffled (dattri checks for a SequentialSampler), no worker processes
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, num_workers=0)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str):
    for s in range(0, len(x), batch_size):
        yield x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)


def _version(peer: str) -> str | None:
    try:
        return importlib.metadata.version(_DIST_NAME[peer])
    except Exception:  # noqa: BLE001
        return None


def _functional_fns(model: nn.Module, x_ndim: int):
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
        return _margin(logits, y).sum()

    def correct_prob(params, data):
        x, y = data
        logits, y = _forward(params, x, y)
        return _correct_prob(logits, y).sum()

    return loss_ce, margin, correct_prob


# --------------------------------------------------------------------------------------
# traker (MadryLab TRAK)


def _make_traker(inputs: PeerInputs, model: nn.Module, save_dir: str, opts: dict, settings: dict):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    n_params = _n_params(model)
    proj_type = opts.get("proj_type", "rademacher")
    projector = None
    if not str(inputs.device).startswith("cuda"):
        # No CUDA: TRAKer would pick BasicProjector itself, but only with a normal projection
        # because of float16; we pass it explicitly in float32 so the Rademacher JL matrix
        # of the TRAK paper can be used.
        projector = BasicProjector(
            grad_dim=n_params,
            proj_dim=inputs.proj_dim,
            seed=inputs.seed,
            proj_type=ProjectionType(proj_type),
            device=inputs.device,
            dtype=torch.float32,
            block_size=opts.get("block_size", 100),
        )
    lambda_reg = 0.0 if inputs.damping is None else float(inputs.damping)
    traker = TRAKer(
        model=model,
        task="image_classification",  # model output = log(p/(1-p)) = our margin exactly
        train_set_size=len(inputs.x_train),
        save_dir=save_dir,
        load_from_save_dir=True,  # fresh temp dir; True is the path traker expects (creates experiments.json)
        device=inputs.device,
        projector=projector,  # None on CUDA: TRAKer picks its CudaProjector if fast_jl works
        proj_dim=inputs.proj_dim,
        use_half_precision=bool(opts.get("use_half_precision", False)),
        projector_seed=inputs.seed,
        lambda_reg=lambda_reg,
        logging_level=logging.WARNING,
    )
    settings.update(
        projector=type(traker.projector).__name__,
        proj_type=str(getattr(traker.projector, "proj_type", proj_type)),
        proj_dim=traker.proj_dim,
        lambda_reg=lambda_reg,
        lambda_reg_applies_to="X^T X of projected margin gradients / sqrt(#params), summed over train",
        use_half_precision=bool(opts.get("use_half_precision", False)),
        n_params=n_params,
    )
    if lambda_reg == 0.0 and traker.proj_dim > min(len(inputs.x_train), n_params):
        settings["warning"] = "proj_dim exceeds min(n_train, #params): X^T X is singular without damping"
    return traker


def _restore_basic_projector(projector) -> None:
    """Work around a traker 0.3.2 bug in BasicProjector with a single block.

    ``finalize_features`` calls ``projector.free_memory()``, which deletes the JL block.
    When ``proj_dim <= block_size`` there is one block, and ``project`` only rebuilds it when
    the model id changes, so scoring the last-featurized model crashes with "no attribute
    proj_matrix". Rebuilding the block from the projector's current generator state gives
    exactly the matrix used to featurize that model id (no change to the method).
    """
    if getattr(projector, "proj_matrix_available", True) is False and getattr(projector, "num_blocks", 0) == 1:
        projector.generate_sketch_matrix(projector.generator_states[0])


def _run_traker(inputs: PeerInputs, method: str, rec: _Recorder, opts: dict, settings: dict) -> np.ndarray:
    model = _model_at(inputs, inputs.checkpoints[-1])
    bs = int(opts.get("batch_size", _grad_batch_size(len(inputs.x_train), _n_params(model))))
    settings.update(checkpoints_used=len(inputs.checkpoints), batch_size=bs)
    with tempfile.TemporaryDirectory(prefix="proponent_traker_") as tmp:
        traker = _make_traker(inputs, model, tmp, opts, settings)
        for model_id, ckpt in enumerate(inputs.checkpoints):
            traker.load_checkpoint(ckpt, model_id=model_id)
            for xb, yb in _batches(inputs.x_train, inputs.y_train, bs, inputs.device):
                traker.featurize(batch=(xb, yb), num_samples=len(xb))
        traker.finalize_features()
        _restore_basic_projector(traker.projector)
        rec.fit_done()
        for model_id, ckpt in enumerate(inputs.checkpoints):
            traker.start_scoring_checkpoint(
                exp_name="peer", checkpoint=ckpt, model_id=model_id, num_targets=len(inputs.x_test)
            )
            for xb, yb in _batches(inputs.x_test, inputs.y_test, bs, inputs.device):
                traker.score(batch=(xb, yb), num_samples=len(xb))
        scores = traker.finalize_scores(exp_name="peer")
        # traker returns [n_train, n_test]. Both sides are margin gradients and Q = 1 - p >= 0,
        # so a positive score already means "removing i lowers q's margin": no sign flip.
        out = np.array(scores, dtype=np.float64).T.copy()
    settings["orientation"] = "as returned (phi_q^T (Phi^T Phi)^-1 phi_i * (1-p_i)); transposed"
    return out


def featurize_throughput_traker(inputs: PeerInputs, n_examples: int | None = None) -> float:
    """Examples per second of traker's ``featurize`` on the training set (final checkpoint).

    Only the featurize calls are timed (per-example gradients, projection, out-to-loss term);
    building the TRAKer and loading the checkpoint are not.
    """
    n = len(inputs.x_train) if n_examples is None else min(int(n_examples), len(inputs.x_train))
    model = _model_at(inputs, inputs.checkpoints[-1])
    bs = _grad_batch_size(n, _n_params(model))
    x, y = inputs.x_train[:n], inputs.y_train[:n]
    with tempfile.TemporaryDirectory(prefix="proponent_traker_tp_") as tmp:
        sub = PeerInputs(**{**inputs.__dict__, "x_train": x, "y_train": y})
        traker = _make_traker(sub, model, tmp, {}, {})
        traker.load_checkpoint(inputs.checkpoints[-1], model_id=0)
        t0 = time.perf_counter()
        for xb, yb in _batches(x, y, bs, inputs.device):
            traker.featurize(batch=(xb, yb), num_samples=len(xb))
        if str(inputs.device).startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return n / max(dt, 1e-12)


# --------------------------------------------------------------------------------------
# kronfluence (EK-FAC influence)


def _run_kronfluence(inputs: PeerInputs, method: str, rec: _Recorder, opts: dict, settings: dict) -> np.ndarray:
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

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
            return _margin(model(x), y).sum()

    # EK-FAC is an influence function at the final model: one checkpoint
    model = _model_at(inputs, inputs.checkpoints[-1])
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
    from kronfluence.module.utils import get_tracked_module_names

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


# --------------------------------------------------------------------------------------
# dattri


def _run_dattri(inputs: PeerInputs, method: str, rec: _Recorder, opts: dict, settings: dict) -> np.ndarray:
    from dattri.task import AttributionTask

    model = inputs.build_model().to(inputs.device)  # graph only; dattri loads the checkpoints
    loss_ce, margin_fn, correct_prob = _functional_fns(model, inputs.x_train.ndim)
    n_train, n_params = len(inputs.x_train), _n_params(model)
    bs = int(opts.get("batch_size", _grad_batch_size(n_train, n_params)))
    train_loader = _loader(inputs.x_train, inputs.y_train, bs)
    test_loader = _loader(inputs.x_test, inputs.y_test, int(opts.get("test_batch_size", bs)))
    # the projector kwargs are passed in full every time: dattri updates its module-level
    # DEFAULT_PROJECTOR_KWARGS dict in place, so a partial dict would leak between runs
    proj_kwargs = {
        "proj_dim": inputs.proj_dim,
        "proj_max_batch_size": 32,
        "proj_seed": inputs.seed,
        "device": str(inputs.device),
        "proj_type": opts.get("proj_type", "normal"),
    }
    final_only = [inputs.checkpoints[-1]]
    settings.update(batch_size=bs, measurement="margin", train_loss="mean cross-entropy")

    if method == "trak":
        from dattri.algorithm.trak import TRAKAttributor

        # dattri's own TRAK recipe: the margin on both sides, Q from the correct-class probability
        task = AttributionTask(loss_func=margin_fn, model=model, checkpoints=list(inputs.checkpoints))
        reg = 0.0 if inputs.damping is None else float(inputs.damping)
        att = TRAKAttributor(
            task=task,
            correct_probability_func=correct_prob,
            projector_kwargs=proj_kwargs,
            device=inputs.device,
            regularization=reg,
        )
        if reg == 0.0 and inputs.proj_dim > min(n_train, n_params):
            settings["warning"] = "proj_dim exceeds min(n_train, #params): X^T X is singular without damping"
        att.cache(train_loader)
        rec.fit_done()
        raw = att.attribute(test_loader)  # [n_train, n_test]
        settings.update(
            checkpoints_used=len(inputs.checkpoints),
            projector=proj_kwargs,
            regularization=reg,
            regularization_applies_to="X^T X of projected margin gradients / sqrt(#params)",
            orientation="as returned (margin gradients on both sides, Q = 1 - p >= 0); transposed",
        )
        return raw.detach().to(torch.float64).cpu().numpy().T

    if method in ("tracin", "grad-dot", "grad-cos"):
        from dattri.algorithm.tracin import TracInAttributor

        if method == "tracin":
            ckpts, weights = list(inputs.checkpoints), [float(w) for w in inputs.checkpoint_lrs]
            if len(weights) != len(ckpts):
                raise ValueError(f"{len(ckpts)} checkpoints but {len(weights)} learning rates")
        else:  # Grad-Dot / Grad-Cos: TracIn at the final checkpoint with weight 1 (dattri's docs)
            ckpts, weights = final_only, [1.0]
        task = AttributionTask(loss_func=loss_ce, model=model, checkpoints=ckpts, target_func=margin_fn)
        att = TracInAttributor(
            task=task,
            weight_list=torch.tensor(weights),
            normalized_grad=(method == "grad-cos"),
            projector_kwargs=proj_kwargs,
            device=inputs.device,
        )
        att.cache()  # nothing to precompute in dattri's TracIn
        rec.fit_done()
        raw = att.attribute(train_loader, test_loader)  # [n_train, n_test]
        settings.update(
            checkpoints_used=len(ckpts),
            weights=weights,
            projector=proj_kwargs,
            # dattri computes sum_t w_t <grad loss(z_i), grad f(q)>: a proponent's loss gradient
            # points against q's margin gradient, so the raw score is negative. Flip it.
            orientation="sign flipped (train side is the loss gradient, query side the margin gradient); transposed",
        )
        return -raw.detach().to(torch.float64).cpu().numpy().T

    if method in ("if-cg", "if-lissa"):
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorLiSSA

        task = AttributionTask(loss_func=loss_ce, model=model, checkpoints=final_only, target_func=margin_fn)
        # dattri sums the inverse-HVP over the batches of the cached loader, so the Hessian is
        # only the training-loss Hessian when that loader is a single batch of the whole set.
        full_loader = _loader(inputs.x_train, inputs.y_train, n_train)
        if method == "if-cg":
            kw = {"max_iter": 10, "tol": 1e-7, "mode": "rev-rev"}
            kw.update({k: opts[k] for k in ("max_iter", "tol", "mode") if k in opts})
            kw["regularization"] = 0.0 if inputs.damping is None else float(inputs.damping)
            att = IFAttributorCG(task=task, device=inputs.device, **kw)
            settings.update(regularization_applies_to="Hessian of the mean training loss (+ reg * I)")
        else:
            kw = {"batch_size": 1, "num_repeat": 1, "recursion_depth": 5000, "scaling": 50.0, "mode": "rev-rev"}
            kw.update({k: opts[k] for k in ("batch_size", "num_repeat", "recursion_depth", "scaling", "mode") if k in opts})
            kw["damping"] = 0.0 if inputs.damping is None else float(inputs.damping)
            att = IFAttributorLiSSA(task=task, device=inputs.device, **kw)
            settings.update(
                damping_applies_to="LiSSA recursion; effective Hessian damping = damping * scaling",
                effective_lambda=kw["damping"] * kw["scaling"],
            )
        att.cache(full_loader)
        rec.fit_done()  # dattri does the inverse-HVP work inside attribute(), per train batch
        raw = att.attribute(train_loader, test_loader)  # [n_train, n_test]
        settings.update(
            checkpoints_used=1,
            solver_kwargs=kw,
            note="dattri runs the iHVP inside attribute(), so fit_seconds is ~0",
            # dattri returns grad loss(z_i)^T H^-1 grad f(q) = -(d f_q / d upweight_i): positive
            # for opponents when f is the margin. Flip it.
            orientation="sign flipped (grad loss_i^T H^-1 grad margin_q = -d margin_q/d upweight_i); transposed",
        )
        return -raw.detach().to(torch.float64).cpu().numpy().T

    raise ValueError(f"dattri method {method!r} not handled")


# --------------------------------------------------------------------------------------
# captum TracInCP


def _run_captum(inputs: PeerInputs, method: str, rec: _Recorder, opts: dict, settings: dict) -> np.ndarray:
    from captum.influence import TracInCP

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
        test_loss_fn=_MarginLoss(),  # our measurement on the query side
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


# --------------------------------------------------------------------------------------
# cleanlab


def _run_cleanlab(inputs: PeerInputs, method: str, rec: _Recorder, opts: dict, settings: dict) -> np.ndarray:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = np.asarray(inputs.cross_val_probs(), dtype=np.float64)  # the K-fold CV is cleanlab's cost
    rec.fit_done()
    labels = inputs.y_train.detach().cpu().numpy().astype(np.int64)
    if probs.shape != (len(labels), inputs.num_classes):
        raise ValueError(f"cross_val_probs has shape {probs.shape}, expected {(len(labels), inputs.num_classes)}")
    q_method = opts.get("quality_method", "self_confidence")
    quality = get_label_quality_scores(labels, probs, method=q_method)
    issues = find_label_issues(labels, probs, n_jobs=1)
    settings.update(
        quality_method=q_method,
        n_label_issues=int(np.sum(issues)),
        label_issue_indices=np.flatnonzero(issues).tolist(),
        fit_note="fit_seconds is the cross_val_probs() call (K-fold cross-validation)",
        orientation="suspicion = 1 - label quality (higher = more likely mislabeled), shape [n_train]",
    )
    return 1.0 - np.asarray(quality, dtype=np.float64)


_RUNNERS = {
    "traker": _run_traker,
    "kronfluence": _run_kronfluence,
    "dattri": _run_dattri,
    "captum": _run_captum,
    "cleanlab": _run_cleanlab,
}


def run_peer(peer: str, method: str, inputs: PeerInputs, *, options: dict | None = None) -> PeerResult:
    """Run one peer method on our checkpoints and data.

    ``options`` (an optional extension) overrides a peer's own knobs, e.g. dattri LiSSA's
    ``recursion_depth`` or ``scaling``, or batch sizes; they are echoed in ``settings``.
    Unknown peer/method names raise ``ValueError``; any failure inside the peer is returned
    as ``skipped`` with a one-line reason.
    """
    if peer not in PEER_METHODS:
        raise ValueError(f"unknown peer {peer!r}; known: {sorted(PEER_METHODS)}")
    if method not in PEER_METHODS[peer]:
        raise ValueError(f"peer {peer!r} has no method {method!r}; it offers {PEER_METHODS[peer]}")
    opts = dict(options or {})
    settings: dict = {
        "version": _version(peer),
        "device": str(inputs.device),
        "proj_dim": inputs.proj_dim,
        "damping": inputs.damping,
        "seed": inputs.seed,
        "torch_threads": torch.get_num_threads(),
        "n_train": len(inputs.x_train),
        "n_test": len(inputs.x_test),
    }
    if opts:
        settings["options"] = opts

    def _skip(reason: str, rec: _Recorder | None = None) -> PeerResult:
        fit_s, score_s, peak, notes = rec.finish() if rec is not None else (0.0, 0.0, 0.0, {})
        settings.update(notes)
        return PeerResult(peer, method, None, fit_s, score_s, peak, settings, skipped=reason)

    if peer == "cleanlab" and inputs.cross_val_probs is None:
        return _skip("no cross_val_probs given: cleanlab needs out-of-sample K-fold predicted probabilities")
    err = _import_error(peer)
    if err is not None:
        return _skip(f"import failed: {err}")

    # Seed the peers' random draws (label sampling, projections) without disturbing the
    # caller's global RNG streams.
    np_state = np.random.get_state()
    cuda = str(inputs.device).startswith("cuda") and torch.cuda.is_available()
    rec = _Recorder()
    try:
        with torch.random.fork_rng(devices=None if cuda else []):
            torch.manual_seed(inputs.seed)
            np.random.seed(inputs.seed % 2**32)
            scores = _RUNNERS[peer](inputs, method, rec, opts, settings)
    except Exception as e:  # noqa: BLE001 - a peer failure is a result, not a crash
        return _skip(_one_line(e), rec)
    finally:
        np.random.set_state(np_state)
    fit_s, score_s, peak, notes = rec.finish()
    settings.update(notes)

    scores = np.asarray(scores, dtype=np.float64)
    expected = (len(inputs.x_train),) if peer == "cleanlab" else (len(inputs.x_test), len(inputs.x_train))
    if scores.shape != expected:
        return PeerResult(peer, method, None, fit_s, score_s, peak, settings,
                          skipped=f"peer returned shape {scores.shape}, expected {expected}")
    bad = int(np.size(scores) - np.isfinite(scores).sum())
    if bad:
        settings["non_finite"] = bad
        hint = ""
        if (peer, method) == ("dattri", "if-cg"):
            # dattri's CG has no residual stop: once it has converged exactly it divides 0/0
            hint = " (dattri CG has no residual stop; use max_iter below the parameter count)"
        return PeerResult(peer, method, None, fit_s, score_s, peak, settings,
                          skipped=f"peer returned {bad} non-finite scores of {scores.size}{hint}")
    return PeerResult(peer, method, np.ascontiguousarray(scores), fit_s, score_s, peak, settings)
