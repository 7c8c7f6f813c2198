"""The deterministic equivalent of SGD (prtorch.theory.sgd_equivalent).

From the bottom up: divided differences of exp, the exact frozen step, the second-order moving
step, the fast flow against the reference one, the limits (eta -> 0 is gradient flow, B = inf is
population GD), and finally the SGD median itself at small and at large learning rate.
"""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from prtorch.model import metrics, population_grad
from prtorch.problem import make_instance
from prtorch.record import save_steps, save_times
from prtorch.simulate import simulate
from prtorch.theory.gradient_flow import gf_curves
from prtorch.theory.measure import crossing_time
from prtorch.theory.sgd_equivalent import (DEFlow, de_flow, de_rates, de_scalars, escape_noise_ratio, exp_dd,
                                           sgd_de_curves, sgd_equivalent, step_divided_differences)


# --------------------------------------------------------------------------- divided differences

def _dd_expm(z):
    """``e[z_1..z_n]``: top-right entry of ``exp`` of the bidiagonal matrix (Opitz's formula)."""
    n = len(z)
    return expm(np.diag(z) + np.diag(np.ones(n - 1), 1))[0, n - 1]


def test_exp_dd_against_matrix_exponential():
    rng = np.random.default_rng(0)
    cases = []
    for n in (2, 3, 4):
        for _ in range(40):
            z = list(rng.uniform(-5, 5, n - 1) * 10 ** rng.uniform(-6, 0, n - 1)) + [0.0]
            if rng.random() < 0.4:
                z[1 % (n - 1)] = z[0]  # coincident nodes
            cases.append(z)
        cases += [[0.0] * n, [3.0] * n, [-4.0] * (n - 1) + [0.0]]
    for z in cases:
        got = exp_dd(*[np.array([x]) for x in z])[0]
        assert np.isclose(got, _dd_expm(z), rtol=5e-11, atol=0), z  # expm itself is good to ~1e-12
    for n, c in ((2, 3.0), (3, -2.0), (4, 3.0)):  # all nodes equal: e^c / (n-1)!
        assert np.isclose(exp_dd(*[np.array([c])] * n)[0], np.exp(c) / np.prod(np.arange(1, n)), rtol=1e-14)


def test_exp_dd_special_values():
    z = np.array([-700.0, -30.0, -1e-9, 0.0, 1e-9, 2.0, 40.0])
    zero = np.zeros_like(z)
    assert np.allclose(exp_dd(z, z), np.exp(z), rtol=1e-14)
    phi1 = np.where(z == 0, 1.0, np.expm1(z) / np.where(z == 0, 1.0, z))
    assert np.allclose(exp_dd(z, zero), phi1, rtol=1e-14)
    assert np.allclose(exp_dd(zero, zero, zero), 0.5) and np.allclose(exp_dd(zero, zero, zero, zero), 1 / 6)
    # translation: e[z + c] = e^c e[z]; huge spreads stay finite and positive
    a, b = np.array([-3.0, 0.2]), np.array([1.0, -0.7])
    assert np.allclose(exp_dd(a + 2, b + 2, zero[:2] + 2), np.exp(2) * exp_dd(a, b, zero[:2]), rtol=1e-13)
    big = exp_dd(np.array([-1e4]), np.array([-2e4]), np.array([0.0]), np.array([0.0]))
    assert np.isfinite(big).all() and big[0] > 0


def test_fast_divided_differences_match_general():
    rng = np.random.default_rng(1)
    M = 3000
    scale = 10 ** rng.uniform(-9, 2.2, M)
    za = scale * rng.normal(size=M)
    zg = 2 * za + scale * rng.normal(size=M) * 10 ** rng.uniform(-9, 0, M)
    k = rng.random(M)
    zg[k < 0.1] = za[k < 0.1]                       # gamma = alpha
    zg[(k > 0.1) & (k < 0.2)] = 0.0                  # gamma = 0
    za[(k > 0.2) & (k < 0.3)] = 0.0                  # alpha = 0 (s = s*/3)
    near = (k > 0.3) & (k < 0.35)
    zg[near] = za[near] * (1 + 1e-9)                 # nearly coincident
    zero = np.zeros(M)
    got = step_divided_differences(za.reshape(2, -1), zg.reshape(2, -1))
    ref = [np.exp(za), np.exp(zg), exp_dd(za, zero), exp_dd(za, zero, zero), exp_dd(zg, zero),
           exp_dd(zg, zero, zero), exp_dd(zg, za), exp_dd(zg, za, zero), exp_dd(zg, za, zero, zero)]
    for g, r in zip(got, ref):
        assert g.shape == (2, M // 2)
        assert np.allclose(g.reshape(-1), r, rtol=5e-12, atol=0)


# --------------------------------------------------------------------------- one step

def _state(d=40, a=1.5, seed=2, n=3, scale=1.0):
    inst = make_instance(d, a, n, seed=seed, per_replica_init=True)
    rng = np.random.default_rng(seed)
    mu = scale * inst.w0
    P = mu**2 + 0.05 * rng.random(mu.shape) * inst.lam
    return inst, np.concatenate([mu, P], axis=1)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", ["escape", "converging", "alpha_zero", "gamma_eq_alpha"])
def test_frozen_step_is_exact(case, backend):
    """With the scalars frozen, one step of any size equals the ODE solution (growing modes,
    ``alpha = 0`` and ``gamma = alpha`` included)."""
    inst, y = _state()
    d, lam, ws, ss = inst.d, inst.lam, inst.w_star, inst.s_star
    f, sigma = 1.0, 0.3
    lr = np.full((3, 1), 0.05)
    c = de_scalars(y, lam, ws)
    if case == "escape":
        c = np.tile([[0.05, 0.02]], (3, 1))           # A < 0: every mode grows
    elif case == "converging":
        c = np.tile([[1.02, 0.98]], (3, 1))
    elif case == "alpha_zero":
        c = np.tile([[ss / 3, 0.3]], (3, 1))          # A = 0
    else:                                             # pick eta so that gamma_5 = alpha_5
        c = np.tile([[0.8, 0.6]], (3, 1))
        a1, _, g1, _, _ = de_rates(c, lam, ws, ss, np.ones((3, 1)), f, sigma)
        x = 2 * a1 - g1                               # gamma = 2 alpha - eta x
        lr = (a1[:, 5] / x[:, 5])[:, None]
        assert np.all(lr > 0)
    rates = de_rates(c, lam, ws, ss, lr, f, sigma)
    fast = DEFlow(lam, ws, ss, lr[:, 0], f, sigma, interpolate=False, drift=False, backend=backend)
    assert fast.backend == backend
    for h in (1e-3, 0.7, 20.0):
        ref = np.array([solve_ivp(_rhs_row(rates, r, d), (0, h), y[r], method="DOP853",
                                  rtol=1e-12, atol=1e-14).y[:, -1] for r in range(3)])
        got = de_flow(y, c, h, lam, ws, ss, lr, f, sigma, interpolate=False, drift=False)
        scale = np.abs(ref) + 1e-8 * np.abs(ref).max()
        assert np.max(np.abs(got - ref) / scale) < 1e-8, (case, h)
        assert np.allclose(fast(y, c, h), got, rtol=1e-12, atol=1e-14 * np.abs(got).max())


def _rhs_row(rates, r, d, rates_at=None):
    def rhs(t, x):
        a, b, g, dl, e = (q[r] for q in (rates_at(t) if rates_at else rates))
        mu, P = x[:d], x[d:]
        return np.concatenate([-a * mu + b, -g * P + dl * mu + e])
    return rhs


@pytest.mark.parametrize("drift", [False, True])
def test_moving_step_is_second_order(drift):
    """Scalars moving linearly over the step: the interpolated step's error falls ~8x per halving
    of ``h`` (second order), the end-frozen one's only ~4x (first order)."""
    inst, y = _state(d=30, scale=1.0)
    d, lam, ws, ss = inst.d, inst.lam, inst.w_star, inst.s_star
    lr, f, sigma = np.array([0.02]), 1.0, 0.3
    y = y[:1]
    c0 = de_scalars(y, lam, ws)
    slope = np.array([[0.3, 0.2, 0.1, 0.05]])
    errs = {True: [], False: []}
    for h in (0.2, 0.1, 0.05):
        c1 = c0 + slope * h

        def rates_at(t, c0=c0):
            return de_rates(c0 + slope * t, lam, ws, ss, lr[:, None], f, sigma, drift)

        ref = solve_ivp(_rhs_row(None, 0, d, rates_at), (0, h), y[0], method="DOP853",
                        rtol=1e-13, atol=1e-15).y[:, -1]
        for interp in (True, False):
            got = de_flow(y, c1, h, lam, ws, ss, lr[:, None], f, sigma, interpolate=interp, drift=drift)[0]
            errs[interp].append(np.linalg.norm(got - ref))
    ratio2 = errs[True][0] / errs[True][1], errs[True][1] / errs[True][2]
    ratio1 = errs[False][0] / errs[False][1], errs[False][1] / errs[False][2]
    assert min(ratio2) > 6.5, ratio2
    assert max(ratio1) < 5.0, ratio1
    assert errs[True][-1] < 0.1 * errs[False][-1]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_fast_flow_matches_reference_flow(backend):
    inst, y = _state(d=60, a=2.0, seed=4)
    lam, ws, ss = inst.lam, inst.w_star, inst.s_star
    rng = np.random.default_rng(5)
    lr = np.array([1e-3, 2e-2, 0.1])
    for f in (1.0, 0.25, 0.0):
        for drift in (False, True):
            for interp in (False, True):
                fast = DEFlow(lam, ws, ss, lr, f, 0.4, interpolate=interp, drift=drift, backend=backend)
                for h in (1e-3, 0.3, 10.0):
                    c = de_scalars(y, lam, ws) * (1 + 0.02 * rng.normal(size=(3, 4)))
                    cf = c if drift else c[:, :2]  # the fast flow carries s^(2), u^(2) only for the drift
                    assert np.allclose(fast.scalars(y), de_scalars(y, lam, ws)[:, :cf.shape[1]], rtol=1e-14)
                    ref = de_flow(y, c, h, lam, ws, ss, lr[:, None], f, 0.4, interpolate=interp, drift=drift)
                    assert np.allclose(fast(y, cf, h), ref, rtol=1e-11, atol=1e-13 * np.abs(ref).max())
                    wants = de_rates(c, lam, ws, ss, lr[:, None], f, 0.4, drift)
                    scale = max(np.abs(w).max() for w in wants)
                    for got, want in zip(fast.rates(cf), wants):
                        assert np.allclose(got, want, rtol=1e-12, atol=1e-14 * scale)


# --------------------------------------------------------------------------- limits

def test_zero_learning_rate_is_gradient_flow():
    d = 40
    inst = make_instance(d, 1.5, 1, seed=3)
    lam, ws, ss = inst.lam, inst.w_star, inst.s_star
    times = save_times(100.0, 8, 1e-2)

    def grad_flow(t, w):
        s, u = lam @ (w * w), lam @ (w * ws)
        return -lam * ((12 * s - 4 * ss) * w - 8 * u * ws)

    ref = solve_ivp(grad_flow, (0, times[-1]), inst.w0[0], method="DOP853", t_eval=times,
                    rtol=1e-12, atol=1e-14).y.T
    exact = metrics(ref, lam, ws, ss)
    de = sgd_de_curves(inst.w0, lam, ws, times, lr=1e-9)
    gf = gf_curves(inst.w0, lam, ws, times)
    for k in ("mse", "loss", "s", "u"):
        gap_exact = np.max(np.abs(de.values[k][:, 0] / exact[k] - 1))
        gap_gf = np.max(np.abs(de.values[k][:, 0] / gf.values[k][:, 0] - 1))
        print(f"\n{k}: DE(eta=1e-9) vs exact GF {gap_exact:.1e}, vs gf_curves {gap_gf:.1e}, "
              f"gf_curves vs exact {np.max(np.abs(gf.values[k][:, 0] / exact[k] - 1)):.1e}")
        assert gap_exact < 1e-4, k
        # gf_curves (first order, error relative to ||w - w*||) is itself ~1e-3 off in s, u at the escape
        assert gap_gf < (1e-3 if k in ("mse", "loss") else 5e-3), k
    # eta = 0 keeps P = mu^2 (no variance) up to the step tolerance
    states, _ = sgd_equivalent(inst.w0, lam, ws, times, lr=0.0)
    assert np.max(np.abs(states[..., d:] - states[..., :d] ** 2)) < 1e-5 * np.max(ws**2)


def _gd(inst, lr, steps):
    lam, ws, ss = inst.lam, inst.w_star, inst.s_star
    w, k, out = inst.w0[0].copy(), 0, []
    for target in steps:
        while k < target:
            w = w - lr * population_grad(w, lam, ws, ss)
            k += 1
        out.append(w.copy())
    return metrics(np.array(out), lam, ws, ss)


def test_infinite_batch_is_population_gd():
    """``B = inf`` at ``eta = 0.05``: the DE (with the drift correction) follows population GD over
    escape and convergence, an order of magnitude closer than GF. Without the correction
    (model.md §5 verbatim) the ``eta (grad L)^2`` term alone does not: it is no closer than GF."""
    inst = make_instance(50, 1.5, 1, seed=4)
    lr, T = 0.05, 200.0
    steps = save_steps(int(T / lr), 12)
    times = steps * lr
    gd = _gd(inst, lr, steps)
    de = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, lr, batch_size=np.inf)
    spec = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, lr, batch_size=np.inf, drift=False)
    gf = gf_curves(inst.w0, inst.lam, inst.w_star, times)
    gap = {n: {k: np.max(np.abs(c.values[k][:, 0] / gd[k] - 1)) for k in ("mse", "loss")}
           for n, c in (("de", de), ("spec", spec), ("gf", gf))}
    print("\nmax relative gap to GD (lr=0.05, d=50):", gap)
    assert gap["de"]["mse"] < 1e-3 and gap["de"]["loss"] < 5e-3
    for k in ("mse", "loss"):
        assert gap["de"][k] < 0.1 * gap["gf"][k]
        assert gap["de"][k] < 0.1 * gap["spec"][k]
        assert gap["spec"][k] > 0.5 * gap["gf"][k]


def test_batch_size_orders_the_noise():
    """Larger batches inject less noise: late MSE decreases with ``B`` towards ``B = inf``."""
    inst = make_instance(30, 1.5, 1, seed=6)
    times = np.array([0.0, 10.0, 30.0])
    mse = [sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, 0.02, batch_size=B,
                         label_noise=0.5).values["mse"][-1, 0] for B in (1, 4, 1e12, np.inf)]
    assert mse[0] > mse[1] > mse[2]
    assert np.isclose(mse[2], mse[3], rtol=1e-8)


# --------------------------------------------------------------------------- against SGD

def _sgd_and_models(d, a, lr, T, replicas, seed, label_noise, per_decade=10, engine="reference"):
    inst = make_instance(d, a, replicas, seed=seed)
    n = int(round(T / lr))
    sim = simulate(inst, lr, n, save_steps(n, per_decade), engine=engine, dtype=torch.float64,
                   seed=seed, label_noise=label_noise)
    times = sim.curves.time[:, 0]
    de = sgd_de_curves(inst.w0[0], inst.lam, inst.w_star, times, lr, label_noise=label_noise)
    gf = gf_curves(inst.w0[0], inst.lam, inst.w_star, times)
    return sim.curves, de, gf, times


def _escape_window(c):
    """``[T1, 1.5 T1']`` of a model curve: from ``|u| = 0.1`` to past the last ``s = 1/3`` crossing."""
    t = c.time[:, 0]
    t1 = crossing_time(t, np.abs(c.values["u"][:, 0]), 0.1, "up")
    t1p = crossing_time(t, c.values["s"][:, 0], 1 / 3, "up", last=True)
    return (t >= t1) & (t <= 1.5 * t1p)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])
def test_sgd_median_at_paper_fig5_setting(seed):
    """Figure-5 setting (d = 300, a = 1.5, eta = 1e-3, label noise sigma = 0.05), t up to 30 (escape,
    then u ~ 0.9), 64 replicas from one init so that the median is the population median to ~1%.

    Measured (docs/results.md, "SGD deterministic equivalent"): the DE is within 0.2% of the median
    MSE at every logged time and within ~1.3% of the median loss outside the escape window
    ``[T1, 1.5 T1']``, where GF is 2-3x further off. Inside the window the mean-field closure of the
    DE cannot see the spread of escape times across replicas (the median replica escapes a few
    percent later; E[s] runs ~7% above the DE's during Phase I), and the loss, falling steeply there,
    is off by up to ~10% (seed 0; 3% for seed 2) -- GF more so. Seed 0 is the worst of seeds 0-7."""
    inst = make_instance(300, 1.5, 64, seed=seed)
    lr, T = 1e-3, 30.0
    n = int(round(T / lr))
    sim = simulate(inst, lr, n, save_steps(n, 10), engine="numba", dtype=torch.float32, seed=seed,
                   label_noise=0.05)
    times = sim.curves.time[:, 0]
    de = sgd_de_curves(inst.w0[0], inst.lam, inst.w_star, times, lr, label_noise=0.05)
    gf = gf_curves(inst.w0[0], inst.lam, inst.w_star, times)
    win = _escape_window(de)
    assert 3 <= win.sum() < len(times) // 2
    gap = {}
    for name, c in (("de", de), ("gf", gf)):
        for k in ("mse", "loss"):
            gap[name, k] = np.abs(c.values[k][:, 0] / sim.curves.median(k) - 1)
    print(f"\nseed {seed}: DE mse {gap['de', 'mse'].max():.4f}, loss outside/inside the escape "
          f"{gap['de', 'loss'][~win].max():.4f}/{gap['de', 'loss'][win].max():.4f}; GF "
          f"{gap['gf', 'mse'].max():.4f}, {gap['gf', 'loss'][~win].max():.4f}/{gap['gf', 'loss'][win].max():.4f}")
    assert gap["de", "mse"].max() < 0.01
    assert gap["de", "loss"][~win].max() < 0.025
    assert gap["de", "loss"][~win].max() < 0.8 * gap["gf", "loss"][~win].max()
    assert gap["de", "loss"][win].max() < 0.15  # the known limitation, bounded


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 4])
def test_sgd_median_at_large_learning_rate(seed):
    """eta = 1e-2 with label noise 0.5 (d = 300, a = 1.5, 16 replicas, t up to 300): GF misses the SGD
    median by 2-3% in MSE and by ~25% in loss late in training (no noise floor); the DE is 3-4x
    closer in MSE and 3-7x in loss (seeds 1-5 measured alike; docs/results.md). Near SGD's stability
    edge (eta = 2e-2, seed 0: 12 of 16 replicas diverge) the DE, a mean equation, does not predict
    the divergence of single runs."""
    sgd, de, gf, times = _sgd_and_models(300, 1.5, 1e-2, 300.0, 16, seed=seed, label_noise=0.5,
                                         engine="numba")
    late = times >= 10
    res = {}
    for name, c in (("de", de), ("gf", gf)):
        r_mse = c.values["mse"][:, 0] / sgd.median("mse")
        r_loss = c.values["loss"][:, 0] / sgd.median("loss")
        res[name] = (np.max(np.abs(r_mse - 1)), np.mean(np.abs(np.log(r_loss[late]))))
    print(f"\nmax |MSE/median - 1|, mean |log(loss/median)| (t >= 10): DE {res['de']}, GF {res['gf']}")
    assert res["de"][0] < 0.02
    assert res["gf"][0] > 2.5 * res["de"][0]
    assert res["de"][1] < 0.1
    assert res["gf"][1] > 3 * res["de"][1]


@pytest.mark.slow
def test_escape_noise_ratio_flags_where_the_de_misses_sgd():
    """The diagnostic separates the regimes: at the paper's Fig-5 setting it is small (and the DE
    tracks the median, test above); at d = 100, a = 1, eta = 1e-2 on an instance with a small
    initial overlap (u(0) ~ 2e-3) the escape is noise-driven, the ratio is large, and the DE's mean
    lags behind the SGD median by a factor ~2 in loss."""
    fig5 = make_instance(300, 1.5, 1, seed=0)
    c5 = sgd_de_curves(fig5.w0, fig5.lam, fig5.w_star, save_times(30.0, 10, 1e-3), 1e-3, label_noise=0.05)
    assert c5.info["escape_noise_ratio"][0] < 0.3
    sgd, de, gf, times = _sgd_and_models(100, 1.0, 1e-2, 100.0, 32, seed=3, label_noise=0.0, engine="numba")
    assert de.info["escape_noise_ratio"][0] > 2.0
    mid = (times >= 20) & (times <= 100)
    ratio = de.values["loss"][mid, 0] / sgd.median("loss")[mid]
    assert np.median(ratio) > 1.5
    # NaN states (a diverged curve): the ratio of the finite records before, never an error; a
    # curve with nothing finite after t = 0 has no ratio (NaN, not the 0 of its deterministic start)
    states, _ = sgd_equivalent(fig5.w0, fig5.lam, fig5.w_star, np.array([0.0, 0.1, 0.2]), 1e-3)
    r = escape_noise_ratio(states, fig5.lam, fig5.w_star)[0]
    states[2] = np.nan
    r_part = escape_noise_ratio(states, fig5.lam, fig5.w_star)[0]
    assert 0 < r_part <= r  # the max over the records before t = 0.2
    states[1] = np.nan
    assert np.isnan(escape_noise_ratio(states, fig5.lam, fig5.w_star)).all()


# --------------------------------------------------------------------------- API and speed

def test_curves_api_and_broadcasting():
    inst = make_instance(30, 1.5, 2, seed=7, per_replica_init=True)
    times = np.array([0.0, 0.5, 2.0, 8.0])
    c = sgd_de_curves(inst.w0[:1], inst.lam, inst.w_star, times, lr=[1e-3, 1e-2, 3e-2])
    assert c.model == "sgd_de" and c.n_curves == 3
    assert list(c.columns["lr"]) == [1e-3, 1e-2, 3e-2] and list(c.columns["init"]) == [0, 0, 0]
    for k in ("mse", "loss", "s", "u"):
        assert c.values[k].shape == (4, 3) and np.isfinite(c.values[k]).all()
    m0 = metrics(inst.w0[0], inst.lam, inst.w_star, inst.s_star)
    assert np.allclose(c.values["mse"][0], m0["mse"]) and np.allclose(c.values["loss"][0], m0["loss"])
    # one row per learning rate equals a run with that learning rate alone
    alone = sgd_de_curves(inst.w0[0], inst.lam, inst.w_star, times, lr=1e-2)
    assert np.allclose(alone.values["mse"][:, 0], c.values["mse"][:, 1], rtol=1e-4)
    two = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, lr=1e-2)
    assert list(two.columns["init"]) == [0, 1] and two.n_curves == 2
    states, n = sgd_equivalent(inst.w0, inst.lam, inst.w_star, times, lr=np.array([1e-3, 2e-3]))
    assert states.shape == (4, 2, 60) and n > 0
    with pytest.raises(ValueError):
        sgd_equivalent(inst.w0, inst.lam, inst.w_star, times, lr=[1e-3, 2e-3, 3e-3])
    with pytest.raises(ValueError):
        sgd_equivalent(inst.w0, inst.lam, inst.w_star, times, lr=1e-3, batch_size=0)


def test_divergence_is_reported_per_curve():
    """At eta = 0.05 (d = 30) the second moment blows up in finite time (SGD diverges there: 3 of 8
    replicas by t = 50 with this instance): that curve turns NaN, the others are unaffected."""
    inst = make_instance(30, 1.5, 1, seed=7)
    times = np.array([0.0, 0.5, 5.0, 10.0])
    c = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, lr=[1e-2, 5e-2])
    alone = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, lr=1e-2)
    assert np.isfinite(c.values["mse"][:, 0]).all()
    assert np.allclose(c.values["mse"][:, 0], alone.values["mse"][:, 0], rtol=1e-4)
    assert np.isfinite(c.values["mse"][:2, 1]).all() and np.isnan(c.values["mse"][2:, 1]).all()


def test_compiled_flow_matches_numpy_flow_everywhere():
    """The numba kernel against the numpy flow over the whole range of exponents: rates from 1e-9
    to 1e2 times h from 1e-9 to 1e4 (series, expm1 and exp branches, |z| up to 1e6), growing modes
    (A < 0), A = 0 and eta = 0, with the scalars the kernel sums while writing the state."""
    lam = np.logspace(1, -9, 700)
    rng = np.random.default_rng(11)
    ws = rng.normal(size=700) * lam ** 0.25
    ss = float(lam @ ws**2)
    mu = rng.normal(size=(4, 700)) * 0.3
    y = np.concatenate([mu, mu**2 + 0.01 * rng.random(mu.shape)], axis=1)
    lr = np.array([0.0, 1e-3, 3e-2, 0.2])
    for drift in (False, True):
        ref = DEFlow(lam, ws, ss, lr, 0.5, 0.3, drift=drift, backend="numpy")
        fast = DEFlow(lam, ws, ss, lr, 0.5, 0.3, drift=drift, backend="numba")
        c0 = ref.scalars(y)
        for c in (c0 * 1.01, np.tile(c0[:1] * [0.05, 0.02, 1, 1][:c0.shape[1]], (4, 1)),
                  np.column_stack([np.full(4, ss / 3), c0[:, 1:]])):
            for h in 10.0 ** np.arange(-9, 5):
                with np.errstate(all="ignore"):  # growing modes overflow at the largest h: inf in both
                    want, got = ref(y, c, h), fast(y, c, h)
                finite = np.isfinite(want)
                assert np.array_equal(finite, np.isfinite(got)), (drift, h)
                scale = np.abs(want[finite]).max()
                assert np.allclose(got[finite], want[finite], rtol=1e-11, atol=1e-14 * scale), (drift, h)
                if finite.all():
                    assert np.allclose(fast.scalars(got), ref.scalars(want), rtol=1e-11, atol=1e-14 * scale)


def test_compiled_and_numpy_backends_give_the_same_curves():
    """Whole DE runs (step control included) agree between backends, lr list and label noise."""
    inst = make_instance(80, 1.5, 1, seed=8)
    times = save_times(300.0, 5, 1e-2)
    a = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, [2e-3, 2e-2], label_noise=0.2, backend="numpy")
    b = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, [2e-3, 2e-2], label_noise=0.2, backend="numba")
    for k in ("mse", "loss", "s", "u"):
        assert np.allclose(a.values[k], b.values[k], rtol=1e-7, atol=0), k


def test_parallel_kernel_is_bitwise_serial(monkeypatch):
    """Blocks run on all cores or one after the other give the same bits (fixed summation order)."""
    from prtorch.theory import flows_numba
    inst, y = _state(d=900, a=2.0, seed=3, n=2)
    flow = DEFlow(inst.lam, inst.w_star, inst.s_star, np.array([1e-2, 5e-2]), 1.0, 0.0, backend="numba")
    c = flow.scalars(y) * 1.02
    outs = []
    for threshold in (1, 10**12):
        monkeypatch.setattr(flows_numba, "PARALLEL_MIN", threshold)
        flow._cache_y = None
        outs.append((flow(y, c, 0.5), flow._last_scal))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


def test_backend_without_numba(monkeypatch):
    """Without numba, "auto" falls back to numpy and "numba" says what is missing in one line."""
    import sys
    monkeypatch.setitem(sys.modules, "prtorch.theory.flows_numba", None)
    inst = make_instance(10, 1.5, 1, seed=0)
    assert DEFlow(inst.lam, inst.w_star, inst.s_star, np.array([1e-2]), 1.0, 0.0).backend == "numpy"
    with pytest.raises(ImportError, match="needs numba"):
        DEFlow(inst.lam, inst.w_star, inst.s_star, np.array([1e-2]), 1.0, 0.0, backend="numba")
    with pytest.raises(ValueError, match="backend"):
        DEFlow(inst.lam, inst.w_star, inst.s_star, np.array([1e-2]), 1.0, 0.0, backend="cuda")


def test_accurate_and_stable_at_paper_scale():
    """d = 1000, a = 2, eta = 1e-2, t to 1e5 (the paper's Figure-2 horizon; timings are in
    scripts/bench.py, not asserted here): a few hundred steps, the MSE and loss curves within 1e-4
    of the same run at rtol = 1e-8 (the default is 1e-5), and a monotone late decay (no drift or
    blow-up once the stiff tail dominates)."""
    inst = make_instance(1000, 2.0, 1, seed=0)
    times = save_times(1e5, 20, 1e-2)
    c = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, 1e-2)
    ref = sgd_de_curves(inst.w0, inst.lam, inst.w_star, times, 1e-2, rtol=1e-8)
    for k in ("mse", "loss"):
        rel = np.abs(c.values[k][:, 0] / ref.values[k][:, 0] - 1)
        assert rel.max() < 1e-4, (k, rel.max())
    late = times > 100
    assert np.all(np.diff(c.values["mse"][late, 0]) <= 0)
    assert abs(c.values["u"][-1, 0] - 1) < 1e-3 and abs(c.values["s"][-1, 0] - 1) < 1e-3
    _, n = sgd_equivalent(inst.w0, inst.lam, inst.w_star, times, 1e-2)
    assert n < 1000
