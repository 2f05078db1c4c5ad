"""The server side of `strategy='submodel'` (S7): the LoRA run driver with the sub-model
strategy; evaluation and the saved adapter include the federated embedding rows.

The adapter folder (`results/<run-id>/adapter`) is a standard PEFT folder whose config has
`trainable_token_indices` = the rows that changed: `PeftModel.from_pretrained(base, folder)`
loads LoRA and the rows (tied: input embedding and output head alike); `merge_and_unload()`
gives a plain transformers model. `submodel.json` beside it says what was federated, the
bytes, and the privacy bound of the requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from strategies.lora.server import RunPlan, federate as federate_lora, prepare_run as prepare
from strategies.submodel.math import decoy_rate, privacy_bound
from strategies.submodel.rows import applied_rows, base_table, embedding_of, \
    save_rows_in_adapter
from strategies.submodel.strategy import TABLE_IDS, TABLE_ROWS, SubmodelLoRA, split_state
from edge_lam.config.run_config import RunConfig
from edge_lam.training.evaluation import METADATA_FILE, ServerModel
from edge_lam.logs import get_logger
from edge_lam.training.lora import State, lora_rank
from edge_lam.models.lora_model import get_lora_model
from edge_lam.results import RunRecorder

log = get_logger()

SUMMARY_FILE = "submodel.json"


@dataclass
class SubmodelServerModel(ServerModel):
    """ServerModel whose states also hold the sparse embedding table."""

    def _model(self, state: State):
        return get_lora_model(self.cfg, self.label_names, lora_rank(state))

    def evaluate(self, state: State) -> dict[str, float]:
        lora, ids, rows = split_state(state)
        with applied_rows(self._model(lora), ids, rows):
            return super().evaluate(lora)

    def save_adapter(self, state: State, out_dir: Path) -> Path:
        lora, ids, rows = split_state(state)
        out = super().save_adapter(lora, out_dir)
        _, module = embedding_of(self._model(lora), self.cfg.model)
        meta = json.loads((out / METADATA_FILE).read_text())
        meta["submodel"] = {"module": module, "rows": int(ids.size),
                            "load": "PeftModel.from_pretrained(base, folder) (peft >= 0.15, "
                                    "trainable_token_indices; tied head included)"}
        if ids.size:
            save_rows_in_adapter(out, module, ids, rows)
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        return out

    def table(self) -> np.ndarray:
        """The base model's embedding table [V, d] as float32 (ConfigError: untied)."""
        model = self._model(self.initial_state())
        return base_table(model).float().cpu().numpy().copy()


def request_bound(cfg: RunConfig) -> dict:
    """The privacy bound of every device's request (`math.privacy_bound`)."""
    s = cfg.submodel
    if not s.decoys or s.rows != "touched":
        return {"decoys": False, "epsilon_requested": float("inf"),
                "note": "no decoys: the request is the device's exact row set"}
    return {"decoys": True, **privacy_bound(s.keep, decoy_rate(s.epsilon, s.keep))}


def prepare_run(cfg: RunConfig, run_id: int) -> RunPlan:
    plan = prepare(cfg, run_id)
    plan.server_model = SubmodelServerModel(**{f.name: getattr(plan.server_model, f.name)
                                               for f in fields(ServerModel)})
    embedding_of(plan.server_model._model(plan.initial), cfg.model)  # tied, or a ConfigError now
    dim = plan.server_model._model(plan.initial).get_base_model().get_input_embeddings() \
        .weight.shape[1]
    plan.initial = {**plan.initial, TABLE_IDS: np.zeros(0, np.int64),
                    TABLE_ROWS: np.zeros((0, dim), np.float32)}
    return plan


def federate(grid: Grid, plan: RunPlan) -> Path:
    cfg, server_model, run_dir = plan.cfg, plan.server_model, plan.run_dir
    table = server_model.table()

    made: list[SubmodelLoRA] = []

    def make_strategy(plan: RunPlan, recorder: RunRecorder) -> SubmodelLoRA:
        strategy = SubmodelLoRA(cfg, server_model.label_names, table,
                                on_train_round=recorder.record_train)
        made.append(strategy)
        record_eval = recorder.record_eval

        def with_rows(server_round: int, metrics: dict, phase: str = "train",
                      extra: dict | None = None) -> dict:
            """metrics.jsonl's row + `secure_rows` (applied or skipped, and why)."""
            rows_info = strategy.rows_log.pop(server_round, None)
            if rows_info is not None:
                extra = {**(extra or {}), "secure_rows": rows_info}
            return record_eval(server_round, metrics, phase, extra)

        recorder.record_eval = with_rows
        return strategy

    def finish(recorder: RunRecorder) -> None:
        train_rows = [r for r in recorder.rows if r.get("clients")]
        clients = [c for r in train_rows for c in r["clients"]]
        summary = {
            "rows": cfg.submodel.rows, "aggregation": cfg.submodel.aggregation,
            "vocab_rows": int(table.shape[0]), "dim": int(table.shape[1]),
            "table_bytes": int(table.shape[0] * table.shape[1] * 4),
            "privacy": request_bound(cfg),
            "secure_aggregation": {
                "on": bool(made and made[-1].secure), "fixed_point_bits": cfg.submodel.secure_bits,
                "rounds_rows_skipped": made[-1].rows_rounds_skipped if made else 0,
                "protocol": "SecAgg+ (strategies.secure): X25519 keys each round, Shamir "
                            "shares of the masks"},
            "per_device_round": [{k: c.get(k) for k in (
                "partition_id", "rows_requested", "rows_up", "rows_counted", "bytes_up",
                "bytes_down")} for c in clients],
        }
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))

    return federate_lora(grid, plan, make_strategy, finish)


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    return federate(grid, prepare_run(cfg, context.run_id))
