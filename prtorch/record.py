"""When to record, what a recorded curve is, and how files are written (atomically).

* :func:`save_steps` - the log-spaced grid of steps at which a run records (plus step 0 and the end).
* :class:`Curves` - one container for measured and predicted trajectories: times and metrics of
  shape ``(T, R)`` (``R`` replicas or theory curves), NaN where a curve has no point.
* ``atomic_*`` - every file is written to a temporary file in the same folder and renamed, so a crash
  never leaves a truncated file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METRICS = ("mse", "loss", "s", "u")


def save_steps(n_steps: int, per_decade: int) -> np.ndarray:
    """Integer steps ``0, 1, ..., n_steps`` spaced ``per_decade`` per decade (unique, sorted)."""
    if n_steps <= 0:
        return np.array([0], dtype=np.int64)
    n = max(2, int(np.ceil(np.log10(n_steps) * per_decade)) + 1)
    steps = np.unique(np.round(np.logspace(0, np.log10(n_steps), n)).astype(np.int64))
    return np.concatenate([[0], steps[(steps > 0) & (steps < n_steps)], [n_steps]])


def save_times(t_end: float, per_decade: int, t_min: float) -> np.ndarray:
    """Times ``0`` and log-spaced from ``t_min`` to ``t_end`` (for the theory curves)."""
    if t_min >= t_end:  # a single step (t_end = lr): just the start and the end
        return np.array([0.0, float(t_end)])
    n = max(2, int(np.ceil(np.log10(t_end / t_min) * per_decade)) + 1)
    return np.concatenate([[0.0], np.unique(np.logspace(np.log10(t_min), np.log10(t_end), n))])


@dataclass
class Curves:
    """Trajectories of ``R`` curves at ``T`` record points.

    time: (T, R) times (``t = lr * step`` for engines); values: metric -> (T, R) arrays;
    columns: per-curve labels (e.g. ``replica``, ``lr``) -> (R,) arrays; model: the source label;
    info: per-curve diagnostics of a model (name -> (R,) array; kept out of the CSV files).
    """

    model: str
    time: np.ndarray
    values: dict
    columns: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def n_curves(self) -> int:
        return self.time.shape[1]

    def subset(self, sel) -> "Curves":
        """The curves selected by ``sel`` (a bool mask or indices over the ``R`` curves)."""
        return Curves(self.model, self.time[:, sel], {k: v[:, sel] for k, v in self.values.items()},
                      {k: np.asarray(v)[sel] for k, v in self.columns.items()},
                      {k: np.asarray(v)[sel] for k, v in self.info.items()})

    def lr_mask(self, lr) -> np.ndarray:
        """``(R,)`` bool: the curves at learning rate ``lr`` (all of them if ``lr`` is None or the
        curves have no ``lr`` column, e.g. gradient flow)."""
        if lr is None or "lr" not in self.columns:
            return np.ones(self.n_curves, dtype=bool)
        return np.isclose(np.asarray(self.columns["lr"], dtype=float), lr, rtol=1e-12, atol=0)

    def at_lr(self, lr) -> "Curves":
        """:meth:`subset` of the curves at learning rate ``lr`` (see :meth:`lr_mask`)."""
        return self.subset(self.lr_mask(lr))

    def median(self, metric: str, mask=None) -> np.ndarray:
        v = self.values[metric] if mask is None else self.values[metric][:, mask]
        with np.errstate(all="ignore"):
            return np.nanmedian(v, axis=1) if np.isfinite(v).any() else np.full(v.shape[0], np.nan)

    def rows(self, extra: dict | None = None):
        """Long format: one dict per (record point, curve) with a finite time."""
        T, R = self.time.shape
        for k in range(T):
            for r in range(R):
                t = self.time[k, r]
                if not np.isfinite(t):
                    continue
                row = dict(extra or {})
                for c, v in self.columns.items():
                    row[c] = _py(v[r] if np.ndim(v) == 1 else v[k, r])
                row["time"] = float(t)
                for m, v in self.values.items():
                    row[m] = float(v[k, r])
                yield row


def _py(x):
    return x.item() if hasattr(x, "item") else x


def _atomic_write(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _finite_or_none(obj):
    """``obj`` with every non-finite float (NaN: not measured, inf) as None, recursively."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path, obj) -> None:
    """Strict JSON (readable by any parser): NaN and inf are written as ``null``."""
    obj = _finite_or_none(json.loads(json.dumps(obj, default=_json_default, allow_nan=True)))
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_savez(path, **arrays) -> None:
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_csv(path, rows, fieldnames) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (_fmt(v)) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _fmt(v):
    if isinstance(v, float):
        return repr(v)
    return v


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_csv(path) -> dict:
    """A CSV as columns: float arrays where every non-empty entry is a number (empty -> NaN), else str."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        col = [r.get(k) or "" for r in rows]
        try:
            out[k] = np.array([float(x) if x != "" else np.nan for x in col])
        except ValueError:
            out[k] = np.array(col)
    return out


def curves_from_columns(cols: dict, model: str, key: str = "replica") -> Curves:
    """Inverse of :meth:`Curves.rows` for one model: pivot long-format columns back to (T, R)."""
    ids = np.unique(cols[key])
    per = [np.flatnonzero(cols[key] == i) for i in ids]
    T = max(len(p) for p in per)
    time = np.full((T, len(ids)), np.nan)
    values = {m: np.full((T, len(ids)), np.nan) for m in METRICS if m in cols}
    columns = {key: ids}
    for c in ("lr",):
        if c in cols:
            columns[c] = np.array([cols[c][p[0]] for p in per])
    for r, p in enumerate(per):
        time[: len(p), r] = cols["time"][p]
        for m in values:
            values[m][: len(p), r] = cols[m][p]
    return Curves(model, time, values, columns)
