"""Loading what the graph's predictor ops call: one small network or table per op, from the
compiled directory, only where the graph calls that op (``runtime.load``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

from ...ir import ops
from ..store.manifest import LoadError
from .path_predictor import FILE as PREDICTOR_FILE, REFINER_FILE, load_predictor, load_refiner
from .reuse import FILE as REUSE_FILE, load_reuse
from .route_tables import FILE as TABLES_FILE, load_tables

#: graph op -> (the context's attribute, the file, its loader)
_NETWORKS = {
    ops.predict_path: ("path_predictor", PREDICTOR_FILE, load_predictor),
    ops.refine_path: ("path_refiner", REFINER_FILE, load_refiner),
    ops.predict_reuse: ("reuse_predictor", REUSE_FILE, load_reuse),
}


def attach_predictors(context: Any, graph: fx.Graph, path: Path, manifest: dict[str, Any], hidden: int,
                      layouts: dict[int, Any], dev: torch.device) -> None:
    """Sets on ``context`` each network or table ``graph`` calls, checked (LoadError)."""
    called = {n.target for n in graph.nodes if n.op == "call_function"}
    for op, (attr, file, load) in _NETWORKS.items():
        if op not in called:
            continue
        experts = {lay.num_experts for lay in layouts.values()}
        if len(experts) != 1:
            raise LoadError(f"{path}: the routing-path predictor needs every MoE layer to have as many experts")
        if file not in manifest["files"]:
            raise LoadError(f"{path} has no {file} (a part of the routing-path predictor); recompile the model "
                            "with --calibration")
        setattr(context, attr, load(path, hidden, len(layouts), experts.pop(), dev, manifest["files"][file]))
    if called & {ops.predict_frequency, ops.predict_transition}:  # each file checked as read: no second open
        context.route_tables = load_tables(path, layouts, dev, manifest["files"].get(TABLES_FILE))
