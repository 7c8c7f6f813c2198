"""Sweeps through the real launchers (joblib, submitit_local); failure isolation; skip-finished."""
import json
import os
import subprocess
import sys

import pytest

SWEEP = ["data.a=1.5,2", "data.d=30", "train.time=5", "replicas=2", "logger=none", "engine=reference"]


def multirun(root, *args):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "prtorch.train", "-m", f"paths.root={root}", *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def statuses(sweep_dir):
    return {p.parent.name: json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.parametrize("launcher", ["local_parallel", "local_submitit"])
def test_multirun_through_launcher(tmp_path, launcher):
    multirun(tmp_path, f"hydra/launcher={launcher}", "sweep_name=sw", *SWEEP)
    st = statuses(tmp_path / "multirun" / "sw")
    assert sorted(st) == ["data.a=1.5,data.d=30,engine=reference,replicas=2,train.time=5",
                          "data.a=2,data.d=30,engine=reference,replicas=2,train.time=5"]
    assert set(st.values()) == {"ok"}


def test_failed_job_is_recorded_and_sweep_goes_on_then_relaunch_runs_only_missing(tmp_path):
    sweep = tmp_path / "multirun" / "sw"
    bad = sweep / "data.a=2,data.d=30,engine=reference,replicas=2,train.time=5"
    bad.mkdir(parents=True)
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")  # a damaged file: that job fails
    p = multirun(tmp_path, "sweep_name=sw", *SWEEP)
    st = statuses(sweep)
    assert st["data.a=1.5,data.d=30,engine=reference,replicas=2,train.time=5"] == "ok"
    assert st[bad.name] == "failed"
    err = json.loads((bad / "summary.json").read_text())["error"]
    assert "checkpoint" in err.lower() or "unpickl" in err.lower() or "load" in err.lower()
    assert "job failed" in p.stderr
    # repair and relaunch the same sweep: the finished job is skipped, the failed one runs
    (bad / "checkpoint.pt").unlink()
    ok_summary = (sweep / "data.a=1.5,data.d=30,engine=reference,replicas=2,train.time=5" / "summary.json").read_text()
    p = multirun(tmp_path, "sweep_name=sw", *SWEEP)
    assert "skipped (already finished)" in p.stdout
    assert set(statuses(sweep).values()) == {"ok"}
    assert (sweep / "data.a=1.5,data.d=30,engine=reference,replicas=2,train.time=5" / "summary.json").read_text() == ok_summary
