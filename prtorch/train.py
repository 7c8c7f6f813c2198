"""``prtorch-train`` (also ``python -m prtorch.train``): the Hydra app.

    prtorch-train                                   # the default job (online SGD, d=300, a=1.5)
    prtorch-train data.a=2 optim.lr=[1e-3,1e-2]     # learning rates as a replica axis
    prtorch-train -m data.a=1.5,2 seed=0,1          # a sweep (one job per combination)
    prtorch-train experiment=fig2_small             # a paper preset

Before Hydra starts, every job of the command line is composed and checked
(:func:`precheck`): a bad value, an unknown key or preset, a missing GPU or an unwritable
output folder ends the command with one line on stderr and exit code 2, before any compute.
Inside a multirun, a job that fails records ``status: failed`` in its ``summary.json`` and the
sweep goes on.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import traceback
from pathlib import Path

from prtorch.config import ConfigError, register, validate

CONF_DIR = str(Path(__file__).parent / "conf")
log = logging.getLogger("prtorch")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("prtorch.run_name"):
        # folder name of a job: its overrides, or "default"; "/" would make sub-folders
        OmegaConf.register_new_resolver(
            "prtorch.run_name", lambda s: (str(s).replace("/", "_") or "default")[:200])
    if not OmegaConf.has_resolver("prtorch.sweep_name"):
        import datetime

        OmegaConf.register_new_resolver(
            "prtorch.sweep_name",
            lambda s: str(s) if s not in (None, "None", "") else datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))


_register_resolvers()
register()


def _one_line(e: BaseException) -> str:
    """One line from a (Hydra/OmegaConf) exception: its first line, the cause's, the key, options."""
    def first_line(x):
        return next((ln.strip() for ln in str(x).strip().splitlines() if ln.strip()), type(x).__name__)

    line = first_line(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and first_line(cause) not in line:
        line = f"{line}: {first_line(cause)}"
    text = str(e) + str(cause or "")
    if "full_key:" in text and "Could not override" not in line:
        key = text.split("full_key:")[1].split()[0]
        line = line if key in line else f"{key}: {line}"
    import re

    m = re.search(r"Could not find '([\w/]+)/([^']*)'", line) or re.search(r"Could not load '([\w/]+)/([^']*)'", line)
    if m:  # an unknown config-group option: name the valid ones
        group = m.group(1)
        opts = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
        line = f"{group}={m.group(2)!r}: no such option (available: {', '.join(opts)})"
    return line


def precheck(argv: list[str]) -> None:
    """Compose every job the command line describes and validate it (raises ConfigError)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    flags = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc"}
    if any(a.split("=")[0] in flags for a in argv):
        return
    overrides, config_name, skip = [], "config", False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("-m", "--multirun"):
            continue
        if a in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"):
            if a in ("-cn", "--config-name") and i + 1 < len(argv):
                config_name = argv[i + 1]
            skip = True
            continue
        if a.startswith("-"):
            continue
        overrides.append(a)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(_one_line(e)) from None
    choices = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    combos = list(itertools.product(*choices)) if choices else [()]
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR, job_name="precheck"):
        for combo in combos[:256]:
            try:
                cfg = compose(config_name=config_name, overrides=list(combo), return_hydra_config=True)
            except Exception as e:
                raise ConfigError(_one_line(e)) from None
            hydra_cfg = cfg.hydra
            with_hydra = OmegaConf.to_container(cfg, resolve=False)
            with_hydra.pop("hydra", None)
            plain = OmegaConf.create(with_hydra)
            plain.paths.output_dir = "unused"
            try:
                container = OmegaConf.to_container(plain, resolve=True)
            except Exception as e:
                raise ConfigError(_one_line(e)) from None
            validate(container)
            _check_writable(str(cfg.paths.root))
            del hydra_cfg


def _check_writable(root: str) -> None:
    p = Path(root).absolute()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".prtorch-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"paths.root={root!r}: cannot write there ({e.strerror or e})") from None


def task(cfg) -> dict | None:
    """The body of one Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from prtorch.job import Interrupted, run_job
    from prtorch.record import atomic_write_json

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    group = Path(hc.sweep.dir).name if multirun else None
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        summary = run_job(container, out, group=group, job_type="sweep" if multirun else "train")
    except ConfigError as e:
        _record_failure(out, container, e, atomic_write_json)
        print(f"prtorch-train: error: {e}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(2)
    except Interrupted as e:
        print(f"prtorch-train: {e}", file=sys.stderr)
        sys.exit(143)
    except Exception as e:  # a failing job is recorded; the sweep goes on
        _record_failure(out, container, e, atomic_write_json)
        log.error("job failed: %s\n%s", e, traceback.format_exc())
        print(f"prtorch-train: job failed: {_one_line(e)} (details in {out / 'summary.json'})", file=sys.stderr)
        if multirun:
            return None
        sys.exit(1)
    _report(summary, out)
    return summary


def _record_failure(out: Path, cfg: dict, e: BaseException, write) -> None:
    if getattr(e, "prtorch_recorded", False):  # run_job already wrote summary.json and closed W&B
        return
    try:
        from prtorch.config import identity

        write(out / "summary.json", {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc(), "config": cfg,
                                     "identity": identity(cfg)})
        if cfg.get("logger", {}).get("kind") == "wandb":
            from prtorch.wandb_log import WandbLogger

            WandbLogger(cfg, out, "failed", None, "failed").finish({"status": "failed", "error": str(e)}, failed=True)
    except Exception:
        pass


def _report(summary: dict, out: Path) -> None:
    # summary.json writes NaN as null: read back (skipped runs) as NaN
    f = {k: (float("nan") if v is None else v) for k, v in (summary.get("final") or {}).items()}
    state = "skipped (already finished)" if summary.get("skipped") else summary["status"]
    per_lr = summary.get("per_lr") or []
    which = f" (lr={per_lr[0]['settings']['lr']:g}; per_lr in summary.json)" if len(per_lr) > 1 else ""
    print(f"prtorch: {summary.get('name', '')}: {state}; final median{which} mse={f.get('mse', float('nan')):.3g}, "
          f"loss={f.get('loss', float('nan')):.3g}, u={f.get('u', float('nan')):.3f}; "
          f"{summary.get('steps_per_second') or float('nan'):.3g} steps/s")
    print(f"prtorch: files in {out}  (figure: {out / 'figures' / 'mse.png'})")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        precheck(sys.argv[1:])
    except ConfigError as e:
        print(f"prtorch-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    import hydra

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(task)()


if __name__ == "__main__":
    main()
