"""The Flower Strategy of S4 federated unlearning: one run, three phases of rounds.

    rounds 1..T            train    ordinary S1 rounds, every device (T = cfg.training_rounds)
    rounds T+1..T+U        unlearn  devices send gradients (TRAIN "gradient" messages):
                                    remaining ones of the task loss, opting-out ones of the
                                    unlearning loss; the server projects and updates (S4 1-4)
    rounds T+U+1..T+U+R    recover  S1 rounds on the remaining devices only, each update
                                    without its component along theta - theta_before (FedOSD)

Downlink in unlearning rounds is unicast (S4 step 5): a remaining device gets the global
module truncated to its rank; an opting-out device gets the global module once (first
unlearning round) and afterwards only the projected update of the previous round, which it
applies to its own copy. FedAvg.start drives all of it: evaluation after every round included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from strategies.lora.math import AGGREGATION_RULES
from strategies.lora.strategy import HeterogeneousLoRA, NodeProfile
from strategies.registry import RunAborted
from strategies.unlearn.steps import remove_drift, unlearning_step
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import State, truncate_lora
from edge_lam.records import from_record, to_record
from edge_lam.logs import get_logger

log = get_logger()

GRADIENT_MESSAGE = f"{MessageType.TRAIN}.gradient"


class UnlearningTargetsMissing(RunAborted):
    """A device named in unlearn.clients is not connected; the request stays on disk."""


class FederatedUnlearning(HeterogeneousLoRA):
    """HeterogeneousLoRA whose rounds after `cfg.training_rounds` unlearn (S4)."""

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...],
                 forget_ids: Iterable[int] | None = None,
                 on_train_round: Callable[[int, dict], None] | None = None,
                 on_unlearning_start: Callable[[State, list[NodeProfile], list[int]], None]
                 | None = None,
                 on_phase: Callable[[str, int], None] | None = None,
                 query_timeout: float = 120.0):
        super().__init__(cfg, label_names, on_train_round, query_timeout)
        self.forget_ids = tuple(cfg.unlearn.clients if forget_ids is None else forget_ids)
        self.on_unlearning_start = on_unlearning_start or (lambda state, found, missing: None)
        self.on_phase = on_phase or (lambda phase, rnd: None)
        self.forget_nodes: set[int] = set()
        self.before: State | None = None  # theta_before_unlearning
        self.projected: dict[int, State] = {}  # opting-out node -> update to send next
        self._global: State | None = None
        self._phase = ""

    def phase(self, server_round: int) -> str:
        if server_round <= self.cfg.training_rounds:
            return "train"
        if server_round <= self.cfg.training_rounds + self.cfg.unlearn.rounds:
            return "unlearn"
        return "recover"

    # ----------------------------------------------------------------- downlink
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        phase = self.phase(server_round)
        self._global = from_record(arrays)
        if phase != "train" and self.before is None:
            self._start_unlearning(grid)
        if phase != self._phase:
            self._phase = phase
            self.on_phase(phase, server_round)
        if phase == "unlearn":
            return self._gradient_messages(server_round, config, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def _match_targets(self, grid: Grid) -> tuple[list[NodeProfile], list[int]]:
        """Devices named by unlearn.clients (partition id in simulation, node id in
        deployment) among the connected ones, and the ids that match none."""
        self._learn_profiles(grid, list(grid.get_node_ids()))
        found, missing = [], []
        for ident in self.forget_ids:
            hits = [p for p in self.profiles.values()
                    if p.partition_id == ident or p.node_id == ident]
            if hits:
                found.extend(hits)
            else:
                missing.append(ident)
        return found, missing

    def _start_unlearning(self, grid: Grid) -> None:
        """Match unlearn.clients to devices (waiting up to round-timeout for them to
        connect), persist the request (callback) before any unlearning message leaves, and
        raise if a named device never showed up."""
        sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)  # waits
        deadline = time.monotonic() + self.cfg.round_timeout
        found, missing = self._match_targets(grid)
        while missing and time.monotonic() < deadline:
            log.info("waiting for the opting-out device(s) %s to connect", missing)
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
            found, missing = self._match_targets(grid)
        self.before = {k: v.copy() for k, v in self._global.items()}
        self.on_unlearning_start(self.before, found, missing)
        if missing:
            raise UnlearningTargetsMissing(
                f"unlearn.clients names {missing}, but no connected device has that partition "
                "id or node id; the request stays saved and a rerun with strategy='unlearn' "
                "resumes it once those devices are online")
        self.forget_nodes = {p.node_id for p in found}
        log.info("unlearning %s: %s", "device" if len(found) == 1 else "devices", ", ".join(
            f"node {p.node_id} (partition {p.partition_id}, {p.device}@r{p.rank})"
            for p in found))

    def _train_node_ids(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[int]:
        """Recovery rounds train the remaining devices only."""
        return [n for n in super()._train_node_ids(server_round, arrays, config, grid)
                if n not in self.forget_nodes]

    def _gradient_messages(self, server_round: int, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        """S4 step 5 (unicast): global module to remaining devices, projected update to
        opting-out devices (global module in their first unlearning round)."""
        nodes = [n for n in grid.get_node_ids() if n not in self.exhausted]
        self._learn_profiles(grid, nodes)

        def downlink(node: int) -> tuple[str, State, State, dict]:
            rank, forget = self.profiles[node].rank, node in self.forget_nodes
            sent = truncate_lora(self._global, rank)  # keys/shapes the reply must have
            extra = {"objective": "unlearn" if forget else "task",
                     "label-names": list(self.label_names)}
            update = self.projected.pop(node, None) if forget else None
            if update is None:
                return "arrays", sent, sent, extra
            return "update", truncate_lora(update, rank), sent, extra

        messages = self._unicast(nodes, server_round, config, GRADIENT_MESSAGE, downlink)
        log.info("round %d (unlearning): gradients from %d remaining and %d opting-out devices",
                 server_round, len(self._sent) - len(self.forget_nodes & set(self._sent)),
                 len(self.forget_nodes & set(self._sent)))
        return messages

    # ----------------------------------------------------------------- uplink
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.phase(server_round) != "unlearn":
            return super().aggregate_train(server_round, replies)
        accepted, info = self._collect(server_round, replies, key="gradient")
        info.update(phase="unlearn", forget_nodes=sorted(self.forget_nodes))
        for client in info["clients"]:
            client["role"] = "forget" if client["node_id"] in self.forget_nodes else "retain"
        retained = [a[1] for a in accepted if a[0] not in self.forget_nodes]
        forget = [a[1] for a in accepted if a[0] in self.forget_nodes]
        if not retained or not forget:
            log.warning("round %d: unlearning needs gradients from both remaining (%d) and "
                        "opting-out (%d) devices; keeping the previous global model",
                        server_round, len(retained), len(forget))
            self.on_train_round(server_round, info)
            return None, None
        new_state, projected, step_info = unlearning_step(
            self._global, retained, forget, self.cfg.r_max, self.cfg.unlearn.lr)
        for node in self.forget_nodes:
            self.projected[node] = projected
        info["unlearning"] = step_info
        log.info("round %d: projected unlearning step: |step| %.4g, retained subspace rank "
                 "%d, max |cos(g_proj, g_r)| %.1e", server_round, step_info["step_norm"],
                 step_info["rank_kept"], step_info["max_abs_cos_projected_vs_retained"])
        self.on_train_round(server_round, info)
        return to_record(new_state), MetricRecord({"accepted": len(accepted),
                                                   "step-norm": step_info["step_norm"]})

    def _aggregate(self, states: list[State], counts: list[int], nodes: list[int]) -> State:
        if self._phase != "recover" or self.before is None:
            return super()._aggregate(states, counts, nodes)
        states = remove_drift(states, self._global, self.before, self.cfg.r_max)
        aggregate = super()._aggregate(states, counts, nodes)
        if AGGREGATION_RULES.get(self.cfg.aggregation).refactorises:
            # FlexLoRA re-factorises the mean of the products B A by SVD, which is not linear
            # in the factors: its aggregate can regain a component along d (cos 0.08 seen in
            # a second recovery round), so the aggregate's own update is stripped too. The
            # weighted means of hetlora / fedavg keep the devices' orthogonality exactly.
            aggregate = remove_drift([aggregate], self._global, self.before, self.cfg.r_max)[0]
        return aggregate

    def checkpoint_state(self) -> tuple[dict, State]:
        """Training rounds resume exactly (`resume`); once unlearning has started, the
        opting-out devices' own copies of the module are gone with the interrupted run, and
        the request's own recovery (a plain rerun) takes over."""
        meta, arrays = super().checkpoint_state()
        if self.before is not None:
            meta["refuse_resume"] = (
                "unlearning had started, and the opting-out devices' copies of the module "
                "(they apply the projected updates to them) ended with the interrupted run. "
                "Its request (unlearning.json in that folder) is finished from its saved "
                "before-unlearning adapter by a rerun with strategy='unlearn', the same "
                "unlearn.clients and resume=''")
        return meta, arrays
