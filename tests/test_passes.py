"""Each pass and verify_graph: (a) the graph's structure after it, (b) numbers equal before and
after (torch.testing.assert_close), (c) a no-op input reports modified=False."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import fx, nn
from torch.testing import assert_close

from conftest import PROMPT_MASK, PROMPTS
from expertflow.ir import ops
from expertflow.ir.hf_compat import new_cache
from expertflow.ir.skeleton import build_skeleton
from expertflow.passes.dce import dce
from expertflow.passes.functionalize_inplace import functionalize_inplace, is_inplace_method
from expertflow.passes.insert_permute import insert_permute
from expertflow.passes.insert_prefetch import ancestors, insert_prefetch
from expertflow.passes.insert_reuse import insert_reuse
from expertflow.passes.lower_experts import lower_experts
from expertflow.passes.manager import PassError, PassManager, PassResult
from expertflow.passes.options import CompileOptions
from expertflow.passes.schedule import schedule
from expertflow.passes.driver import logits_selector
from expertflow.passes.trace import Driver, TraceInfo, trace_model
from expertflow.passes.verify import verify_graph
from expertflow.runtime.predict.route_tables import RouteTables
from expertflow.tools.presets import catalog as presets


class Reference:
    """An ExecutionContext that computes experts with the original modules and logs every op."""

    def __init__(self, lm: nn.Module, info: TraceInfo):
        self.experts = {layer: lm.get_submodule(path.removeprefix("lm.")) for layer, path in info.experts.items()}
        self.calls: list[tuple[str, int]] = []
        self.predicted: dict[int, torch.Tensor] = {}

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        self.calls.append(("route", layer))

    def prefetch(self, layer: int, expert_ids: torch.Tensor, copy: bool = True) -> tuple[str, int]:
        self.calls.append(("prefetch" if copy else "hint", layer))
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

    def permute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                slots: Any) -> tuple[torch.Tensor, ...]:
        """A random order of the tokens: the graph's unpermute must undo any permutation."""
        self.calls.append(("permute", layer))
        perm = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(layer))
        return hidden[perm], top_k_index[perm], top_k_weights[perm], perm


@functools.cache
def real(name: str) -> nn.Module:
    """A preset with its real (seeded) weights, built once per session."""
    return presets.build(name)


def traced(lm: nn.Module) -> tuple[fx.GraphModule, TraceInfo]:
    """A fresh trace of ``lm``'s architecture, on a meta-parameter skeleton as compile does it."""
    return trace_model(build_skeleton(lm.config, torch.float32))


def run(gm: fx.GraphModule, lm: nn.Module, ctx: Reference | None = None) -> torch.Tensor:
    """Runs ``gm``'s graph over ``lm``'s real weights on the shared prompts."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    module = fx.GraphModule(Driver(lm), graph)
    cache = new_cache(lm)
    pos = torch.arange(PROMPTS.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return module(PROMPTS, PROMPT_MASK, pos, cache, logits_selector(0), *([ctx] if ctx is not None else []))


def hf_logits(lm: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return lm(PROMPTS, attention_mask=PROMPT_MASK).logits


def of(gm: fx.GraphModule, op: Callable) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is op]


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


def test_functionalize_inplace_on_deepseek_router() -> None:
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

def test_lower_experts_structure() -> None:
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


def test_lower_experts_computes_what_the_modules_computed() -> None:
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
    for p in (functionalize_inplace, lower_experts, insert_prefetch):  # the MoE passes
        assert not p(gm, CompileOptions()).modified, p.__name__
    gm.recompile()
    assert gm.code == code and "ef_ctx" not in code


def test_lower_experts_names_the_unannotated_node() -> None:
    gm, _ = traced(real("tiny-mixtral"))
    node = next(n for n in gm.graph.nodes if n.meta.get("ef.role") == "experts")
    del node.meta["ef.layer"]
    with pytest.raises(PassError) as info:
        lower_experts(gm)
    assert str(info.value) == f"[lower_experts] experts call has no ef.layer annotation at {node.format_node()}"


# --- insert_prefetch --------------------------------------------------------------------------

def predictor(gm: fx.GraphModule, layer: int) -> tuple[list[fx.Node], str]:
    """Layer ``layer``'s copied router, and the name of the one value it reads from the graph."""
    copies = [n for n in gm.graph.nodes if n.meta.get("ef.role") == "predictor" and n.meta["ef.layer"] == layer]
    (source,) = {a for n in copies for a in n.all_input_nodes if a not in copies}
    return copies, source.name


def test_insert_prefetch_structure() -> None:
    gm, _ = lowered(real("tiny-mixtral"))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    computes = of(gm, ops.expert_compute)
    for j, compute in enumerate(computes):
        prefetch, route = compute.args[5].args[2], compute.args[3]
        assert prefetch.target is ops.prefetch and prefetch.args[1] == j
        assert prefetch.args[2].target is ops.predict and prefetch.args[2].args[1] == j
        assert order[prefetch] < order[route], f"layer {j}: prefetch issued after its own route"
        copies, source = predictor(gm, j)
        assert {n.target for n in copies if n.op == "get_attr"} == {f"lm.model.layers.{j}.mlp.gate.weight"}
        assert source == ("lm_model_embed_tokens" if j == 0 else f"lm_model_layers_{j - 1}_post_attention_layernorm")
        if j > 0:  # it overlaps layer j-1's experts: nothing of that compute feeds it
            assert computes[j - 1] not in ancestors(prefetch) and order[prefetch] < order[computes[j - 1]]
    assert not insert_prefetch(gm, CompileOptions()).modified  # every wait already has a handle


def test_insert_prefetch_predicts_with_the_next_router() -> None:
    lm = real("tiny-mixtral")
    gm, info = lowered(lm)
    seen: dict[str, torch.Tensor] = {}
    hooks = [lm.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.__setitem__("embed", out))]
    for i, layer in enumerate(lm.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(f"moe{i}", args[0])))
    try:
        expected_logits = hf_logits(lm)
    finally:
        for h in hooks:
            h.remove()
    ref = Reference(lm, info)
    assert_close(run(gm, lm, ref), expected_logits)  # predicting changes no number
    for j in range(4):
        hidden = seen["embed"] if j == 0 else seen[f"moe{j - 1}"]
        with torch.no_grad():
            _, _, expected = lm.model.layers[j].mlp.gate(hidden)
        assert torch.equal(ref.predicted[j], expected), f"layer {j}"
    assert ref.calls.index(("prefetch", 1)) < ref.calls.index(("compute", 0))
    assert ref.calls.index(("prefetch", 3)) < ref.calls.index(("compute", 2))


def test_insert_prefetch_lookahead_and_none() -> None:
    gm, _ = lowered(real("tiny-mixtral"), lookahead=2)
    assert [predictor(gm, j)[1] for j in range(4)] == [
        "lm_model_embed_tokens", "lm_model_embed_tokens",
        "lm_model_layers_0_post_attention_layernorm", "lm_model_layers_1_post_attention_layernorm"]
    gm, _ = traced(real("tiny-mixtral"))
    lower_experts(gm)
    assert not insert_prefetch(gm, CompileOptions(predictor="none")).modified
    assert not of(gm, ops.prefetch) and all(w.args[2] is None for w in of(gm, ops.wait))


class TableReference(Reference):
    """A Reference that also answers the trace predictors, from seeded random count tables."""

    def __init__(self, lm: nn.Module, info: TraceInfo, layers: int = 4, experts: int = 4, k: int = 2):
        super().__init__(lm, info)
        gen = torch.Generator().manual_seed(0)
        self.tables = RouteTables(torch.randint(0, 50, (layers, experts), generator=gen).float(),
                                  torch.randint(0, 50, (layers, experts, experts), generator=gen).float(),
                                  {j: j for j in range(layers)}, k)
        self.previous: dict[int, torch.Tensor] = {}

    def predict_frequency(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(("predict_frequency", layer))
        return self.tables.predict_frequency(layer, hidden.reshape(-1, hidden.shape[-1]).shape[0])

    def predict_transition(self, layer: int, previous_index: torch.Tensor) -> torch.Tensor:
        self.calls.append(("predict_transition", layer))
        self.previous[layer] = previous_index.clone()
        return self.tables.predict_transition(layer, previous_index)


def _brute_transition(tables: RouteTables, j: int, previous: list[int]) -> list[int]:
    """Layer j's k likeliest experts after ``previous``, by hand: summed counts, then popularity, then id."""
    n = tables.frequency.shape[1]
    score = [sum(float(tables.transition[j, a, b]) for a in previous) + 1e-3 * float(tables.frequency[j, b])
             for b in range(n)]
    return sorted(range(n), key=lambda b: (-score[b], b))[:tables.top_k]


@pytest.mark.parametrize("kind", ["transition", "frequency"])
def test_insert_prefetch_trace_predictors(kind: str) -> None:
    lm = real("tiny-mixtral")
    gm, info = lowered(lm, predictor=kind)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    computes = of(gm, ops.expert_compute)
    embed = next(n for n in gm.graph.nodes if n.meta.get("ef.role") == "embed")
    prefetches = [c.args[5].args[2] for c in computes]
    assert [order[p] for p in prefetches] == sorted(order[p] for p in prefetches)  # issued in depth order
    for j, (compute, prefetch) in enumerate(zip(computes, prefetches)):
        guess = prefetch.args[2].args[2]
        if kind == "transition" and j > 0:  # from layer j-1's true route, before layer j-1's wait
            route = ops.unpermuted(computes[j - 1].args[3])
            assert guess.target is ops.predict_transition and guess.args[2] is route and route.target is ops.route
            assert order[prefetch] < order[computes[j - 1].args[5]]
        else:
            assert guess.target is ops.predict_frequency and guess.args[2] is embed
    assert not insert_prefetch(gm, CompileOptions(predictor=kind)).modified
    n, k = lm.config.num_local_experts, lm.config.num_experts_per_tok
    ref = TableReference(lm, info, len(computes), n, k)
    assert_close(run(gm, lm, ref), hf_logits(lm))  # predicting changes no number
    for j in range(len(computes)):
        if kind == "transition" and j > 0:
            want = [_brute_transition(ref.tables, j, row) for row in ref.previous[j].reshape(-1, k).tolist()]
        else:
            top = sorted(range(n), key=lambda b: (-float(ref.tables.frequency[j, b]), b))[:k]
            want = [top] * PROMPTS.numel()
        assert ref.predicted[j].tolist() == want, f"layer {j}"


class PathReference(Reference):
    """A Reference that answers the routing-path ops with fixed guesses and keeps what they read."""

    def __init__(self, lm: nn.Module, info: TraceInfo, k: int):
        super().__init__(lm, info)
        self.k, self.read = k, {}

    def predict_path(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(("predict_path", -1))
        self.read["embeds"] = hidden.clone()
        return torch.zeros(hidden.shape[:-1].numel(), 4, self.k, dtype=torch.long)

    def refine_path(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(("refine_path", -1))
        self.read["refine"] = (embeds.clone(), hidden.clone())
        return torch.ones(hidden.shape[:-1].numel(), 3, self.k, dtype=torch.long)

    def path_context(self, hidden: torch.Tensor) -> None:
        self.calls.append(("path_context", -1))

    def predict_reuse(self, embeds: torch.Tensor) -> None:
        self.calls.append(("predict_reuse", -1))
        self.read["reuse"] = embeds.clone()


def test_insert_prefetch_routing_path_with_its_second_stage() -> None:
    lm = real("tiny-mixtral")
    gm, info = lowered(lm, predictor="routing_path")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    computes = of(gm, ops.expert_compute)
    (paths,), (refined,) = of(gm, ops.predict_path), of(gm, ops.refine_path)
    embed = next(n for n in gm.graph.nodes if n.meta.get("ef.role") == "embed")
    output = refined.args[2]
    assert paths.args[1] is embed and refined.args[1] is embed
    # layer 0's output: the first node the next decoder layer reads, right where refine_path sits
    assert output.next is refined and order[computes[0]] < order[refined] < order[of(gm, ops.route)[1]]
    for j, compute in enumerate(computes):
        picked = compute.args[5].args[2].args[2].args[2]
        assert picked.target is ops.path_layer and picked.args == ((paths, 0) if j == 0 else (refined, j - 1))
    assert not insert_prefetch(gm, CompileOptions(predictor="routing_path")).modified
    seen = {}
    hook = lm.model.layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    try:
        expected = hf_logits(lm)
    finally:
        hook.remove()
    ref = PathReference(lm, info, lm.config.num_experts_per_tok)
    assert_close(run(gm, lm, ref), expected)  # predicting changes no number
    layer0 = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert_close(ref.read["refine"][1], layer0, rtol=0, atol=0)
    assert_close(ref.read["refine"][0], ref.read["embeds"], rtol=0, atol=0)
    assert [ref.predicted[j].unique().tolist() for j in range(4)] == [[0], [1], [1], [1]]
    assert ref.calls.index(("prefetch", 0)) < ref.calls.index(("compute", 0)) < ref.calls.index(("refine_path", -1))
    assert ref.calls.index(("refine_path", -1)) < ref.calls.index(("prefetch", 1)) < ref.calls.index(("route", 1))


def test_insert_prefetch_hint_mode() -> None:
    """prefetch="hint": the same predictions, each prefetch told not to copy (a fourth argument)."""
    lm = real("tiny-mixtral")
    copy, _ = lowered(lm)
    gm, info = lowered(lm, prefetch="hint")
    assert len(of(gm, ops.prefetch)) == len(of(copy, ops.prefetch)) == 4
    assert all(n.args[3] is False for n in of(gm, ops.prefetch)) and all(len(n.args) == 3 for n in of(copy, ops.prefetch))
    ref = Reference(lm, info)
    assert_close(run(gm, lm, ref), hf_logits(lm))
    assert [c for c in ref.calls if c[0] in ("prefetch", "hint")] == [("hint", j) for j in range(4)]


def test_insert_reuse_structure_numbers_and_no_op() -> None:
    lm = real("tiny-mixtral")
    gm, info = lowered(lm, predictor="routing_path", policy="predictive")
    assert not of(gm, ops.predict_reuse)  # lowered() stops at insert_prefetch
    assert insert_reuse(gm, CompileOptions(predictor="routing_path", policy="predictive")).modified
    (paths,), (reuse,) = of(gm, ops.predict_path), of(gm, ops.predict_reuse)
    assert paths.next is reuse and reuse.args[1] is paths.args[1]  # the same embedding, right after
    assert not insert_reuse(gm, CompileOptions(predictor="routing_path", policy="predictive")).modified
    ref = PathReference(lm, info, lm.config.num_experts_per_tok)
    assert_close(run(gm, lm, ref), hf_logits(lm))
    assert ref.calls.index(("predict_path", -1)) + 1 == ref.calls.index(("predict_reuse", -1))
    assert_close(ref.read["reuse"], ref.read["embeds"], rtol=0, atol=0)
    for options in (CompileOptions(predictor="routing_path", policy="lru"), CompileOptions(policy="predictive")):
        other, _ = lowered(lm, predictor=options.predictor, policy=options.policy)
        assert not insert_reuse(other, options).modified and not of(other, ops.predict_reuse)


# --- insert_permute ---------------------------------------------------------------------------

def test_insert_permute_structure_and_numbers() -> None:
    lm = real("tiny-mixtral")
    gm, info = lowered(lm)
    before = run(gm, lm, Reference(lm, info))
    assert insert_permute(gm, CompileOptions()).modified
    verify_graph(gm)
    for compute in of(gm, ops.expert_compute):
        permute = ops.permute_of(compute)
        assert permute is not None and permute.args[1] == compute.args[1]
        assert [a.args for a in compute.args[2:5]] == [(permute, 0), (permute, 1), (permute, 2)]
        (undo,) = compute.users
        assert undo.target is ops.unpermute and undo.args == (next(u for u in permute.users if u.args[1] == 3),
                                                               compute)
        assert all(user.target is not ops.expert_compute for user in undo.users)
    gm.recompile()
    ctx = Reference(lm, info)
    assert_close(run(gm, lm, ctx), before)  # random token orders, undone exactly
    assert [c for c in ctx.calls if c[0] == "permute"] == [("permute", layer) for layer in info.experts]
    assert_close(before, hf_logits(lm))


def test_insert_permute_keeps_input_scaled_rows_in_place() -> None:
    """Llama 4's experts, rewritten to the interface (``ir/input_scaled.py``), multiply every row of
    a step as one batched product: the pass leaves them unpermuted (modified False), and the
    lowered graph over the rewritten blocks equals transformers' dense blocks."""
    import copy

    from expertflow.ir.input_scaled import adapt_experts
    from expertflow.tools.presets.tiny_config import build_tiny

    lm = build_tiny("llama4_text", num_experts_per_tok=2)
    sparse = copy.deepcopy(lm)
    assert adapt_experts(sparse) == adapt_experts(copy.deepcopy(sparse)) + lm.config.num_hidden_layers
    gm, info = lowered(lm)
    assert len(of(gm, ops.expert_compute)) == lm.config.num_hidden_layers
    assert not insert_permute(gm, CompileOptions()).modified
    assert not of(gm, ops.permute)
    gm.recompile()
    assert_close(run(gm, sparse, Reference(sparse, info)), hf_logits(lm), atol=0, rtol=0)


def test_insert_permute_no_op() -> None:
    lm = real("tiny-mixtral")
    gm, _ = lowered(lm)
    assert not insert_permute(gm, CompileOptions(permute=False)).modified
    assert not of(gm, ops.permute)
    assert insert_permute(gm, CompileOptions()).modified
    assert not insert_permute(gm, CompileOptions()).modified  # already permuted: nothing to do
    assert len(of(gm, ops.permute)) == len(of(gm, ops.unpermute)) == len(of(gm, ops.expert_compute))


def test_verify_permute_pairs() -> None:
    gm, _ = lowered(real("tiny-mixtral"))
    insert_permute(gm, CompileOptions())
    permute = of(gm, ops.permute)[1]
    undo = of(gm, ops.unpermute)[1]
    compute = of(gm, ops.expert_compute)[1]
    undo.update_arg(1, undo.args[0])  # unpermutes the perm itself, not the compute's output
    verify_error(gm, permute, "permute's perm does not feed exactly one unpermute of its compute's output")
    undo.update_arg(1, compute)
    verify_graph(gm)
    undo.update_arg(0, compute.args[3])  # an ids item, not perm: the permute's outputs no longer pair
    verify_error(gm, permute, "permute does not feed exactly one expert_compute of its layer (tokens, ids, "
                 "weights)")
    gm, _ = lowered(real("tiny-mixtral"))
    insert_permute(gm, CompileOptions())
    compute = of(gm, ops.expert_compute)[2]
    with gm.graph.inserting_after(compute):
        stray = gm.graph.call_function(ops.unpermute, (ops.unpermuted(compute.args[3]), compute))
    verify_error(gm, stray, "unpermute does not read a permute's perm")


def test_permute_then_unpermute_is_the_identity() -> None:
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 2, 7, 64):
        x = torch.randn(rows, 5, generator=gen)
        perm = torch.randperm(rows, generator=gen)
        assert torch.equal(ops.unpermute(perm, x[perm]), x)
        assert ops.unpermute(None, x) is x


# --- drop_prefetch ----------------------------------------------------------------------------

def test_drop_prefetch_structure_numbers_and_no_op() -> None:
    """Every expert resident: the prefetches and what only fed them go, waits wait on nothing, the
    numbers stay; a graph without prediction is left alone (modified False)."""
    from expertflow.passes.drop_prefetch import drop_prefetch

    lm = real("tiny-mixtral")
    gm, info = lowered(lm, predictor="cross_layer_gate")
    before = run(gm, lm, Reference(lm, info))
    assert of(gm, ops.prefetch)
    assert drop_prefetch(gm).modified
    verify_graph(gm)
    assert not of(gm, ops.prefetch) and not of(gm, ops.predict)
    assert all(wait.args[2] is None for wait in of(gm, ops.wait)) and len(of(gm, ops.wait)) == len(info.experts)
    gm.recompile()
    ctx = Reference(lm, info)
    assert_close(run(gm, lm, ctx), before)
    assert not [c for c in ctx.calls if c[0] == "prefetch"]
    assert not drop_prefetch(gm).modified


# --- schedule ---------------------------------------------------------------------------------

def test_schedule_streams() -> None:
    lm = real("tiny-qwen2-moe")
    gm, info = lowered(lm)
    dce(gm)
    gm.recompile()
    code = gm.code
    assert schedule(gm).modified
    expected = {"prefetch": "copy", "wait": "demand"}
    for node in gm.graph.nodes:
        name = ops.op_name(node.target)
        assert node.meta["ef.stream"] == expected.get(name or "", "compute"), node.name
        assert "ef.slot_group" not in node.meta  # the shared slot pool has no double-buffer halves
    gm.recompile()
    assert gm.code == code  # metadata only: the program, hence every number, is unchanged
    assert not schedule(gm).modified
    assert_close(run(gm, lm, Reference(lm, info)), hf_logits(lm))  # the whole pipeline, end to end


def test_the_runtime_copies_on_the_streams_the_schedule_names(compiled_dir, monkeypatch) -> None:
    """What the pass decides is what runs: a wait scheduled on the copy stream makes its misses
    speculative-priority copies; a prefetch scheduled on the demand stream jumps the queue."""
    from expertflow import runtime
    from expertflow.runtime.cache.streams import CopyEngine
    from conftest import PROMPTS

    seen: list[tuple[str, bool]] = []
    submit = CopyEngine.submit

    def record(self, key, dst, src, label="", demand=False):
        seen.append((label, demand))
        return submit(self, key, dst, src, label, demand)

    monkeypatch.setattr(CopyEngine, "submit", record)
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=6)
    model.generate(PROMPTS[:1], max_new_tokens=6)
    assert {d for _, d in seen} == {True, False}  # demand misses and speculative prefetches
    for node in model.graph_module.graph.nodes:
        if node.target in (ops.prefetch, ops.wait):
            node.meta["ef.stream"] = {"copy": "demand", "demand": "copy"}[node.meta["ef.stream"]]
    from expertflow.runtime.assemble.loader import copy_streams

    model.context.demand = {k: v == "demand" for k, v in copy_streams(model.graph_module.graph, "test").items()}
    model.reset_stats()
    seen.clear()
    model.generate(PROMPTS[:1], max_new_tokens=6)
    loads = model.stats()["total"]
    assert sum(not d for _, d in seen) >= loads["misses"] > 0  # every miss now on the copy stream
    node = next(n for n in model.graph_module.graph.nodes if n.target is ops.wait)
    node.meta["ef.stream"] = "compute"
    with pytest.raises(runtime.LoadError, match="copies on stream 'compute'; the runtime has the 'copy' and "
                       "'demand' streams; recompile the model"):
        copy_streams(model.graph_module.graph, "test")


# --- verify_graph and the manager ---------------------------------------------------------------

def two_layers(interleaved: bool) -> fx.GraphModule:
    """Two lowered layers, each wait right before its compute, or both waits first."""
    g = fx.Graph()
    x, idx, w, ctx = (g.placeholder(n) for n in ("x", "idx", "w", "ef_ctx"))
    routes = [g.call_function(ops.route, (ctx, layer, idx)) for layer in (0, 1)]
    out, waits = x, [None, None]
    if not interleaved:
        waits = [g.call_function(ops.wait, (ctx, layer, None, routes[layer])) for layer in (0, 1)]
    for layer in (0, 1):
        if interleaved:
            waits[layer] = g.call_function(ops.wait, (ctx, layer, None, routes[layer]))
        out = g.call_function(ops.expert_compute, (ctx, layer, out, routes[layer], w, waits[layer]))
    g.output(out)
    for n in g.nodes:
        n.meta["ef.stream"] = "demand" if n.target is ops.wait else "compute"
    return fx.GraphModule(nn.Module(), g)


def verify_error(gm: fx.GraphModule, node: fx.Node, message: str, after: str = "") -> None:
    with pytest.raises(PassError) as info:
        verify_graph(gm, after)
    assert str(info.value) == f"[verify{' after ' + after if after else ''}] {message} at {node.format_node()}"


def test_verify_two_waits_open_at_once() -> None:
    verify_graph(two_layers(interleaved=True))
    gm = two_layers(interleaved=False)
    wait0 = of(gm, ops.wait)[0]
    verify_error(gm, wait0, "wait_1 waits while wait's compute has not run: both would pin slots at once")


def test_verify_streams() -> None:
    gm = two_layers(interleaved=True)
    wait0 = of(gm, ops.wait)[0]
    wait0.meta["ef.stream"] = "compute"
    verify_error(gm, wait0, "a copy op is on the compute stream")
    wait0.meta["ef.stream"] = "pcie"
    verify_error(gm, wait0, "unknown stream 'pcie' (streams: copy, demand, compute)")


def test_verify_compute_without_wait_and_wait_without_compute() -> None:
    gm, _ = lowered(real("tiny-mixtral"), predictor="none")
    verify_graph(gm)
    compute = of(gm, ops.expert_compute)[2]
    compute.update_arg(5, compute.args[3])  # reads the route, not a wait
    wait = of(gm, ops.wait)[2]
    verify_error(gm, wait, "wait feeds 0 expert_compute nodes, expected 1")
    gm.graph.erase_node(wait)
    verify_error(gm, compute, "expert_compute does not read its own layer's wait")


def test_verify_prefetch_waited_by_another_layer() -> None:
    gm, _ = lowered(real("tiny-mixtral"))
    verify_graph(gm)
    prefetches, waits = of(gm, ops.prefetch), of(gm, ops.wait)
    waits[1].update_arg(2, prefetches[0])
    verify_error(gm, prefetches[0], "prefetch is not waited on by its own layer, after it", after="test")


def test_verify_unlowered_experts() -> None:
    gm, _ = traced(real("tiny-mixtral"))
    hidden = next(n for n in gm.graph.nodes if n.meta.get("ef.layer") == 2)
    hidden.meta["ef.role"] = "hidden-from-lowering"
    lower_experts(gm)
    hidden.meta["ef.role"] = "experts"
    verify_error(gm, hidden, "MoE layer is not lowered")


def test_manager_verifies_after_each_pass_and_names_it() -> None:
    def forget_a_stream(gm: fx.GraphModule, options: Any) -> PassResult:  # a buggy pass after schedule
        node = of(gm, ops.expert_compute)[1]
        del node.meta["ef.stream"]
        forget_a_stream.node = node
        return PassResult(gm, True)

    gm, _ = traced(real("tiny-mixtral"))
    manager = PassManager([functionalize_inplace, lower_experts, insert_prefetch, dce, schedule, forget_a_stream],
                          verify=verify_graph)
    with pytest.raises(PassError) as info:
        manager(gm, CompileOptions())
    assert str(info.value) == (f"[verify after forget_a_stream] node has no stream at "
                               f"{forget_a_stream.node.format_node()}")
