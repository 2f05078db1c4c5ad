"""The `fedkd.*` section and the traits of `strategy='fedkd'` (S3): a mixed-task federation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_lam.config.run_config import RunConfig, Traits
from edge_lam.models.families import family
from edge_lam.config.options import ConfigError, Reader, Section, option, parse_section

_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class FedKDTask:
    """One task of a FedKD federation (S3): its own data, columns, label space and head."""

    name: str
    path: str  # folder with train.* and test.*/validation.* (or one file)
    text_column: str = "auto"
    label_column: str = "label"


DEFAULT_TASKS = (FedKDTask("agnews", "../shared/data/agnews", "text", "label"),
                 FedKDTask("sst2", "../shared/data/sst2", "sentence", "label"))


@dataclass(frozen=True)
class FedKDSection(Section):
    """FedKD (S3): private local modules, a shared module, mutual distillation."""

    task_mix: tuple[str, ...] = option(
        ("agnews", "sst2"), "simulated device k holds task mix[k % len] (a real device: "
        "`--node-config \"task='sst2'\"`)", kind="names")
    shared_rank: int = option(8, "LoRA rank of the shared module (the only thing transmitted)",
                              lo=1)
    local_rank: int = option(16, "LoRA rank of each device's private module", lo=1)
    local_model: str = option("", "model under the private module; empty = its own copy of "
                              "`model`", allow_empty=True)
    temperature: float = option(2.0, "distillation temperature T", lo=1e-6)
    lambda_: float = option(1.0, "weight of the local module's task loss", key="lambda",
                            lo=0.0, legacy="fedkd_lambda")
    adaptive: bool = option(True, "scale distillation by 1 / (CE_local + CE_shared) (FedKD's "
                            "adaptive weighting)")
    hidden_mse: bool = option(False, "add the MSE between the two modules' hidden states "
                              "(layers paired evenly; same hidden size needed)")
    compress: bool = option(False, "SVD-compress shared-module updates in both directions")
    energy_start: float = option(0.95, "energy threshold of the first round", lo=1e-6, hi=1.0)
    energy_end: float = option(0.98, "energy threshold of the last round", lo=1e-6, hi=1.0)
    state_dir: str = option("fedkd-state", "devices' private state: "
                            "`<state-dir>/run-<run-id>/partition-<k>/`; a real device may give "
                            "its own with `--node-config \"state-dir='...'\"`")
    device_eval_examples: int = option(200, "test examples of its task on which each device "
                                       "reports its local module's accuracy (0 = off)", lo=0)
    tasks: tuple[FedKDTask, ...] = DEFAULT_TASKS  # fedkd.task.<name>.* keys, sorted by name

    @classmethod
    def parse(cls, section: str, r: Reader) -> FedKDSection:
        return parse_section(cls, section, r, tasks=_read_tasks(r, DEFAULT_TASKS))

    def validate(self) -> None:
        defined = {t.name for t in self.tasks}
        for name in self.task_mix:
            if name not in defined:
                raise ConfigError(f"fedkd.task-mix names '{name}', which has no data: add "
                                  f"fedkd.task.{name}.path=<folder> or remove it from "
                                  "fedkd.task-mix")

    def legacy_extra(self, section: str) -> dict:
        """The tasks as results files hold them: {"fedkd_tasks": {name: {...}}}."""
        return {f"{section}_tasks": {t.name: {"path": t.path, "text_column": t.text_column,
                                              "label_column": t.label_column}
                                     for t in self.tasks}}

    @staticmethod
    def extra_rows(section: str) -> list[tuple[str, str, str]]:
        """README rows of the keys that are not fields: each task's data."""
        return [(f"{section}.task.<name>.path", "agnews: `../shared/data/agnews`, sst2: "
                 "`../shared/data/sst2`", "that task's data folder (`train.*` and "
                 "`test.*`/`validation.*`)"),
                (f"{section}.task.<name>.text-column", "agnews: `text`, sst2: `sentence`",
                 "its text column (`auto` works too)"),
                (f"{section}.task.<name>.label-column", "`label`", "its label column")]

    @staticmethod
    def from_legacy_extra(section: str, saved: dict) -> dict[str, str]:
        out = {}
        for name, spec in dict(saved.get(f"{section}_tasks", {})).items():
            out.update({f"{section}.task.{name}.path": spec["path"],
                        f"{section}.task.{name}.text-column": spec["text_column"],
                        f"{section}.task.{name}.label-column": spec["label_column"]})
        return out

    @property
    def task_names(self) -> tuple[str, ...]:
        """The federation's tasks: those of fedkd.task-mix, in order of first appearance."""
        return tuple(dict.fromkeys(self.task_mix))

    def task(self, name: str) -> FedKDTask:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"unknown FedKD task '{name}': add fedkd.task.{name}.path=<folder> "
                          f"(and fedkd.task-mix) to the run config, or use one of "
                          f"{', '.join(self.task_names)}")

    def task_for(self, partition_id: int, reported: str = "") -> str:
        """Task of a device: what it reports (node-config task), else mix[partition % len]."""
        if reported:
            if reported not in self.task_names:
                raise ConfigError(f"a device reported task '{reported}', which is not in "
                                  f"fedkd.task-mix ({', '.join(self.task_mix)}): add it "
                                  "there (with fedkd.task.<name>.path) or fix --node-config task")
            return reported
        if partition_id < 0:
            raise ConfigError("a FedKD device reported neither a task nor a partition id: start "
                              "it with --node-config \"task='agnews' ...\"")
        return self.task_mix[partition_id % len(self.task_mix)]

    def task_partition(self, partition_id: int, num_partitions: int) -> tuple[str, int, int]:
        """(task, index among the devices of that task, number of devices of that task):
        the devices of one task split that task's training data among themselves."""
        task = self.task_for(partition_id)
        same = [k for k in range(num_partitions) if self.task_for(k) == task]
        return task, same.index(partition_id), len(same)


def task_config(cfg: RunConfig, name: str) -> RunConfig:
    """`cfg` with the data keys of FedKD task `name` (what its devices train on)."""
    task = cfg.fedkd.task(name)
    return cfg.updated("data", path=task.path, hub_dataset="", text_column=task.text_column,
                       label_column=task.label_column)


def local_module_config(cfg: RunConfig, name: str) -> RunConfig:
    """Config of the private local module of a task-`name` device: LoRA at fedkd.local-rank
    (scaling alpha / local rank) on fedkd.local-model or `model`."""
    return (task_config(cfg, name).updated(model=cfg.fedkd.local_model or cfg.model,
                                           strategy="fedavg")
            .updated("lora", fedavg_rank=cfg.fedkd.local_rank))


class FedKDTraits(Traits):
    """One shared module at fedkd.shared-rank on every device (S3)."""

    def r_max(self, cfg: RunConfig) -> int:
        return cfg.fedkd.shared_rank

    def rank_for(self, cfg: RunConfig, device: str, explicit_rank: int = 0) -> int:
        return cfg.fedkd.shared_rank

    def aggregates_own_way(self, cfg: RunConfig) -> bool:
        return True  # the shared module's FedAvg (S3 compression), heads kept per task

    def shares_labels(self, cfg: RunConfig) -> bool:
        return False  # each task its own labels and head

    def secure_refusal(self, cfg: RunConfig) -> str:
        return ("strategy='fedkd' distils with each device's own logits and aggregates its "
                "compressed shared module per device")

    def check(self, cfg: RunConfig) -> None:
        if cfg.fedkd.hidden_mse and family(cfg).lm_head:
            raise ConfigError(f"fedkd.hidden-mse=true pairs encoder layers: it needs "
                              f"task='seq-cls', not '{cfg.task}'; set fedkd.hidden-mse=false")


def _read_tasks(r: Reader, defaults: tuple[FedKDTask, ...]) -> tuple[FedKDTask, ...]:
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

