"""Local training, gradient and evaluation loops (task loss; S4 unlearning losses; Opacus DP)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np
import torch

from peft import get_peft_model_state_dict

from strategies.unlearning import bounded_ce_loss, fedosd_unlearning_loss
from task.config import RunConfig
from task.data import Examples, batches, encode_batch, endless_batches
from task.lora import State
from task.model import torch_device
from task.logs import get_logger

log = get_logger()


def _shuffled_stream(examples: Examples, cfg: RunConfig, tokenizer, seed: int):
    """next_batch(): shuffled batches on the model's device, reshuffling after each pass."""
    device = torch_device()
    stream = endless_batches(examples, cfg.batch_size, np.random.default_rng(seed))

    def next_batch() -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in encode_batch(tokenizer, next(stream), cfg).items()}

    return next_batch


def train_local(model, tokenizer, examples: Examples, cfg: RunConfig, seed: int,
                tag: str = "", privacy=None) -> dict[str, float]:
    """`cfg.local_steps` AdamW steps on shuffled batches (cycling the data as needed).

    With `privacy` (task.privacy.DevicePrivacy) every step is an Opacus DP-SGD step on a
    Poisson batch, and training stops early, flagged `budget_exhausted`, before a step that
    would spend more than dp.target-epsilon. Returns mean train loss, steps taken, pure
    training seconds (and the privacy report).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    log_every = max(1, cfg.local_steps // 4)
    steps = cfg.local_steps if privacy is None else privacy.steps_left(cfg.local_steps)
    with _batch_source(model, optimizer, examples, tokenizer, cfg, seed, privacy) as (
            optimizer, next_batch):
        for step in range(1, steps + 1):
            loss = model(**next_batch()).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag} local loss became {loss.item()} at step "
                                         f"{step}: lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % log_every == 0 or step == cfg.local_steps:
                log.info("%s step %d/%d loss %.4f", tag, step, cfg.local_steps, loss.item())
    out = {"train_loss": float(np.mean(losses)) if losses else math.nan,
           "steps": len(losses), "train_s": time.perf_counter() - start}
    return out | _privacy_report(privacy, len(losses) < cfg.local_steps)


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


# --------------------------------------------------------------------------- S4 gradients
def unlearning_objective(logits: torch.Tensor, labels: torch.Tensor,
                         cfg: RunConfig) -> torch.Tensor:
    """S4 loss an opting-out device *descends* to forget: FedOSD's -log(1 - p_y / 2), or
    the bounded cross-entropy ascended, i.e. log(max(p_y, eps)) (no gradient once p_y < eps,
    so nothing explodes)."""
    if cfg.unlearn_loss == "fedosd":
        return fedosd_unlearning_loss(logits, labels)
    return -bounded_ce_loss(logits, labels, eps=cfg.unlearn_eps)


def _state_keys(model) -> dict[torch.nn.Parameter, str]:
    """Trainable parameter -> its key in the adapter state (PEFT names, adapter-free)."""
    by_pointer = {t.data_ptr(): k for k, t in
                  get_peft_model_state_dict(model, adapter_name=model.active_adapter).items()}
    keys = {p: by_pointer.get(p.data_ptr()) for p in model.parameters() if p.requires_grad}
    if None in keys.values():
        raise RuntimeError("a trainable parameter is not part of the adapter state")
    return keys


def compute_gradient(model, tokenizer, examples: Examples, cfg: RunConfig, objective: str,
                     seed: int, tag: str = "", privacy=None) -> tuple[State, dict]:
    """S4 step 1 on a device: mean gradient of `objective` ('task' = cross-entropy of the
    remaining devices, 'unlearn' = `unlearning_objective` of the opting-out ones) over
    `unlearn.grad-batches` batches, w.r.t. the shared trainable parameters (state keys).

    With `privacy` each batch's gradient is Opacus's clipped + noised one (DP optimizer
    pre_step: the same release as a DP-SGD step, counted by the accountant; no update).
    """
    if objective not in ("task", "unlearn"):
        raise ValueError(f"objective must be 'task' or 'unlearn', got {objective!r}")
    keys = _state_keys(model)
    sums = {p: torch.zeros_like(p) for p in keys}
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    dummy = torch.optim.SGD(list(keys), lr=0.0)  # never stepped: Opacus needs an optimizer
    wanted = cfg.unlearn_grad_batches
    steps = wanted if privacy is None else privacy.steps_left(wanted)
    with _batch_source(model, dummy, examples, tokenizer, cfg, seed, privacy) as (
            optimizer, next_batch):
        for _ in range(steps):
            batch = next_batch()
            if objective == "task":
                loss = model(**batch).loss
            else:
                labels = batch.pop("labels")
                loss = unlearning_objective(model(**batch).logits.float(), labels, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if privacy is not None:
                optimizer.pre_step()  # clip per example, add noise, count the release
            for p in keys:
                if p.grad is not None:
                    sums[p] += p.grad
            losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
    count = max(len(losses), 1)
    grads = {keys[p]: (s / count).detach().float().cpu().numpy() for p, s in sums.items()}
    metrics = {"loss": float(np.mean(losses)) if losses else math.nan,
               "batches": len(losses), "grad_s": time.perf_counter() - start}
    if tag:
        log.info("%s %s gradient over %d batches, loss %.4f", tag, objective, len(losses),
                 metrics["loss"])
    return grads, metrics | _privacy_report(privacy, len(losses) < cfg.unlearn_grad_batches)


@torch.no_grad()
def evaluate(model, tokenizer, examples: Examples, cfg: RunConfig) -> dict[str, float]:
    """Accuracy and mean loss: per example for classification, per response token for LM."""
    device = torch_device()
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for chunk in batches(examples, cfg.eval_batch_size):
        batch = {k: v.to(device) for k, v in encode_batch(tokenizer, chunk, cfg).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if logits.dim() == 2:  # classification: one label per example
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
        else:  # causal LM: token t predicts token t+1, response tokens only
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(
                logits[mask], labels[mask], reduction="sum").item()
            correct += (logits.argmax(-1)[mask] == labels[mask]).sum().item()
            count += mask.sum().item()
    if count == 0:
        return {"accuracy": math.nan, "loss": math.nan, "examples": len(examples)}
    return {"accuracy": correct / count, "loss": loss_sum / count, "examples": len(examples)}
