"""Adaptive exponential integrator for "linear modes coupled through a few scalars" (model.md §4).

Both the gradient flow and the SGD deterministic equivalent have the form

    dy/dt = M(c(y)) y + b(c(y)),      c(y) = a handful of scalars (s, u),

where, for frozen scalars ``c``, the system decouples per coordinate and ``flow(y, c, h)`` solves it
exactly over a step ``h``. Freezing ``c`` explicitly is unstable near convergence (the coupling is
stiff, model.md §4), so each step solves the scalars *implicitly* at the end of the step:

    c_bar = c(flow(y, c_bar, h))                          (Newton, finite-difference Jacobian)

This is first order and L-stable (the stiff coupled component is damped, not reflected as by the
implicit midpoint rule). Step doubling (one step of ``h`` against two of ``h/2``) estimates the
error, and Richardson extrapolation ``2 y_fine - y_coarse`` makes the accepted step second order
while staying L-stable. Steps grow geometrically once the scalars settle, so a horizon of
``t = 1e5`` takes a few hundred steps whatever the stiffness of the tail modes.
All arrays are numpy float64 with a leading batch axis ``N`` (independent trajectories).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def phi1(z: np.ndarray) -> np.ndarray:
    """``(e^z - 1) / z``, exact at ``z = 0``."""
    small = np.abs(z) < 1e-8
    zs = np.where(small, 1.0, z)
    return np.where(small, 1.0 + z / 2, np.expm1(zs) / zs)


def _implicit_step(y, h, scalars, flow, newton_tol=1e-13, max_iter=20):
    c = scalars(y)  # (N, m) initial guess
    m = c.shape[1]
    for _ in range(max_iter):
        g = c - scalars(flow(y, c, h))
        # finite-difference Jacobian of g, one column per scalar
        J = np.empty(c.shape + (m,))
        for j in range(m):
            eps = 1e-7 * np.maximum(1.0, np.abs(c[:, j]))
            cj = c.copy()
            cj[:, j] += eps
            J[:, :, j] = (cj - scalars(flow(y, cj, h)) - g) / eps[:, None]
        try:
            delta = np.linalg.solve(J, g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            delta = g
        c = c - delta
        if np.all(np.abs(delta) <= newton_tol * np.maximum(1.0, np.abs(c))):
            break
    return flow(y, c, h)


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
    blowup: float = 1e8,
):
    """States at ``times`` (sorted, ``times[0]`` = start) of ``dy/dt`` given by ``scalars``/``flow``.

    error_norm(y_coarse, y_fine) -> (N,) scaled error (accept when <= rtol).
    A trajectory whose scalars leave ``[-blowup, blowup]`` (or stop being finite) is *diverged*:
    its states are NaN from then on and it no longer limits the step size of the others.
    Returns (states array ``(len(times),) + y0.shape``, number of accepted steps).
    """
    y = np.array(y0, dtype=np.float64)
    out = np.empty((len(times),) + y.shape)
    out[0] = y
    alive = np.ones(y.shape[0], dtype=bool)
    t, h, n_steps = float(times[0]), float(h0), 0
    for k in range(1, len(times)):
        t_next = float(times[k])
        while t < t_next * (1 - 1e-14) - 1e-300 and alive.any():
            hh = min(h, t_next - t, h_max)
            with np.errstate(all="ignore"):
                ya = y[alive]
                coarse = _implicit_step(ya, hh, scalars, flow)
                half = _implicit_step(ya, hh / 2, scalars, flow)
                fine = _implicit_step(half, hh / 2, scalars, flow)
                errs = error_norm(coarse, fine)
                new = 2.0 * fine - coarse  # local Richardson extrapolation (order 1 -> 2)
                c = scalars(new)
            dying = ~np.all(np.isfinite(c) & (np.abs(c) < blowup), axis=1)
            if hh <= 1e-9 * max(t, 1.0) and dying.any():
                # a trajectory that blows up within any step, however small, has diverged
                idx = np.flatnonzero(alive)[dying]
                alive[idx] = False
                y[idx] = np.nan
                continue
            errs = np.where(np.isfinite(errs), errs, 1e3 * rtol)
            err = float(np.max(errs)) / rtol if errs.size else 0.0
            if err <= 1.0:
                y[alive] = new
                t += hh
                n_steps += 1
                if dying.any():
                    idx = np.flatnonzero(alive)[dying]
                    alive[idx] = False
                    y[idx] = np.nan
                if n_steps > max_steps:
                    raise RuntimeError("integrator: too many steps")
                grow = 2.0 if err < 1e-4 else min(2.0, 0.9 * err ** (-1 / 2))
                if hh == h:  # only grow from a step that was not clipped by a save time
                    h = hh * grow
            else:
                h = hh * max(0.1, 0.9 * err ** (-1 / 2))
                if h < 1e-12 * max(t, 1.0):
                    raise RuntimeError(f"integrator: step size underflow at t = {t:.6g}")
        out[k] = y
    return out, n_steps
