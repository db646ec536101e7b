"""Built-in presets: seeded random weights of real MoE architectures at small size, and one trained model.

The random ones (``PRESETS``) are made with transformers' config classes and ``save_pretrained`` on
first use, with the byte-level tokenizer of ``preset_tokenizer``, so a fresh machine with no network
can compile and generate text. Seeded: the same preset is the same model everywhere.

The shipped ones (``SHIPPED``) are trained weights saved in this package (``preset_models/``):
``tiny-trained-moe``, a 2.7M-parameter Mixtral trained on the Python standard library's sources by
examples/train_tiny_moe.py, whose routing is learned and whose text looks like Python. They are not
in ``PRESETS``, which means "random weights" to the tools that list it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import preset_tokenizer
from ..shell import UserError
from .tiny_config import spread_routers

# 384 ids: the byte-level tokenizer's 3 specials and 256 bytes, and 125 merges (tools/presets/preset_tokenizer).
_COMMON = dict(vocab_size=384, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-mixtral": ("MixtralConfig", dict(_COMMON, intermediate_size=128, num_hidden_layers=4,
                                           num_local_experts=8, num_experts_per_tok=2)),
    "tiny-qwen2-moe": ("Qwen2MoeConfig", dict(_COMMON, intermediate_size=128, moe_intermediate_size=64,
                                              shared_expert_intermediate_size=128, num_hidden_layers=4,
                                              num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2)),
    "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(_COMMON, intermediate_size=128, moe_intermediate_size=64,
                                              num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                                              head_dim=16)),
    "tiny-olmoe": ("OlmoeConfig", dict(_COMMON, intermediate_size=64, num_hidden_layers=4, num_experts=8,
                                       num_experts_per_tok=2)),
    "tiny-deepseek-v3": ("DeepseekV3Config", dict(
        _COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "tiny-gpt-oss": ("GptOssConfig", dict(_COMMON, intermediate_size=64, num_hidden_layers=4,
                                          num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                          sliding_window=8, attn_implementation="eager")),
    # A hybrid: three gated-DeltaNet (linear-attention) layers, whose recurrent and convolution states
    # live in the cache, and one full-attention layer; every layer MoE with a shared expert.
    "tiny-qwen3-next": ("Qwen3NextConfig", dict(
        _COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, head_dim=16, decoder_sparse_step=1,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, layer_types=["linear_attention"] * 3 + ["full_attention"])),
    # Llama 4 Maverick's shape in miniature: MoE every other layer, one routed expert per token whose
    # router score scales its input, and a shared expert (transformers runs every expert densely;
    # ExpertFlow runs the chosen one: ir/input_scaled.py).
    "tiny-llama4": ("Llama4TextConfig", dict(
        _COMMON, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4, num_local_experts=8,
        num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=16, attention_chunk_size=16)),
    # Multipliers far from 1, so a front end that drops the ones outside the layers is caught.
    # Not tiny: ~240M parameters (459 MiB) in bfloat16, for benchmarks (compile memory, decode).
    "bench-mixtral-240m": ("MixtralConfig", dict(
        _COMMON, vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2,
        max_position_embeddings=1024, dtype="bfloat16")),
    "tiny-granitemoe": ("GraniteMoeConfig", dict(
        _COMMON, intermediate_size=64, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
        embedding_multiplier=3.0, logits_scaling=0.25, residual_multiplier=1.5, attention_multiplier=0.125)),
}


#: Standard benchmark loads: real expert dimensions, a few layers, seeded random weights, bf16.
#: Gigabytes each (made on first use, a minute or more): for expertflow-bench on a GPU machine,
#: never for tests. Mixtral-8x7B's experts (hidden 4096, ffn 14336, 8 experts, top-2: 336 MiB per
#: expert) and Qwen3-30B-A3B's (hidden 2048, 128 experts of ffn 768, top-8: 9 MiB per expert).
LOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "load-mixtral-8x7b-shaped": ("MixtralConfig", dict(
        _COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, dtype="bfloat16")),
    "load-qwen3-30b-a3b-shaped": ("Qwen3MoeConfig", dict(
        _COMMON, vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096, dtype="bfloat16")),
}


def is_random(name: str) -> bool:
    """True for a preset made with seeded random weights (its routing is not a trained model's)."""
    return name in PRESETS or name in LOADS


#: Presets with trained weights shipped in the package: name -> save_pretrained directory.
SHIPPED: dict[str, Path] = {
    "tiny-trained-moe": Path(__file__).resolve().parent / "preset_models" / "tiny-trained-moe",
}


def names() -> list[str]:
    """Every preset name: the random-weight presets, then the shipped trained ones."""
    return [*PRESETS, *SHIPPED, *LOADS]


def shipped(name: str) -> Path:
    """The shipped preset's directory, as save_pretrained wrote it."""
    path = SHIPPED[name]
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"the shipped preset {name} is missing from {path}: this ExpertFlow was installed "
                        "without its package data; reinstall it from a checkout (pip install .)")
    return path


def preset_config(name: str):
    """A random-weight preset's config (no weights made), its dtype set (float32 by default)."""
    import torch
    import transformers

    class_name, kwargs = {**PRESETS, **LOADS}[name]
    kwargs = dict(kwargs)
    attn = kwargs.pop("attn_implementation", None)
    dtype = getattr(torch, kwargs.pop("dtype", "float32"))
    config = getattr(transformers, class_name)(**kwargs)
    config.dtype = dtype
    if attn:
        config._attn_implementation = attn
    return config


def build(name: str, seed: int = 0):
    """The preset's model, with seeded random weights, in its config's dtype (float32 by default)."""
    import torch
    import transformers

    config = preset_config(name)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    spread_routers(model, seed, preset_recipe=True)
    return model.eval()


# Bump when build() makes different weights for the same preset entry (e.g. tiny_config.spread_routers'
# preset_recipe draws other tensors).
RECIPE = 3
STAMP = "expertflow-preset.json"


def _stamp(name: str) -> str:
    """What the saved copy was made from: a copy with another stamp is stale and is rebuilt."""
    class_name, kwargs = {**PRESETS, **LOADS}[name]
    return json.dumps({"recipe": RECIPE, "class": class_name, "kwargs": kwargs}, sort_keys=True)


def materialize(name: str, root: Path | None = None) -> Path:
    """The preset saved with ``save_pretrained`` under ``root`` (a per-user temp dir by default).

    A shipped preset is its directory in the package, whatever ``root``: nothing is built or copied.
    """
    if name in SHIPPED:
        return shipped(name)
    root = Path(root) if root else Path(tempfile.gettempdir()) / "expertflow-presets"
    path = root / name
    if _is_current(path, name):
        return path
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(root)))
    try:
        model = build(name)
        model.save_pretrained(tmp)
        preset_tokenizer.build(model.config.vocab_size).save_pretrained(tmp)
        (tmp / STAMP).write_text(_stamp(name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # stale: made by an older preset entry; set it aside, then replace it
        old = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=root))
        path.rename(old / name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:  # another process put a copy there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_current(path, name):
            raise
    return path


def _is_current(path: Path, name: str) -> bool:
    try:
        return (path / "config.json").is_file() and (path / STAMP).read_text() == _stamp(name)
    except OSError:
        return False


def _ensure(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root
