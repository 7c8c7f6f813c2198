"""Does a full-covariance (Gaussian) closure fix the SGD deterministic equivalent at the escape?

The shipped DE (:mod:`prtorch.theory.sgd_equivalent`) closes the moments in mean field: it carries
``mu_i = E w_i`` and ``P_i = E w_i^2`` and drops every cross-covariance ``Cov(w_i, w_j)``. During the
escape the SGD noise along ``Q w*`` is amplified coherently over all coordinates, and that dropped
covariance is what lets the DE miss the loss there (docs/results.md). This study carries the whole
second moment ``M = E w w^T`` instead (``d^2`` states, so small ``d`` only) and closes the
higher moments by Isserlis' theorem for ``w ~ N(mu, C)``, ``C = M - mu mu^T``:

    E[s w]       = tr(Q M) mu + 2 C Q mu,
    E[s w w^T]   = tr(Q M) M + 2 M Q M - 2 (mu^T Q mu) mu mu^T,
    E[u w]       = M Q w*,

with ``s = w^T Q w``, ``u = w^T Q w*``, ``F(w) = Q[(4 s* - 12 s) w + 8 u w*] = -E_x g``:

    mu' = E F = Q[(4 s* - 12 tr(QM)) mu - 24 C Q mu + 8 u(mu) w*],
    M'  = E[F w^T] + E[w F^T] + eta K,
    E[F w^T] = Q[4 s* M - 12 E[s w w^T] + 8 w* (M Q w*)^T],

and the noise ``K = (1/B) 16 [Q E h + Q (E h_pp M + E h_pv (mu w*^T + w* mu^T) + E h_vv w* w*^T) Q]
+ (1 - 1/B) Q[A^2 M - A C (mu w*^T + w* mu^T) + C^2 w* w*^T] Q`` (the matrix form of the DE's
``K_i``, :mod:`prtorch.theory.gaussian`, moments at the mean ``(s, u)``; no drift correction, which
is ``O(eta)`` at ``B = 1``). Its loss is either ``L(E s, E u)`` ("plug-in", as the DE reports) or
``E L = L(E s, E u) + 3 Var s - 4 Var u`` with ``Var s = 2 tr(QCQC) + 4 mu^T QCQ mu`` and
``Var u = w*^T QCQ w*``.

Setting: the paper's Figure 5 (d = 300, a = 1.5, lr = 1e-3, label noise 0.05), one shared init per
seed, as in scripts/de_study.py. For each seed: the largest relative gap of the mean-field DE and of
the Gaussian closure to the median and to the mean of the SGD loss over all replicas, inside the
escape window ``[T1, 1.5 T1']`` (outside it both are within ~1-2%), and the sampling floor of the
issue's criterion: the largest gap of the median of 8 replicas to the median of all of them.

    python scripts/de_closure_study.py                       # seeds 0-7, 128 replicas (~6 min on 2 cores)
    python scripts/de_closure_study.py --seeds 0 6 --replicas 64

Result (2 cores, 2026-12-04; docs/results.md): the closure halves the gap at seed 0 (12% -> 6%)
but doubles it at seed 6 (5% -> 11%); it tracks the *mean* loss better, the median not uniformly.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.integrate import solve_ivp

from de_study import run_seed  # scripts/ is on sys.path when run as a script
from prtorch.problem import make_instance
from prtorch.theory.gaussian import h_moments


def gaussian_closure(w0, lam, w_star, times, lr, batch_size=1, label_noise=0.0, rtol=1e-7):
    """Full-covariance DE: ``(mu, M)`` by RK45 at ``times``; returns ``mse, loss_plugin, loss_mean, s, u``
    (``s = tr(QM) = E s``, ``u = E u``)."""
    d, f, L, ws = lam.size, 1.0 / batch_size, lam, w_star
    ss = float(L @ ws**2)
    LL = np.outer(L, L)

    def rhs(t, y):
        mu, M = y[:d], y[d:].reshape(d, d)
        s, u, smu = float(L @ np.diag(M)), float(ws @ (L * mu)), float(mu @ (L * mu))
        C = M - np.outer(mu, mu)
        A, Cc = 12 * s - 4 * ss, 8 * u
        dmu = L * (4 * ss * mu - 12 * (s * mu + 2 * C @ (L * mu)) + 8 * u * ws)
        EswwT = s * M + 2 * (M * L) @ M - 2 * smu * np.outer(mu, mu)
        EFw = L[:, None] * (4 * ss * M - 12 * EswwT + 8 * np.outer(ws, M @ (L * ws)))
        Eh, Epp, Epv, Evv = h_moments(s, u, ss, label_noise)
        sym = np.outer(mu, ws) + np.outer(ws, mu)
        K1 = 16 * (np.diag(L * Eh) + LL * (Epp * M + Epv * sym + Evv * np.outer(ws, ws)))
        K2 = LL * (A**2 * M - A * Cc * sym + Cc**2 * np.outer(ws, ws))
        dM = EFw + EFw.T + lr * (f * K1 + (1 - f) * K2)
        return np.concatenate([dmu, dM.ravel()])

    y0 = np.concatenate([w0, np.outer(w0, w0).ravel()])
    sol = solve_ivp(rhs, (0.0, float(times[-1])), y0, t_eval=times, rtol=rtol, atol=1e-12)
    if sol.status != 0:
        raise RuntimeError(sol.message)
    Y = sol.y.T
    mu, M = Y[:, :d], Y[:, d:].reshape(-1, d, d)
    P = np.einsum("kii->ki", M)
    s, u = P @ L, mu @ (L * ws)
    mse = np.minimum((P - 2 * ws * mu + ws**2).sum(1), (P + 2 * ws * mu + ws**2).sum(1)) / d
    plug = 3 * s**2 - 2 * s * ss - 4 * u**2 + 3 * ss**2
    C = M - np.einsum("ki,kj->kij", mu, mu)
    QCQ = L[None, :, None] * C * L[None, None, :]
    var_s = 2 * np.einsum("kij,kji->k", QCQ, C) + 4 * np.einsum("ki,kij,kj->k", mu, QCQ, mu)
    var_u = np.einsum("i,kij,j->k", ws, QCQ, ws)
    return {"mse": mse, "loss_plugin": plug, "loss_mean": plug + 3 * var_s - 4 * var_u, "s": s, "u": u}


def study_seed(seed, replicas, t_end, d=300, a=1.5, lr=1e-3, noise=0.05):
    _, (times, sim, de, gf, win) = run_seed(seed, replicas, t_end, d=d, a=a, lr=lr, noise=noise)
    inst = make_instance(d, a, replicas, seed=seed)
    t0 = time.perf_counter()
    gc = gaussian_closure(np.asarray(inst.w0[0], np.float64), np.asarray(inst.lam, np.float64),
                          np.asarray(inst.w_star, np.float64), times, lr, label_noise=noise)
    secs = time.perf_counter() - t0
    Ls = sim.values["loss"]
    med, mean = np.nanmedian(Ls, 1), np.nanmean(Ls, 1)

    def gap(x, ref):
        return float(np.abs(x / ref - 1)[win].max())

    return {"seed": seed,
            "DE/median": gap(de.values["loss"][:, 0], med),
            "closure/median": gap(gc["loss_plugin"], med),
            "DE/mean": gap(de.values["loss"][:, 0], mean),
            "closure E L/mean": gap(gc["loss_mean"], mean),
            "closure mse/median (all t)": float(np.abs(gc["mse"] / np.nanmedian(sim.values["mse"], 1) - 1).max()),
            "median8/median (all t)": float(np.abs(np.nanmedian(Ls[:, :8], 1) / med - 1).max()),
            "closure s": secs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--replicas", type=int, default=128)
    ap.add_argument("--time", type=float, default=60.0)
    args = ap.parse_args(argv)
    if args.replicas < 8:
        ap.error("--replicas must be >= 8 (the 8-replica median is one of the columns)")
    rows = [study_seed(s, args.replicas, args.time) for s in args.seeds]
    cols = list(rows[0])
    print("loss gaps inside the escape window [T1, 1.5 T1'] unless marked 'all t'")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
