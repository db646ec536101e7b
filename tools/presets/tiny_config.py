"""tiny_config: any transformers model type's default config, shrunk to a model of ~200k parameters.

Generic: the default config of ``model_type`` is read, and every attribute whose *name* says
what it is (a width, a head count, an expert count, a rank, a window, a period, a per-layer
list...) is shrunk by one rule of ``tools/presets/tiny_rules.RULES``. No rule names a model. The few
attributes that no name-based rule can get right are in ``tiny_rules.EXCEPTIONS``, each with its
reason.

Per-layer lists (``layer_types``, ``mlp_layer_types``, any list as long as the default number
of layers) are first left to the config to regenerate for the new depth; when that loses a
kind of layer the default had, a sub-sequence of the default lists that keeps every kind of
layer is passed instead.

Used by the architecture sweep (``tests/test_sweep.py``)::

    config = tiny_config("mixtral")
    model = build_tiny("mixtral", seed=0)
"""

from __future__ import annotations

from typing import Any

from .tiny_rules import EXCEPTIONS, LAYERS, shrink_nested, shrink_value


def _cover(lists: dict[str, list[Any]], n: int) -> list[int]:
    """Indices of ``n`` layers, in order, that keep every distinct combination of per-layer values
    (as far as ``n`` allows): first occurrences, then the deepest layers."""
    length = len(next(iter(lists.values())))
    rows = [tuple(str(v[i]) for v in lists.values()) for i in range(length)]
    chosen: list[int] = []
    for i, row in enumerate(rows):
        if row not in {rows[j] for j in chosen} and len(chosen) < n:
            chosen.append(i)
    for i in reversed(range(length)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


_DERIVED = object()


def _own_defaults(cls) -> dict[str, Any]:
    """The config's constructor defaults (dataclass fields); ``_DERIVED`` for a computed default."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = _DERIVED
    for alias, stored in getattr(cls, "attribute_map", {}).items():  # a field stored under another name
        if alias in out and stored not in out:
            out[stored] = out[alias]
    return out


def _post_init_kwargs(cls) -> dict[str, Any]:
    """Keyword arguments ``__post_init__`` pops with a constant default (``kwargs.pop("global_head_dim",
    512)``): sizes that are no config attribute, so the attribute scan misses them."""
    import ast
    import inspect
    import textwrap

    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        fn = klass.__dict__.get("__post_init__")
        if fn is None or not klass.__module__.startswith("transformers.models."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("pop", "get") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "kwargs" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and isinstance(node.args[1], ast.Constant)):
                found[node.args[0].value] = node.args[1].value
    return found


def _config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str, layers: int = LAYERS, **overrides: Any):
    """The default config of ``model_type`` with every known size shrunk (``tiny_rules.RULES``)."""
    cls = _config_class(model_type)
    default = cls()
    if getattr(default, "sub_configs", None):  # a composite (multimodal) config: shrink each part
        parts = {}
        for key in default.sub_configs:
            sub_default = getattr(default, key, None)
            if getattr(sub_default, "model_type", None):
                try:
                    parts[key] = tiny_config(sub_default.model_type, layers).to_dict()
                except Exception:  # a part with no registered model type keeps its default
                    pass
        return cls(**parts, **overrides)
    defaults = default.to_dict()
    depth = defaults.get("num_hidden_layers")
    own = _own_defaults(cls)
    kwargs: dict[str, Any] = {}
    derived: list[str] = []
    for name, value in defaults.items():
        if name in ("model_type", "transformers_version", "architectures", "id2label", "label2id"):
            continue
        if name not in own or (own[name] is not _DERIVED and own[name] != value):
            derived.append(name)  # computed in __post_init__ (head_dim = qk_rope_head_dim): re-derived
            continue
        # num_layers: LongCat's decoder layers, each two sublayers (its num_hidden_layers is twice it)
        new = layers if name in ("num_hidden_layers", "num_layers") else _shrink_any(name, value, defaults)
        if new is not value and new != value:
            kwargs[name] = new
    for name, value in _post_init_kwargs(cls).items():  # sizes the config only takes as keywords
        new = shrink_value(name, value, defaults)
        if new is not value and new != value:
            kwargs[name] = new
    kwargs.update(EXCEPTIONS.get(model_type, ({}, ""))[0])
    kwargs.update(overrides)
    if isinstance(defaults.get("per_layer_config"), dict):
        kwargs.pop("per_layer_config", None)  # keyed by the default's layer numbers: regenerated
    per_layer = {k: v for k, v in defaults.items()  # a list the caller gives is kept as given
                 if isinstance(v, list) and depth and len(v) == depth and k not in overrides
                 and k not in EXCEPTIONS.get(model_type, ({}, ""))[0]}
    config = _build(cls, kwargs, per_layer, layers, defaults)
    # A derived value the config did not re-derive from the shrunk sizes is still full size
    # (flint's mlp_only_layers=[0, 1] from a None default): shrink it like any other.
    fixes = {}
    for name in derived:
        value = config.to_dict().get(name)
        if name not in per_layer and value == defaults[name]:
            new = _shrink_any(name, value, defaults)
            if new is not value and new != value:
                fixes[name] = new
    if fixes:
        config = _build(cls, {**kwargs, **fixes}, per_layer, layers, defaults)
    _check_heads(config)
    return config


def _shrink_any(name: str, value: Any, defaults: dict[str, Any]) -> Any:
    return shrink_nested(value, defaults) if isinstance(value, dict) else shrink_value(name, value, defaults)


def _build(cls, kwargs: dict[str, Any], per_layer: dict[str, list[Any]], layers: int, defaults: dict[str, Any]):
    config = _regenerated(cls, kwargs, per_layer, layers)
    if config is None:
        idx = _cover(per_layer, layers)
        lists = {k: [shrink_value(k, v[i], defaults) if isinstance(v[i], int) else v[i] for i in idx]
                 for k, v in per_layer.items()}
        config = cls(**{**kwargs, **lists})
    return config


def _regenerated(cls, kwargs: dict[str, Any], per_layer: dict[str, list[Any]], layers: int):
    """The config with its per-layer lists regenerated by the config for ``layers`` layers, if that
    keeps every kind of layer the default had; else None."""
    if not per_layer:
        return cls(**kwargs)
    try:
        config = cls(**{**kwargs, **{k: None for k in per_layer}})
    except Exception:
        return None
    for key, default in per_layer.items():
        value = getattr(config, key, None)
        if not isinstance(value, list) or len(value) != layers:
            return None
        if len(set(map(str, default))) <= layers and set(map(str, value)) != set(map(str, default)):
            return None
    return config


def _check_heads(config: Any) -> None:
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and kv and heads % kv:
        raise ValueError(f"tiny_config made {kv} kv heads for {heads} heads")


def build_tiny(model_type: str, seed: int = 0, dtype=None, **overrides: Any):
    """The causal LM of ``model_type`` at tiny size with seeded random weights, eval mode.

    Routers get wider weights than random init gives (peaked, realistic routing: ties and
    near-ties in top-k would make exactness checks flaky) and selection biases get values.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    spread_routers(model, seed)
    return model.eval()


def spread_routers(model: Any, seed: int = 0, preset_recipe: bool = False) -> None:
    """Random init leaves routers near-uniform: router weights are widened (peaked, realistic
    routing; ties and near-ties in top-k would make exactness checks flaky), and per-expert biases,
    zero at init, get values (DeepSeek's selection bias would otherwise leave its term untested).
    Every parameter or buffer of an MoE block (outside its experts) with one row per expert is one:
    2-D a router weight, 1-D a bias; drawn block by block from a generator seeded ``seed + 1``.

    ``preset_recipe`` draws what ``tools/presets/catalog`` always has (its ``RECIPE``): every router weight
    first, then only the selection biases (``e_score_correction_bias``; gpt-oss's router bias keeps
    its init). A change to what is drawn for presets changes their weights: bump ``presets.RECIPE``."""
    import torch

    from ...ir.input_scaled import DENSE_EXPERTS
    from ...passes.trace import is_experts_module

    blocks = {}
    for name, module in model.named_modules():
        if is_experts_module(module) or isinstance(module, DENSE_EXPERTS):
            parent = name.rpartition(".")[0]
            blocks[parent] = (module.gate_up_proj if hasattr(module, "gate_up_proj") else module.down_proj).shape[0]
    found = []  # (name in its block, tensor), in the order they are drawn
    for block, n in blocks.items():
        owner = model.get_submodule(block)
        for name, tensor in list(owner.named_parameters()) + list(owner.named_buffers()):
            if name.startswith("experts.") or "shared" in name or tensor.shape[:1] != (n,) or tensor.is_meta:
                continue
            if tensor.is_floating_point() and tensor.dim() in (1, 2):
                found.append((name, tensor))
    if preset_recipe:
        found = ([(name, t) for name, t in found if t.dim() == 2]
                 + [(name, t) for name, t in found if name.endswith("e_score_correction_bias")])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, tensor in found:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.5 if tensor.dim() == 2 else 0.3))


def shrink_report(model_type: str) -> dict[str, tuple[Any, Any]]:
    """What :func:`tiny_config` changed: ``{attribute: (default, tiny)}`` (for reading, not testing)."""
    default = _config_class(model_type)().to_dict()
    tiny = tiny_config(model_type).to_dict()
    return {k: (default.get(k), v) for k, v in tiny.items() if default.get(k) != v}
