"""Run SGD or GD on an :class:`~prtorch.problem.Instance` and record metrics at chosen steps.

This is the training loop, top to bottom: draw a chunk of inputs, let the engine step through it,
record at the save steps, detect divergence, checkpoint. It knows nothing of Hydra or W&B.

Replicas: ``W`` is ``(S, L, d)`` - ``S`` data streams (``replicas``) times ``L`` learning rates that
share each stream's samples. Flattened, replica ``r = s * L + l``. Every record point holds the
metrics of every replica; a replica whose weights stop being finite (or blow up past
``DIVERGED_S``) is *diverged*: its weights are set to 0 (a fixed point of SGD and GD, so it stays
frozen at no cost), its later records are NaN, and ``SimResult.diverged`` says when it happened.

Random numbers are drawn in chunks whose boundaries fall on the save steps, so the generator state
at every save step is the same whatever the chunk size, and a run resumed from a checkpoint at a
save step continues bit for bit (same device).
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from prtorch import engines
from prtorch.model import metrics
from prtorch.problem import Instance
from prtorch.record import METRICS, Curves

DIVERGED_S = 1e8
CHUNK_ELEMENTS = 1 << 21  # random normals per chunk (8 MiB in float32)


def data_seed(seed: int) -> int:
    """Seed of the data stream, derived from (but independent of) the instance seed."""
    return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1)[0])


@dataclass
class SimState:
    """Everything needed to continue a run: weights, step, generator state, records so far."""

    W: torch.Tensor                      # (S, L, d)
    step: int
    rng_state: Optional[torch.Tensor]
    records: dict                        # metric -> list of (R,) arrays, plus "step"
    diverged_step: np.ndarray            # (R,) step at which each replica diverged, -1 if never

    def to_dict(self) -> dict:
        return {"W": self.W.cpu(), "step": self.step, "rng_state": self.rng_state,
                "records": {k: np.asarray(v) for k, v in self.records.items()},
                "diverged_step": self.diverged_step}

    @classmethod
    def from_dict(cls, d: dict, device, dtype) -> "SimState":
        rec = {k: list(np.asarray(v)) for k, v in d["records"].items()}
        return cls(d["W"].to(device=device, dtype=dtype), int(d["step"]), d["rng_state"], rec,
                   np.asarray(d["diverged_step"]))


@dataclass
class SimResult:
    curves: Curves
    diverged: list                       # [{replica, lr, step, time}]
    engine: str
    wall_time: float
    steps_per_second: float
    extra: dict = field(default_factory=dict)


def state_curves(state: SimState, lrs, model: str) -> Curves:
    """The records held in ``state`` as :class:`Curves` (replica ``r = s * L + l``)."""
    lrs = np.atleast_1d(np.asarray(lrs, dtype=np.float64))
    R = state.diverged_step.shape[0]
    lr_col = np.tile(lrs, R // len(lrs))
    if not state.records["step"]:
        empty = np.zeros((0, R))
        return Curves(model, empty, {k: empty for k in METRICS}, {"replica": np.arange(R), "lr": lr_col})
    steps = np.asarray(state.records["step"])[:, 0].astype(np.int64)
    return Curves(model, steps[:, None] * lr_col[None, :],
                  {k: np.asarray(state.records[k]) for k in METRICS},
                  {"replica": np.arange(R), "lr": lr_col})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine (use device=cpu or auto)")
    return dev


def simulate(
    instance: Instance,
    lr,
    n_steps: int,
    record_steps: np.ndarray,
    algorithm: str = "sgd",
    batch_size: int = 1,
    label_noise: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    engine: str = "auto",
    state: Optional[SimState] = None,
    on_record: Optional[Callable[[SimState], None]] = None,
    on_chunk: Optional[Callable[[SimState], None]] = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> SimResult:
    """Simulate ``n_steps`` of ``algorithm`` and record metrics at ``record_steps``.

    lr: float or sequence (``L`` learning rates); ``instance.w0`` has one row per data stream
    (``S = instance.replicas``). ``on_record(state)`` is called after every record point (used
    for logging), ``on_chunk(state)`` after every chunk of steps (progress, checkpoints: the
    generator state is exact there; it may raise to stop the run). Returns :class:`SimResult` with ``Curves`` of ``R = S * L``.
    """
    dev = resolve_device(device)
    eng_name = engines.resolve(engine, dev.type)
    eng = engines.load(eng_name)
    lrs = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    S, L, d = instance.replicas, len(lrs), instance.d
    R = S * L
    kw = dict(device=dev, dtype=dtype)
    lam = torch.as_tensor(instance.lam, **kw)
    sqrt_lam = lam.sqrt()
    w_star = torch.as_tensor(instance.w_star, **kw)
    s_star = float(instance.s_star)
    lr_t = torch.as_tensor(lrs, **kw)
    lam64 = torch.as_tensor(instance.lam, device=dev, dtype=torch.float64)  # metrics in float64
    w_star64 = torch.as_tensor(instance.w_star, device=dev, dtype=torch.float64)
    record_steps = np.asarray(record_steps, dtype=np.int64)

    gen = torch.Generator(device=dev)
    gen.manual_seed(data_seed(seed))
    if state is None:
        W0 = torch.as_tensor(instance.w0, **kw)
        state = SimState(W0[:, None, :].repeat(1, L, 1).contiguous(), 0, None,
                         {k: [] for k in ("step", *METRICS)}, np.full(R, -1, dtype=np.int64))
    elif state.rng_state is not None:
        gen.set_state(state.rng_state)
    W = state.W

    def record():
        Wf = W.reshape(R, d)
        s = (lam * Wf * Wf).sum(-1)
        bad = ~torch.isfinite(Wf).all(-1) | ~(s < DIVERGED_S)
        if bool(bad.any()):
            for r in torch.nonzero(bad).flatten().tolist():
                if state.diverged_step[r] < 0:
                    state.diverged_step[r] = state.step
            Wf[bad] = 0.0
        m = metrics(Wf.double(), lam64, w_star64, s_star)
        dead = torch.as_tensor(state.diverged_step >= 0, device=dev)
        state.records["step"].append(np.full(R, state.step))
        for k in METRICS:
            state.records[k].append(torch.where(dead, torch.nan, m[k]).cpu().numpy())
        state.rng_state = gen.get_state()
        if on_record is not None:
            on_record(state)

    per_step = S * batch_size * d if algorithm == "sgd" else 1
    chunk = max(1, min(4096, chunk_elements // max(per_step, 1)))
    t0 = _time.perf_counter()
    start_step = state.step
    last = int(state.records["step"][-1][0]) if state.records["step"] else -1
    # a checkpoint can fall on a record step before its record: record it then
    targets = [int(k) for k in record_steps if k > state.step or (k == state.step and k > last)]
    for target in targets:
        while state.step < target:
            k = min(chunk, target - state.step)
            if algorithm == "sgd":
                z = torch.randn((k, S, batch_size, d), generator=gen, **kw)
                xi = torch.randn((k, S, batch_size), generator=gen, **kw) if label_noise > 0 else None
                eng.sgd_steps(W, z, xi, lr_t, sqrt_lam, w_star, float(label_noise))
            elif algorithm == "gd":
                eng.gd_steps(W, k, lr_t, lam, w_star, s_star)
            else:
                raise ValueError(f"optim.algorithm={algorithm!r}: expected 'sgd' or 'gd'")
            state.step += k
            if on_chunk is not None:
                state.rng_state = gen.get_state()
                on_chunk(state)
        record()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = _time.perf_counter() - t0
    done = state.step - start_step

    curves = state_curves(state, lrs, algorithm)
    lr_col = curves.columns["lr"]
    diverged = [{"replica": int(r), "lr": float(lr_col[r]), "step": int(state.diverged_step[r]),
                 "time": float(state.diverged_step[r] * lr_col[r])}
                for r in np.flatnonzero(state.diverged_step >= 0)]
    return SimResult(curves, diverged, eng_name, wall, done / wall if wall > 0 else float("nan"),
                     {"state": state})
