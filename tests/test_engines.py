"""Engines agree with the reference loop; the benchmark's comparison loops simulate the same SGD.

No timings are asserted here (scripts/bench.py measures speed).
"""
import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prtorch import engines
from prtorch.engines import reference
from prtorch.model import metrics
from prtorch.problem import make_instance
from prtorch.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
try:
    from prtorch.engines import numba_cpu
except ImportError:  # numba missing: its tests skip, the others still run
    numba_cpu = None
needs_numba = pytest.mark.skipif(numba_cpu is None, reason="numba not installed")


def _bench():
    spec = importlib.util.spec_from_file_location("prtorch_bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _problem(d, S, L, dtype, seed=0, a=1.5):
    inst = make_instance(d, a, S, seed=seed, per_replica_init=True)
    kw = dict(dtype=dtype)
    lam = torch.as_tensor(inst.lam, **kw)
    W0 = torch.as_tensor(inst.w0, **kw)[:, None, :].repeat(1, L, 1).contiguous()
    return inst, lam, lam.sqrt(), torch.as_tensor(inst.w_star, **kw), W0


TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
LRS = [0.01, 0.004, 0.02, 0.007]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,L,B,d,K,noise,parallel", [
    (1, 1, 1, 40, 200, 0.0, False),
    (3, 2, 4, 50, 80, 0.1, False),
    (1, 4, 1, 64, 100, 0.05, True),     # fewer streams than threads: split by learning rate
    (6, 1, 3, 17, 60, 0.0, True),       # split by stream
    (5, 3, 2, 33, 50, 0.2, True),
    (2, 1, 1, 1, 30, 0.0, False),       # d = 1
])
@needs_numba
def test_numba_sgd_matches_reference(dtype, S, L, B, d, K, noise, parallel, monkeypatch):
    if parallel:  # force a multi-block plan whatever the machine's thread count
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(numba_cpu, "PARALLEL", "1")
        monkeypatch.setattr(numba_cpu, "_threads", lambda: 3)
        assert numba_cpu.plan_tasks(S, L, 1).shape[0] > 1
    _, _, sqrt_lam, w_star, W0 = _problem(d, S, L, dtype, seed=S + d)
    W0 = 0.5 * W0  # off the target even at d = 1
    g = torch.Generator().manual_seed(7)
    lr = torch.tensor(LRS[:L], dtype=dtype)
    z = torch.randn((K, S, B, d), generator=g, dtype=dtype)
    xi = torch.randn((K, S, B), generator=g, dtype=dtype) if noise else None
    W_ref, W_nb = W0.clone(), W0.clone()
    reference.sgd_steps(W_ref, z, xi, lr, sqrt_lam, w_star, noise)
    out = numba_cpu.sgd_steps(W_nb, z, xi, lr, sqrt_lam, w_star, noise)
    assert out is W_nb
    assert (W_ref - W0).abs().max() > 1e-2  # the steps did something
    torch.testing.assert_close(W_nb, W_ref, **TOL[dtype])


@needs_numba
def test_numba_noise_is_used_and_empty_chunk_is_noop():
    _, _, sqrt_lam, w_star, W0 = _problem(20, 2, 1, torch.float64)
    g = torch.Generator().manual_seed(1)
    z = torch.randn((20, 2, 1, 20), generator=g, dtype=torch.float64)
    xi = torch.randn((20, 2, 1), generator=g, dtype=torch.float64)
    lr = torch.tensor([0.01], dtype=torch.float64)
    a, b = W0.clone(), W0.clone()
    numba_cpu.sgd_steps(a, z, xi, lr, sqrt_lam, w_star, 0.5)
    numba_cpu.sgd_steps(b, z, None, lr, sqrt_lam, w_star, 0.0)
    assert (a - b).abs().max() > 1e-4
    c = W0.clone()
    numba_cpu.sgd_steps(c, z[:0], xi[:0], lr, sqrt_lam, w_star, 0.5)
    assert torch.equal(c, W0)


@needs_numba
def test_numba_updates_strided_weights_in_place():
    _, _, sqrt_lam, w_star, W0 = _problem(24, 3, 2, torch.float32)
    W_nc = W0.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not W_nc.is_contiguous()
    g = torch.Generator().manual_seed(3)
    z = torch.randn((30, 3, 1, 24), generator=g)
    lr = torch.tensor([0.01, 0.02])
    W_ref = W0.clone()
    reference.sgd_steps(W_ref, z, None, lr, sqrt_lam, w_star, 0.0)
    numba_cpu.sgd_steps(W_nc, z, None, lr, sqrt_lam, w_star, 0.0)
    torch.testing.assert_close(W_nc, W_ref, **TOL[torch.float32])


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parallel", [False, True])
def test_numba_gd_matches_reference(dtype, parallel, monkeypatch):
    if parallel:
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(numba_cpu, "_threads", lambda: 3)
    inst, lam, _, w_star, W0 = _problem(60, 2, 3, dtype, a=2.0)
    lr = torch.tensor([0.02, 0.05, 0.1], dtype=dtype)
    W_ref, W_nb = W0.clone(), W0.clone()
    reference.gd_steps(W_ref, 400, lr, lam, w_star, inst.s_star)
    numba_cpu.gd_steps(W_nb, 400, lr, lam, w_star, inst.s_star)
    assert (W_ref - W0).abs().max() > 1e-2
    torch.testing.assert_close(W_nb, W_ref, **TOL[dtype])


@needs_numba
@pytest.mark.parametrize("S,L,threads", [(1, 1, 2), (1, 7, 2), (2, 3, 2), (16, 1, 2), (5, 4, 8), (300, 2, 2)])
def test_plan_tasks_covers_every_replica_once(S, L, threads, monkeypatch):
    monkeypatch.setattr(numba_cpu, "PARALLEL", "1")
    tasks = numba_cpu.plan_tasks(S, L, 1 << 30, threads=threads)
    seen = np.zeros((S, L), dtype=int)
    for s0, s1, l0, l1 in tasks:
        seen[s0:s1, l0:l1] += 1
    assert (seen == 1).all()
    assert (tasks.shape[0] > 1) == (S * L > 1)
    assert numba_cpu.plan_tasks(S, L, 10, threads=threads).shape[0] == 1  # too little work
    monkeypatch.setattr(numba_cpu, "PARALLEL", "0")
    assert numba_cpu.plan_tasks(S, L, 1 << 30, threads=threads).shape[0] == 1


@needs_numba
def test_plan_tasks_auto_policy(monkeypatch):
    monkeypatch.setattr(numba_cpu, "PARALLEL", "auto")
    assert numba_cpu.plan_tasks(64, 1, 1 << 30, threads=2).shape[0] == 1   # one lr: serial
    assert numba_cpu.plan_tasks(64, 4, 1 << 30, threads=2).shape[0] > 1    # shared draws: split
    assert numba_cpu.plan_tasks(64, 4, 1 << 30, threads=1).shape[0] == 1


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulate_numba_equals_reference(dtype):
    inst = make_instance(40, 1.5, 3, seed=11, per_replica_init=True)
    rec = np.array([0, 10, 100, 1000, 3000])
    kw = dict(lr=[0.01, 0.005], n_steps=3000, record_steps=rec, batch_size=2, label_noise=0.05,
              seed=4, dtype=dtype, chunk_elements=1 << 12)
    ref = simulate(inst, engine="reference", **kw)
    nb = simulate(inst, engine="numba", **kw)
    assert (ref.engine, nb.engine) == ("reference", "numba")
    tol = dict(rtol=1e-3, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    for m in ("mse", "loss", "s", "u"):
        np.testing.assert_allclose(nb.curves.values[m], ref.curves.values[m], **tol, err_msg=m)
    assert np.isfinite(ref.curves.values["loss"]).all()
    assert ref.curves.values["loss"][-1].max() < 0.9 * ref.curves.values["loss"][0].min()


@needs_numba
def test_simulate_gd_numba_equals_reference():
    inst = make_instance(100, 2.0, 1, seed=2)
    kw = dict(lr=[0.01, 0.03], n_steps=5000, record_steps=np.array([0, 100, 5000]), algorithm="gd",
              dtype=torch.float64)
    ref = simulate(inst, engine="reference", **kw)
    nb = simulate(inst, engine="numba", **kw)
    for m in ("mse", "loss", "s", "u"):
        np.testing.assert_allclose(nb.curves.values[m], ref.curves.values[m], rtol=1e-9, atol=1e-12)


def test_auto_prefers_numba_and_falls_back_without_it(monkeypatch):
    assert engines.resolve("auto", "cpu") == ("numba" if numba_cpu is not None else "reference")
    assert engines.resolve("auto", "cuda") == "reference"
    with pytest.raises(ValueError):
        engines.resolve("numba", "cuda")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "prtorch.engines.numba_cpu", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("prtorch.engines.numba_cpu")
    assert not engines.available("numba")
    assert engines.resolve("auto", "cpu") == "reference"
    inst = make_instance(10, 1.5, 1, seed=0)
    res = simulate(inst, 0.01, 20, np.array([0, 20]), engine="auto")
    assert res.engine == "reference"


# ------------------------------------------------------------------ the benchmark's loops
def test_naive_loop_matches_reference_on_the_same_inputs():
    bench = _bench()
    for dtype in (torch.float32, torch.float64):
        _, _, sqrt_lam, w_star, W0 = _problem(30, 4, 1, dtype)
        g = torch.Generator().manual_seed(9)
        z = torch.randn((300, 4, 1, 30), generator=g, dtype=dtype)
        xi = torch.randn((300, 4, 1), generator=g, dtype=dtype)
        W_ref = W0.clone()
        reference.sgd_steps(W_ref, z, xi, torch.tensor([0.01], dtype=dtype), sqrt_lam, w_star, 0.1)
        W_nv = W0[:, 0].clone()
        bench.naive_sgd(W_nv, 300, 0.01, sqrt_lam, w_star, label_noise=0.1,
                        draw=lambda k: (z[k, :, 0], xi[k, :, 0]))
        torch.testing.assert_close(W_nv, W_ref[:, 0], **TOL[dtype])


@needs_numba
def test_prefetch_loop_is_bit_identical_to_the_serial_loop():
    bench = _bench()
    _, _, sqrt_lam, w_star, W0 = _problem(50, 3, 1, torch.float32)
    lr = torch.tensor([0.01])
    a = W0.clone()
    bench.engine_loop(numba_cpu, a, 250, lr, sqrt_lam, w_star, torch.Generator().manual_seed(1), 64, prefetch=True)
    b = W0.clone()
    g = torch.Generator().manual_seed(1)
    for k in (64, 64, 64, 58):
        numba_cpu.sgd_steps(b, torch.randn((k, 3, 1, 50), generator=g), None, lr, sqrt_lam, w_star, 0.0)
    assert torch.equal(a, b)


def _final_losses(inst, W):
    lam = torch.as_tensor(inst.lam)
    return metrics(torch.as_tensor(np.array(W), dtype=torch.float64), lam,
                   torch.as_tensor(inst.w_star), inst.s_star)["loss"].numpy()


@pytest.mark.slow
def test_naive_and_jax_loops_give_the_reference_sgd_curve():
    """Different random streams, same SGD: mean final loss over 200 runs agrees within 4 s.e.
    (lr halved moves it by ~30 s.e., so the check has teeth)."""
    bench = _bench()
    d, R, n, lr = 30, 200, 1000, 0.01
    inst = make_instance(d, 1.5, R, seed=3)
    ref = simulate(inst, lr, n, np.array([n]), engine="reference", seed=1)
    a = _final_losses(inst, ref.extra["state"].W.reshape(R, d))
    sqrt_lam = torch.as_tensor(inst.lam, dtype=torch.float32).sqrt()
    w_star = torch.as_tensor(inst.w_star, dtype=torch.float32)
    loops = {}
    W = torch.as_tensor(inst.w0, dtype=torch.float32).clone()
    loops["naive"] = bench.naive_sgd(W, n, lr, sqrt_lam, w_star, torch.Generator().manual_seed(5))
    if bench.jax_available():
        import jax
        import jax.numpy as jnp
        run = bench.make_jax_sgd(inst.lam ** 0.5, inst.w_star, lr, n)
        loops["jax"], _ = run(jnp.asarray(inst.w0, dtype=jnp.float32), jax.random.PRNGKey(0))
    assert np.log(a.mean() / _final_losses(inst, inst.w0).mean()) < -0.5  # training made progress
    for name, Wl in loops.items():
        b = _final_losses(inst, Wl)
        se = np.sqrt(a.var() / R + b.var() / R)
        assert np.isfinite(b).all(), name
        assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean(), b.mean(), se)


# ------------------------------------------------------------------ CUDA graph engine
def test_cuda_graph_pieces_and_registration():
    from prtorch.engines import cuda_graph

    for n in (1, 2, 3, 13, 64, 100, 4095, 4096):
        p = cuda_graph._pieces(n)
        assert sum(p) == n and p == sorted(p, reverse=True) and all(q & (q - 1) == 0 for q in p)
        assert len(p) == len(set(p))
    assert engines.resolve("cuda_graph", "cuda") == "cuda_graph"
    with pytest.raises(ValueError):
        engines.resolve("cuda_graph", "cpu")
    with pytest.raises(ValueError):
        cuda_graph.sgd_steps(torch.zeros(1, 1, 3), torch.zeros(2, 1, 1, 3), None, torch.zeros(1),
                             torch.ones(3), torch.ones(3), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("S,L,B,d,K,noise", [(1, 1, 1, 40, 13, 0.0), (3, 2, 4, 50, 100, 0.1), (8, 3, 1, 300, 64, 0.0)])
def test_cuda_graph_matches_reference(dtype, S, L, B, d, K, noise):
    from prtorch.engines import cuda_graph

    dev = "cuda"
    _, lam, sqrt_lam, w_star, W0 = _problem(d, S, L, dtype, seed=d)
    lam, sqrt_lam, w_star, W0 = (t.to(dev) for t in (lam, sqrt_lam, w_star, 0.5 * W0))
    g = torch.Generator(device=dev).manual_seed(7)
    lr = torch.tensor(LRS[:L], dtype=dtype, device=dev)
    W_ref, W_cg = W0.clone(), W0.clone()
    for k in (K, K, 5):  # repeated and shorter chunks reuse the captured graphs
        z = torch.randn((k, S, B, d), generator=g, dtype=dtype, device=dev)
        xi = torch.randn((k, S, B), generator=g, dtype=dtype, device=dev) if noise else None
        reference.sgd_steps(W_ref, z, xi, lr, sqrt_lam, w_star, noise)
        cuda_graph.sgd_steps(W_cg, z, xi, lr, sqrt_lam, w_star, noise)
    assert (W_ref - W0).abs().max() > 1e-2
    torch.testing.assert_close(W_cg, W_ref, **TOL[dtype])
    W_ref, W_cg = W0.clone(), W0.clone()
    reference.gd_steps(W_ref, 37, lr, lam, w_star, 1.0)
    cuda_graph.gd_steps(W_cg, 37, lr, lam, w_star, 1.0)
    torch.testing.assert_close(W_cg, W_ref, **TOL[dtype])


@pytest.mark.gpu
def test_simulate_cuda_graph_equals_reference_on_cuda():
    inst = make_instance(64, 1.5, 4, seed=5, per_replica_init=True)
    kw = dict(lr=[0.01, 0.005], n_steps=2000, record_steps=np.array([0, 10, 300, 2000]), batch_size=2,
              label_noise=0.05, seed=4, device="cuda", dtype=torch.float32, chunk_elements=1 << 14)
    ref = simulate(inst, engine="reference", **kw)
    cg = simulate(inst, engine="cuda_graph", **kw)
    for m in ("mse", "loss", "s", "u"):
        np.testing.assert_allclose(cg.curves.values[m], ref.curves.values[m], rtol=1e-4, atol=1e-6)
