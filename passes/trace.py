"""Front end: one torch.fx graph for a whole transformers causal-LM MoE model, by its own forward.

What it builds: a graph of :class:`Driver`, which calls the causal LM's own forward (so the
embeddings, the masks, rotary and per-layer inputs, every decoder layer with whatever state it
threads, the norms, the head and the logit transforms are transformers' code), with
``input_ids``, the 2-D ``attention_mask``, ``position_ids``, the cache (transformers' own cache
object: keys and values, linear-attention and convolution states) and ``logits_to_keep`` as
graph inputs. Attention, rotary embeddings, norms, standard ``torch.nn`` modules and every
experts module are leaves; transformers' mask builders and per-step containers are single
calls (``passes/leaves.py``); everything else, routers included, is traced, so the router's math
is visible in the graph (unless its Python cannot be one graph: below). A module that holds an
experts module is never a leaf, whatever its name.

Every proxy carries a meta-device value (``node.meta["ef.meta"]``) computed while tracing, so
code that star-unpacks ``x.shape`` (DeepSeek, GLM MoE blocks) traces: the tracer knows the rank.
Python branches on values fixed at compile time (``weight.dtype == torch.float32``, a rank, a
size the code gives literally, the cache's layout ``cache.is_sliding``) are taken; so is a
comparison of two sizes that agree at two unrelated input sizes (Gemma 4's "did my stack
slice?" check, :meth:`ExpertFlowTracer.resample`). Python that depends on anything else (a
branch on the device, ``x.is_cuda``, or on the input's values or sizes; a loop over a run-time
length) cannot be one graph: the innermost module running it is then kept whole, a leaf that
runs its own forward when the compiled model runs (every module of its class is, so the trace
starts again, once per such class), unless it holds an experts module, which must stay visible:
then the trace fails naming the module. Recurrent and convolution mixers (Mamba, gated
DeltaNet, KDA, lightning attention, short convolutions) become such leaves: their state stays
in the cache object, updated by their own code.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import operator
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr
from torch.fx.proxy import Attribute, Proxy

from ..ir.allowlist import CACHE_ATTRIBUTES, CACHE_METHODS
from ..ir.hf_compat import new_cache
from .driver import EXPERT_FLAGS, Driver, TraceFailure, is_experts_module  # noqa: F401
from .leaves import leaf_callables, is_leaf_callable

__all__ = ["EXPERT_FLAGS", "Driver", "DynamicPython", "ExpertFlowTracer", "TraceFailure", "TraceInfo",
           "is_experts_module", "refuse_cache_contents", "trace_model"]

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


class DynamicPython(TraceFailure):
    """Python control flow or iteration on a value that is not fixed when the model is compiled."""


class _RunWhole(Exception):
    """Raised out of the trace by the innermost module running :class:`DynamicPython` that holds no
    experts module: :func:`trace_model` traces again with every module of its class a leaf."""

    def __init__(self, cls: type, path: str, failure: DynamicPython):
        super().__init__(f"{path} ({cls.__name__}): {failure}")
        self.cls = cls


def _unknown_length(proxy: Proxy, what: str) -> TraceFailure:
    meta = proxy.node.meta.get("ef.meta")
    why = (f"it is a tensor of shape {tuple(meta.shape)}, whose length is a run-time size"
           if isinstance(meta, torch.Tensor) else
           proxy.node.meta.get("ef.meta_error", "its value is data-dependent"))
    return DynamicPython(f"cannot {what} {proxy.node.format_node()}: its length is unknown ({why})")


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
        if isinstance(meta, bool) and _compares_sizes(self.node) and self.tracer.resample(self.node) is meta:
            return meta
        raise DynamicPython(f"Python control flow on {_describe(self.node)}, whose value is not fixed when the "
                           "model is compiled (it depends on the input's values or sizes, or on the device the "
                           "compiled model runs on); one graph cannot follow both branches")


def _compares_sizes(node: fx.Node) -> bool:
    """``a == b`` or ``a != b`` of two sizes that both come from the traced values (not a literal):
    Gemma 4 asks ``hidden_states.shape[1] == input_ids.shape[1]``, whether its stack sliced."""
    return (node.op == "call_function" and node.target in (operator.eq, operator.ne) and len(node.args) == 2
            and all(isinstance(a, fx.Node) and type(a.meta.get("ef.meta")) is int for a in node.args))


def _describe(node: fx.Node, depth: int = 3) -> str:
    """A short expression for ``node`` (``hidden_states.is_cuda``, ``x.sum() > 0``) for messages."""
    if depth == 0 or node.op in ("placeholder", "get_attr", "call_module"):
        return node.name if node.op != "get_attr" else str(node.target)

    def arg(a: Any) -> str:
        return _describe(a, depth - 1) if isinstance(a, fx.Node) else repr(a)

    if node.op == "call_function" and node.target is getattr:
        return f"{arg(node.args[0])}.{node.args[1]}"
    if node.op == "call_method":
        return f"{arg(node.args[0])}.{node.target}({', '.join(arg(a) for a in node.args[1:])})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({', '.join(arg(a) for a in node.args)})"


def _unpack_count(frame: types.FrameType | None) -> int | None:
    """N when the caller of ``frame`` is executing ``UNPACK_SEQUENCE N`` (``a, b = proxy``)."""
    caller = frame.f_back if frame is not None else None
    if caller is None:
        return None
    for inst in dis.get_instructions(caller.f_code):
        if inst.offset == caller.f_lasti:
            return inst.argval if inst.opname == "UNPACK_SEQUENCE" else None
    return None


class CacheProxy(MetaProxy):
    """The graph's cache input: the model's own ``isinstance(cache, MiniMaxCache)`` sees the class
    of the cache it was traced with (what runs is made by the same rule: ``hf_compat.cache_maker``)."""

    @property
    def __class__(self) -> type:  # type: ignore[override]
        meta = self.node.meta.get("ef.meta")
        return type(meta) if meta is not None else MetaProxy


class MetaAttribute(Attribute, MetaProxy):
    """fx's lazily created attribute proxy (``x.shape``, ``x.view``), with MetaProxy's methods."""


def _holds_experts(m: nn.Module) -> bool:
    return any(is_experts_module(sub) for sub in m.modules())


class ExpertFlowTracer(fx.Tracer):
    """Traces with leaves at attention, rotary, norms, torch.nn modules and experts modules, and at
    the modules of ``run_whole`` (classes whose Python the trace cannot follow) that hold no experts."""

    def __init__(self, placeholder_meta: dict[str, Any], run_whole: frozenset[type] = frozenset(),
                 other_sample: Callable[[], dict[str, Any]] | None = None):
        super().__init__(param_shapes_constant=True)
        self.placeholder_meta = placeholder_meta
        self.other_sample = other_sample  # inputs of other sizes, for :meth:`resample`
        self.run_whole = run_whole
        self.experts_paths: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_experts_module(m):
            return True
        if _holds_experts(m):  # never hidden in a leaf, whatever its name (Jamba's AttentionDecoderLayer)
            return False
        if type(m) in self.run_whole:
            return True
        name = type(m).__name__
        if "Attention" in name or "Rotary" in name or name.endswith("Norm") or "RMSNorm" in name:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:  # a module made on the fly or kept outside the tree (a kernel wrapper): its code, inline
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceFailure as exc:
            if exc.module is not None:
                raise
            if isinstance(exc, DynamicPython) and not _holds_experts(m):
                raise _RunWhole(type(m), path, exc) from exc
            raise TraceFailure(f"cannot trace module '{path}' ({type(m).__name__}): {exc}", path) from exc
        except _RunWhole:
            raise
        except Exception as exc:  # name the module that failed, once, at the innermost level
            raise TraceFailure(f"cannot trace module '{path}' ({type(m).__name__}): "
                               f"{type(exc).__name__}: {exc}", path) from exc

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """A buffer read in traced code is a ``get_attr`` node, as a parameter is: what a router
        computes from one (``bias.unsqueeze(0)``) is then graph nodes, not a tensor constant that a
        stored graph cannot name (fx's own buffer proxies assume parameters)."""
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter):
            for name, buffer in self.root.named_buffers():
                if buffer is attr_val:
                    if name not in parameter_proxy_cache:
                        parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                    return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> Proxy:
        if node.op == "placeholder" and node.target == "cache":
            return CacheProxy(node, self)
        return MetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        node.meta["ef.fixed_dims"] = _fixed_dims(node)
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

    def resample(self, node: fx.Node) -> Any:
        """``node``'s value computed again (on the meta device) from inputs of other sizes, or None.
        Two sizes equal at both samples (batch 2, 3 tokens; batch 5, 11 tokens) are the same size."""
        if self.other_sample is None:
            return None
        needed, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        inputs, env = self.other_sample(), {}
        with _unpatched_modules():
            for n in node.graph.nodes:
                if n in needed:
                    args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                    try:
                        env[n] = inputs.get(n.target) if n.op == "placeholder" else self._compute(
                            n.op, n.target, args, kwargs)
                    except Exception:  # as in the first sample: no value (a mask builder's .item() on meta)
                        env[n] = None
        return env[node]

    def _meta_value(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.placeholder_meta.get(target)
        return self._compute(kind, target, _to_meta(args), _to_meta(kwargs))

    def _compute(self, kind: str, target: Any, margs: Any, mkwargs: Any) -> Any:
        if kind == "get_attr":
            return _fetch_attr(self.root, target)
        if kind != "call_module" and _any_meta((margs, mkwargs)):
            margs, mkwargs = _on_meta(margs), _on_meta(mkwargs)
        if kind == "call_function":
            return target(*margs, **mkwargs)
        if kind == "call_method":
            return getattr(margs[0], target)(*margs[1:], **mkwargs)
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            if is_experts_module(mod):  # experts return a tensor shaped like their hidden input
                return torch.empty_like(margs[0])
            real = {n: t.to("meta") for n, t in [*mod.named_parameters(), *mod.named_buffers()] if not t.is_meta}
            if real:  # a buffer the skeleton made on the CPU (a router's constant table): meta too, here
                return torch.func.functional_call(mod, real, tuple(margs), dict(mkwargs), strict=False)
            return mod(*margs, **mkwargs)
        return None


def _any_meta(values: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in pytree.tree_leaves(values))


def _on_meta(values: Any) -> Any:
    """Real tensors (buffers, and what is computed from them alone: ``bias.unsqueeze(0)``) moved to
    the meta device where they meet traced values, which are meta: torch refuses to mix devices."""
    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) and not v.is_meta else v, values)


_STATIC_ATTRIBUTES = frozenset({"dtype", "ndim"})  # a graph input's rank is fixed when compiled


#: Methods whose literal size arguments fix those dimensions of the result: ``expand(4, b, -1)``
#: has 4 rows whatever the input (Qwen3.5's text/temporal/height/width position ids).
_SIZED = frozenset({"expand", "view", "reshape"})


def _fixed_dims(node: fx.Node) -> frozenset[int]:
    """The dimensions of ``node``'s tensor whose size is a literal in the code, not an input's size."""
    if node.op != "call_method" or node.target not in _SIZED:
        return frozenset()
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    return frozenset(i for i, size in enumerate(sizes) if type(size) is int and size >= 0)


def _is_fixed_size(node: fx.Node) -> bool:
    """``t.shape[i]`` or ``t.size(i)`` for a dimension :func:`_fixed_dims` knows."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        tensor, index = node.args
    elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
          and node.args[0].op == "call_function" and node.args[0].target is getattr
          and node.args[0].args[1] == "shape"):
        tensor, index = node.args[0].args[0], node.args[1]
    else:
        return False
    meta = tensor.meta.get("ef.meta") if isinstance(tensor, fx.Node) else None
    if type(index) is not int or not isinstance(meta, torch.Tensor):
        return False
    return index % max(meta.dim(), 1) in tensor.meta.get("ef.fixed_dims", frozenset())


def _is_static_value(node: fx.Node) -> bool:
    """True when the node's value is fixed when the model is compiled: weights and buffers, their
    shapes, any tensor's dtype and rank, sizes the code gives literally, and what is computed from
    those alone. Not: anything that depends on the input's sizes or values, or on the device
    (``x.is_cuda``) the compiled model runs on."""
    if node.op == "get_attr" or _is_fixed_size(node):
        return True
    if node.op == "placeholder":
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _STATIC_ATTRIBUTES:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in CACHE_ATTRIBUTES and getattr(node.args[0], "target", None) == "cache":
        return True
    if node.op == "call_method" and node.target == "dim" and len(node.args) == 1:
        return True
    if node.op not in ("call_function", "call_method") or is_leaf_callable(node.target):
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


@dataclass
class TraceInfo:
    """What the front end learnt about the model while tracing."""

    layers_path: str
    experts: dict[int, str] = field(default_factory=dict)  # decoder layer -> experts module path


def trace_model(lm: nn.Module, batch: int = 2, seq: int = 3) -> tuple[fx.GraphModule, TraceInfo]:
    """Traces ``lm`` (parameters may live on the meta device) into one GraphModule."""
    parts = [k for k in ("vision_config", "audio_config") if k in (getattr(lm.config, "sub_configs", None) or {})]
    if parts:
        raise TraceFailure(f"'lm' ({type(lm).__name__}) is a multimodal model ({', '.join(parts)}): ExpertFlow "
                           "compiles text models; save its language model alone (its text config) and compile that",
                           "lm")
    driver = Driver(lm)
    run_whole: frozenset[type] = frozenset()
    def sample(batch: int, seq: int) -> dict[str, Any]:  # made afresh each time: leaves' meta values fill the cache
        return {
            "input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device="meta"),
            "position_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"),
            "cache": new_cache(lm),
            "logits_to_keep": slice(None),
        }

    while True:
        tracer = ExpertFlowTracer(sample(batch, seq), run_whole, lambda: sample(batch + 3, seq + 8))
        try:
            with leaf_callables(tracer, driver):
                graph = tracer.trace(driver)
            break
        except _RunWhole as retry:  # a new class each time (its modules are leaves now): this ends
            run_whole |= {retry.cls}
        except TraceFailure:
            raise
        except Exception as exc:
            raise TraceFailure(f"cannot trace {type(lm).__name__}: {type(exc).__name__}: {exc}") from exc
    for node in list(graph.nodes):  # values the model computed and dropped (a ModelOutput field nobody reads)
        if node.op == "get_attr" and not node.users and node.target.startswith("_tensor_constant"):
            graph.erase_node(node)
    gm = fx.GraphModule(driver, graph, class_name=type(lm).__name__ + "Graph")
    info = TraceInfo(layers_path=driver.layers_path)
    pattern = re.compile(re.escape(info.layers_path) + r"\.(\d+)\.")
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_experts_module(gm.get_submodule(node.target)):
            match = pattern.match(node.target + ".")
            if match is None:
                raise TraceFailure(f"experts module '{node.target}' is not inside {info.layers_path}", node.target)
            info.experts[int(match.group(1))] = node.target
            node.meta["ef.layer"] = int(match.group(1))
            node.meta["ef.role"] = "experts"
        elif node.op == "call_module" and node.target == f"{driver.layers_path.rsplit('.', 1)[0]}.embed_tokens":
            node.meta["ef.role"] = "embed"
    return gm, info


def refuse_cache_contents(gm: fx.GraphModule) -> None:
    """Raises, naming the module, when the finished graph reads of the cache input anything but its
    layout: a forward that keeps Python state on the cache object (qwen4_exp_text's indexer
    positions) or reaches into its layers' tensors, which one stored graph cannot carry. Reads
    that only steered the trace (``len(cache.layers)``, fixed by the config) are gone by now."""
    allowed = CACHE_ATTRIBUTES | CACHE_METHODS
    for node in gm.graph.nodes:
        cache_read = ((node.op == "call_function" and node.target is getattr) or node.op == "call_method") and \
            isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder" and node.args[0].target == "cache"
        name = node.args[1] if node.op == "call_function" and cache_read else node.target
        if cache_read and name not in allowed:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            path = stack[-1][0] if stack else "lm"
            raise TraceFailure(f"cannot trace module '{path}': its forward reads cache.{name}, what the cache "
                               f"holds so far rather than its layout (a graph reads only {sorted(allowed)}); one "
                               "stored graph cannot carry Python state kept on the cache object", path)
