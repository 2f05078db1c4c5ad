"""One typed, validated view of the run config: the only place that parses raw config values.

Flower hands every component the flattened `[tool.flwr.app.config]` table of pyproject.toml,
merged with `flwr run --run-config "..."` overrides (keys such as `lora.alpha`). `RunConfig`
turns that mapping into typed fields and fails early, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AGGREGATIONS = ("fedavg", "hetlora", "flexlora")
STRATEGIES = AGGREGATIONS + ("fedkd", "unlearn")
UNLEARN_LOSSES = ("bounded-ce", "fedosd")
TASKS = ("seq-cls", "causal-lm")
PARTITIONERS = ("iid", "dirichlet", "pathological")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class FedKDTask:
    """One task of a FedKD federation (S3): its own data, columns, label space and head."""

    name: str
    path: str  # folder with train.* and test.*/validation.* (or one file)
    text_column: str = "auto"
    label_column: str = "label"


class ConfigError(ValueError):
    """A run-config value is wrong; the message names the key and how to fix it."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run, with the defaults of pyproject.toml."""

    strategy: str = "hetlora"
    num_rounds: int = 3
    fraction_train: float = 1.0
    min_devices: int = 2
    round_timeout: float = 3600.0
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    task: str = "seq-cls"
    seed: int = 42
    results_dir: str = "results"
    # LoRA
    target_modules: tuple[str, ...] = ("query", "value")
    lora_alpha: float = 16.0  # scaling alpha / r_max, shared by every rank
    lora_dropout: float = 0.05
    fedavg_rank: int = 8
    # devices
    device_mix: tuple[str, ...] = ("rpi4", "rpi5", "jetson-orin-nano", "laptop")
    # (profile, rank) pairs; a tuple so the config stays hashable (used as a cache key)
    profile_ranks: tuple[tuple[str, int], ...] = (
        ("jetson-orin-nano", 8), ("laptop", 16), ("rpi4", 2), ("rpi5", 4))  # sorted
    # data
    data_path: str = "../shared/data/agnews"
    hub_dataset: str = "fancyzhx/ag_news"
    text_column: str = "auto"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_device: int = 2
    # local training
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    max_length: int = 128
    # server-side evaluation
    eval_max_examples: int = 500
    eval_batch_size: int = 64
    # S4 federated unlearning (strategy='unlearn'): train, unlearn, recover
    unlearn_aggregation: str = "hetlora"  # how training/recovery rounds aggregate
    unlearn_clients: tuple[int, ...] = ()  # partition ids (simulation) or node ids (deployment)
    unlearn_after_rounds: int = -1  # training rounds before the request; -1 = auto
    unlearn_from_adapter: str = ""  # start from results/<id>/adapter of an earlier run
    unlearn_rounds: int = 2
    unlearn_recovery_rounds: int = 3
    unlearn_loss: str = "fedosd"
    unlearn_eps: float = 0.01  # floor of p_y in the bounded cross-entropy
    unlearn_lr: float = 1.0  # server step eta of the S4 update
    unlearn_grad_batches: int = 4  # batches each device averages its gradient over
    # differential privacy on devices (Opacus)
    dp_enabled: bool = False
    dp_target_epsilon: float = 8.0  # each device's budget for the whole run
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0  # per-example clipping norm C
    dp_noise_multiplier: float = 0.0  # sigma / C; 0 = derive from the budget
    # FedKD (S3): a mixed federation, one task per device
    fedkd_task_mix: tuple[str, ...] = ("agnews", "sst2")  # device k: mix[k % len]
    fedkd_tasks: tuple[FedKDTask, ...] = (  # sorted by name
        FedKDTask("agnews", "../shared/data/agnews", "text", "label"),
        FedKDTask("sst2", "../shared/data/sst2", "sentence", "label"))
    fedkd_shared_rank: int = 8  # rank of the shared adapter (the only thing transmitted)
    fedkd_local_rank: int = 16  # rank of each device's private adapter
    fedkd_local_model: str = ""  # '' = the private adapter sits on its own copy of `model`
    fedkd_temperature: float = 2.0
    fedkd_lambda: float = 1.0  # weight of the local module's task loss
    fedkd_adaptive: bool = True  # distillation scaled by 1 / (CE_local + CE_shared)
    fedkd_hidden_mse: bool = False  # add MSE between the two modules' hidden states
    fedkd_compress: bool = False  # SVD-compress shared-module updates both ways
    fedkd_energy_start: float = 0.95
    fedkd_energy_end: float = 0.98
    fedkd_state_dir: str = "fedkd-state"  # devices' private state: <dir>/run-<id>/<device>/
    fedkd_device_eval_examples: int = 200  # local-module test accuracy reported by devices

    # ------------------------------------------------------------------ derived values
    @property
    def aggregation(self) -> str:
        """How training rounds aggregate: the strategy, or unlearn.aggregation when unlearning."""
        return self.unlearn_aggregation if self.strategy == "unlearn" else self.strategy

    @property
    def training_rounds(self) -> int:
        """Ordinary training rounds; with strategy='unlearn' those before the request."""
        if self.strategy != "unlearn":
            return self.num_rounds
        if self.unlearn_after_rounds >= 0:
            return self.unlearn_after_rounds
        return 0 if self.unlearn_from_adapter else self.num_rounds

    @property
    def total_rounds(self) -> int:
        """Every round of the run (S4: training + unlearning + recovery rounds)."""
        if self.strategy != "unlearn":
            return self.num_rounds
        return self.training_rounds + self.unlearn_rounds + self.unlearn_recovery_rounds

    @property
    def planned_private_steps(self) -> int:
        """Noisy releases a device plans for: local steps of training/recovery rounds plus
        the gradient batches of unlearning rounds (what the DP budget is spread over)."""
        if self.strategy != "unlearn":
            return self.num_rounds * self.local_steps
        train = self.training_rounds + self.unlearn_recovery_rounds
        return train * self.local_steps + self.unlearn_rounds * self.unlearn_grad_batches

    @property
    def r_max(self) -> int:
        """Rank of the global adapter the server keeps (S1: r_max = max_k r_k)."""
        if self.aggregation == "fedavg":
            return self.fedavg_rank
        if self.strategy == "fedkd":
            return self.fedkd_shared_rank
        return max(self.ranks.values())

    @property
    def ranks(self) -> dict[str, int]:
        """Default LoRA rank of each device profile."""
        return dict(self.profile_ranks)

    @property
    def lora_scaling(self) -> float:
        """alpha / r_max: the factor in front of B@A on every device, whatever its rank."""
        return self.lora_alpha / self.r_max

    def device_for(self, partition_id: int, reported: str = "") -> str:
        """Device profile of a node: what it reports, else the simulated mix by partition id."""
        if reported:
            return reported
        if partition_id < 0:
            raise ConfigError(
                "a device reported neither a profile nor a partition id: start it with "
                "--node-config \"device='rpi4' ...\" (profiles: "
                f"{', '.join(sorted(self.ranks))})"
            )
        return self.device_mix[partition_id % len(self.device_mix)]

    def rank_for(self, device: str, explicit_rank: int = 0) -> int:
        """LoRA rank a device trains at (S1's r_k)."""
        if self.aggregation == "fedavg":
            return self.fedavg_rank
        if self.strategy == "fedkd":
            return self.fedkd_shared_rank  # one common shared module (S3)
        if explicit_rank > 0:
            if explicit_rank > self.r_max:
                raise ConfigError(
                    f"a device asked for lora-rank={explicit_rank}, above the largest profile "
                    f"rank r_max={self.r_max}: raise devices.rank.<profile> or lower its "
                    "lora-rank"
                )
            return explicit_rank
        if device not in self.ranks:
            raise ConfigError(
                f"unknown device profile '{device}': add devices.rank.{device}=<rank> to the "
                f"run config, or use one of {', '.join(sorted(self.ranks))}"
            )
        return self.ranks[device]

    # ------------------------------------------------------------------ FedKD (S3)
    @property
    def fedkd_task_names(self) -> tuple[str, ...]:
        """The federation's tasks: those of fedkd.task-mix, in order of first appearance."""
        return tuple(dict.fromkeys(self.fedkd_task_mix))

    def fedkd_task(self, name: str) -> FedKDTask:
        for task in self.fedkd_tasks:
            if task.name == name:
                return task
        raise ConfigError(f"unknown FedKD task '{name}': add fedkd.task.{name}.path=<folder> "
                          f"(and fedkd.task-mix) to the run config, or use one of "
                          f"{', '.join(self.fedkd_task_names)}")

    def fedkd_task_for(self, partition_id: int, reported: str = "") -> str:
        """Task of a device: what it reports (node-config task), else mix[partition % len]."""
        if reported:
            if reported not in self.fedkd_task_names:
                raise ConfigError(f"a device reported task '{reported}', which is not in "
                                  f"fedkd.task-mix ({', '.join(self.fedkd_task_mix)}): add it "
                                  "there (with fedkd.task.<name>.path) or fix --node-config task")
            return reported
        if partition_id < 0:
            raise ConfigError("a FedKD device reported neither a task nor a partition id: start "
                              "it with --node-config \"task='agnews' ...\"")
        return self.fedkd_task_mix[partition_id % len(self.fedkd_task_mix)]

    def fedkd_task_partition(self, partition_id: int, num_partitions: int
                             ) -> tuple[str, int, int]:
        """(task, index among the devices of that task, number of devices of that task).

        Simulated device k of N holds task mix[k % len]; the devices of one task split that
        task's training data among themselves (data.partitioner).
        """
        task = self.fedkd_task_for(partition_id)
        same = [k for k in range(num_partitions) if self.fedkd_task_for(k) == task]
        return task, same.index(partition_id), len(same)

    def task_config(self, name: str) -> RunConfig:
        """This config with the data keys of FedKD task `name` (what its devices train on)."""
        task = self.fedkd_task(name)
        return dataclasses.replace(self, data_path=task.path, hub_dataset="",
                                   text_column=task.text_column,
                                   label_column=task.label_column)

    def local_module_config(self, name: str) -> RunConfig:
        """Config of the private local module of a task-`name` device: LoRA at
        fedkd.local-rank (scaling alpha / local rank) on fedkd.local-model or `model`."""
        return dataclasses.replace(self.task_config(name),
                                   model=self.fedkd_local_model or self.model,
                                   strategy="fedavg", fedavg_rank=self.fedkd_local_rank)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["profile_ranks"] = self.ranks
        out["fedkd_tasks"] = {t.name: {"path": t.path, "text_column": t.text_column,
                                       "label_column": t.label_column} for t in self.fedkd_tasks}
        out["r_max"] = self.r_max
        out["lora_scaling"] = self.lora_scaling
        return out

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> RunConfig:
        """Invert `to_dict` (e.g. a saved adapter's edge_lam.json); unknown keys are ignored,
        missing ones take their defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in fields}
        for key in ("target_modules", "device_mix", "fedkd_task_mix", "unlearn_clients"):
            if key in values:
                values[key] = tuple(values[key])
        if "profile_ranks" in values:
            values["profile_ranks"] = tuple(sorted(dict(values["profile_ranks"]).items()))
        if "fedkd_tasks" in values:
            values["fedkd_tasks"] = tuple(FedKDTask(name, **spec) for name, spec
                                          in sorted(dict(values["fedkd_tasks"]).items()))
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flattened run config (unknown keys are an error: typos bite)."""
        r = _Reader(raw)
        d = cls()
        ranks = d.ranks
        for key in list(raw):
            if key.startswith("devices.rank."):
                ranks[key.removeprefix("devices.rank.")] = r.int(key, 0, lo=1)
        fedkd_tasks = _read_fedkd_tasks(r, d.fedkd_tasks)
        cfg = cls(
            strategy=r.choice("strategy", d.strategy, STRATEGIES),
            num_rounds=r.int("num-server-rounds", d.num_rounds, lo=1),
            fraction_train=r.float("fraction-train", d.fraction_train, lo=0.0, hi=1.0),
            min_devices=r.int("min-devices", d.min_devices, lo=1),
            round_timeout=r.float("round-timeout", d.round_timeout, lo=1.0),
            model=r.str("model", d.model),
            task=r.choice("task", d.task, TASKS),
            seed=r.int("seed", d.seed),
            results_dir=r.str("results-dir", d.results_dir),
            target_modules=r.names("lora.target-modules", d.target_modules),
            lora_alpha=r.float("lora.alpha", d.lora_alpha, lo=1e-9),
            lora_dropout=r.float("lora.dropout", d.lora_dropout, lo=0.0, hi=0.99),
            fedavg_rank=r.int("lora.fedavg-rank", d.fedavg_rank, lo=1),
            device_mix=r.names("devices.mix", d.device_mix),
            profile_ranks=tuple(sorted(ranks.items())),
            data_path=r.str("data.path", d.data_path, allow_empty=True),
            hub_dataset=r.str("data.hub-dataset", d.hub_dataset, allow_empty=True),
            text_column=r.str("data.text-column", d.text_column),
            label_column=r.str("data.label-column", d.label_column),
            prompt_column=r.str("data.prompt-column", d.prompt_column),
            response_column=r.str("data.response-column", d.response_column),
            partitioner=r.choice("data.partitioner", d.partitioner, PARTITIONERS),
            dirichlet_alpha=r.float("data.dirichlet-alpha", d.dirichlet_alpha, lo=1e-6),
            classes_per_device=r.int("data.classes-per-device", d.classes_per_device, lo=1),
            local_steps=r.int("train.local-steps", d.local_steps, lo=1),
            batch_size=r.int("train.batch-size", d.batch_size, lo=1),
            lr=r.float("train.lr", d.lr, lo=1e-12),
            max_length=r.int("train.max-length", d.max_length, lo=8),
            eval_max_examples=r.int("eval.max-examples", d.eval_max_examples, lo=0),
            eval_batch_size=r.int("eval.batch-size", d.eval_batch_size, lo=1),
            unlearn_aggregation=r.choice("unlearn.aggregation", d.unlearn_aggregation,
                                         AGGREGATIONS),
            unlearn_clients=r.ids("unlearn.clients"),
            unlearn_after_rounds=r.int("unlearn.after-rounds", d.unlearn_after_rounds, lo=-1),
            unlearn_from_adapter=r.str("unlearn.from-adapter", "", allow_empty=True),
            unlearn_rounds=r.int("unlearn.rounds", d.unlearn_rounds, lo=1),
            unlearn_recovery_rounds=r.int("unlearn.recovery-rounds",
                                          d.unlearn_recovery_rounds, lo=0),
            unlearn_loss=r.choice("unlearn.loss", d.unlearn_loss, UNLEARN_LOSSES),
            unlearn_eps=r.float("unlearn.eps", d.unlearn_eps, lo=1e-12, hi=0.999),
            unlearn_lr=r.float("unlearn.lr", d.unlearn_lr, lo=1e-12),
            unlearn_grad_batches=r.int("unlearn.grad-batches", d.unlearn_grad_batches, lo=1),
            dp_enabled=r.bool("dp.enabled", d.dp_enabled),
            dp_target_epsilon=r.float("dp.target-epsilon", d.dp_target_epsilon, lo=1e-6),
            dp_delta=r.float("dp.delta", d.dp_delta, lo=1e-12, hi=0.5),
            dp_max_grad_norm=r.float("dp.max-grad-norm", d.dp_max_grad_norm, lo=1e-9),
            dp_noise_multiplier=r.float("dp.noise-multiplier", d.dp_noise_multiplier, lo=0.0),
            fedkd_task_mix=r.names("fedkd.task-mix", d.fedkd_task_mix),
            fedkd_tasks=fedkd_tasks,
            fedkd_shared_rank=r.int("fedkd.shared-rank", d.fedkd_shared_rank, lo=1),
            fedkd_local_rank=r.int("fedkd.local-rank", d.fedkd_local_rank, lo=1),
            fedkd_local_model=r.str("fedkd.local-model", d.fedkd_local_model, allow_empty=True),
            fedkd_temperature=r.float("fedkd.temperature", d.fedkd_temperature, lo=1e-6),
            fedkd_lambda=r.float("fedkd.lambda", d.fedkd_lambda, lo=0.0),
            fedkd_adaptive=r.bool("fedkd.adaptive", d.fedkd_adaptive),
            fedkd_hidden_mse=r.bool("fedkd.hidden-mse", d.fedkd_hidden_mse),
            fedkd_compress=r.bool("fedkd.compress", d.fedkd_compress),
            fedkd_energy_start=r.float("fedkd.energy-start", d.fedkd_energy_start, lo=1e-6,
                                       hi=1.0),
            fedkd_energy_end=r.float("fedkd.energy-end", d.fedkd_energy_end, lo=1e-6, hi=1.0),
            fedkd_state_dir=r.str("fedkd.state-dir", d.fedkd_state_dir),
            fedkd_device_eval_examples=r.int("fedkd.device-eval-examples",
                                             d.fedkd_device_eval_examples, lo=0),
        )
        r.reject_unknown(prefixes=("devices.rank.",))
        cfg._check_unlearning()
        if cfg.strategy == "fedkd" and cfg.task != "seq-cls":
            raise ConfigError("strategy='fedkd' distils class probabilities: it needs "
                              "task='seq-cls'")
        defined = {t.name for t in cfg.fedkd_tasks}
        for name in cfg.fedkd_task_mix:
            if name not in defined:
                raise ConfigError(
                    f"fedkd.task-mix names '{name}', which has no data: add "
                    f"fedkd.task.{name}.path=<folder> or remove it from fedkd.task-mix"
                )
        for device in cfg.device_mix:
            if device not in cfg.ranks:
                raise ConfigError(
                    f"devices.mix names '{device}', which has no rank: add "
                    f"devices.rank.{device}=<rank> or remove it from devices.mix"
                )
        return cfg

    def _check_unlearning(self) -> None:
        if self.strategy != "unlearn":
            if self.unlearn_clients:
                raise ConfigError(
                    f"unlearn.clients is set but strategy='{self.strategy}': add "
                    "strategy='unlearn' to forget those devices, or clear unlearn.clients")
            return
        if not self.unlearn_clients:
            raise ConfigError(
                "strategy='unlearn' needs unlearn.clients: name the devices that opt out, "
                "e.g. unlearn.clients='3' or '3,5' (partition ids in simulation, node ids in "
                "deployment)")
        if self.task != "seq-cls":
            raise ConfigError("strategy='unlearn' needs task='seq-cls': its unlearning losses "
                              "(unlearn.loss) are defined on class labels")
        if self.training_rounds == 0 and not self.unlearn_from_adapter:
            raise ConfigError(
                "unlearn.after-rounds=0 leaves nothing to unlearn: train first "
                "(unlearn.after-rounds > 0) or start from a saved adapter with "
                "unlearn.from-adapter='results/<run-id>/adapter'")


def _read_fedkd_tasks(r: _Reader, defaults: tuple[FedKDTask, ...]) -> tuple[FedKDTask, ...]:
    """fedkd.task.<name>.path / .text-column / .label-column, over the built-in defaults."""
    tasks = {t.name: t for t in defaults}
    names = {k.split(".")[2] for k in r.raw if k.startswith("fedkd.task.") and k.count(".") >= 3}
    for name in sorted(names):
        if not _TASK_NAME.match(name):
            raise ConfigError(f"fedkd.task.{name}: task names may use letters, digits, '-' "
                              "and '_' only")
        base = tasks.get(name, FedKDTask(name, ""))
        key = f"fedkd.task.{name}."
        tasks[name] = FedKDTask(name, r.str(key + "path", base.path, allow_empty=True),
                                r.str(key + "text-column", base.text_column),
                                r.str(key + "label-column", base.label_column))
        if not tasks[name].path:
            raise ConfigError(f"{key}path is missing: give the folder with that task's "
                              "train.* and test.* files")
    return tuple(sorted(tasks.values(), key=lambda t: t.name))


class _Reader:
    """Typed access to the raw mapping; remembers which keys were read."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = raw
        self.seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.raw.get(key, default)

    def str(self, key: str, default: str, allow_empty: bool = False) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (quote it: {key}='{value}')")
        value = value.strip()
        if not value and not allow_empty:
            raise ConfigError(f"{key} is empty: give a value (default '{default}')")
        return value

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.str(key, default).lower()
        if value not in options:
            raise ConfigError(
                f"{key}='{value}' is not known: use one of {', '.join(options)}"
            )
        return value

    def int(self, key: str, default: int, lo: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        value = int(value)
        if lo is not None and value < lo:
            raise ConfigError(f"{key}={value} is too small: it must be at least {lo}")
        return value

    def float(self, key: str, default: float, lo: float | None = None,
              hi: float | None = None) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key}={value} is out of range [{lo}, {hi}]")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (no quotes), got {value!r}")
        return value

    def ids(self, key: str) -> tuple[int, ...]:
        """Comma-separated whole numbers ('3,5'), a single number, or '' for none."""
        value = self._get(key, "")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must list device ids like '3,5', got {value!r}")
        try:
            ids = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError as err:
            raise ConfigError(f"{key}='{value}' must list whole-number device ids like "
                              "'3,5' (partition ids in simulation, node ids in deployment)"
                              ) from err
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ConfigError(f"{key}='{value}' must list distinct non-negative ids")
        return ids

    def names(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.str(key, ",".join(default))
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        if not names:
            raise ConfigError(f"{key} lists no names: give a comma-separated list")
        return names

    def reject_unknown(self, prefixes: tuple[str, ...]) -> None:
        unknown = [k for k in self.raw if k not in self.seen and not k.startswith(prefixes)]
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(sorted(unknown))}: check the spelling "
                "against [tool.flwr.app.config] in pyproject.toml"
            )
