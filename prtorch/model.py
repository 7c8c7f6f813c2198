"""The quadratic neuron ``f(x) = <x, w>^2`` and its closed forms (model.md §2).

With ``x ~ N(0, Q)`` and the summary statistics ``s = w^T Q w``, ``u = w^T Q w*``, ``s* = w*^T Q w*``,
Gaussian fourth moments give the population loss (no prefactor, no label noise)

    L(w) = E[(<x,w>^2 - <x,w*>^2)^2] = 3 s^2 + 3 s*^2 - 4 u^2 - 2 s s*,

its gradient ``grad L = (12 s - 4 s*) Q w - 8 u Q w*`` and the sign-invariant parameter error
``MSE = min(||w - w*||^2, ||w + w*||^2) / d``. The functions below work on the last axis of torch
tensors or numpy arrays alike, so engines and theory share one implementation.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def summary_stats(w, lam, w_star):
    """``(s, u)`` for weights ``w`` of shape ``(..., d)``."""
    lw = lam * w
    return (lw * w).sum(-1), (lw * w_star).sum(-1)


def moment(w, lam, v, k: int = 1):
    """``w^T Q^k v`` (``s^(k)`` for ``v = w``, ``u^(k)`` for ``v = w*``)."""
    return ((lam**k) * w * v).sum(-1)


def population_loss(s, u, s_star):
    """``L = 3 s^2 + 3 s*^2 - 4 u^2 - 2 s s*``."""
    return 3 * s**2 + 3 * s_star**2 - 4 * u**2 - 2 * s * s_star


def population_grad(w, lam, w_star, s_star):
    """``grad L = (12 s - 4 s*) Q w - 8 u Q w*`` (shape of ``w``)."""
    s, u = summary_stats(w, lam, w_star)
    return ((12 * s - 4 * s_star)[..., None] * w - 8 * u[..., None] * w_star) * lam


def param_mse(w, w_star):
    """``(1/d) min(||w - w*||^2, ||w + w*||^2)``, summed as squares (``>= 0``, no cancellation near
    the optimum, unlike ``||w||^2 + ||w*||^2 - 2 |<w, w*>|``). Torch tensors or numpy arrays."""
    d = w.shape[-1]
    minus = ((w - w_star) ** 2).sum(-1)
    plus = ((w + w_star) ** 2).sum(-1)
    if isinstance(minus, torch.Tensor):
        return torch.minimum(minus, plus) / d
    return np.minimum(minus, plus) / d


def stable_loss(w, lam, w_star, s_star):
    """``L`` without cancellation near the optimum: with ``q_pm = (w -+ w*)^T Q (w -+ w*)``,

        L = 2 (s - s*)^2 + q_- q_+        (= 3 s^2 + 3 s*^2 - 4 u^2 - 2 s s*),

    both terms >= 0, so ``L`` stays accurate (and >= 0) down to ``L ~ 1e-30``.
    """
    s = (lam * w * w).sum(-1)
    q_minus = (lam * (w - w_star) ** 2).sum(-1)
    q_plus = (lam * (w + w_star) ** 2).sum(-1)
    return 2 * (s - s_star) ** 2 + q_minus * q_plus


def metrics(w, lam, w_star, s_star) -> dict:
    """Every logged metric of weights ``w`` (``(..., d)``): ``mse, loss, s, u``."""
    s, u = summary_stats(w, lam, w_star)
    return {"mse": param_mse(w, w_star), "loss": stable_loss(w, lam, w_star, s_star), "s": s, "u": u}


class QuadraticNeuron(nn.Module):
    """``R`` independent replicas of ``f(x) = <x, w>^2`` as one ``(R, d)`` parameter.

    ``forward(x)`` takes ``x`` of shape ``(..., R, d)`` (one input per replica, or broadcast) and
    returns ``<x, w_r>^2`` of shape ``(..., R)``. The buffers ``lam`` and ``w_star`` hold the data
    model, so the closed-form loss, gradient and statistics need no samples.
    """

    def __init__(self, w0, lam, w_star):
        super().__init__()
        w0 = torch.as_tensor(w0)
        self.w = nn.Parameter(w0.clone())
        self.register_buffer("lam", torch.as_tensor(lam, dtype=w0.dtype))
        self.register_buffer("w_star", torch.as_tensor(w_star, dtype=w0.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * self.w).sum(-1)) ** 2

    @property
    def s_star(self) -> torch.Tensor:
        return (self.lam * self.w_star**2).sum()

    def stats(self):
        """``(s, u)``, each of shape ``(R,)``."""
        return summary_stats(self.w, self.lam, self.w_star)

    def moments(self, k: int):
        """``(s^(k), u^(k), s*^(k))``."""
        return (moment(self.w, self.lam, self.w, k), moment(self.w, self.lam, self.w_star, k),
                moment(self.w_star, self.lam, self.w_star, k))

    def population_loss(self) -> torch.Tensor:
        s, u = self.stats()
        return population_loss(s, u, self.s_star)

    def population_grad(self) -> torch.Tensor:
        return population_grad(self.w, self.lam, self.w_star, self.s_star)

    def mse(self) -> torch.Tensor:
        return param_mse(self.w, self.w_star)
