"""Exact gradient flow ``dw/dt = -grad L`` from a given initialisation (model.md §4).

Coordinate-wise ``dw_i/dt = -alpha_i w_i + beta_i`` with ``alpha_i = lambda_i A``,
``beta_i = lambda_i w*_i C``, ``A = 12 s - 4 s*``, ``C = 8 u``. For scalars ``(s, u)`` frozen at
their end-of-step values over a step ``h`` each coordinate solves exactly (``z = -alpha h``):

    w_i(t + h) = e^{z} w_i + beta_i h phi1(z),          phi1(z) = (e^z - 1)/z.

That step is first order, and for stiff modes (``alpha h >> 1``) it misses the lag ``-w'/alpha`` of
the quasi-static value the mode follows. :func:`gf_flow` moves the coefficients linearly in time
from their values at the start scalars to those at the end scalars instead; the response of the
remainder ``R0 (1 - tau/h)``, ``R0 = (alpha_1 - alpha_0) w - (beta_1 - beta_0)``, adds

    h R0 (phi1(z) - phi2(z)),                           phi2(z) = (e^z - 1 - z)/z^2,

which makes the step second order while staying exact for constant scalars (the same scheme as the
SGD deterministic equivalent, :mod:`prtorch.theory.sgd_equivalent`, of which gradient flow is the
``eta -> 0`` mean). :func:`prtorch.theory.integrate.integrate` solves the end scalars implicitly per
step and controls the error in both the Euclidean and the ``Q`` norm (the latter carries the loss),
so the whole trajectory to ``t = 1e5`` takes a few hundred steps at any ``d``.
"""
from __future__ import annotations

import numpy as np

from prtorch.model import metrics
from prtorch.record import Curves
from prtorch.theory.integrate import check_times, integrate, load_kernels, phi1, phi2


def gf_flow(w, c, h, lam, w_star, s_star, c0=None):
    """One step ``h`` from ``w`` (``(N, d)``) with end-of-step scalars ``c = (s, u)`` (``(N, 2)``).

    ``c0 = None`` freezes the coefficients at ``c`` (first order); given the start scalars ``c0`` the
    coefficients move linearly from ``c0`` to ``c`` (second order; module docstring)."""
    A = (12 * c[:, 0] - 4 * s_star)[:, None]
    C = (8 * c[:, 1])[:, None]
    z = -A * lam * h
    p1 = phi1(z)
    beta = C * (w_star * lam)
    out = w * np.exp(z) + (beta * h) * p1
    if c0 is not None:
        dA = (12 * (c[:, 0] - c0[:, 0]))[:, None]
        dC = (8 * (c[:, 1] - c0[:, 1]))[:, None]
        r = (dA * lam) * w - dC * (w_star * lam)
        out += (h * r) * (p1 - phi2(z))
    return out


class GFFlow:
    """``flow(y, c, h)`` (second-order :func:`gf_flow`) and ``scalars(y)`` for the integrator.

    backend: "numba" (the compiled :func:`prtorch.theory.flows_numba.gf_step`, which also returns the
    new scalars), "numpy" (:func:`gf_flow`, the reference) or "auto" (numba when it imports).
    """

    def __init__(self, lam: np.ndarray, w_star: np.ndarray, backend: str = "auto"):
        self.lam, self.w_star = lam, w_star
        self.lw = lam * w_star
        self.s_star = float(self.lw @ w_star)
        self._kernels = load_kernels(backend)
        self.backend = "numba" if self._kernels is not None else "numpy"
        self._last_out, self._last_scal = None, None

    def scalars(self, w: np.ndarray) -> np.ndarray:
        """``(s, u) = (sum lambda w^2, sum lambda w* w)`` per row (``(N, 2)``)."""
        if w is self._last_out:
            return self._last_scal.copy()
        return np.stack([((self.lam * w) * w).sum(-1), w @ self.lw], axis=1)

    def __call__(self, w: np.ndarray, c: np.ndarray, h: float) -> np.ndarray:
        c0 = self.scalars(w)
        if self._kernels is None:
            return gf_flow(w, c, h, self.lam, self.w_star, self.s_star, c0=c0)
        A1 = 12.0 * c[:, 0] - 4.0 * self.s_star
        C1 = 8.0 * c[:, 1]
        dA = 12.0 * (c[:, 0] - c0[:, 0])
        dC = 8.0 * (c[:, 1] - c0[:, 1])
        out, self._last_scal = self._kernels.gf_step(np.ascontiguousarray(w), A1, C1, dA, dC,
                                                     self.lam, self.lw, h)
        self._last_out = out
        return out


def gradient_flow(w0, lam, w_star, times, rtol: float = 1e-5, atol: float = 1e-6,
                  backend: str = "auto"):
    """GF states ``(len(times), N, d)`` from ``w0`` (``(d,)`` or ``(N, d)``) at ``times`` (from 0).

    rtol bounds the local error of each step relative to the distance to the (signed) target, in
    the Euclidean and in the ``Q`` norm (atol: floor, relative to ``||w*||``). backend: see
    :class:`GFFlow`. Returns (states, number of integrator steps).
    """
    lam = np.ascontiguousarray(lam, dtype=np.float64)
    w_star = np.ascontiguousarray(w_star, dtype=np.float64)
    w0 = np.atleast_2d(np.asarray(w0, dtype=np.float64))
    flow = GFFlow(lam, w_star, backend)
    a_w = atol * float(np.linalg.norm(w_star))
    a_q = atol * float(np.sqrt(lam @ w_star**2))

    def error_norm(a, b):
        # relative to the distance to the (signed) target, so late-time MSE and loss stay accurate
        sign = np.where(b @ w_star < 0, -1.0, 1.0)[:, None]
        dist = b - sign * w_star
        diff = a - b
        e_w = np.linalg.norm(diff, axis=-1) / (np.linalg.norm(dist, axis=-1) + a_w)
        # the same in the Q norm, which carries the loss near the target (L ~ 4 s* |w - w*|_Q^2)
        e_q = np.sqrt((diff * diff) @ lam) / (np.sqrt((dist * dist) @ lam) + a_q)
        return np.maximum(e_w, e_q)

    times = check_times(times)
    return integrate(w0, times, flow.scalars, flow, error_norm,
                     rtol=rtol, h0=min(1e-3, float(times[1]) if len(times) > 1 else 1e-3), order=2)


def gf_curves(w0, lam, w_star, times, rtol: float = 1e-5) -> Curves:
    """GF metrics ``mse, loss, s, u`` at ``times`` as :class:`Curves` (one curve per init)."""
    states, _ = gradient_flow(w0, lam, w_star, times, rtol)
    s_star = float(np.sum(lam * w_star**2))
    vals = metrics(states, lam, w_star, s_star)
    T, N = vals["mse"].shape
    return Curves("gf", np.repeat(np.asarray(times, dtype=float)[:, None], N, 1), vals,
                  {"init": np.arange(N)})
