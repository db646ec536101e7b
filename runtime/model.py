"""CompiledModel: logits and generation over the compiled graph, with a KV cache."""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .context import RuntimeContext


def _mask_functions() -> dict[str, Any]:
    from transformers import masking_utils as mu

    # DeepSeek sparse attention: its indexer reads the mask, so it is never skipped as causal.
    # transformers < 5.23 names that layer kind "deepseek_sparse_attention".
    indexed = functools.partial(mu.create_causal_mask, allow_is_causal_skip=False)
    return {"full_attention": mu.create_causal_mask, "sliding_attention": mu.create_sliding_window_causal_mask,
            "chunked_attention": mu.create_chunked_causal_mask, "indexed_attention": indexed,
            "deepseek_sparse_attention": indexed}


class CompiledModel:
    """A compiled MoE model running with a fixed budget of expert slots on ``device``."""

    def __init__(self, graph_module: nn.Module, config: Any, context: RuntimeContext, device: torch.device,
                 dtype: torch.dtype, mask_kinds: list[str], generation: dict[str, Any]):
        self.graph_module, self.config, self.context = graph_module, config, context
        self.device, self.dtype, self.generation = device, dtype, generation
        self._masks = {k: f for k, f in _mask_functions().items() if k in set(mask_kinds)}

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None) -> torch.Tensor:
        """Logits for ``input_ids``, appending to ``past_key_values`` when given (like HF's forward)."""
        input_ids = input_ids.to(self.device)
        cache = past_key_values if past_key_values is not None else self.new_cache()
        batch, seq = input_ids.shape
        if position_ids is None:
            start = cache.get_seq_length()
            position_ids = (torch.arange(seq, device=self.device) + start).unsqueeze(0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        stub = torch.empty((batch, seq, 0), dtype=self.dtype, device=self.device)
        masks = {kind: fn(config=self.config, inputs_embeds=stub, attention_mask=attention_mask,
                          past_key_values=cache, position_ids=position_ids)
                 for kind, fn in self._masks.items()}
        return self.graph_module(input_ids, position_ids.to(self.device), cache, masks, self.context)

    __call__ = forward

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt plus new tokens, as transformers' generate returns them (left-padded batches).

        Greedy by default. With ``do_sample``: temperature, then ``top_k`` (HF's default 50; 0
        turns it off), then ``top_p``, drawn from ``generator`` (the global RNG when None, as HF).
        Sequences that emit the model's eos token are padded after it; generation stops when all
        have.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        eos, pad = self._stop_tokens()
        cache, tokens, step_ids = self.new_cache(), input_ids, input_ids
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            logits = self.forward(step_ids, attention_mask, position_ids, cache)[:, -1, :].float()
            next_tokens = _choose(logits, do_sample, temperature, top_k, top_p, generator)
            if eos is not None:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                unfinished &= ~torch.isin(next_tokens, eos)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
            if eos is not None and not bool(unfinished.any()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], -1)
            position_ids = position_ids[:, -1:] + 1
            step_ids = next_tokens[:, None]
        return tokens

    def _stop_tokens(self) -> tuple[torch.Tensor | None, int]:
        eos = self.generation.get("eos_token_id")
        if eos is None:
            return None, 0
        eos_list = eos if isinstance(eos, list) else [eos]
        pad = self.generation.get("pad_token_id")
        return torch.tensor(eos_list, device=self.device), eos_list[0] if pad is None else pad

    def stats(self) -> dict[str, Any]:
        """Per-layer hits, misses, prefetch accuracy, bytes moved, stall time; and totals."""
        per_layer = {layer: asdict(s) for layer, s in self.context.cache.stats.items()}
        total = {k: sum(s[k] for s in per_layer.values()) for k in next(iter(per_layer.values()))}
        for entry in list(per_layer.values()) + [total]:
            entry["prefetch_precision"] = entry["predicted_used"] / entry["predicted"] if entry["predicted"] else None
            entry["prefetch_recall"] = (entry["predicted_used"] / entry["needed"]
                                        if entry["needed"] and entry["predicted"] else None)
            lookups = entry["hits"] + entry["misses"]
            entry["hit_rate"] = entry["hits"] / lookups if lookups else None
        return {"slots": self.context.cache.slots, "layers": per_layer, "total": total}

    def reset_stats(self) -> None:
        from .cache import LayerStats

        for layer in self.context.cache.stats:
            self.context.cache.stats[layer] = LayerStats()


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Greedy, or sampling with transformers' warpers in transformers' order (temperature, top-k,
    top-p) and one multinomial draw per step, so a seeded run draws the tokens HF draws."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
