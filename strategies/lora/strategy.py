"""The Flower Strategy for heterogeneous-rank LoRA (S1): fedavg, hetlora and flexlora.

A thin layer over FedAvg: FedAvg's `start` drives the rounds and evaluation, and FedAvg's own
`configure_train` samples the nodes of a round; this class changes only what differs for
heterogeneous ranks:
- devices are asked once (QUERY, `edge_lam.messaging.query_profiles`) who they are, and so which
  rank r_k they train at;
- `configure_train` unicasts each sampled device the global adapter truncated to r_k (S1
  step 1), with its rank and r_max in the message's config (the only place they travel);
- `aggregate_train` validates each reply, rejects bad ones (logged, counted) and hands the
  accepted states to the pure aggregation function of `strategies.lora.math`.
The global state is always LoRA factors at r_max (plus the head). A device that replies
`budget-exhausted` (its differential-privacy budget is spent) is logged and not asked again.

The concerns around the round loop are parts of their own, as Flower splits them:
- who is who: `profiles.ProfileDirectory` (and the capability rank, `profiles.capability_rank`);
- which devices train: the fleet clock's selection policy (`strategies.fleet.policy`,
  registered in SELECTION; one that `keeps_latest_updates` makes `_aggregate` average every
  device's stored update, `scheduler.LatestUpdates`);
- the aggregation rule: `strategies.lora.math` (AGGREGATORS, DELTA_AGGREGATORS), through
  `self.aggregation`, which `strategies.robust.wrapper` wraps when robust.* is on (S6);
- the DP budget stop: `budget.PrivacyBudget`;
- exact resume: `resume.StrategyCheckpoint` over the parts that keep state (`CheckpointPart`).

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

from collections.abc import Callable, Iterable
from typing import Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from strategies.fleet.scheduler import FleetClock, LatestUpdates, make_fleet
from strategies.lora.budget import PrivacyBudget, has_payload, privacy_spent
from strategies.lora.diagnostics import aggregation_error, check_reply
from strategies.lora.math import AGGREGATORS, DELTA_AGGREGATORS
from strategies.lora.profiles import (NodeProfile, ProfileDirectory, capability_rank,
                                      device_budget, profile_query)
from strategies.lora.resume import NodeTable, StrategyCheckpoint
from strategies.lora.server_opt import ServerOptimizer
from strategies.robust.wrapper import wrap_robust
from strategies.secure import encoding
from strategies.secure.device import MASKED
from strategies.secure.protocol import as_int64
from strategies.secure.server import RoundFailed, SecureRound
from edge_lam.config.run_config import RunConfig
from edge_lam.messaging import origin, unicast
from edge_lam.training.lora import State, compress_base_deltas, is_base_delta_key, truncate_lora
from edge_lam.records import from_record, record_nbytes, to_record
from edge_lam.logs import get_logger

log = get_logger()

__all__ = ["HeterogeneousLoRA", "NodeProfile", "OwnAggregation", "device_budget"]


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
        self.directory = ProfileDirectory()
        self.profiles: dict[int, NodeProfile] = self.directory.profiles
        self.budget = PrivacyBudget(cfg.dp.target_epsilon)
        self.exhausted = self.budget.exhausted  # node -> epsilon spent when it stopped (DP)
        self.capability = NodeTable("capability")  # node -> what it measured, the rank rule
        self._sent: dict[int, tuple[State, int]] = {}  # node -> (state sent, bytes down)
        self._outbox: list[Message] = []  # this round's TRAIN messages (ids set when pushed)
        # the simulated fleet (S2, S5): who is online and trains, the simulated clock
        self.fleet: FleetClock = make_fleet(cfg)
        # FedLaAvg (S5): the policy aggregates every device's stored latest update
        self.latest = LatestUpdates(cfg.r_max) if self.fleet.keeps_latest_updates else None
        self._bytes_at_rank: dict[int, int] = {}  # rank -> uplink bytes (for the clock)
        # the accepted replies -> the new global state; S6 wraps it (robust.*)
        self.aggregation = wrap_robust(cfg, tuple(label_names), OwnAggregation(self))
        # lora.server-optimizer: FedAvgM / FedAdam on the aggregate
        self.server_opt = ServerOptimizer(cfg)
        self._round = 0  # the round being trained (lora.rank-warmup-rounds)
        # (global state, {rank: (payload, state)}): what devices of each rank get of it
        self._payloads: tuple[State | None, dict[int, tuple[State, State]]] = (None, {})
        # secure aggregation (secure.enabled): this round's SecAgg+ session and masked inputs
        self._secure: SecureRound | None = None
        self._grid: Grid | None = None
        self._inputs: dict[int, np.ndarray] = {}
        # central DP (`strategies.lora.central_dp`): every device weighs 1 / m; the wrapper
        # adds its epsilon to the round's info
        self.uniform_weights = False
        self.round_info: dict[int, dict] = {}
        self.resume = StrategyCheckpoint(
            (self.directory, self.exhausted, self.capability, self.aggregation, self.fleet,
             self.latest, self.server_opt), self.profiles.get)

    # ----------------------------------------------------------------- who is who
    def _learn_profiles(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask devices we have not met yet for their profile (one QUERY each); devices of
        an interrupted run take up their saved state (`resume`)."""
        self.directory.learn(grid, node_ids, self.query_timeout, self._make_profile,
                             profile_query(self.cfg, self.label_names))
        self.resume.adopt(self.profiles)

    def _make_profile(self, node: int, p: ConfigRecord) -> NodeProfile:
        """A node's profile from its QUERY reply (ConfigError: leave the node out)."""
        device = self.cfg.device_for(int(p["partition-id"]), str(p["device"]))
        explicit = int(p["lora-rank"])
        if self.cfg.fleet.rank_from == "capability" and explicit <= 0:
            rank, self.capability[node] = capability_rank(
                self.cfg, node, device, self.fleet.profile_of(device), p)
        else:
            rank = self.cfg.rank_for(device, explicit)
        return NodeProfile(node, device, int(p["partition-id"]), rank,
                           platform=str(p.get("platform", "")))

    # ----------------------------------------------------------------- downlink
    def _train_node_ids(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[int]:
        """The round's sample (`sample`), less those whose privacy budget is spent."""
        nodes = self.budget.available(self.sample(server_round, grid))
        bits = {n: 8.0 * self._payload_bytes(arrays, self.rank_of(n))
                for n in nodes if n in self.profiles}
        return self.fleet.select(server_round, nodes, bits)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """`fraction-train` of the connected devices (at least `min-devices`), drawn by
        partition id with a generator seeded by (seed, round), in partition order. Flower's
        FedAvg draws from the node ids with Python's `random`, and a resumed simulation gives
        every device a new node id, so a resumed run would sample other partitions; this
        sample is the same for the same partitions, whatever their node ids. Every
        connected device is asked its profile first (once) and joins the fleet, so
        availability evolves for all of them."""
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)
        self._learn_profiles(grid, connected)
        known = sorted((n for n in connected if n in self.profiles),
                       key=lambda n: (self.profiles[n].partition_id, n))
        for node in known:
            p = self.profiles[node]
            self.fleet.join(node, p.partition_id, self.fleet.profile_of(p.device))
        size = max(int(len(connected) * self.fraction_train), self.min_train_nodes)
        if size >= len(known):
            return known
        rng = np.random.default_rng([self.cfg.seed, server_round, 1013])
        return [known[i] for i in sorted(rng.choice(len(known), size, replace=False))]

    def rank_of(self, node: int) -> int:
        """The rank `node` trains at this round: its profile's, or during
        `lora.rank-warmup-rounds` the smallest rank of the federation."""
        rank = self.profiles[node].rank
        if self._round <= self.cfg.lora.rank_warmup_rounds:
            rank = min([rank] + [p.rank for p in self.profiles.values()])
        return rank

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
                             "rank": self.rank_of(node), "r-max": self.cfg.r_max,
                             "device": profile.device, **extra})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        self._round = server_round
        node_ids = self._train_node_ids(server_round, arrays, config, grid)
        self._learn_profiles(grid, node_ids)
        global_state = from_record(arrays)
        self._round_start = global_state
        messages = self._unicast(
            node_ids, server_round, config, MessageType.TRAIN,
            lambda node: ("arrays", *self._downlink(node, global_state, server_round)))
        if self.secure_layout() is not None and messages:
            messages = self._secure_setup(server_round, grid, messages)
        log.info("round %d: %s", server_round, ", ".join(
            f"node {n} {self.profiles[n].device}@r{self.rank_of(n)}" for n in self._sent))
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
        rank = self.rank_of(node)
        if self._payloads[0] is not global_state:
            self._payloads = (global_state, {})
        if rank not in self._payloads[1]:  # one truncation (and compression) per rank
            state = truncate_lora(global_state, rank)  # S1 step 1, unicast
            self._payloads[1][rank] = (compress_base_deltas(state,
                                                            self.cfg.lora.base_delta_rank),
                                       state)
        payload, state = self._payloads[1][rank]
        return payload, state, {"label-names": list(self.label_names)}

    # ----------------------------------------------------------------- secure aggregation
    def secure_layout(self) -> str | None:
        """What the devices mask (`strategies.secure.encoding`): the aggregation's layout
        with secure.enabled, else None (plain uploads). A subclass that masks only vectors
        of its own (`secagg.plain`) returns "none"."""
        if not self.cfg.secure.enabled:
            return None
        from strategies.lora.math import AGGREGATION_RULES

        return AGGREGATION_RULES.get(self.cfg.aggregation).secure

    def secure_extra_size(self) -> int:
        """Entries a subclass's devices append to the masked vector (`secagg.plain`)."""
        return 0

    def _secure_setup(self, server_round: int, grid: Grid, messages: list[Message]
                      ) -> list[Message]:
        """SecAgg+ setup and key sharing with the round's devices; the TRAIN messages of
        those that completed them, carrying their shares (`strategies.secure.server`)."""
        s = self.cfg.secure
        self._secure = SecureRound(messages[0].metadata.run_id, server_round, s.neighbours,
                                   s.threshold, self.query_timeout)
        self._grid, self._inputs = grid, {}
        try:
            kept = set(self._secure.begin(grid, [m.metadata.dst_node_id for m in messages]))
        except RoundFailed as err:
            return self._secure_not_started(server_round, messages, err)
        for node in set(self._sent) - kept:  # they left during setup: not asked to train
            self._sent.pop(node)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in kept:
                msg.content["config"].update({
                    **self._secure.train_config(node), "secagg-layout": self.secure_layout(),
                    "secagg-clip": float(s.clip),
                    "secagg-weight": "uniform" if self.uniform_weights else "examples"})
                out.append(msg)
        self._outbox = out
        return out

    def _secure_not_started(self, server_round: int, messages: list[Message],
                            err: RoundFailed) -> list[Message]:
        """Too few devices for the round's setup: nobody trains this round (the uploads
        are never sent in the clear)."""
        log.warning("round %d: secure aggregation could not start (%s): no training this "
                    "round", server_round, err)
        self._sent.clear()
        self._outbox = []
        return []

    def _secure_sum(self) -> tuple[State | None, np.ndarray | None, dict]:
        """(the adapter's aggregate or None with layout 'none', the subclass's summed
        extra entries, the round's `secure` info) from the masked inputs received; raises
        RoundFailed."""
        layout = self.secure_layout()
        template = self._secure_template()
        total = as_int64(self._secure.finish(self._grid, self._inputs))
        info = self._secure.info()
        state = None
        n = 0 if layout == "none" else encoding.size(template, layout, self.cfg.r_max)
        if layout != "none":
            state, weight, clipped = encoding.decode(total[:n], template, layout,
                                                     self.cfg.r_max, self.cfg.secure.clip)
            info.update({"weight": weight, "clipped": clipped})
        return state, total[n:], info

    def _secure_template(self) -> State:
        """The global adapter at r_max whose shapes the masked sum has."""
        return {k: v for k, v in self._round_start.items() if not is_base_delta_key(k)}

    def _expected_masked(self) -> int:
        layout = self.secure_layout()
        lora = 0 if layout == "none" else encoding.size(self._secure_template(), layout,
                                                        self.cfg.r_max)
        return lora + self.secure_extra_size()

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
            payload = from_record(msg.content[key])
            metrics = dict(msg.content["metrics"])
            masked = self._take_masked(payload)
            state = None if masked is not None and self.secure_layout() != "none" \
                else self._decode_uplink(node, payload)
        except (KeyError, ValueError, TypeError) as err:
            return f"malformed reply ({err.__class__.__name__}: {err})"
        num_examples = metrics.get(self.weighted_by_key)
        reason = None if state is None else check_reply(state, expected, self.rank_of(node),
                                                        num_examples)
        if reason is None and not isinstance(num_examples, (int, float)):
            reason = f"no '{self.weighted_by_key}' in the reply's metrics"
        if reason is None and masked is not None:
            self._inputs[node] = masked  # only a sound reply's input enters the sum
        return reason or (state, int(num_examples), metrics)

    def _take_masked(self, payload: State) -> np.ndarray | None:
        """The masked input of a reply in a secure round (ValueError: missing or of the
        wrong size), taken out of `payload`; None when the round is not secure."""
        if self._secure is None:
            return None
        masked = payload.pop(MASKED, None)
        if masked is None or masked.dtype != np.uint64 or masked.ndim != 1:
            raise ValueError("a secure round's reply without its masked input (uint64)")
        expected = self._expected_masked()
        if masked.size != expected:
            raise ValueError(f"masked input of {masked.size} entries, the round's sum has "
                             f"{expected}")
        return masked

    def _collect(self, server_round: int, replies: Iterable[Message], key: str = "arrays"
                 ) -> tuple[list[tuple[int, State, int, dict]], dict]:
        """Validated replies: (accepted [(node, state, n_k, metrics)], the round's info)."""
        accepted, clients, rejected, replied = [], [], [], set()
        for msg in replies:
            node = self._origin(msg)
            replied.add(node)
            if self.budget.stopped(server_round, msg, node) and not has_payload(msg):
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
            if self._secure is not None:
                info["secure"] = self._secure.info()
                self._secure = None
            self.on_train_round(server_round, info)
            return None, None
        nodes, states, counts, _ = map(list, zip(*accepted))
        if self.uniform_weights:  # central DP: the uniform mean (sensitivity C / m)
            counts = [1] * len(counts)
        self.round_info = {server_round: info}
        new_state, secure_extra, secure_failed = None, None, None
        if self._secure is not None:  # the sum of the masked inputs, never one of them
            try:
                new_state, secure_extra, info["secure"] = self._secure_sum()
            except RoundFailed as err:
                info["secure"] = {**self._secure.info(), "failed": str(err)}
                secure_failed = str(err)
            finally:
                self._secure = None
            if secure_failed and self.secure_layout() != "none":
                log.warning("round %d: secure aggregation failed (%s); keeping the previous "
                            "global model", server_round, secure_failed)
                self.on_train_round(server_round, info)
                return None, None
        if new_state is None:  # plain uploads (or only a subclass's vectors were masked)
            new_state, extra = self.aggregation.aggregate(
                server_round, self._round_start, [self._sent[n][0] for n in nodes], states,
                counts, nodes)
            info.update(extra)
            info["aggregation_error"] = aggregation_error(new_state, states, counts)
        new_state = self._with_secure_extra(new_state, secure_extra, secure_failed)
        new_state = self.server_opt.step(server_round, self._round_start, new_state)
        self.on_train_round(server_round, info)
        weights = np.asarray(counts, dtype=np.float64) / sum(counts)
        train_loss = float(sum(w * c["train_loss"] for w, c in zip(weights, info["clients"])))
        return to_record(new_state), MetricRecord({"train-loss": train_loss,
                                                   "accepted": len(states)})

    def _with_secure_extra(self, state: State, extra: np.ndarray | None,
                           failed: str | None) -> State:
        """The new global state with what a subclass's devices added to the secure sum
        (`extra`, int64; None when the round was not secure, or `failed` says why the sum
        could not be rebuilt)."""
        return state

    def _client_info(self, node: int, n: int, metrics: dict, msg: Message,
                     key: str = "arrays") -> dict:
        """One device's entry in metrics.jsonl's `clients` (gradient replies: their loss)."""
        profile = self.profiles[node]
        row = {
            "node_id": node, "partition_id": profile.partition_id,
            "device": profile.device, "rank": self.rank_of(node), "num_examples": n,
            "train_loss": float(metrics.get("train-loss", metrics.get("loss", float("nan")))),
            "train_s": float(metrics.get("train-s", metrics.get("grad-s", float("nan")))),
            "bytes_up": record_nbytes(msg.content[key]),
            "bytes_down": self._sent[node][1],
        }
        if profile.platform:
            row["platform"] = profile.platform
        for key in ("startup-s", "handler-s", "process-task"):  # edge_lam.training.overhead
            if key in metrics:
                row[key.replace("-", "_")] = float(metrics[key])
        if node in self.capability:
            row["capability"] = self.capability[node]
        row.update(privacy_spent(metrics))
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
        dict, arrays), from its parts (`strategies.lora.resume`). Subclasses add theirs, or
        set `refuse_resume` to the reason they cannot resume."""
        return self.resume.state()

    def restore_checkpoint(self, meta: dict, arrays: State) -> None:
        """Take up `checkpoint_state`'s output; each device's entries move to its new node
        id when it is met again (`_learn_profiles`)."""
        self.resume.restore(meta, arrays)


class OwnAggregation:
    """The strategy's own `_aggregate` hook as its aggregation (what S6 wraps)."""

    def __init__(self, strategy: HeterogeneousLoRA):
        self.strategy = strategy
        # a subclass that aggregates its own way (S6 works on the LoRA aggregations only)
        self.overridden = type(strategy)._aggregate is not HeterogeneousLoRA._aggregate

    def aggregate(self, server_round: int, start: State, sent: Sequence[State],
                  states: Sequence[State], counts: Sequence[int], nodes: Sequence[int]
                  ) -> tuple[State, dict]:
        return self.strategy._aggregate(list(states), list(counts), list(nodes)), {}
