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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies.lora.strategy import HeterogeneousLoRA
from strategies.submodel.device import COUNTS, IDS, ROWS
from strategies.submodel.math import RowUpdate, aggregate_rows, check_update, lookup
from task.config import RunConfig
from task.logs import get_logger
from task.lora import State, is_base_delta_key, truncate_lora
from task.records import from_record, record_nbytes, to_record

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
        return super().configure_train(server_round, arrays, config, grid)

    def _downlink(self, node: int, global_state: State, server_round: int
                  ) -> tuple[State, State, dict]:
        lora, ids, rows = split_state(global_state)
        state = truncate_lora(lora, self.profiles[node].rank)
        wanted = self.requests[node]
        payload = {**state, IDS: wanted, ROWS: lookup(ids, rows, wanted, self.base)}
        return payload, state, {"label-names": list(self.label_names)}

    def _payload_bytes(self, arrays: ArrayRecord, rank: int) -> int:
        """Adapter bytes at `rank` (the fleet clock's uplink estimate; rows not counted)."""
        if rank not in self._bytes_at_rank:
            lora, _, _ = split_state(from_record(arrays))
            self._bytes_at_rank[rank] = record_nbytes(to_record(truncate_lora(
                {k: v for k, v in lora.items() if not is_base_delta_key(k)}, rank)))
        return self._bytes_at_rank[rank]

    # ----------------------------------------------------------------- uplink
    def _decode_uplink(self, node: int, payload: State) -> State:
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

    def _aggregate(self, states: list[State], counts: list[int], nodes: list[int]) -> State:
        if self._round_start is not None:
            self._round_start, _, _ = split_state(self._round_start)
        lora = super()._aggregate(states, counts, nodes)
        ids, rows = aggregate_rows(*self.table_start, [self._rows_up[n] for n in nodes])
        return {**lora, TABLE_IDS: ids, TABLE_ROWS: rows}

    def _client_info(self, node: int, n: int, metrics: dict, msg: Message,
                     key: str = "arrays") -> dict:
        row = super()._client_info(node, n, metrics, msg, key)
        up = self._rows_up.get(node)
        row.update(rows_requested=int(self.requests[node].size),
                   rows_up=0 if up is None else int(up.ids.size),
                   rows_counted=0 if up is None else int((up.counts > 0).sum()),
                   rows_max_change=float(metrics.get("rows-max-change", 0.0)))
        return row
