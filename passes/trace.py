"""Front end: one torch.fx graph for a whole transformers causal-LM MoE model.

What it builds: a graph of :class:`Driver`, a generic decoder-stack forward (embeddings, every
decoder layer, final norm, lm_head and the multipliers some models keep outside their layers),
with ``input_ids``, ``position_ids``, the KV cache and a dict of attention masks (one per layer
type in ``config.layer_types``) as graph inputs. Attention, rotary embeddings, norms, standard
``torch.nn`` modules and every experts module are leaves; everything else, routers included, is
traced, so the router's math is visible in the graph.

Every proxy carries a meta-device value (``node.meta["ef.meta"]``) computed while tracing, so
code that star-unpacks ``x.shape`` (DeepSeek, GLM MoE blocks) traces: the tracer knows the rank.
"""

from __future__ import annotations

import ast
import contextlib
import dis
import inspect
import re
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr
from torch.fx.proxy import Attribute, Proxy

#: The attention-mask kinds ExpertFlow builds (runtime/model.py makes each with transformers'
#: masking_utils). ``indexed_attention`` (DeepSeek sparse attention) is a causal mask that is
#: always materialised: its indexer reads it.
MASK_KINDS = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention")
EXPERT_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate")


class TraceFailure(RuntimeError):
    """A module could not be traced; the message names it (``module``: its path, once known)."""

    def __init__(self, message: str, module: str | None = None):
        super().__init__(message)
        self.module = module


def is_experts_module(module: nn.Module) -> bool:
    """True for modules built with transformers' ``use_experts_implementation`` interface."""
    if not all(hasattr(module, flag) for flag in EXPERT_FLAGS):
        return False
    down = module._parameters.get("down_proj")  # not getattr: fx patches Module.__getattr__ while tracing
    return isinstance(down, torch.Tensor) and down.dim() == 3


def layer_mask_kinds(config: Any, layers_path: str | None = None, layers: Any = None) -> list[str]:
    """The attention-mask kind of each decoder layer, as transformers' models choose it.

    A layer type that is no attention mask kind (``linear_attention``, ``mamba``, ``conv``...)
    makes a hybrid model, which ExpertFlow does not compile: the failure names the first such
    layer when ``layers_path`` (and the ``layers`` themselves) are given.
    """
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        unknown = sorted(set(types[:n]) - set(MASK_KINDS))
        if unknown:
            first = next(i for i, t in enumerate(types[:n]) if t in unknown)
            where, module = "", None
            if layers_path is not None:
                module = f"{layers_path}.{first}"
                kind = type(layers[first]).__name__ if layers is not None and first < len(layers) else "layer"
                where = f"decoder layer '{module}' ({kind}) is a {types[first]!r} layer: "
            raise TraceFailure(
                f"{where}config.layer_types has kinds {unknown} that are no attention mask ExpertFlow knows "
                f"(it knows {list(MASK_KINDS)}). Hybrid models (Mamba, linear-attention, convolution or other "
                "non-attention layers, which keep their own recurrent state) are out of scope", module)
        return list(types[:n])
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * n


def _to_meta(value: Any) -> Any:
    if isinstance(value, Proxy):
        return value.node.meta.get("ef.meta")
    if isinstance(value, (list, tuple)):
        items = [_to_meta(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_to_meta(value.start), _to_meta(value.stop), _to_meta(value.step))
    return value


def _static_length(proxy: Proxy) -> int | None:
    """The length of a traced sequence known while tracing (a shape, a tuple of outputs), else None.

    Tensors have no static length: their first dimension is the batch or the sequence, which the
    graph must not fix at the sizes it was traced with.
    """
    meta = proxy.node.meta.get("ef.meta")
    return len(meta) if isinstance(meta, (tuple, list, torch.Size)) else None


def _unknown_length(proxy: Proxy, what: str) -> TraceFailure:
    meta = proxy.node.meta.get("ef.meta")
    why = (f"it is a tensor of shape {tuple(meta.shape)}, whose length is a run-time size"
           if isinstance(meta, torch.Tensor) else
           proxy.node.meta.get("ef.meta_error", "its value is data-dependent"))
    return TraceFailure(f"cannot {what} {proxy.node.format_node()}: its length is unknown ({why})")


class MetaProxy(Proxy):
    """A proxy that can be iterated and measured when its meta value has a static length.

    ``x.shape`` is the case that matters: fx's proxies refuse ``view(*x.shape)`` and
    ``a, b = x.shape[:2]`` outside a direct unpacking, but the rank of a tensor is static.
    """

    def __getattr__(self, k: str) -> "MetaAttribute":
        return MetaAttribute(self, k)  # fx's own Attribute would lose the meta-aware methods

    def __iter__(self) -> Iterator[Proxy]:
        n = _static_length(self)
        if n is None:  # fx's own rule: ``a, b = t`` unpacks as many items as the code names
            n = _unpack_count(inspect.currentframe())
        if n is None:
            raise _unknown_length(self, "iterate")
        return iter([self[i] for i in range(n)])

    def __len__(self) -> int:
        n = _static_length(self)
        if n is None:
            raise _unknown_length(self, "take len() of")
        return n

    def __bool__(self) -> bool:
        """Branching on a value fixed at compile time (a weight's dtype, ``x.dtype == torch.float32``)
        takes the branch; anything that can change between calls is control flow fx refuses."""
        meta = self.node.meta.get("ef.meta")
        if self.node.meta.get("ef.static") and isinstance(meta, bool):
            return meta
        return super().__bool__()


def _unpack_count(frame: types.FrameType | None) -> int | None:
    """N when the caller of ``frame`` is executing ``UNPACK_SEQUENCE N`` (``a, b = proxy``)."""
    caller = frame.f_back if frame is not None else None
    if caller is None:
        return None
    for inst in dis.get_instructions(caller.f_code):
        if inst.offset == caller.f_lasti:
            return inst.argval if inst.opname == "UNPACK_SEQUENCE" else None
    return None


class MetaAttribute(Attribute, MetaProxy):
    """fx's lazily created attribute proxy (``x.shape``, ``x.view``), with MetaProxy's methods."""


class ExpertFlowTracer(fx.Tracer):
    """Traces with leaves at attention, rotary, norms, torch.nn modules and experts modules."""

    def __init__(self, placeholder_meta: dict[str, Any]):
        super().__init__(param_shapes_constant=True)
        self.placeholder_meta = placeholder_meta
        self.experts_paths: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_experts_module(m):
            return True
        name = type(m).__name__
        if "Attention" in name or "Rotary" in name or name.endswith("Norm") or "RMSNorm" in name:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceFailure as exc:
            if exc.module is not None:
                raise
            raise TraceFailure(f"cannot trace module '{path}' ({type(m).__name__}): {exc}", path) from exc
        except Exception as exc:  # name the module that failed, once, at the innermost level
            raise TraceFailure(f"cannot trace module '{path}' ({type(m).__name__}): "
                               f"{type(exc).__name__}: {exc}", path) from exc

    def proxy(self, node: fx.Node) -> Proxy:
        return MetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        node.meta["ef.static"] = _is_static_value(node)
        try:
            with _unpatched_modules():
                node.meta["ef.meta"] = self._meta_value(kind, target, args, kwargs)
        except Exception as exc:  # data-dependent ops have no meta value; shapes after them are unknown
            node.meta["ef.meta"] = None
            node.meta["ef.meta_error"] = f"{type(exc).__name__}: {exc}"
            if kind == "call_module" and isinstance(exc, TypeError) and all(
                    a.meta.get("ef.meta") is not None for a in node.all_input_nodes):
                # A leaf called with arguments it does not take (a rotary embedding that wants the
                # layer type, say) would only fail when the compiled model runs: fail now.
                raise TraceFailure(f"calling it with the traced arguments fails: {type(exc).__name__}: {exc}") from exc
        return proxy

    def _meta_value(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.placeholder_meta.get(target)
        if kind == "get_attr":
            return _fetch_attr(self.root, target)
        margs, mkwargs = _to_meta(args), _to_meta(kwargs)
        if kind == "call_function":
            return target(*margs, **mkwargs)
        if kind == "call_method":
            return getattr(margs[0], target)(*margs[1:], **mkwargs)
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            if is_experts_module(mod):  # experts return a tensor shaped like their hidden input
                return torch.empty_like(margs[0])
            return mod(*margs, **mkwargs)
        return None


_STATIC_ATTRIBUTES = frozenset({"dtype"})


def _is_static_value(node: fx.Node) -> bool:
    """True when the node's value is fixed when the model is compiled: weights and buffers, their
    shapes, any tensor's dtype, and what is computed from those alone. Not: anything that depends
    on the input's sizes or values, or on the device (``x.is_cuda``) the compiled model runs on."""
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _STATIC_ATTRIBUTES:
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    return all(a.meta.get("ef.static", False) for a in node.all_input_nodes)


@contextlib.contextmanager
def _unpatched_modules():
    """Runs a leaf for its meta value with fx's Module.__call__/__getattr__ patches lifted."""
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _orig_module_call, _orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, getattr_


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class Driver(nn.Module):
    """The generic decoder-stack forward that is traced in place of the model's own.

    It reproduces what transformers' causal LMs do around their decoder layers: embeddings (and
    ``embedding_multiplier``), rotary embeddings (one per layer type when the rotary module takes
    the layer type), one attention mask per layer type, the final norm, the output embeddings
    and the logit transforms kept outside the layers (``logits_scaling``, ``logit_scale``,
    ``final_logit_softcapping``). :func:`check_supported` refuses models whose own forward does
    anything else, so this forward never silently differs from theirs.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        inner = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        config = getattr(inner, "config", None) or lm.config  # a multimodal model's text config
        self.inner_path = _path_in(lm, inner)
        layers_path = f"lm.{self.inner_path}.layers" if self.inner_path else "lm.layers"
        self.num_layers = config.num_hidden_layers
        self.mask_kinds = layer_mask_kinds(config, layers_path, getattr(inner, "layers", None))
        self.embedding_multiplier = getattr(inner, "embedding_multiplier", None) or getattr(
            config, "embedding_multiplier", None)
        self.logits_scaling = getattr(config, "logits_scaling", None)
        scale = getattr(lm, "logit_scale", None)
        self.logit_scale = scale if isinstance(scale, (int, float)) else getattr(config, "logit_scale", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        rotary = getattr(inner, "rotary_emb", None)
        self.rotary_per_kind = rotary is not None and "layer_type" in _parameters(type(rotary).forward)

    def forward(self, input_ids, position_ids, past_key_values, masks):
        inner = self.lm.get_submodule(self.inner_path) if self.inner_path else self.lm
        hidden = inner.embed_tokens(input_ids)
        if self.embedding_multiplier not in (None, 1, 1.0):
            hidden = hidden * self.embedding_multiplier
        pos: Any = None
        if self.rotary_per_kind:
            pos = {kind: inner.rotary_emb(hidden, position_ids, kind) for kind in dict.fromkeys(self.mask_kinds)}
        elif hasattr(inner, "rotary_emb"):
            pos = inner.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(inner.layers[: self.num_layers]):
            kind = self.mask_kinds[i]
            out = layer(hidden, attention_mask=masks[kind], position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=True,
                        position_embeddings=pos[kind] if self.rotary_per_kind else pos)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = inner.norm(hidden)
        logits = self.lm.get_output_embeddings()(hidden)
        if self.logits_scaling not in (None, 1, 1.0):
            logits = logits / self.logits_scaling
        if self.logit_scale not in (None, 1, 1.0):
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


#: The keyword arguments the Driver gives every decoder layer (besides the hidden state).
LAYER_KWARGS = frozenset({"attention_mask", "position_ids", "past_key_values", "use_cache", "position_embeddings"})

#: What the model's own top-level forwards may read (``self.X``, ``self.config.X``) for the
#: Driver to be equivalent to them: the parts it calls, the settings it applies, and what only
#: training or optional outputs use. Reading anything else (hyper-connection heads, per-layer
#: inputs, extra scalings...) means the model does something the Driver does not: the trace
#: fails, naming the module, rather than compile a model with wrong logits.
HANDLED_READS = frozenset({
    # decoder stack
    "self.config", "self.embed_tokens", "self.layers", "self.norm", "self.rotary_emb",
    "config.num_hidden_layers", "config.layer_types", "config.sliding_window",
    "self.embedding_multiplier", "config.embedding_multiplier",
    "self.gradient_checkpointing", "self.training", "config.use_cache",
    # causal-LM head
    "self.lm_head", "config.logits_scaling", "self.logit_scale", "config.logit_scale",
    "config.final_logit_softcapping", "config.vocab_size", "self.vocab_size",
    # training losses and router statistics (not part of the logits)
    "self.loss_function", "self.num_experts", "self.num_experts_per_tok", "self.router_aux_loss_coef",
    "config.output_router_logits", "config.router_aux_loss_coef", "config.num_experts",
    "config.num_local_experts", "config.num_experts_per_tok",
})


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


_UNKNOWN = object()


class _ForwardReads(ast.NodeVisitor):
    """What a module's forward reads of ``self`` and ``self.config``, skipping the branches that
    cannot run for this model (``if self.config.mup_enabled:`` with the flag off)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.reads: set[str] = set()
        self.layer_loops: list[ast.For] = []

    # -- static evaluation of branch conditions on the module and its config
    def _value(self, expr: ast.AST) -> Any:
        if isinstance(expr, ast.Constant):
            return expr.value
        if isinstance(expr, ast.Attribute):
            base = self.module if isinstance(expr.value, ast.Name) and expr.value.id == "self" else self._value(expr.value)
            return _UNKNOWN if base is _UNKNOWN else getattr(base, expr.attr, _UNKNOWN)
        return _UNKNOWN

    def _truth(self, expr: ast.AST) -> bool | None:
        if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
            inner = self._truth(expr.operand)
            return None if inner is None else not inner
        if isinstance(expr, ast.BoolOp):
            values = [self._truth(v) for v in expr.values]
            if isinstance(expr.op, ast.And):
                return False if False in values else (True if all(v is True for v in values) else None)
            return True if True in values else (False if all(v is False for v in values) else None)
        if isinstance(expr, ast.Compare) and len(expr.ops) == 1:
            left, right = self._value(expr.left), self._value(expr.comparators[0])
            if left is _UNKNOWN or right is _UNKNOWN:
                return None
            op = expr.ops[0]
            table = {ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
                     ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}
            fn = table.get(type(op))
            return None if fn is None else bool(fn(left, right))
        value = self._value(expr)
        if value is _UNKNOWN or isinstance(value, (torch.Tensor, nn.Module)):
            return None
        try:
            return bool(value)
        except Exception:
            return None

    def _branch(self, node: ast.If | ast.IfExp) -> None:
        truth = self._truth(node.test)
        if truth is None:
            self.generic_visit(node)
            return
        if truth:  # the branch runs: what decides it counts too
            self.visit(node.test)
        taken = node.body if truth else node.orelse
        for item in taken if isinstance(taken, list) else [taken]:
            self.visit(item)

    visit_If = _branch
    visit_IfExp = _branch

    # -- reads
    def visit_Attribute(self, node: ast.Attribute) -> None:
        value = node.value
        if isinstance(value, ast.Name) and value.id == "self":
            self.reads.add(f"self.{node.attr}")
        elif (isinstance(value, ast.Attribute) and value.attr == "config" and isinstance(value.value, ast.Name)
              and value.value.id == "self"):
            self.reads.add(f"config.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            owner = node.args[0]
            if isinstance(owner, ast.Name) and owner.id == "self":
                self.reads.add(f"self.{node.args[1].value}")
            elif isinstance(owner, ast.Attribute) and owner.attr == "config":
                self.reads.add(f"config.{node.args[1].value}")
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        if any(isinstance(n, ast.Attribute) and n.attr == "layers" for n in ast.walk(node.iter)):
            self.layer_loops.append(node)
        self.generic_visit(node)


def _forward_source(module: nn.Module, path: str) -> ast.AST:
    fn = inspect.unwrap(type(module).forward)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        return ast.parse(source)
    except (OSError, TypeError, SyntaxError) as exc:
        raise TraceFailure(f"cannot read the source of {type(module).__name__}.forward ({exc}), so cannot check "
                           f"that ExpertFlow's generic forward does what it does", path) from exc


def _layer_calls(loop: ast.For) -> tuple[list[ast.Call], list[ast.AST]]:
    """The calls of the loop variable (the decoder layer) in a ``for ... in self.layers`` loop, and
    the targets their results are assigned to."""
    target = loop.target.elts[-1] if isinstance(loop.target, ast.Tuple) else loop.target
    name = target.id if isinstance(target, ast.Name) else None
    calls, targets = [], []
    for stmt in ast.walk(loop):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
            fn = stmt.value.func
            if isinstance(fn, ast.Name) and fn.id == name:
                targets.extend(stmt.targets)
        if isinstance(stmt, ast.Call) and isinstance(stmt.func, ast.Name) and stmt.func.id == name:
            calls.append(stmt)
    return calls, targets


def check_supported(driver: Driver) -> None:
    """Refuses (TraceFailure naming the module) a model whose own forward, from the causal LM down
    to its decoder stack, does something the Driver does not: reads a part or setting outside
    :data:`HANDLED_READS`, gives its decoder layers other arguments than :data:`LAYER_KWARGS`, or
    takes more than the hidden state back from them."""
    lm = driver.lm
    chain = [("", lm)]
    if driver.inner_path:
        parts = driver.inner_path.split(".")
        for i in range(len(parts)):
            chain.append((".".join(parts[: i + 1]), lm.get_submodule(".".join(parts[: i + 1]))))
    for depth, (path, module) in enumerate(chain):
        where = f"lm.{path}" if path else "lm"
        visitor = _ForwardReads(module)
        visitor.visit(_forward_source(module, where))
        allowed = set(HANDLED_READS)
        if depth + 1 < len(chain):  # the way down to the decoder stack
            allowed.add(f"self.{chain[depth + 1][0].rsplit('.', 1)[-1]}")
        unknown = sorted(visitor.reads - allowed)
        if unknown:
            raise TraceFailure(
                f"the forward of '{where}' ({type(module).__name__}) uses {', '.join(unknown)}, which ExpertFlow's "
                "generic decoder-stack forward does not reproduce; compiling it would give different logits", where)
        if depth + 1 == len(chain):
            _check_layer_loop(visitor, module, where)


def _check_layer_loop(visitor: _ForwardReads, module: nn.Module, where: str) -> None:
    name = type(module).__name__
    calls: list[ast.Call] = []
    targets: list[ast.AST] = []
    for loop in visitor.layer_loops:
        found, assigned = _layer_calls(loop)
        calls += found
        targets += assigned
    if not calls:
        raise TraceFailure(f"cannot find where {name}.forward calls its decoder layers (a loop over self.layers), "
                           "so cannot check that ExpertFlow's generic forward calls them the same way", where)
    for call in calls:
        extra = sorted({k.arg for k in call.keywords if k.arg is not None} - LAYER_KWARGS)
        if extra or len(call.args) > 1:
            what = ", ".join(extra) if extra else f"{len(call.args)} positional arguments"
            raise TraceFailure(f"{name}.forward gives its decoder layers {what}, which ExpertFlow's generic forward "
                               f"does not (it gives the hidden state and {sorted(LAYER_KWARGS)})", f"{where}.layers")
    for target in targets:
        if isinstance(target, (ast.Tuple, ast.List)):
            kept = [e for e in target.elts if not (isinstance(e, ast.Name) and e.id == "_")]
            if len(kept) > 1:
                raise TraceFailure(f"{name}.forward takes {len(kept)} values back from each decoder layer and "
                                   "threads them on; ExpertFlow's generic forward threads only the hidden state",
                                   f"{where}.layers")


def _path_in(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise TraceFailure(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


@dataclass
class TraceInfo:
    """What the front end learnt about the model while tracing."""

    layers_path: str
    mask_kinds: list[str]
    experts: dict[int, str] = field(default_factory=dict)  # decoder layer -> experts module path


def trace_model(lm: nn.Module, batch: int = 2, seq: int = 3) -> tuple[fx.GraphModule, TraceInfo]:
    """Traces ``lm`` (parameters may live on the meta device) into one GraphModule."""
    from transformers import DynamicCache

    driver = Driver(lm)
    check_supported(driver)
    config = lm.config
    dtype = next(lm.parameters()).dtype
    masks = {k: torch.zeros(batch, 1, seq, seq, dtype=dtype, device="meta") for k in set(driver.mask_kinds)}
    meta = {
        "input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"),
        "position_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"),
        "past_key_values": DynamicCache(config=config),
        "masks": masks,
    }
    tracer = ExpertFlowTracer(meta)
    try:
        graph = tracer.trace(driver)
    except TraceFailure:
        raise
    except Exception as exc:
        raise TraceFailure(f"cannot trace {type(lm).__name__}: {type(exc).__name__}: {exc}") from exc
    gm = fx.GraphModule(driver, graph, class_name=type(lm).__name__ + "Graph")
    layers_path = f"lm.{driver.inner_path}.layers" if driver.inner_path else "lm.layers"
    info = TraceInfo(layers_path=layers_path, mask_kinds=driver.mask_kinds)
    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_experts_module(gm.get_submodule(node.target)):
            match = pattern.match(node.target + ".")
            if match is None:
                raise TraceFailure(f"experts module '{node.target}' is not inside {layers_path}")
            info.experts[int(match.group(1))] = node.target
            node.meta["ef.layer"] = int(match.group(1))
            node.meta["ef.role"] = "experts"
        elif node.op == "call_module" and node.target.endswith(".embed_tokens"):
            node.meta["ef.role"] = "embed"
    return gm, info
