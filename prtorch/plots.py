"""Figures from :class:`~prtorch.record.Curves`: measured replicas (thin), their median (bold) and
theory (dashed) on one axis. Matplotlib is imported here only (the Agg backend: no display needed).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

LOG_METRICS = {"mse": True, "loss": True}
LABELS = {"mse": "parameter MSE  min(||w-w*||², ||w+w*||²)/d", "loss": "population loss L(w)",
          "s": "s = wᵀQw", "u": "|u| = |wᵀQw*|", "one_minus_u": "1 - |u|  (log: |u| > 1 not drawn)"}
PHASE_LABEL = {"T1": "T1", "T1_prime": "T1'", "T2": "T2"}  # summary.json key -> label
THEORY_STYLE = {"gf": dict(color="k", ls="--", lw=1.8, label="gradient flow (theory)"),
                "sgd_de": dict(ls=":", lw=2.2, label="SGD deterministic equivalent"),
                "phase3": dict(color="tab:purple", ls="-.", lw=1.5, label="Phase III prediction from GF at T2")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(t, v, log_y):
    m = np.isfinite(t) & np.isfinite(v) & (t > 0)
    if log_y:
        m &= v > 0
    return t[m], v[m]


def draw_metric(ax, metric, measured, theory=(), phases=None, transform=None, group=None):
    """Replicas thin, median bold (one colour per learning rate), theory dashed, phase times dotted.

    group: a column of ``measured`` (e.g. ``"seed"``) to draw apart instead of the learning rate:
    one median per value, and each theory curve in the colour of its own value of that column."""
    f = transform or (lambda v: v)
    log_y = LOG_METRICS.get(metric, False) or metric == "one_minus_u"
    src = "u" if metric == "one_minus_u" else metric
    # u is drawn as |u|: runs end at +w* or -w* alike, and a median of signed u would be meaningless
    tf = (lambda v: 1 - np.abs(v)) if metric == "one_minus_u" else (np.abs if metric == "u" else f)
    colors = {}
    scale = []  # the start and the theory curves: the y-range a reader needs (log panels)
    key = group if (group and measured is not None and group in measured.columns) else "lr"
    marked = False  # one legend entry for the diverged-replica markers
    if measured is not None:
        lrs = measured.columns.get(key, np.zeros(measured.n_curves))
        for i, lr in enumerate(np.unique(lrs)):
            colors[lr] = f"C{i}"
            sel = np.flatnonzero(lrs == lr)
            for r in sel:
                ax.plot(*_positive(measured.time[:, r], tf(measured.values[src][:, r]), log_y),
                        color=colors[lr], lw=0.5, alpha=0.35)
            with warnings.catch_warnings():  # all-NaN rows (a diverged lr) are simply not drawn
                warnings.simplefilter("ignore", RuntimeWarning)
                t = np.nanmedian(measured.time[:, sel], axis=1)
                vals = tf(measured.values[src][:, sel])
                med = np.nanmedian(vals, axis=1)
            # a median is drawn only while at least half of its replicas are alive (not diverged)
            med = np.where(np.isfinite(vals).sum(1) >= (len(sel) + 1) // 2, med, np.nan)
            lab = f"{measured.model.upper()} median of {len(sel)}" + (
                f" ({key}={lr:g})" if len(np.unique(lrs)) > 1 or (lr and key == "lr") else "")
            ax.plot(*_positive(t, med, log_y), color=colors[lr], lw=2.2, label=lab)
            scale.append(med[:1])  # the start; the rest of the range comes from the theory curves
            # a replica that diverged (NaN values where it has record times, or flagged in a
            # ``diverged`` column: curves read back from metrics.csv end at the divergence) ends with an x
            flagged = np.asarray(measured.columns.get("diverged", np.zeros(measured.n_curves, bool)), bool)
            for r in sel:
                y = tf(measured.values[src][:, r])
                has_t = np.isfinite(measured.time[:, r])
                if (flagged[r] or np.any(has_t & ~np.isfinite(y))) and np.isfinite(y).any():
                    k = np.flatnonzero(np.isfinite(y))[-1]
                    ax.plot(measured.time[k, r], y[k], "x", color=colors[lr], ms=6, mew=1.5,
                            label=None if marked else "diverged replica (last record)")
                    marked = True
    for th in theory:
        style = dict(THEORY_STYLE.get(th.model, dict(ls="--", label=th.model)))
        lrs = th.columns.get(key)
        labelled = set()
        for r in range(th.n_curves):
            st = dict(style)
            if lrs is not None and (th.model == "sgd_de" or key != "lr"):
                st["color"] = colors.get(lrs[r], f"C{r}")
                st["label"] = f"{style['label']} ({key}={lrs[r]:g})"
            elif r > 0 and th.model == "gf":
                st.pop("label", None)
            if st.get("label") is not None and st["label"] in labelled:  # one entry per family (inits)
                st.pop("label")
            elif st.get("label") is not None:
                labelled.add(st["label"])
            ax.plot(*_positive(th.time[:, r], tf(th.values[src][:, r]), log_y), **st)
            scale.append(tf(th.values[src][:, r]))
    for i, (name, t) in enumerate((phases or {}).items()):
        if t is not None and np.isfinite(t) and t > 0:
            ax.axvline(t, color="gray", ls=":", lw=1)
            ax.text(t, 0.98 - 0.07 * i, f" {name}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="gray")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            tops = [float(np.nanmax(np.where(np.asarray(v) > 0, v, np.nan))) for v in scale
                    if np.any(np.asarray(v) > 0)]
        top = 100 * max(tops) if tops else float("nan")
        if np.isfinite(top) and ax.get_ylim()[1] > top:  # diverging replicas would squash the rest
            ax.set_ylim(top=top)
    ax.set_xlabel("time t = lr · steps")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=8, loc="best")


def run_figures(out_dir, measured, theory=(), phases=None, title="") -> list:
    """Write ``mse.png``, ``loss.png``, ``su.png`` and ``one_minus_u.png`` into ``out_dir``; return paths."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("mse", "loss", "one_minus_u"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw_metric(ax, metric, measured, theory, phases)
        ax.set_title(title, fontsize=9)
        paths.append(_save(fig, out / f"{metric}.png"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, m in zip(axes, ("u", "s")):
        draw_metric(ax, m, measured, theory, phases)
        ax.set_ylim(0, linear_top(measured, theory, m))
        if m == "s":
            ax.axhline(1 / 3, color="gray", lw=0.8)
    fig.suptitle(title, fontsize=9)
    paths.append(_save(fig, out / "su.png"))
    return paths


def linear_top(measured, theory=(), metric: str = "u") -> float:
    """Upper y-limit of a linear ``|u|`` or ``s`` panel: 1.3 x the largest value of the theory curves
    (the ``s*`` scale), raised to the measured median where that lies above (noise, few replicas) but
    never past 3 x the theory scale, so that a diverging replica does not flatten the rest; without
    theory, 1.3 x the measured median's maximum."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        th = [float(np.nanmax(np.abs(c.values[metric]))) for c in theory
              if metric in c.values and np.isfinite(c.values[metric]).any()]
        med = (float(np.nanmax(np.nanmedian(np.abs(measured.values[metric]), axis=1)))
               if measured is not None and np.isfinite(measured.values[metric]).any() else float("nan"))
    if th:
        base = max(th)
        top = 1.3 * base if not med > 1.3 * base else min(1.05 * med, 3.0 * base)
    else:
        top = 1.3 * med
    return top if np.isfinite(top) and top > 0 else 1.05


def _save(fig, path: Path) -> Path:
    import os

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    _plt().close(fig)
    return path
