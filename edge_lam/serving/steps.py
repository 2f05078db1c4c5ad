"""Continuing a reasoning chain from its text, one step at a time (S8 CoT micro-services).

A step's device gets the question and the chain so far as text. It poses the question as in
training (`edge_lam.data.encode.pose`: chat template, '### Response:' or raw) and appends the chain's
tokens as the assistant's partial answer, then generates at most `max_new_tokens` greedy
tokens. With an empty chain this is exactly `edge_lam.serving.generation.scored_answers`' prompt, so a
one-step chain is the monolithic answer; later steps re-tokenise the text they are given,
which can split a word differently from the tokens that produced it (the only way a chain of
greedy steps can differ from one greedy generation).

Also here: when a chain is finished (`chain_done`), and what one step costs on this device
(`measure_costs`: a linear model of prefill and decoding seconds, parameter and KV bytes).
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass

import torch

from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import pose
from edge_lam.models.lora_model import torch_device

# '#### <number>' followed by whitespace: the number cannot grow in a later step
FINAL_COMPLETE = re.compile(r"####\s*-?[\d,]*\.?\d+\.?\s")


@dataclass(frozen=True)
class Step:
    text: str  # the step's new text, to append to the chain
    new_tokens: int  # generated tokens (EOS included where it ended)
    context_tokens: int  # question posed + chain so far, in tokens
    ended: bool  # the model emitted end-of-sequence


def chain_done(chain: str, ended: bool) -> bool:
    """The chain is finished: the model ended it, or it states a complete final answer."""
    return ended or FINAL_COMPLETE.search(chain) is not None


def chain_ids(tokenizer, chain: str) -> list[int]:
    """The chain so far as tokens (none for an empty chain)."""
    return tokenizer(chain, add_special_tokens=False)["input_ids"] if chain else []


def stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def continue_chains(model, tokenizer, cfg: RunConfig, questions: list[str], chains: list[str],
                    max_new_tokens: int, batch_size: int = 16) -> list[Step]:
    """One greedy step of at most `max_new_tokens` for each (question, chain so far)."""
    model.eval()
    device, pad, stop = torch_device(), tokenizer.pad_token_id, stop_ids(model, tokenizer)
    out: list[Step] = []
    for start in range(0, len(questions), batch_size):
        told = [chain_ids(tokenizer, c) for c in chains[start:start + batch_size]]
        rows = [pose(tokenizer, cfg, q) + c  # question posed, then the chain so far
                for q, c in zip(questions[start:start + batch_size], told)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            device=device)
        new = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)[:, width:]
        for r in range(len(rows)):
            tokens = new[r].tolist()
            ended = next((i for i, t in enumerate(tokens) if t in stop), None)
            length = ended + 1 if ended is not None else len(tokens)
            out.append(Step(_new_text(tokenizer, told[r], tokens[:length]), length,
                            len(rows[r]), ended is not None))
    return out


def _new_text(tokenizer, chain: list[int], new: list[int]) -> str:
    """The text `new` adds after the chain's tokens (decoded together, so a word that
    starts in this step keeps the space before it); alone for the first step."""
    alone = tokenizer.decode(new, skip_special_tokens=True)
    if not chain:
        return alone
    before = tokenizer.decode(chain, skip_special_tokens=True)
    after = tokenizer.decode(chain + new, skip_special_tokens=True)
    return after[len(before):] if after.startswith(before) else alone


def peak_memory_bytes() -> int:
    """The accelerator's peak allocation, else this process's peak resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


@torch.no_grad()
def measure_costs(model, tokenizer, cfg: RunConfig, question: str, decode_tokens: int = 16,
                  repeats: int = 2) -> dict[str, float]:
    """Seconds of one step here, seconds(L, n) = prefill_s + prefill_per_token_s * L +
    decode_per_token_s * (n - 1) (context L tokens, n new: the prefill yields the first),
    fitted from two prefills and one forced decode; the model's parameter bytes and
    KV-cache bytes per context token."""
    model.eval()
    device = torch_device()
    short = pose(tokenizer, cfg, question)
    long = pose(tokenizer, cfg, " ".join([question] * 4))

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def forward(ids: list[int]):  # as generation's prefill: logits of the last token only
        return model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1)

    prefill = [best_of(lambda ids=ids: forward(ids)) for ids in (short, long)]
    per_token = (prefill[1] - prefill[0]) / max(len(long) - len(short), 1)
    ids = torch.tensor([short], device=device)
    gen = best_of(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         do_sample=False, max_new_tokens=decode_tokens,
                                         min_new_tokens=decode_tokens,
                                         pad_token_id=tokenizer.pad_token_id))
    return {"prefill_s": max(prefill[0] - per_token * len(short), 0.0),
            "prefill_per_token_s": max(per_token, 0.0),
            "decode_per_token_s": max(gen - prefill[0], 0.0) / max(decode_tokens - 1, 1),
            "param_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters())),
            "kv_bytes_per_token": float(kv_bytes_per_token(model))}


def kv_bytes_per_token(model) -> int:
    """Keys and values of one token over all layers: 2 x layers x KV heads x head dim x
    element bytes."""
    conf = model.config
    conf = getattr(conf, "text_config", None) or conf
    heads = getattr(conf, "num_key_value_heads", None) or conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * conf.num_hidden_layers * heads * head_dim * element
