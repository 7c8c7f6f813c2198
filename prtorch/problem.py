"""Problem instances: power-law spectrum, target, initialisation (model.md §1).

An :class:`Instance` is everything that fixes "the same problem" across engines and theory:
the spectrum ``lam`` (``lambda_i = i^-a / H_{d,a}``, so ``tr Q = 1``), the target ``w_star`` and the
initial weights ``w0`` of every replica. It is built on the CPU in float64 from ``seed`` alone, so
the same seed gives the same instance on every device and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TARGETS = ("sigma", "sqrt_d")
INITS = ("sphere", "gaussian")


def power_law_spectrum(d: int, a: float) -> np.ndarray:
    """``lambda_i = i^(-a) / H_{d,a}``, ``i = 1..d``; ``a = 0`` is isotropic (``1/d``)."""
    i = np.arange(1, d + 1, dtype=np.float64)
    lam = i ** (-float(a))
    return lam / lam.sum()


@dataclass(frozen=True)
class Instance:
    """One problem instance (float64 numpy arrays).

    lam: (d,) spectrum of ``Q``; w_star: (d,) target; w0: (R, d) initial weights per replica.
    """

    lam: np.ndarray
    w_star: np.ndarray
    w0: np.ndarray
    a: float = float("nan")

    @property
    def d(self) -> int:
        return self.lam.shape[0]

    @property
    def replicas(self) -> int:
        return self.w0.shape[0]

    @property
    def s_star(self) -> float:
        return float(np.sum(self.lam * self.w_star**2))

    def save(self, path) -> None:
        from prtorch.record import atomic_savez

        atomic_savez(path, lam=self.lam, w_star=self.w_star, w0=self.w0, a=np.float64(self.a))

    @classmethod
    def load(cls, path) -> "Instance":
        z = np.load(path)
        return cls(z["lam"], z["w_star"], z["w0"], float(z["a"]) if "a" in z else float("nan"))


def make_target(lam: np.ndarray, kind: str, gen: torch.Generator) -> np.ndarray:
    """``w* = g / ||Q^(1/2) g||`` ("sigma", so ``s* = 1``) or ``w* = sqrt(d) g / ||g||`` ("sqrt_d")."""
    d = lam.shape[0]
    g = torch.randn(d, generator=gen, dtype=torch.float64).numpy()
    if kind == "sigma":
        return g / np.sqrt(np.sum(lam * g**2))
    if kind == "sqrt_d":
        return np.sqrt(d) * g / np.linalg.norm(g)
    raise ValueError(f"data.target={kind!r}: expected one of {TARGETS}")


def make_init(d: int, n: int, kind: str, norm: float, gen: torch.Generator) -> np.ndarray:
    """``n`` initial vectors: uniform on the unit sphere ("sphere") or ``N(0, I/d)`` ("gaussian"),
    times ``norm``."""
    g = torch.randn(n, d, generator=gen, dtype=torch.float64).numpy()
    if kind == "sphere":
        w = g / np.linalg.norm(g, axis=1, keepdims=True)
    elif kind == "gaussian":
        w = g / np.sqrt(d)
    else:
        raise ValueError(f"init.kind={kind!r}: expected one of {INITS}")
    return norm * w


def make_instance(
    d: int,
    a: float,
    replicas: int,
    seed: int = 0,
    target: str = "sigma",
    init: str = "sphere",
    init_norm: float = 1.0,
    per_replica_init: bool = False,
) -> Instance:
    """Build the instance fixed by ``seed``: ``w*`` then ``w0`` (shared by all replicas unless
    ``per_replica_init``), both drawn from one CPU float64 generator. The sign of ``w*`` (the
    problem is invariant under ``w* -> -w*``) is chosen so that ``u(0) >= 0`` for replica 0."""
    gen = torch.Generator().manual_seed(int(seed))
    lam = power_law_spectrum(d, a)
    w_star = make_target(lam, target, gen)
    w0 = make_init(d, replicas if per_replica_init else 1, init, init_norm, gen)
    if not per_replica_init:
        w0 = np.repeat(w0, replicas, axis=0)
    if np.sum(lam * w0[0] * w_star) < 0:  # w* and -w* are the same target: pick u(0) >= 0
        w_star = -w_star
    return Instance(lam, w_star, w0, float(a))
