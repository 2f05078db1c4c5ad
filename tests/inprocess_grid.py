"""A Flower Grid that delivers messages to the real ClientApp in this process.

Each node has its own Context (node_config with its partition, persistent `state`), so the
ServerApp logic (the algorithm's `prepare_run` / `federate`, found through the registry)
and the ClientApp handlers run unchanged, and a test can read every message that was sent.

Failures as Flower has them: an injected crash (`strategies.robust.inject.InjectedCrash`; any
exception with `errors_as_replies=True`) becomes the error reply a SuperNode sends (code
CLIENT_APP_RAISED_EXCEPTION, reason "<class ...>:<'...'>"); a handler's `inject.SLEEP` is
virtual (no real wait): a reply whose delay exceeds the round's timeout is dropped, as the
SuperLink drops late replies (kept in `late` for tests).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as client_app
from strategies import registry
from strategies.robust import inject

SERVER = 0


class InProcessGrid:
    def __init__(self, run_config: dict, num_nodes: int, first_node_id: int = 1001,
                 errors_as_replies: bool = False):
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
        self.errors_as_replies = errors_as_replies
        self.late: list[Message] = []  # replies dropped: slower than the round's timeout

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
            delays: list[float] = []
            inject.SLEEP = delays.append  # virtual clock: counted, not waited for
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as ex:  # as a SuperNode: an error reply, not a dead run
                if not (self.errors_as_replies or isinstance(ex, inject.InjectedCrash)):
                    raise
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=str(type(ex)) + ":<'" + str(ex) + "'>"),
                                reply_to=msg)
            finally:
                TaskIdentity.node_id = SERVER
                inject.SLEEP = time.sleep
            if timeout is not None and sum(delays) > timeout:
                self.late.append(reply)
                continue
            replies.append(reply)
        self.replies.extend(replies)
        return replies


def _server(cfg):
    """The server module of the run's algorithm (where its `run` lives)."""
    return importlib.import_module(registry.get(cfg.strategy).run.__module__)


def prepare_run(cfg, run_id: int):
    return _server(cfg).prepare_run(cfg, run_id)


def federate(grid, plan):
    return _server(plan.cfg).federate(grid, plan)
