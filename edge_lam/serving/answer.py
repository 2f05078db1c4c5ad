"""A device answering queries with its own model (`mode='infer'`).

A member is a model (`model`: hub id, folder, `.gguf` or known name) and optionally a saved
edge-lam adapter fine-tuned from it (`results/<run-id>/adapter`, base delta included).
- `task='lm-cls'`: it scores each query posed as the run's `data.template`, over the label
  words, as evaluation does, and returns (Q, K) probabilities (`label_probabilities`).
- `task='causal-lm'`: it answers each prompt greedily, posed as in training (`data.format`),
  and returns the text with each generated token's log-probability (`generated_answers`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.encode import batches, encode_batch
from edge_lam.data.text import Examples
from edge_lam.models.families import family
from edge_lam.logs import get_logger
from edge_lam.models.lora_model import (get_lora_model, initial_lora_state, load_tokenizer,
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
        return cfg.updated(model=member.model), None
    from edge_lam.training.evaluation import load_adapter

    saved, _, state = load_adapter(Path(member.adapter).expanduser())
    if saved.task != cfg.task:
        raise ConfigError(f"adapter {member.adapter} was trained for task='{saved.task}' but "
                          f"this inference job is task='{cfg.task}': give this device an "
                          f"adapter trained for '{cfg.task}'")
    mine = saved.updated(seed=cfg.seed).updated("data", template=cfg.data.template,
                                                    label_words=cfg.data.label_words,
                                                    format=cfg.data.format)
    return mine, state


def _member_model(cfg: RunConfig, member: Member, label_names: tuple[str, ...]):
    """This member's model (its adapter set, or B = 0: the base alone), tokenizer, config."""
    mcfg, state = member_config(cfg, member)
    from edge_lam.training.lora import lora_rank

    rank = lora_rank(state) if state is not None else mcfg.r_max
    model = get_lora_model(mcfg, label_names, rank)
    set_trainable_state(model, state if state is not None else
                        initial_lora_state(mcfg, label_names, rank))
    return model, load_tokenizer(resolve_model_source(mcfg.model)), mcfg


def label_probabilities(cfg: RunConfig, member: Member, texts: list[str],
                        label_names: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """(Q, K) probabilities of the label words after each prompt, and the cost: seconds
    (model loading excluded: once per process) and prompt tokens."""
    model, tokenizer, mcfg = _member_model(cfg, member, label_names)
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


def generated_answers(cfg: RunConfig, member: Member, prompts: list[str]
                      ) -> tuple[list[str], list[list[float]], dict]:
    """Greedy answers (at most eval.max-new-tokens each), each generated token's
    log-probability, and the cost: seconds (model loading excluded), prompt and generated
    tokens."""
    from edge_lam.serving.generation import scored_answers

    model, tokenizer, mcfg = _member_model(cfg, member, ())
    start = time.perf_counter()
    out = scored_answers(model, tokenizer, mcfg, list(prompts), cfg.eval.max_new_tokens,
                         cfg.infer.batch_size)
    seconds = time.perf_counter() - start
    from edge_lam.data.encode import pose

    prompt_tokens = sum(len(pose(tokenizer, mcfg, p)) for p in prompts)
    return [t for t, _ in out], [lp for _, lp in out], {
        "seconds": seconds, "tokens": prompt_tokens,
        "generated_tokens": sum(len(lp) for _, lp in out)}


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


def attacked_answers(texts: list[str], logprobs: list[list[float]], attack: str,
                     shared: np.random.Generator, own: np.random.Generator
                     ) -> tuple[list[str], list[list[float]]]:
    """What an adversarial member generates instead, with full confidence (log-probability
    0): `wrong` colludes (every attacker sends the same number, drawn from `shared`, seeded
    alike on every attacking device); `random` draws its own number per query."""
    if attack not in ("wrong", "random"):
        return texts, logprobs
    rng = shared if attack == "wrong" else own
    numbers = rng.integers(1_000, 1_000_000, size=len(texts))
    return [f"#### {n}" for n in numbers], [[0.0] * 3 for _ in texts]
