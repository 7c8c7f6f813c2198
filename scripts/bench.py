#!/usr/bin/env python
"""Throughput of the SGD engines against the naive loop, JAX and the random-number bound.

Online SGD, batch 1, ``R`` independent replicas (``S = R`` data streams, one learning rate) on the
power-law problem (``a = 1.5``). For every grid point ``d x R`` and every engine, measured in the
same process and interleaved round by round (the machine is shared, so only side-by-side ratios
mean much; medians over ``--repeats`` rounds are reported):

* ``<engine>``   : the engine fed exactly as :func:`prtorch.simulate.simulate` feeds it (same chunk
  size, ``torch.randn`` draws of ``(k, S, 1, d)``), record points left out (``<engine>+simulate``
  goes through simulate itself, one record at the end);
* ``naive``      : the per-step PyTorch loop a user would write (draw ``x``, update, per step);
* ``jax``        : the same step in a ``jax.lax.scan`` loop (``jax.random.normal`` inside), if importable;
* ``rng_bound``  : only ``torch.randn`` (in ``--dtype``, float32 by default) of the same total size, in the same chunks:
  the steps/s an exact engine would reach if drawing its normals were the only cost.

Columns: steps/s, coordinate updates/s (steps/s x R x d), ``of bound`` (median over rounds of the
method's rate / the bound's rate in the same round), speed-ups over ``naive``, the ``reference``
engine and ``jax``. On CUDA (when available) the same grid runs with the CUDA engines, the naive
loop and the CUDA randn bound. ``--torch-threads 1`` is worth trying on a busy 2-core machine:
there, 2-thread torch ops of ~1e4-1e6 elements can be 10-100x slower (OpenMP waits for a thread
that a neighbour has pre-empted), which hits the naive and reference loops.
* ``<engine>+prefetch`` (``--prefetch``): the engine fed by a background thread that draws the next
  chunk while the engine works on this one (a possible change to simulate.py; same numbers, same order).

Also times the theory integrators (gradient flow and the SGD deterministic equivalent, ``a = 2``,
``t`` to ``1e5``; compiled and numpy flows at ``d = 1000``, compiled at ``d = 1e5``, each with its
error against a ``rtol = 1e-8`` run) and, in a fresh process, the peak memory of the largest grid point.

Usage::

    python scripts/bench.py                    # full grid (a few minutes on 2 cores)
    python scripts/bench.py --quick            # < 1 min (a smoke test: short, noisy measurements)
    python scripts/bench.py --d 1000 --replicas 1 --steps 20000 --engine numba   # one point, JSON line
    python scripts/bench.py --chunk-sweep      # steps/s vs simulate's chunk size (CHUNK_ELEMENTS)
    python scripts/bench.py --theory sgd_equivalent --theory-d 100000 --theory-no-accuracy   # one integrator
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from prtorch import engines
from prtorch.problem import make_instance
from prtorch.simulate import CHUNK_ELEMENTS, simulate

GRID_D = (100, 1000, 10000)
GRID_R = (1, 16, 256)
A = 1.5
LR = 1e-2
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------- the loops being compared
def naive_sgd(W, n: int, lr: float, sqrt_lam, w_star, gen=None, label_noise: float = 0.0, draw=None):
    """``n`` online-SGD steps (batch 1) on ``W`` (``(R, d)``, in place), one fresh input per replica
    and step: the per-step PyTorch loop a user would write. ``draw(k) -> (z, xi)`` overrides the
    sampler (tests feed it the reference engine's inputs)."""
    R, d = W.shape
    step = 4.0 * lr
    for k in range(n):
        if draw is not None:
            z, xi = draw(k)
        else:
            z = torch.randn((R, d), generator=gen, device=W.device, dtype=W.dtype)
            xi = torch.randn((R,), generator=gen, device=W.device, dtype=W.dtype) if label_noise else None
        x = sqrt_lam * z
        y = (x @ w_star) ** 2
        if label_noise:
            y = y + label_noise * xi
        p = (x * W).sum(-1)
        W -= step * ((p * p - y) * p)[:, None] * x
    return W


def make_jax_sgd(sqrt_lam, w_star, lr: float, block: int, label_noise: float = 0.0, dtype="float32"):
    """A jitted ``(W, key) -> (W, key)`` doing ``block`` SGD steps in a ``lax.scan`` (ImportError
    without JAX). ``W`` is ``(R, d)``; inputs are drawn with ``jax.random.normal`` inside the loop."""
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jdt = jnp.float64 if dtype == "float64" else jnp.float32
    sl = jnp.asarray(np.asarray(sqrt_lam, dtype=np.float64), dtype=jdt)
    ws = jnp.asarray(np.asarray(w_star, dtype=np.float64), dtype=jdt)
    step = 4.0 * lr

    def body(carry, _):
        W, key = carry
        if label_noise:
            key, kz, kxi = jax.random.split(key, 3)
        else:
            key, kz = jax.random.split(key)
        x = sl * jax.random.normal(kz, W.shape, jdt)
        y = (x @ ws) ** 2
        if label_noise:
            y = y + label_noise * jax.random.normal(kxi, y.shape, jdt)
        p = jnp.sum(x * W, axis=-1)
        return (W - step * ((p * p - y) * p)[:, None] * x, key), None

    @jax.jit
    def run(W, key):
        (W, key), _ = jax.lax.scan(body, (W, key), None, length=block)
        return W, key

    return run


def jax_available() -> bool:
    try:
        import jax  # noqa: F401
        return True
    except Exception:
        return False


def engine_loop(eng, W, n: int, lr_t, sqrt_lam, w_star, gen, chunk: int, prefetch: bool = False):
    """simulate's SGD loop (batch 1, no label noise) without the record points: draw a chunk of
    ``(k, S, 1, d)`` normals with ``torch.randn`` from ``gen``, let ``eng`` step through it, repeat.

    ``prefetch=True``: a background thread draws the next chunk while the engine works on this one
    (torch.randn and the numba kernels release the GIL). Same generator, same draws in the same
    order, so the result is bit-identical to the serial loop; only the overlap differs.
    """
    S, _, d = W.shape

    def draw(k):
        return torch.randn((k, S, 1, d), generator=gen, device=W.device, dtype=W.dtype)

    sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
    if not prefetch:
        for k in sizes:
            eng.sgd_steps(W, draw(k), None, lr_t, sqrt_lam, w_star, 0.0)
        return W
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(draw, sizes[0])
        for j in range(len(sizes)):
            z = fut.result()
            if j + 1 < len(sizes):
                fut = ex.submit(draw, sizes[j + 1])
            eng.sgd_steps(W, z, None, lr_t, sqrt_lam, w_star, 0.0)
    return W


# ---------------------------------------------------------------- one measurement each
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Point:
    """One grid point: the instance, tensors and compiled JAX loop shared by all its measurements."""

    def __init__(self, d, R, device="cpu", dtype="float32", chunk_elements=CHUNK_ELEMENTS, seed=0):
        self.d, self.R, self.device, self.dtype = d, R, device, dtype
        self.tdtype = DTYPES[dtype]
        self.chunk_elements = chunk_elements
        self.inst = make_instance(d, A, R, seed=seed)
        kw = dict(device=device, dtype=self.tdtype)
        self.sqrt_lam = torch.as_tensor(self.inst.lam, **kw).sqrt()
        self.w_star = torch.as_tensor(self.inst.w_star, **kw)
        self.W0 = torch.as_tensor(self.inst.w0, **kw)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.chunk = max(1, min(4096, chunk_elements // (R * d)))  # steps per chunk, as simulate
        self._jax = None
        self.jax_compile_s = float("nan")

    # each returns steps/s
    def engine(self, name, n, prefetch=False):
        """The engine fed exactly as simulate feeds it (same chunks), records left out: a record
        point costs a few torch reductions over ``W``, independent of the engine."""
        eng = engines.load(name)
        W = self.W0[:, None, :].clone().contiguous()
        lr_t = torch.tensor([LR], dtype=self.tdtype, device=self.device)
        _sync(self.device)
        t = time.perf_counter()
        engine_loop(eng, W, n, lr_t, self.sqrt_lam, self.w_star, self.gen, self.chunk, prefetch)
        _sync(self.device)
        return n / (time.perf_counter() - t)

    def simulate(self, name, n):
        """Through :func:`prtorch.simulate.simulate` itself (one record point, at the end)."""
        res = simulate(self.inst, LR, n, np.array([n]), device=self.device, dtype=self.tdtype,
                       engine=name, seed=0, chunk_elements=self.chunk_elements)
        return n / res.wall_time

    def naive(self, n):
        W = self.W0.clone()
        _sync(self.device)
        t = time.perf_counter()
        naive_sgd(W, n, LR, self.sqrt_lam, self.w_star, self.gen)
        _sync(self.device)
        return n / (time.perf_counter() - t)

    def rng_bound(self, n):
        shape_rest = (self.R, 1, self.d)
        _sync(self.device)
        t = time.perf_counter()
        done = 0
        while done < n:
            k = min(self.chunk, n - done)
            torch.randn((k, *shape_rest), generator=self.gen, device=self.device, dtype=self.tdtype)
            done += k
        _sync(self.device)
        return n / (time.perf_counter() - t)

    def jax(self, n):
        import jax

        if self._jax is None:
            # one scan block of ~2^20 normals (or 4096 steps), called repeatedly
            self._block = max(1, min(4096, (1 << 20) // (self.R * self.d)))
            self._jax = make_jax_sgd(self.inst.lam ** 0.5, self.inst.w_star, LR, self._block, dtype=self.dtype)
            self._jW = jax.numpy.asarray(self.inst.w0, dtype=self._jax_dtype())
            self._key = jax.random.PRNGKey(0)
            t = time.perf_counter()
            W, self._key = self._jax(self._jW, self._key)
            W.block_until_ready()
            self.jax_compile_s = time.perf_counter() - t
        calls = max(1, math.ceil(n / self._block))
        W, key = self._jW, self._key
        t = time.perf_counter()
        for _ in range(calls):
            W, key = self._jax(W, key)
        W.block_until_ready()
        self._key = key
        return calls * self._block / (time.perf_counter() - t)

    def _jax_dtype(self):
        import jax.numpy as jnp
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    def run(self, method, n):
        if method == "naive":
            return self.naive(n)
        if method == "rng_bound":
            return self.rng_bound(n)
        if method == "jax":
            return self.jax(n)
        if method.endswith("+prefetch"):
            return self.engine(method[: -len("+prefetch")], n, prefetch=True)
        if method.endswith("+simulate"):
            return self.simulate(method[: -len("+simulate")], n)
        return self.engine(method, n)


def calibrate(point: Point, method: str, budget_s: float, max_steps: int = 10**7) -> int:
    """Steps that make one measurement of ``method`` last about ``budget_s``."""
    n0 = max(1, min(4096, (1 << 17) // (point.R * point.d)))
    point.run(method, n0)  # warm-up (compilation, caches)
    t = time.perf_counter()
    rate = point.run(method, n0)
    spent = time.perf_counter() - t
    if spent > budget_s:
        return n0
    return int(max(n0, min(max_steps, rate * budget_s)))


def measure_point(point: Point, methods, repeats: int, budget_s: float, log=print):
    """Median steps/s per method, and per-round ratios to the bound (interleaved rounds)."""
    n = {m: calibrate(point, m, budget_s) for m in methods}
    if str(point.device).startswith("cuda"):  # capture any CUDA graphs for these step counts now
        for m in methods:
            point.run(m, n[m])
    rates = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            rates[m].append(point.run(m, n[m]))
    med = {m: statistics.median(v) for m, v in rates.items()}
    frac = {}
    if "rng_bound" in rates:
        for m in methods:
            frac[m] = statistics.median(a / b for a, b in zip(rates[m], rates["rng_bound"]))
    return med, frac, n, rates


# ---------------------------------------------------------------- theory integrators
def _theory_call(which, inst, times, backend, rtol):
    if which == "gradient_flow":
        from prtorch.theory.gradient_flow import gradient_flow
        states, n = gradient_flow(inst.w0, inst.lam, inst.w_star, times, rtol=rtol, backend=backend)
        mse = ((states - inst.w_star) ** 2 * inst.lam).sum(-1)          # ||w - w*||_lam^2
    else:
        from prtorch.theory.sgd_equivalent import sgd_equivalent
        states, n = sgd_equivalent(inst.w0, inst.lam, inst.w_star, times, lr=LR, rtol=rtol, backend=backend)
        d = inst.lam.size
        mu, P = states[..., :d], states[..., d:]
        mse = ((P - 2 * mu * inst.w_star + inst.w_star**2) * inst.lam).sum(-1)  # E||w - w*||_lam^2
    return mse[:, 0], int(n)


def time_theory_one(which: str, backend: str = "auto", d: int = 1000, a: float = 2.0, t_end: float = 1e5,
                    accuracy: bool = True) -> dict:
    """Wall time of one theory integrator (``backend``) from the instance's init to ``t_end``
    (71 log-spaced save times), after a short warm-up call at the same ``d`` (numba's compile, cached on
    disk, is not counted). ``accuracy``: also the max relative error of the MSE curve against the same integrator
    at ``rtol = 1e-8`` (the default is ``1e-5``)."""
    inst = make_instance(d, a, 1, seed=0)
    times = np.concatenate([[0.0], np.logspace(-2, np.log10(t_end), 71)])
    name = f"theory:{which}[{backend}]"
    note = f"a={a}, t to {t_end:g}" + (f", lr={LR}" if which == "sgd_equivalent" else "")
    try:
        # warm-up / compile at the same d (from d = 1000 the compiled flows switch to their parallel
        # kernel, a separate compile of several seconds that must not be counted)
        _theory_call(which, make_instance(d, a, 1, seed=1), times[:3], backend, 1e-5)
        t = time.perf_counter()
        mse, n_steps = _theory_call(which, inst, times, backend, 1e-5)
        wall = time.perf_counter() - t
    except Exception as e:  # report, do not fail the benchmark
        return {"method": name, "d": d, "note": f"failed: {type(e).__name__}: {e}"}
    out = {"method": name, "d": d, "wall_s": wall, "integrator_steps": n_steps, "note": note}
    if accuracy:
        ref, _ = _theory_call(which, inst, times, backend, 1e-8)
        out["max_rel_err_mse"] = float(np.max(np.abs(mse - ref) / np.abs(ref)))
        out["note"] += f", max rel. MSE error vs rtol=1e-8: {out['max_rel_err_mse']:.1e}"
    return out


def time_theory(timeout_s: float, points, t_end: float = 1e5):
    """Each (integrator, backend, d) in a fresh process, killed after ``timeout_s`` (reported, not fatal)."""
    out = []
    for which, backend, d in points:
        cmd = [sys.executable, __file__, "--theory", which, "--theory-backend", backend,
               "--theory-d", str(d), "--theory-t-end", str(t_end)]
        if d > 10_000:
            cmd.append("--theory-no-accuracy")
        name = f"theory:{which}[{backend}]"
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            out.append({"method": name, "d": d,
                        "note": f"timed out after {timeout_s:g} s (a=2, t to {t_end:g}; raise --theory-timeout)"})
        except Exception as e:
            out.append({"method": name, "d": d, "note": f"failed: {type(e).__name__}: {e}"})
    return out


def theory_points(quick: bool):
    """d = 1000 with both backends (numba only if it imports); d = 1e5 compiled (full runs only)."""
    from prtorch.theory.integrate import load_kernels
    fast = load_kernels("auto") is not None
    pts = [(w, "numpy", 1000) for w in ("gradient_flow", "sgd_equivalent")]
    if fast:
        pts += [(w, "numba", 1000) for w in ("gradient_flow", "sgd_equivalent")]
        if not quick:
            pts += [(w, "numba", 100_000) for w in ("gradient_flow", "sgd_equivalent")]
    return pts


# ---------------------------------------------------------------- drivers
def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include a parent's peak,
    as Linux keeps it across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def single_point(args) -> dict:
    eng = args.engine
    if eng == "auto":
        eng = engines.resolve("auto", args.device)
    base = eng.split("+")[0]
    if base not in ("naive", "jax", "rng_bound"):
        engines.resolve(base, args.device)
        if base == "numba":
            engines.load("numba").warmup((DTYPES[args.dtype],))
    p = Point(args.d, args.replicas, args.device, args.dtype, args.chunk_elements)
    rss0 = peak_rss_mb()
    p.run(eng, max(1, min(args.steps, p.chunk)))  # warm-up
    rate = p.run(eng, args.steps)
    bound = p.rng_bound(args.steps) if args.with_bound else None
    out = {"engine": eng, "device": args.device, "dtype": args.dtype, "d": args.d, "replicas": args.replicas,
           "steps": args.steps, "chunk_steps": p.chunk, "steps_per_second": rate,
           "coord_updates_per_second": rate * args.d * args.replicas,
           "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_before_run": rss0,
           "chunk_mb": p.chunk * args.replicas * args.d * p.W0.element_size() / 2**20}
    if bound is not None:
        out["rng_bound_steps_per_second"] = bound
        out["frac_of_rng_bound"] = rate / bound
    return out


def run_grid(args):
    t_start = time.perf_counter()
    quick = args.quick
    repeats = args.repeats or 3
    budget = args.budget or (0.03 if quick else 0.3)
    grid_d = args.grid_d or GRID_D
    grid_r = args.grid_r or GRID_R
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    have_jax = jax_available() and not args.no_jax
    rows = []
    nthr = ""
    if engines.available("numba"):
        import numba
        nthr = f"{numba.get_num_threads()} numba threads ({numba.config.THREADING_LAYER}), "
    print(f"# bench: torch {torch.__version__}, {torch.get_num_threads()} torch threads, {nthr}"
          f"{os.cpu_count()} cpus, dtype {args.dtype}, chunk_elements {args.chunk_elements}, "
          f"repeats {repeats}, ~{budget}s per measurement, load average {os.getloadavg()[0]:.1f}")
    if not have_jax:
        print("# jax: not importable (pip install 'prtorch[bench]' / jax) -> JAX column skipped")
    for dev in devices:
        eng_names = [e for e, (_, devs) in engines.ENGINES.items() if dev in devs and engines.available(e)]
        if "numba" in eng_names:
            t = time.perf_counter()
            engines.load("numba").warmup((DTYPES[args.dtype],))
            print(f"# numba warm-up (compile or cache load): {time.perf_counter() - t:.2f} s")
        fast = [e for e in eng_names if e != "reference"]
        methods = ["rng_bound", *eng_names, "naive"]
        if args.prefetch and dev == "cpu":
            methods += [f"{e}+prefetch" for e in fast]
        if have_jax and dev == "cpu":
            methods.append("jax")
        print(f"\n## device {dev}: methods {methods}")
        hdr = (f"{'d':>6} {'R':>4} {'method':>16} {'steps/s':>11} {'coord upd/s':>11} {'of bound':>8} "
               f"{'x naive':>8} {'x ref':>7} {'x jax':>7}")
        print(hdr)
        for d in grid_d:
            for R in grid_r:
                p = Point(d, R, dev, args.dtype, args.chunk_elements)
                med, frac, n, _ = measure_point(p, methods, repeats, budget)
                for m in methods:
                    row = {"device": dev, "dtype": args.dtype, "d": d, "R": R, "method": m,
                           "steps_per_s": med[m], "coord_updates_per_s": med[m] * d * R,
                           "frac_of_rng_bound": frac.get(m, float("nan")),
                           "speedup_vs_naive": med[m] / med["naive"],
                           "speedup_vs_reference": med[m] / med["reference"] if "reference" in med else float("nan"),
                           "speedup_vs_jax": med[m] / med["jax"] if "jax" in med else float("nan"),
                           "steps_per_measurement": n[m], "repeats": repeats, "chunk_steps": p.chunk,
                           "note": f"jax compile {p.jax_compile_s:.2f}s" if m == "jax" else ""}
                    rows.append(row)
                    print(f"{d:>6} {R:>4} {m:>16} {med[m]:>11.4g} {med[m] * d * R:>11.4g} "
                          f"{row['frac_of_rng_bound']:>8.2f} {row['speedup_vs_naive']:>8.2f} "
                          f"{row['speedup_vs_reference']:>7.2f} {row['speedup_vs_jax']:>7.2f}",
                          flush=True)
    print("\n## theory integrators (a=2, t to 1e5, fresh process each, numba compile not counted)")
    for r in time_theory(args.theory_timeout or (30 if quick else 180), theory_points(quick)):
        print(f"{r['method']:>32} d={r['d']:<7}: "
              + (f"{r['wall_s']:.2f} s, {r['integrator_steps']} steps, " if "wall_s" in r else "") + r["note"])
        rows.append({"device": "cpu", "dtype": "float64", "d": r["d"], "R": 1, "method": r["method"],
                     "steps_per_s": float("nan"), "coord_updates_per_s": float("nan"),
                     "frac_of_rng_bound": float("nan"), "speedup_vs_naive": float("nan"),
                     "speedup_vs_reference": float("nan"),
                     "speedup_vs_jax": float("nan"), "steps_per_measurement": r.get("integrator_steps", ""),
                     "repeats": 1, "chunk_steps": "", "note": f"wall_s={r.get('wall_s', float('nan')):.3f}; {r['note']}"})
    # peak memory of the largest point, in a fresh process so nothing else is counted
    dmax, rmax = max(grid_d), max(grid_r)
    best = engines.resolve("auto", "cpu")
    mem = None
    if not args.no_memory:
        cmd = [sys.executable, __file__, "--d", str(dmax), "--replicas", str(rmax), "--steps", "8",
               "--engine", best, "--dtype", args.dtype, "--chunk-elements", str(args.chunk_elements)]
        try:
            outp = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
            mem = json.loads(outp.strip().splitlines()[-1])
            print(f"\n## peak memory, d={dmax} R={rmax} engine={best} (fresh process): "
                  f"max RSS {mem['peak_rss_mb']:.0f} MiB (after imports {mem['peak_rss_mb_before_run']:.0f} MiB; "
                  f"one chunk of normals {mem['chunk_mb']:.1f} MiB)")
            rows.append({"device": "cpu", "dtype": args.dtype, "d": dmax, "R": rmax, "method": f"peak_rss:{best}",
                         "steps_per_s": mem["steps_per_second"], "coord_updates_per_s": mem["coord_updates_per_second"],
                         "frac_of_rng_bound": float("nan"), "speedup_vs_naive": float("nan"),
                         "speedup_vs_reference": float("nan"),
                         "speedup_vs_jax": float("nan"), "steps_per_measurement": 8, "repeats": 1,
                         "chunk_steps": mem["chunk_steps"],
                         "note": f"peak_rss_mb={mem['peak_rss_mb']:.1f}; after_imports_mb={mem['peak_rss_mb_before_run']:.1f}"})
        except Exception as e:
            print(f"\n## peak memory: failed ({e})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n# wrote {out} ({len(rows)} rows) in {time.perf_counter() - t_start:.0f} s")
    head = [r for r in rows if r["device"] == "cpu" and r["d"] == 1000 and r["R"] == 1 and r["method"] == best]
    summary = {"csv": str(out), "wall_s": time.perf_counter() - t_start, "engine": best,
               "load_average_end": os.getloadavg()[0]}
    if head:
        summary.update(steps_per_second=head[0]["steps_per_s"], d=1000, replicas=1,
                       speedup_vs_naive=head[0]["speedup_vs_naive"],
                       speedup_vs_reference=head[0]["speedup_vs_reference"],
                       speedup_vs_jax=head[0]["speedup_vs_jax"],
                       frac_of_rng_bound=head[0]["frac_of_rng_bound"])
    if mem:
        summary["peak_rss_mb_largest_point"] = mem["peak_rss_mb"]
    print(json.dumps(summary))


def chunk_sweep(args):
    """steps/s of the fast engine through simulate() for several chunk sizes, interleaved."""
    best = engines.resolve("auto", "cpu")
    if best == "numba":
        engines.load("numba").warmup((DTYPES[args.dtype],))
    sizes = [1 << k for k in (15, 16, 17, 18, 19, 20, 21, 22)]
    points = [(100, 1), (100, 16), (1000, 1), (1000, 16), (1000, 256), (10000, 1), (10000, 16), (10000, 256)]
    repeats = args.repeats or 5
    budget = args.budget or 0.2
    rows = []
    print(f"# chunk sweep, engine {best}, {repeats} interleaved rounds; cells: steps/s (fraction of the randn bound at 2^21)")
    print(f"{'d':>6} {'R':>4} " + " ".join(f"{'2^%d' % int(math.log2(c)):>13}" for c in sizes))
    for d, R in points:
        ps = {c: Point(d, R, "cpu", args.dtype, c) for c in sizes}
        n = calibrate(ps[1 << 21], best, budget)
        ref = Point(d, R, "cpu", args.dtype, 1 << 21)
        rates = {c: [] for c in sizes}
        bounds = []
        for _ in range(repeats):
            bounds.append(ref.rng_bound(n))
            for c in sizes:
                rates[c].append(ps[c].run(best, n))
        b = statistics.median(bounds)
        med = {c: statistics.median(v) for c, v in rates.items()}
        print(f"{d:>6} {R:>4} " + " ".join(f"{med[c]:>8.3g}({med[c] / b:.2f})" for c in sizes), flush=True)
        for c in sizes:
            rows.append({"d": d, "R": R, "chunk_elements": c, "steps_per_s": med[c], "rel_to_bound_2_21": med[c] / b})
    # overall: geometric mean over points of steps/s relative to each point's best chunk
    score = {c: float(np.exp(np.mean([np.log(r["steps_per_s"] / max(q["steps_per_s"] for q in rows
                                                                      if q["d"] == r["d"] and q["R"] == r["R"]))
                                      for r in rows if r["chunk_elements"] == c]))) for c in sizes}
    print("score (geo-mean of steps/s relative to each point's best): "
          + " ".join(f"2^{int(math.log2(c))}={s:.3f}" for c, s in score.items()))
    out = Path(args.out).with_name("chunk_sweep.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bestc = max(score, key=score.get)
    print(json.dumps({"csv": str(out), "best_chunk_elements": bestc, "score": {str(k): v for k, v in score.items()}}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, help="one grid point: dimension")
    ap.add_argument("--replicas", type=int, default=1, help="one grid point: replicas R")
    ap.add_argument("--steps", type=int, default=None, help="one grid point: SGD steps to time")
    ap.add_argument("--engine", default="auto",
                    help="one grid point: an engine name, auto, naive, jax, rng_bound, <engine>+prefetch "
                         "or <engine>+simulate")
    ap.add_argument("--with-bound", action="store_true", help="one grid point: also time the randn bound")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--chunk-elements", type=int, default=CHUNK_ELEMENTS)
    ap.add_argument("--quick", action="store_true", help="short grid run (< 1 min)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per point (median)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--grid-d", type=int, nargs="*", default=None)
    ap.add_argument("--grid-r", type=int, nargs="*", default=None)
    ap.add_argument("--prefetch", action="store_true", help="also time <engine>+prefetch (overlapped randn)")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--chunk-sweep", action="store_true")
    ap.add_argument("--theory", choices=["gradient_flow", "sgd_equivalent"], help="time one theory integrator")
    ap.add_argument("--theory-backend", default="auto", choices=["auto", "numba", "numpy"])
    ap.add_argument("--theory-d", type=int, default=1000)
    ap.add_argument("--theory-no-accuracy", action="store_true", help="skip the rtol=1e-8 reference run")
    ap.add_argument("--theory-t-end", type=float, default=1e5)
    ap.add_argument("--theory-timeout", type=float, default=None, help="seconds per integrator (default 180, quick 30)")
    ap.add_argument("--out", default="outputs/bench/bench.csv")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--numba-threads", type=int, default=None, help="numba.set_num_threads (default: leave)")
    args = ap.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.numba_threads and engines.available("numba"):
        import numba
        numba.set_num_threads(args.numba_threads)
    if args.theory:
        print(json.dumps(time_theory_one(args.theory, args.theory_backend, args.theory_d,
                                         t_end=args.theory_t_end, accuracy=not args.theory_no_accuracy)))
    elif args.d is not None:
        if args.steps is None:
            args.steps = max(1, int(2e7 // (args.d * args.replicas)))
        print(json.dumps(single_point(args)))
    elif args.chunk_sweep:
        chunk_sweep(args)
    else:
        run_grid(args)


if __name__ == "__main__":
    main()
