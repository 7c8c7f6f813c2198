"""Experiment presets and ``prtorch-analyze``: presets declare what they run; a real tiny multirun of
a preset's own sweep is analysed into one row per sweep point that matches the runs' summaries;
learning-rate lists are split into points; bad input exits 2 with one line.

(Composing and validating every preset is in tests/test_config.py.)
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import prtorch.train as train
from prtorch import analyze as A

CONF = Path(train.CONF_DIR)
EXP = CONF / "experiment"
REPO = Path(__file__).resolve().parents[1]
PAPER = ["fig1", "fig2", "fig3", "fig4", "fig5", "fig6", "isotropic"]
REVIEW = ["escape_tail", "sgd_vs_gf", "finite_d", "init"]
SWEEPS = {"fig1": "data.a", "fig3": "data.a", "fig5": "data.a", "fig6": "data.d", "escape_tail": "data.a",
          "sgd_vs_gf": "optim.batch_size", "finite_d": "data.d", "init": "init.norm"}


def env():
    return dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")


def compose_hydra(preset, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=[f"experiment={preset}", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("base", PAPER + REVIEW)
def test_presets_full_and_small_declare_their_command(base):
    for preset in (base, f"{base}_small"):
        text = (EXP / f"{preset}.yaml").read_text()
        assert text.startswith("# @package _global_")
        cfg = compose_hydra(preset)
        assert cfg.name == preset
        sp = cfg.hydra.sweeper.params
        params = OmegaConf.to_container(sp) if sp is not None else {}
        if base in SWEEPS:
            assert SWEEPS[base] in params, params
            assert f"prtorch-train -m experiment={preset}" in text
            assert f"prtorch-analyze outputs/multirun/{preset}" in text
            assert cfg.sweep_name == preset
        else:
            assert not params
            assert f"prtorch-train experiment={preset}" in text
            assert f"prtorch-analyze outputs/runs/experiment={preset}" in text
    full, small = compose_hydra(base), compose_hydra(f"{base}_small")
    assert full.optim.algorithm == small.optim.algorithm
    if base in ("fig2", "fig3", "fig4", "fig6", "escape_tail"):
        assert full.optim.algorithm == "gd"


def test_paper_settings_where_the_paper_gives_them():
    f2 = compose_hydra("fig2")
    assert (f2.data.a, f2.data.d, f2.optim.lr, f2.train.time) == (2.0, 1000, 0.01, 1e5)  # 1e7 steps
    f3 = compose_hydra("fig3")
    assert (f3.data.d, f3.optim.lr) == (1000, 0.001)
    f4 = compose_hydra("fig4")
    assert (f4.data.d, f4.optim.lr, f4.measure.eps) == (300, 0.001, 0.1)  # T2 where u = 0.9
    f5 = compose_hydra("fig5")
    assert (f5.data.d, f5.optim.lr, f5.optim.batch_size, f5.data.label_noise) == (300, 0.001, 1, 0.05)
    assert f5.hydra.sweeper.params["data.a"] == "0.5,1,1.5"
    f6 = compose_hydra("fig6")
    assert f6.hydra.sweeper.params["data.a"] == "1.5,2,4"
    assert f6.hydra.sweeper.params["data.d"] == "500,2000,5000"
    assert compose_hydra("isotropic_small").data.a == 0


def test_reproduce_script_runs_every_small_preset():
    script = REPO / "scripts" / "reproduce_paper.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    listed = set(re.search(r"DEFAULT_PRESETS=\(([^)]*)\)", script.read_text()).group(1).split())
    assert listed == {p.stem for p in EXP.glob("*_small.yaml")}
    assert "paths.root=$ROOT" in script.read_text()


# ----------------------------------------------------------------------------------------------
# a real multirun of a preset's own sweep, then prtorch-analyze

TINY = ["data.d=24", "train.time=3", "train.log_per_decade=8", "replicas=3", "logger=none",
        "measure.bootstrap=50", "engine=reference"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    # fig3_small sweeps data.a over 5 values (GD, per-replica inits); shrink everything else
    p = subprocess.run([sys.executable, "-m", "prtorch.train", "-m", "experiment=fig3_small",
                        f"paths.root={root}", *TINY], capture_output=True, text=True, env=env(), timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = root / "multirun" / "fig3_small"
    out = root / "analysis"
    a = subprocess.run([sys.executable, "-m", "prtorch.analyze", str(sweep), "--out", str(out), "--dpi", "60"],
                       capture_output=True, text=True, env=env(), timeout=400)
    assert a.returncode == 0, a.stderr[-3000:]
    return sweep, out


def test_preset_sweep_ran_every_point(tiny_sweep):
    sweep, _ = tiny_sweep
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert sorted(s["config"]["data"]["a"] for s in summaries) == [0.5, 1.0, 1.5, 2.0, 3.0]
    assert all(s["status"] == "ok" and s["config"]["name"] == "fig3_small" for s in summaries)


def _nan(x) -> float:
    """summary.json holds null where a value is NaN (strict JSON)."""
    return float("nan") if x is None else float(x)


def test_analysis_tables_match_the_summaries(tiny_sweep):
    sweep, out = tiny_sweep
    summaries = {json.loads(p.read_text())["config"]["data"]["a"]: json.loads(p.read_text())
                 for p in sweep.glob("*/summary.json")}
    for name, section in (("phases.csv", "phases"), ("exponents.csv", "exponents")):
        cols = A.read_table(out / name)
        assert len(cols["a"]) == 5 and sorted(cols["a"]) == sorted(summaries)  # one row per sweep point
        assert {"point", "n_runs", "status"} <= set(cols)
        names = [k for k in next(iter(summaries.values())).get(section, {})]
        assert names, f"no {section} section in the summaries"
        for n in names:
            assert {f"{n}_value", f"{n}_ci_low", f"{n}_ci_high", f"{n}_predicted"} <= set(cols), n
        for i, a in enumerate(cols["a"]):
            s = summaries[a]
            assert cols["n_runs"][i] == 1
            for n in names:
                e = s[section][n]
                for k in ("value", "ci_low", "ci_high"):
                    np.testing.assert_equal(cols[f"{n}_{k}"][i], _nan(e["measured"][k]))
                np.testing.assert_equal(cols[f"{n}_predicted"][i], _nan(e["predicted"]))
    pts = A.read_table(out / "points.csv")
    for i, a in enumerate(pts["a"]):
        assert pts["final_mse"][i] == pytest.approx(summaries[a]["final"]["mse"], rel=1e-9)
        assert pts["replicas"][i] == 3


def test_analysis_figures_and_report(tiny_sweep):
    _, out = tiny_sweep
    for f in ("sweep_mse.png", "sweep_one_minus_u.png", "sweep_u.png", "sweep_loss.png", "sweep_phases.png",
              "sweep_exponents.png", "escape_vs_tail.png", "phase3.png"):
        assert (out / f).stat().st_size > 5_000, f
    assert len(list((out / "points").glob("*.png"))) == 5
    report = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == 5 + 8 and all((out / ln).exists() for ln in links)
    assert "| a=0.5 |" in report and "T1 measured" in report


def test_missing_sections_are_tolerated(tiny_sweep, tmp_path):
    sweep, _ = tiny_sweep
    run = next(iter(sorted(sweep.glob("*/summary.json")))).parent
    copy = tmp_path / "runs" / "bare"
    shutil.copytree(run, copy)
    s = json.loads((copy / "summary.json").read_text())
    for k in ("phases", "exponents", "settings"):
        s.pop(k, None)
    (copy / "summary.json").write_text(json.dumps(s))
    A.analyze(tmp_path / "runs", tmp_path / "an", dpi=40, point_figures=False, log=lambda *_: None)
    cols = A.read_table(tmp_path / "an" / "phases.csv")
    assert len(cols["point"]) == 1 and "T1_value" in cols
    assert (tmp_path / "an" / "report.md").exists()


def test_seeds_are_pooled_into_one_point(tiny_sweep, tmp_path):
    sweep, _ = tiny_sweep
    run = next(iter(sorted(sweep.glob("*/summary.json")))).parent
    for seed in (0, 1):
        copy = tmp_path / "runs" / f"seed={seed}"
        shutil.copytree(run, copy)
        s = json.loads((copy / "summary.json").read_text())
        s["config"]["seed"] = seed
        (copy / "summary.json").write_text(json.dumps(s))
    A.analyze(tmp_path / "runs", tmp_path / "an", dpi=40, point_figures=False, log=lambda *_: None)
    cols = A.read_table(tmp_path / "an" / "phases.csv")
    assert list(cols["n_runs"]) == [2]
    np.testing.assert_equal(cols["T1_value"][0], float(s["phases"]["T1"]["measured"]["value"]))
    # the point figure draws each seed (instance) apart, its theory in the seed's colour
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from prtorch.plots import draw_metric

    pts, _ = A.group_points(A.find_runs(tmp_path / "runs"))
    A.measure_points(pts)
    (p,) = pts
    assert p.seeds == [0, 1]
    fig, ax = plt.subplots()
    draw_metric(ax, "mse", A.point_measured(p), A.point_theory(p), group="seed")
    lines = {str(ln.get_label()): ln.get_color() for ln in ax.get_lines()}
    med = {sd: next(c for lab, c in lines.items() if "median" in lab and f"seed={sd}" in lab) for sd in (0, 1)}
    gf = {sd: next(c for lab, c in lines.items() if "gradient flow" in lab and f"seed={sd}" in lab) for sd in (0, 1)}
    assert med[0] != med[1] and gf == med
    plt.close(fig)


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_reusable_sweeps_compose(sweep):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=["experiment=fig3_small", f"+sweep={sweep}"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert "data.a" in params and len(params) >= 1


# ----------------------------------------------------------------------------------------------
# learning-rate lists: one point per learning rate, measured on its own replicas

def test_lr_list_is_split_into_points(tmp_path):
    from prtorch.job import run_job

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[
            "experiment=sgd_vs_gf_small", "data.d=20", "train.time=4", "replicas=2", "logger=none",
            "theory.sgd_de=false", "measure.bootstrap=20", "optim.lr=[0.005,0.02,1.5]", "train.progress=false",
            "engine=reference"])
    cfg.paths.output_dir = "unused"
    c = OmegaConf.to_container(cfg, resolve=True)
    s = run_job(c, tmp_path / "sweep" / "B=1")
    assert s["status"] == "diverged" and {d["lr"] for d in s["diverged"]} == {1.5}
    A.analyze(tmp_path / "sweep", tmp_path / "an", dpi=40, point_figures=False, log=lambda *_: None)
    cols = A.read_table(tmp_path / "an" / "phases.csv")
    assert sorted(cols["lr"]) == [0.005, 0.02, 1.5]
    pts = A.read_table(tmp_path / "an" / "points.csv")
    assert list(pts["replicas"]) == [2, 2, 2]
    assert pts["final_time"][0] == pytest.approx(4.0) and pts["final_time"][1] == pytest.approx(4.0)
    assert (tmp_path / "an" / "sweep_mse.png").exists()  # one curve per learning rate
    # the per-lr numbers are the run's own per_lr reports; the diverged lr is not measured on its blow-up
    by_lr = {r["settings"]["lr"]: r for r in s["per_lr"]}
    for i, lr in enumerate(cols["lr"]):
        assert cols["T1_n"][i] == by_lr[lr]["phases"]["T1"]["measured"]["n"]
        np.testing.assert_equal(cols["T1_value"][i], by_lr[lr]["phases"]["T1"]["measured"]["value"])
    dead = [d for d in s["diverged"] if d["time"] <= 4.0]
    assert dead and all(d["lr"] == 1.5 for d in dead)
    assert by_lr[1.5]["settings"]["n_diverged"] == len(dead)
    assert by_lr[1.5]["phases"]["T1"]["measured"]["n"] == 2 - len(dead)
    # a run without per_lr (written by an older prtorch) is re-measured from metrics.csv, same result
    sp = tmp_path / "sweep" / "B=1" / "summary.json"
    old = json.loads(sp.read_text())
    old.pop("per_lr")
    sp.write_text(json.dumps(old))
    A.analyze(tmp_path / "sweep", tmp_path / "an2", dpi=40, point_figures=False, log=lambda *_: None)
    cols2 = A.read_table(tmp_path / "an2" / "phases.csv")
    np.testing.assert_array_equal(cols2["T1_n"], cols["T1_n"])
    np.testing.assert_array_equal(cols2["T2_value"], cols["T2_value"])


# ----------------------------------------------------------------------------------------------
# bad input and the W&B helpers

@pytest.mark.parametrize("case", ["missing", "empty", "file"])
def test_bad_input_one_line_exit_2(case, tmp_path):
    target = {"missing": tmp_path / "nope", "empty": tmp_path, "file": tmp_path / "f.txt"}[case]
    if case == "file":
        target.write_text("x")
    p = subprocess.run([sys.executable, "-m", "prtorch.analyze", str(target)], capture_output=True, text=True,
                       env=env(), timeout=120)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prtorch-analyze: error:") and "Traceback" not in err[0], err


def test_wandb_table_and_summary_round_trip(tmp_path):
    table = {"columns": ["source", "replica", "lr", "time", "mse", "loss", "s", "u"],
             "data": [["sgd", 0, 0.01, 0.0, 1.0, 3.0, 0.1, 0.0], ["sgd", 0, 0.01, 1.0, 0.5, 1.0, 0.5, 0.5],
                      ["gf", 0, None, 0.0, 1.0, 3.0, 0.1, 0.0], ["gf", 0, None, 1.0, 0.4, 0.9, 0.6, 0.6]]}
    A.table_to_files(table, tmp_path)
    m, t = A.read_table(tmp_path / "metrics.csv"), A.read_table(tmp_path / "theory.csv")
    assert list(m["step"]) == [0, 100] and list(t["model"]) == ["gf", "gf"]
    s = A._unflatten({"phases/T1/measured/value": 1.5, "phases/T1/predicted": 1.2, "status": "ok"})
    assert s["phases"]["T1"]["measured"]["value"] == 1.5 and s["status"] == "ok"


def test_wandb_summary_flattens_per_lr_reports():
    from prtorch.wandb_log import _flatten

    s = {"status": "ok", "phases": {"T1": {"measured": {"value": 1.0}}},
         "per_lr": [{"settings": {"lr": 0.001}, "phases": {"T1": {"measured": {"value": 2.0}}}},
                    {"settings": {"lr": 0.03}, "phases": {"T1": {"measured": {"value": 3.0}}}}],
         "theory_checks": {"sgd_de": {"escape_noise_ratio": [0.1, 0.2], "reliable": True}}}
    f = _flatten(s)
    assert f["phases/T1/measured/value"] == 1.0
    assert f["per_lr/lr=0.001/phases/T1/measured/value"] == 2.0
    assert f["per_lr/lr=0.03/phases/T1/measured/value"] == 3.0
    assert f["theory_checks/sgd_de/reliable"] is True and "theory_checks/sgd_de/escape_noise_ratio" not in f


def test_pooling_runs_ignores_a_null_in_one_of_them():
    """summary.json writes NaN as null: the first run's null must not hide the other runs' values."""
    e0 = {"measured": {"value": None, "ci_low": None, "ci_high": None, "n": 0}, "predicted": 0.5,
          "predicted_window": None, "models": {"gf": None}, "closest": None}
    e1 = {"measured": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n": 3}, "predicted": 0.5,
          "predicted_window": 0.38, "models": {"gf": 0.41}, "closest": "tail_mass"}
    out = A._aggregate([e0, e1])
    assert out["predicted_window"] == 0.38 and out["models"]["gf"] == 0.41
    assert out["measured"]["value"] == 0.4 and out["measured"]["n"] == 3 and out["measured"]["runs"] == 2
    row = A._entry_columns("one_minus_u", e0)
    assert np.isnan(row["one_minus_u_gf"]) and np.isnan(row["one_minus_u_predicted_window"])
    assert row["one_minus_u_closest"] == ""
