"""One job, top to bottom: instance -> simulation -> theory -> measurement -> files, figures, W&B.

``run_job(cfg, out_dir)`` takes a plain, resolved config dict (the Hydra app in
:mod:`prtorch.train` passes one; tests and scripts can build one by hand) and writes into
``out_dir``:

* ``instance.npz``  lam, w_star, w0 (R, d): recompute any theory on the exact instance;
* ``metrics.csv``   one row per (time, replica): step, time, replica, lr, mse, loss, s, u;
* ``theory.csv``    model (gf, sgd_de), init, lr, time, mse, loss, s, u;
* ``summary.json``  config, status, wall time, steps/s, final metrics, diverged replicas,
  measured-vs-predicted phases and exponents;
* ``figures/*.png`` and the W&B run.

Every file is written atomically. While running, ``checkpoint.pt`` (weights, RNG state, step,
records) is refreshed every ``train.checkpoint_every`` seconds and on SIGTERM/SIGINT; calling
``run_job`` again on the same directory resumes from it, or returns at once if the run finished.
"""
from __future__ import annotations

import io
import logging
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from prtorch import record
from prtorch.config import ConfigError, identity, learning_rates, validate
from prtorch.problem import Instance, make_instance
from prtorch.simulate import SimState, resolve_device, simulate, state_curves

log = logging.getLogger("prtorch")
FINISHED = ("ok", "diverged")
METRIC_FIELDS = ["step", "time", "replica", "lr", "mse", "loss", "s", "u"]
THEORY_FIELDS = ["model", "init", "lr", "time", "mse", "loss", "s", "u"]


class Interrupted(Exception):
    """Raised at a chunk boundary after SIGTERM/SIGINT, once the checkpoint is on disk."""


def read_summary(out_dir) -> dict | None:
    p = Path(out_dir) / "summary.json"
    if not p.exists():
        return None
    import json

    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def run_name(cfg: dict) -> str:
    d, o = cfg["data"], cfg["optim"]
    lr = ",".join(f"{x:g}" for x in learning_rates(o["lr"]))
    exp = f"{cfg['name']} " if cfg.get("name") else ""
    batch = f" B={o['batch_size']}" if o["algorithm"] == "sgd" else ""  # GD and GF have no batch
    return f"{exp}{o['algorithm']} a={d['a']:g} d={d['d']} lr={lr}{batch} seed={cfg['seed']}"


def _archive(out: Path) -> None:
    """Move the files of a different earlier run aside (nothing a user ran is deleted)."""
    dest = out / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name not in ("superseded", ".hydra") and not p.name.endswith(".log"):
            shutil.move(str(p), dest / p.name)
    log.warning("the config changed: the earlier run's files were moved to %s", dest)


class _Progress:
    """tqdm on a terminal; a plain log line every 30 s otherwise (SLURM logs)."""

    def __init__(self, total: int, start: int, enabled: bool, name: str):
        self.total, self.enabled, self.name = total, enabled, name
        self.bar = None
        self.last, self.t0, self.start = time.monotonic(), time.monotonic(), start
        self.mse = float("nan")
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", unit_scale=True, desc=name, leave=False)

    def update(self, step: int, mse: float | None = None) -> None:
        if mse is not None:
            self.mse = mse
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"mse={self.mse:.3g}", refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last > 30:
            self.last = time.monotonic()
            rate = (step - self.start) / max(time.monotonic() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("%s: step %d/%d (%.1f%%), %.3g steps/s, ETA %.0f s, median mse %.3g",
                     self.name, step, self.total, 100 * step / self.total, rate, eta, self.mse)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(cfg: dict, out_dir, group: str | None = None, job_type: str = "train") -> dict:
    """Run (or resume, or skip) the job described by ``cfg`` in ``out_dir``; return its summary."""
    validate(cfg)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("")
        (out / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"paths.output_dir={str(out)!r}: not writable ({e.strerror})") from None
    ident = identity(cfg)
    prev = read_summary(out)
    if prev is not None and prev.get("identity") != ident:
        _archive(out)
        prev = None
    if prev is not None and prev.get("status") in FINISHED and not cfg["force"]:
        log.info("already finished (%s): %s", prev["status"], out)
        prev["skipped"] = True
        return prev

    t_start = time.perf_counter()
    d, a, S = cfg["data"]["d"], float(cfg["data"]["a"]), cfg["replicas"]
    lrs = np.asarray(learning_rates(cfg["optim"]["lr"]))
    algorithm = cfg["optim"]["algorithm"]
    dev = resolve_device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    n_steps = int(math.ceil(cfg["train"]["time"] / lrs.min() - 1e-9))
    steps = record.save_steps(n_steps, cfg["train"]["log_per_decade"])
    # every learning rate records its own last step before the horizon, so that all of them end at
    # t_end (the grid is shared: step k is time k * lr for each lr)
    ends = np.floor(cfg["train"]["time"] / lrs + 1e-9).astype(np.int64)
    steps = np.union1d(steps, ends[(ends > 0) & (ends <= n_steps)])

    ckpt_path = out / "checkpoint.pt"
    state = None
    if ckpt_path.exists() and not cfg["force"]:
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise RuntimeError(f"cannot read checkpoint {ckpt_path} ({type(e).__name__}: {e}); "
                               "delete it to restart this run from scratch") from None
        if ck.get("identity") == ident:
            state = SimState.from_dict(ck["state"], dev, dtype)
            t_start -= float(ck.get("elapsed", 0.0))  # wall_time counts the earlier attempts too
            log.info("resuming from step %d of %d (%s)", state.step, n_steps, ckpt_path)
    if state is not None and (out / "instance.npz").exists():
        instance = Instance.load(out / "instance.npz")
    else:
        instance = make_instance(d, a, S, seed=cfg["seed"], target=cfg["data"]["target"],
                                 init=cfg["init"]["kind"], init_norm=float(cfg["init"]["norm"]),
                                 per_replica_init=cfg["init"]["per_replica"])
        instance.save(out / "instance.npz")

    from prtorch.wandb_log import NullLogger, WandbLogger

    name = run_name(cfg)
    logger = WandbLogger(cfg, out, name, group, job_type) if cfg["logger"]["kind"] == "wandb" else NullLogger()
    summary = {"status": "running", "identity": ident, "config": cfg, "name": name,
               "output_dir": str(out), "device": str(dev)}
    record.atomic_write_json(out / "summary.json", summary)

    try:
        return _run(cfg, out, instance, state, lrs, algorithm, n_steps, steps, dev, dtype, ident,
                    name, logger, summary, t_start)
    except Interrupted:
        raise
    except Exception as e:  # record the failure here, where the W&B run is open
        import traceback

        summary.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        record.atomic_write_json(out / "summary.json", summary)
        logger.finish(summary, failed=True)
        e.prtorch_recorded = True
        raise


def _run(cfg, out, instance, state, lrs, algorithm, n_steps, steps, dev, dtype, ident, name, logger,
         summary, t_start) -> dict:
    ckpt_path = out / "checkpoint.pt"
    stop = {"signal": None}
    last_ckpt = {"t": time.monotonic()}
    progress = _Progress(n_steps, state.step if state else 0, cfg["train"]["progress"], name)

    def save_checkpoint(st: SimState) -> None:
        buf = io.BytesIO()
        torch.save({"identity": ident, "state": st.to_dict(), "elapsed": time.perf_counter() - t_start}, buf)
        record._atomic_write(ckpt_path, lambda f: f.write(buf.getvalue()))
        _write_metrics(out, st, lrs, algorithm, cfg["train"]["time"])
        last_ckpt["t"] = time.monotonic()

    def on_chunk(st: SimState) -> None:
        progress.update(st.step)
        if stop["signal"] is not None:
            save_checkpoint(st)
            raise Interrupted(f"stopped by signal {stop['signal']} at step {st.step}; rerun to resume")
        if time.monotonic() - last_ckpt["t"] > cfg["train"]["checkpoint_every"]:
            save_checkpoint(st)

    def on_record(st: SimState) -> None:
        mse = st.records["mse"][-1]
        with np.errstate(all="ignore"):
            med = float(np.nanmedian(mse)) if np.isfinite(mse).any() else float("nan")
        progress.update(st.step, med)
        row = {"time": float(st.step * lrs.min()), "step": st.step}
        for k in record.METRICS:
            v = st.records[k][-1]
            if np.isfinite(v).any():
                row[f"{k}/median"] = float(np.nanmedian(v))
        logger.log_point(row)

    old = _install_signals(stop)
    try:
        res = simulate(instance, lrs, n_steps, steps, algorithm=algorithm,
                       batch_size=cfg["optim"]["batch_size"], label_noise=float(cfg["data"]["label_noise"]),
                       seed=cfg["seed"], device=str(dev), dtype=dtype, engine=cfg["engine"], state=state,
                       on_record=on_record, on_chunk=on_chunk)
    except Interrupted as e:
        progress.close()
        summary.update(status="interrupted", error=str(e))
        record.atomic_write_json(out / "summary.json", summary)
        logger.finish(summary, failed=True)
        raise
    finally:
        _restore_signals(old)
    progress.close()
    # a kill from here on (theory, figures, W&B) loses no simulation: a rerun resumes at the end
    save_checkpoint(res.extra["state"])  # also writes metrics.csv

    measured = _trim(res.curves, cfg["train"]["time"])
    # larger learning rates run past the horizon (the steps are shared); what happens there is not
    # part of the run
    diverged = [dv for dv in res.diverged if dv["time"] <= cfg["train"]["time"] * (1 + 1e-9)]
    theory = compute_theory(cfg, instance, measured, lrs)
    record.atomic_write_csv(out / "theory.csv", (r for c in theory for r in c.rows({"model": c.model})),
                            THEORY_FIELDS)
    report = measure(cfg, instance, measured, theory, lrs)
    summary.update(
        status="diverged" if diverged else "ok",
        engine=res.engine,
        wall_time=time.perf_counter() - t_start,
        sim_wall_time=res.wall_time,
        steps=n_steps,
        steps_per_second=res.steps_per_second,
        # with several learning rates: the first one's, like phases/exponents (per_lr holds each)
        final=_final(measured.at_lr(lrs[0])),
        final_theory={c.model: _final(c.at_lr(lrs[0])) for c in theory},
        diverged=diverged,
        **report,
    )
    checks = theory_checks(theory, measured, lrs, instance, cfg["optim"]["algorithm"])
    if checks:
        summary["theory_checks"] = checks
    if cfg["dtype"] == "float32" and np.nanmin(measured.values["mse"]) < 1e-7:
        summary["warning"] = ("MSE fell below 1e-7: float32 weights (relative precision 6e-8) may stall "
                              "in the late tail; rerun with dtype=float64 to check")
        log.warning(summary["warning"])
    from prtorch.plots import PHASE_LABEL, run_figures

    phase_times = {PHASE_LABEL.get(k, k): v["measured"]["value"] for k, v in report.get("phases", {}).items()
                   if isinstance(v, dict) and isinstance(v.get("measured"), dict)}
    figures = run_figures(out / "figures", measured, theory, phase_times, title=name)
    summary["figures"] = [str(p) for p in figures]
    record.atomic_write_json(out / "summary.json", summary)
    logger.finish(summary, measured, theory, figures)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return summary


def _trim(c: record.Curves, t_end: float) -> record.Curves:
    """Drop record points past the horizon (replicas with a larger lr ran more time)."""
    time_ = c.time.copy()
    time_[time_ > t_end * (1 + 1e-9)] = np.nan
    vals = {k: np.where(np.isfinite(time_), v, np.nan) for k, v in c.values.items()}
    return record.Curves(c.model, time_, vals, c.columns)


def _write_metrics(out: Path, st: SimState, lrs, algorithm: str, t_end: float) -> None:
    # a diverged replica has no rows after its divergence (NaN is never written as data)
    rows = [r for r in _trim(state_curves(st, lrs, algorithm), t_end).rows() if np.isfinite(r["mse"])]
    for row in rows:  # time = lr * step exactly
        row["step"] = int(round(row["time"] / row["lr"]))
    record.atomic_write_csv(out / "metrics.csv", rows, METRIC_FIELDS)


def compute_theory(cfg: dict, instance: Instance, measured: record.Curves, lrs) -> list:
    """GF (and, for SGD, its deterministic equivalent) from the same init(s), on a log grid."""
    th = cfg["theory"]
    t_end = float(cfg["train"]["time"])
    times = record.save_times(t_end, max(cfg["train"]["log_per_decade"], 10), float(np.min(lrs)))
    inits = np.unique(instance.w0, axis=0) if not cfg["init"]["per_replica"] else instance.w0
    out = []
    if th["gf"]:
        from prtorch.theory.gradient_flow import gf_curves

        gf = gf_curves(inits, instance.lam, instance.w_star, times, rtol=th["rtol"])
        out.append(gf)
        p3 = phase3_prediction(gf, inits[0], instance, times, 1 - cfg["measure"]["eps"], th["rtol"])
        if p3 is not None:
            out.append(p3)
    if th["sgd_de"] and cfg["optim"]["algorithm"] == "sgd":
        from prtorch.theory.sgd_equivalent import sgd_de_curves

        w0 = np.repeat(inits, len(lrs), axis=0)
        lr = np.tile(lrs, len(inits))
        try:
            c = sgd_de_curves(w0, instance.lam, instance.w_star, times, lr,
                              batch_size=cfg["optim"]["batch_size"],
                              label_noise=float(cfg["data"]["label_noise"]), rtol=th["rtol"])
            c.columns["init"] = np.repeat(np.arange(len(inits)), len(lrs))  # the init's row, as for gf
            out.append(c)
        except Exception as e:  # a theory failure must not cost the measured run
            log.warning("SGD deterministic equivalent failed, left out: %s", e)
    return out


def theory_checks(theory: list, measured: record.Curves | None = None, lrs=None,
                  instance: Instance | None = None, algorithm: str = "sgd") -> dict:
    """Range-of-validity diagnostics of the theory curves (``summary.json`` ``theory_checks``).

    ``sgd_de`` (one value per DE curve, i.e. per init x learning rate):

    * ``escape_noise_ratio`` (:func:`prtorch.theory.sgd_equivalent.escape_noise_ratio`): above
      ``threshold`` the escape is noise-driven and the DE (a mean) no longer describes single runs;
    * ``diverged``: the DE's second moment blew up (its curve is NaN from then on);
    * ``lr`` and ``gd_stability_edge`` (:func:`prtorch.theory.phases.gd_stability_edge`, ``1/rho``):
      past the edge GD and SGD cannot converge, while the DE, an ODE, does not see it;
    * ``runs_diverged_fraction``: the fraction of the measured replicas at that learning rate that
      diverged (the DE, a mean over runs, predicts none of it).

    ``reliable`` is False, with a ``warning`` logged, if any of these says the DE is off.

    ``stability`` (every SGD/GD run): ``gd_stability_edge``, the learning rates and which are past
    the edge, with a ``warning`` if any is (GF, the theory of every run, cannot show it).
    """
    out = {}
    from prtorch.theory.measure import finite_curves
    from prtorch.theory.phases import gd_stability_edge

    edge = float("nan")
    if instance is not None:
        try:
            edge = float(gd_stability_edge(instance.lam, instance.w_star))
        except ValueError:  # w* with no weight on the spectrum
            pass
    lr_all = [float(x) for x in np.atleast_1d(lrs)] if lrs is not None else []
    # what the runs did at each learning rate
    run_div = {}
    if measured is not None and "lr" in measured.columns:
        dead = ~finite_curves(measured)
        run_div = {lr: float(dead[measured.lr_mask(lr)].mean()) for lr in lr_all if measured.lr_mask(lr).any()}
    if instance is not None and lr_all and algorithm in ("sgd", "gd"):
        st = {"gd_stability_edge": edge, "lr": lr_all, "past_edge": [bool(x > edge) for x in lr_all]}
        if run_div:
            st["runs_diverged_fraction"] = [run_div.get(x, float("nan")) for x in lr_all]
        if any(st["past_edge"]):
            st["warning"] = (f"lr = {[x for x in lr_all if x > edge]} is past the stability edge of GD at the "
                             f"optimum, 1/rho = {edge:.3g}: {algorithm.upper()} oscillates or diverges there, and "
                             "gradient flow (an ODE) does not show it")
            log.warning(st["warning"])
        out["stability"] = st
    for c in theory:
        if c.model != "sgd_de":
            continue
        from prtorch.theory.sgd_equivalent import NOISE_RATIO_WARN

        ratio = np.asarray(c.info.get("escape_noise_ratio", np.full(c.n_curves, np.nan)), dtype=float)
        lr_col = np.asarray(c.columns.get("lr", np.full(c.n_curves, np.nan)), dtype=float)
        de_div = ~finite_curves(c)
        entry = {"escape_noise_ratio": [float(r) for r in ratio], "threshold": NOISE_RATIO_WARN,
                 "diverged": [bool(x) for x in de_div], "lr": [float(x) for x in lr_col]}
        problems = []
        noisy = np.isfinite(ratio) & (ratio > NOISE_RATIO_WARN)
        if noisy.any():
            problems.append(f"escape noise ratio {float(np.max(ratio[noisy])):.2g} > {NOISE_RATIO_WARN} at lr = "
                            f"{sorted(set(lr_col[noisy].tolist()))}: the escape is noise-driven and the DE "
                            "(a mean) may be far from single runs")
        if de_div.any():
            problems.append(f"the DE diverged at lr = {sorted(set(lr_col[de_div].tolist()))}")
        if instance is not None:
            entry["gd_stability_edge"] = edge
            past = lr_col > edge
            if past.any():
                unseen = "" if de_div[past].all() else ", which the DE does not see"
                problems.append(f"lr = {sorted(set(lr_col[past].tolist()))} is past the GD stability edge "
                                f"{edge:.3g} (1/rho){unseen}")
        if run_div:
            entry["runs_diverged_fraction"] = [run_div.get(float(x), float("nan")) for x in lr_col]
            bad = [lr for lr, f in run_div.items() if f > 0 and not de_div[c.lr_mask(lr)].all()]
            if bad:
                problems.append(f"measured runs diverged at lr = {sorted(bad)}; the DE (a mean) predicts no "
                                "divergence there")
        entry["reliable"] = not problems
        if problems:
            entry["warning"] = f"{c.model}: " + "; ".join(problems) + "; compare with the measured median"
            log.warning(entry["warning"])
        out[c.model] = entry
    return out


def phase3_prediction(gf: record.Curves, w0: np.ndarray, instance: Instance, times, u_level: float,
                      rtol: float):
    """The paper's Phase-III curve ``MSE(T2) S(tau)`` from the GF state at ``T2`` (``|u|/s* = u_level``)
    of GF curve 0, which starts from ``w0``."""
    from prtorch.theory.gradient_flow import gradient_flow
    from prtorch.theory.measure import crossing_time
    from prtorch.theory.phases import phase3_curves

    s_star = float(np.sum(instance.lam * instance.w_star**2))
    t2 = crossing_time(gf.time[:, 0], np.abs(gf.values["u"][:, 0]) / s_star, u_level, "up")
    if not np.isfinite(t2) or t2 <= 0 or t2 >= times[-1]:
        return None
    w_t2 = gradient_flow(w0, instance.lam, instance.w_star, np.array([0.0, t2]), rtol=rtol)[0][-1, 0]
    taus = np.concatenate([[0.0], times[times > t2] - t2])
    return phase3_curves(taus, w_t2, instance.lam, instance.w_star, t2=t2)


def measure(cfg: dict, instance: Instance, measured: record.Curves, theory: list, lrs=None) -> dict:
    """Measured-vs-predicted phases and exponents (``phases`` and ``exponents`` sections).

    One learning rate: the report of :func:`prtorch.theory.measure.phase_report` on all replicas.
    Several: the top-level sections are those of the first learning rate (``settings.lr``) and
    ``per_lr`` holds one report per learning rate, each on its own replicas and its own DE curves,
    with that learning rate's ``final`` and ``final_theory``."""
    from prtorch.theory.measure import phase_report

    m = cfg["measure"]
    lrs = np.atleast_1d(np.asarray(lrs if lrs is not None else cfg["optim"]["lr"], dtype=float))
    kw = dict(a=float(cfg["data"]["a"]), delta=m["delta"], eps=m["eps"], n_boot=m["bootstrap"], seed=cfg["seed"])
    models = [c for c in theory if c.model != "phase3"]
    if len(lrs) == 1 or "lr" not in measured.columns:
        return phase_report(measured, {c.model: c for c in models}, instance.lam, instance.w_star,
                            instance.w0, **kw)
    per_lr = []
    for lr in lrs:
        pred = {c.model: c.at_lr(lr) for c in models}
        rep = phase_report(measured, pred, instance.lam, instance.w_star, instance.w0, mask=measured.lr_mask(lr), **kw)
        rep["settings"]["lr"] = float(lr)
        rep["final"] = _final(measured.at_lr(lr))
        rep["final_theory"] = {c.model: _final(c.at_lr(lr)) for c in theory}
        per_lr.append(rep)
    first = {k: v for k, v in per_lr[0].items() if k not in ("final", "final_theory")}
    return {**first, "per_lr": per_lr}


def _final(c: record.Curves) -> dict:
    """Median over curves of each metric at the curve's last record time (diverged curves,
    NaN there, are left out; ``u`` as ``|u|``, the sign being a symmetry of the problem)."""
    out = {}
    for k, v in c.values.items():
        last = []
        for r in range(v.shape[1]):
            f = np.flatnonzero(np.isfinite(c.time[:, r]))
            if len(f) and np.isfinite(v[f[-1], r]):
                last.append(v[f[-1], r])
        if k == "u":  # replicas end at +w* or -w* alike: report the alignment |u|
            last = [abs(x) for x in last]
        out[k] = float(np.median(last)) if last else float("nan")
    return out


def _install_signals(stop: dict):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if stop["signal"] is not None:  # second signal: stop now
            raise KeyboardInterrupt
        stop["signal"] = signum
        log.warning("signal %d: checkpointing at the next chunk, then stopping", signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(old) -> None:
    for s, h in (old or {}).items():
        signal.signal(s, h)
