"""FedKD local training (S3): a private local module and the shared module teach each other.

Both modules see the same batch; `strategies.fedkd.mutual_kd_losses` gives each its loss
(task cross-entropy + temperature-scaled KL from the other module, optional hidden-state MSE,
optional adaptive weighting) and one backward pass of their sum updates both, each from its
own loss only (the other module's outputs are detached).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from strategies.fedkd.math import mutual_kd_losses
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.encode import encode_batch, endless_batches
from edge_lam.data.text import Examples
from edge_lam.models.families import family
from edge_lam.logs import get_logger
from edge_lam.training.memory import releaser
from edge_lam.models.lora_model import torch_device
from edge_lam.training.loop import make_optimizer, run_steps

log = get_logger()


def _paired_hidden(local_out, shared_out, mask: torch.Tensor
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states of the mentee's layers 1..L_s and the mentor's layers round(i L_l / L_s),
    padding positions zeroed; each B x S x H. Needs equal hidden sizes and sequence lengths."""
    local_h, shared_h = local_out.hidden_states[1:], shared_out.hidden_states[1:]
    pairs = [(local_h[round((i + 1) * len(local_h) / len(shared_h)) - 1], shared_h[i])
             for i in range(len(shared_h))]
    if pairs[0][0].shape != pairs[0][1].shape:
        raise ConfigError(
            f"fedkd.hidden-mse=true needs the local and shared models' hidden states to have "
            f"the same shape, got {tuple(pairs[0][0].shape)} and {tuple(pairs[0][1].shape)}: "
            "use a fedkd.local-model with the same hidden size and tokenizer, or set "
            "fedkd.hidden-mse=false")
    keep = mask.unsqueeze(-1).to(pairs[0][1].dtype)  # B x S x 1
    return [h * keep for h, _ in pairs], [h * keep for _, h in pairs]


def mutual_objective(local_model, shared_model, cfg: RunConfig):
    """S3's loss on one batch pair: each module's task loss plus distillation from the other
    (their sum: one backward pass moves each module by its own loss only).

    What is distilled is the model family's output distribution (`edge_lam.models.families`): class
    probabilities (`seq-cls`), label-word probabilities (`lm-cls`) or next-token
    distributions at the response tokens (`causal-lm`)."""
    hidden = cfg.fedkd.hidden_mse
    fam = family(cfg)

    def loss_fn(batches: tuple[dict, dict]) -> tuple[torch.Tensor, dict]:
        local_batch, shared_batch = batches
        h_local = h_shared = None
        if hidden:  # seq-cls only (checked with the config): the heads' own outputs
            labels = shared_batch["labels"]
            local_out = local_model(**{k: v for k, v in local_batch.items() if k != "labels"},
                                    output_hidden_states=True)
            shared_out = shared_model(**{k: v for k, v in shared_batch.items()
                                         if k != "labels"}, output_hidden_states=True)
            h_local, h_shared = _paired_hidden(local_out, shared_out,
                                               shared_batch["attention_mask"])
            local_logits, shared_logits = local_out.logits.float(), shared_out.logits.float()
        else:
            local_logits, _ = fam.outputs(local_model, dict(local_batch))
            shared_logits, labels = fam.outputs(shared_model, dict(shared_batch))
            if local_logits.shape != shared_logits.shape:
                raise ConfigError(
                    f"the local and shared modules' outputs differ in shape "
                    f"({tuple(local_logits.shape)} vs {tuple(shared_logits.shape)}): "
                    "fedkd.local-model must use the same tokenizer and vocabulary as `model`")
        losses = mutual_kd_losses(local_logits, shared_logits, labels,
                                  T=cfg.fedkd.temperature, lam=cfg.fedkd.lambda_,
                                  adaptive=cfg.fedkd.adaptive, hidden_local=h_local,
                                  hidden_shared=h_shared)
        return losses["local"] + losses["shared"], {k: losses[k] for k in PARTS}

    return loss_fn


PARTS = ("task_shared", "task_local", "kd_to_shared", "kd_to_local", "hidden_mse")


def train_mutual(local_model, shared_model, local_tokenizer, shared_tokenizer,
                 examples: Examples, cfg: RunConfig, seed: int, tag: str = ""
                 ) -> dict[str, float]:
    """`cfg.train.local_steps` AdamW steps of S3 mutual distillation on shuffled batches,
    through the device's one local loop (`edge_lam.training.loop.run_steps`).

    Returns the shared module's mean task loss as `train_loss` (what FedAvg reports), the
    local module's as `local_loss`, the mean distillation terms and `train_s`.
    """
    device = torch_device()
    optimizer = make_optimizer([local_model, shared_model], cfg)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    local_model.train()
    shared_model.train()
    start = time.perf_counter()
    stream = endless_batches(examples, cfg.train.batch_size, rng)

    def next_batch() -> tuple[dict, dict]:
        chunk = next(stream)
        shared_batch = {k: v.to(device) for k, v in
                        encode_batch(shared_tokenizer, chunk, cfg).items()}
        local_batch = shared_batch if local_tokenizer is shared_tokenizer else {
            k: v.to(device) for k, v in encode_batch(local_tokenizer, chunk, cfg).items()}
        return local_batch, shared_batch

    def describe(p: dict[str, float]) -> str:
        return (f"shared CE {p['task_shared']:.4f} local CE {p['task_local']:.4f} "
                f"KD->shared {p['kd_to_shared']:.4f}")

    parts = run_steps(cfg.train.local_steps, next_batch,
                      mutual_objective(local_model, shared_model, cfg), optimizer, tag,
                      describe, release=releaser(cfg))
    mean = {k: float(np.mean([p[k] for p in parts])) for k in PARTS}
    return {"train_loss": mean["task_shared"], "local_loss": mean["task_local"],
            "kd_to_shared": mean["kd_to_shared"], "kd_to_local": mean["kd_to_local"],
            "hidden_mse": mean["hidden_mse"], "steps": cfg.train.local_steps,
            "train_s": time.perf_counter() - start}
