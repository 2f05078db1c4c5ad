"""A Flower Grid that delivers messages to the real ClientApp in this process.

Each node has its own Context (node_config with its partition, persistent `state`), so the
ServerApp logic (the algorithm's `prepare_run` / `federate`, found through the registry)
and the ClientApp handlers run unchanged, and a test can read every message that was sent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as client_app
from strategies import registry

SERVER = 0


class InProcessGrid:
    def __init__(self, run_config: dict, num_nodes: int, first_node_id: int = 1001):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SERVER
        self.contexts = {
            first_node_id + p: Context(run_id=1, node_id=first_node_id + p,
                                       node_config={"partition-id": p,
                                                    "num-partitions": num_nodes},
                                       state=RecordDict(), run_config=dict(run_config))
            for p in range(num_nodes)}
        self.sent: list[tuple[int, Message]] = []  # (server round, message) as sent
        self.replies: list[Message] = []
        self.before_send: Callable[[Message], None] = lambda msg: None

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in list(messages):
            self.before_send(msg)
            config = msg.content.config_records.get("config")
            self.sent.append((int(config["server-round"]) if config and "server-round" in
                              config else 0, msg))
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                replies.append(client_app(msg, self.contexts[node]))
            finally:
                TaskIdentity.node_id = SERVER
        self.replies.extend(replies)
        return replies


def _server(cfg):
    """The server module of the run's algorithm (where its `run` lives)."""
    return importlib.import_module(registry.get(cfg.strategy).run.__module__)


def prepare_run(cfg, run_id: int):
    return _server(cfg).prepare_run(cfg, run_id)


def federate(grid, plan):
    return _server(plan.cfg).federate(grid, plan)
