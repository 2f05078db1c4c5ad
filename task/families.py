"""Model families, by `task` key: how a family loads, what PEFT task it is, which columns its
data has, how a batch is encoded, and how evaluation scores it. The rest of the code asks
`family(cfg)` instead of branching on the task's name; a new family (e.g. a generative one
scored by label-word likelihood) is one `Family` and one line in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import TaskType


def _load_classifier(source: str, label_names: tuple[str, ...]):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)}, dtype=torch.float32)


def _load_causal_lm(source: str, label_names: tuple[str, ...]):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)


def _score_classes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(loss sum, correct, count): one label per example."""
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    return loss, (logits.argmax(-1) == labels).sum().item(), labels.numel()


def _score_response_tokens(logits: torch.Tensor, labels: torch.Tensor
                           ) -> tuple[float, int, int]:
    """(loss sum, correct, count) over response tokens: token t predicts token t+1."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    loss = F.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
    return loss, (logits.argmax(-1)[mask] == labels[mask]).sum().item(), mask.sum().item()


def _model_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a batch; the model's own head (classes or next tokens)."""
    labels = batch.pop("labels")
    return model(**batch).logits.float(), labels


def _label_word_outputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, labels): the LM's next-token logits after the prompt, at the first
    token of each label word (B x C). Works with left or right padding."""
    labels, words = batch.pop("labels"), batch.pop("label_token_ids")
    logits = model(**batch).logits  # B x T x V
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # the last real token of each prompt
    return logits[torch.arange(len(last), device=last.device), last][:, words].float(), labels


def _own_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def _label_word_loss(model, batch: dict) -> torch.Tensor:
    logits, labels = _label_word_outputs(model, dict(batch))
    return F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class Family:
    name: str
    peft_task: TaskType
    load: Callable[[str, tuple[str, ...]], torch.nn.Module]  # (source, label names) -> model
    labelled: bool  # examples carry class labels (text + label columns), else prompt/response
    score: Callable[[torch.Tensor, torch.Tensor], tuple[float, int, int]]  # per eval batch
    min_labels: int = 0  # distinct labels the data must have
    outputs: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]] = \
        _model_outputs  # (logits, labels); pops labels from the batch
    loss: Callable[[torch.nn.Module, dict], torch.Tensor] = _own_loss  # training loss
    label_words: bool = False  # a causal LM scoring label words after a prompt template
    targets: tuple[str, ...] = ("query", "value")  # LoRA targets of a typical model of it


# attention and MLP projections of Llama / Gemma / Qwen-style decoders
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    "seq-cls": Family("seq-cls", TaskType.SEQ_CLS, _load_classifier, labelled=True,
                      score=_score_classes, min_labels=2),
    "causal-lm": Family("causal-lm", TaskType.CAUSAL_LM, _load_causal_lm, labelled=False,
                        score=_score_response_tokens, targets=LLM_TARGETS),
    # classification posed to a causal LM as an instruction (data.template), answered by the
    # most likely label word (data.label-words): accuracy by label-word likelihood
    "lm-cls": Family("lm-cls", TaskType.CAUSAL_LM, _load_causal_lm, labelled=True,
                     score=_score_classes, min_labels=2, outputs=_label_word_outputs,
                     loss=_label_word_loss, label_words=True, targets=LLM_TARGETS),
}


def family(cfg) -> Family:
    return FAMILIES[cfg.task]


def lora_targets(cfg) -> tuple[str, ...]:
    """The layers that get LoRA: `lora.target-modules`, or the family's usual ones for
    'auto'."""
    targets = cfg.lora.target_modules
    return family(cfg).targets if targets == ("auto",) else targets
