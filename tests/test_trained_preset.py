"""The shipped trained preset ``tiny-trained-moe``: compiles, matches transformers, routes as it learned.

Its weights are tools/presets/preset_models/tiny-trained-moe, written by examples/train_tiny_moe.py; its
TRAINING.md records the held-out loss, which is reproduced here on the same held-out text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import EVICT
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertflow import runtime
from expertflow.tools.presets import catalog as presets, preset_tokenizer
from expertflow.tools.make.source import resolve_model

NAME = "tiny-trained-moe"
REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["def __init__(self", "import os\n", "    def read(self, path):\n        ", "class Error(Exception):"]
NEW_TOKENS = 16
SHIPPED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "TRAINING.md"}


@pytest.fixture(scope="module")
def train_script():
    """examples/train_tiny_moe.py as a module: its held-out text, windows and loss are the ones recorded."""
    spec = importlib.util.spec_from_file_location("train_tiny_moe", REPO / "examples" / "train_tiny_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source() -> Path:
    return resolve_model(NAME)


@pytest.fixture(scope="module")
def hf(source):
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(source):
    tokenizer = AutoTokenizer.from_pretrained(source)
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _training_md(source: Path) -> str:
    return (source / "TRAINING.md").read_text()


def test_resolves_to_the_shipped_directory(source, tmp_path):
    assert source == presets.SHIPPED[NAME] == presets.materialize(NAME, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing built or copied
    assert NAME not in presets.PRESETS  # PRESETS means random weights to the tools that list it
    assert NAME in presets.names()
    assert {f.name for f in source.iterdir()} == SHIPPED_FILES  # no optimizer state, checkpoints or leftovers
    assert (source / "model.safetensors").stat().st_size < 12 * 2**20
    config = json.loads((source / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["dtype"] == "float32"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)


def test_tokenizer_is_the_presets_kind(source):
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    assert tokenizer.padding_side == "left"
    assert tokenizer.chat_template == preset_tokenizer.CHAT_TEMPLATE
    text = "def f(x):\n    return {'é': x ** 2}  # ünïcode\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: round-trips
    code = "    def __init__(self, name, value=None):\n        self.name = name\n        return self.value\n"
    assert len(tokenizer(code, add_special_tokens=False)["input_ids"]) < len(code) / 3  # merges learned on Python


def test_compiled_logits_and_greedy_tokens_match_transformers(compiled_dir, hf, batch):
    model = runtime.load(compiled_dir(NAME), expert_cache=EVICT)  # evicts: fewer slots than one step touches
    with torch.no_grad():
        ref = hf(**batch).logits
        ref_tokens = hf.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    # Trained logits reach |16|, where float32 steps are 2e-6: transformers disagrees with itself by
    # 1.1e-5 to 1.5e-5 on this batch (its eager, grouped_mm and batched_mm experts, or one prompt
    # alone against the batch), so the bound is 1e-5 plus 1e-6 of each logit.
    torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=1e-6)
    tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert tokens.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(tokens, ref_tokens), f"\n{tokens}\nHF:\n{ref_tokens}"


def test_greedy_text_is_python_like(compiled_dir, source):
    model = runtime.load(compiled_dir(NAME), expert_cache=EVICT)
    tokenizer = runtime.load_tokenizer(compiled_dir(NAME))
    inputs = tokenizer("def __init__(self", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ")" in text and text.isascii(), text  # closes the parameter list; no byte soup


def test_routing_is_learned_not_uniform(hf, source, train_script):
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = train_script.heldout_windows(tokenizer, count=4)  # 512 held-out tokens
    with torch.no_grad():
        router_logits = hf(input_ids=windows, output_router_logits=True).router_logits
    n, k = hf.config.num_local_experts, hf.config.num_experts_per_tok
    assert len(router_logits) == hf.config.num_hidden_layers
    for layer, logits in enumerate(router_logits):
        probs = logits.float().softmax(-1)  # [tokens, experts]
        load = torch.bincount(probs.topk(k, dim=-1).indices.reshape(-1), minlength=n) / (k * len(probs))
        assert (load > 0).all(), f"layer {layer}: unused experts, load {load.tolist()}"
        assert load.max() < 0.4, f"layer {layer}: collapsed onto one expert, load {load.tolist()}"
        top1 = probs.max(-1).values.mean().item()  # uniform: 1/8; this config at random init: ~0.17
        assert top1 > 0.3, f"layer {layer}: near-uniform router, mean top-1 probability {top1:.3f}"


def test_heldout_loss_matches_training_md(hf, source, train_script):
    record = _training_md(source)
    loss = float(re.search(r"^held-out loss: ([0-9.]+)$", record, re.M).group(1))
    digest = re.search(r"held-out text sha256: ([0-9a-f]{64})", record).group(1)
    if hashlib.sha256(train_script.heldout_text().encode()).hexdigest() != digest:
        pytest.skip("this Python's stdlib sources differ from the held-out text TRAINING.md was measured on")
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = train_script.heldout_windows(tokenizer)
    assert windows.shape == (train_script.EVAL_WINDOWS, train_script.SEQ_LEN)
    measured = train_script.evaluate(hf, windows)
    assert measured == pytest.approx(loss, rel=0.01), f"held-out loss {measured:.4f}, TRAINING.md says {loss:.4f}"
    assert measured < 4.5  # well below a uniform guess (ln 2048 = 7.6): the model learned the text
