"""Engines: how SGD / GD steps are executed. All engines share one interface and one input stream.

An engine provides ``sgd_steps(W, z, xi, lr, sqrt_lam, w_star, label_noise)`` (advance ``W`` of
shape ``(S, L, d)`` in place over the ``K`` pre-drawn samples of a chunk) and
``gd_steps(W, n, lr, lam, w_star, s_star)``. Because every engine consumes the same chunks of
random numbers (:mod:`prtorch.simulate` draws them), engines can be compared sample for sample.

Available: ``reference`` (the textbook per-step loop, any device), ``numba`` (the same steps
compiled with numba, CPU; needs the optional ``numba``) and ``cuda_graph`` (the reference steps
captured in a CUDA graph and replayed per chunk; not chosen by ``auto`` until verified on a GPU).
Optional engines register themselves in :data:`ENGINES` and are imported lazily, so the core needs
only torch and numpy.
"""
from __future__ import annotations

import importlib

# name -> (module, devices it runs on)
ENGINES = {
    "reference": ("prtorch.engines.reference", ("cpu", "cuda")),
    "numba": ("prtorch.engines.numba_cpu", ("cpu",)),
    "cuda_graph": ("prtorch.engines.cuda_graph", ("cuda",)),
}

# ``auto``: the first available engine of this list that runs on the device
AUTO_ORDER = ("numba", "reference")


def available(name: str) -> bool:
    try:
        load(name)
        return True
    except ImportError:
        return False


def load(name: str):
    """The engine module called ``name`` (ImportError if its optional dependency is missing)."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r}: expected one of {['auto', *ENGINES]}")
    return importlib.import_module(ENGINES[name][0])


def resolve(name: str, device: str) -> str:
    """``auto`` -> the fastest exact engine available for ``device``; else check the choice."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if name == "auto":
        for cand in AUTO_ORDER:
            if kind in ENGINES[cand][1] and available(cand):
                return cand
        return "reference"
    if name not in ENGINES:
        raise ValueError(f"engine={name!r}: expected one of {['auto', *ENGINES]}")
    if kind not in ENGINES[name][1]:
        raise ValueError(f"engine={name!r} does not run on device={device!r} (runs on {ENGINES[name][1]})")
    return name
