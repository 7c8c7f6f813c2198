"""``prtorch-analyze`` (also ``python -m prtorch.analyze``): figures and tables from finished runs.

    prtorch-analyze outputs/multirun/fig3_small            # -> outputs/multirun/fig3_small/analysis/
    prtorch-analyze outputs/runs/experiment=fig2_small --out /tmp/fig2
    prtorch-analyze outputs/multirun/init_small --by init.norm
    prtorch-analyze --wandb ENTITY/PROJECT [--group SWEEP] --out DIR   # pull runs from W&B first

It reads only the files a run writes (``summary.json``, ``metrics.csv``, ``theory.csv``,
``instance.npz``; W&B is never needed), finds every run below the given folder (every folder
holding a ``summary.json``; ``superseded/``, ``wandb/`` and ``.hydra/`` are skipped) and groups the
runs by *sweep point*: the config keys that differ between runs (``seed`` excluded: runs that differ
only in their seed are pooled into one point). A run whose ``optim.lr`` is a list (learning rates as a
replica axis) is split into one point per learning rate; its phases and exponents are the run's own per-lr
report (``summary.json`` ``per_lr``), or, for runs written before it existed, measured again per
learning rate from ``metrics.csv`` and ``instance.npz``.

Writes into ``--out`` (default ``<dir>/analysis``):

* ``points/<point>.png``  per sweep point: MSE, loss, ``1 - |u|``, ``u``, ``s`` with replicas (thin),
  their median (bold), gradient flow and the SGD deterministic equivalent (dashed/dotted), the
  Phase-III linearisation from the gradient-flow state at the measured ``T2`` (dash-dot), the measured
  phase times (dotted verticals) and a panel of measured-vs-predicted numbers;
* ``sweep_<metric>.png``  the medians of every point on one axis (one panel per value of a second
  swept key), gradient flow dashed in the same colour;
* ``sweep_phases.png``, ``sweep_exponents.png``, ``escape_vs_tail.png``: measured (median, 95% CI)
  against predicted phase times and exponents as functions of the swept key (``escape_vs_tail``:
  escape time, Phase-III slope and the MSE left at the end, side by side);
* ``phase3.png``: ``1 - MSE(T2 + tau)/MSE(T2)`` against ``tau`` for every point, with the linearisation
  and the slope ``1/a`` over the fit window;
* ``phases.csv``, ``exponents.csv``: one row per sweep point, ``<name>_value``, ``_ci_low``,
  ``_ci_high``, ``_n``, ``_predicted`` and the extras of each entry (model values ``<name>_gf``, bounds,
  candidate laws ``<name>_cand_*``, ``mse_tail_drop_phase3_linearisation``: the slope of the
  linearisation over the same window); ``points.csv``: status, wall time, steps/s, final metrics (at
  ``final_time``), the replica spread of the final MSE and of ``1 - |u|`` after ``2 T2``, and the largest
  relative gap of the median MSE to each theory curve and to the Phase-III linearisation;
* ``report.md``: the tables and every figure.

Several runs in one point (seeds): each seed is its own problem instance (``w*``, ``w(0)``), so the
point figure draws every seed apart (its median and its own theory curves, one colour per seed; the
Phase-III curve and its gap are those of the first seed); a phase or exponent is the median of the
runs' values, its interval the envelope of the runs' intervals. Bad input (no such folder, no run inside) prints one line on
stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prtorch.plots import PHASE_LABEL  # matplotlib itself is imported lazily there
from prtorch.record import METRICS, Curves

PROG = "prtorch-analyze"
# config keys that never define a sweep point
IGNORED = ("logger", "paths", "force", "sweep_name", "train.progress", "train.checkpoint_every", "seed")
SHORT = {"data.a": "a", "data.d": "d", "optim.lr": "lr", "optim.batch_size": "B", "optim.algorithm": "alg",
         "data.label_noise": "noise", "data.target": "target", "init.norm": "init.norm",
         "init.kind": "init.kind", "replicas": "R", "train.time": "t_end", "name": "preset"}
# which swept key is the x axis of the scalar plots / the colour of the curve plots (first present wins)
X_PRIORITY = ("data.a", "data.d", "optim.lr", "optim.batch_size", "init.norm", "data.label_noise")
COLOUR_PRIORITY = ("data.d", "optim.lr", "optim.batch_size", "init.norm", "data.a", "data.label_noise")
PHASES = ("T1", "T1_prime", "T2")
EXPONENTS = ("rho", "mse_tail_drop", "one_minus_u", "loss_tail", "tail_mass")
EXP_LABEL = {"rho": "Phase I growth rate rho", "mse_tail_drop": "Phase III: MSE-drop exponent (1/a)",
             "one_minus_u": "Phase IIb: decay exponent of 1-|u|", "loss_tail": "Phase III: loss decay exponent",
             "tail_mass": "tail-mass exponent of w*"}
THEORY_MODELS = ("gf", "sgd_de", "phase3")


class AnalyzeError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------
# reading runs

def read_table(path) -> dict:
    """A CSV as columns (see :func:`prtorch.record.read_csv`)."""
    from prtorch.record import read_csv

    return read_csv(path)


def _pivot(cols: dict, model: str, keys: tuple, sel=None) -> Curves | None:
    """Long-format columns -> :class:`Curves`, one curve per distinct tuple of ``keys``."""
    idx = np.arange(len(cols["time"])) if sel is None else np.flatnonzero(sel)
    if idx.size == 0:
        return None
    keys = [k for k in keys if k in cols and np.issubdtype(np.asarray(cols[k]).dtype, np.number)
            and np.isfinite(cols[k][idx]).any()]
    ids = [tuple(float(cols[k][i]) for k in keys) for i in idx]
    uniq = list(dict.fromkeys(ids))
    per = {u: [] for u in uniq}
    for i, key in zip(idx, ids):
        per[key].append(i)
    T = max(len(p) for p in per.values())
    R = len(uniq)
    time = np.full((T, R), np.nan)
    values = {m: np.full((T, R), np.nan) for m in METRICS if m in cols}
    for r, u in enumerate(uniq):
        p = np.asarray(per[u])
        time[: len(p), r] = cols["time"][p]
        for m in values:
            values[m][: len(p), r] = cols[m][p]
    columns = {k: np.array([u[j] for u in uniq]) for j, k in enumerate(keys)}
    return Curves(model, time, values, columns)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = tuple(v)
        else:
            out[key] = v
    return out


def _lrs(cfg_flat: dict) -> list:
    lr = cfg_flat.get("optim.lr")
    if lr is None:
        return []
    return [float(x) for x in (lr if isinstance(lr, (list, tuple)) else [lr])]


@dataclass
class Run:
    path: Path
    summary: dict
    cfg: dict                     # flattened config
    _measured: object = None
    _theory: object = None
    _instance: object = None

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    @property
    def finished(self) -> bool:
        return self.status in ("ok", "diverged")

    def measured(self) -> Curves | None:
        if self._measured is None:
            p = self.path / "metrics.csv"
            c = None
            if p.exists():
                cols = read_table(p)
                if cols and "time" in cols:
                    c = _pivot(cols, str(self.cfg.get("optim.algorithm", "sgd")), ("replica",))
                    if c is not None:
                        if "lr" in cols:  # the lr of each replica (constant per replica)
                            lr_of = {}
                            for r, lr in zip(cols["replica"], cols["lr"]):
                                lr_of.setdefault(float(r), float(lr))
                            c.columns["lr"] = np.array([lr_of[float(r)] for r in c.columns["replica"]])
                        # metrics.csv has no rows after a divergence: flag those replicas from the summary
                        t_end = _num(self.cfg.get("train.time"))
                        dead = {int(dv.get("replica", -1)) for dv in (self.summary.get("diverged") or [])
                                if not _num(dv.get("time")) > t_end * (1 + 1e-9)}
                        c.columns["diverged"] = np.array([int(r) in dead for r in c.columns["replica"]])
            self._measured = c if c is not None else False
        return self._measured or None

    def theory(self) -> list:
        if self._theory is None:
            p = self.path / "theory.csv"
            out = []
            if p.exists():
                cols = read_table(p)
                if cols and "model" in cols:
                    for m in dict.fromkeys(cols["model"].tolist()):
                        c = _pivot(cols, str(m), ("init", "lr"), cols["model"] == m)
                        if c is not None:
                            out.append(c)
            self._theory = out
        return self._theory

    def instance(self):
        if self._instance is None:
            p = self.path / "instance.npz"
            inst = False
            if p.exists():
                try:
                    z = np.load(p)
                    inst = {k: np.asarray(z[k], dtype=float) for k in ("lam", "w_star", "w0")}
                except Exception:
                    inst = False
            self._instance = inst
        return self._instance or None


def find_runs(root: Path, skip: Path | None = None) -> list:
    """Every folder at or below ``root`` holding a readable ``summary.json`` (sorted by path)."""
    paths = [root / "summary.json"] if (root / "summary.json").exists() else []
    paths += sorted(p for p in root.rglob("summary.json") if p.parent != root)
    runs = []
    for p in paths:
        parts = p.relative_to(root).parts
        if "superseded" in parts or "wandb" in parts or ".hydra" in parts:
            continue
        if skip is not None and _is_within(p, skip):
            continue
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(s, dict):
            continue
        cfg = s.get("config") if isinstance(s.get("config"), dict) else {}
        runs.append(Run(p.parent, s, _flatten(cfg)))
    return runs


def _is_within(p: Path, d: Path) -> bool:
    try:
        p.resolve().relative_to(d.resolve())
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# sweep points

@dataclass
class Point:
    params: dict                          # swept key -> value (ordered)
    runs: list                            # runs in this point
    lr: float | None = None               # set when a run's lr list was split into points
    phases: dict = field(default_factory=dict)
    exponents: dict = field(default_factory=dict)
    note: str = ""
    phase3: object = None                 # cached Phase-III overlay (False: none)
    run_reports: list = field(default_factory=list)  # per finished run: its phases/exponents report

    @property
    def label(self) -> str:
        if not self.params:
            return str(self.runs[0].cfg.get("name") or self.runs[0].path.name) if self.runs else "run"
        return ", ".join(f"{SHORT.get(k, k)}={_fmt_value(v)}" for k, v in self.params.items())

    @property
    def slug(self) -> str:
        s = re.sub(r"[^A-Za-z0-9.=_-]+", "_", self.label.replace(", ", "_")).strip("_")
        return s or "run"

    @property
    def finished_runs(self) -> list:
        return [r for r in self.runs if r.finished]

    @property
    def seeds(self) -> list:
        """Distinct seeds (problem instances) pooled in this point, in run order."""
        out = []
        for r in self.runs:
            sd = r.cfg.get("seed", 0)
            if sd not in out:
                out.append(sd)
        return out

    @property
    def status(self) -> str:
        st = sorted({r.status for r in self.runs})
        return "+".join(st)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def _hashable(v):
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def swept_keys(runs: list) -> list:
    """Config keys whose value differs between runs (in a stable, readable order)."""
    keys = []
    for r in runs:
        for k in r.cfg:
            if k not in keys and not _ignored(k):
                keys.append(k)
    out = [k for k in keys if len({_hashable(r.cfg.get(k)) for r in runs}) > 1]
    order = {k: i for i, k in enumerate(X_PRIORITY)}
    return sorted(out, key=lambda k: (order.get(k, len(order)), keys.index(k)))


def fixed_settings(runs: list) -> dict:
    """Config keys with one value in every run (the settings common to the sweep)."""
    keys = ("name", "optim.algorithm", "data.d", "data.a", "data.target", "data.label_noise", "optim.lr",
            "optim.batch_size", "train.time", "replicas", "init.kind", "init.norm", "init.per_replica",
            "dtype", "seed")
    out = {}
    for k in keys:
        vals = {_hashable(r.cfg.get(k)) for r in runs if k in r.cfg}
        if len(vals) == 1:
            out[k] = runs[0].cfg.get(k)
    return out


def group_points(runs: list) -> tuple:
    """Runs -> sweep points (and the swept keys). A run with several learning rates is split."""
    keys = swept_keys(runs)
    split_lr = any(len(_lrs(r.cfg)) > 1 for r in runs)
    if split_lr and "optim.lr" in keys:
        keys.remove("optim.lr")
    groups: dict = {}
    for r in runs:
        key = tuple(_hashable(r.cfg.get(k)) for k in keys)
        groups.setdefault(key, []).append(r)
    points = []
    for key, rs in groups.items():
        params = dict(zip(keys, [rs[0].cfg.get(k) for k in keys]))
        if split_lr:
            for lr in sorted({x for r in rs for x in _lrs(r.cfg)}):
                p = dict(params)
                p["optim.lr"] = lr
                points.append(Point(p, [r for r in rs if lr in _lrs(r.cfg)], lr=lr))
        else:
            points.append(Point(params, rs))
    if split_lr:
        keys = keys + ["optim.lr"]

    def sort_key(p):
        return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                     for v in (p.params.get(k) for k in keys))

    points.sort(key=sort_key)
    return points, keys


# ----------------------------------------------------------------------------------------------
# phases and exponents per point

def _entry_value(e, what="value") -> float:
    try:
        return float(e["measured"][what])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _aggregate(entries: list) -> dict:
    """Entries of the same quantity from several runs -> one (median value, envelope of the CIs)."""
    entries = [e for e in entries if isinstance(e, dict)]
    if not entries:
        return {}
    if len(entries) == 1:
        return entries[0]
    vals = np.array([_entry_value(e) for e in entries])
    lo = np.array([_entry_value(e, "ci_low") for e in entries])
    hi = np.array([_entry_value(e, "ci_high") for e in entries])
    ok = np.isfinite(vals)
    out = dict(entries[0])
    with np.errstate(all="ignore"):
        out["measured"] = {
            "value": float(np.median(vals[ok])) if ok.any() else float("nan"),
            "ci_low": float(np.nanmin(lo)) if np.isfinite(lo).any() else float("nan"),
            "ci_high": float(np.nanmax(hi)) if np.isfinite(hi).any() else float("nan"),
            "n": int(sum(int(_num((e.get("measured") or {}).get("n", 0)) or 0) for e in entries)),
            "runs": len(entries),
        }
        preds = np.array([_num(e.get("predicted")) for e in entries])
        out["predicted"] = float(np.nanmedian(preds)) if np.isfinite(preds).any() else float("nan")
        models = {}
        for e in entries:
            for name in (e.get("models") or {}):
                models.setdefault(name, []).append(_num(e["models"][name]))
        if models:  # each model measured on each run's own instance: the median over runs
            out["models"] = {name: float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")
                             for name, v in models.items()}
        numeric = list(dict.fromkeys(k for e in entries for k, v in e.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)))
        for k in (k for k in numeric if k not in ("measured", "predicted")):  # null in one run's summary (NaN) does not hide the others
            xs = np.array([_num(e.get(k)) for e in entries])
            out[k] = float(np.nanmedian(xs)) if np.isfinite(xs).any() else float("nan")
    return out


def _per_lr_report(run: Run, lr: float) -> dict | None:
    """The run's own report for one learning rate (``summary.json`` ``per_lr``), if it has one."""
    for rep in run.summary.get("per_lr") or []:
        if isinstance(rep, dict) and math.isclose(_num((rep.get("settings") or {}).get("lr")), lr, rel_tol=1e-12):
            return rep
    return None


def _remeasure(run: Run, lr: float) -> dict | None:
    """Phases and exponents of the replicas of one learning rate (``phase_report`` with a mask)."""
    try:
        from prtorch.theory.measure import phase_report
    except Exception:
        return None
    meas, inst = run.measured(), run.instance()
    if meas is None or inst is None or "lr" not in meas.columns:
        return None
    mask = meas.lr_mask(lr)
    if not mask.any():
        return None
    pred = {}
    for th in run.theory():
        sel = th.lr_mask(lr)
        if th.model == "phase3":  # a curve drawn, not a model measured (as in job.measure)
            continue
        if sel.any():
            pred[th.model] = th.subset(sel)
    m = {"delta": run.cfg.get("measure.delta"), "eps": run.cfg.get("measure.eps")}
    kw = {k: float(v) for k, v in m.items() if v is not None}
    nb = run.cfg.get("measure.bootstrap")
    if nb is not None:
        kw["n_boot"] = int(nb)
    try:
        return phase_report(meas, pred, inst["lam"], inst["w_star"], inst["w0"], mask=mask,
                            diverged=meas.columns.get("diverged"),
                            seed=int(run.cfg.get("seed", 0) or 0), **kw)
    except Exception:
        return None


def measure_points(points: list) -> None:
    """Fill ``point.phases`` / ``point.exponents`` (read from the summaries, per lr where split)."""
    for p in points:
        reports = []
        for r in p.finished_runs:
            rep = None
            if p.lr is not None and len(_lrs(r.cfg)) > 1:
                rep = _per_lr_report(r, p.lr)
                if rep is not None:
                    p.note = "measured on the replicas of this learning rate (the run's per_lr report)"
                else:
                    rep = _remeasure(r, p.lr)
                    p.note = ("re-measuring per learning rate failed: values pool every learning rate of the run"
                              if rep is None else
                              "measured on the replicas of this learning rate (re-measured from metrics.csv)")
            if rep is None:
                rep = {"phases": r.summary.get("phases"), "exponents": r.summary.get("exponents")}
            reports.append(rep)
        p.run_reports = reports
        for section in ("phases", "exponents"):
            names = []
            for rep in reports:
                sec = rep.get(section)
                if isinstance(sec, dict):
                    names += [k for k in sec if k not in names]
            getattr(p, section).update(
                {n: _aggregate([(rep.get(section) or {}).get(n) for rep in reports
                                if isinstance(rep.get(section), dict)]) for n in names})


# ----------------------------------------------------------------------------------------------
# tables

def _entry_columns(name: str, e: dict) -> dict:
    """``<name>_value, _ci_low, _ci_high, _n, _predicted`` and the entry's numeric/short extras."""
    m = e.get("measured") if isinstance(e.get("measured"), dict) else {}
    row = {f"{name}_value": _num(m.get("value")), f"{name}_ci_low": _num(m.get("ci_low")),
           f"{name}_ci_high": _num(m.get("ci_high")), f"{name}_n": m.get("n", ""),
           f"{name}_predicted": _num(e.get("predicted"))}
    for k, v in e.items():
        if k in ("measured", "predicted") or "source" in k or "note" in k:
            continue
        if isinstance(v, dict):  # models -> <name>_<model>; candidates -> <name>_cand_<law>
            pre = {"models": f"{name}_", "candidates": f"{name}_cand_"}.get(k, f"{name}_{k}_")
            for kk, vv in v.items():
                if vv is None or (isinstance(vv, (int, float)) and not isinstance(vv, bool)):
                    row[f"{pre}{kk}"] = _num(vv)  # null in summary.json: not measured (NaN)
        elif isinstance(v, bool):
            row[f"{name}_{k}"] = v
        elif isinstance(v, (int, float)):
            row[f"{name}_{k}"] = float(v)
        elif isinstance(v, str) and len(v) <= 40:
            row[f"{name}_{k}"] = v
        elif v is None:  # null: a text field not set (closest law), else a number not measured
            row[f"{name}_{k}"] = "" if k == "closest" else float("nan")
    return row


def _point_columns(p: Point, keys: list) -> dict:
    row = {SHORT.get(k, k): _csv_value(p.params.get(k)) for k in keys}
    row.update(point=p.label, n_runs=len(p.runs), status=p.status)
    return row


def _csv_value(v):
    if isinstance(v, tuple):
        return " ".join(_fmt_value(x) for x in v)
    return v


def _order(names: list, preferred: tuple) -> list:
    return [n for n in preferred if n in names] + [n for n in names if n not in preferred]


def table_rows(points: list, keys: list, section: str) -> tuple:
    preferred = PHASES if section == "phases" else EXPONENTS
    names = _order(list(dict.fromkeys(n for p in points for n in getattr(p, section))), preferred)
    rows = []
    blocks = {n: [] for n in names}  # the columns of each entry, in first-seen order
    for p in points:
        row = _point_columns(p, keys)
        for n in names:
            e = getattr(p, section).get(n)
            if isinstance(e, dict) and e:
                cols = _entry_columns(n, e)
                blocks[n] += [c for c in cols if c not in blocks[n]]
                row.update(cols)
        rows.append(row)
    head = [SHORT.get(k, k) for k in keys] + ["point", "n_runs", "status"]
    if not any(blocks.values()):  # no section in any summary: the core columns, empty
        blocks = {n: [f"{n}_{c}" for c in ("value", "ci_low", "ci_high", "n", "predicted")] for n in preferred}
    return rows, head + [c for n in blocks for c in blocks[n]]


def points_rows(points: list, keys: list) -> tuple:
    rows = []
    for p in points:
        row = _point_columns(p, keys)
        fin = p.finished_runs
        row["replicas"] = _sum_replicas(p)
        row["wall_time_s"] = _sum([_num(r.summary.get("wall_time")) for r in fin])
        row["steps"] = _med([_num(r.summary.get("steps")) for r in fin])
        row["steps_per_second"] = _med([_num(r.summary.get("steps_per_second")) for r in fin])
        fm = _final(p)
        for m in ("time", "mse", "loss", "s", "abs_u", "mse_spread"):
            row[f"final_{m}"] = fm.get(m, float("nan"))
        meas = point_measured(p)
        for th in point_theory(p):
            t_th, y_th = _median_curve(th, "mse")
            ok = np.isfinite(t_th) & np.isfinite(y_th)
            row[f"final_mse_{th.model}"] = float(y_th[ok][-1]) if ok.any() else float("nan")
            row[f"mse_max_rel_gap_{th.model}"] = median_gap(meas, th, "mse")
        row["one_minus_u_spread"] = _late_spread(p, meas)
        row["phase3_max_rel_gap"] = phase3_deviation(p, point_phase3(p))
        row["diverged_replicas"] = sum(len(r.summary.get("diverged") or []) for r in p.runs
                                       if p.lr is None) if p.lr is None else sum(
            1 for r in p.runs for dv in (r.summary.get("diverged") or []) if _num(dv.get("lr")) == p.lr)
        row["errors"] = "; ".join(str(r.summary.get("error", "")).splitlines()[0][:120]
                                  for r in p.runs if r.status == "failed")
        row["run_dirs"] = " ".join(str(r.path) for r in p.runs)
        rows.append(row)
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    return rows, fields


def _late_spread(p: Point, meas: Curves | None) -> float:
    """SGD fluctuations after T2: the median over records with ``t >= 2 T2`` of the spread
    ``(P90 - P10) / median`` of ``1 - |u|`` across replicas (NaN with fewer than 2 replicas)."""
    runs, phases = _lead(p)
    if runs is not None:
        meas = point_measured(p, runs)
    t2 = _entry_value(phases.get("T2") or {})
    if meas is None or meas.n_curves < 2 or not np.isfinite(t2):
        return float("nan")
    y = 1 - np.abs(meas.values["u"])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = np.nanmedian(meas.time, axis=1)
        q10, q50, q90 = np.nanquantile(y, [0.1, 0.5, 0.9], axis=1)
        r = (q90 - q10) / q50
    sel = np.isfinite(r) & (t >= 2 * t2) & (q50 > 0)
    return float(np.median(r[sel])) if sel.any() else float("nan")


def _sum_replicas(p: Point) -> int:
    n = 0
    for r in p.runs:
        m = r.measured()
        if m is None:
            continue
        n += int(np.sum(m.lr_mask(p.lr)))
    return n


def _sum(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(sum(xs)) if xs else float("nan")


def _med(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.median(xs)) if xs else float("nan")


def _final(p: Point) -> dict:
    """Median over the point's replicas of each metric at its last finite record (and that record's
    median ``time``: with a list of learning rates the larger ones may stop short of ``t_end``).
    Several seeds (instances, each on its own scale): each run's values, then their median."""
    if len(p.seeds) > 1:
        per = [_final_of(point_measured(p, [r])) for r in p.runs]
        per = [f for f in per if f]
        keys = list(dict.fromkeys(k for f in per for k in f))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return {k: float(np.nanmedian([f.get(k, np.nan) for f in per])) for k in keys}
    return _final_of(point_measured(p))


def _final_of(c: Curves | None) -> dict:
    out = {}
    if c is None:
        return out
    if "diverged" in c.columns and np.any(c.columns["diverged"]):  # as in summary.json: left out
        c = c.subset(~np.asarray(c.columns["diverged"], dtype=bool))
        if c.n_curves == 0:
            return {k: float("nan") for k in ("time", "mse", "loss", "s", "u", "abs_u")}
    last_t = [c.time[np.flatnonzero(np.isfinite(c.values["mse"][:, r]))[-1], r] for r in range(c.n_curves)
              if "mse" in c.values and np.isfinite(c.values["mse"][:, r]).any()]
    out["time"] = float(np.median(last_t)) if last_t else float("nan")
    for m, v in c.values.items():
        last = [v[np.flatnonzero(np.isfinite(v[:, r]))[-1], r] for r in range(v.shape[1])
                if np.isfinite(v[:, r]).any()]
        out[m] = float(np.median(last)) if last else float("nan")
        if m == "u":  # replicas may converge to w* or -w*: the sign-invariant |u|
            out["abs_u"] = float(np.median(np.abs(last))) if last else float("nan")
        if m == "mse" and len(last) >= 2:  # spread across replicas: (P90 - P10) / median
            q10, q50, q90 = np.quantile(last, [0.1, 0.5, 0.9])
            out["mse_spread"] = float((q90 - q10) / q50) if q50 > 0 else float("nan")
    return out


def write_csv(path: Path, rows: list, fields: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


# ----------------------------------------------------------------------------------------------
# curves of a point

def _concat(curves: list, model: str) -> Curves | None:
    curves = [c for c in curves if c is not None and c.n_curves > 0]
    if not curves:
        return None
    T = max(c.time.shape[0] for c in curves)

    def pad(a):
        return np.vstack([a, np.full((T - a.shape[0], a.shape[1]), np.nan)]) if a.shape[0] < T else a

    time = np.hstack([pad(c.time) for c in curves])
    metrics = [m for m in METRICS if all(m in c.values for c in curves)]
    values = {m: np.hstack([pad(c.values[m]) for c in curves]) for m in metrics}
    cols = {}
    for k in curves[0].columns:
        if all(k in c.columns for c in curves):
            cols[k] = np.concatenate([np.asarray(c.columns[k]) for c in curves])
    if "replica" in cols:
        cols["replica"] = np.arange(time.shape[1])
    return Curves(model, time, values, cols)


def _tag_seed(c: Curves, run) -> Curves:
    """``c`` with a ``seed`` column (the run's instance), so pooled seeds can be drawn apart."""
    cols = dict(c.columns)
    cols["seed"] = np.full(c.n_curves, int(run.cfg.get("seed", 0) or 0))
    return Curves(c.model, c.time, c.values, cols)


def point_measured(p: Point, runs=None) -> Curves | None:
    cs = []
    for r in (p.runs if runs is None else runs):
        m = r.measured()
        if m is not None:
            cs.append(_tag_seed(m.at_lr(p.lr), r))
    model = str(p.runs[0].cfg.get("optim.algorithm", "sgd")) if p.runs else "sgd"
    return _concat(cs, model)


def point_theory(p: Point, models=("gf", "sgd_de")) -> list:
    out = []
    for name in models:
        cs = []
        for r in p.runs:
            for th in r.theory():
                if th.model != name:
                    continue
                cs.append(_tag_seed(th.at_lr(p.lr), r))
        c = _concat(cs, name)
        if c is not None:
            out.append(c)
    return out


def point_phase3(p: Point) -> Curves | None:
    """:func:`phase3_overlay`, computed once per point."""
    if p.phase3 is None:
        p.phase3 = phase3_overlay(p) or False
    return p.phase3 or None


def median_gap(meas: Curves | None, th: Curves, metric: str = "mse") -> float:
    """Largest relative gap ``|median measured / median theory - 1|`` over the measured record times
    ``t > 0`` (theory interpolated in log time, on its own time range)."""
    if meas is None:
        return float("nan")
    t_m, y_m = _median_curve(meas, metric)
    t_t, y_t = _median_curve(th, metric)
    okt = np.isfinite(t_t) & np.isfinite(y_t) & (t_t > 0) & (y_t > 0)
    okm = np.isfinite(t_m) & np.isfinite(y_m) & (t_m > 0) & (y_m > 0)
    if okt.sum() < 2 or not okm.any():
        return float("nan")
    sel = okm & (t_m >= t_t[okt].min()) & (t_m <= t_t[okt].max())
    if not sel.any():
        return float("nan")
    yt = np.exp(np.interp(np.log(t_m[sel]), np.log(t_t[okt]), np.log(y_t[okt])))
    return float(np.max(np.abs(y_m[sel] / yt - 1)))


def phase3_deviation(p: Point, p3: Curves | None) -> float:
    """Largest relative gap between the measured median MSE and the Phase-III curve over
    ``t in [2 T2, t_end]`` (the measured median interpolated in log time at the curve's times; with
    several seeds pooled, the median of the first run, whose instance the curve is computed on)."""
    meas = point_measured(p, p.finished_runs[:1] if len(p.seeds) > 1 else None)
    if p3 is None or meas is None:
        return float("nan")
    t_m, y_m = _median_curve(meas, "mse")
    ok = np.isfinite(t_m) & np.isfinite(y_m) & (t_m > 0) & (y_m > 0)
    t2 = float(p3.time[0, 0])
    t, y = p3.time[:, 0], p3.values["mse"][:, 0]
    sel = (t >= 2 * t2) & (t <= t_m[ok].max()) & np.isfinite(y) & (y > 0) if ok.sum() >= 2 else np.zeros(0, bool)
    if not sel.any():
        return float("nan")
    ym = np.exp(np.interp(np.log(t[sel]), np.log(t_m[ok]), np.log(y_m[ok])))
    return float(np.max(np.abs(y[sel] / ym - 1)))


def phase3_overlay(p: Point, max_d: int = 5000) -> Curves | None:
    """The paper's Phase-III linearisation from the gradient-flow state at the measured ``T2``.

    ``w(T2)`` is gradient flow from the run's stored ``w0`` (at most 4 distinct inits) integrated to
    the point's median ``T2``; then ``e_i(T2 + tau) = e_i(T2) e^{-8 lambda_i tau}``.
    """
    if not p.finished_runs:
        return None
    run = p.finished_runs[0]
    # with several seeds (instances) pooled, the curve is that of the first run's instance, from its
    # own T2 (the pooled median T2 belongs to no instance)
    t2 = _entry_value(_lead(p)[1].get("T2") or {})
    if not np.isfinite(t2) or t2 <= 0:
        return None
    if not _num(run.cfg.get("data.a")) > 1:  # the paper's Phase III assumes a > 1
        return None
    inst = run.instance()
    if inst is None or inst["lam"].size > max_d:
        return None
    t_end = _num(run.cfg.get("train.time"))
    if not np.isfinite(t_end) or t_end <= t2 * 1.01:
        return None
    try:
        from prtorch.theory.gradient_flow import gradient_flow
        from prtorch.theory.phases import phase3_curves

        w0 = np.unique(np.atleast_2d(inst["w0"]), axis=0)[:4]
        states, _ = gradient_flow(w0, inst["lam"], inst["w_star"], np.array([0.0, t2]))
        taus = np.concatenate([[0.0], np.logspace(math.log10(max(t2 * 1e-2, 1e-3)), math.log10(t_end - t2), 80)])
        c = phase3_curves(taus, states[-1], inst["lam"], inst["w_star"], t2=t2)
        if c.n_curves > 1:  # one curve: the median over the inits (like the measured median)
            with np.errstate(all="ignore"):
                c = Curves(c.model, c.time[:, :1], {k: np.nanmedian(v, axis=1)[:, None] for k, v in c.values.items()},
                           {"init": np.array([0])})
        return _tag_seed(c, run)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _lead(p: Point) -> tuple:
    """``(runs, phases)`` for what belongs to one instance (phase-time marks, the Phase-III drop, the
    late spread): the whole point, or, with several seeds pooled, the first finished run and its own
    report (a pooled median phase time belongs to no instance)."""
    if len(p.seeds) > 1 and p.finished_runs and p.run_reports:
        return p.finished_runs[:1], (p.run_reports[0].get("phases") or {})
    return None, p.phases


def _phase_marks(p: Point) -> dict:
    phases = _lead(p)[1]
    return {PHASE_LABEL.get(k, k): _entry_value(phases.get(k) or {}) for k in PHASES if k in phases}


def _numbers_text(p: Point) -> str:
    lines = ["measured median [95% CI]  vs  predicted", ""]
    for k in PHASES:
        e = p.phases.get(k)
        if e:
            lines.append(f"{PHASE_LABEL[k]:<5} {_ci_text(e)}   pred {_g(e.get('predicted'))}")
    lines.append("")
    for k in EXPONENTS:
        e = p.exponents.get(k)
        if e:
            extra = f" (window {_g(e.get('predicted_window'))})" if "predicted_window" in e else ""
            lines.append(f"{k:<13} {_ci_text(e)}   pred {_g(e.get('predicted'))}{extra}")
    if "one_minus_u" in p.exponents and p.exponents["one_minus_u"].get("closest"):
        lines.append(f"1-|u| law closest to: {p.exponents['one_minus_u']['closest']}")
    fm = _final(p)
    if fm:
        lines += ["", "final (median): " + ", ".join(f"{m}={_g(fm.get(k))}" for m, k in
                                                   (("t", "time"), ("mse", "mse"), ("loss", "loss"), ("|u|", "abs_u")))]
    dev = phase3_deviation(p, point_phase3(p))
    if np.isfinite(dev):
        lines.append(f"Phase III vs measured MSE, t in [2 T2, t_end]: max rel. gap {100 * dev:.2g}%")
    return "\n".join(lines)


def _g(x, digits=3) -> str:
    x = _num(x)
    return "nan" if not np.isfinite(x) else f"{x:.{digits}g}"


def _ci_text(e: dict) -> str:
    m = e.get("measured") or {}
    return f"{_g(m.get('value'))} [{_g(m.get('ci_low'))}, {_g(m.get('ci_high'))}]"


def point_figure(p: Point, out: Path, dpi: int) -> Path | None:
    from prtorch.plots import draw_metric

    meas = point_measured(p)
    if meas is None:
        return None
    theory = point_theory(p)
    p3 = point_phase3(p)
    marks = _phase_marks(p)
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [("mse", True), ("loss", True), ("one_minus_u", False), ("u", False), ("s", False)]
    for ax, (metric, with_p3) in zip(axes.flat, panels):
        th = list(theory) + ([p3] if (with_p3 and p3 is not None) else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of diverged replicas
            draw_metric(ax, metric, meas, th, marks, group="seed" if len(p.seeds) > 1 else None)
        for ln in ax.get_lines():  # the measured median on top of the theory curves that it matches
            if str(ln.get_label()).startswith(f"{meas.model.upper()} median"):
                ln.set_zorder(3)
        if metric in ("u", "s"):
            from prtorch.plots import linear_top

            ax.set_ylim(0, linear_top(meas, theory, metric))
        if metric == "s":
            ax.axhline(1 / 3, color="gray", lw=0.8)
            ax.text(ax.get_xlim()[0], 1 / 3, " s = 1/3", va="bottom", fontsize=8, color="gray")
    ax = axes.flat[5]
    ax.axis("off")
    ax.text(0.0, 1.0, _numbers_text(p), va="top", ha="left", family="monospace", fontsize=8,
            transform=ax.transAxes)
    name = p.runs[0].cfg.get("name") or ""
    name = "" if name == p.label else name
    pooled = (f"; seeds {', '.join(str(x) for x in p.seeds)} drawn apart, phase marks of seed {p.seeds[0]}, "
              "numbers: median over runs" if len(p.seeds) > 1 else "")
    _suptitle(fig, f"{name}  {p.label}  ({len(p.runs)} run(s), {meas.n_curves} replicas; dotted verticals: "
                   f"measured phase times{pooled})", fontsize=10)
    return _save(fig, out / "points" / f"{p.slug}.png", dpi)


def _split_keys(keys: list, by: str | None) -> tuple:
    """(colour key, panel keys) among the swept keys."""
    if not keys:
        return None, []
    if by and by in keys:
        colour = by
    else:
        colour = next((k for k in COLOUR_PRIORITY if k in keys), keys[0])
    return colour, [k for k in keys if k != colour]


def _x_key(keys: list, by: str | None) -> str | None:
    if not keys:
        return None
    if by and by in keys:
        return by
    return next((k for k in X_PRIORITY if k in keys), keys[0])


def _panel_groups(points: list, panel_keys: list) -> list:
    groups: dict = {}
    for p in points:
        key = tuple(_hashable(p.params.get(k)) for k in panel_keys)
        groups.setdefault(key, []).append(p)
    return list(groups.items())


def _colours(values: list):
    plt = _plt()
    n = len(values)
    cmap = plt.get_cmap("viridis")
    return {v: cmap(0.05 + 0.85 * i / max(n - 1, 1)) for i, v in enumerate(values)}


def _titled(name: str) -> str:
    """``"<name>: "`` as a title prefix, or nothing for an unnamed sweep."""
    return f"{name}: " if name else ""


def _suptitle(fig, text: str, fontsize: float = 10, **kw) -> None:
    """``fig.suptitle`` wrapped to the figure's width (long metric labels were cut at both sides)."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle(textwrap.fill(text.strip(), width), fontsize=fontsize, **kw)


def _median_curve(c: Curves, metric: str):
    """Median curve over ``c``'s curves; with several seeds (``seed`` column: different instances,
    on the same record grid) the median over seeds of each seed's median, so that no instance's
    scale takes over when the other's replicas diverge."""
    seeds = np.asarray(c.columns.get("seed", np.zeros(c.n_curves)))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (diverged replicas)
        if metric in ("u", "one_minus_u"):  # runs converge to w* or -w*: the sign-invariant |u|
            v = np.abs(c.values["u"]) if metric == "u" else 1 - np.abs(c.values["u"])
        else:
            v = c.values[metric]
        groups = [seeds == sd for sd in np.unique(seeds)]
        t = np.nanmedian(np.stack([np.nanmedian(c.time[:, g], axis=1) for g in groups], 1), axis=1)
        y = np.nanmedian(np.stack([np.nanmedian(v[:, g], axis=1) for g in groups], 1), axis=1)
    return t, y


def sweep_curve_figure(points: list, keys: list, metric: str, out: Path, dpi: int, by=None) -> Path | None:
    from prtorch.plots import LABELS

    colour, panel_keys = _split_keys(keys, by)
    if colour is None:
        return None
    groups = _panel_groups(points, panel_keys)[:12]
    n = len(groups)
    ncol = min(n, 3)
    nrow = int(math.ceil(n / ncol))
    plt = _plt()
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 1, 4.2 * nrow), squeeze=False)
    cvals = list(dict.fromkeys(_hashable(p.params.get(colour)) for p in points))
    cols = _colours(cvals)
    log_y = metric in ("mse", "loss", "one_minus_u")
    drawn = False
    for ax, (gkey, pts) in zip(axes.flat, groups):
        for p in pts:
            meas = point_measured(p)
            c = cols[_hashable(p.params.get(colour))]
            lab = f"{SHORT.get(colour, colour)}={_fmt_value(p.params.get(colour))}"
            if meas is not None and (metric in meas.values or metric == "one_minus_u"):
                t, y = _median_curve(meas, metric)
                ok = np.isfinite(t) & np.isfinite(y) & (t > 0) & ((y > 0) if log_y else True)
                what = (f"median over {len(p.seeds)} seeds" if len(p.seeds) > 1 else f"median of {meas.n_curves}")
                ax.plot(t[ok], y[ok], color=c, lw=2, label=f"{lab} ({what})")
                drawn = True
            for th in point_theory(p, ("gf",)):
                t, y = _median_curve(th, metric)
                ok = np.isfinite(t) & np.isfinite(y) & (t > 0) & ((y > 0) if log_y else True)
                ax.plot(t[ok], y[ok], color=c, lw=1.2, ls="--")
        ax.plot([], [], color="k", ls="--", lw=1.2, label="gradient flow (dashed)")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        if metric == "s":
            ax.axhline(1 / 3, color="gray", lw=0.8)
        if metric == "u":
            ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("time t = lr · steps")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(True, which="both", alpha=0.2)
        ax.legend(fontsize=7, loc="best")
        if panel_keys:
            ax.set_title(", ".join(f"{SHORT.get(k, k)}={_fmt_value(v)}" for k, v in zip(panel_keys, gkey)),
                         fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if not drawn:
        plt.close(fig)
        return None
    name = points[0].runs[0].cfg.get("name") or ""
    _suptitle(fig, _titled(name) + f"{LABELS.get(metric, metric)} - median per sweep point (solid), gradient flow "
                 "(dashed)", fontsize=10)
    return _save(fig, out / f"sweep_{metric}.png", dpi)


def _window_of(e: dict):
    """The ``tau`` fit window ``(lo, hi)`` stated in an entry's note (NaN if none)."""
    m = re.search(r"tau in \[([-0-9.e+]+), ([-0-9.e+]+)\]", str((e or {}).get("note", "")))
    return (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))


def add_phase3_slopes(points: list) -> None:
    """``exponents.mse_tail_drop.phase3_linearisation``: the MSE-drop slope of the Phase-III
    linearisation (from the GF state at the measured T2), fitted over the measured fit window."""
    try:
        from prtorch.theory.measure import fit_loglog
    except Exception:
        return
    for p in points:
        e = p.exponents.get("mse_tail_drop")
        if not isinstance(e, dict) or not e:
            continue
        lo, hi = _window_of(e)
        p3 = point_phase3(p)
        t2 = _entry_value(_lead(p)[1].get("T2") or {})  # the T2 the curve starts from
        if p3 is None or not (np.isfinite(lo) and np.isfinite(hi)):
            continue
        tau, y = _drop_curve(p3.time[:, 0], p3.values["mse"][:, 0], t2)
        e = dict(e)
        e["phase3_linearisation"] = float(fit_loglog(tau, y, lo, hi))
        p.exponents["mse_tail_drop"] = e


def _drop_curve(t, y, t2):
    """``(tau, 1 - y(T2 + tau)/y(T2))`` for ``t > T2`` (``y(T2)`` interpolated in log time)."""
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > 0)
    t, y = t[ok], y[ok]
    if t.size < 2 or not (t[0] <= t2 <= t[-1]):
        return np.zeros(0), np.zeros(0)
    y2 = float(np.exp(np.interp(math.log(t2), np.log(t), np.log(y))))
    sel = t > t2
    return t[sel] - t2, 1 - y[sel] / y2


def phase3_figure(points: list, keys: list, out: Path, dpi: int, by=None) -> Path | None:
    """Phase III on its own axes: ``1 - MSE(T2 + tau)/MSE(T2)`` against ``tau`` (log-log), measured
    median (solid) and the linearisation from the GF state at ``T2`` (dash-dot); the predicted slope
    ``1/a`` as a dotted line through the middle of the fit window (where ``a > 1``)."""
    colour, panel_keys = _split_keys(keys, by)
    groups = _panel_groups(points, panel_keys)[:12] if keys else [((), points)]
    n = len(groups)
    ncol = min(n, 3)
    nrow = int(math.ceil(n / ncol))
    plt = _plt()
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.6 * ncol + 1, 4.4 * nrow), squeeze=False)
    cvals = list(dict.fromkeys(_hashable(p.params.get(colour)) for p in points)) if colour else [None]
    cols = _colours(cvals) if len(cvals) > 1 else {cvals[0]: "C0"}
    drawn = False
    for ax, (gkey, pts) in zip(axes.flat, groups):
        for p in pts:
            runs, phases = _lead(p)  # several seeds: the first one's own T2 and replicas
            t2 = _entry_value(phases.get("T2") or {})
            meas = point_measured(p, runs)
            if meas is None or not np.isfinite(t2):
                continue
            c = cols[_hashable(p.params.get(colour))] if colour else "C0"
            lab = f"{SHORT.get(colour, colour)}={_fmt_value(p.params.get(colour))}" if colour else p.label
            tau, y = _drop_curve(*_median_curve(meas, "mse"), t2)
            ok = y > 0
            if not ok.any():
                continue
            ax.plot(tau[ok], y[ok], color=c, lw=2, label=f"{lab}: measured median")
            drawn = True
            p3 = point_phase3(p)
            if p3 is not None:
                tp, yp = _drop_curve(p3.time[:, 0], p3.values["mse"][:, 0], t2)
                okp = yp > 0
                ax.plot(tp[okp], yp[okp], color=c, lw=1.3, ls="-.")
            e = p.exponents.get("mse_tail_drop") or {}
            pred = _num(e.get("predicted"))
            lo, hi = _window_of(e)
            if np.isfinite(pred) and 0 < pred < 1 and np.isfinite(lo):  # 1/a: the law needs a > 1
                sel = (tau > 0) & (y > 0)
                if sel.sum() >= 2:
                    lo, hi = max(lo, tau[sel].min()), min(hi, tau[sel].max())
                if lo > 0 and hi > lo:
                    tm = math.sqrt(lo * hi)
                    if sel.sum() >= 2:
                        ym = float(np.exp(np.interp(math.log(tm), np.log(tau[sel]), np.log(y[sel]))))
                        tt = np.array([lo, hi])
                        ax.plot(tt, ym * (tt / tm) ** pred, color=c, lw=3, ls=":", alpha=0.8)
        ax.plot([], [], color="k", ls="-.", lw=1.3, label="Phase-III linearisation (GF state at T2)")
        ax.plot([], [], color="k", ls=":", lw=3, label="slope 1/a over the fit window")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("τ = t - T2")
        ax.set_ylabel("1 - MSE(T2 + τ) / MSE(T2)")
        ax.grid(True, which="both", alpha=0.2)
        ax.legend(fontsize=7, loc="best")
        if panel_keys:
            ax.set_title(", ".join(f"{SHORT.get(k, k)}={_fmt_value(v)}" for k, v in zip(panel_keys, gkey)), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if not drawn:
        plt.close(fig)
        return None
    name = points[0].runs[0].cfg.get("name") or ""
    _suptitle(fig, _titled(name) + "Phase III, the MSE drop after T2 (u = 1 - eps)", fontsize=10)
    return _save(fig, out / "phase3.png", dpi)


def _xy(points, x_key, getter):
    xs, ys, lo, hi, pred = [], [], [], [], []
    for p in points:
        e = getter(p)
        if not e:
            continue
        xs.append(p.params.get(x_key))
        ys.append(_entry_value(e))
        lo.append(_entry_value(e, "ci_low"))
        hi.append(_entry_value(e, "ci_high"))
        pred.append(_num(e.get("predicted")))
    return xs, np.array(ys, float), np.array(lo, float), np.array(hi, float), np.array(pred, float)


def _xpos(xs: list, cats: list):
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in cats)
    if numeric:
        return np.array(xs, dtype=float), numeric
    return np.array([cats.index(x) for x in xs], dtype=float), numeric


def _scalar_panel(ax, points, x_key, series_keys, getter, title, log_x, log_y, extra=None):
    cats = list(dict.fromkeys(p.params.get(x_key) for p in points))
    groups = _panel_groups(points, series_keys)
    cols = _colours([g for g, _ in groups]) if len(groups) > 1 else {groups[0][0]: "C0"}
    any_data = False
    for gi, (gkey, pts) in enumerate(groups):
        xs, y, lo, hi, pred = _xy(pts, x_key, getter)
        if not xs:
            continue
        x, numeric = _xpos(xs, cats)
        order = np.argsort(x)
        x, y, lo, hi, pred = x[order], y[order], lo[order], hi[order], pred[order]
        glabel = ", ".join(f"{SHORT.get(k, k)}={_fmt_value(v)}" for k, v in zip(series_keys, gkey))
        c = cols[gkey]
        ok = np.isfinite(y)
        if ok.any():
            yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
            yerr = np.where(np.isfinite(yerr), yerr, 0)
            ax.errorbar(x[ok], y[ok], yerr=yerr[:, ok], fmt="o-", color=c, ms=4, capsize=3, lw=1.2,
                        label=f"measured {glabel}".strip())
            any_data = True
        okp = np.isfinite(pred)
        if okp.any():
            ax.plot(x[okp], pred[okp], "s--", color=c, mfc="none", ms=6, lw=1,
                    label=f"predicted {glabel}".strip())
            any_data = True
        if extra is not None:
            any_data |= bool(extra(ax, pts, x_key, cats, c, glabel))
    if not any_data:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
    x_num = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in cats)
    if not x_num:
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([_fmt_value(c) for c in cats])
    elif log_x and all(float(c) > 0 for c in cats):
        ax.set_xscale("log")
    positive = [v for ln in ax.get_lines() for v in np.asarray(ln.get_ydata(), dtype=float) if v > 0]
    if log_y and positive:
        ax.set_yscale("log")
    ax.set_xlabel(SHORT.get(x_key, x_key))
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    if any_data:
        ax.legend(fontsize=7, loc="best")


def _log_x(x_key, points) -> bool:
    vals = [p.params.get(x_key) for p in points]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in vals):
        return False
    return max(vals) / min(vals) >= 10


def _candidates(ax, pts, x_key, cats, colour, glabel):
    """The three candidate laws for 1 - |u| (from each entry's 'candidates'), as thin lines."""
    styles = {"paper_bound": ":", "appendix": "-.", "tail_mass": "--"}
    drawn = False
    for name, ls in styles.items():
        xs, ys = [], []
        for p in pts:
            e = p.exponents.get("one_minus_u") or {}
            v = _num((e.get("candidates") or {}).get(name))
            if np.isfinite(v):
                xs.append(p.params.get(x_key))
                ys.append(v)
        if xs:
            x, _ = _xpos(xs, cats)
            o = np.argsort(x)
            seen = ax.get_legend_handles_labels()[1]
            ax.plot(x[o], np.array(ys)[o], ls=ls, color="gray", lw=1,
                    label=None if f"{name} law" in seen else f"{name} law")
            drawn = True
    return drawn


def _window(key):
    def extra(ax, pts, x_key, cats, colour, glabel):
        xs, ys = [], []
        for p in pts:
            v = _num((p.exponents.get(key) or {}).get("predicted_window"))
            if np.isfinite(v):
                xs.append(p.params.get(x_key))
                ys.append(v)
        if not xs:
            return False
        x, _ = _xpos(xs, cats)
        o = np.argsort(x)
        ax.plot(x[o], np.array(ys)[o], "^:", color=colour, ms=5, lw=1,
                label=f"finite-d prediction, same window {glabel}".strip())
        xs, ys = [], []
        for p in pts:
            v = _num((p.exponents.get(key) or {}).get("phase3_linearisation"))
            if np.isfinite(v):
                xs.append(p.params.get(x_key))
                ys.append(v)
        if xs:
            x, _ = _xpos(xs, cats)
            o = np.argsort(x)
            ax.plot(x[o], np.array(ys)[o], "x", color=colour, ms=7, mew=1.5,
                    label=f"Phase-III linearisation from e(T2), same window {glabel}".strip())
        return True
    return extra


def sweep_scalar_figures(points: list, keys: list, out: Path, dpi: int, by=None) -> list:
    x_key = _x_key(keys, by)
    if x_key is None or len(points) < 2:
        return []
    series = [k for k in keys if k != x_key]
    log_x = _log_x(x_key, points)
    plt = _plt()
    paths = []
    name = points[0].runs[0].cfg.get("name") or ""
    # phase times
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.flat
    for ax, k in zip(axes, PHASES):
        _scalar_panel(ax, points, x_key, series, lambda p, k=k: p.phases.get(k), f"{PHASE_LABEL[k]}: measured vs predicted",
                      log_x, True)
        ax.set_ylabel(f"{PHASE_LABEL[k]} (time)")

    def final_mse(p):
        v = _final(p).get("mse", float("nan"))
        return {"measured": {"value": v, "ci_low": v, "ci_high": v}}

    _scalar_panel(axes[3], points, x_key, series, final_mse, "final MSE (median over replicas)", log_x, True)
    axes[3].set_ylabel("MSE at t_end")
    _suptitle(fig, _titled(name) + f"phase times vs {SHORT.get(x_key, x_key)} (median, 95% bootstrap CI over replicas; pooled seeds: the envelope of the runs' CIs)",
                 fontsize=10)
    paths.append(_save(fig, out / "sweep_phases.png", dpi))
    # exponents
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, k in zip(axes.flat, ("rho", "mse_tail_drop", "one_minus_u", "loss_tail")):
        extra = _candidates if k == "one_minus_u" else (_window(k) if k in ("mse_tail_drop", "loss_tail") else None)
        _scalar_panel(ax, points, x_key, series, lambda p, k=k: p.exponents.get(k), EXP_LABEL[k], log_x,
                      k == "rho", extra)
        ax.set_ylabel(k)
    _suptitle(fig, _titled(name) + f"exponents vs {SHORT.get(x_key, x_key)} (median, 95% bootstrap CI over replicas; pooled seeds: the envelope of the runs' CIs)",
                 fontsize=10)
    paths.append(_save(fig, out / "sweep_exponents.png", dpi))
    # escape vs tail, side by side
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _scalar_panel(axes[0], points, x_key, series, lambda p: p.phases.get("T1"), "escape time T1 (Phase I)",
                  log_x, True)
    axes[0].set_ylabel("T1 (time)")
    _scalar_panel(axes[1], points, x_key, series, lambda p: p.exponents.get("mse_tail_drop"),
                  "Phase-III slope: 1 - MSE(T2+τ)/MSE(T2) ~ τ^(1/a)", log_x, False, _window("mse_tail_drop"))
    axes[1].set_ylabel("exponent")
    _scalar_panel(axes[2], points, x_key, series, final_mse, "MSE left at the end of the run (median)", log_x, True)
    axes[2].set_ylabel("MSE at t_end")
    _suptitle(fig, _titled(name) + f"escape vs tail across {SHORT.get(x_key, x_key)}", fontsize=10)
    paths.append(_save(fig, out / "escape_vs_tail.png", dpi))
    return paths


# ----------------------------------------------------------------------------------------------
# report

def _md_table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(out)


def write_report(out: Path, src: Path, runs: list, points: list, keys: list, figs: dict, by=None) -> Path:
    fixed = fixed_settings(runs)
    lines = [f"# Analysis of `{src}`", "",
             f"Generated by `prtorch-analyze` on {datetime.datetime.now():%Y-%m-%d %H:%M} from {len(runs)} run(s) "
             f"in {len(points)} sweep point(s).", ""]
    if keys:
        lines.append("Swept: " + ", ".join(f"`{k}`" for k in keys) + ".  ")
    if fixed:
        lines.append("Common settings: " + ", ".join(f"`{k}={_fmt_value(v)}`" for k, v in fixed.items()) + ".")
    lines += ["", "Files: [`phases.csv`](phases.csv), [`exponents.csv`](exponents.csv), [`points.csv`](points.csv).",
              "", "## Sweep points", ""]
    rows = []
    for p in points:
        fm = _final(p)
        rows.append([p.label, p.status, len(p.runs), _sum_replicas(p),
                     _g(_sum([_num(r.summary.get("wall_time")) for r in p.finished_runs])),
                     _g(_med([_num(r.summary.get("steps_per_second")) for r in p.finished_runs])),
                     _g(fm.get("time")), _g(fm.get("mse")), _g(fm.get("loss")), _g(fm.get("abs_u"))])
    lines.append(_md_table(["point", "status", "runs", "replicas", "wall time (s)", "steps/s", "final t",
                            "final MSE", "final loss", "final abs(u)"], rows))
    failed = [r for r in runs if r.status not in ("ok", "diverged")]
    if failed:
        lines += ["", "Runs not finished:", ""]
        for r in failed:
            err = str(r.summary.get("error", "")).splitlines()[0][:200] if r.summary.get("error") else ""
            lines.append(f"* `{r.path}`: {r.status}" + (f" ({err})" if err else ""))
    notes = sorted({p.note for p in points if p.note})
    for n in notes:
        lines += ["", f"Note: {n}."]
    lines += ["", "## Phase times: measured median [95% CI] vs predicted", ""]
    lines.append(_md_table(["point"] + [f"{PHASE_LABEL[k]} measured" for k in PHASES]
                           + [f"{PHASE_LABEL[k]} predicted" for k in PHASES] + ["T2 bound"],
                           [[p.label] + [_ci_text(p.phases.get(k) or {}) for k in PHASES]
                            + [_g((p.phases.get(k) or {}).get("predicted")) for k in PHASES]
                            + [_g((p.phases.get("T2") or {}).get("bound"))] for p in points]))
    src_notes = _definitions(points, "phases", PHASES)
    if src_notes:
        lines += [""] + src_notes
    lines += ["", "## Exponents: measured median [95% CI] vs predicted / the finite-d prediction over the "
              "same fit window (/ for the MSE drop: the slope of the Phase-III linearisation from the GF state at "
              "T2, same window)", ""]
    ex_rows = []
    for p in points:
        row = [p.label]
        for k in ("rho", "mse_tail_drop", "one_minus_u", "loss_tail"):
            e = p.exponents.get(k) or {}
            pw = f" / {_g(e.get('predicted_window'))}" if "predicted_window" in e else ""
            pw += f" / {_g(e.get('phase3_linearisation'))}" if "phase3_linearisation" in e else ""
            row.append(f"{_ci_text(e)} vs {_g(e.get('predicted'))}{pw}" if e else "")
        row.append(str((p.exponents.get("one_minus_u") or {}).get("closest") or ""))
        ex_rows.append(row)
    lines.append(_md_table(["point", "rho", "MSE drop (1/a)", "1-\\|u\\|", "loss tail", "1-\\|u\\| closest law"], ex_rows))
    src_notes = _definitions(points, "exponents", EXPONENTS)
    if src_notes:
        lines += [""] + src_notes
    lines += ["", "## Figures", ""]
    captions = {
        "escape_vs_tail": "Escape time, Phase-III slope and the MSE left at the end across the sweep (measured: dots with CI; predicted: open squares; finite-d prediction over the fit window: triangles; Phase-III linearisation from the error profile at T2: crosses).",
        "sweep_phases": "Phase times and final MSE across the sweep.",
        "sweep_exponents": "Exponents across the sweep; for 1-|u| the three candidate laws (paper bound (a-1)/(2a), appendix 1/a, tail mass 1-1/a) in gray.",
        "sweep_mse": "MSE: median per sweep point (solid), gradient flow (dashed).",
        "sweep_one_minus_u": "1-|u|: median per sweep point (solid), gradient flow (dashed).",
        "sweep_u": "u(t): median per sweep point (solid), gradient flow (dashed).",
        "sweep_loss": "Population loss: median per sweep point (solid), gradient flow (dashed).",
        "phase3": "Phase III: 1 - MSE(T2+τ)/MSE(T2) vs τ, measured median (solid), the linearisation "
                  "e_i(T2+τ) = e_i(T2) exp(-8 λ_i τ) from the GF state at T2 (dash-dot), slope 1/a over the fit window (dotted).",
    }
    for key in ("escape_vs_tail", "sweep_phases", "sweep_exponents", "phase3", "sweep_mse", "sweep_one_minus_u",
                "sweep_u", "sweep_loss"):
        if figs.get(key):
            rel = Path(figs[key]).relative_to(out)
            lines += [f"**{captions[key]}**", "", f"![{key}]({rel.as_posix()})", ""]
    if figs.get("points"):
        lines += ["### Per sweep point", "",
                  "Replicas thin, median bold, gradient flow dashed, SGD deterministic equivalent dotted, "
                  "Phase-III linearisation from the GF state at the measured T2 dash-dot; dotted verticals: "
                  "measured T1, T1', T2.", ""]
        for p, f in figs["points"]:
            lines += [f"**{p.label}**", "", f"![{p.slug}]({Path(f).relative_to(out).as_posix()})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _definitions(points, section, names) -> list:
    out = []
    for k in names:
        for p in points:
            e = getattr(p, section).get(k)
            if isinstance(e, dict) and (e.get("note") or e.get("source")):
                label = PHASE_LABEL.get(k, k)
                out.append(f"* `{label}`: {e.get('note', '')}; predicted by {e.get('source', '?')}.")
                break
    return out


# ----------------------------------------------------------------------------------------------
# W&B (optional)

def _unflatten(d: dict, sep: str = "/") -> dict:
    out: dict = {}
    for k, v in d.items():
        parts = str(k).split(sep)
        node = out
        ok = True
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                ok = False
                break
            node = nxt
        if ok and not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = v
    return out


def table_to_files(table: dict, dest: Path) -> None:
    """A W&B ``curves`` table (``{"columns": [...], "data": [[...]]}``, as logged by
    :mod:`prtorch.wandb_log`) -> ``metrics.csv`` (measured rows) and ``theory.csv`` (gf, sgd_de rows)."""
    cols = list(table["columns"])
    ix = {c: i for i, c in enumerate(cols)}
    meas, theo = [], []
    for row in table["data"]:
        src = str(row[ix["source"]])
        rec = {m: row[ix[m]] for m in ("time", "mse", "loss", "s", "u")}
        lr = row[ix["lr"]] if "lr" in ix else None
        if src in THEORY_MODELS:
            theo.append({"model": src, "init": row[ix["replica"]], "lr": "" if lr is None or lr != lr else lr, **rec})
        else:
            step = int(round(rec["time"] / lr)) if lr else ""
            meas.append({"step": step, "replica": row[ix["replica"]], "lr": lr, **rec})
    dest.mkdir(parents=True, exist_ok=True)
    for name, rows, fields in (("metrics.csv", meas, ["step", "time", "replica", "lr", "mse", "loss", "s", "u"]),
                               ("theory.csv", theo, ["model", "init", "lr", "time", "mse", "loss", "s", "u"])):
        if rows:
            write_csv(dest / name, rows, fields)


def pull_wandb(path: str, dest: Path, group: str | None = None) -> int:
    """Download the runs of ``ENTITY/PROJECT`` (optionally one group) into ``dest/<run id>/``:
    ``summary.json`` rebuilt from the run's config and summary, curves from its ``curves`` table."""
    try:
        import wandb
    except ImportError:
        raise AnalyzeError("--wandb needs the wandb package (pip install wandb)") from None
    if path.count("/") != 1:
        raise AnalyzeError(f"--wandb {path!r}: expected ENTITY/PROJECT")
    try:
        api = wandb.Api(timeout=30)
        runs = list(api.runs(path, filters={"group": group} if group else None))
    except Exception as e:
        raise AnalyzeError(f"--wandb {path}: cannot list runs ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    n = 0
    import tempfile

    for run in runs:
        d = dest / run.id
        try:
            raw = dict(run.summary._json_dict) if hasattr(run.summary, "_json_dict") else dict(run.summary)
            summary = _unflatten({k: v for k, v in raw.items() if not str(k).startswith(("charts/", "figures/", "_"))})
            summary.pop("curves", None)
            summary["config"] = dict(run.config)
            summary.setdefault("status", "ok" if run.state == "finished" else str(run.state))
            summary["wandb"] = {"id": run.id, "url": getattr(run, "url", ""), "group": run.group}
            d.mkdir(parents=True, exist_ok=True)
            (d / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            tab = raw.get("curves")
            if isinstance(tab, dict) and tab.get("path"):
                with tempfile.TemporaryDirectory() as tmp:
                    f = run.file(tab["path"]).download(root=tmp, replace=True)
                    table_to_files(json.loads(Path(f.name).read_text()), d)
            n += 1
        except Exception as e:  # one bad run does not stop the pull
            print(f"{PROG}: warning: W&B run {run.id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
    return n


# ----------------------------------------------------------------------------------------------
# main

def analyze(src: Path, out: Path, dpi: int = 100, by: str | None = None, point_figures: bool = True,
            log=print) -> dict:
    """Analyse every run below ``src`` into ``out``; return the written paths (raises AnalyzeError)."""
    if not src.exists():
        raise AnalyzeError(f"{src}: no such directory")
    if not src.is_dir():
        raise AnalyzeError(f"{src}: not a directory")
    runs = find_runs(src, skip=out if out.exists() and _is_within(out, src) and out != src else None)
    if not runs:
        raise AnalyzeError(f"{src}: no runs found (no summary.json below it)")
    points, keys = group_points(runs)
    if by and by not in keys:
        raise AnalyzeError(f"--by {by!r}: not a swept key (swept: {', '.join(keys) or 'none'})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalyzeError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    measure_points(points)
    add_phase3_slopes(points)
    written = {}
    for section in ("phases", "exponents"):
        rows, fields = table_rows(points, keys, section)
        write_csv(out / f"{section}.csv", rows, fields)
        written[section] = out / f"{section}.csv"
    rows, fields = points_rows(points, keys)
    write_csv(out / "points.csv", rows, fields)
    written["points_csv"] = out / "points.csv"
    figs: dict = {"points": []}
    if point_figures:
        for p in points:
            f = point_figure(p, out, dpi)
            if f is not None:
                figs["points"].append((p, f))
    f = phase3_figure(points, keys, out, dpi, by)
    if f is not None:
        figs["phase3"] = f
    if keys:
        for metric in ("mse", "one_minus_u", "u", "loss"):
            f = sweep_curve_figure(points, keys, metric, out, dpi, by)
            if f is not None:
                figs[f"sweep_{metric}"] = f
        for f in sweep_scalar_figures(points, keys, out, dpi, by):
            figs[f.stem] = f
    written["report"] = write_report(out, src, runs, points, keys, figs, by)
    written["figures"] = [f for k, v in figs.items() if k != "points" for f in [v]] + [f for _, f in figs["points"]]
    log(f"{PROG}: {len(runs)} run(s), {len(points)} sweep point(s)"
        + (f" over {', '.join(SHORT.get(k, k) for k in keys)}" if keys else "")
        + f"; wrote {out / 'report.md'}, phases.csv, exponents.csv and {len(written['figures'])} figure(s)")
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description="Figures and tables (measured vs predicted phases and "
                                 "exponents) from prtorch run folders; reads only local files.")
    ap.add_argument("dir", nargs="?", help="a run folder, a multirun folder, or any folder above runs")
    ap.add_argument("--out", help="output folder (default: <dir>/analysis)")
    ap.add_argument("--by", help="swept key for the x axis / colours (e.g. data.a, data.d, init.norm)")
    ap.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100)")
    ap.add_argument("--no-point-figures", action="store_true", help="skip the per-point figures")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT",
                    help="first download the project's runs through the W&B public API (needs network and login)")
    ap.add_argument("--group", help="with --wandb: only the runs of this group (a sweep's name)")
    args = ap.parse_args(argv)
    try:
        if args.wandb:
            if not args.out and not args.dir:
                raise AnalyzeError("--wandb needs --out DIR (or a DIR argument) to store the downloaded runs")
            src = Path(args.dir or args.out) / "wandb_runs"
            n = pull_wandb(args.wandb, src, args.group)
            if n == 0:
                raise AnalyzeError(f"--wandb {args.wandb}: no runs" + (f" in group {args.group!r}" if args.group else ""))
            out = Path(args.out) if args.out else Path(args.dir) / "analysis"
        else:
            if not args.dir:
                raise AnalyzeError("give a run or multirun folder (or --wandb ENTITY/PROJECT)")
            src = Path(args.dir)
            out = Path(args.out) if args.out else src / "analysis"
        analyze(src, out, dpi=args.dpi, by=args.by, point_figures=not args.no_point_figures)
    except AnalyzeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
