"""results/<run-id>/unlearning.json: an S4 unlearning request and what became of it.

The request is written (atomically) before the first unlearning message leaves the server,
next to the global adapter it starts from (`adapter-before-unlearning/`). It then records
each phase, and on completion what was forgotten, when, and at what cost (rounds, bytes,
wall time, against this run's training rounds when there were any). A server that starts
while a request under `results-dir` is unfinished honours it: strategy='unlearn' resumes it
from its saved adapter, any other strategy refuses to train.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from strategies.lora.strategy import NodeProfile
from edge_lam.config.run_config import ConfigError, RunConfig

REQUEST_FILE = "unlearning.json"
BEFORE_ADAPTER = "adapter-before-unlearning"
UNFINISHED = ("pending", "unlearning", "recovering")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so a crash never leaves a half-written request."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Unfinished:
    """An unlearning request some earlier server did not complete."""

    path: Path
    request: dict

    @property
    def adapter(self) -> Path:
        return self.path.parent / self.request["before_adapter"]

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(self.request["clients"])


def find_unfinished(results_dir: Path) -> Unfinished | None:
    """The most recent unfinished request under `results_dir`, if any."""
    found = []
    for path in Path(results_dir).glob(f"*/{REQUEST_FILE}"):
        try:
            request = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if request.get("status") in UNFINISHED:
            found.append((path.stat().st_mtime, path, request))
    if not found:
        return None
    _, path, request = max(found, key=lambda f: f[0])
    return Unfinished(path, request)


def honour_unfinished(cfg: RunConfig, results_dir: Path) -> Unfinished | None:
    """The request this run must finish first; ConfigError if the config cannot do that."""
    unfinished = find_unfinished(results_dir)
    if unfinished is None:
        return None
    what = (f"{unfinished.path} asks to forget devices {list(unfinished.clients)} and was not "
            f"finished (status '{unfinished.request['status']}')")
    if cfg.strategy != "unlearn":
        raise ConfigError(f"{what}: run strategy='unlearn' unlearn.clients="
                          f"'{','.join(map(str, unfinished.clients))}' to finish it (it resumes "
                          "from its saved adapter), or set its \"status\" to \"cancelled\"")
    if set(cfg.unlearn.clients) != set(unfinished.clients):
        raise ConfigError(f"{what}, and unlearn.clients='{','.join(map(str, cfg.unlearn.clients))}'"
                          f" differs: set unlearn.clients='{','.join(map(str, unfinished.clients))}'"
                          " to finish it first, or set its \"status\" to \"cancelled\"")
    if not unfinished.adapter.is_dir():
        raise ConfigError(f"{what}, but its adapter {unfinished.adapter} is gone: set its "
                          "\"status\" to \"cancelled\" and start again from "
                          "unlearn.from-adapter")
    return unfinished


class UnlearningRecord:
    """The request file of this run: written before unlearning, updated as it goes."""

    def __init__(self, run_dir: Path, cfg: RunConfig, run_id: int, source: dict,
                 resumes: Unfinished | None = None):
        self.path = run_dir / REQUEST_FILE
        self.resumes = resumes
        self._t0 = 0.0
        self.data = {
            "status": "pending", "run_id": run_id, "requested_at": None,
            "clients": list(cfg.unlearn.clients),
            "clients_are": "partition ids (simulation) or node ids (deployment)",
            "forgotten": [], "not_connected": [],
            "loss": cfg.unlearn.loss, "eps": cfg.unlearn.eps, "lr": cfg.unlearn.lr,
            "unlearning_rounds": cfg.unlearn.rounds,
            "recovery_rounds": cfg.unlearn.recovery_rounds,
            "aggregation": cfg.aggregation, "r_max": cfg.r_max,
            "differential_privacy": ({"target_epsilon": cfg.dp.target_epsilon,
                                      "delta": cfg.dp.delta,
                                      "max_grad_norm": cfg.dp.max_grad_norm}
                                     if cfg.dp.enabled else None),
            "source": source | ({"resumes": str(resumes.path)} if resumes else {}),
            "before_adapter": BEFORE_ADAPTER, "history": [],
        }

    def start(self, forgotten: list[NodeProfile], missing: list[int], first_round: int) -> None:
        """Persist the request: call before any unlearning message is sent."""
        self._t0 = time.perf_counter()
        self.data.update(
            status="pending" if missing else "unlearning", requested_at=_now(),
            first_unlearning_round=first_round, not_connected=missing,
            forgotten=[{"node_id": p.node_id, "partition_id": p.partition_id,
                        "device": p.device, "rank": p.rank} for p in forgotten])
        self._log_event(self.data["status"], first_round)
        if self.resumes is not None:
            old = dict(self.resumes.request, status="resumed",
                       resumed_by=str(self.path))
            _write_json(self.resumes.path, old)

    def phase(self, phase: str, server_round: int) -> None:
        if phase == "recover":
            self.data["status"] = "recovering"
            self._log_event("recovering", server_round)

    def finish(self, rows: list[dict]) -> dict:
        """Mark done and record the cost of unlearning (+ recovery) against training."""
        def total(phases: tuple[str, ...]) -> dict:
            chosen = [r for r in rows if r.get("phase") in phases]
            return {"rounds": len(chosen),
                    "bytes_up": sum(c["bytes_up"] for r in chosen for c in r["clients"]),
                    "bytes_down": sum(c["bytes_down"] for r in chosen for c in r["clients"]),
                    "round_wall_s": sum(r["wall_s"] for r in chosen)}

        cost = total(("unlearn", "recover")) | {"wall_s": time.perf_counter() - self._t0}
        training = total(("train",))
        self.data.update(status="done", completed_at=_now(), cost=cost,
                         result_adapter="adapter")
        if training["rounds"]:
            self.data["training_in_this_run"] = training
            self.data["cost_vs_training"] = {
                "rounds": cost["rounds"] / training["rounds"],
                "bytes": (cost["bytes_up"] + cost["bytes_down"])
                / max(training["bytes_up"] + training["bytes_down"], 1),
                "wall_s": cost["round_wall_s"] / max(training["round_wall_s"], 1e-9)}
        self._log_event("done", None)
        return self.data

    def _log_event(self, status: str, server_round: int | None) -> None:
        self.data["history"].append({"status": status, "at": _now(), "round": server_round})
        _write_json(self.path, self.data)
