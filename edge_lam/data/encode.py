"""Examples into token batches: label words' token ids, prompts posed as in training (chat
template, plain '### Response:' or raw), prompt/response pairs cut to fit (the prompt's middle
first) and right-padded, and shuffled batches."""

from __future__ import annotations

import numpy as np
import torch

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import PLAIN_PROMPT, Examples
from edge_lam.logs import get_logger
from edge_lam.models.families import family

log = get_logger()


def label_token_ids(tokenizer, cfg: RunConfig, label_names: tuple[str, ...]) -> list[int]:
    """`task='lm-cls'`: the first token of each label word (with its leading space), which
    the model scores right after the prompt; they must differ."""
    words = cfg.data.label_words or label_names
    if len(words) != len(label_names):
        raise ConfigError(f"data.label-words lists {len(words)} words for {len(label_names)} "
                          f"labels {list(label_names)}: give one word per label, in that order")
    ids = [_first_token(tokenizer, w.strip()) for w in words]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"data.label-words {list(words)} do not all start with different "
                          "tokens: pick words whose first token differs")
    return ids

def _first_token(tokenizer, word: str) -> int:
    """The first token of " word" that is not whitespace alone (some SentencePiece
    tokenizers encode the leading space as a token of its own)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    while len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids[0]

def encode_batch(tokenizer, examples: Examples, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Tokenize a list of examples into one padded batch with `labels`."""
    if family(cfg).label_words:  # the prompt; the label words' first tokens to score
        prompts = tokenizer([cfg.data.template.format(text=t) for t in examples.texts])
        batch = _right_padded([cut_middle(ids, token_limit(cfg))
                               for ids in prompts["input_ids"]], tokenizer.pad_token_id)
        batch["labels"] = torch.tensor(examples.labels, dtype=torch.long)
        batch["label_token_ids"] = torch.tensor(
            label_token_ids(tokenizer, cfg, examples.label_names), dtype=torch.long)
        return batch
    if not examples.responses:
        batch = tokenizer(examples.texts, truncation=True, padding=True, return_tensors="pt",
                          max_length=cfg.train.max_length or None)
        batch["labels"] = torch.tensor(examples.labels, dtype=torch.long)
        return dict(batch)
    return encode_pairs(tokenizer, examples.texts, examples.responses, cfg)

def token_limit(cfg: RunConfig) -> int:
    """`train.max-length`; 0 (from the data, where `budgeted` has not resolved it) cuts
    nothing."""
    return cfg.train.max_length or 1 << 30


def prompt_format(tokenizer, cfg: RunConfig) -> str:
    """`data.format` resolved: 'auto' is 'chat' when the tokenizer has a chat template."""
    wanted = cfg.data.format
    if wanted == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if wanted == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.format='chat' but {cfg.model} has no chat template (a base "
                          "model): use data.format='plain' or 'auto'")
    return wanted

def pose(tokenizer, cfg: RunConfig, prompt: str) -> list[int]:
    """The token ids of `prompt` as the model is asked it (`data.format`), ending where the
    answer starts: a chat template's assistant turn, or '### Response:'."""
    fmt = prompt_format(tokenizer, cfg)
    if fmt == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = PLAIN_PROMPT.format(prompt=prompt) if fmt == "plain" else prompt + "\n"
    return tokenizer(text, add_special_tokens=True)["input_ids"]

def cut_middle(ids: list[int], length: int) -> list[int]:
    """`ids` cut to `length` tokens by dropping its middle: the first quarter of the budget
    (the instruction) and the end (the question, 'Answer:', an assistant turn) stay."""
    if len(ids) <= length:
        return ids
    head = length // 4
    return ids[:head] + ids[len(ids) - (length - head):]

def _right_padded(rows: list[list[int]], pad: int, labels: list[list[int]] | None = None
                  ) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
           "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r))
                                           for r in rows])}
    if labels is not None:
        out["labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return out

def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a (prompt, response) pair to `max_length` tokens without ever losing the whole
    response: the response keeps at least half the budget (all of it if shorter) and is cut at
    its end; the prompt gives up its middle, keeping its first quarter and its end (where the
    question and the assistant turn's header are)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
    return cut_middle(prompt, max_length - keep_response), response[:keep_response]

def pair_lengths(tokenizer, examples: Examples, cfg: RunConfig) -> np.ndarray:
    """Tokens of each prompt/response pair as trained (posed prompt + response + EOS)."""
    eos = tokenizer.eos_token or ""
    responses = tokenizer([r + eos for r in examples.responses],
                          add_special_tokens=False)["input_ids"]
    return np.array([len(pose(tokenizer, cfg, p)) + len(r)
                     for p, r in zip(examples.texts, responses)], dtype=np.int64)


LENGTH_QUANTILE = 0.95  # train.max-length=0: the budget covers this share of the pairs


def length_budget(lengths: np.ndarray, quantile: float = LENGTH_QUANTILE) -> int:
    """A budget from the data: the `quantile` of the pair lengths, rounded up to 8 tokens."""
    return int(-(-int(np.ceil(np.quantile(lengths, quantile))) // 8) * 8)


_BUDGETS: dict[tuple, int] = {}


def budgeted(cfg: RunConfig, tokenizer, examples: Examples, where: str,
             quantile: float = LENGTH_QUANTILE) -> RunConfig:
    """`cfg` with `train.max-length` resolved for these prompt/response pairs: 0 takes the
    `quantile` of their lengths (1.0 for an evaluation set: nothing cut). Logs a warning that
    says how many pairs the budget cuts, and what to set instead; once per process for the
    same data and budget. Other tasks: `cfg` unchanged."""
    if family(cfg).labelled or not examples.responses:
        return cfg
    key = (cfg.model, cfg.data.format, cfg.train.max_length, where, len(examples),
           examples.texts[0], examples.texts[-1], quantile)
    if key not in _BUDGETS:
        lengths = pair_lengths(tokenizer, examples, cfg)
        budget = cfg.train.max_length or length_budget(lengths, quantile)
        cut = int((lengths > budget).sum())
        stats = (f"{where}: {len(lengths)} prompt/response pairs of median "
                 f"{int(np.median(lengths))}, p95 {int(np.quantile(lengths, 0.95))}, longest "
                 f"{int(lengths.max())} tokens as posed")
        if cfg.train.max_length == 0:
            log.info("%s; train.max-length=0: a budget of %d tokens from the data, %d cut",
                     stats, budget, cut)
        elif cut:
            log.warning("%s: train.max-length=%d cuts %d of them (%.0f%%; the answer keeps at "
                        "least half the budget, the prompt loses its middle). Set "
                        "train.max-length=%d (this data's p95) or 0 (taken from the data).",
                        stats, budget, cut, 100 * cut / len(lengths), length_budget(lengths))
        _BUDGETS[key] = budget
    budget = _BUDGETS[key]
    return cfg if budget == cfg.train.max_length else cfg.updated("train", max_length=budget)


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], cfg: RunConfig
                 ) -> dict[str, torch.Tensor]:
    """Prompt/response pairs as one right-padded batch; labels are -100 except on the
    response tokens (and the end-of-sequence token that closes each response)."""
    eos = tokenizer.eos_token or ""
    rows, labels = [], []
    for prompt, response in zip(prompts, responses):
        p = pose(tokenizer, cfg, prompt)
        r = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        p, r = fit(p, r, token_limit(cfg))
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    return _right_padded(rows, tokenizer.pad_token_id, labels)

def batches(examples: Examples, batch_size: int, rng: np.random.Generator | None = None):
    """Yield Examples chunks; shuffled when rng is given."""
    order = rng.permutation(len(examples)) if rng is not None else np.arange(len(examples))
    for start in range(0, len(order), batch_size):
        yield examples.subset(order[start:start + batch_size])

def endless_batches(examples: Examples, batch_size: int, rng: np.random.Generator):
    """Shuffled chunks without end: a new shuffle after every pass over the data."""
    if len(examples) == 0:
        raise ValueError("no examples to train on")
    while True:
        yield from batches(examples, batch_size, rng)
