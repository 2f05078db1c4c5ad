"""The Flower ServerApp on the edge server: validate, federate, evaluate, write results.

`prepare_run` does every check that can fail on configuration (before anything is trained);
`federate` drives the rounds over any Grid (Flower's, or a test's in-process one).
strategy='fedkd' (S3) runs `server_app.fedkd_app.run_fedkd` instead.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server_app.evaluation import ServerTask
from server_app.fedkd_app import run_fedkd
from server_app.results import RunRecorder, write_plots
from server_app.unlearning import (BEFORE_ADAPTER, Unfinished, UnlearningRecord,
                                   honour_unfinished)
from strategies.lora_strategy import HeterogeneousLoRA
from strategies.unlearning_strategy import FederatedUnlearning, UnlearningTargetsMissing
from task.config import ConfigError, RunConfig
from task.lora import State, state_nbytes
from task.records import from_record, to_record
from task.logs import get_logger

log = get_logger()

app = ServerApp()


@dataclass
class RunPlan:
    cfg: RunConfig
    task: ServerTask
    run_id: int
    run_dir: Path
    initial: State
    resumes: Unfinished | None = None


def prepare_run(cfg: RunConfig, run_id: int) -> RunPlan:
    """Data, model, starting adapter and any unfinished unlearning request: ConfigError here
    means nothing was trained."""
    resumes = honour_unfinished(cfg, Path(cfg.results_dir).resolve())
    if resumes is not None:
        log.warning("%s is unfinished: resuming it from %s (devices %s)", resumes.path,
                    resumes.adapter, list(resumes.clients))
        cfg = dataclasses.replace(cfg, unlearn_after_rounds=0,
                                  unlearn_from_adapter=str(resumes.adapter))
    task = ServerTask.prepare(cfg)
    if cfg.strategy == "unlearn" and cfg.unlearn_from_adapter:
        adapter = Path(cfg.unlearn_from_adapter).expanduser().resolve()
        key = "unlearn.from-adapter" if resumes is None else f"the adapter of {resumes.path}"
        initial = task.load_state(adapter, key)
    else:
        initial = task.initial_state()
    run_dir = (Path(cfg.results_dir) / str(run_id)).resolve()
    return RunPlan(cfg, task, run_id, run_dir, initial, resumes)


def federate(grid: Grid, plan: RunPlan) -> Path:
    """All rounds of the run (S1 training; S4 unlearning + recovery) and the results."""
    cfg, task, run_dir = plan.cfg, plan.task, plan.run_dir
    recorder = RunRecorder(run_dir, cfg, extra={
        "run_id": plan.run_id, "label_names": list(task.label_names),
        "data_source": task.data_source, "global_adapter_bytes": state_nbytes(plan.initial)})
    log.info("%s: %s at r_max=%d, %d rounds; results in %s", cfg.strategy, cfg.model,
             cfg.r_max, cfg.total_rounds, run_dir)
    final = {"state": plan.initial}
    record = None
    if cfg.strategy == "unlearn":
        record = UnlearningRecord(run_dir, cfg, plan.run_id, resumes=plan.resumes, source={
            "adapter": cfg.unlearn_from_adapter or None,
            "training_rounds_in_this_run": cfg.training_rounds})

        def on_unlearning_start(before: State, found, missing) -> None:
            task.save_adapter(before, run_dir / BEFORE_ADAPTER)
            record.start(found, missing, cfg.training_rounds + 1)
            log.info("unlearning request written to %s", record.path)

        strategy = FederatedUnlearning(cfg, task.label_names,
                                       on_train_round=recorder.record_train,
                                       on_unlearning_start=on_unlearning_start,
                                       on_phase=record.phase)
    else:
        strategy = HeterogeneousLoRA(cfg, task.label_names, on_train_round=recorder.record_train)
    phase_of = getattr(strategy, "phase", lambda rnd: "train")

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
    if record is not None:
        done = record.finish(recorder.rows)
        log.info("forgot %s in %d unlearning + %d recovery rounds (%.1f s, %d bytes): %s",
                 [f["partition_id"] for f in done["forgotten"]], cfg.unlearn_rounds,
                 cfg.unlearn_recovery_rounds, done["cost"]["wall_s"],
                 done["cost"]["bytes_up"] + done["cost"]["bytes_down"], record.path)
    log.info("done in %.1fs: %s", time.perf_counter() - started, run_dir)
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = RunConfig.from_run_config(context.run_config)
    except ConfigError as err:
        log.error("configuration error, nothing was trained: %s", err)
        raise SystemExit(f"edge-lam: configuration error: {err}") from err
    if cfg.strategy == "fedkd":  # S3: mixed tasks, private local modules
        return run_fedkd(grid, context, cfg)
    try:
        plan = prepare_run(cfg, context.run_id)
    except ConfigError as err:
        log.error("configuration error, nothing was trained: %s", err)
        raise SystemExit(f"edge-lam: configuration error: {err}") from err
    try:
        federate(grid, plan)
    except UnlearningTargetsMissing as err:
        log.error("%s", err)
        raise SystemExit(f"edge-lam: {err}") from err
