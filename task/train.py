"""Local training and evaluation loops (task loss)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from task.config import RunConfig
from task.data import Examples, batches, encode_batch
from task.model import torch_device
from task.logs import get_logger

log = get_logger()


def train_local(model, tokenizer, examples: Examples, cfg: RunConfig, seed: int,
                tag: str = "") -> dict[str, float]:
    """`cfg.local_steps` AdamW steps on shuffled batches (cycling the data as needed).

    Returns mean train loss, number of steps and pure training seconds.
    """
    device = torch_device()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    log_every = max(1, cfg.local_steps // 4)
    stream = batches(examples, cfg.batch_size, rng)
    for step in range(1, cfg.local_steps + 1):
        chunk = next(stream, None)
        if chunk is None:  # one pass done: reshuffle and go on
            stream = batches(examples, cfg.batch_size, rng)
            chunk = next(stream)
        batch = {k: v.to(device) for k, v in encode_batch(tokenizer, chunk, cfg).items()}
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{tag} local loss became {loss.item()} at step {step}: "
                                     "lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == cfg.local_steps:
            log.info("%s step %d/%d loss %.4f", tag, step, cfg.local_steps, loss.item())
    return {"train_loss": float(np.mean(losses)), "steps": cfg.local_steps,
            "train_s": time.perf_counter() - start}


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
