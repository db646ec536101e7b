"""Each pass and verify_graph: (a) the graph's structure after it, (b) numbers equal before and
after (torch.testing.assert_close), (c) a no-op input reports modified=False."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import fx, nn
from torch.testing import assert_close

from conftest import PROMPT_MASK, PROMPTS
from expertflow.ir import ops
from expertflow.ir.skeleton import build_skeleton
from expertflow.passes.dce import dce
from expertflow.passes.functionalize_inplace import functionalize_inplace, is_inplace_method
from expertflow.passes.insert_prefetch import insert_prefetch
from expertflow.passes.lower_experts import lower_experts
from expertflow.passes.manager import PassError, PassManager
from expertflow.passes.options import CompileOptions
from expertflow.passes.pipeline import PIPELINE
from expertflow.passes.schedule import schedule
from expertflow.passes.trace import Driver, TraceInfo, layer_mask_kinds, trace_model
from expertflow.passes.verify import verify_graph
from expertflow.tools import presets


class Reference:
    """An ExecutionContext that computes experts with the original modules and logs every op."""

    def __init__(self, lm: nn.Module, info: TraceInfo):
        self.experts = {layer: lm.get_submodule(path.removeprefix("lm.")) for layer, path in info.experts.items()}
        self.calls: list[tuple[str, int]] = []
        self.predicted: dict[int, torch.Tensor] = {}

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        self.calls.append(("route", layer))

    def prefetch(self, layer: int, expert_ids: torch.Tensor) -> tuple[str, int]:
        self.calls.append(("prefetch", layer))
        self.predicted[layer] = expert_ids.clone()
        return ("handle", layer)

    def wait(self, layer: int, handle: Any, top_k_index: torch.Tensor) -> tuple[str, int]:
        self.calls.append(("wait", layer))
        assert handle in (None, ("handle", layer)), f"layer {layer} waited on {handle}"
        return ("slots", layer)

    def expert_compute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, slots: Any) -> torch.Tensor:
        self.calls.append(("compute", layer))
        assert slots == ("slots", layer)
        return self.experts[layer](hidden, top_k_index, top_k_weights)


@pytest.fixture(scope="module")
def real() -> Callable[[str], nn.Module]:
    """Preset models with real weights, built once."""
    made: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in made:
            made[name] = presets.build(name)
        return made[name]

    return get


def traced(lm: nn.Module) -> tuple[fx.GraphModule, TraceInfo]:
    """A fresh trace of ``lm``'s architecture, on a meta-parameter skeleton as compile does it."""
    return trace_model(build_skeleton(lm.config, torch.float32))


def run(gm: fx.GraphModule, lm: nn.Module, ctx: Reference | None = None) -> torch.Tensor:
    """Runs ``gm``'s graph over ``lm``'s real weights on the shared prompts."""
    from transformers import DynamicCache
    from transformers import masking_utils as mu

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    module = fx.GraphModule(Driver(lm), graph)
    cache = DynamicCache(config=lm.config)
    pos = torch.arange(PROMPTS.shape[1]).unsqueeze(0)
    makers = {"full_attention": mu.create_causal_mask, "sliding_attention": mu.create_sliding_window_causal_mask}
    masks = {k: makers[k](config=lm.config, inputs_embeds=torch.empty(*PROMPTS.shape, 0),
                          attention_mask=PROMPT_MASK, past_key_values=cache, position_ids=pos)
             for k in set(layer_mask_kinds(lm.config))}
    with torch.no_grad():
        return module(PROMPTS, pos, cache, masks, *([ctx] if ctx is not None else []))


def hf_logits(lm: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return lm(PROMPTS, attention_mask=PROMPT_MASK).logits


def of(gm: fx.GraphModule, op: Callable) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is op]


def ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def lowered(lm: nn.Module, **options: Any) -> tuple[fx.GraphModule, TraceInfo]:
    gm, info = traced(lm)
    for p in (functionalize_inplace, lower_experts, insert_prefetch):
        p(gm, CompileOptions(**options))
    return gm, info


# --- functionalize_inplace and dce ------------------------------------------------------------

def group_mask(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(x)
    mask.scatter_(1, idx, 1.0)  # result unused: the mutation is the point (DeepSeek's group mask)
    return x * mask


def test_functionalize_keeps_an_unused_inplace_result_through_dce() -> None:
    x, idx = torch.randn(3, 5), torch.tensor([[0], [2], [4]])
    plain = fx.symbolic_trace(group_mask)
    plain.graph.eliminate_dead_code()  # fx thinks call_method is pure: the scatter_ goes
    plain.recompile()
    assert "scatter_" not in plain.code
    assert not torch.allclose(plain(x, idx), group_mask(x, idx)), "fx DCE should have broken this graph"

    gm = fx.symbolic_trace(group_mask)
    scatter = next(n for n in gm.graph.nodes if n.target == "scatter_")
    mul = next(n for n in gm.graph.nodes if n.target is operator.mul)
    assert mul.args[1] is scatter.args[0] and not scatter.users  # Before: mul reads the receiver
    assert functionalize_inplace(gm).modified
    assert mul.args[1] is scatter  # Expected: mul reads the mutation, so nothing can drop it
    dce(gm)
    gm.recompile()
    assert "scatter_" in gm.code
    assert_close(gm(x, idx), group_mask(x, idx))
    assert not functionalize_inplace(gm).modified and not dce(gm).modified


def test_functionalize_inplace_on_deepseek_router(real) -> None:
    lm = real("tiny-deepseek-v3")
    gm, _ = traced(lm)
    scatters = [n for n in gm.graph.nodes if is_inplace_method(n)]
    assert scatters and all(not n.users for n in scatters)
    assert functionalize_inplace(gm).modified
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in scatters:
        assert node.users, node.format_node()
        late = [u for u in node.args[0].users if u is not node and order[u] > order[node]]
        assert not late, f"{late} still read the receiver of {node.format_node()}"
    assert not functionalize_inplace(gm).modified
    assert not functionalize_inplace(traced(real("tiny-mixtral"))[0]).modified  # no in-place call
    dce(gm)
    assert_close(run(gm, lm), hf_logits(lm))  # router masks intact: same logits as transformers


def test_dce_removes_dead_values_and_keeps_side_effects() -> None:
    graph = fx.Graph()
    x, ctx = graph.placeholder("x"), graph.placeholder("ef_ctx")
    graph.call_function(operator.add, (x, 1))                        # dead
    graph.call_function(ops.prefetch, (ctx, 0, x))                  # handle unused, copy still wanted
    graph.call_method("add_", (graph.call_function(torch.zeros_like, (x,)), 1))  # in-place, kept
    graph.output(graph.call_function(operator.mul, (x, 2)))
    gm = fx.GraphModule(nn.Module(), graph)
    assert dce(gm).modified
    assert [n.name for n in gm.graph.nodes] == ["x", "ef_ctx", "prefetch", "zeros_like", "add_", "mul", "output"]
    assert not dce(gm).modified


# --- lower_experts ----------------------------------------------------------------------------

def test_lower_experts_structure(real) -> None:
    gm, info = traced(real("tiny-mixtral"))
    experts = [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("ef.role") == "experts"]
    assert [n.meta["ef.layer"] for n in experts] == [0, 1, 2, 3]
    assert lower_experts(gm).modified
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target in info.experts.values()]
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-1] == "ef_ctx" and placeholders.count("ef_ctx") == 1
    for layer, compute in zip(range(4), of(gm, ops.expert_compute)):
        route, wait = compute.args[3], compute.args[5]
        assert (route.target, wait.target) == (ops.route, ops.wait)
        assert compute.args[1] == route.args[1] == wait.args[1] == layer
        assert wait.args[2] is None and wait.args[3] is route  # route -> wait -> expert_compute
        assert compute.meta["ef.block_input"] == f"lm_model_layers_{layer}_post_attention_layernorm"
    gm.recompile()
    assert "expertflow_ir_ops_wait(ef_ctx, 3, None, route_3)" in gm.code
    assert not lower_experts(gm).modified


def test_lower_experts_computes_what_the_modules_computed(real) -> None:
    lm = real("tiny-mixtral")
    gm, info = traced(lm)
    before = run(gm, lm)
    assert_close(before, hf_logits(lm))  # the front end itself is exact
    lower_experts(gm)
    ref = Reference(lm, info)
    assert_close(run(gm, lm, ref), before)
    assert ref.calls == [(op, layer) for layer in range(4) for op in ("route", "wait", "compute")]


def test_lower_experts_without_moe_is_a_no_op() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    gm, info = trace_model(build_skeleton(config, torch.float32))
    code = gm.code
    assert not info.experts
    for p in PIPELINE:
        assert not p(gm, CompileOptions()).modified, p.__name__
    gm.recompile()
    assert gm.code == code


def test_lower_experts_names_the_unannotated_node(real) -> None:
    gm, _ = traced(real("tiny-mixtral"))
    node = next(n for n in gm.graph.nodes if n.meta.get("ef.role") == "experts")
    del node.meta["ef.layer"]
    with pytest.raises(PassError) as info:
        lower_experts(gm)
    assert str(info.value) == f"[lower_experts] experts call has no ef.layer annotation at {node.format_node()}"
