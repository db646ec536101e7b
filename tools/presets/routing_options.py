"""The routing options a model type's config class offers, read from transformers' own code.

A config class offers more than its defaults: DeepSeek-V2's ``topk_method`` selects greedy or
group-limited routing, Cohere2-MoE's ``expert_selection_fn`` a softmax or sigmoid score, Qwen's
``norm_topk_prob`` a renormalisation, per-layer kind lists which layers are dense. Real
checkpoints set them, so the sweep builds each (``tests/test_routing_options.py``).

No list of models or fields: the tiny model of a type is built on the meta device, and the
source of the classes that route (every module of an MoE block but its experts) and of the
decoder layers (which choose dense or sparse) is read with ``ast``. A config field is an option
when that code branches on it (an ``if`` or conditional expression tests it, or it is compared),
directly or through an attribute the module copied it to (``self.topk_method =
config.topk_method``). Its values to try come from its type and that code:

- a flag: the other value;
- a string: every string literal the code compares it with (``self.topk_method ==
  "group_limited_greedy"``);
- a per-layer list of kinds (``config.mlp_layer_types[layer_idx] == "sparse"``): each kind
  between two layers of another, so a dense layer sits between MoE layers or the reverse;
- a layer index or period (``first_k_dense_replace``, ``decoder_sparse_step``): one step either
  side, within the tiny model's layers;
- another number the code compares with a constant (``if self.num_shared_experts > 0``): either
  side of it, switched on at the size ``tools/presets/tiny_rules`` gives such a field; an unset one
  tested against None: set, at that size. Routed-expert counts are sizes, not options.

An option may need fields the default leaves unset (group-limited routing reads ``n_group``):
:data:`companions` are the unset fields of the same code that ``tiny_rules`` can size, given
only when transformers fails without them.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from .tiny_rules import EXPERT_COUNT, LAYER_INDEX, LAYER_PERIOD, LAYERS, MOE_SWITCHES, shrink_value

_TYPICAL = 1024  # a stand-in full-size value for sizing an unset field with tiny_rules


@dataclass(frozen=True)
class Option:
    """One setting to build: ``field=value`` on the tiny config of ``model_type``."""

    model_type: str
    field: str
    value: Any

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.field}={self.value}".replace(" ", "")


@dataclass
class _Reads:
    """What the routing code reads of the config, and how it branches on it."""

    fields: set[str] = field(default_factory=set)
    branched: set[str] = field(default_factory=set)
    constants: dict[str, set[Any]] = field(default_factory=dict)  # what each is compared with


def _routing_classes(model: Any) -> list[type]:
    """The classes of every module inside an MoE block but its experts, and of the decoder layers."""
    from ...passes.driver import Driver, is_experts_module

    driver = Driver(model)
    layers = model.get_submodule(driver.inner_path).layers if driver.inner_path else model.layers
    found = {type(layer): None for layer in layers}
    for name, module in model.named_modules():
        if is_experts_module(module):
            block = model.get_submodule(name.rpartition(".")[0])
            found.update({type(m): None for m in block.modules() if m is not module})
    return [k for cls in found for k in cls.__mro__ if k.__module__.startswith("transformers.models.")]


def _is_config(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "config") or \
        (isinstance(node, ast.Attribute) and node.attr == "config")


def _config_name(node: ast.AST) -> str | None:
    """``X`` of ``config.X``, ``self.config.X`` or ``getattr(config, "X", ...)``; else None."""
    if isinstance(node, ast.Attribute) and _is_config(node.value):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and len(node.args) >= 2 and _is_config(node.args[0]) and isinstance(node.args[1], ast.Constant) \
            and isinstance(node.args[1].value, str):
        return node.args[1].value
    return None


def _read(classes: list[type]) -> _Reads:
    reads, alias, trees = _Reads(), {}, []
    for cls in classes:
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(cls))))
        except (OSError, TypeError, SyntaxError):
            continue
    for tree in trees:  # self.top_k = config.num_experts_per_tok: reads of self.top_k read the field
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute):
                name = _config_name(node.value)
                if name is not None:
                    alias[node.targets[0].attr] = name

    def field_of(node: ast.AST) -> str | None:
        while isinstance(node, ast.Subscript):  # config.mlp_layer_types[layer_idx]
            node = node.value
        name = _config_name(node)
        if name is None and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            name = alias.get(node.attr)
        return name

    def tested(node: ast.AST) -> Iterator[str]:
        """Fields a test reads, but inside ``isinstance`` (a type check is no option)."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            return
        name = field_of(node)
        if name is not None:
            yield name
            return
        for child in ast.iter_child_nodes(node):
            yield from tested(child)

    for tree in trees:
        for node in ast.walk(tree):
            name = field_of(node)
            if name is not None:
                reads.fields.add(name)
            if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
                reads.branched.update(tested(node.test))
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                constants = {e.value for p in parts for e in ([p] + list(getattr(p, "elts", [])))
                             if isinstance(e, ast.Constant)}
                for f in {f for p in parts for f in tested(p)}:
                    reads.branched.add(f)
                    reads.constants.setdefault(f, set()).update(constants)
    return reads


@cache
def _scan(model_type: str) -> tuple[dict[str, Any], _Reads]:
    import torch
    from transformers import AutoModelForCausalLM

    from .tiny_config import tiny_config

    config = tiny_config(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    values = {name: getattr(config, name, None) for name in dir(config) if not name.startswith("_")}
    return values, _read(_routing_classes(model))


def _candidates(name: str, value: Any, constants: set[Any]) -> list[Any]:
    strings = {c for c in constants if isinstance(c, str)}
    numbers = {c for c in constants if isinstance(c, (int, float)) and not isinstance(c, bool)}
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, str) or (value is None and strings):
        return sorted(strings - {value})
    if isinstance(value, list) and strings and len(value) == LAYERS and all(isinstance(v, str) for v in value):
        kinds = sorted(strings | set(value))
        return [p for p in ([w, u, w] for u in kinds for w in kinds if u != w) if p != value]
    if value is None:  # unset, tested against None: set, at the size tiny_rules gives such a field
        return [_sized(name)] if None in constants and _sized(name) is not None else []
    if not isinstance(value, (int, float)):
        return []
    if isinstance(value, int) and re.search(LAYER_INDEX, name):  # where a kind of layer starts or ends
        return [v for v in (value - 1, value + 1) if 0 <= v < LAYERS]
    if isinstance(value, int) and re.search(LAYER_PERIOD, name):
        return [v for v in (value - 1, value + 1) if 1 <= v < LAYERS]
    if re.search(EXPERT_COUNT, name):
        return []
    # a threshold the code compares with (``if self.num_shared_experts > 0``): either side of it;
    # above 0 (switched on) at the size tiny_rules gives such a field, when it has one
    sides = set()
    for c in numbers:
        sides |= {c, _sized(name) if c == 0 and _sized(name) is not None else c + 1}
    return sorted({type(value)(v) for v in sides if v >= 0} - {value})


def _sized(name: str) -> int | None:
    """What tiny_rules makes of a full-size value of ``name``; None when no rule sizes it."""
    sized = shrink_value(name, _TYPICAL, {})
    return sized if isinstance(sized, int) and sized != _TYPICAL else None


@cache
def routing_options(model_type: str) -> tuple[Option, ...]:
    """Every (field, value) the routing code of ``model_type`` branches on, but its tiny default."""
    values, reads = _scan(model_type)
    out = []
    for name in sorted(reads.branched & set(values)):
        if re.search(MOE_SWITCHES, name):  # the switch of the experts themselves: off is a dense model
            continue
        for value in _candidates(name, values[name], reads.constants.get(name, set())):
            out.append(Option(model_type, name, value))
    return tuple(out)


def companions(model_type: str) -> dict[str, Any]:
    """Fields the routing code reads that the default leaves unset and ``tiny_rules`` can size
    (``n_group``, ``topk_group``): what an option may need besides itself."""
    values, reads = _scan(model_type)
    out = {}
    for name in sorted(reads.fields):
        if name in values and values[name] is None and _sized(name) is not None:
            out[name] = _sized(name)
    return out
