"""The ServerApp's FedKD run (S3): per-task evaluation, per-device accuracy, per-task adapters."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid

from strategies.fedkd.evaluation import FedKDServer
from edge_lam.results import RunRecorder, write_plots
from strategies.fedkd.math import device_view
from strategies.fedkd.strategy import FedKDStrategy
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.lora import state_nbytes
from edge_lam.records import from_record, to_record
from edge_lam.logs import get_logger

log = get_logger()


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """The ServerApp's FedKD run; a ConfigError before the first round means nothing ran."""
    if cfg.resume:
        raise ConfigError(
            f"resume='{cfg.resume}': strategy='fedkd' cannot resume exactly: each device's "
            "private local module lives in its state folder of that run (<state-dir>/run-<id>/), "
            "which a new run id does not reach. Start a new run (resume=''); the interrupted "
            "run's folder keeps the metrics of its finished rounds")
    server = FedKDServer.prepare(cfg)
    run_dir = (Path(cfg.results_dir) / str(context.run_id)).resolve()
    initial = server.initial_state()
    tasks = {name: {"label_names": list(t.label_names), "data_source": t.data_source,
                    "test_examples": len(t.test)} for name, t in server.tasks.items()}
    first = next(iter(server.tasks))
    recorder = RunRecorder(run_dir, cfg, extra={
        "run_id": context.run_id, "tasks": tasks, "global_state_bytes": state_nbytes(initial),
        "shared_module_bytes": state_nbytes(device_view(initial, first))})
    log.info("fedkd: tasks %s over devices %s, shared rank %d, local rank %d, compression %s, "
             "%d rounds; results in %s", ", ".join(tasks), ",".join(cfg.fedkd.task_mix),
             cfg.fedkd.shared_rank, cfg.fedkd.local_rank,
             "on" if cfg.fedkd.compress else "off", cfg.num_rounds, run_dir)

    final = {"state": initial}
    pending: dict[int, dict] = {}  # round -> training info, completed with accuracies below

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        final["state"] = from_record(arrays)
        t0 = time.perf_counter()
        per_task = server.evaluate(final["state"])
        info = pending.pop(server_round, None)
        if info is not None:
            for client in info["clients"]:  # each device on its own task's test data
                client["accuracy"] = per_task[client["task"]]["accuracy"]
            recorder.record_train(server_round, info)
        local = [c["local_accuracy"] for c in (info or {}).get("clients", [])
                 if "local_accuracy" in c]
        metrics = {"accuracy": float(np.mean([m["accuracy"] for m in per_task.values()])),
                   "loss": float(np.mean([m["loss"] for m in per_task.values()])),
                   "eval_s": time.perf_counter() - t0}
        row = recorder.record_eval(server_round, metrics, extra={
            "tasks": per_task, "local_accuracy": float(np.mean(local)) if local else None})
        log.info("round %d: accuracy %s (mean %.4f), devices' local modules %s, %d devices",
                 server_round, ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in per_task.items()),
                 metrics["accuracy"], "n/a" if not local else f"{np.mean(local):.4f}",
                 len(row["clients"]))
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    strategy = FedKDStrategy(cfg, server.label_names, on_train_round=pending.__setitem__)
    started = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=cfg.num_rounds,
                   timeout=cfg.round_timeout, train_config=ConfigRecord({}),
                   evaluate_fn=evaluate_fn)
    server.save_adapters(final["state"], run_dir / "adapter")
    write_plots(recorder.rows, run_dir / "plots")
    recorder.close()
    log.info("done in %.1fs: %s", time.perf_counter() - started, run_dir)
    return run_dir
