"""The ``node.meta`` keys ExpertFlow's front end and passes write, and the stream names: defined once.

Stored with the graph (``ir/serialize.py`` keeps :data:`STORED`) and read by the runtime:

- :data:`LAYER`: the MoE layer (decoder-layer index) an experts call or ExpertFlow op belongs to
  (front end, ``lower_experts``; read by every later pass, the loader, the dumps);
- :data:`ROLE`: what a node is to ExpertFlow (``"experts"`` for an experts call, ``"embed"`` for
  the token embedding, predictor roles set by ``insert_prefetch``);
- :data:`STREAM`: the stream ``schedule`` puts a node on (:data:`STREAMS`); the runtime copies on
  the stream a copying node names;
- :data:`MODULE`: the experts module an op computes for (its path in the graph root).

Only while compiling (never stored):

- :data:`VALUE`: the meta-device value the tracer computed for a node; :data:`VALUE_ERROR` why it has
  none; :data:`STATIC`: the value is fixed at compile time; :data:`FIXED_DIMS`: dimensions whose
  size the code gives literally (``passes/proxies.py``);
- :data:`BLOCK_INPUT`: the name of the MoE block's input node (``lower_experts``; read by
  ``insert_prefetch`` and calibration).
"""

from __future__ import annotations

LAYER = "ef.layer"
ROLE = "ef.role"
STREAM = "ef.stream"
MODULE = "ef.module"
VALUE = "ef.meta"
VALUE_ERROR = "ef.meta_error"
STATIC = "ef.static"
FIXED_DIMS = "ef.fixed_dims"
BLOCK_INPUT = "ef.block_input"

#: The keys graph.json keeps for each node.
STORED = (LAYER, ROLE, STREAM, MODULE)

#: Streams: speculative copies in issue order, demand copies ahead of every prefetch, and compute.
COPY, DEMAND, COMPUTE = "copy", "demand", "compute"
STREAMS = (COPY, DEMAND, COMPUTE)
#: Streams that move bytes: their nodes cost the compute stream nothing.
COPY_STREAMS = frozenset({COPY, DEMAND})
