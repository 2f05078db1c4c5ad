"""The Flower Strategy of FedKD (S3): a mixed federation sharing one LoRA module.

On top of HeterogeneousLoRA (QUERY for profiles, unicast, validated replies) it changes:
- each node also has a task (reported with --node-config task, else fedkd.task-mix by
  partition id) and gets the shared backbone adapter plus the head of its own task;
- with fedkd.compress, what crosses the network each way is the SVD-compressed update against
  the copy the receiver already holds, at the energy threshold T(t) of the round (S3); the
  server remembers what each node holds, and a node that failed gets the whole module again;
- aggregation averages the backbone over all devices and each head over its task's devices
  (`strategies.fedkd.aggregate_fedkd`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies.fedkd.math import (SEP, aggregate_fedkd, decode_update, device_view, encode_update,
                              energy_threshold, is_compressed)
from strategies.lora.strategy import HeterogeneousLoRA, NodeProfile
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import State
from edge_lam.records import from_record
from edge_lam.logs import get_logger

log = get_logger()


def svd_matrices(keys: Iterable[str]) -> int:
    """How many matrices a payload carries as truncated SVD factors (`<key>::U`, `::s`,
    `::Vt`) rather than whole (`::full`, or uncompressed)."""
    return sum(1 for key in keys if key.endswith(f"{SEP}U"))


@dataclass(frozen=True)
class FedKDProfile(NodeProfile):
    task: str = ""


class FedKDStrategy(HeterogeneousLoRA):
    """Shared module FedAvg across tasks, heads per task, optional S3 update compression."""

    def __init__(self, cfg: RunConfig, task_labels: dict[str, tuple[str, ...]],
                 on_train_round: Callable[[int, dict], None] | None = None,
                 query_timeout: float = 120.0):
        super().__init__(cfg, (), on_train_round, query_timeout)
        self.task_labels = dict(task_labels)
        self._held: dict[int, tuple[State, int]] = {}  # node -> (shared module it holds, round)
        self._global: State = {}
        self._compressed_down: dict[int, bool] = {}  # this round's downlink, per node
        self._svd_down: dict[int, int] = {}  # matrices sent as SVD factors, per node

    def round_energy(self, server_round: int) -> float | None:
        """S3: T(t) rising linearly from fedkd.energy-start to fedkd.energy-end; None = off."""
        if not self.cfg.fedkd.compress:
            return None
        return energy_threshold(min(server_round, self.cfg.num_rounds), self.cfg.num_rounds,
                                self.cfg.fedkd.energy_start, self.cfg.fedkd.energy_end)

    # ----------------------------------------------------------------- who is who
    def _make_profile(self, node: int, p: ConfigRecord) -> FedKDProfile:
        base = super()._make_profile(node, p)
        task = self.cfg.fedkd.task_for(base.partition_id, str(p.get("task", "")))
        return FedKDProfile(node, base.device, base.partition_id, base.rank, task,
                            platform=base.platform)

    # ----------------------------------------------------------------- downlink
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _downlink(self, node: int, global_state: State, server_round: int
                  ) -> tuple[State, State, dict]:
        task = self.profiles[node].task
        view = device_view(global_state, task)  # backbone + this task's head
        energy = self.round_energy(server_round)
        held, held_round = self._held.get(node, (None, 0))
        payload = encode_update(view, held, energy)
        compressed = self._compressed_down[node] = is_compressed(payload)
        self._svd_down[node] = svd_matrices(payload)
        expected = decode_update(payload, held)  # exactly what the device will reconstruct
        self._held[node] = (expected, server_round)
        return payload, expected, {"task": task, "label-names": list(self.task_labels[task]),
                                   "base-round": held_round if compressed else 0,
                                   "energy": energy or 0.0}

    # ----------------------------------------------------------------- uplink
    def _decode_uplink(self, node: int, payload: State) -> State:
        return decode_update(payload, self._sent[node][0])  # update against what it was sent

    def _accept(self, msg: Message, node: int, key: str = "arrays"):
        if msg.has_error():  # it may not hold what we think: send the whole module next time
            self._held.pop(node, None)
        return super()._accept(msg, node, key)

    def _client_info(self, node: int, n: int, metrics: dict, msg: Message,
                     key: str = "arrays") -> dict:
        info = super()._client_info(node, n, metrics, msg, key)
        info["task"] = self.profiles[node].task
        info["compressed_up"] = is_compressed(msg.content["arrays"])
        info["compressed_down"] = self._compressed_down.get(node, False)
        info["svd_up"] = svd_matrices(msg.content["arrays"].keys())
        info["svd_down"] = self._svd_down.get(node, 0)
        info["local_loss"] = float(metrics.get("local-loss", float("nan")))
        if "local-accuracy" in metrics:
            info["local_accuracy"] = float(metrics["local-accuracy"])
        return info

    def _aggregate(self, states: list[State], counts: list[int], nodes: list[int]) -> State:
        tasks = [self.profiles[n].task for n in nodes]
        return aggregate_fedkd(states, counts, tasks, self._global)
