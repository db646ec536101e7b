"""Built-in presets: seeded random weights of real MoE architectures at small size.

Made with transformers' config classes and ``save_pretrained`` on first use, so a fresh
machine with no network can compile and generate. Seeded: the same preset is the same model
everywhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

_COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=False)

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
}


def build(name: str, seed: int = 0):
    """The preset's model, with seeded random weights, in float32."""
    import torch
    import transformers

    class_name, kwargs = PRESETS[name]
    kwargs = dict(kwargs)
    attn = kwargs.pop("attn_implementation", None)
    config = getattr(transformers, class_name)(**kwargs)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_routers(model, seed)
    return model.eval()


def _spread_routers(model, seed: int) -> None:
    """Random init leaves routers near-uniform; wider router weights give realistic, peaked routing."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def materialize(name: str, root: Path | None = None) -> Path:
    """The preset saved with ``save_pretrained`` under ``root`` (a per-user temp dir by default)."""
    root = Path(root) if root else Path(tempfile.gettempdir()) / "expertflow-presets"
    path = root / name
    if (path / "config.json").is_file():
        return path
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(root)))
    build(name).save_pretrained(tmp)
    tmp.rename(path)
    return path


def _ensure(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root
