"""Model families, by `task` key: how a family loads, what PEFT task it is, which columns its
data has, how a batch is encoded, and how evaluation scores it. The rest of the code asks
`family(cfg)` (and its fields: `labelled`, `generates`, `label_words`, `lm_head`) instead of
branching on the task's name; a new family is one `Family` registered in FAMILIES (a
`edge_lam.config.registry.Registry`, kind "family"; a third-party one through the `edge_lam.family`
entry points).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import TaskType

from edge_lam.config.registry import registry


# The classification heads of AutoModelForSequenceClassification (PEFT's SEQ_CLS
# `classifier_module_names`): a pretrained checkpoint never has one for our labels.
HEAD_MODULES = ("classifier", "score")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FreshHeadReport(logging.Filter):
    """Drops transformers' load report ("... LOAD REPORT ... MISSING: those params were newly
    initialized") when its only rows are the classification head's weights: the adapter
    brings the head, or training fits it. A report with any other row is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines()
                if line.count("|") >= 2]
        rows = [r for r in rows if r[0] not in ("Key", "") and set(r[0]) - set("-+")]
        return not rows or not all(status == "MISSING" and key.split(".")[0] in HEAD_MODULES
                                   for key, status, *_ in rows)


def _load_classifier(source: str, label_names: tuple[str, ...], dtype=torch.float32):
    from transformers import (AutoModelForSequenceClassification,
                              MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)

    from edge_lam.models.weights import load_pretrained

    reporter, quiet = logging.getLogger("transformers.modeling_utils"), FreshHeadReport()
    reporter.addFilter(quiet)
    try:
        return load_pretrained(
            AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
            source, dtype, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)})
    finally:
        reporter.removeFilter(quiet)


def _load_causal_lm(source: str, label_names: tuple[str, ...], dtype=torch.float32):
    """The LM with its weights read one tensor at a time into `dtype` (`edge_lam.models.weights`)."""
    from transformers import AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING

    from edge_lam.models.weights import load_pretrained

    return load_pretrained(AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING, source, dtype)


def _score_classes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(loss sum, correct, count) of N x K logits against N labels: one row per example
    (classes, label words) or per response token (next tokens)."""
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    return loss, (logits.argmax(-1) == labels).sum().item(), labels.numel()


def _lm_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """B x len(keep) x V: the LM's logits at sequence positions `keep` only (the full
    B x T x V tensor is never built when the model supports `logits_to_keep`)."""
    try:
        return model(**batch, logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep: all positions, then select
        return model(**batch).logits[:, keep]


def _model_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x C class logits, B labels) from a classification head."""
    labels = batch.pop("labels")
    return model(**batch).logits.float(), labels


def _response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(keep, mask, targets): position t predicts token t+1; `keep` lists the positions any
    row needs (a response token follows), `mask` (B x len(keep)) those of each row and
    `targets` the tokens they predict (B x len(keep))."""
    targets = labels[:, 1:]
    needed = targets != -100
    keep = needed.any(0).nonzero().squeeze(1)
    return keep, needed[:, keep], targets[:, keep]


def _response_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x V next-token logits, N targets) at the N response tokens of the batch (prompt and
    padding carry label -100): logits are computed at those positions only."""
    keep, mask, targets = _response_positions(batch.pop("labels"))
    return _lm_logits(model, batch, keep)[mask].float(), targets[mask]


def _label_word_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x C class logits, labels): the LM's next-token logits after the prompt, at the first
    token of each label word. Works with left or right padding; logits only at the prompts'
    last positions."""
    labels, words = batch.pop("labels"), batch.pop("label_token_ids")
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # the last real token of each prompt
    keep = torch.unique(last)  # sorted
    logits = _lm_logits(model, batch, keep)  # B x len(keep) x V
    column = torch.searchsorted(keep, last)
    return logits[torch.arange(len(last), device=last.device), column][:, words].float(), \
        labels


def _response_hidden(model, batch: dict):
    """(N x H decoder states at the positions that predict the N response tokens, the N
    targets, the vocabulary projection, its logit soft-cap or None)."""
    batch = dict(batch)
    keep, mask, targets = _response_positions(batch.pop("labels"))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(**batch).last_hidden_state[:, keep][mask]
    return (hidden, targets[mask], base.get_output_embeddings(),
            getattr(base.config, "final_logit_softcapping", None))


def chunked_response_loss(model, batch: dict, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens, the vocabulary projection done
    `chunk` tokens at a time and recomputed in the backward pass (activation checkpointing):
    at most chunk x V logits exist at once instead of N x V, same value and gradient."""
    from torch.utils.checkpoint import checkpoint

    hidden, targets, head, cap = _response_hidden(model, batch)

    def part(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        total = total + checkpoint(part, hidden[start:start + chunk],
                                   targets[start:start + chunk], use_reentrant=False)
    return total / max(len(targets), 1)


@dataclass(frozen=True)
class Family:
    name: str
    peft_task: TaskType
    load: Callable[..., torch.nn.Module]  # (source, label names, dtype) -> model
    labelled: bool  # examples carry class labels (text + label columns), else prompt/response
    # (N x K logits, N labels) of a batch: one row per example or per response token; every
    # loss (training, FedKD's distillation, S4's unlearning objectives) and score uses it
    outputs: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]
    min_labels: int = 0  # distinct labels the data must have
    label_words: bool = False  # a causal LM scoring label words after a prompt template
    targets: tuple[str, ...] = ("query", "value")  # LoRA targets of a typical model of it
    generates: bool = False  # answers are generated text (prompt/response data)
    lm_head: bool = False  # the model ends in the vocabulary projection (a causal LM)


# attention and MLP projections of Llama / Gemma / Qwen-style decoders
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES = registry("family", key="task")
FAMILIES.register("seq-cls", Family("seq-cls", TaskType.SEQ_CLS, _load_classifier,
                                    labelled=True, outputs=_model_outputs, min_labels=2))
# instruction tuning: prompt/response pairs, loss on the response tokens only
FAMILIES.register("causal-lm", Family(
    "causal-lm", TaskType.CAUSAL_LM, _load_causal_lm, labelled=False,
    outputs=_response_outputs, targets=LLM_TARGETS, generates=True, lm_head=True))
# classification posed to a causal LM as an instruction (data.template), answered by the
# most likely label word (data.label-words): accuracy by label-word likelihood
FAMILIES.register("lm-cls", Family(
    "lm-cls", TaskType.CAUSAL_LM, _load_causal_lm, labelled=True,
    outputs=_label_word_outputs, min_labels=2, label_words=True, targets=LLM_TARGETS,
    lm_head=True))


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Evaluation of one batch's outputs: (loss sum, correct, count)."""
    return _score_classes(logits, labels)


EVAL_CHUNK = 512  # response tokens whose logits exist at once when scoring (x V floats)


@torch.no_grad()
def score_responses(model, batch: dict, chunk: int = EVAL_CHUNK) -> tuple[float, int, int]:
    """`score` of a prompt/response batch, the vocabulary projection done `chunk` response
    tokens at a time: at most chunk x V logits exist at once. N x V at once is what ran a
    GPU out of memory at eval.batch-size 64 (64 answers of ~170 tokens x SmolLM2's 49,152
    words x 4 bytes = 2.1 GB per batch, about 7 GB with softmax's copies)."""
    hidden, targets, head, cap = _response_hidden(model, batch)
    loss, correct = 0.0, 0
    for start in range(0, len(targets), chunk):
        logits = head(hidden[start:start + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        part_loss, part_correct, _ = _score_classes(logits, targets[start:start + chunk])
        loss, correct = loss + part_loss, correct + part_correct
    return loss, correct, targets.numel()


def training_loss(cfg, model, batch: dict) -> torch.Tensor:
    """The training loss of a batch: mean cross-entropy of the family's outputs, or, for
    `task='causal-lm'` with `train.loss-chunk` > 0, the same loss computed chunk by chunk."""
    fam = family(cfg)
    if fam.generates and cfg.train.loss_chunk:
        return chunked_response_loss(model, batch, cfg.train.loss_chunk)
    return F.cross_entropy(*fam.outputs(model, dict(batch)))


def family(cfg) -> Family:
    return FAMILIES.get(cfg.task)


def lora_targets(cfg) -> tuple[str, ...]:
    """The layers that get LoRA: `lora.target-modules`, or the family's usual ones for
    'auto'."""
    targets = cfg.lora.target_modules
    return family(cfg).targets if targets == ("auto",) else targets
