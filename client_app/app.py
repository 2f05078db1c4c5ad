"""The Flower ClientApp each device runs (simulation worker or `flower-supernode`).

- QUERY: tell the server who this device is (profile, partition, explicit rank, task), from
  its `--node-config` (`edge_lam.messaging.profile_reply`); any app mode may ask.
- QUERY `infer`: answer a batch of queries (`mode='infer'`, `client_app.infer`).
- QUERY `serve`: run one micro-service call (`mode='serve'`, `client_app.serve`).
- QUERY `secagg`: a stage of secure aggregation (`strategies.secure.device`); its Flower mod
  `secagg_mod` masks a TRAIN reply when the server asked for it (`secure.enabled`, the
  sub-model's secure rows), after `client_app.mods.central_clip_mod` clipped it
  (`dp.central='client'`).
- TRAIN (and TRAIN.<kind>, e.g. "gradient"): handled by the algorithm the run config names,
  looked up in the registry (`strategies.registry`): each algorithm declares one handler per
  message type it sends. A message type no registered algorithm handles is not registered.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app import infer, serve
from client_app.mods import central_clip_mod
from strategies import registry
from strategies.secure import device as secure
from edge_lam.config.run_config import RunConfig
from edge_lam.messaging import profile_reply
from edge_lam.training.overhead import handled

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return profile_reply(context.node_config, msg)


@app.query("infer")
def answer(msg: Message, context: Context) -> Message:
    """`mode='infer'`: answer a batch of queries with this device's model."""
    return infer.answer(msg, context)


@app.query("serve")
def serve_call(msg: Message, context: Context) -> Message:
    """`mode='serve'`: one micro-service call (a CoT step, experts, a range of layers)."""
    return serve.handle(msg, context)


@app.query("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """A stage of SecAgg+ (setup, share, unmask) for a secure training round."""
    return secure.handle(msg, context)


def _dispatch(message_type: str):
    def handle(msg: Message, context: Context) -> Message:
        started = time.time()
        cfg = RunConfig.from_run_config(context.run_config)
        reply = registry.handler(cfg.strategy, message_type)(msg, context, cfg)
        return _with_overhead(reply, started)

    handle.__name__ = message_type.replace(".", "_")
    return handle


def _with_overhead(reply: Message, started: float) -> Message:
    """Add what the round cost around training (`edge_lam.training.overhead`) to a reply's metrics."""
    if reply.has_content() and "metrics" in reply.content.metric_records:
        reply.content.metric_records["metrics"].update(handled(started))
    return reply


for _type in registry.message_types():  # "train", "train.gradient", ...
    _kind, _, _action = _type.partition(".")
    getattr(app, _kind)(*([_action] if _action else []),
                        mods=[secure.secagg_mod, central_clip_mod] if _kind == "train"
                        else None)(
        _dispatch(_type))
