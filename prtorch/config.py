"""Configuration: typed schemas (one dataclass per ``conf/`` group) and value checks.

The dataclasses are plain Python (no Hydra import), so the core and the GPU machine can use them;
:func:`register` puts them in Hydra's ConfigStore, which makes a wrong type or a misspelt key fail
at compose time. :func:`validate` checks values and raises :class:`ConfigError` with one line that
names the key, the value and what is allowed - before any compute starts.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

ALGORITHMS = ("sgd", "gd")
DTYPES = ("float32", "float64")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming key, value and what is allowed."""


@dataclass
class DataConfig:
    d: int = 300                  # dimension
    a: float = 1.5                # spectral decay, lambda_i ~ i^-a (a = 0: isotropic)
    target: str = "sigma"         # "sigma" (s* = 1) or "sqrt_d" (||w*|| = sqrt(d))
    label_noise: float = 0.0      # standard deviation of the label noise xi


@dataclass
class InitConfig:
    kind: str = "sphere"          # "sphere" (uniform on the unit sphere) or "gaussian" (N(0, I/d))
    norm: float = 1.0             # multiplies w(0)
    per_replica: bool = False     # each replica its own w(0) (default: all replicas share it)


@dataclass
class OptimConfig:
    algorithm: str = "sgd"        # "sgd" (online SGD) or "gd" (population gradient descent)
    lr: Any = 1e-2                # a learning rate or a list of them (a replica axis)
    batch_size: int = 1


@dataclass
class TrainConfig:
    time: float = 2000.0          # horizon in t = lr * steps
    log_per_decade: int = 20      # record points per decade of steps
    checkpoint_every: float = 120.0  # seconds between checkpoints (plus one at exit/SIGTERM)
    progress: bool = True


@dataclass
class TheoryConfig:
    gf: bool = True               # gradient flow from the same init
    sgd_de: bool = True           # deterministic equivalent of SGD (SGD runs only)
    rtol: float = 1e-5


@dataclass
class MeasureConfig:
    delta: float = 0.1            # T1: first time |u| >= delta (s still ~ 0.01: Phase I is linear)
    eps: float = 0.1              # T2: first time 1 - |u| <= eps
    bootstrap: int = 1000         # bootstrap resamples for confidence intervals


@dataclass
class LoggerConfig:
    kind: str = "wandb"           # "wandb" or "none"
    project: str = "prtorch"
    entity: Optional[str] = None
    mode: str = "${oc.env:WANDB_MODE,offline}"
    group: Optional[str] = None   # default: the sweep directory's name
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root: str = "outputs"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    theory: TheoryConfig = field(default_factory=TheoryConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0                 # fixes the instance (w*, w0) and the data streams
    replicas: int = 8             # independent data streams from the same instance
    device: str = "auto"          # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "float32"
    engine: str = "auto"
    force: bool = False           # recompute even if the output dir holds a finished run
    name: Optional[str] = None    # name of the experiment preset (set by conf/experiment/*.yaml)
    sweep_name: Optional[str] = None  # multirun folder name (default: a timestamp)


def register() -> None:
    """Register the schema in Hydra's ConfigStore as ``base_config``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def _fail(key, value, allowed) -> None:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def learning_rates(lr) -> list:
    """``optim.lr`` as a list of floats."""
    return [float(x) for x in (lr if isinstance(lr, (list, tuple)) else [lr])]


def validate(cfg: dict) -> None:
    """Check every value of a resolved config (plain dict); raise :class:`ConfigError` on the first bad one."""
    from prtorch import engines

    data, init, optim, train = cfg["data"], cfg["init"], cfg["optim"], cfg["train"]
    if not _is_int(data["d"]) or data["d"] < 1:
        _fail("data.d", data["d"], "must be an integer >= 1")
    if not _is_num(data["a"]) or not math.isfinite(data["a"]) or data["a"] < 0:
        _fail("data.a", data["a"], "must be a finite number >= 0 (a = 0 is isotropic)")
    if data["target"] not in ("sigma", "sqrt_d"):
        _fail("data.target", data["target"], "must be one of 'sigma', 'sqrt_d'")
    if not _is_num(data["label_noise"]) or not data["label_noise"] >= 0:
        _fail("data.label_noise", data["label_noise"], "must be a standard deviation >= 0")
    if init["kind"] not in ("sphere", "gaussian"):
        _fail("init.kind", init["kind"], "must be one of 'sphere', 'gaussian'")
    if not _is_num(init["norm"]) or not (0 < init["norm"] < math.inf):
        _fail("init.norm", init["norm"], "must be a finite number > 0")
    if optim["algorithm"] not in ALGORITHMS:
        _fail("optim.algorithm", optim["algorithm"], f"must be one of {', '.join(ALGORITHMS)}")
    lrs = optim["lr"] if isinstance(optim["lr"], (list, tuple)) else [optim["lr"]]
    if not lrs or not all(_is_num(x) and 0 < x < math.inf for x in lrs):
        _fail("optim.lr", optim["lr"], "must be a number > 0 or a non-empty list of them")
    if not _is_int(optim["batch_size"]) or optim["batch_size"] < 1:
        _fail("optim.batch_size", optim["batch_size"], "must be an integer >= 1")
    if not _is_num(train["time"]) or not (0 < train["time"] < math.inf):
        _fail("train.time", train["time"], "must be a finite number > 0")
    if max(lrs) > train["time"]:
        _fail("train.time", train["time"], f"must be at least one step (>= optim.lr = {max(lrs)})")
    if not _is_int(train["log_per_decade"]) or train["log_per_decade"] < 1:
        _fail("train.log_per_decade", train["log_per_decade"], "must be an integer >= 1")
    if not _is_num(train["checkpoint_every"]) or train["checkpoint_every"] <= 0:
        _fail("train.checkpoint_every", train["checkpoint_every"], "must be a number of seconds > 0")
    if not _is_int(cfg["replicas"]) or cfg["replicas"] < 1:
        _fail("replicas", cfg["replicas"], "must be an integer >= 1")
    if not _is_int(cfg["seed"]) or cfg["seed"] < 0:
        _fail("seed", cfg["seed"], "must be an integer >= 0")
    if cfg["dtype"] not in DTYPES:
        _fail("dtype", cfg["dtype"], f"must be one of {', '.join(DTYPES)}")
    dev = str(cfg["device"])
    if dev not in ("auto", "cpu") and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        _fail("device", dev, "must be one of auto, cpu, cuda, cuda:N")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail("device", dev, "CUDA is not available on this machine (use device=cpu or device=auto)")
    try:
        engines.resolve(cfg["engine"], "cuda" if dev.startswith("cuda") else "cpu")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    meas = cfg["measure"]
    if not (_is_num(meas["delta"]) and 0 < meas["delta"] < 1):
        _fail("measure.delta", meas["delta"], "must be in (0, 1)")
    if not (_is_num(meas["eps"]) and 0 < meas["eps"] < 1):
        _fail("measure.eps", meas["eps"], "must be in (0, 1)")
    if not _is_int(meas["bootstrap"]) or meas["bootstrap"] < 0:
        _fail("measure.bootstrap", meas["bootstrap"], "must be an integer >= 0")
    log = cfg["logger"]
    if log["kind"] not in LOGGERS:
        _fail("logger.kind", log["kind"], f"must be one of {', '.join(LOGGERS)}")
    if log["kind"] == "wandb" and log["mode"] not in WANDB_MODES:
        _fail("logger.mode", log["mode"], f"must be one of {', '.join(WANDB_MODES)} (or set WANDB_MODE)")


# keys that do not change a run's result: excluded from its identity
_VOLATILE = ("logger", "paths", "force", "sweep_name", "train.progress", "train.checkpoint_every")


def identity(cfg: dict) -> str:
    """A hash of everything that determines the run's results (used to skip finished work)."""
    c = json.loads(json.dumps(cfg, default=str))
    for k in _VOLATILE:
        node, *rest = k.split(".")
        if rest:
            c.get(node, {}).pop(rest[0], None)
        else:
            c.pop(node, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]
