"""CUDA-graph engine: the reference steps, captured once and replayed per chunk (CUDA only).

On a GPU the reference loop is bound by launch overhead (~8 small kernels per step). This engine
records :func:`prtorch.engines.reference.sgd_steps` over ``n`` steps into a CUDA graph and replays
it, so a chunk costs one graph launch. The kernels are the reference's own, on the same inputs, so
the results are the reference's (same device), up to cuBLAS choosing another algorithm inside a
capture.

Static shapes: a graph reads fixed input buffers. Chunks of any length ``K`` are run as the binary
decomposition of ``K`` (graphs of 1, 2, 4, ... steps, at most ``log2(K) + 1`` of them per shape),
so the short last chunk before a record point does not trigger a new capture. Per chunk the
inputs are copied into the graph's buffers (device to device, a few microseconds) and ``W`` is
copied in and out. Graphs are cached per (shape, dtype, device, batch, label noise).

Not in ``resolve("auto", "cuda")`` until its tests (``-m gpu``) have passed on a GPU.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from prtorch.engines import reference

MAX_CACHED = 4  # problem shapes kept (each holds up to ~13 graphs and 2 chunks of input buffers)


def _check(*ts):
    for t in ts:
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"engine='cuda_graph' runs on CUDA tensors; got one on {t.device}")


class _Captured:
    """Static buffers of one problem shape and the graphs (by number of steps) that read them."""

    def __init__(self, kind, W, vecs, extra):
        self.kind = kind                                  # "sgd" or "gd"
        self.W = torch.empty_like(W, memory_format=torch.contiguous_format)
        self.vecs = [torch.empty_like(v) for v in vecs]  # lr, sqrt_lam / lam, w_star
        self.extra = extra                                # (B, d, S, has_noise, noise) or s_star
        self.graphs = {}                                  # n -> (graph, z buffer, xi buffer)

    def load(self, W, vecs):
        self.W.copy_(W)
        for buf, v in zip(self.vecs, vecs):
            buf.copy_(v)

    def _body(self, W, n, z, xi):
        if self.kind == "sgd":
            lr, sqrt_lam, w_star = self.vecs
            reference.sgd_steps(W, z, xi, lr, sqrt_lam, w_star, self.extra[4])
        else:
            lr, lam, w_star = self.vecs
            reference.gd_steps(W, n, lr, lam, w_star, self.extra)

    def graph(self, n: int):
        if n in self.graphs:
            return self.graphs[n]
        z = xi = None
        if self.kind == "sgd":
            B, d, S, has_noise, _ = self.extra
            z = torch.zeros((n, S, B, d), dtype=self.W.dtype, device=self.W.device)
            xi = torch.zeros((n, S, B), dtype=self.W.dtype, device=self.W.device) if has_noise else None
        # warm up on a side stream (cuBLAS handles, workspaces), on a copy: W must not move
        side = torch.cuda.Stream(device=self.W.device)
        side.wait_stream(torch.cuda.current_stream(self.W.device))
        with torch.cuda.stream(side):
            self._body(self.W.clone(), 1, None if z is None else z[:1], None if xi is None else xi[:1])
        torch.cuda.current_stream(self.W.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body(self.W, n, z, xi)  # recorded, not run
        self.graphs[n] = (g, z, xi)
        return self.graphs[n]


_cache: "OrderedDict[tuple, _Captured]" = OrderedDict()


def _get(key, make) -> _Captured:
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    c = _cache[key] = make()
    while len(_cache) > MAX_CACHED:
        _cache.popitem(last=False)
    return c


def _pieces(n: int):
    """``n`` as a sum of powers of two, largest first: 13 -> 8, 4, 1."""
    return [1 << j for j in reversed(range(n.bit_length())) if n >> j & 1]


def sgd_steps(W, z, xi, lr, sqrt_lam, w_star, label_noise: float):
    """Advance ``W`` (``(S, L, d)``, in place) over the chunk ``z`` (``(K, S, B, d)``); see reference."""
    has_noise = xi is not None
    _check(W, z, xi, lr, sqrt_lam, w_star)
    K, S, B, d = z.shape
    if K == 0:
        return W
    noise = float(label_noise)
    key = ("sgd", tuple(W.shape), W.dtype, W.device, B, has_noise, noise if has_noise else 0.0)
    vecs = (lr.to(W.dtype), sqrt_lam.to(W.dtype), w_star.to(W.dtype))
    c = _get(key, lambda: _Captured("sgd", W, vecs, (B, d, S, has_noise, noise)))
    c.load(W, vecs)
    off = 0
    for n in _pieces(K):
        g, zb, xib = c.graph(n)
        zb.copy_(z[off:off + n])
        if has_noise:
            xib.copy_(xi[off:off + n])
        g.replay()
        off += n
    W.copy_(c.W)
    return W


def gd_steps(W, n: int, lr, lam, w_star, s_star):
    """``n`` steps of population GD on ``W`` (``(S, L, d)``, in place); see reference."""
    _check(W, lr, lam, w_star)
    n = int(n)
    if n <= 0:
        return W
    key = ("gd", tuple(W.shape), W.dtype, W.device, float(s_star))
    vecs = (lr.to(W.dtype), lam.to(W.dtype), w_star.to(W.dtype))
    c = _get(key, lambda: _Captured("gd", W, vecs, float(s_star)))
    c.load(W, vecs)
    for m in _pieces(n):
        c.graph(m)[0].replay()
    W.copy_(c.W)
    return W
