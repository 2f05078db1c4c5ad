"""The Flower ServerApp on the edge server: validate, federate, evaluate, write results.

strategy='fedkd' (S3) runs `server_app.fedkd_app.run_fedkd` instead.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server_app.evaluation import ServerTask
from server_app.fedkd_app import run_fedkd
from server_app.results import RunRecorder, write_plots
from strategies.lora_strategy import HeterogeneousLoRA
from task.config import ConfigError, RunConfig
from task.lora import state_nbytes
from task.records import from_record, to_record
from task.logs import get_logger

log = get_logger()

app = ServerApp()


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
        task = ServerTask.prepare(cfg)
    except ConfigError as err:
        log.error("configuration error, nothing was trained: %s", err)
        raise SystemExit(f"edge-lam: configuration error: {err}") from err

    run_dir = (Path(cfg.results_dir) / str(context.run_id)).resolve()
    initial = task.initial_state()
    recorder = RunRecorder(run_dir, cfg, extra={
        "run_id": context.run_id, "label_names": list(task.label_names),
        "data_source": task.data_source, "global_adapter_bytes": state_nbytes(initial)})
    log.info("%s: %s at r_max=%d, %d rounds; results in %s", cfg.strategy, cfg.model,
             cfg.r_max, cfg.num_rounds, run_dir)

    final = {"state": initial}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        final["state"] = from_record(arrays)
        t0 = time.perf_counter()
        metrics = {**task.evaluate(final["state"]), "eval_s": time.perf_counter() - t0}
        row = recorder.record_eval(server_round, metrics)
        log.info("round %d: accuracy %.4f loss %.4f (%d devices, %d rejected, agg. error %s)",
                 server_round, metrics["accuracy"], metrics["loss"], len(row["clients"]),
                 row["rejected"], row["aggregation_error"])
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    strategy = HeterogeneousLoRA(cfg, task.label_names, on_train_round=recorder.record_train)
    started = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=cfg.num_rounds,
                   timeout=cfg.round_timeout, train_config=ConfigRecord({}),
                   evaluate_fn=evaluate_fn)
    task.save_adapter(final["state"], run_dir / "adapter")
    write_plots(recorder.rows, run_dir / "plots")
    log.info("done in %.1fs: %s", time.perf_counter() - started, run_dir)
