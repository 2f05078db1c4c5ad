"""The embedding table of a (PEFT-wrapped) causal LM, row by row (S7), in torch.

- `embedding_of`: the input embedding, its module name, and whether the output head is the
  same tensor (tied: SmolLM2, Gemma 3). An untied head is refused (`ConfigError`): its rows
  would be a second table to federate.
- `base_table`: the table as it is outside any `with` below (the base model's);
- `applied_rows`: the table with some rows replaced, for the duration of a `with` (the
  base values are restored after: the process's model is shared by the server's
  evaluation and every simulated device).
- `trainable_rows`: inside a `with`, rows `ids` become one trainable parameter [m, d]
  that both the input embedding and the tied head read (a parametrization substitutes
  them into the frozen table on every forward), so an update is applied once, to both
  uses; the rest of the table stays frozen.
- `save_rows_in_adapter`: the rows as PEFT's `trainable_token_indices` in a saved adapter
  folder, so `PeftModel.from_pretrained(base, folder)` loads LoRA + rows (tied: both uses).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

from edge_lam.config.options import ConfigError


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def embedding_of(model, what: str = "the model") -> tuple[torch.nn.Module, str]:
    """(input embedding module, its name in the base model); ConfigError if the output
    head does not share its weight (tie_word_embeddings false)."""
    base = _base(model)
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    emb_w = emb.parametrizations.weight.original if parametrize.is_parametrized(emb) \
        else emb.weight
    head_w = None if head is None else (
        head.parametrizations.weight.original if parametrize.is_parametrized(head)
        else head.weight)
    if head_w is None or head_w.data_ptr() != emb_w.data_ptr():
        raise ConfigError(
            f"strategy='submodel' federates the rows of the token embedding, which must also "
            f"be the output head (tie_word_embeddings=true, as in SmolLM2 and Gemma 3); "
            f"{what} has a separate output head: use a model with tied embeddings, or "
            "another strategy")
    name = next(n for n, m in base.named_modules() if m is emb)
    return emb, name


def base_table(model) -> torch.Tensor:
    """The embedding table as the base model has it (a pristine copy is kept while rows
    are applied)."""
    emb, _ = embedding_of(model)
    return emb.weight.detach()


@contextmanager
def applied_rows(model, ids: np.ndarray, values: np.ndarray):
    """The table with rows `ids` := `values` inside the `with`; restored after."""
    emb, _ = embedding_of(model)
    weight = emb.weight
    index = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=weight.device)
    saved = weight.detach()[index].clone()
    with torch.no_grad():
        weight[index] = torch.as_tensor(np.asarray(values), dtype=weight.dtype,
                                        device=weight.device)
    try:
        yield emb
    finally:
        with torch.no_grad():
            weight[index] = saved


class _Substitute(torch.nn.Module):
    """W -> W with rows `ids` replaced by the trainable `rows` (gradient only to them)."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("ids", ids, persistent=False)
        self.rows = torch.nn.Parameter(rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.ids, self.rows.to(weight.dtype))


@contextmanager
def trainable_rows(model, ids: np.ndarray):
    """Rows `ids` (of the table as it is now) as one trainable parameter, read by the input
    embedding and the tied head alike; yields the parameter. The table is unchanged after
    the `with` (read the trained values from the parameter inside it)."""
    emb, _ = embedding_of(model)
    head = _base(model).get_output_embeddings()
    weight = emb.weight
    index = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=weight.device)
    sub = _Substitute(index, weight.detach()[index].float().clone())
    parametrize.register_parametrization(emb, "weight", sub, unsafe=True)
    parametrize.register_parametrization(head, "weight", sub, unsafe=True)
    try:
        yield sub.rows
    finally:
        parametrize.remove_parametrizations(head, "weight", leave_parametrized=False)
        parametrize.remove_parametrizations(emb, "weight", leave_parametrized=False)
        head.weight = emb.weight  # one tensor again (tied)


TOKENS_KEY = "base_model.model.{module}.token_adapter.trainable_tokens_delta"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_rows_in_adapter(folder: Path, module: str, ids: np.ndarray, values: np.ndarray
                         ) -> None:
    """Add the rows to a saved PEFT LoRA folder as `trainable_token_indices` (PEFT >= 0.15):
    `PeftModel.from_pretrained(base, folder)` then gives the table with these rows, in the
    input embedding and in the tied head."""
    from safetensors.numpy import load_file, save_file

    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["trainable_token_indices"] = {module: [int(i) for i in ids]}
    config_file.write_text(json.dumps(config, indent=2))
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    tensors[TOKENS_KEY.format(module=module)] = np.ascontiguousarray(values, dtype=np.float32)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
