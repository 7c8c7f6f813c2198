"""The exact GF integrator against small-step population GD over the whole horizon (model.md §4)."""
import time

import numpy as np
import pytest

from prtorch.model import metrics, population_grad
from prtorch.problem import make_instance
from prtorch.record import save_times
from prtorch.theory.gradient_flow import gf_curves, gradient_flow


def gd_numpy(w0, lam, ws, eta, times):
    """Population GD, recording at times (multiples of eta)."""
    s_star = float(np.sum(lam * ws**2))
    w = w0.copy()
    out, k = [], 0
    for t in times:
        n = int(round(t / eta))
        while k < n:
            w = w - eta * population_grad(w, lam, ws, s_star)
            k += 1
        out.append(w.copy())
    return np.array(out)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("a", [1.5, 2.0])
def test_gf_matches_richardson_extrapolated_gd_to_late_times(a, backend):
    d = 40
    inst = make_instance(d, a, 1, seed=4)
    # horizon reaches deep into Phase III (MSE falls by orders of magnitude)
    times = np.array([0.0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 400])
    eta = 4e-3
    g1 = gd_numpy(inst.w0[0], inst.lam, inst.w_star, eta, times)
    g2 = gd_numpy(inst.w0[0], inst.lam, inst.w_star, eta / 2, times)
    ref = 2 * g2 - g1  # GD error is O(eta): Richardson removes it
    gf, n_steps = gradient_flow(inst.w0[0], inst.lam, inst.w_star, times, backend=backend)
    m_ref = metrics(ref, inst.lam, inst.w_star, inst.s_star)
    m_gf = metrics(gf[:, 0], inst.lam, inst.w_star, inst.s_star)
    assert m_ref["mse"][-1] < 2e-2 * m_ref["mse"][0]  # the test does reach the tail
    for k in ("mse", "loss"):
        rel = np.abs(m_gf[k] / m_ref[k] - 1)
        print(k, rel.max())
        assert rel.max() < 2e-3, (k, rel)
    assert np.abs(m_gf["u"] - m_ref["u"]).max() < 2e-3
    assert n_steps < 2000


def test_gf_stable_and_fast_at_paper_scale():
    """d = 1000, a = 2, t to 1e5 (the paper's Figure 2 took 1e7 GD steps): a few hundred steps."""
    inst = make_instance(1000, 2.0, 1, seed=0)
    times = save_times(1e5, 20, 1e-2)
    t0 = time.perf_counter()
    gf, n_steps = gradient_flow(inst.w0[0], inst.lam, inst.w_star, times)
    elapsed = time.perf_counter() - t0
    m = metrics(gf[:, 0], inst.lam, inst.w_star, inst.s_star)
    assert np.all(np.isfinite(m["mse"]))
    assert np.all(np.diff(m["mse"][-60:]) <= 1e-12)  # monotone decay late, no drift or blow-up
    assert abs(m["u"][-1] - 1) < 1e-3 and abs(m["s"][-1] - 1) < 1e-3
    assert n_steps < 1500
    print(f"GF d=1000 a=2 t=1e5: {n_steps} steps, {elapsed:.2f} s")


def test_gf_batched_inits_equal_single():
    inst = make_instance(50, 1.5, 3, seed=1, per_replica_init=True)
    times = np.array([0.0, 1.0, 10.0, 100.0])
    batched, _ = gradient_flow(inst.w0, inst.lam, inst.w_star, times)
    single, _ = gradient_flow(inst.w0[2], inst.lam, inst.w_star, times)
    # each trajectory is integrated to the same tolerance (steps are shared across the batch)
    assert np.abs(batched[:, 2] - single[:, 0]).max() < 1e-4
    assert np.abs(batched[:, 0] - single[:, 0]).max() > 1e-2  # and the inits really differ


@pytest.mark.parametrize("times,msg", [([0.0, 5.0, 1.0, 2.0], "increasing"), ([1.0, 2.0, 5.0], "start at 0"),
                                       ([0.0, -1.0], "increasing"), ([0.0, np.nan, 1.0], "finite"),
                                       ([0.0, 0.0, 1.0], "increasing")])
def test_integrators_reject_bad_times(times, msg):
    from prtorch.theory.sgd_equivalent import sgd_de_curves

    inst = make_instance(20, 1.5, 1, seed=0)
    with pytest.raises(ValueError, match=msg):
        gf_curves(inst.w0[0], inst.lam, inst.w_star, times)
    with pytest.raises(ValueError, match=msg):
        sgd_de_curves(inst.w0[0], inst.lam, inst.w_star, times, 1e-3)
