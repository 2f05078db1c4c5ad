"""A device answering queries with its own model (`mode='infer'`): label probabilities.

A member is a model (`model`: hub id, folder, `.gguf` or known name) and optionally a saved
edge-lam adapter fine-tuned from it (`results/<run-id>/adapter`, base delta included). It
scores each query posed as the run's `data.template`, over the label words, as `task='lm-cls'`
evaluation does, and returns (Q, K) probabilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from task.config import ConfigError, RunConfig
from task.data import Examples, batches, encode_batch
from task.families import family
from task.logs import get_logger
from task.model import (get_lora_model, initial_lora_state, load_tokenizer,
                        resolve_model_source, set_trainable_state, torch_device)

log = get_logger()


@dataclass(frozen=True)
class Member:
    """Which model (and adapter) answers on this device."""

    model: str
    adapter: str = ""

    @classmethod
    def parse(cls, spec: str) -> Member:
        """`<model>` or `<model>+<adapter folder>`."""
        model, _, adapter = spec.partition("+")
        if not model.strip():
            raise ConfigError(f"infer.members item '{spec}' names no model: use <model> or "
                              "<model>+<saved adapter folder>")
        return cls(model.strip(), adapter.strip())

    @property
    def name(self) -> str:
        return f"{self.model}+{Path(self.adapter).parent.name or self.adapter}" \
            if self.adapter else self.model


def member_of(cfg: RunConfig, node_config, partition_id: int) -> Member:
    """A device's --node-config `model`/`adapter` first, else infer.members by partition id,
    else the run's model."""
    if node_config.get("model") or node_config.get("adapter"):
        return Member(str(node_config.get("model") or cfg.model),
                      str(node_config.get("adapter", "")))
    if cfg.infer.members:
        return Member.parse(cfg.infer.members[max(partition_id, 0) % len(cfg.infer.members)])
    return Member(cfg.model)


def member_config(cfg: RunConfig, member: Member) -> tuple[RunConfig, dict | None]:
    """The run config this member scores with (its model; an adapter's own model, LoRA
    targets and ranks) and the adapter's state (None: the base model alone)."""
    if not member.adapter:
        return cfg.updated(model=member.model, task="lm-cls"), None
    from task.cli import load_adapter

    saved, _, state = load_adapter(Path(member.adapter).expanduser())
    if saved.task != "lm-cls":
        raise ConfigError(f"adapter {member.adapter} was trained for task='{saved.task}': "
                          "collaborative inference scores labels, it needs an lm-cls adapter")
    mine = saved.updated(seed=cfg.seed).updated("data", template=cfg.data.template,
                                                    label_words=cfg.data.label_words)
    return mine, state


def label_probabilities(cfg: RunConfig, member: Member, texts: list[str],
                        label_names: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """(Q, K) probabilities of the label words after each prompt, and the cost: seconds
    (model loading excluded: once per process) and prompt tokens."""
    mcfg, state = member_config(cfg, member)
    from task.lora import lora_rank

    rank = lora_rank(state) if state is not None else mcfg.r_max
    model = get_lora_model(mcfg, label_names, rank)
    set_trainable_state(model, state if state is not None else
                        initial_lora_state(mcfg, label_names, rank))  # B = 0: the base model
    tokenizer = load_tokenizer(resolve_model_source(mcfg.model))
    examples = Examples(list(texts), [0] * len(texts), [], label_names)
    model.eval()
    out, tokens = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in batches(examples, mcfg.eval.batch_size):
            batch = {k: v.to(torch_device()) for k, v in encode_batch(tokenizer, chunk,
                                                                       mcfg).items()}
            tokens += int(batch["attention_mask"].sum())
            logits, _ = family(mcfg).outputs(model, batch)  # (B, K)
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    return np.concatenate(out), {"seconds": time.perf_counter() - start, "tokens": tokens}


def attacked(probs: np.ndarray, attack: str, rng: np.random.Generator) -> np.ndarray:
    """What an adversarial member sends instead: certainty on a label other than its own best
    (`wrong`), or on a random label (`random`)."""
    q, k = probs.shape
    if attack == "wrong":
        labels = (probs.argmax(axis=1) + rng.integers(1, k, size=q)) % k
    elif attack == "random":
        labels = rng.integers(0, k, size=q)
    else:
        return probs
    out = np.zeros_like(probs)
    out[np.arange(q), labels] = 1.0
    return out
