"""The server side of SecAgg+ (`strategies.secure.protocol`) over a Flower Grid.

`SecureRound.begin` runs the setup and share-keys stages (QUERY `secagg`) with the round's
devices and gives back those that completed them (U1), each with the config its TRAIN
message must carry (`train_config`: the ciphertexts routed to it). `finish` takes the masked
inputs that arrived (U2), asks the survivors for their shares (QUERY `secagg` unmask) and
returns sum_{u in U2} x_u modulo 2^64. A device that drops after masking costs nothing as
long as `threshold` of each neighbourhood answer the unmask stage; fewer, and the round's
sum cannot be rebuilt (`RoundFailed`: the strategy keeps the previous global model).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from edge_lam.logs import get_logger
from edge_lam.messaging import origin, unicast
from strategies.secure.protocol import Unmasking, sum_uint64, threshold_for

log = get_logger()

QUERY = "query.secagg"


class RoundFailed(RuntimeError):
    """Too few devices to set up or to unmask a round."""


def config_nbytes(record: ConfigRecord) -> int:
    """Bytes a config record carries: its byte strings, 8 per number (keys excluded)."""
    total = 0
    for value in record.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


@dataclass
class SecureRound:
    """One round of secure aggregation, for the devices the strategy picked."""

    run_id: int
    server_round: int
    neighbours: int  # k (0: everyone)
    threshold: float  # `secure.threshold`: a count, or a fraction of a neighbourhood
    timeout: float
    devices: list[int] = field(default_factory=list)  # U0
    t: int = 0
    s_keys: dict[int, bytes] = field(default_factory=dict)  # U1 -> public s-key
    inbox: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)  # stage -> bytes, both ways
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # node -> why it left the round

    def _ask(self, grid: Grid, nodes: Iterable[int], stage: str,
             config: callable) -> dict[int, ConfigRecord]:
        """One QUERY `secagg` stage; the answers of the nodes that answered well."""
        started = time.perf_counter()
        sent = unicast(list(nodes), QUERY, lambda n: RecordDict({"config": ConfigRecord({
            "stage": stage, "server-round": self.server_round, **config(n)})}))
        down = sum(config_nbytes(m.content["config"]) for m in sent)
        replies = grid.send_and_receive(sent, timeout=self.timeout)
        answers, up = {}, 0
        for reply in replies:
            node = origin(reply, sent)
            if reply.has_error():
                self.failed[node] = f"{stage}: {reply.error.reason}"
                log.warning("round %d: node %d left secure aggregation at '%s': %s",
                            self.server_round, node, stage, reply.error.reason)
                continue
            answers[node] = reply.content["config"]
            up += config_nbytes(answers[node])
        for node in set(nodes) - set(answers) - set(self.failed):
            self.failed[node] = f"{stage}: no answer"
        self.bytes[stage] = down + up
        self.seconds[stage] = time.perf_counter() - started
        return answers

    def begin(self, grid: Grid, nodes: Iterable[int]) -> list[int]:
        """Setup and share keys with `nodes`; U1 (sorted). RoundFailed when fewer than
        `t` devices are left."""
        self.devices = sorted(int(n) for n in nodes)
        size = (len(self.devices) if self.neighbours <= 0
                else min(self.neighbours, len(self.devices) - 1) + 1)
        self.t = threshold_for(self.threshold, size)
        keys = self._ask(grid, self.devices, "setup", lambda n: {
            "devices": self.devices, "neighbours": self.neighbours, "threshold": self.t})
        ids = sorted(keys)
        if len(ids) < self.t:
            raise RoundFailed(f"{len(ids)} devices answered the secure-aggregation setup, "
                              f"under the threshold {self.t}")
        pk_c = [keys[i]["pk-c"] for i in ids]
        pk_s = [keys[i]["pk-s"] for i in ids]
        shares = self._ask(grid, ids, "share", lambda n: {"ids": ids, "pk-c": pk_c,
                                                           "pk-s": pk_s})
        self.s_keys = {i: keys[i]["pk-s"] for i in sorted(shares)}
        self.inbox = {i: [] for i in self.s_keys}
        for src, answer in shares.items():
            for dst, ct in zip(answer["dst"], answer["ciphertext"]):
                if int(dst) in self.inbox:  # shares for a device that left are dropped
                    self.inbox[int(dst)].append((src, ct))
        if len(self.s_keys) < self.t:
            raise RoundFailed(f"{len(self.s_keys)} devices shared their keys, under the "
                              f"threshold {self.t}")
        return sorted(self.s_keys)

    def train_config(self, node: int) -> dict:
        """What `node`'s TRAIN message carries for masking: the shares routed to it."""
        routed = self.inbox.get(node, [])
        return {"secagg-stage": "mask", "secagg-src": [s for s, _ in routed],
                "secagg-ciphertext": [c for _, c in routed]}

    def finish(self, grid: Grid, inputs: Mapping[int, np.ndarray]) -> np.ndarray:
        """sum_{u in U2} x_u (uint64) from the masked inputs that arrived (U2)."""
        survived = sorted(n for n in inputs if n in self.s_keys)
        dropped = sorted(set(self.s_keys) - set(survived))
        if len(survived) < self.t:
            raise RoundFailed(f"{len(survived)} masked inputs arrived, under the threshold "
                              f"{self.t}")
        answers = self._ask(grid, survived, "unmask",
                            lambda n: {"survived": survived, "dropped": dropped})
        started = time.perf_counter()
        b_shares: dict[int, list[bytes]] = {}
        sk_shares: dict[int, list[bytes]] = {}
        for answer in answers.values():
            for v, share in zip(answer["b-ids"], answer["b-shares"]):
                b_shares.setdefault(int(v), []).append(share)
            for v, share in zip(answer["sk-ids"], answer["sk-shares"]):
                sk_shares.setdefault(int(v), []).append(share)
        total = sum_uint64(inputs[n] for n in survived)
        try:
            out = Unmasking(self.run_id, self.server_round, self.devices, self.neighbours,
                            self.t, self.s_keys, survived, dropped, b_shares,
                            sk_shares).remove_masks(total)
        except ValueError as err:
            raise RoundFailed(str(err)) from None
        self.seconds["unmask-server"] = time.perf_counter() - started
        self.survived, self.dropped = survived, dropped
        return out

    def info(self) -> dict:
        """The round's secure-aggregation entry of metrics.jsonl."""
        return {"devices": len(self.devices), "threshold": self.t,
                "neighbours": self.neighbours, "shared": sorted(self.s_keys),
                "survived": getattr(self, "survived", []),
                "dropped": getattr(self, "dropped", []),
                "left": {str(k): v for k, v in sorted(self.failed.items())},
                "bytes": dict(self.bytes),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}
