"""Where a model comes from: a save_pretrained directory, a cached hub id, or a built-in preset."""

from __future__ import annotations

import os
from pathlib import Path

from ..presets import catalog as presets
from ..shell import UserError


def check_source(model: str, source: Path, needs_tokenizer: bool) -> None:
    """Refuses, from ``source``'s config and file names alone, a model ExpertFlow cannot run:
    a dense one (no module uses transformers' experts interface: the rule the compiler traces
    by, ``passes.driver.is_experts_module``, on a meta skeleton) or, when ``needs_tokenizer``, one
    that ships no tokenizer."""
    from ...runtime.store.manifest import TOKENIZER_VOCAB

    if needs_tokenizer and not any((source / name).is_file() for name in TOKENIZER_VOCAB):
        raise UserError(f"{model} ships no tokenizer ({', '.join(TOKENIZER_VOCAB)}), so text cannot become "
                        "tokens: save the model's tokenizer next to its config (tokenizer.save_pretrained(DIR))")
    from transformers import AutoConfig

    from ...ir.skeleton import build_skeleton, config_dtype
    from ...passes.driver import not_moe_reason

    try:
        config = AutoConfig.from_pretrained(source)
        skeleton = build_skeleton(config, config_dtype(config))
    except Exception:  # noqa: BLE001 - the compile that follows reports a config it cannot read, in full
        return
    reason = not_moe_reason(skeleton)
    if reason is not None:
        raise UserError(f"cannot run {model}: {reason} (an MoE model runs, e.g. tiny-trained-moe)")


def resolve_model(model: str, presets_dir: Path | None = None) -> Path:
    """The local directory holding ``model``'s config.json and weights; never touches the network."""
    if presets.is_random(model) or model in presets.SHIPPED:
        return presets.materialize(model, presets_dir)
    try:
        path = Path(model).expanduser()
        if path.exists():
            return _local(model, path)
    except (OSError, RuntimeError) as exc:  # RuntimeError: expanduser of an unknown ~user
        raise UserError(f"{model} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                        "check the path and its permissions") from None
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _from_hub_cache(model)
    raise UserError(f"{model} does not exist; pass a model directory, a cached hub id, or a preset "
                    f"({', '.join(presets.names())})")


def _local(model: str, path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"{model} is a file; pass the directory that save_pretrained wrote")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{model} is not readable; check its permissions")
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{model} has no config.json; pass a directory written by save_pretrained")
    if not os.access(config, os.R_OK):
        raise UserError(f"{config} is not readable; check its permissions")
    return path


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise UserError(f"{repo_id} is not in the local Hugging Face cache and ExpertFlow never downloads; "
                        f"fetch it first with `hf download {repo_id}`") from None
