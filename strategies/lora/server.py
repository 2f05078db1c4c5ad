"""The server side of the LoRA algorithms: prepare a run, drive its rounds, write results.

`prepare_run` does every check that can fail on configuration (before anything is trained);
`federate` drives the rounds of any HeterogeneousLoRA strategy over any Grid (Flower's, or a
test's in-process one), evaluating after every round and writing `results/<run-id>/`.
Other algorithms built on the same strategy (unlearning) reuse both with their own strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid

from strategies.lora.strategy import HeterogeneousLoRA
from strategies.registry import run_guards
from task.config import RunConfig
from task.evaluation import ServerTask
from task.logs import get_logger
from task.lora import State, state_nbytes
from task.records import from_record, to_record
from task.results import RunRecorder, write_plots

log = get_logger()


@dataclass
class RunPlan:
    cfg: RunConfig
    task: ServerTask
    run_id: int
    run_dir: Path
    initial: State
    resumes: Any = None  # what a run guard asked this run to resume (unlearning)


def prepare_run(cfg: RunConfig, run_id: int,
                start_from: Callable[[RunConfig, Any], tuple[str, str]] | None = None
                ) -> RunPlan:
    """Data, model, starting adapter and what the run guards say (an unfinished unlearning
    request): a ConfigError here means nothing was trained. `start_from(cfg, resumes)`
    gives (adapter folder, what names it in errors) to start from a saved adapter; '' =
    a fresh adapter."""
    resumes = None
    for guard in run_guards():
        cfg, found = guard(cfg)
        resumes = resumes or found
    task = ServerTask.prepare(cfg)
    adapter, key = start_from(cfg, resumes) if start_from else ("", "")
    initial = task.load_state(Path(adapter).expanduser().resolve(), key) if adapter else \
        task.initial_state()
    run_dir = (Path(cfg.results_dir) / str(run_id)).resolve()
    return RunPlan(cfg, task, run_id, run_dir, initial, resumes)


def federate(grid: Grid, plan: RunPlan,
             make_strategy: Callable[[RunPlan, RunRecorder], HeterogeneousLoRA] | None = None,
             finish: Callable[[RunRecorder], None] | None = None) -> Path:
    """All rounds of the run, evaluated after each; the adapter, metrics and plots."""
    cfg, task, run_dir = plan.cfg, plan.task, plan.run_dir
    recorder = RunRecorder(run_dir, cfg, extra={
        "run_id": plan.run_id, "label_names": list(task.label_names),
        "data_source": task.data_source, "global_adapter_bytes": state_nbytes(plan.initial)})
    log.info("%s: %s at r_max=%d, %d rounds; results in %s", cfg.strategy, cfg.model,
             cfg.r_max, cfg.total_rounds, run_dir)
    strategy = (make_strategy(plan, recorder) if make_strategy else HeterogeneousLoRA(
        cfg, task.label_names, on_train_round=recorder.record_train))
    phase_of = getattr(strategy, "phase", lambda rnd: "train")
    final = {"state": plan.initial}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        final["state"] = from_record(arrays)
        t0 = time.perf_counter()
        metrics = {**task.evaluate(final["state"]), "eval_s": time.perf_counter() - t0}
        row = recorder.record_eval(server_round, metrics, phase_of(server_round))
        log.info("round %d (%s): accuracy %.4f loss %.4f (%d devices, %d rejected, agg. "
                 "error %s)", server_round, row["phase"], metrics["accuracy"],
                 metrics["loss"], len(row["clients"]), row["rejected"],
                 row["aggregation_error"])
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    started = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=to_record(plan.initial),
                   num_rounds=cfg.total_rounds, timeout=cfg.round_timeout,
                   train_config=ConfigRecord({}), evaluate_fn=evaluate_fn)
    task.save_adapter(final["state"], run_dir / "adapter")
    write_plots(recorder.rows, run_dir / "plots")
    if finish is not None:
        finish(recorder)
    recorder.close()
    log.info("done in %.1fs: %s", time.perf_counter() - started, run_dir)
    return run_dir


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """The ServerApp's run of fedavg / hetlora / flexlora."""
    return federate(grid, prepare_run(cfg, context.run_id))
