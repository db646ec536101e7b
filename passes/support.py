"""Is the Driver equivalent to this model's own forward? Read its source and decide.

:func:`check_supported` parses the model's top-level forwards (from the causal LM down to the
decoder stack) with ``ast`` and refuses, naming the module, any model that reads parts or
settings the Driver does not handle, passes its decoder layers other arguments, or threads more
than the hidden state between them.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import torch
from torch import nn

from ..ir.hf_compat import CACHE_KEYWORDS
from .driver import Driver, TraceFailure

#: The keyword arguments the Driver gives every decoder layer (besides the hidden state); the
#: cache goes under whichever name the installed transformers gives it.
LAYER_KWARGS = frozenset({"attention_mask", "position_ids", "use_cache", "position_embeddings", *CACHE_KEYWORDS})

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


_UNKNOWN = object()


class _ForwardReads(ast.NodeVisitor):
    """What a module's forward reads of ``self`` and ``self.config``, skipping the branches that
    cannot run for this model (``if self.config.mup_enabled:`` with the flag off)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.reads: set[str] = set()
        self.layer_loops: list[ast.For] = []
        self.layer_bounds: set[str] = set()  # X of ``for ... in self.layers[: self.config.X]``
        self._bounds: set[int] = set()  # their nodes: checked against the Driver's count, not as reads

    # -- static evaluation of branch conditions on the module and its config
    def _value(self, expr: ast.AST) -> Any:
        if isinstance(expr, ast.Constant):
            return expr.value
        if isinstance(expr, ast.Attribute):
            is_self = isinstance(expr.value, ast.Name) and expr.value.id == "self"
            base = self.module if is_self else self._value(expr.value)
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
        if id(node) in self._bounds:
            return
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
            for sub in ast.walk(node.iter):
                bound = _config_bound(sub)
                if bound is not None:
                    self.layer_bounds.add(bound.attr)
                    self._bounds.add(id(bound))
        self.generic_visit(node)


def _config_bound(node: ast.AST) -> ast.Attribute | None:
    """``self.config.X`` when ``node`` is ``self.layers[: self.config.X]``."""
    if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "layers"
            and isinstance(node.slice, ast.Slice) and node.slice.lower is None and node.slice.step is None):
        return None
    upper = node.slice.upper
    if (isinstance(upper, ast.Attribute) and isinstance(upper.value, ast.Attribute) and upper.value.attr == "config"
            and isinstance(upper.value.value, ast.Name) and upper.value.value.id == "self"):
        return upper
    return None


def _forward_source(module: nn.Module, path: str) -> ast.AST:
    fn = inspect.unwrap(type(module).forward)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        return ast.parse(source)
    except (OSError, TypeError, SyntaxError) as exc:
        raise TraceFailure(f"cannot read the source of the forward of '{path}' ({type(module).__name__}): {exc}; "
                           "so cannot check that ExpertFlow's generic forward does what it does", path) from exc


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
            for name in sorted(visitor.layer_bounds):
                _check_layer_count(driver, module, name, where)


def _check_layer_count(driver: Driver, module: nn.Module, name: str, where: str) -> None:
    """The stack runs ``self.layers[: config.<name>]`` (longcat_flash: ``num_layers``, half of
    ``num_hidden_layers``, two attention sublayers per decoder layer); the Driver runs
    ``[: config.num_hidden_layers]``: refused unless that is the same layers."""
    layers = getattr(module, "layers", None) or []
    count = getattr(getattr(module, "config", None), name, None)
    if not isinstance(count, int) or len(layers[:count]) != len(layers[: driver.num_layers]):
        raise TraceFailure(f"the forward of '{where}' ({type(module).__name__}) runs its first config.{name} = {count!r} "
                           f"decoder layers, ExpertFlow's generic forward its first config.num_hidden_layers = "
                           f"{driver.num_layers}: different layers", where)


def _check_layer_loop(visitor: _ForwardReads, module: nn.Module, where: str) -> None:
    name = type(module).__name__
    calls: list[ast.Call] = []
    targets: list[ast.AST] = []
    for loop in visitor.layer_loops:
        found, assigned = _layer_calls(loop)
        calls += found
        targets += assigned
    if not calls:
        raise TraceFailure(f"cannot find where the forward of '{where}' ({name}) calls its decoder layers (a loop "
                           "over self.layers), so cannot check that ExpertFlow's generic forward calls them the same "
                           "way", where)
    for call in calls:
        extra = sorted({k.arg for k in call.keywords if k.arg is not None} - LAYER_KWARGS)
        if extra or len(call.args) > 1:
            what = ", ".join(extra) if extra else f"{len(call.args)} positional arguments"
            raise TraceFailure(f"the forward of '{where}' ({name}) gives its decoder layers ('{where}.layers') {what}, "
                               "which ExpertFlow's generic forward does not (it gives the hidden state and "
                               f"{', '.join(sorted(LAYER_KWARGS))})", f"{where}.layers")
    for target in targets:
        if isinstance(target, (ast.Tuple, ast.List)):
            kept = [e for e in target.elts if not (isinstance(e, ast.Name) and e.id == "_")]
            if len(kept) > 1:
                raise TraceFailure(f"the forward of '{where}' ({name}) takes {len(kept)} values back from each decoder "
                                   f"layer ('{where}.layers') and threads them on; ExpertFlow's generic forward "
                                   "threads only the hidden state", f"{where}.layers")
