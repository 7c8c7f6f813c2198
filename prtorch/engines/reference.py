"""The reference engine: the textbook per-step loop, the ground truth for every other engine.

State layout: ``W`` has shape ``(S, L, d)``: ``S`` independent data streams (replicas) times ``L``
learning rates sharing each stream's samples (common random numbers). One online-SGD step with batch
``B`` on inputs ``x = sqrt(lambda) * z`` and labels ``y = <x, w*>^2 + sigma * xi`` is

    W <- W - lr * (4 / B) * sum_b (<x_b, w>^2 - y_b) <x_b, w> x_b.

Population GD uses the closed-form gradient (model.md §2).
"""
from __future__ import annotations

import torch

from prtorch.model import population_grad


def sgd_steps(W, z, xi, lr, sqrt_lam, w_star, label_noise: float):
    """Advance ``W`` (``(S, L, d)``, in place) over a chunk of ``K`` steps.

    z: (K, S, B, d) standard normals; xi: (K, S, B) standard normals (label noise) or None;
    lr: (L,) learning rates.
    """
    K, S, B, d = z.shape
    step = (4.0 / B) * lr[None, :, None]  # (1, L, 1), broadcasts against (S, L, d)
    for k in range(K):
        x = sqrt_lam * z[k]                          # (S, B, d)
        y = (x @ w_star) ** 2                        # (S, B)
        if xi is not None:
            y = y + label_noise * xi[k]
        p = torch.einsum("sbd,sld->slb", x, W)       # (S, L, B)
        r = p * p - y[:, None, :]
        W -= step * torch.einsum("slb,sbd->sld", r * p, x)
    return W


def gd_steps(W, n: int, lr, lam, w_star, s_star):
    """``n`` steps of population GD ``W <- W - lr * grad L(W)`` on ``W`` of shape ``(S, L, d)``."""
    eta = lr[None, :, None]
    for _ in range(n):
        W -= eta * population_grad(W, lam, w_star, s_star)
    return W
