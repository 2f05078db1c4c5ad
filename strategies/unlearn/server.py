"""The server side of `strategy='unlearn'` (S4): the LoRA run driver with the unlearning
strategy, the request file (`unlearning.json`) and its resume; plus the run guard that makes
every other training run refuse to start while a request is unfinished."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid

from strategies.lora.server import RunPlan, federate as federate_lora, prepare_run as prepare
from strategies.unlearn.request import (BEFORE_ADAPTER, UnlearningRecord, honour_unfinished)
from strategies.unlearn.strategy import FederatedUnlearning
from edge_lam.config.run_config import RunConfig
from edge_lam.logs import get_logger
from edge_lam.training.lora import State
from edge_lam.results import RunRecorder

log = get_logger()

# exact resume (`resume`) in the training rounds; after them `checkpoint_state` refuses
RESUMABLE = True


def guard(cfg: RunConfig) -> tuple[RunConfig, object]:
    """Before any training run: an unfinished request under results-dir is honoured
    (strategy='unlearn' resumes it from its saved adapter; anything else is refused)."""
    resumes = honour_unfinished(cfg, Path(cfg.results_dir).resolve())
    if resumes is None:
        return cfg, None
    log.warning("%s is unfinished: resuming it from %s (devices %s)", resumes.path,
                resumes.adapter, list(resumes.clients))
    return cfg.updated("unlearn", after_rounds=0, from_adapter=str(resumes.adapter)), resumes


def prepare_run(cfg: RunConfig, run_id: int) -> RunPlan:
    """As the LoRA run's, starting from unlearn.from-adapter (or a resumed request's)."""
    def start_from(c: RunConfig, resumes) -> tuple[str, str]:
        key = "unlearn.from-adapter" if resumes is None else f"the adapter of {resumes.path}"
        return c.unlearn.from_adapter, key

    return prepare(cfg, run_id, start_from)


def federate(grid: Grid, plan: RunPlan) -> Path:
    """Train, unlearn, recover; `unlearning.json` before the first unlearning message."""
    cfg, server_model, run_dir = plan.cfg, plan.server_model, plan.run_dir
    record = UnlearningRecord(run_dir, cfg, plan.run_id, resumes=plan.resumes, source={
        "adapter": cfg.unlearn.from_adapter or None,
        "training_rounds_in_this_run": cfg.training_rounds})

    def on_unlearning_start(before: State, found, missing) -> None:
        server_model.save_adapter(before, run_dir / BEFORE_ADAPTER)
        record.start(found, missing, cfg.training_rounds + 1)
        log.info("unlearning request written to %s", record.path)

    def make_strategy(plan: RunPlan, recorder: RunRecorder) -> FederatedUnlearning:
        return FederatedUnlearning(cfg, server_model.label_names,
                                   on_train_round=recorder.record_train,
                                   on_unlearning_start=on_unlearning_start,
                                   on_phase=record.phase)

    def finish(recorder: RunRecorder) -> None:
        done = record.finish(recorder.rows)
        log.info("forgot %s in %d unlearning + %d recovery rounds (%.1f s, %d bytes): %s",
                 [f["partition_id"] for f in done["forgotten"]], cfg.unlearn.rounds,
                 cfg.unlearn.recovery_rounds, done["cost"]["wall_s"],
                 done["cost"]["bytes_up"] + done["cost"]["bytes_down"], record.path)

    return federate_lora(grid, plan, make_strategy, finish)


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    return federate(grid, prepare_run(cfg, context.run_id))
