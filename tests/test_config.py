"""Config composition (every preset) and bad input: one line naming the key, exit code 2, no compute."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import prtorch.train as train
from prtorch.config import ConfigError, validate

CONF = Path(train.CONF_DIR)
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=list(overrides))
    cfg.paths.output_dir = "unused"
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_config_is_valid_and_paper_like():
    cfg = composed()
    validate(cfg)
    assert cfg["optim"]["algorithm"] == "sgd" and cfg["data"]["a"] > 1 and cfg["replicas"] > 1


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = composed(f"experiment={preset}")
    validate(cfg)
    assert cfg["name"]


def test_preset_values_win_over_defaults():
    cfg = composed("experiment=smoke")
    assert cfg["replicas"] == 4 and cfg["data"]["d"] == 50 and cfg["logger"]["kind"] == "none"
    assert composed("experiment=smoke", "replicas=2")["replicas"] == 2  # the command line wins


def test_lr_list_is_a_replica_axis():
    cfg = composed("optim.lr=[0.001,0.01]")
    validate(cfg)
    assert cfg["optim"]["lr"] == [0.001, 0.01]


BAD = [
    (["data.d=abc"], "data.d"),
    (["data.dd=3"], "data.dd"),
    (["data.d=0"], "data.d=0"),
    (["data.a=-1"], "data.a=-1"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.batch_size=0"], "optim.batch_size=0"),
    (["device=cuda"], "device='cuda'"),
    (["dtype=float16"], "dtype='float16'"),
    (["replicas=0"], "replicas=0"),
    (["experiment=no_such_preset"], "experiment='no_such_preset'"),
    (["logger=nope"], "logger='nope'"),
    (["engine=turbo"], "engine='turbo'"),
    (["optim.algorithm=adam"], "optim.algorithm='adam'"),
    (["train.time=-5"], "train.time"),
    (["-m", "data.d=10,0"], "data.d=0"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(argv, needle, monkeypatch, capsys, tmp_path):
    if argv == ["device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    monkeypatch.setattr("sys.argv", ["prtorch-train", f"paths.root={tmp_path}", *argv])
    with pytest.raises(SystemExit) as e:
        train.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prtorch-train: error:"), err
    assert needle in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not any(tmp_path.rglob("*.csv"))  # nothing ran, nothing half-written


def test_unwritable_output_dir(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr("sys.argv", ["prtorch-train", f"paths.root={blocker}/sub"])
    with pytest.raises(SystemExit) as e:
        train.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "paths.root=" in err[0] and "cannot write" in err[0]


def test_validate_names_key_value_and_rule():
    cfg = composed()
    cfg["data"]["d"] = -3
    with pytest.raises(ConfigError, match=r"^data\.d=-3: must be an integer >= 1$"):
        validate(cfg)
