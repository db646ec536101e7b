"""Every supported architecture, end to end: compile, run at three budgets, match HF exactly.

The budgets: 1 slot (the minimum), EVICT slots (fewer than the experts one layer touches in the
prefill of the prompt batch, so a single step must evict and compute in waves), and all experts
resident. At each the logits of the padded two-prompt batch match transformers' own forward and
32 greedy tokens match transformers' generate. Also: untraceable modules and dense models fail
with errors that say which module and why.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import ARCHS, EVICT, NEW_TOKENS, PROMPT_MASK, PROMPTS
from torch import nn

from expertflow import runtime
from expertflow.ir import ops
from expertflow.ir.skeleton import build_skeleton
from expertflow.passes.insert_prefetch import ancestors
from expertflow.passes.options import CompileOptions
from expertflow.passes.pipeline import compile_graph
from expertflow.passes.trace import TraceFailure, is_experts_module
from expertflow.runtime.assemble import derive
from expertflow.runtime.generate.model import CompiledModel
from expertflow.tools.presets import catalog as presets
from expertflow.tools.cli.compile import compile_model
from expertflow.tools.make.source import UserError




def _moe_layers(path: Path) -> list[int]:
    return sorted(d["layer"] for d in json.loads((path / "manifest.json").read_text())["layouts"])


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("budget", [1, EVICT, None], ids=["1slot", f"{EVICT}slots", "resident"])
def test_exact_against_transformers(name: str, budget: int | None, compiled_dir, hf_reference) -> None:
    path = compiled_dir(name)
    _, hf_logits, hf_tokens = hf_reference(name)
    model = runtime.load(path, expert_cache=budget)
    logits = model(PROMPTS, attention_mask=PROMPT_MASK).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=0)
    if budget == EVICT:
        _assert_prefill_evicted(model, len(_moe_layers(path)))
    tokens = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS)
    # A preset that stops at once would make the token check trivial: the presets are tuned not to.
    assert hf_tokens.shape[1] >= PROMPTS.shape[1] + 8, f"{name} emits eos early: {hf_tokens.tolist()}"
    assert torch.equal(tokens, hf_tokens), f"{name} at {budget} slots:\n{tokens}\nHF:\n{hf_tokens}"


def _assert_prefill_evicted(model: CompiledModel, moe_layers: int) -> None:
    """The prefill alone needed more experts in some layer than the budget holds."""
    stats = model.stats()
    assert stats["slots"] == EVICT
    most = max(s["needed"] for s in stats["layers"].values())
    assert most > EVICT, f"no layer touches more than {EVICT} experts in the prefill: pick a smaller EVICT"
    assert stats["total"]["waves"] > moe_layers and stats["total"]["misses"] > 0, stats["total"]


# Architecture features each preset is meant to exercise: check they are really there.

def test_dense_layers_are_skipped(compiled_dir) -> None:
    assert _moe_layers(compiled_dir("tiny-qwen2-moe")) == [1, 3]  # decoder_sparse_step=2
    assert _moe_layers(compiled_dir("tiny-deepseek-v3")) == [1, 2, 3]  # first_k_dense_replace=1


def test_gpt_oss_has_sliding_layers(compiled_dir) -> None:
    """Both kinds of layer, and the graph builds both masks with transformers' own builders."""
    manifest = json.loads((compiled_dir("tiny-gpt-oss") / "manifest.json").read_text())
    assert {"sliding_attention", "full_attention"} <= set(manifest["config"]["layer_types"])
    graph = json.loads((compiled_dir("tiny-gpt-oss") / "graph.json").read_text())
    targets = {n["target"] for n in graph["nodes"] if n["op"] == "call_function"}
    assert {"transformers.masking_utils.create_causal_mask",
            "transformers.masking_utils.create_sliding_window_causal_mask"} <= targets


def test_granite_multipliers_are_not_one(hf_reference) -> None:
    config = hf_reference("tiny-granitemoe")[0].config
    for key in ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier"):
        assert getattr(config, key) != 1.0, key


def test_deepseek_group_mask_scatter_survives(compiled_dir) -> None:
    """The in-place ``scatter_`` of the group-limited router feeds every router and every predictor."""
    graph = runtime.load(compiled_dir("tiny-deepseek-v3"), expert_cache=1).graph_module.graph
    targets = [n for n in graph.nodes if n.target in (ops.route, ops.predict)]
    assert sorted(n.target.__name__ for n in targets) == ["predict"] * 3 + ["route"] * 3  # 3 MoE layers
    for node in targets:
        up = ancestors(node)
        assert any(n.op == "call_method" and n.target == "scatter_" for n in up), node.format_node()
        assert any(n.op == "get_attr" and n.target.endswith("e_score_correction_bias") for n in up), node.name


def test_deepseek_correction_bias_matters(hf_reference) -> None:
    """The preset's non-zero selection bias changes routing, so exactness covers that term."""
    hf, logits, _ = hf_reference("tiny-deepseek-v3")
    biases = [b for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    saved = [b.clone() for b in biases]
    try:
        for b in biases:
            b.zero_()
        with torch.no_grad():
            unbiased = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
    finally:
        for b, s in zip(biases, saved):
            b.copy_(s)
    assert (unbiased - logits).abs().max() > 1e-3


# Failures: they name the module and the reason.

def _branchy_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.sum() > 0:  # Python control flow on a tensor's value: cannot be traced
        return hidden_states
    return -hidden_states


def _row_loop_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return torch.stack([row * 2 for row in hidden_states])  # as many rows as the batch has


@pytest.mark.parametrize("forward, reason", [(_branchy_forward, "control flow"),
                                             (_row_loop_forward, "cannot iterate")])
def test_untraceable_module_is_named(forward, reason: str, monkeypatch) -> None:
    skeleton = build_skeleton(_preset_config("tiny-qwen3-moe"), torch.float32)
    block = type(skeleton.model.layers[0].mlp)
    monkeypatch.setattr(block, "forward", forward)
    with pytest.raises(TraceFailure) as err:
        compile_graph(skeleton)
    assert err.value.module == "lm.model.layers.0.mlp"
    assert f"'lm.model.layers.0.mlp' ({block.__name__})" in str(err.value)
    assert reason in str(err.value)


def _layer_cache(self: nn.Module, kwargs: dict) -> Any:
    cache = kwargs["past_key_values"] if "past_key_values" in kwargs else kwargs["cache"]  # 5.24 renamed it
    return cache.layers[self.self_attn.layer_idx]


def _appends_history(original: Any) -> Any:
    """A decoder layer that keeps the history of its inputs' first feature on its cache layer, as
    Qwen4-exp keeps its indexer positions, and adds the history's mean to its output."""
    def forward(self, hidden_states, *args, **kwargs):
        layer = _layer_cache(self, kwargs)
        if layer.seen_inputs is not None if hasattr(layer, "seen_inputs") else False:
            seen = torch.cat([layer.seen_inputs, hidden_states[..., :1]], dim=1)
        else:
            seen = hidden_states[..., :1]
        layer.seen_inputs = seen
        return original(self, hidden_states, *args, **kwargs) + 0.1 * seen.mean(dim=1, keepdim=True)
    return forward


def _reads_state(original: Any) -> Any:
    def forward(self, hidden_states, *args, **kwargs):
        return original(self, hidden_states, *args, **kwargs) + _layer_cache(self, kwargs).seen_inputs
    return forward


def test_state_kept_on_the_cache_is_carried_and_any_other_use_refused(tmp_path, model_dir, monkeypatch) -> None:
    """History a forward appends to on its cache layer is carried by the graph (``ops.cache_state``,
    ``extend_state``, ``set_cache_state``), step after step as in eager transformers; state read
    and used otherwise is refused, naming the module."""
    from transformers import AutoModelForCausalLM

    from expertflow.ir.hf_compat import new_cache

    monkeypatch.setattr(derive, "_CACHE", OrderedDict())  # the loader derives this graph, not the unpatched one
    layer_cls = type(build_skeleton(_preset_config("tiny-qwen3-moe"), torch.float32).model.layers[0])
    original = layer_cls.forward
    monkeypatch.setattr(layer_cls, "forward", _reads_state(original))
    with pytest.raises(TraceFailure, match=r"'lm.model.layers.0': its forward reads cache.layers.0.seen_inputs, "
                                           "state it keeps there, used otherwise than by appending to it"):
        compile_graph(build_skeleton(_preset_config("tiny-qwen3-moe"), torch.float32))
    monkeypatch.setattr(layer_cls, "forward", _appends_history(original))
    gm, _ = compile_graph(build_skeleton(_preset_config("tiny-qwen3-moe"), torch.float32))
    layers = _preset_config("tiny-qwen3-moe").num_hidden_layers
    for op in (ops.cache_state, ops.extend_state, ops.set_cache_state):
        assert len([n for n in gm.graph.nodes if n.target is op]) == layers, op
    out = compile_model(str(model_dir("tiny-qwen3-moe")), tmp_path / "c", CompileOptions(), dumps=False, quiet=True)
    hf = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen3-moe"), dtype=torch.float32).eval()
    model = runtime.load(out, expert_cache=EVICT)
    caches, ids, mask = (new_cache(hf), model.new_cache()), PROMPTS, PROMPT_MASK
    for _ in range(3):  # the prefill, then two steps that read the history it left
        with torch.no_grad():
            want = hf(input_ids=ids, attention_mask=mask, past_key_values=caches[0]).logits
        got = model(ids, attention_mask=mask, cache=caches[1]).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        ids, mask = want[:, -1:].argmax(-1), torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    assert caches[1].layers[0].seen_inputs.shape[1] == PROMPTS.shape[1] + 2
    with pytest.raises(ValueError, match=r"keeps state on its cache \(seen_inputs\) that continuous batching"):
        model.generate_many([[5, 6, 7], [8, 9]], max_new_tokens=2, continuous=True)
    assert len(model.generate_many([[5, 6, 7], [8, 9]], max_new_tokens=2)) == 2  # fixed micro-batches


def test_module_branching_on_the_device_runs_whole(tmp_path, model_dir, compiled_dir, hf_reference,
                                                   monkeypatch) -> None:
    """A module whose forward branches on the device (Kolibri's router, Ergo's router linear) and
    holds no experts is kept whole: a leaf that decides where the compiled model runs. The router's
    leaf still feeds ``route``, the cross-layer gate's copies call it on earlier layers' inputs, and
    the tokens are HF's."""
    name = "tiny-qwen3-moe"
    traced = runtime.load(compiled_dir(name), expert_cache=1).graph_module.graph
    assert not any(n.op == "call_module" and n.target.endswith(".mlp.gate") for n in traced.nodes)
    router = type(build_skeleton(_preset_config(name), torch.float32).model.layers[0].mlp.gate)
    original = router.forward

    def forward(self: nn.Module, hidden_states: torch.Tensor):
        if hidden_states.is_cuda:  # fixed where the compiled model runs, not when it is compiled
            return original(self, hidden_states)
        return original(self, hidden_states)

    monkeypatch.setattr(router, "forward", forward)
    # Derivations are cached per process by config and options, which assumes the modeling code fixed.
    monkeypatch.setattr(derive, "_CACHE", OrderedDict())
    model = runtime.load(compile_model(str(model_dir(name)), tmp_path / "c", CompileOptions(), quiet=True),
                         expert_cache=1)
    graph = model.graph_module.graph
    gates = {n for n in graph.nodes if n.op == "call_module" and n.target.endswith(".mlp.gate")}
    for target in (ops.route, ops.predict):
        calls = [n for n in graph.nodes if n.target is target]
        assert calls and all(gates & ancestors(n) for n in calls), target.__name__
    _, hf_logits, hf_tokens = hf_reference(name)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, hf_logits, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS), hf_tokens)


def _preset_config(name: str):
    class_name, kwargs = presets.PRESETS[name]
    return getattr(transformers, class_name)(**{k: v for k, v in kwargs.items() if k != "attn_implementation"})


def test_dense_model_is_refused(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(TraceFailure, match="has no MoE layer"):
        compile_graph(build_skeleton(config, torch.float32))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="LlamaForCausalLM has no MoE layer"):
        compile_model(str(tmp_path / "llama"), tmp_path / "out", CompileOptions(), quiet=True)
    assert not (tmp_path / "out").exists()


def test_llama4_runs_only_the_chosen_experts_and_is_bit_exact(tmp_path) -> None:
    """transformers' Llama 4 runs every expert on every token (router scores scale the inputs);
    compiled, its blocks call the chosen experts only (``ir/input_scaled.py``), at any budget,
    bit for bit: two experts per token and dense layers between MoE layers, so waves at EVICT
    slots add two experts per row in an order of their own."""
    from expertflow.ir.input_scaled import InputScaledExperts
    from expertflow.tools.presets.tiny_config import build_tiny

    hf = build_tiny("llama4_text", num_experts_per_tok=2, moe_layers=[0, 2])
    hf.save_pretrained(tmp_path / "hf")
    out = compile_model(str(tmp_path / "hf"), tmp_path / "compiled", CompileOptions(), dumps=False, quiet=True)
    skeleton = build_skeleton(hf.config, torch.float32)
    moe = [i for i, layer in enumerate(skeleton.model.layers)
           if isinstance(getattr(layer.feed_forward, "experts", None), InputScaledExperts)]
    assert _moe_layers(out) == moe and 0 < len(moe) < hf.config.num_hidden_layers
    graph = json.loads((out / "graph.json").read_text())
    assert "permute" not in json.dumps(graph), "rows of input-scaled experts must stay in place"
    with torch.no_grad():
        ref = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
        tokens = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=16, do_sample=False)
    for budget in (1, EVICT, None):
        model = runtime.load(out, expert_cache=budget)
        torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, ref, atol=0, rtol=0)
        assert torch.equal(model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=16), tokens)
    one = runtime.load(out, expert_cache=None)
    one(PROMPTS[1:, -1:])
    needed = [s["needed"] for s in one.stats()["layers"].values()]
    assert max(needed) <= 2 < hf.config.num_local_experts, needed  # one token: its two experts, not all


def test_experts_outside_the_interface_are_named() -> None:
    """Stacked experts built without the experts interface, and not rewritten to it (Llama 4's, as
    transformers builds them): the refusal names the experts module rather than calling the
    model dense."""
    from transformers import AutoModelForCausalLM

    from expertflow.ir.skeleton import params_on_meta
    from expertflow.passes.driver import not_moe_reason
    from expertflow.tools.presets.tiny_config import tiny_config

    with params_on_meta():
        dense = AutoModelForCausalLM.from_config(tiny_config("llama4_text"))
    assert not any(is_experts_module(m) for m in dense.modules())
    assert "its experts ('model.layers.0.feed_forward.experts', Llama4TextExperts) do not use transformers' " \
           "experts interface" in not_moe_reason(dense)
