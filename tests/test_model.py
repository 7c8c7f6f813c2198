"""Closed forms of the model (model.md §1-2) against Monte Carlo and autograd."""
import numpy as np
import pytest
import torch

from prtorch.model import QuadraticNeuron, metrics, param_mse, population_grad, population_loss, summary_stats
from prtorch.problem import make_instance, power_law_spectrum


@pytest.mark.parametrize("a", [0.0, 0.5, 1.5, 4.0])
def test_spectrum_is_normalised_power_law(a):
    lam = power_law_spectrum(50, a)
    assert lam.sum() == pytest.approx(1.0, rel=1e-12)
    assert lam[0] / lam[9] == pytest.approx(10.0**a, rel=1e-12)


def test_target_normalisations_and_init():
    inst = make_instance(200, 1.5, 4, seed=3, target="sigma")
    assert inst.s_star == pytest.approx(1.0, rel=1e-12)
    assert np.allclose(np.linalg.norm(inst.w0, axis=1), 1.0)
    assert np.all(inst.w0 == inst.w0[0])  # shared init by default
    assert np.sum(inst.lam * inst.w0[0] * inst.w_star) >= 0  # sign convention u(0) >= 0
    inst = make_instance(200, 1.5, 4, seed=3, target="sqrt_d", init="gaussian", init_norm=2.0, per_replica_init=True)
    assert np.linalg.norm(inst.w_star) == pytest.approx(np.sqrt(200), rel=1e-12)
    assert not np.allclose(inst.w0[0], inst.w0[1])
    assert np.mean(np.sum(inst.w0**2, 1)) == pytest.approx(4.0, rel=0.2)  # E||w0||^2 = norm^2


def test_population_loss_matches_monte_carlo():
    torch.manual_seed(0)
    inst = make_instance(20, 1.0, 1, seed=1)
    w = torch.as_tensor(inst.w0[0] * 0.7 + 0.3 * inst.w_star)
    lam, ws = torch.as_tensor(inst.lam), torch.as_tensor(inst.w_star)
    x = torch.randn(2_000_000, 20, dtype=torch.float64) * lam.sqrt()
    err = ((x @ w) ** 2 - (x @ ws) ** 2) ** 2
    s, u = summary_stats(w, lam, ws)
    L = population_loss(s, u, inst.s_star)
    se = err.std() / np.sqrt(len(err))
    assert abs(err.mean() - L) < 4 * se
    # gradient: E[4 (f - y) p x] against the closed form, coordinate-wise within 4 standard errors
    p = x @ w
    g = 4 * (p**2 - (x @ ws) ** 2)[:, None] * p[:, None] * x
    g_cf = population_grad(w, lam, ws, inst.s_star)
    se = g.std(0) / np.sqrt(len(g))
    assert torch.all((g.mean(0) - g_cf).abs() < 4 * se + 1e-12)


def test_closed_forms_match_autograd_and_module():
    inst = make_instance(30, 2.0, 3, seed=2, per_replica_init=True)
    model = QuadraticNeuron(torch.as_tensor(inst.w0), inst.lam, inst.w_star)
    L = model.population_loss()
    L.sum().backward()
    assert torch.allclose(model.w.grad, model.population_grad().detach(), rtol=1e-10, atol=1e-12)
    # forward: <x, w_r>^2 for a batch of inputs, one per replica
    x = torch.randn(5, 3, 30, dtype=torch.float64)
    assert torch.allclose(model(x), torch.einsum("nrd,rd->nr", x, model.w.detach()) ** 2)
    s2, u2, ss2 = model.moments(2)
    lam = torch.as_tensor(inst.lam)
    assert torch.allclose(s2, (lam**2 * model.w**2).sum(-1))
    assert torch.allclose(ss2, (lam**2 * model.w_star**2).sum())


def test_mse_is_sign_invariant_and_zero_at_target():
    inst = make_instance(10, 1.5, 1, seed=0)
    ws = torch.as_tensor(inst.w_star)
    assert float(param_mse(ws, ws)) == pytest.approx(0.0, abs=1e-12)
    assert float(param_mse(-ws, ws)) == pytest.approx(0.0, abs=1e-12)
    w = torch.as_tensor(inst.w0[0])
    direct = min(((w - ws) ** 2).sum(), ((w + ws) ** 2).sum()) / 10
    assert float(param_mse(w, ws)) == pytest.approx(float(direct), rel=1e-12)
    m = metrics(ws, torch.as_tensor(inst.lam), ws, inst.s_star)
    assert float(m["loss"]) == pytest.approx(0.0, abs=1e-12)


def test_stable_loss_equals_closed_form_and_stays_positive_near_optimum():
    from prtorch.model import stable_loss

    inst = make_instance(40, 1.5, 1, seed=5)
    lam, ws = inst.lam, inst.w_star
    w = inst.w0[0]
    s, u = summary_stats(w, lam, ws)
    assert stable_loss(w, lam, ws, inst.s_star) == pytest.approx(population_loss(s, u, inst.s_star), rel=1e-12)
    # near w*, L ~ 4 s* q (q = e^T Q e): the stable form keeps every digit, the expanded one cannot
    e = 1e-9 * np.random.default_rng(0).standard_normal(40)
    q = float(np.sum(lam * e**2))
    L = stable_loss(-(ws + e), lam, ws, inst.s_star)  # sign invariant too
    assert L > 0 and L == pytest.approx(4 * inst.s_star * q, rel=1e-6)
