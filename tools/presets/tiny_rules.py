"""The shrinking rules of ``tools/presets/tiny_config.py``: what each config attribute becomes, by its name.

Every attribute whose *name* says what it is (a width, a head count, an expert count, a rank, a
window, a period, a layer index...) is shrunk by the first matching rule of :data:`RULES`; no
rule names a model. The few attributes that no name-based rule can get right are in
:data:`EXCEPTIONS`, each with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ...runtime.store.budget import TOP_K_NAMES

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


def _head_dim(value: int, cfg: dict[str, Any]) -> int:
    """A head width; one the default makes equal to the rotary width stays equal to it (MLA models
    whose rotary embedding is built for ``head_dim`` and applied to the ``qk_rope_head_dim`` part)."""
    if value and value == cfg.get("qk_rope_head_dim"):
        return _rope_dim(value, cfg)
    return HEAD_DIM if value else value


def _token_id(value: Any, cfg: dict[str, Any]) -> Any:
    """Special token ids move into the small vocabulary; distinct ids stay distinct."""
    if isinstance(value, list):
        return [_token_id(v, cfg) for v in value]
    if not isinstance(value, int) or isinstance(value, bool) or value < VOCAB:
        return value
    return VOCAB - 1 - (value % (VOCAB // 4))


#: Names of a layer index (where a kind of layer starts or ends) and of a period ("every N layers"):
#: the per-layer structure rules below, also read by ``tools/presets/routing_options``.
LAYER_INDEX = (r"^(first_k_dense_replace|num_dense_layers|moe_layer_start_index|attn_layer_offset|"
               r"expert_layer_offset|moe_layer_end_index|max_window_layers)$")
LAYER_PERIOD = r"(every_n_layers|_pattern|_period|_interval|_step|_freq|layer_group_size)$"
#: Names of the routed-expert count (0 would make a dense model: no option of its router).
EXPERT_COUNT = r"^(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$"

# (pattern on the attribute name, rule). The first matching pattern wins; each rule gets the
# default value (an int, or None for attributes that are off) and the defaults of the config.
RULES: list[tuple[str, Callable[[Any, dict[str, Any]], Any]]] = [
    # Layers and per-layer structure.
    (r"^num_hidden_layers$", lambda v, c: LAYERS),
    (r"^(moe_layer_end_index|max_window_layers)$", _last_layer),
    (LAYER_INDEX, _first_layers),
    (LAYER_PERIOD, lambda v, c: min(v, PERIOD) if v else v),
    (r"^num_nextn_predict_layers$", lambda v, c: 0),  # multi-token-prediction layers: unused at inference
    # Vocabulary and special tokens.
    (r"vocab_size", _size(VOCAB)),
    (r"(_token_id|_token_index)$", _token_id),
    # Experts and routing.
    (rf"^({'|'.join(TOP_K_NAMES)})$", _top_k),
    (r"shared_experts?$", _shared_experts),
    (EXPERT_COUNT, _experts),
    (r"^(n_group|num_expert_group)$", _group_count),
    (r"^topk_group$", _top_groups),
    (r"^router_hidden_size$", _size(32)),
    # Widths.
    (r"^hidden_size$", _size(HIDDEN)),
    (r"(shared|moe|expert).*intermediate_size|intermediate_size.*(moe|expert)", _size(32)),
    (r"^expert_ffn_hidden_size$", _size(32)),  # LongCat's names for the expert and dense widths
    (r"^ffn_hidden_size$", _size(HIDDEN)),
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
    (r"^head_dim$", _head_dim),
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
    "granitemoehybrid": ({"layer_types": ["linear_attention", "full_attention", "linear_attention"]},
                         "the default config has only Mamba layers, with which transformers' own "
                         "create_causal_mask fails (no attention layer in the cache); checkpoints mix both"),
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
    (EXPERT_COUNT, EXPERTS),
    (r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|top_k_experts)$", TOP_K),
    (r"^(n_shared_experts|num_shared_experts)$", 1),
    (r"^head_dim$", HEAD_DIM),
    (r"^moe_intermediate_size$", 32),  # left None while the MoE block is off by default (Gemma 4)
]


def _fill(name: str) -> Any:
    return next((value for pattern, value in FILL_WHEN_NONE if re.search(pattern, name)), None)


#: Lists of layer indices (``mlp_only_layers=[0, 1]``): at most the first index is kept, so the
#: shallow model still has MoE layers after it.
LAYER_INDEX_LISTS = r"(only_layers|layer_ids)$"


#: Flags that switch the experts on (Gemma 4 ships its MoE block off by default): a tiny MoE model needs them on.
MOE_SWITCHES = r"^(enable_moe_block|enable_moe|use_moe)$"


def shrink_value(name: str, value: Any, defaults: dict[str, Any]) -> Any:
    if value is False and re.search(MOE_SWITCHES, name):
        return True
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


def shrink_nested(value: Any, defaults: dict[str, Any]) -> Any:
    """Dicts of per-layer or per-kind settings (``per_layer_config``): the same rules inside."""
    if isinstance(value, dict):
        return {k: (shrink_value(str(k), v, defaults) if not isinstance(v, dict) else shrink_nested(v, defaults))
                for k, v in value.items()}
    return value
