"""Fast exact CPU engine: the reference loop compiled with numba, one fused pass per sample.

Same interface, same input chunks and (to floating-point rounding) the same results as
:mod:`prtorch.engines.reference`. Importing this module raises ``ImportError`` when numba is missing,
so :func:`prtorch.engines.resolve` falls back to the reference engine.

Where the time goes. Per SGD step and replica the exact dynamics must consume ``B * d`` fresh normals
(drawn by :mod:`prtorch.simulate` with ``torch.randn``, about 5 ns each on the CPU) and do ~3 flops
per coordinate. The torch loop pays ~20 dispatches per step instead (70-80 us at ``d = 1e3``); this
engine streams through the chunk once per sample, with everything else in L1, so the engine costs a
small fraction of drawing the chunk and a run goes at close to the random-number bound.

Per stream ``s`` and step ``k``, for each sample ``b``: one pass computes ``x = sqrt(lambda) * z``,
``v = <x, w*>`` and ``p_l = <x, W[s, l]>`` (labels ``y = v^2 + sigma xi``); a second pass applies
``W[s, l] -= (4 lr_l / B) sum_b (p_lb^2 - y_b) p_lb x_b``. Steps are the outer loop and streams the
inner one, so the chunk is read front to back. Streams never interact, so when threads pay (see
``PARALLEL`` below) the chunk is split across them by stream (or by learning rate when there are
fewer streams than threads), with a single parallel region per chunk, not per step.

Kernels are compiled on first use per dtype and cached on disk (``cache=True``); :func:`warmup`
compiles or loads them up front so a timed run does not pay for it.

Floating point: reductions are reassociated (vectorised, several partial sums) but not allowed to
assume finite values, so a diverging replica still turns into inf/NaN and is caught by the simulator.
Accumulation is in the dtype of ``W`` (float32 or float64), like the reference.
"""
from __future__ import annotations

import functools
import os

import numba  # noqa: F401  (ImportError here -> engine unavailable)
import numpy as np
import torch
from numba import njit, prange

# reassoc lets LLVM vectorise the dot products; no 'nnan'/'ninf', divergence must stay visible
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_OPTS = dict(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", boundscheck=False)

# Threads. The normals are drawn serially by torch.randn (~5 ns each); with one learning rate per
# stream the serial kernel costs ~10% of that, so two threads could save at most ~5% and, measured
# on a shared 2-core box, saved nothing. With L >= 2 learning rates sharing each stream's draws the
# kernel does L times the work per normal, and splitting it pays. PRTORCH_NUMBA_PARALLEL=0 / 1
# forces serial / parallel (the latter whenever there are >= 2 replicas and enough work).
PARALLEL = os.environ.get("PRTORCH_NUMBA_PARALLEL", "auto").strip().lower()
PARALLEL_MIN_L = 2             # learning rates per stream before threads are used ("auto")
PARALLEL_MIN_WORK = 1 << 16    # coordinate updates per chunk below which waking the pool costs more


@njit(**_OPTS)
def _sgd_block(W, z, xi, has_noise, noise, step, sl, ws, s0, s1, l0, l1):
    """Advance ``W[s0:s1, l0:l1]`` over the chunk (serial; one call per parallel task).

    Steps outermost, streams inside: consecutive samples ``z[k, s0:s1]`` are contiguous in memory,
    so the chunk is read front to back (prefetch-friendly) whatever the number of streams.
    """
    K = z.shape[0]
    B = z.shape[2]
    d = z.shape[3]
    nl = l1 - l0
    zero = np.zeros(1, dtype=W.dtype)[0]  # 0 in W's dtype (keeps float32 arithmetic float32)
    y = np.empty(B, dtype=W.dtype)
    p = np.empty((nl, B), dtype=W.dtype)
    x = np.empty(d, dtype=W.dtype)
    for k in range(K):
        for s in range(s0, s1):
            for b in range(B):
                zb = z[k, s, b]
                w0 = W[s, l0]
                v = zero
                p0 = zero
                # fused pass: x = sqrt(lam) z, v = <x, w*>, p = <x, W[s, l0]>
                for i in range(d):
                    xv = sl[i] * zb[i]
                    v += xv * ws[i]
                    p0 += xv * w0[i]
                if has_noise:
                    y[b] = v * v + noise * xi[k, s, b]
                else:
                    y[b] = v * v
                p[0, b] = p0
                for j in range(1, nl):
                    wl = W[s, l0 + j]
                    q = zero
                    for i in range(d):
                        q += (sl[i] * zb[i]) * wl[i]
                    p[j, b] = q
            for j in range(nl):
                wl = W[s, l0 + j]
                st = step[l0 + j]
                if B == 1:
                    pb = p[j, 0]
                    c = st * ((pb * pb - y[0]) * pb)
                    zb = z[k, s, 0]
                    for i in range(d):
                        wl[i] -= c * (sl[i] * zb[i])
                else:
                    # sum over the batch first (as the reference does), then one update of W
                    for i in range(d):
                        x[i] = zero
                    for b in range(B):
                        pb = p[j, b]
                        c = (pb * pb - y[b]) * pb
                        zb = z[k, s, b]
                        for i in range(d):
                            x[i] += c * (sl[i] * zb[i])
                    for i in range(d):
                        wl[i] -= st * x[i]


def _sgd_tasks_py(W, z, xi, has_noise, noise, step, sl, ws, tasks):
    """Run the blocks ``tasks[t] = (s0, s1, l0, l1)`` (disjoint; in parallel when compiled so)."""
    for t in prange(tasks.shape[0]):
        _sgd_block(W, z, xi, has_noise, noise, step, sl, ws,
                   tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3])


def _gd_py(W, n, lr, lam, ws, consts):
    # consts = (0, 12, 4 s*, 8) in W's dtype, so float32 arithmetic stays float32
    S = W.shape[0]
    L = W.shape[1]
    d = W.shape[2]
    for r in prange(S * L):
        s = r // L
        l = r - s * L
        w = W[s, l]
        eta = lr[l]
        for _ in range(n):
            su = consts[0]
            uu = consts[0]
            for i in range(d):
                lw = lam[i] * w[i]
                su += lw * w[i]
                uu += lw * ws[i]
            a = eta * (consts[1] * su - consts[2])
            c = eta * (consts[3] * uu)
            for i in range(d):
                w[i] -= lam[i] * (a * w[i] - c * ws[i])


_sgd_ser = njit(parallel=False, **_OPTS)(_sgd_tasks_py)
_sgd_par = njit(parallel=True, **_OPTS)(_sgd_tasks_py)
_gd_ser = njit(parallel=False, **_OPTS)(_gd_py)
_gd_par = njit(parallel=True, **_OPTS)(_gd_py)


def _threads() -> int:
    try:
        return int(numba.get_num_threads())
    except Exception:  # pragma: no cover
        return 1


def _vec(t, dtype) -> np.ndarray:
    """A 1-D C-contiguous numpy array of ``t`` (a CPU tensor) in ``dtype`` (a view when possible)."""
    if t.device.type != "cpu":
        raise ValueError(f"engine='numba' runs on the CPU; got a tensor on {t.device}")
    if t.dtype != dtype:
        t = t.to(dtype)
    a = t.detach().numpy().reshape(-1)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _work_on(W: torch.Tensor):
    """A numpy view of ``W`` to update in place (a contiguous copy if ``W`` is strided)."""
    if W.device.type != "cpu":
        raise ValueError(f"engine='numba' runs on the CPU; W is on {W.device}")
    if W.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"engine='numba' supports float32 and float64, got {W.dtype}")
    if W.is_contiguous():
        return W.detach().numpy(), None
    Wc = W.detach().contiguous()
    return Wc.numpy(), Wc


def _split(n: int, parts: int):
    edges = np.linspace(0, n, parts + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@functools.lru_cache(maxsize=256)
def _plan(S: int, L: int, parallel: bool, threads: int) -> np.ndarray:
    if not parallel:
        return np.array([[0, S, 0, L]], dtype=np.int64)
    parts = 4 * threads
    if S >= threads:
        blocks = [(a, b, 0, L) for a, b in _split(S, min(S, parts))]
    else:
        blocks = [(s, s + 1, a, b) for s in range(S) for a, b in _split(L, min(L, max(1, parts // S)))]
    return np.array(blocks, dtype=np.int64)


def plan_tasks(S: int, L: int, work: int, threads: int | None = None) -> np.ndarray:
    """Disjoint blocks ``(s0, s1, l0, l1)`` of ``W`` for the SGD kernel; one block means serial.

    Parallel only with >= 2 threads, >= 2 replicas, enough work per chunk to pay for waking the
    pool and (policy "auto") >= ``PARALLEL_MIN_L`` learning rates per stream. Split by stream when
    there are at least as many streams as threads (each stream's inputs are then read by one
    thread only), else by learning rate. A few blocks per thread, handed out dynamically, keep
    both cores busy when a neighbour steals one for a while.
    """
    threads = _threads() if threads is None else threads
    parallel = threads >= 2 and work >= PARALLEL_MIN_WORK and S * L >= 2
    if PARALLEL in ("0", "false", "no", "off"):
        parallel = False
    elif PARALLEL not in ("1", "true", "yes", "on"):
        parallel = parallel and L >= PARALLEL_MIN_L
    return _plan(S, L, parallel, threads if parallel else 1)


def sgd_steps(W, z, xi, lr, sqrt_lam, w_star, label_noise: float):
    """Advance ``W`` (``(S, L, d)``, in place) over the chunk ``z`` (``(K, S, B, d)``); see reference."""
    Wn, Wc = _work_on(W)
    tdt = W.dtype
    if z.device.type != "cpu":
        raise ValueError(f"engine='numba' runs on the CPU; z is on {z.device}")
    zn = z.detach().to(tdt).numpy()
    if not zn.flags.c_contiguous:
        zn = np.ascontiguousarray(zn)
    K, S, B, d = zn.shape
    L = Wn.shape[1]
    if Wn.shape[0] != S or Wn.shape[2] != d:
        raise ValueError(f"W {tuple(Wn.shape)} does not match z {tuple(zn.shape)}")
    dt = Wn.dtype
    has_noise = xi is not None and label_noise != 0.0
    if has_noise:
        if xi.device.type != "cpu":
            raise ValueError(f"engine='numba' runs on the CPU; xi is on {xi.device}")
        xin = xi.detach().to(tdt).numpy()
        if xin.shape != (K, S, B):
            raise ValueError(f"xi {xin.shape} does not match z {zn.shape}")
        if not xin.flags.c_contiguous:
            xin = np.ascontiguousarray(xin)
    else:
        xin = _DUMMY[dt.char]
    # (4 / B) * lr rounded in W's dtype, as the reference computes it
    step = _vec(lr, tdt) * dt.type(4.0 / B)
    if step.shape[0] != L:
        raise ValueError(f"lr has {step.shape[0]} entries, W has L={L}")
    if K > 0:
        tasks = plan_tasks(S, L, K * S * B * d * L)
        args = (Wn, zn, xin, has_noise, dt.type(label_noise), step, _vec(sqrt_lam, tdt),
                _vec(w_star, tdt), tasks)
        if tasks.shape[0] == 1:
            _sgd_ser(*args)
        else:
            with numba.parallel_chunksize(1):
                _sgd_par(*args)
    if Wc is not None:
        W.copy_(Wc)
    return W


_DUMMY = {np.dtype(np.float32).char: np.zeros((1, 1, 1), np.float32),
          np.dtype(np.float64).char: np.zeros((1, 1, 1), np.float64)}


def gd_steps(W, n: int, lr, lam, w_star, s_star):
    """``n`` steps of population GD on ``W`` (``(S, L, d)``, in place); see reference."""
    Wn, Wc = _work_on(W)
    dt = Wn.dtype
    tdt = W.dtype
    S, L, d = Wn.shape
    lr_n = _vec(lr, tdt)
    if lr_n.shape[0] != L:
        raise ValueError(f"lr has {lr_n.shape[0]} entries, W has L={L}")
    consts = np.array([0.0, 12.0, 4.0 * float(s_star), 8.0], dtype=dt)
    args = (Wn, int(n), lr_n, _vec(lam, tdt), _vec(w_star, tdt), consts)
    if n > 0:
        # no random numbers here, so threads pay whenever there is enough work
        if (_threads() >= 2 and S * L >= 2 and n * S * L * d >= PARALLEL_MIN_WORK
                and PARALLEL not in ("0", "false", "no", "off")):
            with numba.parallel_chunksize(1):
                _gd_par(*args)
        else:
            _gd_ser(*args)
    if Wc is not None:
        W.copy_(Wc)
    return W


def warmup(dtypes=(torch.float32, torch.float64)) -> None:
    """Compile (or load from numba's on-disk cache) every kernel for ``dtypes`` on tiny inputs."""
    for dt in dtypes:
        kw = dict(dtype=dt)
        d = 4
        sl, ws = torch.ones(d, **kw), torch.ones(d, **kw)
        for S, L, B in ((1, 1, 1), (2, 1, 2)):
            W = torch.zeros(S, L, d, **kw)
            z = torch.zeros(1, S, B, d, **kw)
            lr = torch.zeros(L, **kw)
            xin = torch.zeros(1, S, B, **kw)
            tasks = np.array([[0, S, 0, L]], dtype=np.int64)
            for kern in (_sgd_ser, _sgd_par):
                for noise in (False, True):
                    kern(W.numpy(), z.numpy(), xin.numpy(), noise, W.numpy().dtype.type(0.1),
                         lr.numpy(), sl.numpy(), ws.numpy(), tasks)
            for kern in (_gd_ser, _gd_par):
                kern(W.numpy(), 1, lr.numpy(), sl.numpy(), ws.numpy(), np.zeros(4, W.numpy().dtype))
