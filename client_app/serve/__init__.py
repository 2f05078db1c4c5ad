"""The device side of `mode='serve'` (S8 micro-services): a QUERY of type `query.serve`
carries in its `config` record the `kind` of service (`cot`, `moe`, `split`); the serve kind
of that name (`server_app.serve.mode.SERVE_KINDS`) names the module here that answers it with
`handle(msg, context, cfg) -> Message`."""

from __future__ import annotations

from flwr.app import Context, Message

from edge_lam.config.run_config import RunConfig
from edge_lam.config.registry import registry


def handle(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    kind = registry("serve kind").get(str(msg.content["config"]["kind"]))
    return kind.handle(msg, context, cfg)
