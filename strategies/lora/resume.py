"""Exact resume (R3), the strategy's side: what each stateful part keeps between rounds, and
how a resumed run takes it up again. `strategies.lora.checkpoint` writes and reads the files.

Every part of the strategy that keeps state between rounds implements `CheckpointPart`:
- the profiles directory (`profiles.ProfileDirectory`, entry `profiles`);
- the DP budget stop's exhausted devices (`budget.PrivacyBudget.exhausted`, `exhausted`);
- the capability records (`capability`), S6 trust (`strategies.robust.wrapper`, `trust`);
- the fleet clock (`strategies.fleet.scheduler.FleetClock`, `fleet`) and FedLaAvg's latest
  updates (`LatestUpdates`, `latest`, with arrays `latest/<device>/<key>`);
- the optimiser on the aggregate (`server_opt.ServerOptimizer`, `server_opt`, with arrays
  `server_opt/m/<key>` and `server_opt/v/<key>`).
`StrategyCheckpoint` puts their entries together into the checkpoint's `strategy_state` (the
format of `checkpoint.FORMAT` 1, unchanged by the split into parts) and hands each its entry
back on resume.

Per-device entries are named by partition id (`p3`; `n<node id>` for a device without one):
a resumed simulation gives every device a new node id. Until a device is met again (its
profile QUERY), its entries wait under a placeholder node id (negative); `adopt` then moves
them to the device's node id in every part (`CheckpointPart.move`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edge_lam.logs import get_logger
from edge_lam.training.lora import State

log = get_logger()

# every entry of `strategy_state`, in the order written, with its value when no part has one
ENTRIES = {"profiles": {}, "exhausted": {}, "capability": {}, "trust": {}, "fleet": None,
           "latest": None, "server_opt": None}


@dataclass
class Restored:
    """What every part is restored with besides its own entry."""

    node_of: dict[str, int]  # saved device name -> its placeholder node id (negative)
    profiles: dict[str, dict]  # saved device name -> {"device", "rank", "partition_id"}
    arrays: State = field(default_factory=dict)  # the checkpoint's strategy arrays


@runtime_checkable
class CheckpointPart(Protocol):
    """A stateful part of the strategy (R3)."""

    entry: str  # its key in the checkpoint's strategy_state (one of ENTRIES)

    def checkpoint_state(self, name_of: Callable[[int], str]) -> tuple[Any, State]:
        """(its JSON-able entry, its arrays), devices named by `name_of(node)`."""

    def restore(self, saved: Any, restored: Restored) -> None:
        """Take up its entry; a saved device's node id is `restored.node_of[name]`."""

    def move(self, old: int, new: int) -> None:
        """The device under node id `old` (a placeholder) is now `new`."""


def moved(table: dict, old: int, new: int) -> dict:
    """`table` with key `old` renamed `new`, in place in the order (a value `new` already
    had is replaced: the saved one is what the interrupted run used)."""
    if old not in table:
        return table
    return {(new if k == old else k): v for k, v in table.items() if k != new}


class NodeTable(dict):
    """node -> a JSON-able value (exhausted epsilon, capability record, trust), as a
    checkpoint part under `entry`; `convert` applies to values written and read."""

    def __init__(self, entry: str, convert: Callable[[Any], Any] = lambda v: v):
        super().__init__()
        self.entry, self.convert = entry, convert

    def checkpoint_state(self, name_of: Callable[[int], str]) -> tuple[dict, State]:
        return {name_of(n): self.convert(v) for n, v in self.items()}, {}

    def restore(self, saved: dict | None, restored: Restored) -> None:
        self.replace({restored.node_of[k]: self.convert(v) for k, v in (saved or {}).items()})

    def move(self, old: int, new: int) -> None:
        self.replace(moved(self, old, new))

    def replace(self, items: dict) -> None:
        """Its content becomes `items` (same object: whoever holds it sees the change)."""
        items = dict(items)
        self.clear()
        self.update(items)


class StrategyCheckpoint:
    """The strategy's parts as one checkpoint entry; `name_of(node)` names a device by its
    profile (`profile_of(node)`: None if unknown) or, until met again, its saved name."""

    def __init__(self, parts: Iterable[object], profile_of: Callable[[int], Any]):
        self.parts = [p for p in parts if isinstance(p, CheckpointPart)]
        self.profile_of = profile_of
        self.waiting: dict[str, int] = {}  # saved name -> placeholder node id
        self.names: dict[int, str] = {}  # placeholder node id -> saved name

    def name_of(self, node: int) -> str:
        if node in self.names:
            return self.names[node]
        profile = self.profile_of(node)
        if profile is not None and profile.partition_id >= 0:
            return f"p{profile.partition_id}"
        return f"n{node}"

    def state(self) -> tuple[dict, State]:
        """(strategy_state for state.json, arrays for strategy.safetensors)."""
        meta, arrays = dict(ENTRIES), {}
        for part in self.parts:
            meta[part.entry], more = part.checkpoint_state(self.name_of)
            arrays.update(more)
        return meta, arrays

    def restore(self, meta: dict, arrays: State) -> None:
        """Take up `state`'s output: every saved device under a placeholder node id."""
        profiles = {k: dict(v) for k, v in meta["profiles"].items()}
        self.waiting = {k: -(i + 1) for i, k in enumerate(profiles)}
        self.names = {v: k for k, v in self.waiting.items()}
        restored = Restored(dict(self.waiting), profiles, arrays)
        for part in self.parts:
            part.restore(meta.get(part.entry, ENTRIES[part.entry]), restored)

    def adopt(self, profiles: dict[int, Any]) -> None:
        """Devices of the interrupted run met again: their saved entries move from the
        placeholder id to the node id in every part."""
        if not self.waiting:
            return
        for node, profile in list(profiles.items()):
            name = f"p{profile.partition_id}" if profile.partition_id >= 0 else f"n{node}"
            placeholder = self.waiting.pop(name, None)
            if placeholder is None:
                continue
            self.names.pop(placeholder, None)
            for part in self.parts:
                part.move(placeholder, node)
            log.info("node %d is %s of the interrupted run: its state is restored", node, name)
