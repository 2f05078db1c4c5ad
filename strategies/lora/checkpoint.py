"""Exact resume (R3): `results/<run-id>/checkpoint/`, written after every finished round, and
what `resume='results/<run-id>'` reads back.

The folder, swapped in whole (written as `.checkpoint.tmp`, then renamed; a crash between
the two renames leaves `.checkpoint.old`, which `load` falls back to):
- `state.json`: format, the round it follows, the run config (`RunConfig.to_dict`), the
  labels, the run ids that wrote the folder, the strategy's state (its stateful parts'
  entries, `strategies.lora.resume`: every per-device entry keyed by partition id, `p<id>`,
  as node ids are new in every simulation; `n<node id>` for a device without one), the server's RNG states (Python's `random`, which Flower's node
  sampling uses and which `federate` seeds with `seed`; numpy's and torch's global ones) and
  the communication counters (bytes up / down summed over the rounds so far);
- `global.safetensors`: the global adapter after that round;
- `strategy.safetensors`: the strategy's arrays (FedLaAvg's stored updates, `latest/<device>/`).

A resumed run starts Flower's `Strategy.start` (which counts rounds from 1 and evaluates a
"round 0" first) for the rounds left, and `shift_rounds` adds the finished rounds to every
round number the strategy sees; `federate` skips the repeated round-0 evaluation.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_lam.config.run_config import RunConfig
from edge_lam.logs import get_logger
from edge_lam.training.lora import State
from edge_lam.config.options import ConfigError
from edge_lam.results import atomic_write_text, fsync_dir, fsync_file

log = get_logger()

FORMAT = 1
FOLDER = "checkpoint"
STATE_FILE = "state.json"
GLOBAL_FILE = "global.safetensors"
ARRAYS_FILE = "strategy.safetensors"
# run-config keys (RunConfig.to_dict names) a resumed run may change
MAY_DIFFER = {"resume", "num_rounds", "results_dir", "round_timeout"}


@dataclass
class Checkpoint:
    """A finished round's checkpoint, as read back by `load`."""

    run_dir: Path
    round: int
    state: dict[str, Any]  # state.json
    global_state: State
    arrays: State = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl rows of rounds 0..round
    config_json: dict = field(default_factory=dict)  # the folder's config.json

    @property
    def strategy_state(self) -> dict:
        return self.state["strategy_state"]

    @property
    def run_ids(self) -> list:
        return list(self.state.get("run_ids", []))


# ---------------------------------------------------------------------------- writing
def rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]),
                       random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(saved: dict) -> None:
    import torch

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(
        base64.b64decode(saved["torch"]), dtype=np.uint8).copy()))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _save_arrays(arrays: State, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


def communication(rows: list[dict]) -> dict:
    clients = [c for r in rows for c in r.get("clients", [])]
    return {"bytes_up": int(sum(c.get("bytes_up", 0) for c in clients)),
            "bytes_down": int(sum(c.get("bytes_down", 0) for c in clients)),
            "device_rounds": len(clients)}


def save(run_dir: Path, server_round: int, cfg: RunConfig, label_names: tuple[str, ...],
         global_state: State, strategy, rows: list[dict], run_ids: list) -> Path:
    """Checkpoint the run after `server_round` (its row already in metrics.jsonl)."""
    meta, arrays = strategy.checkpoint_state()
    tmp, out, old = (run_dir / ".checkpoint.tmp", run_dir / FOLDER, run_dir / ".checkpoint.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_arrays(global_state, tmp / GLOBAL_FILE)
    _save_arrays(arrays, tmp / ARRAYS_FILE)
    state = {"format": FORMAT, "round": server_round, "total_rounds": cfg.total_rounds,
             "strategy": cfg.strategy, "config": cfg.to_dict(),
             "label_names": list(label_names), "run_ids": list(run_ids),
             "metrics_rows": len(rows), "strategy_state": meta, "rng": rng_state(),
             "communication": communication(rows), "saved_at": time.time()}
    atomic_write_text(tmp / STATE_FILE, json.dumps(state))
    for path in (tmp / GLOBAL_FILE, tmp / ARRAYS_FILE):  # on disk before the folder moves
        fsync_file(path)
    fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(run_dir)  # the rename itself, durable
    shutil.rmtree(old, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- reading
def resume_folder(cfg: RunConfig) -> Path:
    """The folder `resume` names: a path, or a run id under results-dir."""
    given = Path(cfg.resume).expanduser()
    for candidate in (given, Path(cfg.results_dir).expanduser() / cfg.resume):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"resume='{cfg.resume}' is not a folder (nor is "
                      f"{Path(cfg.results_dir) / cfg.resume}): give the results/<run-id> "
                      "folder of the run to continue, or resume='' to start a new run")


def load(cfg: RunConfig) -> Checkpoint:
    """The checkpoint `cfg.resume` names, checked against this run's config (ConfigError
    naming `resume` and what to do; nothing in the folder is changed)."""
    from safetensors.numpy import load_file

    _check_resumable(cfg)  # (a mode that does not resume is refused at parse time)
    run_dir = resume_folder(cfg)
    folder = run_dir / FOLDER
    if not (folder / STATE_FILE).is_file() and (run_dir / ".checkpoint.old" / STATE_FILE).is_file():
        folder = run_dir / ".checkpoint.old"  # stopped between the two renames of `save`
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        global_state = load_file(str(folder / GLOBAL_FILE))
        arrays = load_file(str(folder / ARRAYS_FILE))
    except FileNotFoundError:
        raise ConfigError(f"resume='{cfg.resume}': {run_dir} has no checkpoint ({FOLDER}/"
                          f"{STATE_FILE}); only training runs of this version write one, after "
                          "every round: start a new run (resume='') or point resume at the "
                          "folder of an interrupted run") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"resume='{cfg.resume}': the checkpoint in {folder} cannot be read "
                          f"({err.__class__.__name__}: {err}); start a new run "
                          "(resume='')") from err
    if state.get("format") != FORMAT:
        raise ConfigError(f"resume='{cfg.resume}': checkpoint format {state.get('format')} is "
                          f"not this version's ({FORMAT}): finish it with the version that "
                          "wrote it, or start a new run (resume='')")
    _check_config(cfg, state, run_dir)
    done = int(state["round"])
    refused = state["strategy_state"].get("refuse_resume")
    if refused:
        raise ConfigError(f"resume='{cfg.resume}' cannot continue after round {done}: "
                          f"{refused}")
    if cfg.total_rounds <= done:
        raise ConfigError(f"resume='{cfg.resume}': its checkpoint follows round {done}, and "
                          f"this config has {cfg.total_rounds} rounds in all: nothing is left "
                          "to train; raise num-server-rounds to train more")
    rows = _rows(run_dir, done, cfg)
    config_json = {}
    if (run_dir / "config.json").is_file():
        config_json = json.loads((run_dir / "config.json").read_text())
    return Checkpoint(run_dir, done, state, global_state, arrays, rows, config_json)


def _check_resumable(cfg: RunConfig) -> None:
    """Only algorithms whose server module says `RESUMABLE = True` (their strategy's
    `checkpoint_state` holds all they keep between rounds) resume."""
    import importlib

    from strategies import registry

    module = importlib.import_module(registry.get(cfg.strategy).run.__module__)
    if not getattr(module, "RESUMABLE", False):
        raise ConfigError(f"resume='{cfg.resume}': strategy='{cfg.strategy}' does not support "
                          "exact resume (its server module does not declare RESUMABLE: its "
                          "state between rounds is not all in the checkpoint). Start a new "
                          "run (resume='')")


def _as_today(saved: dict, now: dict) -> dict:
    """A saved run config in today's keys: a key added since it was written stands at what
    the run did then, its default; the test subset (eval.max-examples > 0) was then drawn
    with the run's seed."""
    out = RunConfig().to_dict() | saved
    if "eval_seed" not in saved:
        out["eval_seed"] = saved.get("seed") if saved.get("eval_max_examples") else \
            now.get("eval_seed")
    return out


def _check_config(cfg: RunConfig, state: dict, run_dir: Path) -> None:
    if state.get("strategy") != cfg.strategy:
        raise ConfigError(f"resume='{cfg.resume}': {run_dir} is a strategy="
                          f"'{state.get('strategy')}' run, this config says strategy="
                          f"'{cfg.strategy}': use the same config as the interrupted run")
    now = cfg.to_dict()
    saved = _as_today(state["config"], now)
    differ = [k for k in sorted(set(saved) | set(now))
              if k not in MAY_DIFFER and saved.get(k) != now.get(k)]
    if differ:
        names = _run_config_keys()
        shown = "; ".join(f"{names.get(k, k)}: {saved.get(k)!r} there, {now.get(k)!r} now"
                          for k in differ[:6])
        raise ConfigError(
            f"resume='{cfg.resume}': this run config differs from the interrupted run's "
            f"({shown}{'; ...' if len(differ) > 6 else ''}): resume with the same config "
            f"(its {run_dir / FOLDER / STATE_FILE} holds it); only num-server-rounds may grow, "
            "and results-dir and round-timeout may differ")
    if cfg.dp.central != "off":
        raise ConfigError(
            f"resume='{cfg.resume}': dp.central runs cannot be resumed: the server's privacy "
            "accountant is not checkpointed, so the resumed run would report the epsilon of "
            f"its own rounds only. Start a new run (resume=''); the finished rounds' adapter "
            f"is {run_dir / FOLDER / GLOBAL_FILE}")
    if cfg.dp.enabled:
        raise ConfigError(
            f"resume='{cfg.resume}': dp.enabled runs cannot be resumed exactly: each device's "
            "privacy accountant lives in the ClientApp's per-run state (lost with the run) or "
            "in its privacy-ledger file (which may already count the round that did not "
            "finish), so a resumed run would under- or over-count the budget spent. Start a "
            f"new run (resume=''); the finished rounds' adapter is "
            f"{run_dir / FOLDER / GLOBAL_FILE}")


def _run_config_keys() -> dict[str, str]:
    """to_dict's flat names -> the run-config keys a user types (`train_lr` -> `train.lr`)."""
    from edge_lam.config.run_config import sections
    from edge_lam.config.options import declared, key_of

    names = {f.metadata.get("legacy") or f.name: key_of("", f) for f in declared(RunConfig)}
    for sec_name, cls in sections().items():
        for f in declared(cls):
            names[f.metadata.get("legacy") or f"{sec_name}_{f.name}"] = key_of(sec_name, f)
    return names


def _rows(run_dir: Path, done: int, cfg: RunConfig) -> list[dict]:
    """metrics.jsonl's rows of rounds 0..done (a row written after the checkpoint, of a
    round that is then trained again, is dropped)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.is_file() else []
    rows = [r for r in rows if r["round"] <= done]
    if [r["round"] for r in rows] != list(range(done + 1)):
        raise ConfigError(f"resume='{cfg.resume}': {path} does not hold the rows of rounds "
                          f"0..{done} its checkpoint follows: it was changed or removed; "
                          "start a new run (resume='')")
    return rows


def check_global(ckpt: Checkpoint, initial: State, cfg: RunConfig,
                 label_names: tuple[str, ...]) -> State:
    """The checkpoint's global adapter, checked to fit this run's model and labels."""
    if list(label_names) != ckpt.state.get("label_names"):
        raise ConfigError(f"resume='{cfg.resume}': the interrupted run's labels "
                          f"{ckpt.state.get('label_names')} differ from this data's "
                          f"{list(label_names)}: use the same data")
    want = {k: v.shape for k, v in initial.items()}
    got = {k: v.shape for k, v in ckpt.global_state.items()}
    if want != got:
        raise ConfigError(f"resume='{cfg.resume}': the checkpoint's global adapter does not "
                          f"fit model='{cfg.model}' at r_max={cfg.r_max} (the model folder "
                          "changed?): resume with the model the run started with")
    # in the model's order (safetensors reads keys sorted): replies and the states sent to
    # devices are in that order, and S6 pairs their layers by position
    return {k: np.array(ckpt.global_state[k]) for k in initial}


# ---------------------------------------------------------------------------- rounds
def shift_rounds(strategy, offset: int) -> None:
    """Make the strategy see round `offset + r` where Flower's `start` says `r` (start
    counts from 1): the wrappers are instance attributes, so subclasses' overrides and
    their `super()` calls all see the shifted round."""
    if not offset:
        return
    for name in ("configure_train", "aggregate_train", "configure_evaluate",
                 "aggregate_evaluate"):
        inner = getattr(strategy, name)

        def shifted(server_round, *args, _inner=inner, **kwargs):
            return _inner(server_round + offset, *args, **kwargs)

        setattr(strategy, name, shifted)
