"""Greedy answers from a causal LM, and GSM8K's exact-match metric on them.

Prompts are posed exactly as in training (`edge_lam.data.encode.pose`: chat template, plain
'### Instruction' format, or raw), left-padded in batches, and answered greedily.
GSM8K's metric: the number after '####' in the model's answer (else its last number) equals
the number after '####' in the reference.
"""

from __future__ import annotations

import math
import re

import torch
from transformers import LogitsProcessor

from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import pose
from edge_lam.data.text import Examples
from edge_lam.models.lora_model import torch_device

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> str | None:
    """The answer's number, normalised ('1,234.50' -> '1234.5'): the one after '####', else
    the last number in the text; None when there is none."""
    hit = _FINAL.search(text)
    raw = hit.group(1) if hit else (_NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    raw = raw.replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def has_final_numbers(responses: list[str], share: float = 0.9) -> bool:
    """Whether the references look like GSM8K's ('#### <number>' in at least `share`)."""
    return bool(responses) and sum(bool(_FINAL.search(r)) for r in responses) >= \
        share * len(responses)


@torch.no_grad()
def answers(model, tokenizer, cfg: RunConfig, prompts: list[str], max_new_tokens: int,
            batch_size: int = 16) -> list[str]:
    """Greedy answers to `prompts`, posed as in training (`data.format`)."""
    return [text for text, _ in scored_answers(model, tokenizer, cfg, prompts, max_new_tokens,
                                               batch_size, logprobs=False)]


@torch.no_grad()
def scored_answers(model, tokenizer, cfg: RunConfig, prompts: list[str], max_new_tokens: int,
                   batch_size: int = 16, logprobs: bool = True
                   ) -> list[tuple[str, list[float]]]:
    """Greedy answers to `prompts` with each generated token's log-probability (up to and
    including the end-of-sequence token; none with `logprobs=False`)."""
    device = torch_device()
    model.eval()
    out: list[tuple[str, list[float]]] = []
    pad = tokenizer.pad_token_id
    stop = _stop_ids(model, tokenizer)
    for start in range(0, len(prompts), batch_size):
        rows = [pose(tokenizer, cfg, p) for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            device=device)
        chosen = _ChosenLogProb()
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad,
                                   logits_processor=[chosen] if logprobs else None)
        new = generated[:, width:]
        if logprobs:
            token_lp = torch.stack(chosen.steps, dim=1).cpu()  # (B, new tokens)
        for r in range(len(rows)):
            ended = [i for i, t in enumerate(new[r].tolist()) if t in stop]
            length = ended[0] + 1 if ended else new.shape[1]
            out.append((tokenizer.decode(new[r, :length], skip_special_tokens=True),
                        token_lp[r, :length].tolist() if logprobs else []))
    return out


class _ChosenLogProb(LogitsProcessor):
    """Records, at each greedy step, the log-probability of the token greedy decoding picks
    (the top one: max - logsumexp of the final scores; it runs after every other processor)
    without keeping the (batch x vocabulary) scores of every step, 33 GB for Gemma's 262k
    vocabulary at 125 x 256 tokens."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = scores.float()
        self.steps.append(s.max(dim=-1).values - torch.logsumexp(s, dim=-1))
        return scores


def _stop_ids(model, tokenizer) -> set[int]:
    """The token ids that end an answer (the generation config's and the tokenizer's EOS)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def answer_key(text: str, numeric: bool) -> str | None:
    """What two answers must share to count as the same: the final number (GSM8K-style
    references), else the whitespace-normalised, lower-cased text (None: no answer)."""
    if numeric:
        return final_number(text)
    key = " ".join(text.split()).lower()
    return key or None


def exact_match(model, tokenizer, examples: Examples, cfg: RunConfig) -> dict[str, float]:
    """GSM8K accuracy: share of `eval.generate-examples` test pairs (0 = all) whose greedy
    answer's final number equals the reference's; also the mean answer length in tokens."""
    n = cfg.eval.generate_examples or len(examples)
    subset = examples.subset(range(min(n, len(examples))))
    replies = answers(model, tokenizer, cfg, subset.texts, cfg.eval.max_new_tokens,
                      cfg.eval.batch_size)
    got = [final_number(a) for a in replies]
    hits = [g is not None and g == final_number(r) for g, r in zip(got, subset.responses)]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in replies]
    return {"exact_match": sum(hits) / len(hits) if hits else math.nan,
            "generated": len(hits),
            "answer_tokens": sum(lengths) / len(lengths) if lengths else math.nan}
