"""Server side of FedKD (S3), free of Flower: one ServerModel per task of the federation.

The global state is the shared backbone adapter plus one head per task
(`strategies.fedkd.global_state`); each task's test split evaluates the backbone with that
task's head, and each task's view is saved as a standard PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_lam.training.evaluation import ServerModel
from strategies.fedkd.math import device_view, global_state
from strategies.fedkd.config import local_module_config, task_config
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import resolve_data_path
from edge_lam.training.lora import State
from edge_lam.models.lora_model import check_lora_targets, get_lora_model


@dataclass
class FedKDServer:
    cfg: RunConfig
    tasks: dict[str, ServerModel]  # task name -> its data, labels, test split, shared model

    @classmethod
    def prepare(cls, cfg: RunConfig) -> FedKDServer:
        """Load every task's data and check both modules fit: config errors surface here."""
        tasks = {}
        for name in cfg.fedkd.task_names:
            task_cfg = task_config(cfg, name)
            if _data_path_or_none(task_cfg) is None:
                raise ConfigError(f"fedkd.task.{name}.path='{task_cfg.data.path}' does not "
                                  "exist: point it at a folder with train.tsv and test.tsv")
            try:
                tasks[name] = ServerModel.prepare(task_cfg)
            except ConfigError as err:  # name the task's own keys, not data.*
                message = str(err)
                for key in ("path", "text-column", "label-column"):
                    message = message.replace(f"data.{key}", f"fedkd.task.{name}.{key}")
                raise ConfigError(message) from err
            local_cfg = local_module_config(cfg, name)
            labels = tasks[name].label_names
            local = (get_lora_model(local_cfg, labels, cfg.fedkd.local_rank, copy="local")
                     if local_cfg.model != cfg.model else get_lora_model(task_cfg, labels,
                                                                         cfg.r_max))
            try:
                check_lora_targets(local, local_cfg, [cfg.fedkd.local_rank])
            except ConfigError as err:
                raise ConfigError(f"fedkd.local-rank / fedkd.local-model: {err}") from err
        return cls(cfg, tasks)

    @property
    def label_names(self) -> dict[str, tuple[str, ...]]:
        return {name: task.label_names for name, task in self.tasks.items()}

    def initial_state(self) -> State:
        """Fresh shared backbone (the same PEFT init on every task's model) + fresh heads."""
        views = {name: task.initial_state() for name, task in self.tasks.items()}
        return global_state(next(iter(views.values())), views)

    def evaluate(self, state: State) -> dict[str, dict[str, float]]:
        """Accuracy and loss of the backbone + task t's head on task t's test split."""
        return {name: task.evaluate(device_view(state, name))
                for name, task in self.tasks.items()}

    def save_adapters(self, state: State, out_dir: Path) -> dict[str, Path]:
        """out_dir/<task>/: a PEFT adapter (backbone + that task's head) for each task."""
        return {name: task.save_adapter(device_view(state, name), out_dir / name)
                for name, task in self.tasks.items()}


def _data_path_or_none(task_cfg: RunConfig):
    """The task's data folder, or None when it does not exist (named by the caller with the
    task's own key, fedkd.task.<name>.path)."""
    try:
        return resolve_data_path(task_cfg)
    except ConfigError:
        return None
