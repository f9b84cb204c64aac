"""Peer attribution and label-quality libraries, run on OUR model, checkpoints and data.

One file per peer (traker, kronfluence, dattri, captum, cleanlab), each with a ``run`` adapter;
``base`` holds the shared inputs, result and helpers; this module is the one catalogue of
peers and ``run_peer``. The sign convention and the measurement are described in ``base``.

No peer is a hard dependency: a peer that cannot be imported, or that fails on a given model,
comes back with ``skipped`` set to a one-line reason, never silently dropped.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.core.data import whole
from engine.core.project import Project
from engine.evaluate.peers.base import PeerInputs, PeerResult, Recorder, one_line

__all__ = ["PEERS", "PEER_METHODS", "Peer", "PeerInputs", "PeerResult", "available_peers",
           "featurize_throughput_traker", "project_inputs", "run_peer", "SCORE_METHODS"]


@dataclass(frozen=True)
class Peer:
    name: str
    import_name: str            # what must import for the peer to run
    dist_name: str              # its distribution, for the version
    methods: tuple[str, ...]
    output: str = "scores"      # "scores": [n_test, n_train]; "suspicion": [n_train] (joins the mislabel table)
    # per-method overrides the benchmark applies, echoed in the peer's settings
    bench_options: dict = field(default_factory=dict)


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("traker", "trak", "traker", ("trak",)),
    Peer("kronfluence", "kronfluence", "kronfluence", ("ekfac",)),
    # dattri LiSSA's default recursion (5000 steps per query batch) takes hours on a CPU; the
    # benchmark runs it shorter and says so in the peer's settings
    Peer("dattri", "dattri", "dattri", ("trak", "tracin", "if-cg", "if-lissa", "grad-dot", "grad-cos"),
         bench_options={"if-lissa": {"recursion_depth": 300, "batch_size": 32, "scaling": 50.0},
                        "if-cg": {"max_iter": 10}}),
    Peer("captum", "captum.influence", "captum", ("tracincp",)),
    Peer("cleanlab", "cleanlab", "cleanlab", ("label-quality",), output="suspicion"),
)}
PEER_METHODS: dict[str, list[str]] = {name: list(p.methods) for name, p in PEERS.items()}
# the peer methods that give [n_test, n_train] scores (the others join the mislabel table)
SCORE_METHODS: dict[str, list[str]] = {name: list(p.methods) for name, p in PEERS.items() if p.output == "scores"}


def project_inputs(project: Project, *, device: str = "cpu", proj_dim: int = 512, queries=None, cross_val_probs=None,
                   seed: int = 0, checkpoints=None) -> PeerInputs:
    """A peer's inputs from a project: the given checkpoints (default: each model's final one), all
    training rows, and the chosen test queries (default: all)."""
    cks = checkpoints if checkpoints is not None else project.final_checkpoints()
    ts = project.test_dataset
    q = np.arange(len(ts)) if queries is None else np.asarray(queries, np.int64)
    return PeerInputs(build_model=project.build_model, checkpoints=[project.load_state(c) for c in cks],
                      checkpoint_lrs=[c.lr for c in cks], x_train=whole(project.train_dataset.x), y_train=project.train_dataset.y,
                      x_test=ts.x[torch.as_tensor(q)], y_test=ts.y[torch.as_tensor(q)], num_classes=project.num_classes,
                      proj_dim=proj_dim, device=device, seed=seed, cross_val_probs=cross_val_probs)


def _import_error(peer: str) -> str | None:
    try:
        importlib.import_module(PEERS[peer].import_name)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return one_line(e)


def _adapter(peer: str):
    # imported on use: each adapter imports its optional peer library at module level
    return importlib.import_module(f"engine.evaluate.peers.{peer}")


def _version(peer: str) -> str | None:
    try:
        return importlib.metadata.version(PEERS[peer].dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def available_peers() -> dict[str, str | None]:
    """peer -> None if importable, else the import error as one line."""
    return {peer: _import_error(peer) for peer in PEERS}


def featurize_throughput_traker(inputs: PeerInputs, n_examples: int | None = None) -> float:
    """Examples per second of traker's ``featurize`` (see ``peers.traker``)."""
    return _adapter("traker").featurize_throughput_traker(inputs, n_examples)


def run_peer(peer: str, method: str, inputs: PeerInputs, *, options: dict | None = None) -> PeerResult:
    """Run one peer method on our checkpoints and data.

    ``options`` (an optional extension) overrides a peer's own knobs, e.g. dattri LiSSA's
    ``recursion_depth`` or ``scaling``, or batch sizes; they are echoed in ``settings``.
    Unknown peer/method names raise ``ValueError``; any failure inside the peer is returned
    as ``skipped`` with a one-line reason.
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; known: {sorted(PEERS)}")
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

    def _skip(reason: str, rec: Recorder | None = None) -> PeerResult:
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
    rec = Recorder()
    try:
        with torch.random.fork_rng(devices=None if cuda else []):
            torch.manual_seed(inputs.seed)
            np.random.seed(inputs.seed % 2**32)
            scores = _adapter(peer).run(inputs, method, rec, opts, settings)
    except Exception as e:  # noqa: BLE001 - a peer failure is a result, not a crash
        return _skip(one_line(e), rec)
    finally:
        np.random.set_state(np_state)
    fit_s, score_s, peak, notes = rec.finish()
    settings.update(notes)

    scores = np.asarray(scores, dtype=np.float64)
    expected = (len(inputs.x_train),) if PEERS[peer].output == "suspicion" else (len(inputs.x_test), len(inputs.x_train))
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
