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


@dataclass(frozen=True)
class Family:
    name: str
    peft_task: TaskType
    load: Callable[[str, tuple[str, ...]], torch.nn.Module]  # (source, label names) -> model
    labelled: bool  # examples carry class labels (text + label columns), else prompt/response
    score: Callable[[torch.Tensor, torch.Tensor], tuple[float, int, int]]  # per eval batch
    min_labels: int = 0  # distinct labels the data must have


FAMILIES: dict[str, Family] = {
    "seq-cls": Family("seq-cls", TaskType.SEQ_CLS, _load_classifier, labelled=True,
                      score=_score_classes, min_labels=2),
    "causal-lm": Family("causal-lm", TaskType.CAUSAL_LM, _load_causal_lm, labelled=False,
                        score=_score_response_tokens),
}


def family(cfg) -> Family:
    return FAMILIES[cfg.task]
