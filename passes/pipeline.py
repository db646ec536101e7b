"""The compile pipeline: trace, then lower, predict, schedule and clean up, verifying each step."""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from .dce import dce
from .driver import not_moe_reason
from .functionalize_inplace import functionalize_inplace
from .insert_permute import insert_permute
from .insert_prefetch import insert_prefetch
from .insert_reuse import insert_reuse
from .lower_experts import lower_experts
from .manager import PassManager, PassResult
from .options import CompileOptions
from .schedule import schedule
from .trace import TraceFailure, TraceInfo, refuse_cache_contents, trace_model
from .verify import verify_graph

PIPELINE = [functionalize_inplace, lower_experts, insert_prefetch, insert_reuse, insert_permute, dce, schedule]


def compile_graph(lm: nn.Module, options: CompileOptions | None = None,
                  on_pass: Callable[[str], None] | None = None) -> tuple[fx.GraphModule, TraceInfo]:
    """Traces ``lm`` (meta parameters) and runs the whole pipeline; raises on a model with no MoE layer."""
    options = options or CompileOptions()
    reason = not_moe_reason(lm)
    if reason is not None:
        raise TraceFailure(reason)
    gm, info = trace_model(lm)
    result: PassResult = PassManager(PIPELINE, verify=verify_graph, on_pass=on_pass)(gm, options)
    refuse_cache_contents(result.graph_module)
    return result.graph_module, info
