"""Adaptive exponential integrator for "linear modes coupled through a few scalars" (model.md §4).

Both the gradient flow and the SGD deterministic equivalent have the form

    dy/dt = M(c(y)) y + b(c(y)),      c(y) = a handful of scalars (s, u, ...),

where, for given scalars ``c``, the system decouples per coordinate and ``flow(y, c, h)`` solves it
exactly over a step ``h`` (exponential integrator). Freezing ``c`` explicitly is unstable near
convergence (the coupling is stiff, model.md §4), so each step solves the scalars *implicitly* at
the end of the step,

    c = scalars(flow(y, c, h))                 (chord-Newton, finite-difference Jacobian),

which keeps the scheme L-stable (the stiff coupled component is damped, not reflected as by the
implicit midpoint rule). A flow of order ``p`` (1: coefficients frozen at ``c``; 2: coefficients
moving linearly from the start scalars to ``c``, as in the SGD equivalent) is made one order higher
by step doubling and local Richardson extrapolation: one step of ``h`` (``coarse``) against two of
``h/2`` (``fine``) gives the error estimate ``|fine - coarse| / (2^p - 1)`` and the accepted state
``fine + (fine - coarse) / (2^p - 1)``. The step changes by ``0.9 err^(-1/(p+1))`` (at most doubling),
so steps grow geometrically once the scalars settle and ``t = 1e5`` takes a few hundred steps
whatever the stiffness of the tail modes.

Few flow evaluations per step: the Newton solve starts from scalars extrapolated from the last two
accepted steps, reuses its finite-difference Jacobian as a chord (refreshed only when convergence is
slower than 1/4 per iteration), and the second half-step starts from the coarse step's end scalars
with the first half-step's Jacobian.
All arrays are numpy float64 with a leading batch axis ``N`` (independent trajectories).
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np


def phi1(z: np.ndarray) -> np.ndarray:
    """``(e^z - 1) / z``, exact at ``z = 0``."""
    small = np.abs(z) < 1e-8
    zs = np.where(small, 1.0, z)
    return np.where(small, 1.0 + z / 2, np.expm1(zs) / zs)


def load_kernels(backend: str):
    """The compiled flows (:mod:`prtorch.theory.flows_numba`) for ``backend`` "numba", or "auto" when
    numba imports; ``None`` (the numpy reference) for "numpy" or "auto" without numba."""
    if backend not in ("auto", "numpy", "numba"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'numpy' or 'numba'")
    if backend == "numpy":
        return None
    try:
        return importlib.import_module("prtorch.theory.flows_numba")
    except ImportError:
        if backend == "numba":
            raise ImportError("backend='numba' needs numba (pip install numba)") from None
        return None


_PHI2_SERIES = [1.0 / __import__("math").factorial(k + 2) for k in range(11)]


def phi2(z: np.ndarray) -> np.ndarray:
    """``(e^z - 1 - z) / z^2 = (phi1(z) - 1) / z``: a power series below ``|z| = 0.05`` (where the
    difference would lose digits), the difference beyond."""
    z = np.asarray(z, dtype=np.float64)
    small = np.abs(z) < 0.05
    zs = np.where(small, 1.0, z)
    series = np.zeros_like(z)
    for c in reversed(_PHI2_SERIES):
        series = series * z + c
    return np.where(small, series, (phi1(zs) - 1.0) / zs)


def _linear_solve(J: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``J^{-1} g`` per row (``J`` is ``(N, m, m)``); singular rows give non-finite values."""
    if J.shape[1] == 2:  # closed form: never raises, and a bad row cannot spoil the others
        with np.errstate(divide="ignore", invalid="ignore"):
            det = J[:, 0, 0] * J[:, 1, 1] - J[:, 0, 1] * J[:, 1, 0]
            return np.stack([J[:, 1, 1] * g[:, 0] - J[:, 0, 1] * g[:, 1],
                             J[:, 0, 0] * g[:, 1] - J[:, 1, 0] * g[:, 0]], axis=1) / det[:, None]
    with np.errstate(all="ignore"):
        try:
            return np.linalg.solve(J, g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            pass
        out = np.full(g.shape, np.nan)
        for r in range(g.shape[0]):
            try:
                out[r] = np.linalg.solve(J[r], g[r])
            except np.linalg.LinAlgError:
                pass
        return out


def solve_scalars(y, h, c, scalars, flow, J=None, tol=1e-13, max_iter=20):
    """Chord/Newton solve of ``c = scalars(flow(y, c, h))`` from the guess ``c`` (``(N, m)``).

    The finite-difference Jacobian of ``g(c) = c - scalars(flow(y, c, h))`` is formed at the first
    iterate (unless ``J`` is given) and again only when convergence is slower than a factor 1/4 per
    iteration. Returns ``(flow(y, c, h), c, J, converged)`` with ``converged`` per row; the flow at
    the last iterate is returned as is once every row's next correction is below ``tol``
    (relative), which saves a final evaluation. Rows that turn non-finite, or have not converged
    after ``max_iter`` iterations, report failure.
    """
    m = c.shape[1]
    prev = np.inf
    with np.errstate(over="ignore", invalid="ignore"):
        for it in range(max_iter):
            yk = flow(y, c, h)
            g = c - scalars(yk)
            if J is None:
                J = np.empty(c.shape + (m,))
                for j in range(m):
                    eps = 1e-7 * np.maximum(1.0, np.abs(c[:, j]))
                    cj = c.copy()
                    cj[:, j] += eps
                    J[:, :, j] = (cj - scalars(flow(y, cj, h)) - g) / eps[:, None]
            delta = _linear_solve(J, g)
            size_rows = np.max(np.abs(delta) / np.maximum(1.0, np.abs(c)), axis=1)
            bad = ~np.isfinite(size_rows)
            size = float(np.max(size_rows[~bad])) if (~bad).any() else 0.0
            if size <= tol:
                return yk, c, J, ~bad
            if size > 0.25 * prev:
                J = None  # slow chord: refresh the Jacobian at the next iterate
            prev = size
            c = c - np.where(bad[:, None], 0.0, delta)
        # not converged: the rows that did converge are fine (their c no longer moves)
        return yk, c, J, size_rows <= tol


def check_times(times, start_at_zero: bool = True) -> np.ndarray:
    """``times`` as a float64 vector, or a one-line ValueError: 1-D, finite, strictly increasing and
    (``start_at_zero``) starting at ``t = 0``, the time of the initial state."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("times must be finite")
    if start_at_zero and t[0] != 0.0:
        raise ValueError(f"times must start at 0 (the initial state), got times[0] = {t[0]:g}")
    if np.any(np.diff(t) <= 0):
        raise ValueError("times must be strictly increasing")
    return t


def integrate(
    y0: np.ndarray,
    times: np.ndarray,
    scalars: Callable,
    flow: Callable,
    error_norm: Callable,
    rtol: float = 1e-6,
    h0: float = 1e-3,
    h_max: float = np.inf,
    max_steps: int = 1_000_000,
    order: int = 1,
    diverged_s: float = 1e8,
):
    """States at ``times`` (sorted, ``times[0]`` = start) of ``dy/dt`` given by ``scalars``/``flow``.

    scalars(y) -> ``(N, m)``; flow(y, c, h) -> the state after ``h`` with end scalars ``c``, a method
    of the given ``order``; error_norm(y_coarse, y_fine) -> ``(N,)`` scaled differences (a step is
    accepted when the largest, divided by ``2^order - 1``, is <= rtol).

    Divergence: the equations may blow up in finite time (the SGD equivalent past its stability
    edge: its noise term grows like ``s^3``). A row whose first scalar exceeds ``diverged_s`` (or
    stops being finite), or that makes the step collapse (below ``1e-10 max(t, 1)``, failing its
    implicit solve or error test), is marked diverged: its state is set to 0 (a fixed point of both
    flows) so that it no longer limits the step size, and its outputs are NaN from then on. Any
    other step collapse raises ``RuntimeError``.

    Returns (states array ``(len(times),) + y0.shape``, number of accepted steps).
    """
    times = check_times(times, start_at_zero=False)
    y = np.array(y0, dtype=np.float64)
    N = y.shape[0]
    out = np.empty((len(times),) + y.shape)
    out[0] = y
    alive = np.ones(N, dtype=bool)
    rich = 2.0**order - 1.0
    expo = -1.0 / (order + 1)
    t, h, n_steps = float(times[0]), float(h0), 0
    c_now = scalars(y)
    c_prev, h_prev = None, None

    def kill(rows):
        nonlocal y, c_now, c_prev
        alive[rows] = False
        y = y.copy()
        y[rows] = 0.0
        c_now = scalars(y)
        c_prev = None

    for k in range(1, len(times)):
        t_next = float(times[k])
        while t < t_next * (1 - 1e-14) - 1e-300:
            hh = min(h, t_next - t, h_max)
            slope = None if c_prev is None else (c_now - c_prev) / h_prev
            guess = c_now if slope is None else c_now + slope * hh
            coarse, cc, _, ok1 = solve_scalars(y, hh, guess, scalars, flow)
            g_half = 0.5 * (c_now + cc)
            if slope is not None:  # quadratic through (t - h_prev, t, t + hh) at t + hh/2
                curv = ((cc - c_now) / hh - slope) / (hh + h_prev)
                g_half = c_now + slope * (hh / 2) + curv * (hh / 2) * (hh / 2 + h_prev)
            half, _, Jh, ok2 = solve_scalars(y, hh / 2, g_half, scalars, flow)
            fine, _, _, ok3 = solve_scalars(half, hh / 2, cc, scalars, flow, J=Jh)
            with np.errstate(over="ignore", invalid="ignore"):
                err_rows = np.asarray(error_norm(coarse, fine), dtype=np.float64) / rich / rtol
            err_rows = np.where(np.isfinite(err_rows) & ok1 & ok2 & ok3, err_rows, 1e3)
            err = float(np.max(err_rows))
            if err <= 1.0:
                y = fine + (fine - coarse) / rich
                t += hh
                n_steps += 1
                if n_steps > max_steps:
                    raise RuntimeError("integrator: too many steps")
                c_prev, c_now, h_prev = c_now, scalars(y), hh
                blown = alive & ~(np.abs(c_now[:, 0]) < diverged_s)
                if blown.any():
                    kill(blown)
                grow = 2.0 if err < 1e-6 else min(2.0, 0.9 * err**expo)
                if hh == h:  # only grow from a step that was not clipped by a save time
                    h = hh * grow
            else:
                h = hh * max(0.1, 0.9 * err**expo)
                if h < 1e-10 * max(t, 1.0):
                    blown = alive & (err_rows > 1.0)
                    if not blown.any():
                        raise RuntimeError(f"integrator: step size underflow at t = {t:.6g}")
                    kill(blown)
                    h = h_prev if h_prev else h0
        out[k] = y
        out[k][~alive] = np.nan
    return out, n_steps
