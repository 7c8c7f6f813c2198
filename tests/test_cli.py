"""The real CLI: a short run writes every file with the right contents; a two-job multirun;
divergence is recorded; finished work is skipped."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from prtorch.record import read_csv

SMALL = ["data.d=40", "data.a=1.5", "train.time=30", "train.log_per_decade=8", "replicas=3",
         "optim.lr=0.01", "theory.sgd_de=true"]


def cli(tmp_path, *args, check=True):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    flags = [a for a in args if a.startswith("-")]  # Hydra wants flags before overrides
    rest = [a for a in args if not a.startswith("-")]
    p = subprocess.run([sys.executable, "-m", "prtorch.train", *flags, f"paths.root={tmp_path}", *rest],
                       capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_single_run_writes_all_files(tmp_path):
    p = cli(tmp_path, *SMALL, "logger=none")
    run = tmp_path / "runs" / "data.a=1.5,data.d=40,optim.lr=0.01,replicas=3,theory.sgd_de=true,train.log_per_decade=8,train.time=30"
    assert str(run) in p.stdout
    def strict(token):
        raise AssertionError(f"summary.json is not strict JSON: {token}")

    s = json.loads((run / "summary.json").read_text(), parse_constant=strict)
    assert s["status"] == "ok" and s["steps"] == 3000 and s["steps_per_second"] > 0
    assert s["config"]["data"]["d"] == 40 and s["wall_time"] > 0
    assert set(s["final"]) >= {"mse", "loss", "s", "u"}
    m = read_csv(run / "metrics.csv")
    assert {"step", "time", "replica", "lr", "mse", "loss", "s", "u"} <= set(m)
    assert m["time"].max() == pytest.approx(30.0) and m["time"].min() == 0.0
    assert np.allclose(m["time"], m["step"] * m["lr"])
    assert set(m["replica"]) == {0, 1, 2}
    # log-spaced: ~8 points per decade of steps, plus 0 and the end
    n_times = len(np.unique(m["time"]))
    assert 20 <= n_times <= 40
    t = read_csv(run / "theory.csv")
    assert set(np.unique(t["model"])) == {"gf", "sgd_de", "phase3"}
    chk = s["theory_checks"]["sgd_de"]  # one DE curve (one shared init, one lr)
    assert len(chk["escape_noise_ratio"]) == 1 and chk["escape_noise_ratio"][0] >= 0
    assert chk["reliable"] == (chk["escape_noise_ratio"][0] <= chk["threshold"])
    z = np.load(run / "instance.npz")
    assert z["w0"].shape == (3, 40) and z["lam"].shape == (40,) and z["w_star"].shape == (40,)
    # the logged metrics are those of the stored instance: recompute loss from s, u
    ss = float(np.sum(z["lam"] * z["w_star"] ** 2))
    assert np.allclose(m["loss"], 3 * m["s"] ** 2 + 3 * ss**2 - 4 * m["u"] ** 2 - 2 * m["s"] * ss, rtol=1e-5, atol=1e-6)
    # at t=0 the metrics are those of w0
    w0 = z["w0"][0]
    i0 = np.flatnonzero((m["time"] == 0) & (m["replica"] == 0))[0]
    assert m["s"][i0] == pytest.approx(float(np.sum(z["lam"] * w0**2)), rel=1e-5)
    for f in ("mse.png", "loss.png", "su.png", "one_minus_u.png"):
        assert (run / "figures" / f).stat().st_size > 10_000
    # re-running the same command skips the finished run
    p2 = cli(tmp_path, *SMALL, "logger=none")
    assert "skipped" in p2.stdout
    assert json.loads((run / "summary.json").read_text())["wall_time"] == s["wall_time"]


def test_two_job_multirun(tmp_path):
    p = cli(tmp_path, "-m", "data.a=1.5,2", "data.d=30", "train.time=10", "replicas=2", "logger=none",
            "sweep_name=sw")
    jobs = sorted((tmp_path / "multirun" / "sw").glob("*/summary.json"))
    assert len(jobs) == 2, p.stdout + p.stderr
    a = sorted(json.loads(j.read_text())["config"]["data"]["a"] for j in jobs)
    assert a == [1.5, 2.0]
    assert all(json.loads(j.read_text())["status"] == "ok" for j in jobs)


def test_divergence_is_recorded_and_others_go_on(tmp_path):
    cli(tmp_path, "data.d=30", "train.time=20", "replicas=2", "optim.lr=[0.005,2.0]", "logger=none",
        "hydra.run.dir=" + str(tmp_path / "div"))
    s = json.loads((tmp_path / "div" / "summary.json").read_text())
    assert s["status"] == "diverged"
    assert {d["lr"] for d in s["diverged"]} == {2.0}
    assert {d["replica"] for d in s["diverged"]} == {1, 3}  # replica = stream * L + lr index
    m = read_csv(tmp_path / "div" / "metrics.csv")
    assert np.all(np.isfinite(m["mse"]))
    ok = m["lr"] == 0.005
    assert m["time"][ok].max() == pytest.approx(20.0)  # the healthy replicas ran to the end
    assert s["final"]["mse"] < 0.5
    # phases per learning rate: the diverged replicas are left out, not measured on their blow-up
    assert [r["settings"]["lr"] for r in s["per_lr"]] == [0.005, 2.0]
    healthy, dead = s["per_lr"]
    assert s["phases"] == healthy["phases"] and healthy["settings"]["n_diverged"] == 0
    assert dead["settings"]["n_diverged"] == 2 and dead["phases"]["T2"]["measured"]["n"] == 0
    assert healthy["phases"]["T1"]["measured"]["n"] == 2 and dead["final"]["mse"] is None
    assert healthy["final"]["mse"] == pytest.approx(s["final"]["mse"])
    # the SGD equivalent is flagged at lr = 2: past the GD edge, and the runs diverged there
    chk = s["theory_checks"]["sgd_de"]
    assert chk["lr"] == [0.005, 2.0] and chk["gd_stability_edge"] < 2.0
    assert chk["runs_diverged_fraction"] == [0.0, 1.0] and chk["reliable"] is False and "2.0" in chk["warning"]
    st = s["theory_checks"]["stability"]
    assert st["past_edge"] == [False, True] and st["gd_stability_edge"] == chk["gd_stability_edge"]
    assert st["runs_diverged_fraction"] == [0.0, 1.0]
    assert "2.0" in st["warning"]


def test_every_learning_rate_records_the_horizon(tmp_path):
    """With a list of learning rates each one records its last step before ``train.time`` (the shared
    log grid alone would leave the larger ones ending early), and ``per_lr`` finals are at that time."""
    cli(tmp_path, "data.d=20", "train.time=10", "replicas=2", "optim.lr=[0.003,0.007,0.011]", "logger=none",
        "theory.sgd_de=false", "hydra.run.dir=" + str(tmp_path / "lrs"))
    m = read_csv(tmp_path / "lrs" / "metrics.csv")
    for lr in (0.003, 0.007, 0.011):
        t_last = m["time"][m["lr"] == lr].max()
        assert 10.0 - lr < t_last <= 10.0 + 1e-9, (lr, t_last)
    s = json.loads((tmp_path / "lrs" / "summary.json").read_text())
    assert [r["settings"]["lr"] for r in s["per_lr"]] == [0.003, 0.007, 0.011]
    assert all(r["settings"]["n_curves"] == 2 for r in s["per_lr"])


def test_a_single_step_run(tmp_path):
    """``train.time = lr`` (one step, allowed by the config check) runs, with its theory curves."""
    cli(tmp_path, "data.d=20", "train.time=0.5", "optim.lr=0.5", "replicas=2", "logger=none",
        "hydra.run.dir=" + str(tmp_path / "one"))
    s = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s["steps"] == 1 and s["status"] in ("ok", "diverged")
    t = read_csv(tmp_path / "one" / "theory.csv")
    assert sorted(set(t["time"][t["model"] == "gf"])) == [0.0, 0.5]


def test_killed_after_the_simulation_resumes_at_its_end(tmp_path, monkeypatch):
    """A job killed while computing theory/figures (status still 'running') keeps a checkpoint of
    the finished simulation: the rerun does not simulate again and writes the same metrics."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import prtorch.job as job
    import prtorch.train as train

    with initialize_config_dir(version_base="1.3", config_dir=str(train.CONF_DIR)):
        cfg = compose(config_name="config", overrides=["data.d=20", "train.time=5", "replicas=2", "logger=none",
                                                       "train.progress=false", "theory.sgd_de=false"])
    cfg.paths.output_dir = "unused"
    c = OmegaConf.to_container(cfg, resolve=True)
    out = tmp_path / "job"

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "compute_theory", killed)
    with pytest.raises(KeyboardInterrupt):
        job.run_job(c, out)
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    assert (out / "checkpoint.pt").exists()
    before = read_csv(out / "metrics.csv")
    monkeypatch.undo()
    calls = []
    real = job.simulate

    def counting(*a, **k):
        calls.append(k["state"].step if k.get("state") is not None else None)
        return real(*a, **k)

    monkeypatch.setattr(job, "simulate", counting)
    s = job.run_job(c, out)
    assert s["status"] == "ok" and calls == [s["steps"]]  # resumed at the last step: nothing left to run
    after = read_csv(out / "metrics.csv")
    for col in ("time", "replica", "mse", "u"):
        np.testing.assert_array_equal(after[col], before[col])
    assert not (out / "checkpoint.pt").exists()
