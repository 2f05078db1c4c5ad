"""The device side of `mode='serve'` (S8 micro-services): a QUERY of type `query.serve`
carries in its `config` record the `kind` of service (`cot`, `moe`, `split`); the module of
that name in this package answers it with `handle(msg, context, cfg) -> Message`."""

from __future__ import annotations

import importlib

from flwr.app import Context, Message

from task.config import ConfigError, RunConfig

KINDS = ("cot", "moe", "split")


def handle(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    kind = str(msg.content["config"]["kind"])
    if kind not in KINDS:
        raise ConfigError(f"serve kind '{kind}' is not known: use one of {', '.join(KINDS)}")
    return importlib.import_module(f"client_app.serve.{kind}").handle(msg, context, cfg)
