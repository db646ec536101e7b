"""Streaming a checkpoint's weights one decoder layer at a time, in the model's own format.

``from_pretrained`` holds the whole model in memory; compiling a model that does not fit in
RAM must not. :class:`WeightStream` reads tensors lazily from the safetensors shards and hands
out the model's final state dict grouped by decoder layer (``model.layers.N.*``), with one more
group for everything outside the layers (embeddings, final norm, head).

Checkpoints are often not in the model's format: transformers 5 saves Mixtral's experts as
``block_sparse_moe.experts.3.w1.weight`` and fuses them into ``mlp.experts.gate_up_proj`` at
load time. Rather than repeat those renamings and merges per architecture, every group goes
through transformers' own loader (``convert_and_load_state_dict_in_model``) into a skeleton
whose parameters live on the meta device, restricted to that group's checkpoint keys; the
loaded tensors are taken out and the skeleton's meta parameters put back.

That loader is internal to transformers and changes between releases. When it is missing, has
an unknown signature, or gives an incomplete group, the stream says so in one line on stderr
and loads the rest with ``from_pretrained`` (the whole model in memory, but the same tensors).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from ...ir.skeleton import build_skeleton, text_model

Group = int | None  # a decoder layer's index; None for the tensors outside the layers
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class StreamUnsupported(Exception):
    """This checkpoint or transformers release cannot be streamed; from_pretrained is used."""


def group_of(key: str) -> Group:
    """The decoder layer a state-dict key belongs to, or None outside the layers."""
    match = _LAYER.search(key)
    return int(match.group(1)) if match else None


def load_skeleton(source: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model at ``source`` with meta parameters: config and generation config as from_pretrained."""
    from transformers import GenerationConfig

    model = build_skeleton(AutoConfig.from_pretrained(source), dtype)
    if getattr(model, "generation_config", None) is not None:
        # from_pretrained reads generation_config.json (eos ids etc.); from_config only derives one
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def checkpoint_files(source: Path) -> dict[str, Path]:
    """Each checkpoint key's safetensors shard (one file, or shards named by
    ``model.safetensors.index.json``). Every shard's header is read, so a truncated or corrupt
    file fails here, before anything is compiled, with safetensors' own error."""
    from safetensors import safe_open

    index = source / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({source / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (source / "model.safetensors").is_file():
        shards = [source / "model.safetensors"]
    else:
        raise StreamUnsupported(f"{source} has no model.safetensors (other weight formats are not streamed)")
    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:  # reads and checks the header only
            files.update(dict.fromkeys(f.keys(), shard))
    return files


class WeightStream:
    """Iterates ``(group, {state-dict key: tensor})`` for ``source``, layers in order, then the rest.

    Together the groups hold exactly the keys and values of
    ``AutoModelForCausalLM.from_pretrained(source, dtype=dtype).state_dict()``; tied weights appear
    under each of their names. ``model`` is the meta skeleton (built when not given); it is used
    while streaming and left with its meta parameters afterwards.
    """

    def __init__(self, source: str | Path, dtype: torch.dtype, model: nn.Module | None = None):
        self.source, self.dtype = Path(source), dtype
        self.model = model if model is not None else load_skeleton(source, dtype)
        self._meta = dict(self.model.state_dict())
        self.groups: list[Group] = sorted({group_of(k) for k in self._meta}, key=lambda g: -1 if g is None else g)
        self._loader: _GroupLoader | None = None
        self.reason = ""  # why the weights come from from_pretrained instead ('' while streaming)
        self.key_mapping = text_model(AutoConfig.from_pretrained(source))[1]  # a multimodal checkpoint's text part
        try:
            files = checkpoint_files(self.source)  # unreadable shards raise: bad input, no fallback
        except StreamUnsupported as exc:
            self.reason = str(exc)
            return
        try:
            self._loader = _GroupLoader(self.model, files, dtype, self._meta, self.key_mapping)
        except Exception as exc:  # noqa: BLE001 - transformers internals moved: use from_pretrained
            self.reason = _one_line(exc)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def streaming(self) -> bool:
        """Whether the groups come from the shards (False: from_pretrained, the whole model)."""
        return self._loader is not None

    def __iter__(self) -> Iterator[tuple[Group, dict[str, torch.Tensor]]]:
        done = 0
        if self._loader is not None:
            try:
                for group in self.groups:
                    tensors = self._loader.load(group)
                    done += 1
                    yield group, tensors
                return
            except Exception as exc:  # noqa: BLE001 - the fallback below gives the same tensors
                self._loader = None
                self.reason = _one_line(exc)
        yield from self._whole_model(self.groups[done:])

    def _whole_model(self, groups: list[Group]) -> Iterator[tuple[Group, dict[str, torch.Tensor]]]:
        from transformers import AutoModelForCausalLM

        print(f"expertflow: cannot stream the weights of {self.source} ({self.reason}); "
              "loading the whole model with from_pretrained", file=sys.stderr)
        model_cls = AutoModelForCausalLM._model_mapping[type(self.model.config)]
        state = model_cls.from_pretrained(self.source, dtype=self.dtype, key_mapping=self.key_mapping).state_dict()
        for group in groups:
            yield group, {k: v for k, v in state.items() if group_of(k) == group}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class _GroupLoader:
    """transformers' loader applied to one group's checkpoint keys at a time, on the meta skeleton."""

    def __init__(self, model: nn.Module, files: dict[str, Path], dtype: torch.dtype,
                 meta: dict[str, torch.Tensor], key_mapping: dict[str, str] | None = None):
        from transformers import core_model_loading as core
        from transformers.conversion_mapping import get_model_conversion_mapping

        if getattr(model.config, "quantization_config", None) is not None:
            raise StreamUnsupported("quantized checkpoints go through transformers' quantizers")
        self.model, self.meta = model, meta
        self.files = files
        mapping = get_model_conversion_mapping(model, key_mapping, None)
        self._convert = self._bind(core.convert_and_load_state_dict_in_model, model, dtype, mapping)
        # Where each state-dict entry lives, and its meta value to put back after a group is taken out.
        self._slots = {key: _slot(model, key) for key in meta}
        self._original = {key: _read(owner, leaf) for key, (owner, leaf) in self._slots.items()}
        self._ties = _tie_partners(model)
        self.keys, self.targets = self._plan(core, mapping)
        self._check_covered()

    @staticmethod
    def _bind(convert: Any, model: nn.Module, dtype: torch.dtype, mapping: list) -> Any:
        """``convert(state)`` for this release's signature of convert_and_load_state_dict_in_model."""
        from transformers.modeling_utils import LoadStateDictConfig

        params = inspect.signature(convert).parameters
        if "load_config" not in params:
            raise StreamUnsupported("convert_and_load_state_dict_in_model takes no load_config")
        get_plan = getattr(model, "_get_dtype_plan", None)
        dtype_plan = get_plan(dtype) if get_plan is not None else {}
        fields = {f.name for f in dataclasses.fields(LoadStateDictConfig)}
        wanted = {"dtype": dtype, "dtype_plan": dtype_plan, "weight_mapping": mapping}
        config = LoadStateDictConfig(**{k: v for k, v in wanted.items() if k in fields})
        extra = {"tp_plan": None, "dtype_plan": dtype_plan}
        extra = {k: v for k, v in extra.items() if k in params and k not in fields}
        given = {"model", "state_dict", "load_config", *extra}
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given]
        if required:
            raise StreamUnsupported(f"convert_and_load_state_dict_in_model wants {required}")
        return lambda state: convert(model=model, state_dict=state, load_config=config, **extra)

    def _plan(self, core: Any, mapping: list) -> tuple[dict[Group, list[str]], dict[Group, set[str]]]:
        """Checkpoint keys per group, and the state-dict keys they become (transformers' renaming)."""
        renamings = [m for m in mapping if isinstance(m, core.WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, core.WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = self.model.base_model_prefix
        keys: dict[Group, list[str]] = {}
        targets: dict[Group, set[str]] = {}
        for key in self.files:
            target, pattern = core.rename_source_key(key, renamings, converters, prefix, self.meta)
            if target not in self.meta and key in self.meta:  # as transformers retries: prefix only
                target, pattern = core.rename_source_key(key, [], [], prefix, self.meta)
            if target not in self.meta:
                continue  # not part of this model: transformers reports it as unexpected and skips it
            made = {target}
            converter = by_pattern.get(pattern) if pattern is not None else None
            if converter is not None:  # one-to-many converters (e.g. a fused qkv split in three)
                made |= {target.replace(converter.target_patterns[0], t) for t in converter.target_patterns}
            keys.setdefault(group_of(target), []).append(key)
            targets.setdefault(group_of(target), set()).update(k for k in made if k in self.meta)
        return keys, targets

    def _check_covered(self) -> None:
        """Every state-dict entry comes from the checkpoint, a tied partner in its group, or a buffer."""
        for key in self.meta:
            group = group_of(key)
            made = self.targets.get(group, set())
            if key in made or self._ties.get(key, set()) & made or self._is_buffer(key):
                continue
            raise StreamUnsupported(f"{key} is not in the checkpoint (from_pretrained would initialise it)")

    def _is_buffer(self, key: str) -> bool:
        owner, leaf = self._slots[key]
        return leaf in owner._buffers and self._original[key].device.type != "meta"

    def load(self, group: Group) -> dict[str, torch.Tensor]:
        """The final tensors of ``group``: read, converted, taken out of the skeleton."""
        _release_freed_memory()  # the previous group has been written and dropped by now
        with contextlib.ExitStack() as stack, _one_thread_no_bars():
            handles: dict[Path, Any] = {}
            state = {}
            for key in self.keys.get(group, []):
                file = self.files[key]
                if file not in handles:
                    handles[file] = stack.enter_context(_open(file))
                state[key] = handles[file].get_slice(key)  # lazy: read when the loader wants it
            try:
                result = self._convert(state)
                loaded = {k: _read(*self._slots[k]) for k in self.meta}
            finally:
                self._restore()
        info = result[0] if isinstance(result, tuple) else result
        if not hasattr(info, "missing_keys"):
            raise StreamUnsupported("convert_and_load_state_dict_in_model returned no loading info")
        errors = dict(getattr(info, "conversion_errors", None) or {})
        mismatched = set(getattr(info, "mismatched_keys", None) or ())
        if errors or mismatched:
            raise ValueError(f"group {group}: conversion errors {list(errors)[:3]}, mismatched {list(mismatched)[:3]}")
        taken = {k: v.detach() for k, v in loaded.items() if k not in info.missing_keys and v.device.type != "meta"}
        return self._complete(group, taken)

    def _complete(self, group: Group, taken: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        members = [k for k in self.meta if group_of(k) == group]
        if stray := set(taken) - set(members):
            raise ValueError(f"group {group}: the loader also set {sorted(stray)[:3]}")
        if lost := self.targets.get(group, set()) - set(taken):
            raise ValueError(f"group {group}: the loader did not set {sorted(lost)[:3]}")
        out = {}
        for key in members:
            partner = next((p for p in sorted(self._ties.get(key, ())) if p in taken), None)
            value = taken.get(key, taken[partner] if partner else None)
            if value is None and self._is_buffer(key):
                value = self._original[key]
            if value is None:
                raise ValueError(f"{key} was not loaded")
            out[key] = value
        return out

    def _restore(self) -> None:
        for key, (owner, leaf) in self._slots.items():
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            table[leaf] = self._original[key]


def _slot(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    owner, _, leaf = key.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _read(owner: nn.Module, leaf: str) -> torch.Tensor:
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _tie_partners(model: nn.Module) -> dict[str, set[str]]:
    """Tied names both ways: from_pretrained ties the missing one to whichever is in the checkpoint."""
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    partners: dict[str, set[str]] = {}
    for target, source in ties.items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    return partners


def _open(file: Path) -> Any:
    """A lazy safetensors reader; pread where supported, so read pages do not stay mapped (and
    counted in the process's RSS) for the rest of the run."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors before the backend argument: mmap, unmapped when the group is done
        return safe_open(str(file), framework="pt", device="cpu")


@contextlib.contextmanager
def _one_thread_no_bars() -> Iterator[None]:
    """transformers' loader as used here: no 'Loading weights' bar (it would draw one per layer),
    and no reader threads: on a layer-sized read they gain nothing measurable, and each thread's
    malloc arena kept freed layers resident (about 100 MB more peak RSS on an 8-layer model)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    previous = os.environ.get(_SYNC)
    hf_logging.disable_progress_bar()
    os.environ[_SYNC] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_SYNC, None)
        else:
            os.environ[_SYNC] = previous
        if enabled:
            hf_logging.enable_progress_bar()


_SYNC = "HF_DEACTIVATE_ASYNC_LOAD"


def _release_freed_memory() -> None:
    """Hands the previous layer's freed heap back to the OS: glibc keeps it otherwise, and the
    peak RSS grew by about 30 MB over 8 layers without this."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # glibc only
        ctypes.CDLL(None).malloc_trim(0)
