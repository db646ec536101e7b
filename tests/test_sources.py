"""Model sources: a hub id already in the local Hugging Face cache compiles offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import PROMPT_MASK, PROMPTS
from transformers import AutoModelForCausalLM

from expertflow import runtime


def test_cached_hub_id_compiles_offline(tmp_path: Path, model_dir) -> None:
    source = model_dir("tiny-olmoe")
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-olmoe"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "compiled"
    proc = subprocess.run([sys.executable, "-m", "expertflow.tools.cli.compile", "someorg/tiny-olmoe", "-o", str(out),
                           "--quiet", "--no-dumps"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        ref = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
    model = runtime.load(out, expert_cache=2)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, ref, atol=1e-5, rtol=0)
