"""W&B offline contents; kill -9 + resume gives the uninterrupted trajectory; skip-finished."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prtorch.record import read_csv
from wandb_offline import history, read_records, run_info, summary

sys.path.insert(0, os.path.dirname(__file__))


def _env(**kw):
    return dict(os.environ, PYTHONUNBUFFERED="1", **kw)


def test_offline_wandb_run_holds_metrics_summary_and_figures(tmp_path):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "prtorch.train", "data.d=30", "train.time=20", "replicas=3",
                        "train.log_per_decade=6", f"hydra.run.dir={run}", "logger=wandb", "logger.tags=[ci]"],
                       capture_output=True, text=True, env=_env(WANDB_MODE="offline"), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    recs = read_records(files[0])
    info = run_info(recs)
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert info.run_id == run_id and "a=1.5 d=30" in info.display_name
    assert "ci" in list(info.tags)
    hist = history(recs)
    pts = [h for h in hist if "mse/median" in h]
    m = read_csv(run / "metrics.csv")
    assert len(pts) == len(np.unique(m["time"]))  # one W&B point per record time
    t = np.array([float(h["time"]) for h in pts])
    assert np.all(np.diff(t) > 0) and t[-1] == pytest.approx(20.0)
    # the logged medians are those of metrics.csv
    last = m["time"] == m["time"].max()
    assert float(pts[-1]["mse/median"]) == pytest.approx(float(np.median(m["mse"][last])), rel=1e-9)
    assert any(k.startswith("figures/") for h in hist for k in h)  # figures as images
    assert any(k.startswith("charts/") for h in hist for k in h)  # theory vs measurement charts
    summ = summary(recs)
    s = json.loads((run / "summary.json").read_text())
    assert json.loads(summ["status"]) == "ok"
    assert float(summ["steps_per_second"]) == pytest.approx(s["steps_per_second"])
    assert "phases/T1/measured/value" in summ and "exponents/mse_tail_drop/predicted" in summ


def _start(run, extra=()):
    args = [sys.executable, "-m", "prtorch.train", "data.d=200", "train.time=300", "replicas=4",
            "optim.lr=0.005", "train.checkpoint_every=0.3", "engine=reference", "logger=none",
            "theory.sgd_de=false", f"hydra.run.dir={run}", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


@pytest.mark.slow
def test_kill_9_and_resume_equals_uninterrupted_run(tmp_path):
    a, b = tmp_path / "interrupted", tmp_path / "straight"
    proc = _start(a)
    t0 = time.time()
    while not (a / "checkpoint.pt").exists() and time.time() - t0 < 120:
        time.sleep(0.2)
    time.sleep(1.0)  # let it run past a checkpoint, then kill without warning
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_csv(a / "metrics.csv")
    assert json.loads((a / "summary.json").read_text())["status"] == "running"
    out = _start(a).communicate(timeout=600)
    assert "resuming from step" in out[1] + out[0]
    straight = _start(b)
    straight.communicate(timeout=600)
    ra, rb = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert len(partial["time"]) < len(ra["time"])
    assert len(ra["time"]) == len(rb["time"])
    key = list(zip(ra["time"], ra["replica"]))
    assert len(set(key)) == len(key)  # every (time, replica) exactly once
    for col in ("time", "replica", "mse", "loss", "s", "u"):
        assert np.array_equal(ra[col], rb[col]), col  # bit for bit
    assert json.loads((a / "summary.json").read_text())["status"] == "ok"
    assert not (a / "checkpoint.pt").exists()


def test_sigterm_checkpoints_and_resumes(tmp_path):
    a = tmp_path / "term"
    proc = _start(a, ["train.checkpoint_every=1000"])
    t0 = time.time()
    while not (a / "summary.json").exists() and time.time() - t0 < 120:
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    s = json.loads((a / "summary.json").read_text())
    assert s["status"] == "interrupted"
    assert (a / "checkpoint.pt").exists() and (a / "metrics.csv").exists()
    # the checkpoint carries the time spent so far; the resumed run's wall_time includes it
    import torch

    elapsed = torch.load(a / "checkpoint.pt", map_location="cpu", weights_only=False)["elapsed"]
    assert elapsed > 1.0
    _start(a, ["train.checkpoint_every=1000"]).communicate(timeout=600)
    s = json.loads((a / "summary.json").read_text())
    assert s["status"] == "ok" and s["wall_time"] > elapsed
