"""Recorded routes replay in expertflow-simulate, and the simulator counts what the runtime did."""

from __future__ import annotations

import json

import pytest
import torch

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.tools.sim.cache_sim import simulate
from expertflow.tools.sim.trace_file import parse_trace
from expertflow.tools.cli.compile import compile_model
from expertflow.tools.cli.simulate import main as simulate_main


@pytest.fixture(scope="module")
def on_demand(model_dir, tmp_path_factory):
    """tiny-trained-moe compiled without a predictor: every expert loads when its layer asks."""
    return compile_model(str(model_dir("tiny-trained-moe")), tmp_path_factory.mktemp("ondemand") / "c",
                         CompileOptions(predictor="none"), dumps=False)


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_the_simulator_counts_what_the_runtime_did(slots, on_demand, tmp_path):
    """One token per step (a one-token prompt, then decode): the runtime's hits and loads equal the
    simulator's layer-cycle replay of the routes it recorded, exactly."""
    model = runtime.load(on_demand, expert_cache=slots, record_routing=True)
    tokenizer = runtime.load_tokenizer(on_demand)
    ids = torch.tensor([[tokenizer.bos_token_id]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    trace = parse_trace(model.routing.write_jsonl(tmp_path / "routes.jsonl"), experts_per_layer=8)
    assert len(trace) == 40 * 4 and {a.layer for a in trace} == {0, 1, 2, 3}  # 40 steps, 4 MoE layers
    replay = simulate(trace, "layer_cycle", slots)
    stats = model.stats()["total"]
    assert (replay.hits, replay.loads) == (stats["hits"], stats["misses"]), (replay, stats)
    assert stats["predicted"] == 0  # no predictor: demand loads only


def test_batched_routes_are_written_per_sequence_and_replay(on_demand, tmp_path, capsys):
    model = runtime.load(on_demand, expert_cache=4, record_routing=True)
    tokenizer = runtime.load_tokenizer(on_demand)
    batch = tokenizer(["def __init__(self", "import os"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    path = model.routing.write_jsonl(tmp_path / "routes.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    length = out.shape[1] - 1  # the last token is generated, never routed
    assert [(r["seq"], r["token"], r["layer"]) for r in records] == \
        [(s, t, l) for s in range(2) for t in range(length) for l in range(4)]
    assert all(len(r["experts"]) == 2 and all(0 <= e < 8 for e in r["experts"]) for r in records)
    assert simulate_main(["--trace", str(path), "--experts-per-layer", "8", "--cache", "4,8", "--quiet",
                          "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["policy"] for r in rows} >= {"lru", "layer_cycle", "belady"}
    assert all(r["accesses"] == 2 * len(records) for r in rows)
