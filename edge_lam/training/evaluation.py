"""Server-side task: validate the setup before training, evaluate and save global adapters."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lam.models.families import family
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.encode import budgeted, label_token_ids
from edge_lam.data.text import (Examples, label_names_of, load_split_frames, resolve_columns,
                                resolve_data_path, to_examples)
from edge_lam.training.lora import (BASE_DELTA, State, factors, is_base_delta_key, lora_layers,
                                    lora_rank, truncate_lora)
from edge_lam.models.lora_model import (adapter_name, check_lora_targets, get_lora_model,
                                        initial_lora_state, load_tokenizer, resolve_model_source,
                                        set_trainable_state)
from edge_lam.training.loop import evaluate
from edge_lam.logs import get_logger

log = get_logger()

METADATA_FILE = "edge_lam.json"


@dataclass
class ServerModel:
    """The model and test split the server evaluates the global adapter on."""

    cfg: RunConfig
    label_names: tuple[str, ...]
    test: Examples
    data_source: str

    @classmethod
    def prepare(cls, cfg: RunConfig, with_model: bool = True) -> ServerModel:
        """Load data and model and check every rank fits: all config errors surface here.
        `with_model=False`: the test split and labels only (the server of `mode='infer'`
        holds no model)."""
        path = resolve_data_path(cfg)
        if path is None:
            log.info("data.path '%s' not found; trying hub dataset '%s'", cfg.data.path,
                     cfg.data.hub_dataset)
        frames = load_split_frames(str(path) if path else None, cfg.data.hub_dataset,
                                   cfg.data.encoding)
        columns = resolve_columns(frames["train"], cfg)
        resolve_columns(frames["test"], cfg)
        labels = label_names_of(frames, columns)
        warn_unseen_labels(frames, columns, data_source_of(path, cfg))
        if len(labels) < family(cfg).min_labels:
            raise ConfigError(f"data.label-column='{cfg.data.label_column}' has {len(labels)} "
                              "distinct value(s): a classifier needs at least 2")
        test = to_examples(frames["test"], columns, labels)
        if cfg.eval.max_examples and len(test) > cfg.eval.max_examples:
            rng = np.random.default_rng(cfg.eval.seed)  # not cfg.seed: the same set every seed
            test = test.subset(sorted(rng.choice(len(test), cfg.eval.max_examples,
                                                 replace=False)))
        task = cls(cfg, labels, test, data_source_of(path, cfg))
        if family(cfg).label_words:  # a bad data.label-words fails here, before training
            label_token_ids(load_tokenizer(resolve_model_source(cfg.model)), cfg, labels)
        if not with_model:
            return task
        model = get_lora_model(cfg, labels, cfg.r_max)
        ranks = sorted({cfg.rank_for(d) for d in cfg.devices.ranks} | {cfg.r_max})
        check_lora_targets(model, cfg, ranks)
        return task

    def initial_state(self) -> State:
        """Fresh global adapter at r_max (PEFT init: A random, B zero) and head; zero base
        deltas for strategies that merge updates into the frozen weights."""
        state = initial_lora_state(self.cfg, self.label_names, self.cfg.r_max)
        if self.cfg.merges_into_base:
            for prefix in lora_layers(state):
                b, a = factors(state, prefix)
                state[prefix + BASE_DELTA] = np.zeros((b.shape[0], a.shape[1]), np.float32)
        return state

    def load_state(self, adapter: Path, key: str) -> State:
        """The global state saved in `adapter` (results/<run-id>/adapter of an earlier run),
        checked to fit this run's model, labels and r_max; `key` names the config key."""
        if not (adapter / METADATA_FILE).is_file():
            raise ConfigError(f"{key}='{adapter}' is not a saved edge-lam adapter: give "
                              "results/<run-id>/adapter of an earlier run")
        saved_cfg, labels, state = load_adapter(adapter)
        if tuple(labels) != self.label_names:
            raise ConfigError(f"{key}: the adapter's labels {list(labels)} differ from this "
                              f"data's {list(self.label_names)}: use the same data.path")
        expected = self.initial_state()
        wrong = sorted(set(state) ^ set(expected)) or sorted(
            k for k in expected if tuple(state[k].shape) != expected[k].shape)
        if wrong:
            raise ConfigError(
                f"{key}: the adapter (model={saved_cfg.model}, r_max={saved_cfg.r_max}) does "
                f"not fit this run (model={self.cfg.model}, r_max={self.cfg.r_max}; first "
                f"mismatch {wrong[0]}): use the model, lora.target-modules, strategy/"
                "unlearn.aggregation and device ranks it was trained with")
        return {k: np.asarray(state[k], dtype=np.float32) for k in expected}

    def evaluate(self, state: State, progress: bool = False) -> dict[str, float]:
        model = get_lora_model(self.cfg, self.label_names, lora_rank(state))
        set_trainable_state(model, state)
        tokenizer = load_tokenizer(resolve_model_source(self.cfg.model))
        return evaluate(model, tokenizer, self.test, self.eval_config(tokenizer), progress)

    def eval_config(self, tokenizer) -> RunConfig:
        """The config the test split is scored with: `train.max-length=0` becomes the longest
        test pair (no answer cut); a budget that cuts test pairs is warned about."""
        return budgeted(self.cfg, tokenizer, self.test, "the test split", quantile=1.0)

    def save_adapter(self, state: State, out_dir: Path) -> Path:
        """Standard PEFT folder (PeftModel.from_pretrained loads it) + our metadata file."""
        rank = lora_rank(state)
        model = get_lora_model(self.cfg, self.label_names, rank)
        set_trainable_state(model, state)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), selected_adapters=[adapter_name(rank)])
        # PEFT writes a non-default adapter into a sub-folder named after it: flatten it.
        saved = tmp / adapter_name(rank) if (tmp / adapter_name(rank)).is_dir() else tmp
        meta = {"model": self.cfg.model, "task": self.cfg.task, "rank": rank,
                "label_names": list(self.label_names), "run_config": self.cfg.to_dict()}
        deltas = {k: v for k, v in state.items() if is_base_delta_key(k)}
        if deltas:  # flora / fedex: the update merged into the frozen weights, beside it
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in deltas.items()},
                      str(saved / BASE_DELTA_FILE))
            meta["base_delta"] = {"file": BASE_DELTA_FILE, "scaling": self.cfg.lora_scaling,
                                  "apply": "W = W0 + scaling * base_delta per layer"}
        (saved / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        # swap in the new folder whole: the old one stays until the new one is in place
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(saved, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


BASE_DELTA_FILE = "base_delta.safetensors"


def load_adapter(adapter: Path) -> tuple[RunConfig, tuple[str, ...], dict]:
    """(run config it was trained with, label names, state) of a saved edge-lam adapter."""
    meta_path = adapter / "edge_lam.json"
    weights = adapter / "adapter_model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise ConfigError(f"{adapter} is not an edge-lam adapter folder (it needs "
                          "edge_lam.json and adapter_model.safetensors): pass "
                          "results/<run-id>/adapter")
    meta = json.loads(meta_path.read_text())
    files = [weights]
    if "base_delta" in meta:  # flora / fedex: the update merged into the frozen weights
        files.append(adapter / meta["base_delta"]["file"])
    from safetensors.numpy import load_file

    state = {}
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the adapter was saved with it; copy the "
                              "whole results/<run-id>/adapter folder")
        try:
            state.update(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise ConfigError(f"{path} is damaged ({err.__class__.__name__}: {err}); copy it "
                              "again from the run's results folder or re-run training") from err
    return RunConfig.from_dict(meta["run_config"]), tuple(meta["label_names"]), state


def data_source_of(path, cfg: RunConfig) -> str:
    return str(path) if path else f"hub:{cfg.data.hub_dataset}"


def warn_unseen_labels(frames: dict, columns, source: str) -> list[str]:
    """Warn about labels of the test split that training never shows (the model cannot
    learn them: they only lower the accuracy); returns them."""
    if not columns.label:
        return []
    train = frames["train"][columns.label].astype(str).value_counts()
    test = frames["test"][columns.label].astype(str).value_counts()
    unseen = sorted(set(test.index) - set(train.index))
    if unseen:
        log.warning("%s: label(s) %s occur in the test split (%s examples) but never in the "
                    "training split (%d examples): the model cannot learn them", source,
                    unseen, ", ".join(f"{u}: {int(test[u])}" for u in unseen),
                    int(train.sum()))
    return unseen


def truncated(state: State, rank: int) -> State:
    """What a device of rank `rank` receives from this global state."""
    if rank > lora_rank(state):
        raise ConfigError(f"--rank {rank} is above the adapter's rank {lora_rank(state)}")
    return truncate_lora(state, rank)
