"""CompiledModel: the compiled graph as a transformers causal LM.

It is a ``PreTrainedModel`` with ``GenerationMixin``, so ``generate`` is transformers' own
(greedy, sampling, beam search, streamers, stopping criteria, logits processors,
``generation_config``, ``return_dict_in_generate``) and ``transformers.pipeline`` accepts it.
Only ``forward`` is ExpertFlow's: it runs the scheduled graph with the expert cache and returns
the causal-LM output transformers' generation reads (``.logits`` and the cache).
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...ir.hf_compat import cached_length, output_cache_field
from ...passes.driver import logits_selector
from .context import RuntimeContext
from .inputs import check_attention_mask, check_input_ids, check_position_ids
from ..store.budget import AutoBudget
from ..cache.records import LayerStats
from ..store.disk import DiskStore
from .batching import Schedule, generate_many
from ..observe.routing import RoutingTrace
from ..observe.timeline import Timeline


#: Outputs transformers' models can add that the compiled graph does not produce.
_UNSUPPORTED_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


class CompiledModel(PreTrainedModel, GenerationMixin):
    """A compiled MoE model running with a fixed budget of expert slots on its device.

    ``runtime.load`` makes one, as a subclass named after the source architecture (so transformers'
    pipelines recognise a causal LM). Its parameters are the dense weights (so ``.device`` and
    ``.dtype`` are transformers'); the experts live in the runtime's cache.

    Threads may share one model: forward steps take turns on a lock (each caller keeps its own
    KV cache), and a step that stops part way (an exception, Ctrl-C) releases what it held in
    the expert cache, so the next call is exact.
    """

    main_input_name = "input_ids"
    # The graph calls the attention the model was compiled with; transformers checks it exists.
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, graph_module: nn.Module, config: PreTrainedConfig, context: RuntimeContext,
                 make_cache: Callable[[], Any], generation_config: GenerationConfig | None = None):
        attn, experts = config._attn_implementation, config._experts_implementation
        super().__init__(config)
        # PreTrainedModel's checks may rewrite these; the graph was traced with the originals.
        config._attn_implementation_internal, config._experts_implementation_internal = attn, experts
        self.graph_module = graph_module
        self.context = context
        # The CPU copy engine's worker thread is stopped and joined when the model is dropped and,
        # at the latest, at interpreter exit (atexit): a thread still copying while the
        # interpreter tears down can abort the process ("terminate called without an active exception").
        weakref.finalize(self, context.cache.engine.close)
        self._step_lock = threading.Lock()
        self.timeline: Timeline | None = None  # runtime.load(timeline=True): the copy and compute streams
        self.budget: AutoBudget | None = None  # what expert_cache="auto" chose (runtime.load)
        self.routing: RoutingTrace | None = None  # runtime.load(record_routing=True): the routes taken
        self.directory: Path | None = None  # the compiled directory (runtime.load): its tokenizer
        self.last_schedule: Schedule | None = None  # what the last generate_many ran
        self._make_cache = make_cache  # the cache class the model's own forward makes (ir/hf_compat.cache_maker)
        self._cache_field = output_cache_field(CausalLMOutputWithPast)
        if generation_config is not None:
            self.generation_config = generation_config
        self.eval()

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:  # transformers reads its class's source to decide
        return True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding: the module the graph applies to its first input (the ids)."""
        graph = self.graph_module.graph
        ids = next(n for n in graph.nodes if n.op == "placeholder")
        for node in ids.users:
            if node.op == "call_module":
                module = self.graph_module.get_submodule(node.target)
                if isinstance(module, nn.Embedding):
                    return module
        raise NotImplementedError("this compiled graph does not start with a token embedding module")

    def new_cache(self) -> Any:
        """An empty cache for this model, the kind its own forward makes: keys and values, and the
        recurrent and convolution states of hybrid layers."""
        return self._make_cache()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """Logits for ``input_ids`` (2-D token ids), appending to the cache when one is given.

        As transformers' causal LMs: the cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values``; ``position_ids`` default to the positions after the cached tokens;
        ``logits_to_keep=N`` keeps the last N positions; ``labels`` give the loss.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: the compiled graph starts at the token embedding; "
                             "pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is missing: pass a 2-D tensor of token ids (batch, sequence)")
        for flag in _UNSUPPORTED_FLAGS:
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported: the compiled graph returns logits and the cache only")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache once, as cache or as past_key_values, not both")
        cache = cache if cache is not None else past_key_values
        ids = check_input_ids(input_ids, self.config.vocab_size).to(self.device)
        batch, seq = ids.shape
        cache = cache if cache is not None else self.new_cache()
        past = cached_length(cache)
        mask = check_attention_mask(attention_mask, batch, past + seq)
        position_ids = check_position_ids(position_ids, batch, seq)
        if position_ids is None:  # one row per sequence, as models that widen them (Qwen4-exp's 3-D rope) expect
            position_ids = (torch.arange(seq, device=self.device) + past).unsqueeze(0).expand(batch, -1)
        position_ids = position_ids.to(self.device)
        # The graph was traced with a 2-D mask (the model builds its masks from it): all ones when none
        # is given, which transformers' mask builders treat as no mask.
        mask = mask.to(self.device) if mask is not None else torch.ones((batch, past + seq), dtype=torch.long,
                                                                        device=self.device)
        keep = logits_selector(logits_to_keep if isinstance(logits_to_keep, int) else logits_to_keep.to(self.device))
        with self._step_lock:  # one step at a time: the expert cache is shared by every caller
            self.context.cache.abort()  # a no-op, unless an interrupt also cut short the last abort
            start = self.timeline.mark() if self.timeline is not None else None
            if self.routing is not None:
                self.routing.begin(batch, seq, past)
            try:
                logits = self.graph_module(ids, mask, position_ids, cache, keep, self.context)
            except BaseException:  # Ctrl-C or an error part way: the next step must find a sane cache
                self.context.cache.abort()
                raise
            if self.timeline is not None:
                kind = "prefill" if past == 0 else "decode"
                self.timeline.add("model", f"{kind} {batch}x{seq}", start, self.timeline.mark(), position=past)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels.to(self.device), vocab_size=self.config.vocab_size)
        out = CausalLMOutputWithPast(loss=loss, logits=logits,
                                     **{self._cache_field: cache if use_cache is not False else None})
        return out if return_dict is not False else out.to_tuple()

    def generate_many(self, prompts: list, batch_size: int = 8, schedule: str = "route-aware",
                      tokenizer: Any = None, continuous: bool | None = None, **generation_kwargs: Any) -> list:
        """One output per prompt, in the caller's order: token-id lists (prompt + new tokens) for
        token-id prompts, text (new tokens only) for strings. Prompts are micro-batched by
        ``schedule``: "route-aware" groups prompts whose routes share experts, "fifo"
        keeps the caller's order (``runtime/generate/batching.py``); ``self.last_schedule`` says what ran.
        ``continuous`` (default: where it applies): finished sequences leave the running batch
        and the waiting prompts that best share its experts join (``runtime/generate/continuous.py``);
        False runs fixed micro-batches through ``generate``. ``generation_kwargs`` are
        generation options (``max_new_tokens``, ``do_sample``, ...); ``max_new_tokens`` may be a
        list with one limit per prompt."""
        outputs, self.last_schedule = generate_many(self, prompts, batch_size, schedule, tokenizer, continuous,
                                                   generation_kwargs)
        return outputs

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``, after checking the ids (a string or a 1-D tensor gets a
        one-line error here, not an AttributeError deep inside)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate needs input_ids: a 2-D tensor of token ids (batch, sequence)")
        check_input_ids(ids, self.config.vocab_size, "input_ids" if inputs is None else "inputs")
        return super().generate(inputs, *args, **kwargs)

    def stats(self) -> dict[str, Any]:
        """Per-layer hits, misses, prefetch accuracy, bytes moved, stall time; and totals."""
        self.context.cache.stall.settle(self.context.cache.stats)  # CUDA: reads the wait events
        per_layer = {layer: asdict(s) for layer, s in self.context.cache.stats.items()}
        total = {k: sum(s[k] for s in per_layer.values()) for k in next(iter(per_layer.values()))}
        for entry in list(per_layer.values()) + [total]:
            entry["prefetch_precision"] = entry["predicted_used"] / entry["predicted"] if entry["predicted"] else None
            entry["prefetch_recall"] = (entry["predicted_used"] / entry["needed"]
                                        if entry["needed"] and entry["predicted"] else None)
            lookups = entry["hits"] + entry["misses"]
            entry["hit_rate"] = entry["hits"] / lookups if lookups else None
        # slots: per pool; a pool holds the experts of every MoE layer of one shape (pools: how many)
        out = {"slots": self.context.cache.slots, "pools": len(self.context.cache.pools), "layers": per_layer,
               "total": total}
        if isinstance(self.context.cache.store, DiskStore):  # the disk tier: what its reads cost
            out["disk"] = self.context.cache.store.stats.to_json()
        return out

    def reset_stats(self) -> None:
        for layer in self.context.cache.stats:
            self.context.cache.stats[layer] = LayerStats()
        self.context.cache.stall.clear()
        reset = getattr(self.context.cache.store, "reset_stats", None)  # the disk tier counts its reads
        if reset is not None:
            reset()

    def extra_repr(self) -> str:
        return f"expert_slots={self.context.cache.slots}, device={self.device}"


@functools.cache
def model_class(architecture: str) -> type[CompiledModel]:
    """CompiledModel under the source architecture's name (``MixtralForCausalLM``): transformers'
    pipelines check a model's class name against the causal LMs they know."""
    if not architecture.isidentifier() or architecture.startswith("_"):
        return CompiledModel
    return type(architecture, (CompiledModel,), {"__module__": __name__, "__qualname__": architecture})
