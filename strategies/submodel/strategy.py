"""The Flower strategy of `strategy='submodel'` (S7): HeterogeneousLoRA plus embedding rows.

The global state is the LoRA adapter at r_max plus the token-embedding table kept sparse:
`submodel.table.ids` / `submodel.table.rows`, the rows that differ from the base model.
- who needs what: every device is asked once (QUERY `rows`) for its request, the ids of its
  own rows padded with decoys; the server never learns counts before the uplink;
- `_downlink`: the adapter at the device's rank + the current values of exactly the
  requested rows (`submodel.ids`, `submodel.rows`);
- `_decode_uplink`: splits a reply into the adapter (validated as any LoRA reply) and its
  rows (ids among those sent, finite values, counts >= 0), kept for `_aggregate`;
- `_aggregate`: the LoRA aggregation of `submodel.aggregation`, and per row the
  count-weighted mean of the rows sent with a positive count (`math.aggregate_rows`).
- `submodel.secure` (rows='touched', the default): private set union + secure aggregation.
  The round's devices get the union U of their requests; each adds to a SecAgg+ sum
  (`strategies.secure`: X25519 keys agreed each round, Shamir shares of the masks) the
  fixed-point [|U|, d + 1] per-row (count x value, count) of its own rows, zero elsewhere.
  The server reads only the sum (`math.unmask_sums`) and sets each row with a positive
  count sum to the ratio (`math.aggregate_sums`). A device that drops after masking costs
  nothing (its masks are rebuilt from the others' shares); with fewer than
  `secure.threshold` of a neighbourhood left the sum cannot be rebuilt and the round's rows
  are not updated (the adapter still aggregates), logged in metrics.jsonl (`secure_rows`).
  With `secure.enabled` the adapter goes into the same masked sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies.lora.strategy import HeterogeneousLoRA
from strategies.secure.protocol import MIN_DEVICES
from strategies.submodel.device import COUNTS, IDS, ROWS, UNION
from strategies.submodel.math import (RowUpdate, aggregate_rows, aggregate_sums, check_update,
                                      lookup, unmask_sums)
from edge_lam.config.run_config import RunConfig
from edge_lam.logs import get_logger
from edge_lam.training.lora import State, is_base_delta_key, truncate_lora
from edge_lam.records import from_record, record_nbytes, to_record

log = get_logger()

TABLE_IDS, TABLE_ROWS = "submodel.table.ids", "submodel.table.rows"
QUERY_ROWS = f"{MessageType.QUERY}.rows"


def split_state(state: State) -> tuple[State, np.ndarray, np.ndarray]:
    """(LoRA state, table ids, table rows) of a global state."""
    lora = {k: v for k, v in state.items() if not k.startswith("submodel.")}
    return lora, state[TABLE_IDS], state[TABLE_ROWS]


class SubmodelLoRA(HeterogeneousLoRA):
    """LoRA with heterogeneous ranks + per-row federated token embeddings."""

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...], base: np.ndarray,
                 on_train_round: Callable[[int, dict], None] | None = None,
                 query_timeout: float = 120.0):
        super().__init__(cfg, label_names, on_train_round, query_timeout)
        self.base = base  # the base model's table [V, d] (rows not in the sparse table)
        self.requests: dict[int, np.ndarray] = {}  # node -> requested ids (fixed)
        self._rows_up: dict[int, RowUpdate] = {}
        self.table_start: tuple[np.ndarray, np.ndarray] | None = None
        # secure aggregation (rows='touched' and submodel.secure)
        self.secure = cfg.submodel.secure and cfg.submodel.rows == "touched"
        self._round = 0
        self._peers: list[int] = []  # the round's devices (their masks cancel together)
        self._union = np.zeros(0, np.int64)  # U: the union of their requests
        self.rows_log: dict[int, dict] = {}  # round -> metrics.jsonl's `secure_rows`
        self.rows_rounds_skipped = 0

    # ------------------------------------------------------------- who needs which rows
    def _learn_profiles(self, grid: Grid, node_ids: Iterable[int]) -> None:
        node_ids = list(node_ids)
        super()._learn_profiles(grid, node_ids)
        unknown = [n for n in node_ids if n in self.profiles and n not in self.requests]
        if not unknown:
            return
        ask = ConfigRecord({"vocab-size": int(self.base.shape[0]),
                            "label-names": list(self.label_names)})
        queries = [Message(RecordDict({"config": ask}), dst_node_id=n,
                           message_type=QUERY_ROWS) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.error("node %d did not say which rows it needs: %s", node,
                          reply.error.reason)
                continue
            ids = np.asarray(from_record(reply.content["rows"])[IDS], dtype=np.int64)
            if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= len(self.base)
                                               or np.any(np.diff(ids) <= 0))):
                log.error("node %d asked for malformed rows: left out", node)
                continue
            self.requests[node] = ids
            log.info("node %d asks for %d of %d embedding rows", node, ids.size,
                     len(self.base))
        for node in unknown:  # no request, no round: asked again next time
            if node not in self.requests:
                self.profiles.pop(node, None)

    # ----------------------------------------------------------------- downlink
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid):
        _, ids, rows = split_state(from_record(arrays))
        self.table_start = (ids, rows)
        self._rows_up.clear()
        self._round = server_round
        if self.secure:
            self.rows_log[server_round] = {"applied": False, "skipped": "no acceptable reply",
                                           "skipped_total": self.rows_rounds_skipped}
        return super().configure_train(server_round, arrays, config, grid)

    def _train_node_ids(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[int]:
        """The round's devices; with secure aggregation also their union U (private set
        union: the server learns U, in which the decoys pad every device's rows)."""
        nodes = super()._train_node_ids(server_round, arrays, config, grid)
        if self.secure:
            self._peers = sorted(n for n in nodes if n in self.profiles and n in self.requests)
            wanted = [self.requests[n] for n in self._peers]
            self._union = np.unique(np.concatenate(wanted)) if wanted else \
                np.zeros(0, np.int64)
            log.info("round %d: secure aggregation of the rows over %d devices, union of "
                     "%d rows", server_round, len(self._peers), self._union.size)
        return nodes

    def _downlink(self, node: int, global_state: State, server_round: int
                  ) -> tuple[State, State, dict]:
        lora, ids, rows = split_state(global_state)
        state = truncate_lora(lora, self.profiles[node].rank)
        wanted = self.requests[node]
        payload = {**state, IDS: wanted, ROWS: lookup(ids, rows, wanted, self.base)}
        extra = {"label-names": list(self.label_names)}
        if self.secure and len(self._peers) >= MIN_DEVICES:  # else devices withhold rows
            payload[UNION] = self._union
        return payload, state, extra

    # ----------------------------------------------------------------- secure aggregation
    def secure_layout(self) -> str | None:
        """Rows in the SecAgg+ sum (and the adapter with secure.enabled); with fewer than
        MIN_DEVICES devices in the round no sum is run and the devices withhold rows."""
        if not self.secure or len(self._peers) < MIN_DEVICES or self.cfg.secure.enabled:
            return super().secure_layout()
        return "none"

    def secure_extra_size(self) -> int:
        return int(self._union.size) * (self.base.shape[1] + 1) if self.secure else 0

    def _secure_template(self) -> State:
        return {k: v for k, v in self._round_start.items()
                if not k.startswith("submodel.") and not is_base_delta_key(k)}

    def _secure_not_started(self, server_round, messages, err):
        """Rows alone in the sum: the (plain) adapter still trains, the rows are withheld."""
        if self.secure_layout() != "none":
            return super()._secure_not_started(server_round, messages, err)
        log.warning("round %d: no secure sum of the rows (%s): devices withhold them",
                    server_round, err)
        self._secure = None
        for msg in messages:
            arrays = msg.content["arrays"]
            if UNION in arrays:
                del arrays[UNION]
        return messages

    def _payload_bytes(self, arrays: ArrayRecord, rank: int) -> int:
        """Adapter bytes at `rank` (the fleet clock's uplink estimate; rows not counted)."""
        if rank not in self._bytes_at_rank:
            lora, _, _ = split_state(from_record(arrays))
            self._bytes_at_rank[rank] = record_nbytes(to_record(truncate_lora(
                {k: v for k, v in lora.items() if not is_base_delta_key(k)}, rank)))
        return self._bytes_at_rank[rank]

    # ----------------------------------------------------------------- uplink
    def _decode_uplink(self, node: int, payload: State) -> State:
        if self.secure:  # rows only in the masked sum (taken out by `_take_masked`)
            return payload
        try:
            update = RowUpdate(np.asarray(payload.pop(IDS), dtype=np.int64),
                               np.asarray(payload.pop(ROWS)),
                               np.asarray(payload.pop(COUNTS), dtype=np.float64))
        except KeyError as err:
            raise ValueError(f"no embedding rows in the reply ({err})") from None
        reason = check_update(update, self.requests[node], self.base.shape[1])
        if reason:
            raise ValueError(reason)
        self._rows_up[node] = update
        return payload

    def _with_secure_extra(self, state: State, extra: np.ndarray | None,
                           failed: str | None) -> State:
        """The table after the round: per-row sums / count sums from the secure sum; the
        round's rows unchanged (logged) when there was none or it could not be rebuilt."""
        if not self.secure:
            return state
        lora = {k: v for k, v in state.items() if not k.startswith("submodel.")}
        ids, rows = self.table_start
        info = {"devices": len(self._peers), "shares": len(self._inputs),
                "union_rows": int(self._union.size), "applied": False, "rows_updated": 0,
                "skipped": None}
        if len(self._peers) < MIN_DEVICES:
            info["skipped"] = f"{len(self._peers)} device(s) in the round (at least " \
                              f"{MIN_DEVICES} for secure aggregation)"
        elif failed or extra is None:
            info["skipped"] = failed or "no secure sum this round"
        else:
            try:
                sums, counts = unmask_sums(
                    np.ascontiguousarray(extra).view(np.uint64).reshape(
                        self._union.size, self.base.shape[1] + 1),
                    self.cfg.submodel.secure_bits)
            except ValueError as err:
                info["skipped"] = str(err)
        if info["skipped"]:
            self.rows_rounds_skipped += 1
            log.warning("round %d: embedding rows not updated (%s); the LoRA adapter is "
                        "aggregated as usual", self._round, info["skipped"])
        else:
            ids, rows = aggregate_sums(ids, rows, self._union, sums, counts)
            info.update(applied=True, rows_updated=int((counts > 0).sum()))
        self.rows_log[self._round] = {**info, "skipped_total": self.rows_rounds_skipped}
        return {**lora, TABLE_IDS: ids, TABLE_ROWS: rows}

    def _aggregate(self, states: list[State], counts: list[int], nodes: list[int]) -> State:
        if self._round_start is not None:
            self._round_start, _, _ = split_state(self._round_start)
        lora = super()._aggregate(states, counts, nodes)
        if self.secure:  # the rows come from the secure sum (`_with_secure_extra`)
            return {**lora, TABLE_IDS: self.table_start[0], TABLE_ROWS: self.table_start[1]}
        ids, rows = aggregate_rows(*self.table_start, [self._rows_up[n] for n in nodes])
        return {**lora, TABLE_IDS: ids, TABLE_ROWS: rows}

    def _client_info(self, node: int, n: int, metrics: dict, msg: Message,
                     key: str = "arrays") -> dict:
        row = super()._client_info(node, n, metrics, msg, key)
        if self.secure:  # what a device trained is not in its share
            row.update(rows_requested=int(self.requests[node].size),
                       rows_up=int(self._union.size) if node in self._inputs else 0,
                       rows_counted=None, rows_max_change=None)
            return row
        up = self._rows_up.get(node)
        row.update(rows_requested=int(self.requests[node].size),
                   rows_up=0 if up is None else int(up.ids.size),
                   rows_counted=0 if up is None else int((up.counts > 0).sum()),
                   rows_max_change=float(metrics.get("rows-max-change", 0.0)))
        return row
