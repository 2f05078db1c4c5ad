"""The server side of the LoRA algorithms: prepare a run, drive its rounds, write results.

`prepare_run` does every check that can fail on configuration (before anything is trained);
`federate` drives the rounds of any HeterogeneousLoRA strategy over any Grid (Flower's, or a
test's in-process one), evaluating after every round and writing `results/<run-id>/`.
Other algorithms built on the same strategy (unlearning) reuse both with their own strategy.
With `resume='results/<run-id>'` (R3), `prepare_run` reads that folder's checkpoint
(`strategies.lora.checkpoint`) and `federate` goes on from its round, writing into it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid

from strategies.lora import checkpoint
from strategies.lora.central_dp import with_central_dp
from strategies.lora.checkpoint import Checkpoint
from strategies.lora.strategy import HeterogeneousLoRA
from strategies.registry import run_guards
from edge_lam.config.run_config import RunConfig
from edge_lam.training.evaluation import ServerModel
from edge_lam.logs import get_logger
from edge_lam.training.lora import State, state_nbytes
from edge_lam.config.options import ConfigError
from edge_lam.records import from_record, to_record
from edge_lam.results import RunRecorder, write_plots

log = get_logger()

# exact resume (`resume`): the strategy's `checkpoint_state` holds all it keeps between rounds
RESUMABLE = True


@dataclass
class RunPlan:
    cfg: RunConfig
    server_model: ServerModel
    run_id: int
    run_dir: Path
    initial: State
    resumes: Any = None  # what a run guard asked this run to resume (unlearning)
    resumed: Checkpoint | None = None  # the checkpoint `resume` continues (R3)


def prepare_run(cfg: RunConfig, run_id: int,
                start_from: Callable[[RunConfig, Any], tuple[str, str]] | None = None
                ) -> RunPlan:
    """Data, model, starting adapter and what the run guards say (an unfinished unlearning
    request): a ConfigError here means nothing was trained. `start_from(cfg, resumes)`
    gives (adapter folder, what names it in errors) to start from a saved adapter; '' =
    a fresh adapter. With `resume`, the run goes on from its folder's checkpoint (checked
    first: a refusal changes nothing there)."""
    resumed = checkpoint.load(cfg) if cfg.resume else None
    resumes = None
    for guard in run_guards():
        cfg, found = guard(cfg)
        resumes = resumes or found
    if resumed is not None and resumes is not None:
        raise ConfigError(f"resume='{cfg.resume}': an unfinished unlearning request "
                          f"({resumes.path}) must be finished first: run it without resume")
    server_model = ServerModel.prepare(cfg)
    if resumed is not None:
        initial = checkpoint.check_global(resumed, server_model.initial_state(), cfg,
                                          server_model.label_names)
        return RunPlan(cfg, server_model, run_id, resumed.run_dir, initial, None, resumed)
    adapter, key = start_from(cfg, resumes) if start_from else ("", "")
    initial = server_model.load_state(Path(adapter).expanduser().resolve(), key) if adapter else \
        server_model.initial_state()
    run_dir = (Path(cfg.results_dir) / str(run_id)).resolve()
    return RunPlan(cfg, server_model, run_id, run_dir, initial, resumes)


def federate(grid: Grid, plan: RunPlan,
             make_strategy: Callable[[RunPlan, RunRecorder], HeterogeneousLoRA] | None = None,
             finish: Callable[[RunRecorder], None] | None = None) -> Path:
    """All rounds of the run, evaluated after each; the adapter, metrics and plots. Every
    finished round is checkpointed (`results/<run-id>/checkpoint/`); a resumed run
    (`plan.resumed`) trains the rounds after its checkpoint's."""
    cfg, server_model, run_dir, resumed = plan.cfg, plan.server_model, plan.run_dir, plan.resumed
    done = resumed.round if resumed else 0  # rounds finished before this run
    recorder, run_ids = _recorder(plan)
    log.info("%s: %s at r_max=%d, %d rounds; results in %s", cfg.strategy, cfg.model,
             cfg.r_max, cfg.total_rounds, run_dir)
    strategy = (make_strategy(plan, recorder) if make_strategy else HeterogeneousLoRA(
        cfg, server_model.label_names, on_train_round=recorder.record_train))
    strategy = with_central_dp(strategy, cfg)  # dp.central: Flower's DP wrapper around it
    if resumed is not None:
        _resume(strategy, plan, run_ids)
    else:
        random.seed(cfg.seed)  # Flower samples nodes with `random`: seeded, and checkpointed
    final = {"state": plan.initial}
    started = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=to_record(plan.initial),
                   num_rounds=cfg.total_rounds - done, timeout=cfg.round_timeout,
                   train_config=ConfigRecord({}),
                   evaluate_fn=_evaluate_fn(plan, strategy, recorder, run_ids, final))
    server_model.save_adapter(final["state"], run_dir / "adapter")
    write_plots(recorder.rows, run_dir / "plots")
    if finish is not None:
        finish(recorder)
    recorder.close()
    log.info("done in %.1fs: %s", time.perf_counter() - started, run_dir)
    return run_dir


def _recorder(plan: RunPlan) -> tuple[RunRecorder, list]:
    """The run's recorder (a resumed run's goes on with the rows so far) and the run ids
    that wrote its folder."""
    server_model, resumed = plan.server_model, plan.resumed
    extra = {"run_id": plan.run_id, "label_names": list(server_model.label_names),
             "data_source": server_model.data_source,
             "global_adapter_bytes": state_nbytes(plan.initial)}
    run_ids = [plan.run_id]
    if resumed is not None:
        run_ids = resumed.run_ids + [plan.run_id]
        extra |= {"run_id": resumed.config_json.get("run_id", run_ids[0]),
                  "resumed": resumed.config_json.get("resumed", []) + [
                      {"run_id": plan.run_id, "after_round": resumed.round}]}
    recorder = RunRecorder(plan.run_dir, plan.cfg, extra=extra,
                           rows=resumed.rows if resumed else None)
    return recorder, run_ids


def _resume(strategy: HeterogeneousLoRA, plan: RunPlan, run_ids: list) -> None:
    """The strategy's state, the RNGs and the round numbers of the checkpoint `plan`
    resumes."""
    resumed, cfg, done = plan.resumed, plan.cfg, plan.resumed.round
    strategy.restore_checkpoint(resumed.strategy_state, resumed.arrays)
    checkpoint.set_rng_state(resumed.state["rng"])
    checkpoint.shift_rounds(strategy, done)
    log.info("resuming %s after round %d of %d (run ids %s): Flower counts the %d rounds "
             "left from 1, they are rounds %d..%d", plan.run_dir, done, cfg.total_rounds,
             run_ids, cfg.total_rounds - done, done + 1, cfg.total_rounds)


def _evaluate_fn(plan: RunPlan, strategy: HeterogeneousLoRA, recorder: RunRecorder,
                 run_ids: list, final: dict) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower's evaluate_fn: evaluate the global adapter after every round, record its row,
    checkpoint the run; `final["state"]` is the last global adapter."""
    cfg, server_model, resumed = plan.cfg, plan.server_model, plan.resumed
    done = resumed.round if resumed else 0
    phase_of = getattr(strategy, "phase", lambda rnd: "train")

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if resumed is not None and server_round == 0:  # start's "round 0": round `done`
            row = recorder.rows[-1]
            return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})
        server_round += done
        final["state"] = from_record(arrays)
        t0 = time.perf_counter()
        metrics = {**server_model.evaluate(final["state"]), "eval_s": time.perf_counter() - t0}
        row = recorder.record_eval(server_round, metrics, phase_of(server_round))
        checkpoint.save(plan.run_dir, server_round, cfg, server_model.label_names, final["state"],
                        strategy, recorder.rows, run_ids)
        log.info("round %d (%s): accuracy %.4f loss %.4f (%d devices, %d rejected, agg. "
                 "error %s)", server_round, row["phase"], metrics["accuracy"],
                 metrics["loss"], len(row["clients"]), row["rejected"],
                 row["aggregation_error"])
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    return evaluate_fn


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """The ServerApp's run of fedavg / hetlora / flexlora."""
    return federate(grid, prepare_run(cfg, context.run_id))
