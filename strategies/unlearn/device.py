"""The device side of S4 unlearning rounds: a TRAIN "gradient" message, one gradient reply.

A remaining device replies the gradient of the task loss at the global module it receives;
an opting-out device the gradient of the unlearning loss (`unlearn.loss`) at its own copy of
the model, kept in `context.state`: the first unlearning round sends it the global module,
later rounds only the projected update, which it adds to that copy (S4 step 5). Training and
recovery rounds are ordinary LoRA rounds (`strategies.lora.device.train`).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict

from strategies.lora.device import (Round, budget_exhausted, open_privacy, privacy_metrics,
                                    save_privacy)
from strategies.unlearn.math import unlearning_objective
from edge_lam.config.run_config import RunConfig
from edge_lam.training.device import gradient_round
from edge_lam.records import from_record, to_record

OWN_MODEL = "unlearn-model"  # context.state key: an opting-out device's own model


def gradient(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """S4 step 1: g_k at the model this device holds (global, or its own when opting out)."""
    rnd = Round.of(msg, context, cfg)
    what = str(rnd.config["objective"])
    if what not in ("task", "unlearn"):
        raise ValueError(f"objective must be 'task' or 'unlearn', got {what!r}")
    if "arrays" in msg.content:  # the global module
        state = rnd.checked(from_record(msg.content["arrays"]))
    else:  # an opting-out device: its own model plus the projected update (S4 step 5)
        if OWN_MODEL not in context.state:
            raise RuntimeError(f"{rnd.tag} received a projected update but holds no model to "
                               "apply it to (the first unlearning round sends the model)")
        own = from_record(context.state[OWN_MODEL])
        update = rnd.checked(from_record(msg.content["update"]))
        state = {k: own[k] + update[k] for k in own}
    if what == "unlearn":
        context.state[OWN_MODEL] = to_record(state)
    privacy = open_privacy(rnd, context)
    if privacy is not None and not privacy.can_step():
        return budget_exhausted(msg, privacy, rnd)
    objective = unlearning_objective(cfg.unlearn.loss, cfg.unlearn.eps) \
        if what == "unlearn" else None
    grads, num_examples, metrics = gradient_round(
        cfg, rnd.info, rnd.label_names, rnd.rank, state, rnd.server_round,
        cfg.unlearn.grad_batches, objective, tag=rnd.tag, privacy=privacy, r_max=rnd.r_max,
        what=what)
    save_privacy(privacy, rnd.info, context)
    reply = RecordDict({
        "gradient": to_record(grads),
        "metrics": MetricRecord({"num-examples": num_examples, "loss": metrics["loss"],
                                 "grad-s": metrics["grad_s"], "rank": rnd.rank,
                                 "batches": metrics["batches"], **privacy_metrics(metrics)}),
    })
    return Message(reply, reply_to=msg)
