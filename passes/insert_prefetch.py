"""Insert the cross-layer-gate predictor and a prefetch for every MoE layer.

Rewrites: for MoE layer number j (in order of depth), the router of layer j is the slice of the
graph between the MoE block's input and ``route``'s ids (its math is traced, so it is ordinary
nodes). A copy of that slice is applied to the block input of MoE layer j-d (d = lookahead; the
embedding output for the first d layers), giving ``predict(ef_ctx, L_j, ids)`` and
``prefetch(ef_ctx, L_j, predicted) -> handle`` placed right after that input, so the copy
overlaps the compute of layer j-d. Layer j's ``wait`` then reads that handle. This is the
training-free predictor of Fate and mixtral-offloading.

With ``options.predictor == "routing_path"`` (ExpertFlow's routing-path predictor) it instead
inserts, right after the token embedding, ``paths = predict_path(ef_ctx, embeds)`` and for MoE
layer number j ``prefetch(ef_ctx, L_j, predict(ef_ctx, L_j, path_layer(paths, j)))``: every
layer's copies are issued before the first layer computes, and each wait reads its handle. Right
after the last MoE block's input it inserts ``path_context(ef_ctx, hidden)``, which keeps that
input as the predictor's context for the next step (nothing reads its value: a side effect).
Where the first MoE layer's decoder output can be found (``layer_output``) and there is a later
MoE layer, the predictor has a second stage: right after that output,
``refined = refine_path(ef_ctx, embeds, output)`` predicts the later layers again from it, and
their prefetches read ``refined`` (the first layer's still reads ``paths``): the later layers'
copies start one layer later, on a better prediction.

With ``options.predictor == "frequency"`` each MoE layer's ``predict_frequency(ef_ctx, L_j,
embeds)`` (its most popular experts) and prefetch go right after the embedding; with
``"transition"`` layer j's ``predict_transition(ef_ctx, L_j, ids_{j-1})`` (its likeliest experts
given layer j-1's true route) and prefetch go right after layer j-1's ``route``, so the copy
overlaps layer j-1's experts and layer j's attention (the first layer: the frequency prior).

With ``options.prefetch == "hint"`` every prefetch it inserts is ``prefetch(ef_ctx, L_j, ids,
False)``: the runtime reads the prediction with the wait as usual and tells the cache policy, but
copies nothing early.

Before: lowered graph (``lower_experts``), waits with handle None. After: each wait whose
predictor could be placed reads a prefetch handle; the others keep None and load on demand.
"""

from __future__ import annotations

import re


from torch import fx

from ..ir import meta_keys, ops
from .lower_experts import context_node
from .manager import PassError, PassResult
from .options import CompileOptions

PASS = "insert_prefetch"


def _closure(node: fx.Node, step: str) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        for nxt in (current.users if step == "users" else current.all_input_nodes):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that reads ``node``, directly or not."""
    return _closure(node, "users")


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` reads, directly or not."""
    return _closure(node, "inputs")


def _is_static(node: fx.Node) -> bool:
    """True if the node's value depends on no graph input (weights and constants)."""
    return node.op == "get_attr" or (node.op != "placeholder" and all(_is_static(a) for a in node.all_input_nodes))


def router_slice(block_input: fx.Node, index: fx.Node) -> list[fx.Node] | None:
    """The nodes computing ``index`` from ``block_input``, static inputs included, in graph order.

    None when the router reads any other per-token value (then it cannot be moved), or does not
    read the hidden state at all (DeepSeek-V4's hash-routed layers: experts by token id).
    """
    inside = (ancestors(index) | {index}) & descendants(block_input)
    if index not in inside:
        return None
    needed = set(inside)
    for node in inside:
        for arg in node.all_input_nodes:
            if arg in inside or arg is block_input:
                continue
            if not _is_static(arg):
                return None
            needed |= {arg} | ancestors(arg)
    return [n for n in block_input.graph.nodes if n in needed]


def copy_slice(graph: fx.Graph, nodes: list[fx.Node], old_input: fx.Node, new_input: fx.Node) -> list[fx.Node]:
    """Copies of ``nodes`` (a ``router_slice`` of ``old_input``) into ``graph`` (theirs or another),
    in order, reading ``new_input`` where they read ``old_input``: the last computes the ids. Each
    copy keeps its original's meta; a caller placing them in the model's graph re-tags them."""
    env: dict[fx.Node, fx.Node] = {old_input: new_input}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    return [env[node] for node in nodes]


def insert_prefetch(gm: fx.GraphModule, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    graph = gm.graph
    if options.predictor == "none":
        return PassResult(gm, False)
    by_name = {n.name: n for n in graph.nodes}
    computes = [n for n in graph.nodes if n.target is ops.expert_compute]
    waits = [n.args[5] for n in computes]
    if not computes or all(w.args[2] is not None for w in waits):
        return PassResult(gm, False)
    embed = next((n for n in graph.nodes if n.meta.get(meta_keys.ROLE) == "embed"), None)
    if options.predictor == "routing_path":
        result = _insert_path(gm, computes, embed, by_name.get(computes[-1].meta.get(meta_keys.BLOCK_INPUT) or ""))
    elif options.predictor in ("frequency", "transition"):
        result = _insert_tables(gm, computes, embed, options.predictor == "transition")
    else:
        result = _insert_gate(gm, computes, waits, embed, by_name, options)
    if options.prefetch == "hint":
        for node in graph.nodes:
            if node.target is ops.prefetch:
                node.args = (*node.args[:3], False)
    return result


def _insert_gate(gm: fx.GraphModule, computes: list[fx.Node], waits: list[fx.Node], embed: fx.Node | None,
                 by_name: dict[str, fx.Node], options: CompileOptions) -> PassResult:
    graph = gm.graph
    inputs = [by_name.get(n.meta.get(meta_keys.BLOCK_INPUT) or "") for n in computes]
    ctx = context_node(graph)
    anchors: dict[fx.Node, fx.Node] = {}
    modified = False
    for j, (compute, wait) in enumerate(zip(computes, waits)):
        if wait.args[2] is not None:
            continue
        layer, block_input, route = compute.args[1], inputs[j], ops.unpermuted(compute.args[3])
        if block_input is None:
            raise PassError(PASS, "cannot find the MoE block's input", compute)
        nodes = router_slice(block_input, route.args[2])
        source = inputs[j - options.lookahead] if j >= options.lookahead else embed
        if nodes is None or source is None:
            continue  # the router needs more than the hidden state: this layer loads on demand
        # before the node that followed the source at first: layers sharing a source keep depth order
        with graph.inserting_before(anchors.setdefault(source, source.next)):
            copies = copy_slice(graph, nodes, block_input, source)
            predicted = graph.call_function(ops.predict, (ctx, layer, copies[-1]))
            handle = graph.call_function(ops.prefetch, (ctx, layer, predicted))
        for copied in copies:  # they are layer's predictor, no longer nodes of the layer they were copied from
            copied.meta = {k: v for k, v in copied.meta.items() if k != meta_keys.LAYER}
            copied.meta.update({meta_keys.LAYER: layer, meta_keys.ROLE: "predictor"})
        for new in (predicted, handle):
            new.meta[meta_keys.LAYER] = layer
        wait.update_arg(2, handle)
        modified = True
    return PassResult(gm, modified)


def _decoder_layer(node: fx.Node) -> str | None:
    """The decoder layer ``node`` was traced in: the outermost module of its stack that is an item
    of a module list (``lm.model.layers.3``); the causal LM and its decoder stack are around it."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((path for path in stack if re.search(r"\.\d+$", path)), None)


def layer_output(block_input: fx.Node) -> fx.Node | None:
    """The output of the decoder layer holding the MoE block fed by ``block_input``: the last node
    traced inside that layer (the outermost module of its ``nn_module_stack``) whose value, of the
    block input's shape, a node outside the layer reads (the residual stream going on). None when
    the trace does not say (no module stack) or nothing of that shape leaves the layer."""
    layer = _decoder_layer(block_input)
    shape = getattr(block_input.meta.get(meta_keys.VALUE), "shape", None)
    if layer is None or shape is None:
        return None
    inside = [n for n in block_input.graph.nodes if _decoder_layer(n) == layer]
    members = set(inside)
    leaving = [n for n in inside if getattr(n.meta.get(meta_keys.VALUE), "shape", None) == shape
               and any(u not in members for u in n.users)]
    return leaving[-1] if leaving else None


def _insert_path(gm: fx.GraphModule, computes: list[fx.Node], embed: fx.Node | None,
                 last_input: fx.Node | None) -> PassResult:
    if embed is None:
        raise PassError(PASS, "the routing-path predictor reads the token embedding, and none was found")
    if last_input is None:
        raise PassError(PASS, "cannot find the last MoE block's input (the predictor's context)", computes[-1])
    graph, ctx = gm.graph, context_node(gm.graph)
    with graph.inserting_after(last_input):
        kept = graph.call_function(ops.path_context, (ctx, last_input))
    kept.meta.update({meta_keys.ROLE: "predictor", meta_keys.LAYER: computes[-1].args[1]})
    with graph.inserting_after(embed):
        paths = graph.call_function(ops.predict_path, (ctx, embed))
    paths.meta.update({meta_keys.ROLE: "predictor"})
    by_name = {n.name: n for n in graph.nodes}
    first_input = by_name.get(computes[0].meta.get(meta_keys.BLOCK_INPUT) or "")
    output = layer_output(first_input) if first_input is not None and len(computes) > 1 else None
    refined = None
    if output is not None:
        with graph.inserting_after(output):
            refined = graph.call_function(ops.refine_path, (ctx, embed, output))
        refined.meta.update({meta_keys.ROLE: "predictor"})
    last = paths
    for j, compute in enumerate(computes):
        layer, wait = compute.args[1], compute.args[5]
        if j == 1 and refined is not None:
            last = refined
        source, position = (paths, j) if j == 0 or refined is None else (refined, j - 1)
        with graph.inserting_after(last):
            picked = graph.call_function(ops.path_layer, (source, position))
        with graph.inserting_after(picked):
            predicted = graph.call_function(ops.predict, (ctx, layer, picked))
        with graph.inserting_after(predicted):
            last = graph.call_function(ops.prefetch, (ctx, layer, predicted))
        for new in (picked, predicted, last):
            new.meta[meta_keys.LAYER] = layer
        picked.meta[meta_keys.ROLE] = "predictor"
        wait.update_arg(2, last)
    return PassResult(gm, True)


def _insert_tables(gm: fx.GraphModule, computes: list[fx.Node], embed: fx.Node | None, transition: bool) -> PassResult:
    if embed is None:
        raise PassError(PASS, "the trace predictors count tokens from the embedding, and none was found")
    graph, ctx = gm.graph, context_node(gm.graph)
    anchors: dict[fx.Node, fx.Node] = {}
    modified = False
    for j, compute in enumerate(computes):
        layer, wait = compute.args[1], compute.args[5]
        if wait.args[2] is not None:
            continue
        if transition and j > 0:
            previous = ops.unpermuted(computes[j - 1].args[3])  # layer j-1's route: its true top-k ids
            op, source = ops.predict_transition, previous
        else:
            op, source = ops.predict_frequency, embed
        with graph.inserting_before(anchors.setdefault(source, source.next)):  # layers keep depth order
            guess = graph.call_function(op, (ctx, layer, source))
            predicted = graph.call_function(ops.predict, (ctx, layer, guess))
            handle = graph.call_function(ops.prefetch, (ctx, layer, predicted))
        for new in (guess, predicted, handle):
            new.meta[meta_keys.LAYER] = layer
        guess.meta[meta_keys.ROLE] = "predictor"
        wait.update_arg(2, handle)
        modified = True
    return PassResult(gm, modified)
