"""The device's local loop (`run_steps`: training, gradients, FedKD's mutual distillation all
run through it), its Opacus wrapping, and evaluation."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from peft import get_peft_model_state_dict

from edge_lam.models.families import family, score, score_responses
from edge_lam.models.families import training_loss
from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import batches, encode_batch, endless_batches
from edge_lam.data.text import Examples
from edge_lam.training.lora import State
from edge_lam.training.memory import releaser
from edge_lam.models.lora_model import torch_device
from edge_lam.logs import get_logger

log = get_logger()

LossFn = Callable[[dict], tuple[torch.Tensor, dict]]


def _shuffled_stream(examples: Examples, cfg: RunConfig, tokenizer, seed: int):
    """next_batch(): shuffled batches on the model's device, reshuffling after each pass."""
    device = torch_device()
    stream = endless_batches(examples, cfg.train.batch_size, np.random.default_rng(seed))

    def next_batch() -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in encode_batch(tokenizer, next(stream), cfg).items()}

    return next_batch


def run_steps(steps: int, next_batch: Callable[[], dict], loss_fn: LossFn, optimizer,
              tag: str, describe: Callable[[dict[str, float]], str],
              accumulate: dict | None = None, private: bool = False,
              release: Callable[[], object] | None = None) -> list[dict[str, float]]:
    """The one local loop of every algorithm: `steps` times, a batch, its loss, backward.

    `loss_fn(batch)` gives (the loss to differentiate, the named parts to report). Without
    `accumulate` the optimizer steps (training); with it the gradients are summed into it,
    parameter by parameter, and nothing is updated (S4 gradients; `private`: Opacus clips
    and noises each batch's gradient first, as for a DP-SGD step). `release` runs after each
    forward pass and after each step (`edge_lam.training.memory.releaser`: `train.malloc-trim`). Returns
    each step's parts.
    """
    parts: list[dict[str, float]] = []
    log_every = max(1, steps // 4)
    release = release or (lambda: None)
    for step in range(1, steps + 1):
        loss, named = loss_fn(next_batch())
        release()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{tag} local loss became {loss.item()} at step {step}: "
                                     "lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if accumulate is None:
            optimizer.step()
        else:
            if private:
                optimizer.pre_step()  # clip per example, add noise, count the release
            for p, total in accumulate.items():
                if p.grad is not None:
                    total += p.grad
        parts.append({k: v.item() if torch.is_tensor(v) else v for k, v in named.items()})
        del loss, named
        release()
        if accumulate is None and (step % log_every == 0 or step == steps):
            log.info("%s step %d/%d %s", tag, step, steps, describe(parts[-1]))
    return parts


def task_loss(model, cfg: RunConfig) -> LossFn:
    """The model family's own loss (cross-entropy over classes, label words, or response
    tokens)."""

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        loss = training_loss(cfg, model, batch)
        return loss, {"loss": loss}

    return loss_fn


def logits_loss(model, cfg: RunConfig,
                objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> LossFn:
    """`objective(logits, labels)` in place of the model's loss (e.g. S4's unlearning loss)."""
    fam = family(cfg)

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        loss = objective(*fam.outputs(model, dict(batch)))
        return loss, {"loss": loss}

    return loss_fn


def train_local(model, tokenizer, examples: Examples, cfg: RunConfig, seed: int,
                tag: str = "", privacy=None, lora_lr_scale: float = 1.0) -> dict[str, float]:
    """`cfg.train.local_steps` AdamW steps on shuffled batches (cycling the data as needed).

    With `privacy` (edge_lam.training.privacy.DevicePrivacy) every step is an Opacus DP-SGD step on a
    Poisson batch, and training stops early, flagged `budget_exhausted`, before a step that
    would spend more than dp.target-epsilon. Returns mean train loss, steps taken, pure
    training seconds (and the privacy report).
    """
    optimizer = make_optimizer([model], cfg, lora_lr_scale)
    torch.manual_seed(seed)
    model.train()
    start = time.perf_counter()
    wanted = cfg.train.local_steps
    steps = wanted if privacy is None else privacy.steps_left(wanted)
    with _batch_source(model, optimizer, examples, tokenizer, cfg, seed, privacy) as (
            optimizer, next_batch):
        parts = run_steps(steps, next_batch, task_loss(model, cfg), optimizer, tag,
                          lambda p: f"loss {p['loss']:.4f}", release=releaser(cfg))
    losses = [p["loss"] for p in parts]
    out = {"train_loss": float(np.mean(losses)) if losses else math.nan,
           "steps": len(losses), "train_s": time.perf_counter() - start}
    return out | _privacy_report(privacy, len(losses) < wanted)


def make_optimizer(models, cfg: RunConfig, lora_lr_scale: float = 1.0
                   ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `models`: LoRA factors at `train.lr` x
    `lora_lr_scale`, whole trainable tensors (a classification head) at `train.head-lr` (0:
    the same as LoRA's)."""
    lora, heads = [], []
    for model in models:
        for name, param in model.named_parameters():
            if param.requires_grad:
                (lora if "lora_" in name else heads).append(param)
    groups = [{"params": lora, "lr": cfg.train.lr * lora_lr_scale}]
    if heads:
        groups.append({"params": heads, "lr": cfg.train.head_lr or cfg.train.lr})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=0.0)


def _privacy_report(privacy, stopped_early: bool) -> dict:
    if privacy is None:
        return {}
    return privacy.report() | {"budget_exhausted": stopped_early or not privacy.can_step()}


@contextmanager
def _batch_source(model, optimizer, examples, tokenizer, cfg, seed, privacy):
    """(optimizer, next_batch): plain shuffled batches, or Opacus's private pair."""
    if privacy is None:
        yield optimizer, _shuffled_stream(examples, cfg, tokenizer, seed)
        return
    with privacy.session(model, optimizer, examples, tokenizer, seed) as private:
        yield private


def _state_keys(model) -> dict[torch.nn.Parameter, str]:
    """Trainable parameter -> its key in the adapter state (PEFT names, adapter-free)."""
    by_pointer = {t.data_ptr(): k for k, t in
                  get_peft_model_state_dict(model, adapter_name=model.active_adapter).items()}
    keys = {p: by_pointer.get(p.data_ptr()) for p in model.parameters() if p.requires_grad}
    if None in keys.values():
        raise RuntimeError("a trainable parameter is not part of the adapter state")
    return keys


def compute_gradient(model, tokenizer, examples: Examples, cfg: RunConfig, batches_: int,
                     seed: int, objective=None, tag: str = "", what: str = "task",
                     privacy=None) -> tuple[State, dict]:
    """Mean gradient over `batches_` batches of the task loss, or of `objective(logits,
    labels)` (S4's unlearning loss), w.r.t. the trainable parameters (as a state: same keys).

    With `privacy` each batch's gradient is Opacus's clipped + noised one (DP optimizer
    pre_step: the same release as a DP-SGD step, counted by the accountant; no update).
    """
    keys = _state_keys(model)
    sums = {p: torch.zeros_like(p) for p in keys}
    torch.manual_seed(seed)
    model.train()
    start = time.perf_counter()
    dummy = torch.optim.SGD(list(keys), lr=0.0)  # never stepped: Opacus needs an optimizer
    steps = batches_ if privacy is None else privacy.steps_left(batches_)
    loss_fn = task_loss(model, cfg) if objective is None else \
        logits_loss(model, cfg, objective)
    with _batch_source(model, dummy, examples, tokenizer, cfg, seed, privacy) as (
            optimizer, next_batch):
        parts = run_steps(steps, next_batch, loss_fn, optimizer, tag, str, accumulate=sums,
                          private=privacy is not None, release=releaser(cfg))
        optimizer.zero_grad(set_to_none=True)
    losses = [p["loss"] for p in parts]
    count = max(len(losses), 1)
    grads = {keys[p]: (s / count).detach().float().cpu().numpy() for p, s in sums.items()}
    metrics = {"loss": float(np.mean(losses)) if losses else math.nan,
               "batches": len(losses), "grad_s": time.perf_counter() - start}
    if tag:
        log.info("%s %s gradient over %d batches, loss %.4f", tag, what, len(losses),
                 metrics["loss"])
    return grads, metrics | _privacy_report(privacy, len(losses) < batches_)


@torch.no_grad()
def evaluate(model, tokenizer, examples: Examples, cfg: RunConfig,
             progress: bool = False) -> dict[str, float]:
    """Accuracy and mean loss: per example for classification (label-likelihood accuracy
    for `lm-cls`), per response token for `causal-lm` (plus its perplexity, and GSM8K's
    exact match on greedy answers when `eval.metric` asks for it). `progress`: a tqdm bar
    of the examples scored, on stderr (`edge-lam evaluate`)."""
    from tqdm.auto import tqdm

    device = torch_device()
    model.eval()
    fam = family(cfg)
    loss_sum, correct, count = 0.0, 0, 0
    # longest first, so each batch pads to texts of about its own length (sums are the same;
    # generation below keeps the original order)
    length = [len(t) + (len(examples.responses[i]) if examples.responses else 0)
              for i, t in enumerate(examples.texts)]
    by_length = examples.subset(sorted(range(len(examples)), key=lambda i: -length[i]))
    bar = tqdm(total=len(examples), desc="evaluate", unit="example", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for chunk in batches(by_length, cfg.eval.batch_size):
        batch = {k: v.to(device) for k, v in encode_batch(tokenizer, chunk, cfg).items()}
        batch_loss, batch_correct, batch_count = (
            score_responses(model, batch) if fam.generates else score(*fam.outputs(model,
                                                                                  batch)))
        loss_sum, correct, count = loss_sum + batch_loss, correct + batch_correct, \
            count + batch_count
        bar.update(len(chunk))
    bar.close()
    if count == 0:
        return {"accuracy": math.nan, "loss": math.nan, "examples": len(examples)}
    out = {"accuracy": correct / count, "loss": loss_sum / count, "examples": len(examples)}
    if not fam.labelled:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        if eval_metric(cfg, examples) == "exact-match":
            from edge_lam.serving.generation import exact_match

            out |= exact_match(model, tokenizer, examples, cfg)
    return out


def eval_metric(cfg: RunConfig, examples: Examples) -> str:
    """`eval.metric` resolved for these examples ('auto': exact-match on GSM8K-like data)."""
    if cfg.eval.metric != "auto":
        return cfg.eval.metric
    from edge_lam.serving.generation import has_final_numbers

    return "exact-match" if has_final_numbers(examples.responses) else "nll"
