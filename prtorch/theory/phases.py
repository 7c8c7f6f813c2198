"""The paper's phase predictions, made concrete and computable (model.md §6).

Conventions. ``lam`` is the spectrum of ``Q`` (``(d,)``), ``w_star`` the target, ``w0`` one initial
vector (``(d,)``); ``s* = w*^T Q w*`` (``1`` for the "sigma" target, but every formula below keeps
``s*`` general). Gradient flow (GF) is ``dw_i/dt = lambda_i [ (4 s* - 12 s) w_i + 8 u w*_i ]``.
All functions are numpy/scipy, float64.

**Phase I (escape).** While ``s`` is small the term ``12 s`` is dropped and GF becomes *linear*,
``dw/dt = M w`` with the symmetric matrix ``M = 4 s* Q + 8 v v^T``, ``v = Q w*`` (so ``u = v^T w``).
Equivalently ``u`` solves the Volterra equation ``u(t) = a0(t) + 8 int_0^t K(t - tau) u(tau) dtau``,
``a0(t) = sum_i lambda_i w_i(0) w*_i e^{mu_i t}``, ``K(t) = sum_i lambda_i^2 w*_i^2 e^{mu_i t}``,
``mu_i = 4 s* lambda_i``. Its Laplace transform is ``U(p) = a0hat(p) / D(p)`` with

    a0hat(p) = sum_i lambda_i w_i(0) w*_i / (p - mu_i),   D(p) = 1 - 8 sum_i w*_i^2 lambda_i^2 / (p - mu_i).

``D`` is increasing between consecutive poles, so it has exactly one root in each gap between
distinct poles (carrying weight) and one root ``rho > mu_max = 4 s* lambda_1`` - these are the
eigenvalues of ``M``. ``U`` is a proper rational function with simple real poles, so the exact
solution is the residue sum ``u(t) = sum_k a0hat(p_k) / D'(p_k) e^{p_k t}`` (:func:`volterra_u`),
dominated by ``c e^{rho t}``, ``c = a0hat(rho) / D'(rho)`` (:func:`residue_prefactor`).
The sum of all residues is ``u(0)``, so ``c = u(0)`` only when one root carries everything (the
isotropic case); in general ``T1(delta) = log(delta/|c|)/rho`` (:func:`escape_time`) differs from
the paper's ``log(delta/|u(0)|)/rho`` by ``log(|u(0)|/|c|)/rho = O(1)``, which does not change the
``Theta(log d)`` scaling (``|u(0)| ~ d^{-1/2}``).

**Phase II.** ``T1'`` (``s`` crosses ``1/3`` for good) is measured in :mod:`prtorch.theory.measure`;
here: the tail mass ``T(lambda)`` and its exponent ``1 - 1/a``; the quasi-static law for ``1 - u``
(:func:`one_minus_u_quasistatic`: the head re-equilibrates to the unlearned tail, so
``1 - u = sum_i lambda_i w*_i^2 (f_i/3 + f_i^2/2)`` with ``f_i = e^{-8 s* lambda_i (t - T1')}``; it
tracks GF to a few % from ``t ~ 3`` on); and an explicit upper bound on ``T2(eps)``
(:func:`t2_bound`), whose closed "head + tail" form has the corollary's shape.

**Phase III.** The paper's linearisation ``e_i(T2 + tau) = e_i(T2) e^{-8 s* lambda_i tau}`` with the
predicted MSE, loss, ``s`` and ``u`` (:func:`phase3_curves`; MSE within 1% of GF from ``u = 0.9``);
the uniform proxy ``S_d`` and its three regimes (plus a sharper late law, :func:`uniform_S_late`).
The loss needs no extra linearisation: with ``g = u - s*`` and ``q = sum lambda_i e_i^2``,
``L = 4 s* q + 8 g^2 + 12 g q + 3 q^2`` exactly (:func:`phase3_loss`).

**Exponents** (reported as positive numbers, the law stated next to each):
``1 - MSE(T2+tau)/MSE(T2) ~ tau^{1/a}``; ``L ~ tau^{-(1-1/a)}``; ``1 - u ~ t^{-(1-1/a)}`` (our
quasi-static law) against the paper's bound ``t^{-(a-1)/(2a)}`` and its appendix's ``t^{-1/a}``.
On GF (``d`` up to ``10^4``, 3 seeds, windows of :mod:`~prtorch.theory.measure`) the fitted decay
exponent of ``1 - u`` is 0.39-0.46 (``a = 1.5``, still drifting down toward 1/3 with ``d``),
0.52-0.56 (``a = 2``) and 0.74-0.78 (``a = 4``): the ``1 - 1/a`` law, not ``1/a`` (the two agree only
at ``a = 2``), and twice the paper's bound exponent (a valid but loose bound).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

__all__ = [
    "s_star_of", "secular_poles", "secular_D", "secular_D_prime", "a0hat", "secular_roots",
    "growth_rate", "residue_prefactor", "phase1_dominant_u", "escape_time", "volterra_u",
    "volterra_kernels", "Phase1Isotropic", "isotropic_phase1", "phase1_linear_state",
    "predicted_t1_prime", "tail_mass", "tail_mass_curve", "fit_tail_mass_exponent",
    "tail_mass_asymptotic", "one_minus_u_quasistatic", "loss_quasistatic", "predicted_t2", "t2_bound",
    "aligned_error", "phase3_weights", "phase3_S", "uniform_S", "uniform_S_early",
    "uniform_S_middle", "uniform_S_late_bound", "uniform_S_late", "phase3_state", "phase3_curves",
    "phase3_mse", "phase3_loss", "phase3_loss_asymptotic", "local_slope", "mse_drop_exponent",
    "loss_tail_exponent", "one_minus_u_exponents", "tail_mass_exponent", "infer_a", "gd_stability_edge",
]


# ----------------------------------------------------------------------------------------------
# helpers

def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def s_star_of(lam, w_star) -> float:
    """``s* = sum_i lambda_i w*_i^2``."""
    return float(np.sum(_f64(lam) * _f64(w_star) ** 2))


def infer_a(lam) -> float:
    """The power-law exponent ``a`` of a spectrum ``lambda_i ~ i^{-a}`` (least squares in log-log
    over all ``i``; exact for :func:`prtorch.problem.power_law_spectrum`, ``0`` if isotropic)."""
    lam = _f64(lam)
    if lam.size < 2:
        return float("nan")
    i = np.arange(1, lam.size + 1, dtype=np.float64)
    slope = np.polyfit(np.log(i), np.log(lam), 1)[0]
    return round(float(-slope), 10) if abs(slope) > 1e-12 else 0.0  # rounded: exact a for power laws


# ----------------------------------------------------------------------------------------------
# Phase I: the secular equation

def secular_poles(lam, w_star, w0=None, s_star: float | None = None):
    """Distinct poles of ``D`` with their weights.

    Returns ``(m, C, A)`` sorted ascending: ``m_j`` the distinct values of ``mu_i = 4 s* lambda_i``
    that carry weight, ``C_j = 8 sum_{i: mu_i = m_j} lambda_i^2 w*_i^2`` (``> 0``) and
    ``A_j = sum_{i: mu_i = m_j} lambda_i w_i(0) w*_i`` (zeros if ``w0`` is None). Equal eigenvalues
    (e.g. the isotropic case) are merged; poles with ``C_j = 0`` cancel out of ``U = a0hat/D``.
    """
    lam = _f64(lam)
    w_star = _f64(w_star)
    ss = s_star_of(lam, w_star) if s_star is None else float(s_star)
    mu = 4.0 * ss * lam
    c = 8.0 * lam**2 * w_star**2
    av = lam * w_star * (_f64(w0) if w0 is not None else 0.0)
    m, inv = np.unique(mu, return_inverse=True)
    C = np.bincount(inv, weights=c, minlength=m.size)
    A = np.bincount(inv, weights=np.broadcast_to(av, mu.shape), minlength=m.size)
    keep = C > 0
    return m[keep], C[keep], A[keep]


def secular_D(p, lam, w_star, s_star: float | None = None):
    """``D(p) = 1 - 8 sum_i w*_i^2 lambda_i^2 / (p - 4 s* lambda_i)``."""
    m, C, _ = secular_poles(lam, w_star, s_star=s_star)
    p = _f64(p)
    return 1.0 - np.sum(C / (p[..., None] - m), axis=-1)


def secular_D_prime(p, lam, w_star, s_star: float | None = None):
    """``D'(p) = 8 sum_i w*_i^2 lambda_i^2 / (p - 4 s* lambda_i)^2`` (``> 0``)."""
    m, C, _ = secular_poles(lam, w_star, s_star=s_star)
    p = _f64(p)
    return np.sum(C / (p[..., None] - m) ** 2, axis=-1)


def a0hat(p, w0, lam, w_star, s_star: float | None = None):
    """``a0hat(p) = sum_i lambda_i w_i(0) w*_i / (p - 4 s* lambda_i)`` (Laplace transform of ``a0``)."""
    lam = _f64(lam)
    ss = s_star_of(lam, w_star) if s_star is None else float(s_star)
    p = _f64(p)
    return np.sum(lam * _f64(w0) * _f64(w_star) / (p[..., None] - 4 * ss * lam), axis=-1)


def growth_rate(lam, w_star, s_star: float | None = None) -> float:
    """``rho``: the root ``> 4 s* lambda_1`` of ``1 = 8 sum_i w*_i^2 lambda_i^2 / (rho - 4 s* lambda_i)``.

    Bracketed on ``rho = m_max + x``, ``x in (0, 2 sum_j C_j]``: the right-hand side decreases from
    ``+inf`` to below ``1`` there (each term ``<= C_j / x``), so Brent's method always converges.
    """
    m, C, _ = secular_poles(lam, w_star, s_star=s_star)
    if m.size == 0:
        raise ValueError("w* has no weight on the spectrum: no growth rate")
    dm = m[-1] - m

    def f(x):
        return 1.0 - np.sum(C / (dm + x))

    hi = 2.0 * float(C.sum())
    x = optimize.brentq(f, hi * 1e-250, hi, xtol=1e-300, rtol=1e-15, maxiter=1000)
    return float(m[-1] + x)


def gd_stability_edge(lam, w_star, s_star: float | None = None) -> float:
    """Largest step size at which population GD is linearly stable at the optimum: ``2 / lambda_max(H)``.

    The Hessian of ``L = 3 s^2 - 2 s s* - 4 u^2 + 3 s*^2`` at ``w = +-w*`` is
    ``H = 8 s* Q + 16 Q w* w*^T Q``, twice the Phase-I escape matrix ``4 s* Q + 8 Q w* w*^T Q`` whose top
    eigenvalue is :func:`growth_rate` ``rho``: so the edge is exactly ``1/rho``. Past it GD oscillates
    (period 2) or diverges and SGD, noisier, fails earlier; the ODE equivalents (GF, SGD-DE) do not see
    this instability of the discrete map.
    """
    return 1.0 / growth_rate(lam, w_star, s_star)


def secular_roots(lam, w_star, s_star: float | None = None, chunk: int = 512):
    """All roots ``p_k`` of ``D`` (the eigenvalues of ``M`` seen by ``u``), ascending, as
    ``(m_left, x)`` with ``p_k = m_left_k + x_k``.

    Root ``k < n`` lies in ``(m_k, m_{k+1})`` and the last one (``rho``) above ``m_n``. Every root is
    solved for its offset ``x`` from the pole on its left (so roots within ``1e-20`` of a pole are
    still resolved), by a vectorised bisection that halves geometrically while the bracket spans
    more than a factor 4 and arithmetically after: 4-5 digits per few steps, 200 steps in all.
    Costs ``O(n^2)`` per step, done in chunks of ``chunk`` roots.
    """
    m, C, _ = secular_poles(lam, w_star, s_star=s_star)
    n = m.size
    gaps = np.empty(n)
    gaps[:-1] = np.diff(m)
    gaps[-1] = 2.0 * C.sum()
    x = np.empty(n)
    for s0 in range(0, n, chunk):
        sl = slice(s0, min(n, s0 + chunk))
        dm = m[sl, None] - m[None, :]                      # (k, n): m_k - m_i, exact-ish
        hi = gaps[sl].copy()
        lo = hi * 1e-250
        for _ in range(200):
            geo = hi > 4.0 * lo
            mid = np.where(geo, np.sqrt(lo * hi), 0.5 * (lo + hi))
            f = 1.0 - np.sum(C / (dm + mid[:, None]), axis=1)  # increasing in x
            neg = f < 0
            lo = np.where(neg, mid, lo)
            hi = np.where(neg, hi, mid)
        x[sl] = 0.5 * (lo + hi)
    return m, x


def _residues(m, C, A, x):
    """``a0hat(p_k)/D'(p_k)`` at roots ``p_k = m_k + x_k`` (differences formed without cancellation)."""
    out = np.empty(m.size)
    for s0 in range(0, m.size, 512):
        sl = slice(s0, min(m.size, s0 + 512))
        diff = (m[sl, None] - m[None, :]) + x[sl, None]
        out[sl] = np.sum(A / diff, axis=1) / np.sum(C / diff**2, axis=1)
    return out


def residue_prefactor(w0, lam, w_star, s_star: float | None = None) -> float:
    """``c = a0hat(rho) / D'(rho)``: the Phase-I prediction is ``u(t) ~ c e^{rho t}``."""
    m, C, A = secular_poles(lam, w_star, w0, s_star)
    rho = growth_rate(lam, w_star, s_star)
    return float(np.sum(A / (rho - m)) / np.sum(C / (rho - m) ** 2))


def phase1_dominant_u(t, w0, lam, w_star, s_star: float | None = None) -> np.ndarray:
    """Dominant-root prediction ``u(t) = c e^{rho t}``."""
    c = residue_prefactor(w0, lam, w_star, s_star)
    rho = growth_rate(lam, w_star, s_star)
    return c * np.exp(rho * _f64(t))


def escape_time(delta: float, w0, lam, w_star, s_star: float | None = None) -> float:
    """``T1(delta) = log(delta / |c|) / rho``: when ``|c| e^{rho t}`` reaches ``delta``.

    The paper writes ``log(delta / |u(0)|) / rho``; both are ``Theta(log d)``, they differ by
    ``log(|u(0)|/|c|)/rho = O(1)`` (see the module docstring). Use ``delta`` well below ``1/3``
    (e.g. ``0.1``): the linearisation drops ``12 s``, and ``s ~ u^2/s*`` on escape. Clamped at
    ``0`` (``|c| >= delta``: already escaped, as happens at small ``d`` where ``|u(0)| ~ d^{-1/2}``).
    """
    delta = float(delta)
    if not delta > 0:
        raise ValueError(f"escape_time needs delta > 0, got {delta:g}")
    with np.errstate(divide="ignore", invalid="ignore"):
        try:
            c = residue_prefactor(w0, lam, w_star, s_star)
        except ZeroDivisionError:
            c = 0.0
    if not np.isfinite(c) or c == 0:
        return float("inf")  # u(0) has no component on the unstable mode: GF never escapes
    rho = growth_rate(lam, w_star, s_star)
    return float(max(0.0, np.log(delta / abs(c)) / rho))


def volterra_u(t, w0, lam, w_star, s_star: float | None = None) -> np.ndarray:
    """Exact solution of the Phase-I Volterra equation, ``u(t) = sum_k a0hat(p_k)/D'(p_k) e^{p_k t}``
    over all roots of ``D`` (partial fractions of ``U = a0hat/D``; see :func:`secular_roots`)."""
    m, C, A = secular_poles(lam, w_star, w0, s_star)
    _, x = secular_roots(lam, w_star, s_star)
    res = _residues(m, C, A, x)
    p = m + x
    t = _f64(t)
    return np.exp(np.multiply.outer(t, p)) @ res


def volterra_kernels(t, w0, lam, w_star, s_star: float | None = None):
    """``(a0(t), K(t))`` of the Volterra equation (for checks by quadrature)."""
    lam, w_star, w0 = _f64(lam), _f64(w_star), _f64(w0)
    ss = s_star_of(lam, w_star) if s_star is None else float(s_star)
    E = np.exp(np.multiply.outer(_f64(t), 4 * ss * lam))
    return E @ (lam * w0 * w_star), E @ (lam**2 * w_star**2)


@dataclass(frozen=True)
class Phase1Isotropic:
    """Closed form of Phase I for ``a = 0`` (``lambda_i = 1/d``): ``u(t) = u(0) e^{rho t}`` exactly.

    All poles coincide at ``4 s*/d`` and ``D(p) = 1 - 8 (s*/d) / (p - 4 s*/d)``, so
    ``rho = 12 s*/d``, ``c = u(0)`` (a single root carries all of ``u(0)``) and
    ``T1(delta) = d log(delta/|u(0)|) / (12 s*)``: linear in ``d``, against ``Theta(log d)`` for
    power laws.
    """

    rho: float
    c: float

    def u(self, t):
        return self.c * np.exp(self.rho * _f64(t))

    def escape_time(self, delta: float) -> float:
        return float(max(0.0, np.log(delta / abs(self.c)) / self.rho))


def isotropic_phase1(d: int, u0: float, s_star: float = 1.0) -> Phase1Isotropic:
    """Closed-form Phase I for the isotropic baseline (see :class:`Phase1Isotropic`)."""
    return Phase1Isotropic(rho=12.0 * s_star / d, c=float(u0))


def _linear_flow(w0, lam, w_star, s_star: float | None = None):
    lam, w_star, w0 = _f64(lam), _f64(w_star), _f64(w0)
    ss = s_star_of(lam, w_star) if s_star is None else float(s_star)
    v = lam * w_star
    ev, Qm = np.linalg.eigh(np.diag(4 * ss * lam) + 8 * np.outer(v, v))
    coef = Qm.T @ w0

    def state(t):
        W = (np.exp(np.multiply.outer(_f64(t), ev)) * coef) @ Qm.T   # (T, d)
        return (W * W) @ lam, W @ v

    return state, ss


def phase1_linear_state(t, w0, lam, w_star, s_star: float | None = None):
    """``(s(t), u(t))`` of the linearised Phase-I flow ``w(t) = exp(M t) w0``,
    ``M = 4 s* Q + 8 (Q w*)(Q w*)^T`` (``O(d^3)`` eigendecomposition, fine up to a few thousand)."""
    return _linear_flow(w0, lam, w_star, s_star)[0](t)


def predicted_t1_prime(w0, lam, w_star, s_star: float | None = None, level: float = 1 / 3,
                       t_max: float = 1e4) -> float:
    """First time the *linearised* Phase-I ``s(t)`` reaches ``level * s*`` (default ``1/3``).

    The linear flow keeps growing at ``rho`` where GF slows down (``12 s`` grows), so this is a
    lower estimate of the measured ``T1'``; the gap is ``O(1/rho)``.
    """
    state, ss = _linear_flow(w0, lam, w_star, s_star)
    g = lambda tt: float(state(np.array([tt]))[0][0]) - level * ss
    if g(0.0) >= 0:
        return 0.0
    hi = 1.0 / growth_rate(lam, w_star, ss)
    while g(hi) < 0:
        hi *= 2
        if hi > t_max:
            return float("nan")
    return float(optimize.brentq(g, 0.0, hi, xtol=1e-10))


# ----------------------------------------------------------------------------------------------
# Phase II: tail mass, 1 - u, the T2 bound

def tail_mass(threshold, lam, w_star) -> np.ndarray:
    """``T(lambda) = sum_{lambda_i < lambda} lambda_i w*_i^2`` of the actual target (vectorised)."""
    lam, w_star = _f64(lam), _f64(w_star)
    order = np.argsort(lam)
    ls = lam[order]
    cum = np.concatenate([[0.0], np.cumsum((lam * w_star**2)[order])])
    return cum[np.searchsorted(ls, _f64(threshold), side="left")]


def tail_mass_curve(lam, w_star):
    """``(lambda_k, T(lambda_k))`` at every eigenvalue, ``T(lambda_k) = sum_{i > k} lambda_i w*_i^2``
    (spectrum sorted decreasing)."""
    lam, w_star = _f64(lam), _f64(w_star)
    order = np.argsort(-lam)
    m = (lam * w_star**2)[order]
    tail = np.concatenate([np.cumsum(m[::-1])[::-1][1:], [0.0]])
    return lam[order], tail


def tail_mass_asymptotic(threshold, a: float, d: int, s_star: float = 1.0) -> np.ndarray:
    """Continuum prediction for ``E T(lambda)`` with ``E w*_i^2 = s*`` (sigma target, ``s* = 1``):
    ``T(lambda) = sum_{i > n} i^{-a}/H ~ (n^{1-a} - d^{1-a}) / ((a-1) H)``, ``n = (lambda H)^{-1/a}``,
    i.e. ``~ (lambda H)^{1 - 1/a} / ((a - 1) H)`` for ``1 << n << d``."""
    i = np.arange(1, d + 1, dtype=np.float64)
    H = float(np.sum(i ** (-float(a))))
    n = np.clip((_f64(threshold) * H) ** (-1.0 / a), 1.0, d)
    return s_star * (n ** (1 - a) - d ** (1 - a)) / ((a - 1) * H)


def tail_mass_exponent(a: float) -> float:
    """Theory: ``T(lambda) ~ lambda^{1 - 1/a}`` (``a > 1``)."""
    a = _need_tail(a, "tail_mass_exponent")
    return 1.0 - 1.0 / a


def fit_tail_mass_exponent(lam, w_star, k_lo: int = 5, k_hi: int | None = None) -> float:
    """Least-squares log-log slope of ``T(lambda_k)`` against ``lambda_k`` for ``k_lo <= k <= k_hi``
    (``k`` the rank, default ``k_hi = d // 20``): inside the spectrum, away from the head (where
    the sum has few terms) and from ``d`` (where the finite tail bends ``T`` down).
    The finite-``d`` factor ``1 - (k/d)^{a-1}`` biases the slope upwards slightly at small ``d``.
    """
    ls, T = tail_mass_curve(lam, w_star)
    d = ls.size
    k_hi = max(k_lo + 2, d // 20) if k_hi is None else k_hi
    k = np.arange(k_lo, min(k_hi, d - 1) + 1)  # 1-based ranks
    k = k[T[k - 1] > 0]
    x = np.log(ls[k - 1]) if k.size else k
    if k.size < 3 or np.ptp(x) <= 1e-12 * max(1.0, np.abs(x).max()):
        return float("nan")  # a flat spectrum (a = 0) has no slope in lambda
    return float(np.polyfit(x, np.log(T[k - 1]), 1)[0])


def aligned_error(w, w_star) -> np.ndarray:
    """``e = w - sign(<w, w*>) w*`` (the sign that the MSE uses), for ``w`` of shape ``(..., d)``."""
    w, w_star = _f64(w), _f64(w_star)
    sg = np.sign(np.sum(w * w_star, axis=-1, keepdims=True))
    sg = np.where(sg == 0, 1.0, sg)
    return w - sg * w_star


def _final_sign(w0, lam, w_star) -> float:
    """Sign of ``u`` after escape: that of the dominant residue ``c`` (``w -> sign(c) w*``)."""
    try:
        return float(np.sign(residue_prefactor(w0, lam, w_star)) or 1.0)
    except ValueError:
        return 1.0


def one_minus_u_quasistatic(t, w0, lam, w_star, t0: float) -> np.ndarray:
    """Quasi-static prediction of ``1 - u/s*`` in Phase IIb (ours; the paper gives no curve).

    Model: from ``t0`` (~``T1'``) on every mode relaxes as ``w_i = w*_i + e_i(t0) e^{-8 s* lambda_i (t-t0)}``
    with ``e(t0) = w0 - sg w*`` (``sg = sign(c)``, the sign GF converges to; the slow tail has barely
    moved by ``T1'``), while the head
    adjusts instantly to the unlearned part. Solving the head's equilibrium
    ``(12 s - 4 s*) w_i = 8 u w*_i`` to first order in the deficits gives (``s* = 1``)

        1 - u = sum_i lambda_i [ -(1/3) w*_i e_i + (1/2) e_i^2 ]
              = sum_i lambda_i w*_i^2 (f_i/3 + f_i^2/2),   f_i = -e_i/w*_i,

    i.e. ``5/6`` of the unlearned tail mass while ``f ~ 1`` and ``1/3`` of it late. With
    ``f_i = e^{-8 lambda_i tau}`` the sum is ``~ tau^{-(1 - 1/a)}`` (:func:`one_minus_u_exponents`).
    For general ``s*`` the same expression is divided by ``s*`` (relative deficit).
    """
    lam, w_star = _f64(lam), _f64(w_star)
    ss = s_star_of(lam, w_star)
    ws = _final_sign(w0, lam, w_star) * w_star
    e0 = _f64(w0) - ws
    tau = np.maximum(_f64(t) - t0, 0.0)
    E = np.exp(-8.0 * ss * np.multiply.outer(tau, lam))
    e = E * e0
    return (-(1 / 3) * (e @ (lam * ws)) + 0.5 * ((e * e) @ lam)) / ss


def loss_quasistatic(t, w0, lam, w_star, t0: float) -> np.ndarray:
    """Quasi-static loss after ``t0`` (~``T1'``), companion of :func:`one_minus_u_quasistatic`.

    Uses the exact identity ``L = 4 s* q + 8 g^2 + 12 g q + 3 q^2`` (:func:`phase3_loss`) with
    ``q = sum_i lambda_i e_i^2``, ``e_i = e_i(t0) e^{-8 s* lambda_i (t - t0)}``, ``e(t0) = w0 - sg w*``, and
    ``g = u - s* = -s* (1 - u/s*)`` from :func:`one_minus_u_quasistatic` (the head's compensation
    changes ``g`` at first order but ``q`` only at second order).
    """
    lam, w_star = _f64(lam), _f64(w_star)
    ss = s_star_of(lam, w_star)
    e0 = _f64(w0) - _final_sign(w0, lam, w_star) * w_star
    tau = np.maximum(_f64(t) - t0, 0.0)
    q = np.exp(-16.0 * ss * np.multiply.outer(tau, lam)) @ (lam * e0**2)
    g = -ss * one_minus_u_quasistatic(t, w0, lam, w_star, t0)
    return 4 * ss * q + 8 * g**2 + 12 * g * q + 3 * q**2


def predicted_t2(eps: float, w0, lam, w_star, t0: float) -> float:
    """First ``t`` where :func:`one_minus_u_quasistatic` ``<= eps`` (``t0 = T1'``, ``0 < eps < 1``)."""
    eps = _need_level(eps, "eps")
    f = lambda tt: float(one_minus_u_quasistatic(np.array([tt]), w0, lam, w_star, t0)[0]) - eps
    if f(t0) <= 0:
        return float(t0)
    hi = t0 + 1.0
    while f(hi) > 0:
        hi = t0 + 2 * (hi - t0)
        if hi - t0 > 1e18:
            return float("nan")
    return float(optimize.brentq(f, t0, hi, xtol=1e-12 * hi, rtol=1e-10))


def _bound_weights(w0, lam, w_star, overshoot: float):
    lam, w_star, w0 = _f64(lam), _f64(w_star), _f64(w0)
    ss = s_star_of(lam, w_star)
    sg = _final_sign(w0, lam, w_star)
    # |e_i(t0)| <= |w*_i| + |w0_i| for a mode moving monotonically from w0_i toward w*_i, plus the
    # head's overshoot (the head over-scales by 1 + T/6 <= 1 + 1/6 to compensate the unlearned tail)
    E = np.abs(w_star) * (1.0 + overshoot) + np.abs(w0) * (np.sign(w0) != sg * np.sign(w_star))
    E = np.maximum(E, np.abs(w0 - sg * w_star))  # a same-sign w0_i larger than w*_i starts further off
    return lam, np.abs(w_star), E, ss


def t2_bound(eps: float, w0, lam, w_star, t0: float, form: str = "direct", split: bool = False,
             overshoot: float = 1 / 6, delay: float | None = None) -> float:
    """Explicit upper bound on ``T2(eps)`` (first time ``1 - u/s* <= eps``), from ``t0 = T1'``.

    Derivation (GF coordinates). ``1 - u/s* = (1/s*) sum_i lambda_i w*_i (w*_i - w_i)``. Once
    ``s > s*/3`` the mode coefficient ``12 s - 4 s*`` is positive; it reaches ~``8 s*`` as ``s`` rises
    to ``s*``, which takes about one relaxation time of the top mode. Assume, with
    ``t_a = t0 + delay`` (default ``delay = 1/(8 s* lambda_1)``):

    * (A1) each error ``e_i = w_i - w*_i`` contracts at least like ``e^{-8 s* lambda_i (t - t_a)}``
      (exact in the linearised Phase III for every mode but the stiff rank-one one, which is faster);
    * (A2) each mode moves monotonically from ``w_i(0)`` toward ``w*_i`` (the tail barely moves before
      ``T1'``), overshooting by at most ``overshoot |w*_i|`` (the head's compensation of the unlearned
      tail is ``1 + T/6``), so ``|e_i(t0)| <= E_i``, ``E_i = max((1 + overshoot)|w*_i| + |w_i(0)|
      [w_i(0) of the wrong sign], |w_i(0) - sg w*_i|)``, ``sg = sign(c)`` the sign GF converges to.

    Then, with ``b_i = lambda_i |w*_i| E_i / s*``,

        form="direct":  1 - u(t_a + tau) <= B(tau) = sum_i b_i e^{-8 s* lambda_i tau},
        form="paper":   1 - u <= ||e||_Q / sqrt(s*) <= sqrt( sum_i lambda_i E_i^2 e^{-16 s* lambda_i tau} / s* )
                        (Cauchy-Schwarz; an accuracy in the Q-norm, which is what makes the paper's
                        exponent ``2a/(a-1)``), and ``T2 <= t_a + B^{-1}(eps)``.

    ``split=True`` returns the closed form "head + tail" instead, optimised over the split rank ``k``:
    head modes ``lambda_i >= lambda_k`` decay at least at ``8 s* lambda_k``, the tail is bounded by
    its mass ``T_k = sum_{i>k} b_i``:  ``tau <= min_k log(C_k / (eps - T_k)) / (8 s* lambda_k)``,
    ``C_k = sum_{i<=k} b_i`` (``eps^2`` and ``16`` for the paper form). For ``lambda_i ~ i^{-a}``,
    ``T_k ~ k^{1-a}`` so the optimum has ``k ~ eps^{-1/(a-1)}`` and
    ``tau = O(eps^{-a/(a-1)} log(1/eps))`` (direct) or ``O(eps^{-2a/(a-1)} log(1/eps))`` (paper:
    the corollary's rate). ``split`` >= the sum form, both under (A1)-(A2).

    Not a theorem: (A1)-(A2) are read off the linearised dynamics, not proved along the nonlinear
    flow. Checked on GF (``a in {1.5, 2, 4}``, ``d in {300, 1000}``, 5 seeds, ``eps`` from ``0.5`` to
    ``0.003``): the direct bound holds everywhere, ``1.3-2.5x`` the measured ``T2`` for ``eps <= 0.3``
    (the slack of the tail is the head's compensation, ``1 - u`` being ``5/6`` to ``1/3`` of the
    unlearned tail mass, :func:`one_minus_u_quasistatic`). Without the delay it failed once, by 0.3%,
    at ``eps = 0.5`` (right at ``T1'``).
    """
    if form not in ("direct", "paper"):
        raise ValueError(f"form={form!r}: expected 'direct' or 'paper'")
    eps = _need_level(eps, "eps")
    lam, aws, E, ss = _bound_weights(w0, lam, w_star, overshoot)
    t0 = float(t0) + (1.0 / (8.0 * ss * lam.max()) if delay is None else float(delay))
    if form == "direct":
        b, rate, target = lam * aws * E / ss, 8.0 * ss * lam, float(eps)
    else:
        b, rate, target = lam * E**2 / ss, 16.0 * ss * lam, float(eps) ** 2
    if split:
        order = np.argsort(-lam)
        bs, rs = b[order], rate[order]
        C = np.cumsum(bs)
        T = C[-1] - C
        ok = T < target
        with np.errstate(divide="ignore", invalid="ignore"):
            tau = np.where(ok, np.log(np.maximum(C / (target - T), 1.0)) / rs, np.inf)
        return float(t0 + np.min(tau))

    def B(tau):
        return float(np.sum(b * np.exp(-rate * tau))) - target

    if B(0.0) <= 0:
        return float(t0)
    hi = 1.0 / rate.max()
    while B(hi) > 0:
        hi *= 2.0
    return float(t0 + optimize.brentq(B, 0.0, hi, xtol=1e-12 * hi, rtol=1e-12))


# ----------------------------------------------------------------------------------------------
# Phase III: the spectral tail

def phase3_weights(w_T2, w_star) -> np.ndarray:
    """``pi_i = e_i(T2)^2 / sum_j e_j(T2)^2`` with the sign-aligned errors of :func:`aligned_error`."""
    e = aligned_error(w_T2, w_star)
    return e**2 / np.sum(e**2, axis=-1, keepdims=True)


def phase3_S(tau, pi, lam, s_star: float = 1.0) -> np.ndarray:
    """``S(tau) = sum_i pi_i e^{-16 s* lambda_i tau}`` (so ``MSE(T2 + tau) = MSE(T2) S(tau)``; the paper
    has ``s* = 1``)."""
    return np.exp(-16.0 * s_star * np.multiply.outer(_f64(tau), _f64(lam))) @ _f64(pi)


def _need_tail(a: float, what: str) -> float:
    """``a`` as float; a ValueError unless ``a > 1`` (the tail laws need a summable spectrum)."""
    a = float(a)
    if not a > 1:
        raise ValueError(f"{what} needs a > 1 (got a = {a:g}): for a <= 1 the spectrum is not summable "
                         "as d grows and the tail laws do not apply")
    return a


def _need_tau(tau) -> np.ndarray:
    tau = _f64(tau)
    if np.any(tau < 0) or not np.all(np.isfinite(tau)):
        raise ValueError("tau must be finite and >= 0")
    return tau


def _need_level(x: float, name: str) -> float:
    x = float(x)
    if not 0 < x < 1:
        raise ValueError(f"{name} must be in (0, 1), got {x:g}")
    return x


def _H(d: int, a: float) -> float:
    return float(np.sum(np.arange(1, d + 1, dtype=np.float64) ** (-float(a))))


def uniform_S(tau, d: int, a: float) -> np.ndarray:
    """Uniform proxy ``S_d(tau) = (1/d) sum_i exp(-16 tau i^{-a} / H_{d,a})`` (``pi_i = 1/d``)."""
    tau = _need_tau(tau)
    i = np.arange(1, d + 1, dtype=np.float64)
    lam = i ** (-float(a)) / _H(d, a)
    return phase3_S(tau, np.full(d, 1.0 / d), lam)


def uniform_S_early(tau, d: int) -> np.ndarray:
    """Early regime ``S_d ~ 1 - 16 tau / d`` (first order in ``tau``; ``tr Q = 1``), ``16 tau lambda_1 << 1``."""
    return 1.0 - 16.0 * _f64(tau) / d


def uniform_S_middle(tau, d: int, a: float) -> np.ndarray:
    """Middle regime ``S_d ~ 1 - Gamma(1 - 1/a) (16 tau/H)^{1/a} / d`` (``a > 1``), valid for
    ``H/16 << tau << H d^a/16``: ``d (1 - S_d) = sum_i (1 - e^{-c i^{-a}}) ~ int_0^inf (1 - e^{-c x^{-a}}) dx
    = Gamma(1 - 1/a) c^{1/a}``, ``c = 16 tau / H`` (error ``O(1)`` in the sum, i.e. ``O(1/d)`` in S)."""
    a = _need_tail(a, "uniform_S_middle")
    return 1.0 - special.gamma(1 - 1 / a) * (16.0 * _need_tau(tau) / _H(d, a)) ** (1 / a) / d


def uniform_S_late_bound(tau, d: int, a: float) -> np.ndarray:
    """Late regime bound ``S_d <= exp(-16 tau d^{-a} / H)`` (every ``lambda_i >= lambda_d``); the
    floor needs ``tau ~ H d^a / 16``."""
    return np.exp(-16.0 * _f64(tau) * d ** (-float(a)) / _H(d, a))


def uniform_S_late(tau, d: int, a: float) -> np.ndarray:
    """Late-regime asymptotic (ours): the last modes dominate, ``lambda_{d-k} ~ lambda_d (1 + a k/d)``, so
    ``S_d ~ e^{-16 tau lambda_d} / (d (1 - e^{-16 a tau lambda_d / d}))`` for ``16 tau lambda_d >> 1``:
    the bound ``exp(-16 tau lambda_d)`` is reached only up to the factor ``~ d/(16 a tau lambda_d)`` of
    near-degenerate bottom modes, i.e. the floor needs ``tau >> H d^{a+1} / (16 a)``."""
    lam_d = d ** (-float(a)) / _H(d, a)
    z = 16.0 * _f64(tau) * lam_d
    with np.errstate(divide="ignore"):
        return np.exp(-z - np.log(d) - np.log(-np.expm1(-a * z / d)))


def phase3_state(tau, w_T2, lam, w_star) -> np.ndarray:
    """Paper's Phase-III states ``w(T2 + tau) = sg w* + e_i(T2) e^{-8 s* lambda_i tau}`` (``(T, d)``):
    with ``s = u = s*`` frozen, ``de_i/dt = -8 s* lambda_i e_i`` (the rank-one coupling is dropped)."""
    w_T2, w_star = _f64(w_T2), _f64(w_star)
    ss = s_star_of(lam, w_star)
    sg = np.sign(np.sum(w_T2 * w_star)) or 1.0
    e = aligned_error(w_T2, w_star)
    return sg * w_star + np.exp(-8.0 * ss * np.multiply.outer(_f64(tau), _f64(lam))) * e


def phase3_mse(tau, w_T2, lam, w_star) -> np.ndarray:
    """``MSE(T2 + tau) = MSE(T2) S(tau)``, ``MSE(T2) = ||e(T2)||^2 / d``."""
    e = aligned_error(w_T2, w_star)
    return float(np.sum(e**2)) / e.size * phase3_S(tau, e**2 / np.sum(e**2), lam, s_star_of(lam, w_star))


def phase3_loss(tau, w_T2, lam, w_star) -> np.ndarray:
    """Predicted loss in Phase III, exact in ``e`` given the paper's ``e_i(tau) = e_i(T2) e^{-8 lambda_i tau}``.

    With ``s = s* + 2 g + q``, ``u = s* + g`` (sign-aligned ``w* ``), ``g = sum_i lambda_i w*_i e_i``,
    ``q = sum_i lambda_i e_i^2``, the closed form ``L = 3 s^2 + 3 s*^2 - 4 u^2 - 2 s s*`` is exactly

        L = 4 s* q + 8 g^2 + 12 g q + 3 q^2,

    ``q(tau) = sum_i lambda_i e_i(T2)^2 e^{-16 lambda_i tau}``, ``g(tau) = sum_i lambda_i w*_i e_i(T2) e^{-8 lambda_i tau}``.
    The leading term ``4 s* q`` is a ``lambda``-weighted version of ``S``: with ``e_i ~ -w*_i`` in the
    tail it decays as ``tau^{-(1 - 1/a)}`` (:func:`phase3_loss_asymptotic`), ``8 g^2`` twice as fast.
    """
    lam, w_star, w_T2 = _f64(lam), _f64(w_star), _f64(w_T2)
    ss = s_star_of(lam, w_star)
    sg = np.sign(np.sum(w_T2 * w_star)) or 1.0
    e = aligned_error(w_T2, w_star)
    tau = _f64(tau)
    E8 = np.exp(-8.0 * ss * np.multiply.outer(tau, lam))
    q = (E8 * E8) @ (lam * e**2)
    g = E8 @ (lam * sg * w_star * e)
    return 4 * ss * q + 8 * g**2 + 12 * g * q + 3 * q**2


def phase3_loss_asymptotic(tau, a: float, d: int, s_star: float = 1.0) -> np.ndarray:
    """Leading loss law in the middle regime with ``e_i^2 ~ w*_i^2 ~ s*`` (unlearned tail):
    ``L ~ 4 s* sum_i lambda_i e^{-16 lambda_i tau} ~ 4 s*^2 Gamma(1 - 1/a) / (a H^{1/a}) (16 tau)^{-(1 - 1/a)}``."""
    a = _need_tail(a, "phase3_loss_asymptotic")
    H = _H(d, a)
    return 4 * s_star**2 * special.gamma(1 - 1 / a) / (a * H ** (1 / a)) * (16 * _need_tau(tau)) ** (-(1 - 1 / a))


def phase3_curves(taus, w_T2, lam, w_star, t2: float = 0.0):
    """The paper's Phase-III prediction as :class:`~prtorch.record.Curves` (``mse, loss, s, u`` at
    ``t = t2 + taus``), one curve per row of ``w_T2``."""
    from prtorch.model import metrics
    from prtorch.record import Curves

    w_T2 = np.atleast_2d(_f64(w_T2))
    lam, w_star = _f64(lam), _f64(w_star)
    ss = s_star_of(lam, w_star)
    vals = {k: [] for k in ("mse", "loss", "s", "u")}
    for w in w_T2:
        m = metrics(phase3_state(taus, w, lam, w_star), lam, w_star, ss)
        for k in vals:
            vals[k].append(np.asarray(m[k]))
    vals = {k: np.stack(v, axis=1) for k, v in vals.items()}
    time = np.repeat((t2 + _f64(taus))[:, None], w_T2.shape[0], 1)
    return Curves("phase3", time, vals, {"init": np.arange(w_T2.shape[0])})


# ----------------------------------------------------------------------------------------------
# exponents

def local_slope(x, y) -> np.ndarray:
    """Local log-log slope ``d log|y| / d log x`` (central differences on a log grid; NaN where
    ``x <= 0`` or ``y == 0``)."""
    x, y = _f64(x), _f64(y)
    with np.errstate(all="ignore"):
        lx, ly = np.log(x), np.log(np.abs(y))
        ok = np.isfinite(lx) & np.isfinite(ly)
        out = np.full(x.shape, np.nan)
        if ok.sum() >= 2:
            out[ok] = np.gradient(ly[ok], lx[ok])
    return out


def mse_drop_exponent(a: float) -> float:
    """``1 - MSE(T2 + tau)/MSE(T2) ~ tau^{1/a}`` in the middle regime of ``S_d`` (``a > 1``)."""
    a = _need_tail(a, "mse_drop_exponent")
    return 1.0 / a


def loss_tail_exponent(a: float) -> float:
    """``L(T2 + tau) ~ tau^{-(1 - 1/a)}`` (decay exponent ``1 - 1/a``, see :func:`phase3_loss`; ``a > 1``)."""
    a = _need_tail(a, "loss_tail_exponent")
    return 1.0 - 1.0 / a


def one_minus_u_exponents(a: float) -> dict:
    """Candidate decay exponents ``beta`` of ``1 - u ~ t^{-beta}`` in Phase IIb:

    * ``paper_bound``: ``(a - 1)/(2a)``, the inverse of ``T2 - T1' = O(eps^{-2a/(a-1)} log 1/eps)``;
    * ``appendix``: ``1/a`` (the appendix's ``1 - u ~ Lambda^{-1/a}``);
    * ``tail_mass``: ``1 - 1/a`` (ours, :func:`one_minus_u_quasistatic`: ``1 - u`` is a fixed
      fraction of the tail mass not yet learned, ``T(1/(8 t)) ~ t^{-(1 - 1/a)}``).
    ``appendix = tail_mass`` only at ``a = 2``, ``paper_bound = appendix`` only at ``a = 3``;
    ``paper_bound`` is always half of ``tail_mass``. Needs ``a > 1``.
    """
    a = _need_tail(a, "one_minus_u_exponents")
    return {"paper_bound": (a - 1) / (2 * a), "appendix": 1.0 / a, "tail_mass": 1.0 - 1.0 / a}
