"""A device's local work for one round, free of Flower: data, model at rank r_k, training.

Everything expensive is cached per process: the base model (edge_lam.models.lora_model), the data files and
each partition, so a device (or a simulation worker playing many devices) loads once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.encode import budgeted
from edge_lam.data.partition import partition_indices
from edge_lam.data.text import (Examples, load_split_frames, resolve_columns, resolve_data_path,
                                to_examples)
from edge_lam.training.lora import State
from edge_lam.models.lora_model import (get_lora_model, get_trainable_state, load_tokenizer,
                                        resolve_model_source, set_trainable_state)
from edge_lam.training.loop import compute_gradient, train_local
from edge_lam.logs import get_logger

log = get_logger()


@dataclass(frozen=True)
class DeviceInfo:
    """What a device says about itself (from flower-supernode --node-config)."""

    device: str = ""  # profile name, e.g. 'rpi4'; '' = use the simulated mix
    partition_id: int = -1  # -1 = the whole local data folder is this device's
    num_partitions: int = 0
    lora_rank: int = 0  # 0 = the profile's default rank
    data_dir: str = ""  # '' = the run config's data.path
    privacy_ledger: str = ""  # JSON file keeping the DP accountant across runs ('' = per run)
    task: str = ""  # FedKD task of this device; '' = fedkd.task-mix by partition id
    state_dir: str = ""  # FedKD private state folder; '' = the run config's fedkd.state-dir

    @classmethod
    def from_node_config(cls, node_config) -> DeviceInfo:
        def num(key: str, default: int) -> int:
            try:
                return int(node_config.get(key, default))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"--node-config {key} must be a whole number") from err

        return cls(device=str(node_config.get("device", "")),
                   partition_id=num("partition-id", -1),
                   num_partitions=num("num-partitions", 0),
                   lora_rank=num("lora-rank", 0),
                   data_dir=str(node_config.get("data-dir", "")),
                   privacy_ledger=str(node_config.get("privacy-ledger", "")),
                   task=str(node_config.get("task", "")),
                   state_dir=str(node_config.get("state-dir", "")))


@functools.lru_cache(maxsize=16)
def local_examples(cfg: RunConfig, info: DeviceInfo, label_names: tuple[str, ...]) -> Examples:
    """This device's training examples (its partition, or all of its local data)."""
    path = resolve_data_path(cfg, info.data_dir)
    if info.data_dir and path is None:
        raise ConfigError(f"data-dir='{info.data_dir}' does not exist on this device: fix "
                          "--node-config data-dir")
    frames = load_split_frames(str(path) if path else None, cfg.data.hub_dataset,
                               cfg.data.encoding)
    examples = to_examples(frames["train"], resolve_columns(frames["train"], cfg), label_names)
    if info.partition_id >= 0 and info.num_partitions > 0:
        examples = examples.subset(
            partition_indices(examples, cfg, info.partition_id, info.num_partitions))
    if len(examples) == 0:
        raise ConfigError(f"device {info} has no training examples")
    return examples


def _where(info: DeviceInfo) -> str:
    return f"partition {info.partition_id}" if info.partition_id >= 0 else "this device's data"


def _seed(cfg: RunConfig, info: DeviceInfo, server_round: int) -> int:
    return cfg.seed * 100_003 + server_round * 1_009 + max(info.partition_id, 0)


def train_round(cfg: RunConfig, info: DeviceInfo, label_names: tuple[str, ...], rank: int,
                state: State, server_round: int, tag: str = "", examples: Examples | None = None,
                privacy=None, r_max: int | None = None) -> tuple[State, int, dict]:
    """Load `state` (at `rank`) into the model, train locally, return (state, n_k, metrics).

    `examples` replaces the device's own data (benchmarks); `privacy` (a
    edge_lam.training.privacy.DevicePrivacy) makes every step an Opacus DP-SGD step; `r_max` is the
    global rank the server sent (None: the config's).
    """
    examples = examples if examples is not None else local_examples(cfg, info, label_names)
    model = get_lora_model(cfg, label_names, rank, r_max=r_max)
    set_trainable_state(model, state)
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    metrics = train_local(model, tokenizer, examples, budgeted(cfg, tokenizer, examples,
                                                               _where(info)),
                          seed=_seed(cfg, info, server_round),
                          tag=tag, privacy=privacy,
                          lora_lr_scale=lora_lr_scale(cfg, rank, r_max or cfg.r_max))
    return get_trainable_state(model), len(examples), metrics


def lora_lr_scale(cfg: RunConfig, rank: int, r_max: int) -> float:
    """c = sqrt(s_k / s) with lora.rank-matched-lr, else 1: s = the shared scaling at r_max,
    s_k = standalone LoRA's at rank r_k under the same convention (`lora.scaling-rule`), so
    sqrt(r_max / r_k) for alpha / r and (r_max / r_k)^(1/4) for rsLoRA. Training P' = c P at
    lr c eta under scaling s is Adam's trajectory of P at lr eta under scaling s c^2 (Adam's
    step does not depend on the gradient's scale): c^2 s = s_k."""
    if not cfg.lora.rank_matched_lr:
        return 1.0
    return math.sqrt(cfg.scaling_at(rank) / cfg.scaling_at(r_max))


def gradient_round(cfg: RunConfig, info: DeviceInfo, label_names: tuple[str, ...], rank: int,
                   state: State, server_round: int, batches: int, objective=None,
                   tag: str = "", examples: Examples | None = None, privacy=None,
                   r_max: int | None = None, what: str = "task") -> tuple[State, int, dict]:
    """The mean gradient over `batches` batches of the task loss, or of `objective(logits,
    labels)`, at `state`, as a state of the same keys and shapes (rank `rank`), with n_k
    and metrics (S4 step 1)."""
    examples = examples if examples is not None else local_examples(cfg, info, label_names)
    model = get_lora_model(cfg, label_names, rank, r_max=r_max)
    set_trainable_state(model, state)
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    grads, metrics = compute_gradient(model, tokenizer, examples,
                                      budgeted(cfg, tokenizer, examples, _where(info)), batches,
                                      seed=_seed(cfg, info, server_round) + 7,
                                      objective=objective, tag=tag, what=what, privacy=privacy)
    return grads, len(examples), metrics
