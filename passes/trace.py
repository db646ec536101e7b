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

Every proxy (``passes/proxies.py``) carries a meta-device value (``node.meta["ef.meta"]``), so
code that star-unpacks ``x.shape`` (DeepSeek, GLM MoE blocks) traces: the tracer knows the rank.
Python branches on values fixed at compile time (``weight.dtype == torch.float32``, a rank, a
size the code gives literally, the cache's layout ``cache.is_sliding``) are taken; so is a
comparison of two sizes that agree at two unrelated input sizes (Gemma 4's "did my stack
slice?" check, :meth:`ExpertFlowTracer.resample`); so is a branch whose two sides trace to the
same graph (:func:`_explore`). Python that depends on anything else (a
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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr
from torch.fx.proxy import Proxy

from ..ir import meta_keys, ops
from ..ir.allowlist import CACHE_ATTRIBUTES, CACHE_METHODS
from ..ir.hf_compat import new_cache
from .driver import EXPERT_FLAGS, Driver, TraceFailure, is_experts_module  # noqa: F401
from .leaves import leaf_callables
from .proxies import CacheProxy, DynamicPython, MetaProxy, cache_address, fixed_dims, is_static_value, to_meta

__all__ = ["EXPERT_FLAGS", "Driver", "DynamicPython", "ExpertFlowTracer", "TraceFailure", "TraceInfo",
           "is_experts_module", "refuse_cache_contents", "trace_model"]

class _RunWhole(Exception):
    """Raised out of the trace by the innermost module running :class:`DynamicPython` that holds no
    experts module: :func:`trace_model` traces again with every module of its class a leaf."""

    def __init__(self, cls: type, path: str, failure: DynamicPython):
        super().__init__(f"{path} ({cls.__name__}): {failure}")
        self.cls = cls



def _holds_experts(m: nn.Module) -> bool:
    return any(is_experts_module(sub) for sub in m.modules())


class ExpertFlowTracer(fx.Tracer):
    """Traces with leaves at attention, rotary, norms, torch.nn modules and experts modules, and at
    the modules of ``run_whole`` (classes whose Python the trace cannot follow) that hold no experts."""

    def __init__(self, placeholder_meta: dict[str, Any], run_whole: frozenset[type] = frozenset(),
                 other_sample: Callable[[], dict[str, Any]] | None = None, forced: dict[int, bool] | None = None):
        super().__init__(param_shapes_constant=True)
        self.placeholder_meta = placeholder_meta
        self.other_sample = other_sample  # inputs of other sizes, for :meth:`resample`
        self.run_whole = run_whole
        self.experts_paths: list[str] = []
        self.forced = forced or {}  # dynamic branch index -> the side taken (see _explore)
        self._branches = 0

    def dynamic_branch(self) -> tuple[int, bool | None]:
        """The index of the dynamic ``if`` the trace has reached (in trace order), and the side
        :func:`_explore` forces for it, if any."""
        index = self._branches
        self._branches += 1
        return index, self.forced.get(index)

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
        if ops.is_cache_input(node):
            return CacheProxy(node, self)
        return MetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_function":
            target, args, kwargs = _cache_state_call(target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        node.meta[meta_keys.FIXED_DIMS] = fixed_dims(node)
        node.meta[meta_keys.STATIC] = is_static_value(node)
        try:
            with _unpatched_modules():
                node.meta[meta_keys.VALUE] = self._meta_value(kind, target, args, kwargs)
        except Exception as exc:  # data-dependent ops have no meta value; shapes after them are unknown
            node.meta[meta_keys.VALUE] = None
            node.meta[meta_keys.VALUE_ERROR] = f"{type(exc).__name__}: {exc}"
            if kind == "call_module" and isinstance(exc, TypeError) and all(
                    a.meta.get(meta_keys.VALUE) is not None for a in node.all_input_nodes):
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
        return self._compute(kind, target, to_meta(args), to_meta(kwargs))

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


#: How many dynamic branches one trace may settle by :func:`_explore` (each doubles the traces).
_MAX_FORCED = 3


def _explore(trace: Callable[[dict[int, bool]], fx.Graph], forced: dict[int, bool], depth: int) -> fx.Graph:
    """``trace(forced)``; where it stops at an ``if`` on a run-time value in a module that holds
    experts, the trace is taken down both sides: when the two graphs are the same code, the branch
    decides nothing the compiled model runs (Gemma 4 asks ``seq_len == 1`` only to skip an
    optimisation its other guards skip too) and either graph is the model's. Otherwise the refusal
    stands."""
    try:
        return trace(forced)
    except TraceFailure as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, DynamicPython):
            cause = cause.__cause__
        if depth == 0 or cause is None or cause.branch is None:
            raise
        try:
            sides = [_explore(trace, {**forced, cause.branch: side}, depth - 1) for side in (False, True)]
        except TraceFailure:
            raise exc from None
        if _code(sides[0]) != _code(sides[1]):  # the True side may have made a module whole: once more
            sides[0] = _explore(trace, {**forced, cause.branch: False}, depth - 1)
        if _code(sides[0]) != _code(sides[1]):
            raise exc from None
        return sides[0]


def _code(graph: fx.Graph) -> str:
    return graph.python_code("self").src


def trace_model(lm: nn.Module, batch: int = 2, seq: int = 3) -> tuple[fx.GraphModule, TraceInfo]:
    """Traces ``lm`` (parameters may live on the meta device) into one GraphModule."""
    parts = [k for k in ("vision_config", "audio_config") if k in (getattr(lm.config, "sub_configs", None) or {})]
    if parts:
        raise TraceFailure(f"'lm' ({type(lm).__name__}) is a multimodal model ({', '.join(parts)}): ExpertFlow "
                           "compiles text models; save its language model alone (its text config) and compile that",
                           "lm")
    driver = Driver(lm)
    def sample(batch: int, seq: int) -> dict[str, Any]:  # made afresh each time: leaves' meta values fill the cache
        return {
            "input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device="meta"),
            "position_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"),
            "cache": new_cache(lm),
            "logits_to_keep": slice(None),
        }

    run_whole: set[type] = set()

    def trace(forced: dict[int, bool]) -> fx.Graph:
        while True:
            tracer = ExpertFlowTracer(sample(batch, seq), frozenset(run_whole), lambda: sample(batch + 3, seq + 8),
                                      forced)
            try:
                with leaf_callables(tracer, driver):
                    return tracer.trace(driver)
            except _RunWhole as retry:  # a new class each time (its modules are leaves now): this ends
                run_whole.add(retry.cls)
            except TraceFailure:
                raise
            except Exception as exc:
                raise TraceFailure(f"cannot trace {type(lm).__name__}: {type(exc).__name__}: {exc}") from exc

    graph = _explore(trace, {}, _MAX_FORCED)
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
            node.meta[meta_keys.LAYER] = int(match.group(1))
            node.meta[meta_keys.ROLE] = "experts"
        elif node.op == "call_module" and node.target == f"{driver.layers_path.rsplit('.', 1)[0]}.embed_tokens":
            node.meta[meta_keys.ROLE] = "embed"
    return gm, info


def _cache_state_call(target: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """State the model keeps on its cache object, as graph nodes: reading an attribute of the cache
    or of one of its layers that is not its layout becomes :func:`ops.cache_state` (None before the
    first write), and ``torch.cat`` onto such a read :func:`ops.extend_state`, which also runs at
    the first step; what the model does when the state is missing is what its other branch does
    (Qwen4-exp: ``if history is not None: positions = cat([history, positions])``), so the trace
    takes the branch that has the history. Any other use of such a read is refused afterwards
    (:func:`refuse_cache_contents`)."""
    if target is getattr and len(args) == 2 and isinstance(args[0], Proxy) and args[1] not in CACHE_ATTRIBUTES \
            and args[1] != "layers":
        address = cache_address(args[0].node)
        if address is not None:
            return ops.cache_state, (args[0].tracer.proxy(address[0]), address[1], args[1]), {}
    if target in (torch.cat, torch.concat) and args and isinstance(args[0], (list, tuple)) and args[0] \
            and isinstance(args[0][0], Proxy) and args[0][0].node.target is ops.cache_state:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return ops.extend_state, (args[0][0], list(args[0][1:]), dim), {}
    return target, args, kwargs


def refuse_cache_contents(gm: fx.GraphModule) -> None:
    """Raises, naming the module, when the finished graph reads of the cache input anything but its
    layout and the history the model appends to (:func:`_cache_state_call`): a forward that reaches
    into its layers' tensors, or uses state it keeps on the cache otherwise than by extending it,
    which one stored graph cannot carry. Reads that only steered the trace (``len(cache.layers)``,
    fixed by the config) are gone by now."""
    allowed = CACHE_ATTRIBUTES | CACHE_METHODS
    for node in gm.graph.nodes:
        cache_read = ((node.op == "call_function" and node.target is getattr) or node.op == "call_method") and \
            ops.is_cache_input(node.args[0])
        name = node.args[1] if node.op == "call_function" and cache_read else node.target
        if node.target is ops.cache_state and any(u.target is not ops.extend_state or u.args[0] is not node
                                                  for u in node.users):
            name = ".".join([*map(str, node.args[1]), node.args[2]])
            _refuse_read(node, name, "state it keeps there, used otherwise than by appending to it")
        if cache_read and name not in allowed:
            _refuse_read(node, name, f"what the cache holds so far rather than its layout (a graph reads only "
                                     f"{sorted(allowed)} and history the model appends to)")


def _refuse_read(node: fx.Node, name: str, what: str) -> None:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    path = stack[-1][0] if stack else "lm"
    raise TraceFailure(f"cannot trace module '{path}': its forward reads cache.{name}, {what}; one stored graph "
                       "cannot carry it", path)
