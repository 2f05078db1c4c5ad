"""The Flower Strategy for heterogeneous-rank LoRA (S1): fedavg, hetlora and flexlora.

A thin layer over FedAvg: it keeps FedAvg's node sampling and round loop and only changes
what differs for heterogeneous ranks:
- devices are asked once (QUERY) who they are, and so which rank r_k they train at;
- `configure_train` unicasts each device the global adapter truncated to r_k (S1 step 1);
- `aggregate_train` validates each reply, rejects bad ones (logged, counted) and hands the
  accepted states to the pure aggregation function of `strategies.hetlora`.
The global state is always LoRA factors at r_max (plus the head). A device that replies
`budget-exhausted` (its differential-privacy budget is spent) is logged and not asked again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from strategies.hetlora import AGGREGATORS, aggregation_error, check_reply
from task.config import ConfigError, RunConfig
from task.lora import State, truncate_lora
from task.records import from_record, record_nbytes, to_record
from task.logs import get_logger

log = get_logger()


@dataclass(frozen=True)
class NodeProfile:
    node_id: int
    device: str
    partition_id: int
    rank: int


class HeterogeneousLoRA(FedAvg):
    """FedAvg with per-device LoRA ranks, unicast truncation and validated aggregation."""

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...],
                 on_train_round: Callable[[int, dict], None] | None = None,
                 query_timeout: float = 120.0):
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=cfg.min_devices, min_available_nodes=cfg.min_devices)
        self.cfg = cfg
        self.label_names = label_names
        self.aggregate_fn = AGGREGATORS[cfg.aggregation]
        self.on_train_round = on_train_round or (lambda rnd, info: None)
        self.query_timeout = query_timeout
        self.profiles: dict[int, NodeProfile] = {}
        self.exhausted: dict[int, float] = {}  # node -> epsilon spent when it stopped (DP)
        self._sent: dict[int, tuple[State, int]] = {}  # node -> (state sent, bytes down)

    # ----------------------------------------------------------------- who is who
    def _learn_profiles(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask devices we have not met yet for their profile (one QUERY each)."""
        unknown = [n for n in node_ids if n not in self.profiles]
        if not unknown:
            return
        queries = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.error("node %d did not describe itself: %s", node, reply.error.reason)
                continue
            p = reply.content["profile"]
            try:
                device = self.cfg.device_for(int(p["partition-id"]), str(p["device"]))
                rank = self.cfg.rank_for(device, int(p["lora-rank"]))
            except ConfigError as err:
                log.error("node %d is left out: %s", node, err)
                continue
            self.profiles[node] = NodeProfile(node, device, int(p["partition-id"]), rank)
            log.info("node %d is a '%s' device (partition %d): LoRA rank %d",
                     node, device, int(p["partition-id"]), rank)

    # ----------------------------------------------------------------- downlink
    def _train_node_ids(self, grid: Grid) -> list[int]:
        """FedAvg's sample of connected nodes, less those whose privacy budget is spent."""
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes,
                                   max(num_nodes, self.min_train_nodes))
        return [n for n in node_ids if n not in self.exhausted]

    def _device_config(self, config: ConfigRecord, server_round: int, node: int,
                       **extra) -> ConfigRecord:
        profile = self.profiles[node]
        return ConfigRecord({**dict(config), "server-round": server_round,
                             "rank": profile.rank, "device": profile.device,
                             "label-names": list(self.label_names), **extra})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        node_ids = self._train_node_ids(grid)
        self._learn_profiles(grid, node_ids)
        global_state = from_record(arrays)
        self._sent.clear()
        messages = []
        for node in node_ids:
            profile = self.profiles.get(node)
            if profile is None:
                continue
            state = truncate_lora(global_state, profile.rank)  # S1 step 1, unicast
            record = to_record(state)
            self._sent[node] = (state, record_nbytes(record))
            content = RecordDict({"arrays": record,
                                  "config": self._device_config(config, server_round, node)})
            messages.append(Message(content, dst_node_id=node,
                                    message_type=MessageType.TRAIN))
        log.info("round %d: %s", server_round, ", ".join(
            f"node {n} {self.profiles[n].device}@r{self.profiles[n].rank}" for n in self._sent))
        return messages

    # ----------------------------------------------------------------- uplink
    def _accept(self, msg: Message, key: str = "arrays") -> tuple[State, int, dict] | str:
        """(state, n_k, metrics) of a sound reply (its record `key`), or the reason to
        reject it."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            return f"device error: {msg.error.reason}"
        if node not in self._sent:
            return "reply from a node that was not asked to train"
        expected, _ = self._sent[node]
        try:
            state = from_record(msg.content[key])
            metrics = dict(msg.content["metrics"])
        except (KeyError, ValueError, TypeError) as err:
            return f"malformed reply ({err.__class__.__name__}: {err})"
        num_examples = metrics.get(self.weighted_by_key)
        reason = check_reply(state, expected, self.profiles[node].rank, num_examples)
        return reason or (state, int(num_examples), metrics)

    def _stopped(self, server_round: int, msg: Message) -> bool:
        """Did the device say its privacy budget is spent? (logged; it is not asked again)"""
        if msg.has_error() or "metrics" not in msg.content:
            return False
        metrics = msg.content["metrics"]
        if not int(metrics.get("budget-exhausted", 0)):
            return False
        node = msg.metadata.src_node_id
        self.exhausted[node] = float(metrics.get("epsilon", float("nan")))
        log.warning("round %d: node %d stopped: privacy budget exhausted (epsilon %.3f of "
                    "dp.target-epsilon=%g)%s", server_round, node, self.exhausted[node],
                    self.cfg.dp_target_epsilon,
                    "" if self._has_payload(msg) else "; nothing to aggregate from it")
        return True

    @staticmethod
    def _has_payload(msg: Message) -> bool:
        return "arrays" in msg.content or "gradient" in msg.content

    def _client_row(self, node: int, n: int, metrics: dict, msg: Message, key: str) -> dict:
        profile = self.profiles[node]
        row = {"node_id": node, "partition_id": profile.partition_id,
               "device": profile.device, "rank": profile.rank, "num_examples": n,
               "train_loss": float(metrics.get("train-loss", metrics.get("loss", float("nan")))),
               "train_s": float(metrics.get("train-s", metrics.get("grad-s", float("nan")))),
               "bytes_up": record_nbytes(msg.content[key]),
               "bytes_down": self._sent[node][1]}
        if "epsilon" in metrics:
            row.update(epsilon=float(metrics["epsilon"]),
                       private_steps=int(metrics["private-steps"]),
                       budget_exhausted=bool(metrics.get("budget-exhausted", 0)))
        return row

    def _collect(self, server_round: int, replies: Iterable[Message], key: str = "arrays"):
        """Validated replies: (accepted [(node, state, n, metrics)], round info)."""
        accepted, clients, rejected, replied = [], [], [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            replied.add(node)
            if self._stopped(server_round, msg) and not self._has_payload(msg):
                continue
            outcome = self._accept(msg, key)
            if isinstance(outcome, str):
                log.warning("round %d: rejected reply of node %d: %s", server_round, node,
                            outcome)
                rejected.append({"node_id": node, "reason": outcome})
                continue
            state, n, metrics = outcome
            accepted.append((node, state, n, metrics))
            clients.append(self._client_row(node, n, metrics, msg, key))
        missing = sorted(set(self._sent) - replied)
        for node in missing:
            log.warning("round %d: no reply from node %d (%s) before the timeout",
                        server_round, node, self.profiles[node].device)
        info = {"clients": clients, "rejected": len(rejected), "rejections": rejected,
                "missing": missing, "aggregation_error": None}
        if self.exhausted:
            info["budget_exhausted"] = sorted(self.exhausted)
        return accepted, info

    def _aggregate(self, states: list[State], counts: list[int]) -> State:
        """S1 aggregation of the accepted states (subclasses may correct them first)."""
        return self.aggregate_fn(states, counts, self.cfg.r_max)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, info = self._collect(server_round, replies)
        if not accepted:
            log.warning("round %d: no acceptable reply; keeping the previous global model",
                        server_round)
            self.on_train_round(server_round, info)
            return None, None
        states = [a[1] for a in accepted]
        counts = [a[2] for a in accepted]
        new_state = self._aggregate(states, counts)
        info["aggregation_error"] = aggregation_error(new_state, states, counts)
        self.on_train_round(server_round, info)
        weights = np.asarray(counts, dtype=np.float64) / sum(counts)
        train_loss = float(sum(w * c["train_loss"] for w, c in zip(weights, info["clients"])))
        return to_record(new_state), MetricRecord({"train-loss": train_loss,
                                                   "accepted": len(states)})
