"""The server's model at points of product space: the validation loss and its per-example
gradients that S6's contribution estimate needs (`strategies.robust.contribution`).

A point is the round's starting global state plus an update in product space (`Update`:
per adapted layer a d_out x d_in change of B A, per dense key, e.g. the head, a change of
the tensor). The model is evaluated there exactly, without refactorising to r_max: every
adapted layer's frozen weight is set to W0 + s P (P = B A + the layer's update, s the LoRA
scaling) with the LoRA factors zeroed, and the dense tensors to theirs. So

    dL/dP = s dL/dW           (the frozen weight's gradient, made trainable for the pass)

and the contribution estimate and the exact leave-one-out are computed on one function.

Cost: one forward + backward per validation example for the gradients (N passes; batch 1 so
each example has its own gradient for the diagonal Fisher), one forward per example for a
loss. Memory: running sums only, 2 D float64 (D = the sum of the adapted layers' d_out x d_in
and the dense entries: 1.8 M for MiniLM's query/value layers, about 10^8 for an LLM with every
projection adapted, where the K x D stack of the devices' updates is the larger cost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from strategies.robust.math import Update
from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import encode_batch
from edge_lam.data.text import Examples
from edge_lam.models.families import family, training_loss
from edge_lam.training.lora import BASE_DELTA, State, factors, is_lora_key, lora_layers
from edge_lam.models.lora_model import (get_lora_model, load_tokenizer, resolve_model_source,
                                        set_trainable_state, torch_device)


BATCH = 8  # examples per backward for the batched per-example gradients


class Gradients(NamedTuple):
    mean: np.ndarray                 # (D,) g
    fisher_diag: np.ndarray          # (D,) mean_i g_i^2
    losses: np.ndarray               # (N,)
    fisher_form: np.ndarray | None   # (K,) d_k^T F d_k with the empirical (low-rank) Fisher


class ProductSpace:
    """The validation loss L(point) and its per-example gradients, on `examples`."""

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...], examples: Examples):
        self.cfg = cfg
        self.label_names = label_names
        self.examples = examples
        self.model = get_lora_model(cfg, label_names, cfg.r_max)
        self.tokenizer = load_tokenizer(resolve_model_source(cfg.model))
        self._batches = [{k: v.to(torch_device()) for k, v in encode_batch(
            self.tokenizer, examples.subset([i]), cfg).items()} for i in range(len(examples))]

    def _load(self, previous: State, update: Update) -> None:
        """The model at previous + update: W = W0 + s (B A + update) per layer, B zeroed.
        The process's model is shared (simulated devices in this process train other
        ranks' adapters on it): its r_max adapter is made active again first."""
        self.model = get_lora_model(self.cfg, self.label_names, self.cfg.r_max)
        state: State = {}
        for prefix in lora_layers(previous):
            b, a = factors(previous, prefix)
            product = b.astype(np.float64) @ a.astype(np.float64) + update.get(prefix, 0.0)
            state[prefix + BASE_DELTA] = product.astype(np.float32)
            state[prefix + ".lora_B.weight"] = np.zeros_like(b)
            state[prefix + ".lora_A.weight"] = a
        for key, value in previous.items():
            if not is_lora_key(key):
                state[key] = (value.astype(np.float64) + update.get(key, 0.0)).astype(
                    np.float32)
        set_trainable_state(self.model, state)

    def losses(self, previous: State, update: Update) -> np.ndarray:
        """(N,) loss of each validation example at previous + update."""
        self._load(previous, update)
        self.model.eval()
        with torch.no_grad():
            return np.array([float(training_loss(self.cfg, self.model, dict(b)))
                             for b in self._batches])

    def loss(self, previous: State, update: Update) -> float:
        """L_val: the mean of the examples' losses."""
        return float(self.losses(previous, update).mean())

    def gradients(self, previous: State, update: Update, keys: Sequence[str],
                  directions: np.ndarray | None = None) -> Gradients:
        """The mean gradient g (D,) of the examples' losses w.r.t. the point's coordinates in
        the order of `keys` (layer prefixes, dense keys: `strategies.robust.math.Updates`'),
        the diagonal empirical Fisher F_p = mean_i g_ip^2 (D,), the (N,) losses, and, given
        `directions` (K, D), the empirical Fisher's quadratic form per direction,
        d_k^T F d_k = mean_i (g_i . d_k)^2 (K,), F = mean_i g_i g_i^T being of rank <= N.
        Only running sums are kept (2 D + K floats).

        Classification families (`seq-cls`, `lm-cls`) take one forward + backward per batch
        of `BATCH` examples: every coordinate is a Linear layer's weight or bias, whose
        per-example gradient is sum_t delta_t x_t^T from its input x and output gradient
        delta, captured by hooks (as Opacus's grad samplers do). `causal-lm` (a loss per
        response token) and any other parameter take one backward per example."""
        self._load(previous, update)
        self.model.eval()
        params = self._parameters(keys)
        linear = self._linear_of(params) if family(self.cfg).labelled else None
        total = squares = None
        form = None if directions is None else np.zeros(directions.shape[0])
        losses: list[float] = []
        with _trainable([p for p, _ in params.values()]):
            for rows, batch_losses in (self._batched(linear, keys, params) if linear else
                                       self._one_by_one(keys, params)):
                total = rows.sum(0) if total is None else total + rows.sum(0)
                squares = (rows * rows).sum(0) if squares is None else \
                    squares + (rows * rows).sum(0)
                if directions is not None:
                    form += ((rows @ directions.T) ** 2).sum(0)               # (K,)
                losses.extend(batch_losses)
        self.model.zero_grad(set_to_none=True)
        n = len(losses)
        return Gradients(total / n, squares / n, np.array(losses),
                         None if form is None else form / n)

    def _one_by_one(self, keys, params):
        for batch in self._batches:
            self.model.zero_grad(set_to_none=True)
            loss = training_loss(self.cfg, self.model, dict(batch))
            loss.backward()
            yield np.concatenate([(scale * param.grad.detach().double().cpu().numpy()).ravel()
                                  for param, scale in (params[k] for k in keys)])[None, :], \
                [float(loss.detach())]

    def _linear_of(self, params) -> dict[str, tuple[torch.nn.Linear, str]] | None:
        """key -> (the nn.Linear holding its tensor, 'weight' or 'bias'); None if a tensor
        is not a Linear's (then the per-example loop is used)."""
        owner = {}
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                for attr in ("weight", "bias"):
                    tensor = getattr(module, attr, None)
                    if tensor is not None:
                        owner[id(tensor)] = (module, attr)
        out = {key: owner.get(id(param)) for key, (param, _) in params.items()}
        return None if None in out.values() else out

    def _batched(self, linear, keys, params):
        """(B, D) per-example gradients and B losses per batch of BATCH examples."""
        captured: dict[int, list] = {}

        def forward_hook(module, inputs, output):
            slot = captured.setdefault(id(module), [None, None])
            slot[0] = inputs[0].detach()
            output.register_hook(lambda grad: slot.__setitem__(1, grad.detach()))

        handles = [m.register_forward_hook(forward_hook)
                   for m in {id(m): m for m, _ in linear.values()}.values()]
        try:
            examples = self.examples
            for start in range(0, len(examples), BATCH):
                chunk = examples.subset(range(start, min(start + BATCH, len(examples))))
                batch = {k: v.to(torch_device()) for k, v in
                         encode_batch(self.tokenizer, chunk, self.cfg).items()}
                self.model.zero_grad(set_to_none=True)
                captured.clear()
                logits, labels = family(self.cfg).outputs(self.model, dict(batch))
                per_example = F.cross_entropy(logits, labels, reduction="none")  # (B,)
                per_example.sum().backward()
                rows = []
                for key in keys:
                    module, attr = linear[key]
                    x, delta = captured[id(module)]
                    x = x.reshape(x.shape[0], -1, x.shape[-1]).double()           # (B, T, in)
                    delta = delta.reshape(delta.shape[0], -1, delta.shape[-1]).double()
                    grad = torch.einsum("bto,bti->boi", delta, x) if attr == "weight" \
                        else delta.sum(1)                                         # (B, ...)
                    rows.append((params[key][1] * grad).reshape(grad.shape[0], -1))
                yield torch.cat(rows, dim=1).cpu().numpy(), \
                    per_example.detach().double().cpu().tolist()
        finally:
            for handle in handles:
                handle.remove()

    def _parameters(self, keys: Sequence[str]) -> dict[str, tuple[torch.nn.Parameter, float]]:
        """key -> (the tensor whose gradient it is, the factor to its coordinates): a layer
        prefix -> its frozen weight and the LoRA scaling s; a dense key -> its parameter."""
        from peft.tuners.lora import LoraLayer

        from edge_lam.training.loop import _state_keys

        out: dict[str, tuple[torch.nn.Parameter, float]] = {}
        for name, layer in self.model.named_modules():
            if isinstance(layer, LoraLayer) and name in keys:
                out[name] = (layer.get_base_layer().weight,
                             float(layer.scaling[self.model.active_adapter]))
        for param, key in _state_keys(self.model).items():
            if key in keys:
                out[key] = (param, 1.0)
        missing = [k for k in keys if k not in out]
        if missing:
            raise ValueError(f"the server model has no parameter for {missing[:3]}")
        return out


@contextmanager
def _trainable(params: list[torch.nn.Parameter]):
    """requires_grad on for the pass (the frozen weights), restored after."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
            p.grad = None


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
