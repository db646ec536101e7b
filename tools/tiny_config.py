"""tiny_config: any transformers model type's default config, shrunk to a model of ~200k parameters.

Generic: the default config of ``model_type`` is read, and every attribute whose *name* says
what it is (a width, a head count, an expert count, a rank, a window, a period, a per-layer
list...) is shrunk by one rule of :data:`RULES`. No rule names a model. The few attributes that
no name-based rule can get right are in :data:`EXCEPTIONS`, each with its reason.

Per-layer lists (``layer_types``, ``mlp_layer_types``, any list as long as the default number
of layers) are first left to the config to regenerate for the new depth; when that loses a
kind of layer the default had, a sub-sequence of the default lists that keeps every kind of
layer is passed instead.

Used by the architecture sweep (``tests/test_sweep.py``)::

    config = tiny_config("mixtral")
    model = build_tiny("mixtral", seed=0)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: The shape of every tiny model: what the rules shrink towards.
LAYERS = 3
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
EXPERTS = 8
TOP_K = 2
VOCAB = 128
WINDOW = 4  # shorter than the sweep's prompts, so sliding layers really slide
PERIOD = 2  # every "every N layers" pattern repeats within LAYERS


def _ratio_to_heads(value: int, cfg: dict[str, Any]) -> int:
    """A head count relative to the attention heads (kv heads, linear-attention heads), kept a
    divisor or multiple of the new head count as it was of the old one."""
    heads = cfg.get("num_attention_heads") or HEADS
    if value >= heads:
        return HEADS * min(value // heads, 2)
    return max(1, HEADS // max(1, heads // value))


def _kv_heads(value: int, cfg: dict[str, Any]) -> int:
    heads = cfg.get("num_attention_heads") or HEADS
    if value == heads:  # multi-head attention stays multi-head
        return HEADS
    return max(1, min(HEADS // 2, _ratio_to_heads(value, cfg)))


def _experts(value: int, cfg: dict[str, Any]) -> int:
    """At most EXPERTS, at least 4 (a default of one expert is a dense model in MoE clothing)."""
    return max(min(value, EXPERTS), 4) if value else value


def _shared_experts(value: int, cfg: dict[str, Any]) -> int:
    return min(value, 1)


def _top_k(value: int, cfg: dict[str, Any]) -> int:
    return min(value, TOP_K)


def _size(target: int) -> Callable[[int, dict[str, Any]], int]:
    """A width: ``target`` unless it was 0 (0 switches a part off, e.g. no shared expert)."""
    return lambda value, cfg: target if value else value


def _first_layers(value: int, cfg: dict[str, Any]) -> int:
    """How many leading layers are dense (or similar): 1 when it was any, so both kinds exist."""
    return min(value, 1)


def _last_layer(value: int, cfg: dict[str, Any]) -> int:
    return LAYERS - 1 if value >= LAYERS else value


def _group_count(value: int, cfg: dict[str, Any]) -> int:
    """Expert groups (DeepSeek's n_group): 2, so group-limited routing still selects among groups."""
    return min(value, 2) if value else value


def _top_groups(value: int, cfg: dict[str, Any]) -> int:
    return min(value, 1) if value else value


def _rope_dim(value: int, cfg: dict[str, Any]) -> int:
    return min(value, HEAD_DIM // 2)


def _token_id(value: Any, cfg: dict[str, Any]) -> Any:
    """Special token ids move into the small vocabulary; distinct ids stay distinct."""
    if isinstance(value, list):
        return [_token_id(v, cfg) for v in value]
    if not isinstance(value, int) or isinstance(value, bool) or value < VOCAB:
        return value
    return VOCAB - 1 - (value % (VOCAB // 4))


# (pattern on the attribute name, rule). The first matching pattern wins; each rule gets the
# default value (an int, or None for attributes that are off) and the defaults of the config.
RULES: list[tuple[str, Callable[[Any, dict[str, Any]], Any]]] = [
    # Layers and per-layer structure.
    (r"^num_hidden_layers$", lambda v, c: LAYERS),
    (r"^(first_k_dense_replace|num_dense_layers|moe_layer_start_index|attn_layer_offset|"
     r"expert_layer_offset)$", _first_layers),
    (r"^(moe_layer_end_index|max_window_layers)$", _last_layer),
    (r"(every_n_layers|_pattern|_period|_interval|_step|_freq|layer_group_size)$",
     lambda v, c: min(v, PERIOD) if v else v),
    (r"^num_nextn_predict_layers$", lambda v, c: 0),  # multi-token-prediction layers: unused at inference
    # Vocabulary and special tokens.
    (r"vocab_size", _size(VOCAB)),
    (r"(_token_id|_token_index)$", _token_id),
    # Experts and routing.
    (r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|top_k|experts_per_token)$", _top_k),
    (r"shared_experts?$", _shared_experts),
    (r"^(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$", _experts),
    (r"^(n_group|num_expert_group)$", _group_count),
    (r"^topk_group$", _top_groups),
    (r"^router_hidden_size$", _size(32)),
    # Widths.
    (r"^hidden_size$", _size(HIDDEN)),
    (r"(shared|moe|expert).*intermediate_size|intermediate_size.*(moe|expert)", _size(32)),
    (r"intermediate_size", _size(HIDDEN)),
    (r"(hidden_size_per_layer_input|ple_embed_dim|d_rel)$", _size(16)),
    # Attention heads and head widths.
    (r"key_value_heads$", _kv_heads),
    (r"^num_attention_heads$", lambda v, c: HEADS),
    (r"(num_key_heads|n_groups|mamba_n_groups|o_groups)$", lambda v, c: min(v, 2) if v else v),
    (r"(num_heads|n_heads|num_attention_heads|num_value_heads)$", _ratio_to_heads),
    (r"rope_head_dim$|^rotary_dim$", _rope_dim),
    (r"nope_head_dim$", lambda v, c: HEAD_DIM // 2),
    (r"^qk_head_dim$", lambda v, c: HEAD_DIM),
    (r"head_dim$|_d_head$", _size(HEAD_DIM)),
    # Low-rank projections (MLA's q/kv LoRA, gated norms).
    (r"lora_rank$", _size(HEAD_DIM * 2)),
    (r"(_rank|lowrank)$", _size(8)),
    # State-space and linear-attention states.
    (r"(d_state|state_size)$", _size(16)),
    (r"dt_rank$", _size(8)),
    (r"chunk_size$", _size(8)),
    # Windows and sparse-attention selections.
    (r"sliding_window(_size)?$", lambda v, c: WINDOW if v else v),
    (r"^index_topk$", _size(4)),
    (r"^index_topk_blocks$", _size(2)),
    (r"^(index_block_size|block_size)$", _size(4)),
    (r"^index_local_blocks$", lambda v, c: min(v, 1)),
]

#: Attributes no name-based rule gets right, with the reason. Keep this table small.
EXCEPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "dots3_note_text": ({"swa_num_attention_heads": HEADS, "swa_num_key_value_heads": HEADS, "swa_q_lora_rank": 32,
                          "swa_kv_lora_rank": 32, "swa_head_dim": HEAD_DIM, "swa_qk_nope_head_dim": HEAD_DIM // 2,
                         "swa_v_head_dim": HEAD_DIM},
                        "its sliding layers' sizes are __post_init__ keyword arguments whose names are built "
                        "at run time (f'swa_{name}'), which the scan of __post_init__ cannot see"),
    "lfm2_moe": ({"layer_types": ["conv", "full_attention", "conv"]},
                 "the default config has no layer_types, which the model needs (one per layer)"),
    "qwen4_exp_text": ({"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                        "indexer_budget": 4, "indexer_compress_ratio": 2},
                       "the default config leaves the sparse-attention indexer unset (None), which the "
                       "model cannot build"),
}


#: Attributes a default config may leave unset (None) that the model needs anyway: the value to
#: give them. Others that are None stay None (None usually switches a feature off).
FILL_WHEN_NONE: list[tuple[str, Any]] = [
    (r"^(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$", EXPERTS),
    (r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k)$", TOP_K),
    (r"^(n_shared_experts|num_shared_experts)$", 1),
    (r"^head_dim$", HEAD_DIM),
]


def _fill(name: str) -> Any:
    return next((value for pattern, value in FILL_WHEN_NONE if re.search(pattern, name)), None)


#: Lists of layer indices (``mlp_only_layers=[0, 1]``): at most the first index is kept, so the
#: shallow model still has MoE layers after it.
LAYER_INDEX_LISTS = r"(only_layers|layer_ids)$"


def _shrink_value(name: str, value: Any, defaults: dict[str, Any]) -> Any:
    if isinstance(value, list) and re.search(LAYER_INDEX_LISTS, name):
        return sorted(value)[:1]
    if isinstance(value, bool) or (value is not None and not isinstance(value, (int, list))):
        return value  # flags, floats and strings keep their defaults
    for pattern, rule in RULES:
        if re.search(pattern, name):
            if value is None:
                return _fill(name)
            if isinstance(value, list):
                if name.endswith(("_token_id", "_token_index")):
                    return rule(value, defaults)
                return [rule(v, defaults) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
            return rule(value, defaults)
    return value


def _shrink_nested(value: Any, defaults: dict[str, Any]) -> Any:
    """Dicts of per-layer or per-kind settings (``per_layer_config``): the same rules inside."""
    if isinstance(value, dict):
        return {k: (_shrink_value(str(k), v, defaults) if not isinstance(v, dict) else _shrink_nested(v, defaults))
                for k, v in value.items()}
    return value


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
    """The default config of ``model_type`` with every known size shrunk (see :data:`RULES`)."""
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
        new = layers if name == "num_hidden_layers" else _shrink_any(name, value, defaults)
        if new is not value and new != value:
            kwargs[name] = new
    for name, value in _post_init_kwargs(cls).items():  # sizes the config only takes as keywords
        new = _shrink_value(name, value, defaults)
        if new is not value and new != value:
            kwargs[name] = new
    kwargs.update(EXCEPTIONS.get(model_type, ({}, ""))[0])
    kwargs.update(overrides)
    if isinstance(defaults.get("per_layer_config"), dict):
        kwargs.pop("per_layer_config", None)  # keyed by the default's layer numbers: regenerated
    per_layer = {k: v for k, v in defaults.items() if isinstance(v, list) and depth and len(v) == depth}
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
    return _shrink_nested(value, defaults) if isinstance(value, dict) else _shrink_value(name, value, defaults)


def _build(cls, kwargs: dict[str, Any], per_layer: dict[str, list[Any]], layers: int, defaults: dict[str, Any]):
    config = _regenerated(cls, kwargs, per_layer, layers)
    if config is None:
        idx = _cover(per_layer, layers)
        lists = {k: [_shrink_value(k, v[i], defaults) if isinstance(v[i], int) else v[i] for i in idx]
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


def spread_routers(model: Any, seed: int = 0) -> None:
    """Every parameter or buffer of an MoE block (outside its experts) with one row per expert is
    a router weight or a per-expert bias: router weights are widened, biases given values."""
    import torch

    from ..passes.trace import is_experts_module

    gen = torch.Generator().manual_seed(seed + 1)
    blocks = {}
    for name, module in model.named_modules():
        if is_experts_module(module):
            parent = name.rpartition(".")[0]
            blocks[parent] = (module.gate_up_proj if hasattr(module, "gate_up_proj") else module.down_proj).shape[0]
    with torch.no_grad():
        for block, n in blocks.items():
            owner = model.get_submodule(block)
            for name, tensor in list(owner.named_parameters()) + list(owner.named_buffers()):
                if name.startswith("experts.") or "shared" in name or tensor.shape[:1] != (n,) or tensor.is_meta:
                    continue
                if not tensor.is_floating_point():
                    continue
                if tensor.dim() == 2:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
                elif tensor.dim() == 1:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)


def shrink_report(model_type: str) -> dict[str, tuple[Any, Any]]:
    """What :func:`tiny_config` changed: ``{attribute: (default, tiny)}`` (for reading, not testing)."""
    default = _config_class(model_type)().to_dict()
    tiny = tiny_config(model_type).to_dict()
    return {k: (default.get(k), v) for k, v in tiny.items() if default.get(k) != v}
