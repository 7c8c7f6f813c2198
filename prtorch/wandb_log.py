"""Weights & Biases mirror of a run (the local files stay the source of truth).

One W&B run per job, opened inside the job (``with`` semantics via :meth:`close`), offline by
default, resumable by id (stored in ``wandb_id.txt`` of the run directory). ``time`` is the x axis
of every metric. Any W&B failure (no network, no account) is reported once and logging goes on
locally: W&B can never crash or hang a run.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger("prtorch")


class NullLogger:
    run = None

    def log_point(self, row: dict) -> None: ...

    def finish(self, summary: dict, measured=None, theory=(), figures=(), failed: bool = False) -> None: ...


class WandbLogger(NullLogger):
    def __init__(self, cfg: dict, out_dir: Path, name: str, group: str | None, job_type: str):
        lc = cfg["logger"]
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = Path(out_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        try:
            import wandb

            self.wandb = wandb
            tags = list(lc.get("tags") or []) + [f"a={cfg['data']['a']}", f"d={cfg['data']['d']}",
                                                  cfg["optim"]["algorithm"]]
            self.run = wandb.init(
                project=lc["project"], entity=lc.get("entity"), mode=lc["mode"], id=run_id,
                resume="allow", name=name, group=lc.get("group") or group, job_type=job_type,
                tags=tags, config=cfg, dir=str(out_dir),
                settings=wandb.Settings(init_timeout=60, console="off", x_disable_stats=True),
            )
            self.run.define_metric("time")
            self.run.define_metric("*", step_metric="time")
        except Exception as e:  # never let W&B take a run down
            log.warning("W&B disabled for this run: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.run = None

    def log_point(self, row: dict) -> None:
        if self.run is not None:
            try:
                self.run.log(row)
            except Exception as e:
                log.warning("W&B log failed: %s", e)

    def finish(self, summary: dict, measured=None, theory=(), figures=(), failed: bool = False) -> None:
        if self.run is None:
            return
        wandb = self.wandb
        try:
            for k, v in _flatten(summary).items():
                self.run.summary[k] = v
            if measured is not None:
                self.run.log({"charts/" + m: _line_series(wandb, m, measured, theory) for m in ("mse", "loss", "u", "s")})
                self.run.log({"curves": _table(wandb, measured, theory)})
            for p in figures:
                self.run.log({f"figures/{Path(p).stem}": wandb.Image(str(p))})
        except Exception as e:
            log.warning("W&B final logging failed: %s", e)
        finally:
            try:
                self.run.finish(exit_code=1 if failed else 0)
            except Exception as e:
                log.warning("W&B finish failed: %s", e)


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested summary -> ``a/b/c`` keys of scalars. A list of reports (``per_lr``) is keyed by each
    report's ``settings.lr`` (``per_lr/lr=0.01/phases/T1/...``), other lists of dicts by position;
    lists of numbers are left out (they stay in ``summary.json``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                lr = (x.get("settings") or {}).get("lr")
                out.update(_flatten(x, f"{key}/" + (f"lr={lr:g}" if isinstance(lr, float) else str(i)) + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _median_curve(c, metric):
    t = np.nanmedian(c.time, axis=1)
    with np.errstate(all="ignore"):
        # u as |u| (runs end at +w* or -w* alike), as in the figures
        v = np.nanmedian(np.abs(c.values[metric]) if metric == "u" else c.values[metric], axis=1)
    m = np.isfinite(t) & np.isfinite(v)
    return t[m], v[m]


def _line_series(wandb, metric, measured, theory):
    """Measured median and every theory curve in one W&B chart (x = time)."""
    ys, keys = [], []
    t, v = _median_curve(measured, metric)
    xs = [t.tolist()]
    ys.append(v.tolist())
    keys.append(f"{measured.model} median")
    for th in theory:
        for r in range(th.n_curves):
            m = np.isfinite(th.values[metric][:, r])
            xs.append(th.time[m, r].tolist())
            y = th.values[metric][m, r]
            ys.append((np.abs(y) if metric == "u" else y).tolist())
            lr = th.columns.get("lr")
            keys.append(th.model + (f" lr={lr[r]:g}" if lr is not None else ""))
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=f"{metric} vs time (measured and theory)", xname="time")


def _table(wandb, measured, theory):
    cols = ["source", "replica", "lr", "time", "mse", "loss", "s", "u"]
    rows = []
    for c in (measured, *theory):
        for row in c.rows():
            rows.append([c.model, row.get("replica", row.get("init", 0)), row.get("lr", float("nan")),
                         row["time"], row["mse"], row["loss"], row["s"], row["u"]])
    return wandb.Table(columns=cols, data=rows)
