"""The Flower Strategy for heterogeneous-rank LoRA (S1): fedavg, hetlora and flexlora.

A thin layer over FedAvg: FedAvg's `start` drives the rounds and evaluation, and FedAvg's own
`configure_train` samples the nodes of a round; this class changes only what differs for
heterogeneous ranks:
- devices are asked once (QUERY, `task.fleet.query_profiles`) who they are, and so which
  rank r_k they train at;
- `configure_train` unicasts each sampled device the global adapter truncated to r_k (S1
  step 1), with its rank and r_max in the message's config (the only place they travel);
- `aggregate_train` validates each reply, rejects bad ones (logged, counted) and hands the
  accepted states to the pure aggregation function of `strategies.lora.math`.
The global state is always LoRA factors at r_max (plus the head). A device that replies
`budget-exhausted` (its differential-privacy budget is spent) is logged and not asked again.

Contract for subclasses (FedKD, unlearning): override only these hooks.
- `_downlink(node, global_state, server_round)` -> (payload, state the device will hold,
  extra config): what one device receives;
- `_decode_uplink(node, payload)` -> the state a reply's arrays stand for;
- `_aggregate(states, counts, nodes)` -> the new global state;
- `_client_info(...)` -> the device's row in metrics.jsonl (call super and add keys);
- `_make_profile(node, record)` -> NodeProfile (what rank a device gets: its profile's, or
  with `fleet.rank-from='capability'` the largest that fits what it measured, S1).
`configure_train` / `aggregate_train` may be wrapped (call super) to add phases.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.fleet.model import FleetProfile
from strategies.fleet.scheduler import FleetClock, LatestUpdates, make_fleet
from strategies.robust.aggregate import RobustRound, s6_active
from strategies.lora.math import (AGGREGATORS, DELTA_AGGREGATORS, aggregation_error,
                                  check_reply)
from task.capability import Measured, choose_rank, memory_needed_mib
from task.config import RunConfig
from task.families import family
from task.fleet import origin, query_profiles, unicast
from task.lora import State, is_base_delta_key, truncate_lora
from task.records import from_record, record_nbytes, to_record
from task.logs import get_logger
from task.options import ConfigError

log = get_logger()


def device_budget(measured: Measured, profile: FleetProfile) -> tuple[float, float, str]:
    """(free MiB, seconds per step on the device, where they come from) for the rank rule:
    a real device's own measurement; a simulated one's fleet model (`memory_mib`, and the
    step time measured here / `speed`, as the simulated clock scales train-s). A profile
    without memory_mib keeps the measured memory."""
    if not measured.simulated:
        return measured.free_memory_mib, measured.step_s, "measured"
    memory = profile.memory_mib or measured.free_memory_mib
    return memory, measured.step_s / profile.speed, "fleet model"


@dataclass(frozen=True)
class NodeProfile:
    node_id: int
    device: str
    partition_id: int
    rank: int
    # what the device said it runs on (platform.machine(): aarch64, ...); keyword-only, so a
    # subclass's own fields keep their positions
    platform: str = field(default="", kw_only=True)


class HeterogeneousLoRA(FedAvg):
    """FedAvg with per-device LoRA ranks, unicast truncation and validated aggregation."""

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...],
                 on_train_round: Callable[[int, dict], None] | None = None,
                 query_timeout: float = 120.0):
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=cfg.min_devices, min_available_nodes=cfg.min_devices)
        self.cfg = cfg
        self.label_names = label_names
        self.aggregate_fn = AGGREGATORS.get(cfg.aggregation)  # None: a subclass aggregates
        # aggregations of updates need the round's starting global and what each got
        self.delta_fn = DELTA_AGGREGATORS.get(cfg.aggregation)
        self._round_start: State | None = None
        self.on_train_round = on_train_round or (lambda rnd, info: None)
        self.query_timeout = query_timeout
        self.profiles: dict[int, NodeProfile] = {}
        self.exhausted: dict[int, float] = {}  # node -> epsilon spent when it stopped (DP)
        self.capability: dict[int, dict] = {}  # node -> what it measured, what the rule used
        if cfg.fleet.rank_from == "capability" and not label_names and family(cfg).labelled:
            raise ConfigError(f"fleet.rank-from='capability' measures one model with the run's "
                              f"labels, which strategy='{cfg.strategy}' does not have (its "
                              "devices train several tasks' heads): use "
                              "fleet.rank-from='profile'")
        self._sent: dict[int, tuple[State, int]] = {}  # node -> (state sent, bytes down)
        self._outbox: list[Message] = []  # this round's TRAIN messages (ids set when pushed)
        # the simulated fleet (S2, S5): who is online and trains, the simulated clock
        self.fleet: FleetClock = make_fleet(cfg)
        self.latest = LatestUpdates(cfg.r_max) if cfg.fleet.selection == "fedlaavg" else None
        self._bytes_at_rank: dict[int, int] = {}  # rank -> uplink bytes (for the clock)
        # S6: robust aggregation on products and contributions (None: off)
        self.robust = RobustRound(cfg, tuple(label_names)) if s6_active(cfg) else None
        if self.robust is not None:
            self._check_robust()

    @property
    def trust(self) -> dict[int, float]:
        """S6 trust per node: its last weight in the aggregate x K (1 = an equal share);
        empty without robust.*."""
        return self.robust.trust if self.robust is not None else {}

    @trust.setter
    def trust(self, value: dict[int, float]) -> None:
        if self.robust is not None:
            self.robust.trust = dict(value)

    def _check_robust(self) -> None:
        """robust.* replaces `_aggregate` of the LoRA aggregations on factors only."""
        cfg, why = self.cfg, ""
        if type(self)._aggregate is not HeterogeneousLoRA._aggregate:
            why = f"strategy='{cfg.strategy}' aggregates its own way"
        elif cfg.merges_into_base:
            why = f"strategy='{cfg.strategy}' merges updates into the frozen weights"
        elif cfg.fleet.selection == "fedlaavg":
            why = "fleet.selection='fedlaavg' aggregates every device's stored update"
        if why:
            raise ConfigError(f"robust.aggregator='{cfg.robust.aggregator}' / robust."
                              f"contribution='{cfg.robust.contribution}' work on the LoRA "
                              f"aggregations of factors (fedavg, hetlora, flexlora, rankwise,"
                              f" hetlora-sw, flexlora-delta), but {why}: set robust.aggregator"
                              "='none' robust.contribution='off' or pick one of those")

    # ----------------------------------------------------------------- who is who
    def _learn_profiles(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask devices we have not met yet for their profile (one QUERY each)."""
        unknown = [n for n in node_ids if n not in self.profiles]
        met = query_profiles(grid, unknown, self.query_timeout, self._make_profile,
                             self._profile_query())
        for node, profile in met.items():
            self.profiles[node] = profile
            log.info("node %d is a '%s' device (partition %d): LoRA rank %d",
                     node, profile.device, profile.partition_id, profile.rank)

    def _profile_query(self) -> dict:
        """The profile QUERY's config: with `fleet.rank-from='capability'`, ask devices to
        measure, with the run config and labels their measurement trains with."""
        if self.cfg.fleet.rank_from != "capability":
            return {}
        return {"measure": True, "run-config": json.dumps(self.cfg.to_dict()),
                "label-names": list(self.label_names)}

    def _make_profile(self, node: int, p: ConfigRecord) -> NodeProfile:
        """A node's profile from its QUERY reply (ConfigError: leave the node out)."""
        device = self.cfg.device_for(int(p["partition-id"]), str(p["device"]))
        explicit = int(p["lora-rank"])
        if self.cfg.fleet.rank_from == "capability" and explicit <= 0:
            rank = self._rank_from_capability(node, device, p)
        else:
            rank = self.cfg.rank_for(device, explicit)
        return NodeProfile(node, device, int(p["partition-id"]), rank,
                           platform=str(p.get("platform", "")))

    def _rank_from_capability(self, node: int, device: str, p: ConfigRecord) -> int:
        """S1's capability rank: the largest that fits the node's memory and the deadline
        (`task.capability.choose_rank`), from its measurement, or in simulation from its
        fleet profile (`device_budget`). Recorded in `self.capability` (metrics.jsonl)."""
        measured = Measured.from_reply(p)
        free_mib, step_s, source = device_budget(measured, self.fleet.profile_of(device))
        t = self.cfg.train
        try:
            rank = choose_rank(measured.footprint, free_mib, step_s, measured.step_rank,
                               local_steps=t.local_steps, deadline_s=self.cfg.fleet.deadline_s,
                               batch=t.batch_size, max_length=t.max_length,
                               r_max=self.cfg.r_max)
        except ConfigError as err:
            raise ConfigError(f"'{device}' device, {source}: {err}") from err
        need = memory_needed_mib(measured.footprint, rank, t.batch_size, t.max_length)
        self.capability[node] = {**measured.as_dict(), "source": source,
                                 "memory_mib": free_mib, "device_step_s": step_s,
                                 "rank": rank, "needs_mib": need}
        log.info("node %d ('%s', %s): %.0f MiB free, %.4f s per step -> LoRA rank %d "
                 "(needs %.0f MiB)", node, device, source, free_mib, step_s, rank, need)
        return rank

    # ----------------------------------------------------------------- downlink
    def _train_node_ids(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[int]:
        """FedAvg's own sample of the round's nodes (its configure_train; the broadcast
        messages it builds are dropped: each device gets its own content below), less
        those whose privacy budget is spent."""
        sampled = super().configure_train(server_round, arrays, ConfigRecord(dict(config)),
                                          grid)
        nodes = [m.metadata.dst_node_id for m in sampled
                 if m.metadata.dst_node_id not in self.exhausted]
        self._learn_profiles(grid, nodes)
        for node in nodes:
            if node in self.profiles:
                p = self.profiles[node]
                self.fleet.join(node, p.partition_id, self.fleet.profile_of(p.device))
        bits = {n: 8.0 * self._payload_bytes(arrays, self.profiles[n].rank)
                for n in nodes if n in self.profiles}
        return self.fleet.select(server_round, nodes, bits)

    def _payload_bytes(self, arrays: ArrayRecord, rank: int) -> int:
        """Bytes of the adapter truncated to `rank` (what a device of that rank sends)."""
        if rank not in self._bytes_at_rank:
            self._bytes_at_rank[rank] = record_nbytes(to_record(truncate_lora(
                {k: v for k, v in from_record(arrays).items() if not is_base_delta_key(k)},
                rank)))
        return self._bytes_at_rank[rank]

    def _device_config(self, config: ConfigRecord, server_round: int, node: int,
                       **extra) -> ConfigRecord:
        """The round, the device's rank and r_max: sent once, in every message."""
        profile = self.profiles[node]
        return ConfigRecord({**dict(config), "server-round": server_round,
                             "rank": profile.rank, "r-max": self.cfg.r_max,
                             "device": profile.device, **extra})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        node_ids = self._train_node_ids(server_round, arrays, config, grid)
        self._learn_profiles(grid, node_ids)
        global_state = from_record(arrays)
        self._round_start = global_state
        messages = self._unicast(
            node_ids, server_round, config, MessageType.TRAIN,
            lambda node: ("arrays", *self._downlink(node, global_state, server_round)))
        log.info("round %d: %s", server_round, ", ".join(
            f"node {n} {self.profiles[n].device}@r{self.profiles[n].rank}" for n in self._sent))
        return messages

    def _unicast(self, node_ids: Iterable[int], server_round: int, config: ConfigRecord,
                 message_type: str, downlink: Callable[[int], tuple[str, State, State, dict]]
                 ) -> list[Message]:
        """One message per node with a known profile. `downlink(node)` gives (record key,
        payload, state the device will hold, extra config); what was sent is remembered
        for validating replies and for mapping SuperLink error replies back to nodes."""
        self._sent.clear()

        def content(node: int) -> RecordDict:
            key, payload, expected, extra = downlink(node)
            record = to_record(payload)
            self._sent[node] = (expected, record_nbytes(record))
            return RecordDict({key: record, "config": self._device_config(
                config, server_round, node, **extra)})

        self._outbox = unicast([n for n in node_ids if n in self.profiles], message_type,
                               content)
        return self._outbox

    def _downlink(self, node: int, global_state: State, server_round: int
                  ) -> tuple[State, State, dict]:
        """(payload to send, state the device will hold, extra config) for one node."""
        state = truncate_lora(global_state, self.profiles[node].rank)  # S1 step 1, unicast
        return state, state, {"label-names": list(self.label_names)}

    # ----------------------------------------------------------------- uplink
    def _origin(self, msg: Message) -> int:
        """The device a reply is about (SuperLink error replies included)."""
        return origin(msg, self._outbox)

    def _decode_uplink(self, node: int, payload: State) -> State:
        """The state a reply's arrays stand for (here: the arrays themselves)."""
        return payload

    def _accept(self, msg: Message, node: int, key: str = "arrays"
                ) -> tuple[State, int, dict] | str:
        """(state, n_k, metrics) of a sound reply (its record `key`), or the reason to
        reject it."""
        if msg.has_error():
            return f"device error: {msg.error.reason}"
        if node not in self._sent:
            return "reply from a node that was not asked to train"
        expected, _ = self._sent[node]
        try:
            state = self._decode_uplink(node, from_record(msg.content[key]))
            metrics = dict(msg.content["metrics"])
        except (KeyError, ValueError, TypeError) as err:
            return f"malformed reply ({err.__class__.__name__}: {err})"
        num_examples = metrics.get(self.weighted_by_key)
        reason = check_reply(state, expected, self.profiles[node].rank, num_examples)
        return reason or (state, int(num_examples), metrics)

    def _stopped(self, server_round: int, msg: Message, node: int) -> bool:
        """Did the device say its privacy budget is spent? (logged; it is not asked again)"""
        if msg.has_error() or "metrics" not in msg.content:
            return False
        metrics = msg.content["metrics"]
        if not int(metrics.get("budget-exhausted", 0)):
            return False
        self.exhausted[node] = float(metrics.get("epsilon", float("nan")))
        log.warning("round %d: node %d stopped: privacy budget exhausted (epsilon %.3f of "
                    "dp.target-epsilon=%g)%s", server_round, node, self.exhausted[node],
                    self.cfg.dp.target_epsilon,
                    "" if self._has_payload(msg) else "; nothing to aggregate from it")
        return True

    @staticmethod
    def _has_payload(msg: Message) -> bool:
        return "arrays" in msg.content or "gradient" in msg.content

    def _collect(self, server_round: int, replies: Iterable[Message], key: str = "arrays"
                 ) -> tuple[list[tuple[int, State, int, dict]], dict]:
        """Validated replies: (accepted [(node, state, n_k, metrics)], the round's info)."""
        accepted, clients, rejected, replied = [], [], [], set()
        for msg in replies:
            node = self._origin(msg)
            replied.add(node)
            if self._stopped(server_round, msg, node) and not self._has_payload(msg):
                continue
            outcome = self._accept(msg, node, key)
            if isinstance(outcome, str):
                log.warning("round %d: rejected reply of node %d: %s", server_round, node,
                            outcome)
                rejected.append({"node_id": node, "reason": outcome})
                continue
            state, n, metrics = outcome
            accepted.append((node, state, n, metrics))
            clients.append(self._client_info(node, n, metrics, msg, key))
        missing = sorted(set(self._sent) - replied)
        for node in missing:
            log.warning("round %d: no reply from node %d (%s) before the timeout",
                        server_round, node, self.profiles[node].device)
        info = {"clients": clients, "rejected": len(rejected), "rejections": rejected,
                "missing": missing, "aggregation_error": None}
        if self.exhausted:
            info["budget_exhausted"] = sorted(self.exhausted)
        return accepted, info

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, info = self._collect(server_round, replies)
        info["fleet"] = self.fleet.finish(server_round, {
            node: {"train_s": float(m.get("train-s", m.get("grad-s", 0.0))),
                   "bits_up": 8.0 * c["bytes_up"], "bits_down": 8.0 * c["bytes_down"],
                   "examples": n, "loss": c["train_loss"]}
            for (node, _, n, m), c in zip(accepted, info["clients"])})
        if not accepted:
            log.warning("round %d: no acceptable reply; keeping the previous global model",
                        server_round)
            self.on_train_round(server_round, info)
            return None, None
        nodes, states, counts, _ = map(list, zip(*accepted))
        new_state = None
        if self.robust is not None:  # S6: robust statistic / contributions on products
            try:
                new_state, s6 = self.robust.aggregate(
                    server_round, self._round_start, [self._sent[n][0] for n in nodes],
                    states, counts, nodes)
            except ConfigError as err:  # e.g. too few replies for Krum this round
                log.warning("round %d: robust.aggregator='%s' cannot aggregate these %d "
                            "replies (%s); keeping the previous global model", server_round,
                            self.cfg.robust.aggregator, len(states), err)
                new_state, s6 = self._round_start, {"robust": {"skipped": str(err)}}
            info.update(s6)
        if new_state is None:
            new_state = self._aggregate(states, counts, nodes)
        info["aggregation_error"] = aggregation_error(new_state, states, counts)
        self.on_train_round(server_round, info)
        weights = np.asarray(counts, dtype=np.float64) / sum(counts)
        train_loss = float(sum(w * c["train_loss"] for w, c in zip(weights, info["clients"])))
        return to_record(new_state), MetricRecord({"train-loss": train_loss,
                                                   "accepted": len(states)})

    def _client_info(self, node: int, n: int, metrics: dict, msg: Message,
                     key: str = "arrays") -> dict:
        """One device's entry in metrics.jsonl's `clients` (gradient replies: their loss)."""
        profile = self.profiles[node]
        row = {
            "node_id": node, "partition_id": profile.partition_id,
            "device": profile.device, "rank": profile.rank, "num_examples": n,
            "train_loss": float(metrics.get("train-loss", metrics.get("loss", float("nan")))),
            "train_s": float(metrics.get("train-s", metrics.get("grad-s", float("nan")))),
            "bytes_up": record_nbytes(msg.content[key]),
            "bytes_down": self._sent[node][1],
        }
        if profile.platform:
            row["platform"] = profile.platform
        for key in ("startup-s", "handler-s", "process-task"):  # task.overhead
            if key in metrics:
                row[key.replace("-", "_")] = float(metrics[key])
        if node in self.capability:
            row["capability"] = self.capability[node]
        if "epsilon" in metrics:
            row.update(epsilon=float(metrics["epsilon"]),
                       private_steps=int(metrics["private-steps"]),
                       budget_exhausted=bool(metrics.get("budget-exhausted", 0)))
        return row

    def _aggregate(self, states: list[State], counts: list[int], nodes: list[int]) -> State:
        """The new global state from the accepted replies (S1 math)."""
        if self.latest is not None:  # FedLaAvg (S5): every device's latest update
            for node, state, n in zip(nodes, states, counts):
                self.latest.store(node, self._sent[node][0], state, n)
            return self.latest.apply(self._round_start)
        if self.delta_fn is not None:
            sent = [self._sent[node][0] for node in nodes]
            return self.delta_fn(self._round_start, sent, states, counts, self.cfg.r_max)
        return self.aggregate_fn(states, counts, self.cfg.r_max)

    # ----------------------------------------------------------------- exact resume (R3)
    def checkpoint_state(self) -> tuple[dict, State]:
        """This strategy's state for an exact resume (`strategies.lora.checkpoint`): (JSON-able
        dict, arrays). Per-device entries are keyed by partition id (`p3`; `n<node id>` for
        a device without one): a resumed simulation gives every device a new node id.
        Subclasses add theirs, or set `refuse_resume` to the reason they cannot resume."""
        key = self._checkpoint_key
        profiles = {k: dict(v) for k, v in getattr(self, "_restored_profiles", {}).items()
                    if k in getattr(self, "_pending", {})}  # not seen again yet
        profiles.update({key(n): {"device": p.device, "rank": p.rank,
                                  "partition_id": p.partition_id}
                         for n, p in self.profiles.items()})
        meta = {"profiles": profiles,
                "exhausted": {key(n): eps for n, eps in self.exhausted.items()},
                "capability": {key(n): c for n, c in self.capability.items()},
                "trust": {key(n): float(t) for n, t in
                          (getattr(self, "trust", None) or {}).items()},
                "fleet": self.fleet.snapshot(key), "latest": None}
        arrays: State = {}
        if self.latest is not None:
            meta["latest"] = [{"device": key(n), "examples": int(count)}
                              for n, (_, count) in self.latest.updates.items()]
            for n, (update, _) in self.latest.updates.items():
                arrays.update({f"latest/{key(n)}/{k}": v for k, v in update.items()})
        return meta, arrays

    def _checkpoint_key(self, node: int) -> str:
        held = getattr(self, "_placeholder_keys", {})
        if node in held:
            return held[node]
        profile = self.profiles.get(node)
        if profile is not None and profile.partition_id >= 0:
            return f"p{profile.partition_id}"
        return f"n{node}"

    def restore_checkpoint(self, meta: dict, arrays: State) -> None:
        """Take up `checkpoint_state`'s output. Until a device is met again (its profile
        QUERY, in this run under a new node id), its entries wait under a placeholder id
        (negative); `_adopt_restored` moves them to the device's node id and keeps the
        rank it trained at."""
        self._restored_profiles = {k: dict(v) for k, v in meta["profiles"].items()}
        self._pending = {k: -(i + 1) for i, k in enumerate(self._restored_profiles)}
        self._placeholder_keys = {v: k for k, v in self._pending.items()}
        held = self._pending
        self.exhausted = {held[k]: float(v) for k, v in meta["exhausted"].items()}
        self.capability = {held[k]: v for k, v in meta["capability"].items()}
        if meta.get("trust") or hasattr(self, "trust"):
            self.trust = {held[k]: float(v) for k, v in meta.get("trust", {}).items()}
        self.fleet.restore(meta["fleet"], held, lambda k: self.fleet.profile_of(
            self._restored_profiles[k]["device"]))
        if self.latest is not None:
            for entry in meta.get("latest") or []:
                prefix = f"latest/{entry['device']}/"
                update = {name[len(prefix):]: np.array(v) for name, v in arrays.items()
                          if name.startswith(prefix)}
                self.latest.updates[held[entry["device"]]] = (update, int(entry["examples"]))
        learn = self._learn_profiles

        def learn_and_adopt(grid: Grid, node_ids: Iterable[int]) -> None:
            learn(grid, node_ids)
            self._adopt_restored()

        self._learn_profiles = learn_and_adopt

    def _adopt_restored(self) -> None:
        """Devices of the interrupted run met again: their saved entries move from the
        placeholder id to the node id, and they keep the rank they trained at."""
        from dataclasses import replace

        for node, profile in list(self.profiles.items()):
            key = f"p{profile.partition_id}" if profile.partition_id >= 0 else f"n{node}"
            placeholder = self._pending.pop(key, None)
            if placeholder is None:
                continue
            self._placeholder_keys.pop(placeholder, None)
            saved = self._restored_profiles[key]
            if saved["rank"] != profile.rank or saved["device"] != profile.device:
                log.warning("node %d (%s) trained as '%s' at rank %d before the interruption "
                            "and stays so (it says '%s', rank %d now)", node, key,
                            saved["device"], saved["rank"], profile.device, profile.rank)
                self.profiles[node] = replace(profile, device=saved["device"],
                                              rank=int(saved["rank"]))
            for name in ("exhausted", "capability", "trust"):
                table = getattr(self, name, None)
                if isinstance(table, dict):
                    setattr(self, name, _moved(table, placeholder, node))
            if placeholder in self.fleet.members:
                self.fleet.members = _moved(self.fleet.members, placeholder, node)
                self.fleet.members[node].node = node
            if self.latest is not None:
                self.latest.updates = _moved(self.latest.updates, placeholder, node)
            log.info("node %d is %s of the interrupted run: its state is restored", node, key)


def _moved(table: dict, old: int, new: int) -> dict:
    """`table` with key `old` renamed `new`, in place in the order (a value `new` already
    had is replaced: the saved one is what the interrupted run used)."""
    if old not in table:
        return table
    return {(new if k == old else k): v for k, v in table.items() if k != new}
