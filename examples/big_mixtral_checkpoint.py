"""Writes a Mixtral-8x7B-shaped checkpoint with seeded random bf16 weights and any number of layers,
one shard per decoder layer, without ever holding more than one layer in memory: a model larger
than this machine's RAM, for the disk tier's benchmark (docs/benchmarks.md). The names are those
of a Hugging Face Mixtral checkpoint (per-expert w1/w2/w3), as save_pretrained writes them, so
expertflow-compile streams it layer by layer like any downloaded model.

Usage: python examples/big_mixtral_checkpoint.py OUT_DIR LAYERS    (10 layers: 26.3 GiB of experts)
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig

from expertflow.tools.presets import catalog, preset_tokenizer

SHAPE = dict(catalog.LOADS["load-mixtral-8x7b-shaped"][1])


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)


def layer(i: int, gen: torch.Generator, c: MixtralConfig) -> dict[str, torch.Tensor]:
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    p = f"model.layers.{i}."
    out = {p + "self_attn.q_proj.weight": randn(gen, h, h), p + "self_attn.k_proj.weight": randn(gen, kv, h),
           p + "self_attn.v_proj.weight": randn(gen, kv, h), p + "self_attn.o_proj.weight": randn(gen, h, h),
           p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           # a router with spread logits, so that every expert is chosen
           p + "block_sparse_moe.gate.weight": (torch.randn(c.num_local_experts, h, generator=gen)).to(torch.bfloat16)}
    for e in range(c.num_local_experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        out |= {q + "w1.weight": randn(gen, f, h), q + "w2.weight": randn(gen, h, f), q + "w3.weight": randn(gen, f, h)}
    return out


def main(out: Path, layers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shape = {k: v for k, v in SHAPE.items() if k != "dtype"}
    config = MixtralConfig(**{**shape, "num_hidden_layers": layers}, dtype=torch.bfloat16)
    config.save_pretrained(out)
    preset_tokenizer.build(config.vocab_size).save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    shards = [(f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors", i) for i in range(layers)]
    shards.append((f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors", None))
    weight_map, total = {}, 0
    for name, i in shards:
        if i is None:
            h, v = config.hidden_size, config.vocab_size
            tensors = {"model.embed_tokens.weight": randn(gen, v, h), "lm_head.weight": randn(gen, v, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            tensors = layer(i, gen, config)
        save_file(tensors, out / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, name)
        print(f"{name}: {sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30:.2f} GiB", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
    print(f"{out}: {layers} layers, {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
