"""Shared fixtures: small models saved to temp dirs, compiled once per session. No network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertflow.passes.options import CompileOptions
from expertflow.tools import presets
from expertflow.tools.compile import compile_model

# Two prompts, the first left-padded: what the exactness tests feed every model.
PROMPTS = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
PROMPT_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(preset)``: the preset saved with save_pretrained in a session temp dir."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = presets.materialize(name, root)
        return made[name]

    return make


@pytest.fixture(scope="session")
def compiled_dir(tmp_path_factory, model_dir):
    """``compiled_dir(preset)``: the preset compiled once per session (do not modify it)."""
    root = tmp_path_factory.mktemp("compiled")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = compile_model(str(model_dir(name)), root / name, CompileOptions(), quiet=True)
        return made[name]

    return make
