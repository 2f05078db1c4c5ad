"""Flower mods the ClientApp puts around its TRAIN handlers (outermost first):

- `strategies.secure.device.secagg_mod`: masks the reply for secure aggregation;
- `central_clip_mod`: with central DP (`dp.central='client'`: the server's Flower wrapper
  puts the clipping norm in the TRAIN config), Flower's own `fixedclipping_mod` clips the
  device's update (reply minus what it received) to that norm; without it, nothing.
Clipping runs before masking: the server only ever sees the sum of clipped updates.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def central_clip_mod(msg: Message, context: Context, call_next) -> Message:
    config = msg.content.config_records.get("config")
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)
