"""expertflow-simulate: cache policies replayed on routing traces, checked against references
written here independently (plain scans, an exhaustive optimum) and hand-computed loads."""

from __future__ import annotations

import json
import random
from collections import Counter
from functools import cache
from itertools import combinations
from pathlib import Path

import pytest

from expertflow.runtime.cache.policy import POLICIES as RUNTIME_POLICIES, LayerCycle, Policy
from expertflow.tools.cli import simulate as cli
from expertflow.tools.sim.cache_sim import POLICIES, Access, TimeModel, predict_time, simulate
from expertflow.tools.sim.sim_cache import Clock, SimCache
from expertflow.tools.sim.trace_file import parse_lines, parse_trace

#: The policies ``reference_loads`` writes out (predictive's estimates have no plain-scan form).
REFERENCE_POLICIES = ("lru", "lfu", "layer_cycle", "belady")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def steps(*records: tuple[int, list[int]]) -> list[Access]:
    """A trace from (layer, experts) records; a new token starts whenever the layer does not increase."""
    trace, token, last = [], 0, None
    for layer, experts in records:
        if last is not None and layer <= last:
            token += 1
        trace.append(Access(0, token, layer, tuple(sorted(set(experts)))))
        last = layer
    return trace


def cyclic(layers: int, experts_of: dict[int, list[int]], tokens: int) -> list[Access]:
    return [Access(0, t, layer, tuple(experts_of[layer])) for t in range(tokens) for layer in range(layers)]


def random_trace(rng: random.Random, max_len: int, max_layers: int, max_experts: int, max_k: int) -> list[Access]:
    layers = rng.randint(1, max_layers)
    experts = rng.randint(1, max_experts)
    k = rng.randint(1, min(max_k, experts))
    # Skewed popularity, so that policies differ (uniform routing makes them all alike).
    weights = [1 / (i + 1) ** rng.uniform(0.0, 2.0) for i in range(experts)]
    trace = []
    for t in range(rng.randint(1, max_len)):
        for layer in range(layers):
            chosen: set[int] = set()
            while len(chosen) < k:
                chosen.add(rng.choices(range(experts), weights)[0])
            trace.append(Access(0, t, layer, tuple(sorted(chosen))))
    return trace


# ----- references, written without the simulator's data structures -----

def _next_use(trace: list[Access], step: int, key: tuple[int, int]) -> float:
    for s in range(step + 1, len(trace)):
        if trace[s].layer == key[0] and key[1] in trace[s].experts:
            return s
    return float("inf")


def reference_loads(trace: list[Access], policy: str, capacity: int) -> int:
    """The documented rule by plain scans: resident experts first, waves of ``capacity``, a load
    evicts the highest-ranked resident key outside its wave (ties: least recently used)."""
    positions = {layer: i for i, layer in enumerate(sorted({a.layer for a in trace}))}
    n = len(positions)
    last: dict[tuple[int, int], int] = {}  # resident key -> tick of its last use
    count: Counter = Counter()
    tick = loads = 0
    for step, a in enumerate(trace):
        keys = [(a.layer, e) for e in a.experts]
        order = [k for k in keys if k in last] + [k for k in keys if k not in last]

        def rank(k: tuple[int, int]) -> tuple:
            if policy == "lru":
                return (0, -last[k])
            if policy == "lfu":
                return (-count[k], -last[k])
            if policy == "layer_cycle":
                return ((positions[k[0]] - positions[a.layer] - 1) % n + 1, -last[k])
            return (_next_use(trace, step, k), -last[k])

        for w in range(0, len(order), capacity):
            wave = order[w:w + capacity]
            for k in wave:
                if k not in last:
                    loads += 1
                    if len(last) == capacity:
                        del last[max((r for r in last if r not in wave), key=rank)]
                tick += 1
                last[k] = tick
                count[k] += 1
    return loads


def optimum_loads(trace: list[Access], capacity: int) -> int:
    """Fewest loads over every choice of what to keep, by exhaustive search. Each step's experts
    must fit (top-k <= capacity). Keeping as many old keys as fit is never worse, so only the
    choice of which ones is searched."""

    @cache
    def best(step: int, resident: frozenset) -> int:
        if step == len(trace):
            return 0
        need = frozenset((trace[step].layer, e) for e in trace[step].experts)
        others = sorted(resident - need)
        keep = min(capacity - len(need), len(others))
        return len(need - resident) + min(best(step + 1, need | frozenset(c)) for c in combinations(others, keep))

    return best(0, frozenset())


# ----- policies -----

@pytest.mark.parametrize("policy,expected", [("lru", 5), ("lfu", 4), ("layer_cycle", 5), ("belady", 4)])
def test_hand_computed_single_layer(policy, expected):
    # Experts 0 1 0 2 1 0 of one layer, 2 slots.
    # lru: 0m 1m 0h 2m(evict 1) 1m(evict 0) 0m(evict 2) = 5.
    # lfu: counts 0:2 1:1 when 2 comes -> evict 1; then 1 comes, 0:2 2:1 -> evict 2; 0 hits = 4.
    # layer_cycle: one layer, every key runs next alike, so it is LRU = 5.
    # belady: at 2, 0 is next needed at step 5 and 1 at step 4 -> evict 0; 1 hits; 0 misses = 4 (3 are compulsory).
    trace = steps(*[(0, [e]) for e in [0, 1, 0, 2, 1, 0]])
    assert simulate(trace, policy, 2).loads == expected


@pytest.mark.parametrize("policy,expected", [("lru", 12), ("lfu", 12), ("layer_cycle", 7), ("belady", 7)])
def test_hand_computed_layer_cycle(policy, expected):
    # Three layers, one fixed expert each, 4 tokens, 2 slots: x y z x y z ...
    # lru always evicts the key needed next: 12 misses. lfu: counts stay level, ties go LRU: 12.
    # belady: 3 compulsory, then every other access misses (steps 4, 6, 8, 10): 7. layer_cycle
    # evicts the layer that runs again last, which is exactly belady's choice here: 7.
    trace = cyclic(3, {0: [0], 1: [0], 2: [0]}, 4)
    assert simulate(trace, policy, 2).loads == expected


def test_layer_cycle_beats_lru_when_lru_thrashes():
    # 4 layers x 2 fixed experts = 8 keys in a cycle, 6 slots: LRU evicts exactly the next layer's
    # experts every time and never hits; layer_cycle sacrifices the layer that ran last.
    trace = cyclic(4, {layer: [1, 5] for layer in range(4)}, 50)
    lru, layer_cycle = simulate(trace, "lru", 6), simulate(trace, "layer_cycle", 6)
    assert lru.hits == 0 and lru.loads == lru.accesses == 400
    assert layer_cycle.loads < lru.loads / 2
    assert layer_cycle.loads == simulate(trace, "belady", 6).loads


@pytest.mark.parametrize("policy", POLICIES)
def test_never_evicts_an_expert_of_the_current_step(policy):
    # 2 slots: at step 2, expert 1 is never needed again, yet it is needed *now*: the load of 2
    # must evict 0 (which then misses at step 3) for every policy: loads 0, 1, 2, 0.
    trace = steps((0, [0]), (0, [1]), (0, [1, 2]), (0, [0]))
    assert simulate(trace, policy, 2).loads == 4


@pytest.mark.parametrize("policy", POLICIES)
def test_step_larger_than_the_cache_runs_in_waves(policy):
    # 3 experts, 2 slots: 3 loads, the last wave (expert 2) evicting from the first; each expert
    # is loaded once. Then 2 hits, and one of 0/1 (whichever survived) hits too.
    trace = steps((0, [0, 1, 2]), (0, [2]))
    r = simulate(trace, policy, 2)
    assert (r.loads, r.hits) == (3, 1)


def test_accounting_is_consistent():
    trace = random_trace(random.Random(3), 30, 4, 8, 3)
    r = simulate(trace, "layer_cycle", 5, expert_bytes=7)
    assert r.accesses == sum(len(a.experts) for a in trace) == r.hits + r.loads
    assert r.bytes == 7 * r.loads and r.hit_rate == r.hits / r.accesses
    assert sum(c.hits for c in r.per_layer.values()) == r.hits
    assert sum(c.loads for c in r.per_layer.values()) == r.loads
    assert r.tokens == len({(a.seq, a.token) for a in trace})


def test_every_policy_matches_the_reference_on_random_traces():
    rng = random.Random(1)
    for _ in range(120):
        trace = random_trace(rng, 12, 4, 6, 3)
        capacity = rng.randint(1, 9)
        for policy in REFERENCE_POLICIES:
            assert simulate(trace, policy, capacity).loads == reference_loads(trace, policy, capacity), \
                (policy, capacity, trace)


def test_belady_is_never_beaten():
    rng = random.Random(0)
    for _ in range(400):
        trace = random_trace(rng, 25, 5, 10, 4)
        capacity = rng.randint(1, 16)  # includes caches smaller than top-k: waves
        loads = {policy: simulate(trace, policy, capacity).loads for policy in POLICIES}
        assert all(loads["belady"] <= v for v in loads.values()), (capacity, loads, trace)


def test_belady_is_the_exhaustive_optimum_on_tiny_traces():
    rng = random.Random(2)
    checked = 0
    for _ in range(150):
        trace = random_trace(rng, 6, 2, 4, 2)
        top_k = max(len(a.experts) for a in trace)
        capacity = rng.randint(top_k, top_k + 2)
        if len({(a.layer, e) for a in trace for e in a.experts}) <= capacity:
            continue  # everything fits: nothing to choose
        assert simulate(trace, "belady", capacity).loads == optimum_loads(trace, capacity), (capacity, trace)
        checked += 1
    assert checked > 50


def test_layer_cycle_replays_the_runtime_cache():
    """The model is the runtime's: runtime.cache.ExpertCache, driven step by step (plan, then
    acquire and release each wave), misses exactly where layer_cycle loads."""
    import torch

    from expertflow.runtime.cache.expert_cache import ExpertCache
    from expertflow.runtime.store.host import ExpertLayout, Part
    from expertflow.runtime.cache.streams import CopyEngine

    class Store:
        def blob(self, layer: int, expert: int) -> torch.Tensor:
            return torch.full((16,), layer * 16 + expert, dtype=torch.uint8)

    rng = random.Random(4)
    engine = CopyEngine(torch.device("cpu"))
    try:
        for _ in range(40):
            trace = random_trace(rng, 10, 4, 6, 3)
            layers = sorted({a.layer for a in trace})
            layouts = {layer: ExpertLayout(layer, f"m.{layer}", 6, (Part("down_proj", "float32", (2, 2), 0),), 16)
                       for layer in layers}
            slots = rng.randint(1, 8)
            runtime = ExpertCache(layouts, Store(), slots, torch.device("cpu"), engine)
            for a in trace:
                for wave in runtime.plan(a.layer, None, torch.tensor(a.experts, dtype=torch.long)):
                    runtime.release(a.layer, runtime.acquire(a.layer, wave))
            r = simulate(trace, "layer_cycle", slots)
            assert {layer: (s.hits, s.misses) for layer, s in runtime.stats.items()} == \
                {layer: (c.hits, c.loads) for layer, c in r.per_layer.items()}, (slots, trace)
    finally:
        engine.close()


class _ScanLayerCycle(Policy):
    """layer_cycle by a scan of every layer position, from the current one downwards, each
    layer's candidates least recently used first (the rule, written out without a sort)."""

    name = "layer_cycle"

    def ranking(self, candidates, limit=None):
        n = len(self.position)
        now = self.now if self.now is not None else n - 1
        by_position = {}
        for key in candidates:
            by_position.setdefault(self.position[key[0]], []).append(key)
        ranked = [key for d in range(n, 0, -1) for key in by_position.get((now + d) % n, [])]
        return ranked[:limit]

    def victim(self, candidates):
        first = self.ranking(candidates, 1)
        return first[0] if first else None


_FORGET = SimCache._forget  # the model's own, before a test records through it


def _victims(maker: type, trace: list[Access], capacity: int, monkeypatch) -> list[tuple[int, int]]:
    victims: list[tuple[int, int]] = []

    def recording(self, pool, slot, key):
        victims.append(key)
        _FORGET(self, pool, slot, key)

    monkeypatch.setattr(SimCache, "_forget", recording)
    monkeypatch.setitem(RUNTIME_POLICIES, "layer_cycle", maker)
    simulate(trace, "layer_cycle", capacity)
    return victims


def test_layer_cycle_evicts_what_the_position_scan_did(monkeypatch):
    """The runtime's layer_cycle ranking picks the same victims as a scan of the positions, on random traces
    and on traces of many layers in falling order (a new token each record: the quadratic case)."""
    rng = random.Random(11)
    for i in range(150):
        if i % 3:
            trace = random_trace(rng, 12, 6, 6, 3)
        else:
            layers = rng.sample(range(400), rng.randint(2, 60))
            trace = steps(*[(rng.choice(layers) if rng.random() < 0.5 else layers[t % len(layers)],
                             rng.sample(range(6), rng.randint(1, 3))) for t in range(rng.randint(5, 120))])
        capacity = rng.randint(1, 10)
        assert _victims(LayerCycle, trace, capacity, monkeypatch) == \
            _victims(_ScanLayerCycle, trace, capacity, monkeypatch), (capacity, trace)
    falling = steps(*[(3000 - t, [t % 8, (3 * t + 1) % 8]) for t in range(3000)])
    fast = _victims(LayerCycle, falling, 16, monkeypatch)
    assert len(fast) > 5000 and fast == _victims(_ScanLayerCycle, falling, 16, monkeypatch)


def test_time_model_by_hand():
    # lru on the 3-layer cycle: 12 loads, 12 steps, 4 tokens. 1e6 bytes at 1 GB/s = 1 ms a copy:
    # (12 * 1 + 12 * 0.5) / 4 = 4.5 ms/token; the bound is 12 ms / 4 = 3; ratio 1.5.
    r = simulate(cyclic(3, {0: [0], 1: [0], 2: [0]}, 4), "lru", 2, expert_bytes=10**6)
    t = predict_time(r, TimeModel(bandwidth_gbps=1.0, layer_ms=0.5, expert_bytes=10**6))
    assert t.ms_per_token == pytest.approx(4.5) and t.bound_ms_per_token == pytest.approx(3.0)
    assert t.over_bound == pytest.approx(1.5)


@pytest.mark.parametrize("window_ms,demand_lands,first_lands", [(None, 1.0, None), (0.5, 1.5, 2.0), (2.0, 3.0, 1.0)])
def test_copy_queues_by_hand(window_ms, demand_lands, first_lands):
    """Three prefetches queued at 0, then a demand copy, 1 ms each. A CPU's queue (no window):
    the demand copy goes first, at 1 ms. CUDA's, its prefetch chunks 0.5 ms of the stream at a
    time: the first prefetch is on the stream; the demand copy follows that half-millisecond
    window (lands at 1.5) and the prefetch's rest follows it (lands at 2). A window of 2 ms (small
    experts: two whole prefetches on the stream): behind both, at 3. Prefetches not on the stream
    can still be cancelled in every case."""
    clock = Clock(1.0, window_ms)
    prefetches = [clock.submit(1, demand=False) for _ in range(3)]
    demand = clock.submit(1, demand=True)
    assert demand.arrival == pytest.approx(demand_lands)
    assert prefetches[0].arrival == (None if first_lands is None else pytest.approx(first_lands))
    assert prefetches[-1].cancel() is True


def test_cli_copy_queue_needs_the_time_model(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl")
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "4", "--quiet",
                     "--copy-queue", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("expertflow-simulate: error: --copy-queue shapes the time model: give "
                                               "it with --bandwidth (or --disk-bandwidth) and --layer-ms")


# ----- the trace format -----

GOOD = '{"seq": 0, "token": 0, "layer": 0, "experts": [1, 0]}'


@pytest.mark.parametrize("bad,why", [
    ("{not json", "bad JSON"),
    ('[1, 2]', "JSON object"),
    ('{"seq": 0, "token": 1, "layer": 0}', "'experts'"),
    ('{"seq": 0, "layer": 0, "experts": [1]}', "'token'"),
    ('{"seq": 0, "token": 1, "layer": "2", "experts": [1]}', "'layer'"),
    ('{"seq": 0, "token": 1, "layer": 1.5, "experts": [1]}', "'layer'"),
    ('{"seq": true, "token": 1, "layer": 0, "experts": [1]}', "'seq'"),
    ('{"seq": 0, "token": 1, "layer": 0, "experts": [-1]}', "expert id -1"),
    ('{"seq": 0, "token": 1, "layer": 0, "experts": ["3"]}', "expert id"),
    ('{"seq": 0, "token": 1, "layer": 0, "experts": 3}', "'experts'"),
    ('{"seq": 0, "token": 1, "layer": 0, "experts": [8]}', "out of range"),
    ('{"seq": 0, "token": 0, "layer": 0, "experts": [2]}', "execution order"),  # the same record again
    ("[" * 100_000, "nested too deeply"),  # json recurses per bracket: was a RecursionError traceback
    ('{"seq": 0, "token": 1, "layer": 0, "experts": ' + "[" * 100_000, "nested too deeply"),
])
def test_malformed_line_names_its_number(bad, why):
    lines = [GOOD, '{"seq": 0, "token": 0, "layer": 1, "experts": [3]}', "", bad, GOOD]
    with pytest.raises(ValueError) as info:
        parse_lines(lines, experts_per_layer=8)
    message = str(info.value)
    assert message.startswith("line 4: ") and why in message and "\n" not in message


def test_out_of_order_and_good_traces(tmp_path):
    with pytest.raises(ValueError, match="^line 2: .*execution order"):
        parse_lines(['{"seq": 0, "token": 0, "layer": 3, "experts": [0]}',
                     '{"seq": 0, "token": 0, "layer": 1, "experts": [0]}'])
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"seq": 0, "token": 5, "layer": 3, "experts": [6, 2, 6], "score": 1}\n\n'
                     b'{"seq": 1, "token": 0, "layer": 0, "experts": []}\n')
    assert parse_trace(path) == [Access(0, 5, 3, (2, 6)), Access(1, 0, 0, ())]
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="^line 2: not UTF-8"):
        parse_trace(path)


# ----- the command line -----

def write_trace(path: Path, seed: int = 0, tokens: int = 40) -> Path:
    trace = random_trace(random.Random(seed), tokens, 4, 8, 2)
    path.write_text("".join(json.dumps({"seq": a.seq, "token": a.token, "layer": a.layer, "experts": list(a.experts)})
                            + "\n" for a in trace))
    return path


def test_cli_prints_a_table(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl")
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "16,4,8", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["policy", "cache", "accesses"] and "loads/MIN" in out[1]
    rows = [line.split() for line in out[2:]]
    assert len(rows) == 12 and [r[1] for r in rows[:3]] == ["4", "8", "16"]
    assert all(r[-1] == "1.000" for r in rows if r[0] == "belady")
    assert all(float(r[-1]) >= 1.0 for r in rows)


def test_cli_time_model_columns(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl")
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "4", "--quiet",
                     "--policies", "lru", "--expert-bytes", "1000000", "--bandwidth", "10", "--layer-ms", "0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ms/token" in out[1] and "/bound" in out[1] and len(out) == 3 and "MiB" in out[2]


def test_cli_json_rows(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl")
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "4,8", "--json", "--quiet",
                     "--policies", "lru,belady", "--expert-bytes", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["policy"], r["cache"]) for r in rows] == [("lru", 4), ("lru", 8), ("belady", 4), ("belady", 8)]
    for r in rows:
        assert {"policy", "predictor", "cache", "accesses", "hits", "hit_rate", "loads", "bytes"} <= r.keys()
        assert r["predictor"] == "none" and r["bytes"] == 3 * r["loads"] and r["hits"] + r["loads"] == r["accesses"]
    assert rows[0]["loads"] >= rows[2]["loads"] and rows[2]["loads_over_min"] == 1.0


def test_cli_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    trace, png = write_trace(tmp_path / "trace.jsonl"), tmp_path / "out" / "hit.png"
    png.parent.mkdir()
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "2,4,8", "--quiet",
                     "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert list(png.parent.iterdir()) == [png]  # no temporary file left beside it


def test_cli_help_explains_options_and_format(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and '"experts": [6, 2]' in out
    for option in ("--trace", "--experts-per-layer", "--cache", "--policies", "--expert-bytes", "--bandwidth",
                   "--layer-ms", "--json", "--plot", "--quiet", "COMPILED"):
        assert option in out


@pytest.mark.parametrize("args,says", [
    (["{dir}"], "has no calibration traces"),
    (["{dir}", "--experts-per-layer", "8", "--cache", "4"], "pass --trace"),
    (["{dir}/nope", "--trace", "{trace}", "--experts-per-layer", "8", "--cache", "4"], "not a directory"),
    (["--trace", "{dir}/missing.jsonl", "--experts-per-layer", "8", "--cache", "4"], "missing.jsonl"),
    (["--trace", "{trace}", "--cache", "4"], "--experts-per-layer is required"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "0,4"], "--cache"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "a,b"], "--cache"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "4", "--policies", "fifo"], "fifo"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "4", "--bandwidth", "10"], "--layer-ms"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "4", "--bandwidth", "0", "--layer-ms", "1"],
     "--bandwidth"),
    (["--trace", "{trace}", "--experts-per-layer", "4", "--cache", "4"], "out of range"),
    (["--trace", "{bad}", "--experts-per-layer", "8", "--cache", "4", "--plot", "{dir}/p.png"], "line 3"),
    (["--trace", "{empty}", "--experts-per-layer", "8", "--cache", "4"], "no records"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "4", "--plot", "{dir}/no/p.png"], "--plot"),
    (["--trace", "{trace}", "--experts-per-layer", "x", "--cache", "4"], "invalid int"),
    (["--trace", "{trace}", "--experts-per-layer", "8", "--cache", "4", "--bogus"], "--bogus"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, says):
    trace = write_trace(tmp_path / "trace.jsonl", tokens=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(trace.read_text().splitlines()[0] + "\n" + trace.read_text().splitlines()[1] + "\n{oops\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    subs = {"dir": str(tmp_path), "trace": str(trace), "bad": str(bad), "empty": str(tmp_path / "empty.jsonl")}
    assert cli.main([a.format(**subs) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("expertflow-simulate: error: ") and "\n" not in err and says in err, err
    assert captured.out == "" and not (tmp_path / "p.png").exists()


def test_cli_plot_without_matplotlib_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    trace = write_trace(tmp_path / "trace.jsonl", tokens=3)
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "4", "--plot",
                     str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "expertflow-simulate: error: --plot needs matplotlib: pip install matplotlib"
    assert not (tmp_path / "p.png").exists()


def test_cli_a_deeply_nested_line_is_a_one_line_error(tmp_path, capsys):
    """A line of 100,000 '[' was a RecursionError traceback from json's decoder."""
    trace = tmp_path / "deep.jsonl"
    trace.write_text(GOOD + "\n" + "[" * 100_000 + "\n")
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "4", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"expertflow-simulate: error: {trace}: line 2: bad JSON: nested too deeply for "
                                    "a trace record (one flat object a line)") and captured.out == ""


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_cli_plot_is_an_ordinary_file_under_the_umask(tmp_path, umask, mode):
    """It was written 0600 whatever the umask (a private temporary file renamed into place)."""
    import os
    import stat

    pytest.importorskip("matplotlib")
    trace, png = write_trace(tmp_path / "trace.jsonl"), tmp_path / "hit.png"
    old = os.umask(umask)
    try:
        assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "2,4", "--quiet",
                         "--plot", str(png)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(png.stat().st_mode) == mode


def test_the_hint_rows_left_out_are_those_that_repeat_none():
    """expertflow-simulate COMPILED leaves out a :hint row when its policy reads no hints (told by
    the policy class, not by name): replayed, such a row is exactly the none row."""
    from expertflow.runtime.cache.policy import POLICIES as RUNTIME_POLICIES
    from expertflow.tools.sim.prefetch_sim import Issue, replay
    from expertflow.tools.sim.simulate_compiled import same_as_none

    trace = random_trace(random.Random(7), 60, 3, 8, 2)
    layers = len({a.layer for a in trace})
    hints = [[Issue(s + layers, trace[s + layers].experts, load=False)] if s + layers < len(trace) else []
             for s in range(len(trace))]
    copies = [[Issue(i.target, i.experts) for i in step] for step in hints]
    reuse = {0: [1] * (layers * 8)}
    left_out = {p for p in RUNTIME_POLICIES if same_as_none(p, hints, None)}
    assert left_out == set(RUNTIME_POLICIES) - {"predictive"}
    assert not any(same_as_none(p, copies, None) for p in RUNTIME_POLICIES)
    assert {p for p in RUNTIME_POLICIES if same_as_none(p, hints, reuse)} == left_out
    for policy in RUNTIME_POLICIES:
        none, hinted = replay(trace, [[] for _ in trace], policy, 4), replay(trace, hints, policy, 4)
        if policy in left_out:
            assert (hinted.loads, hinted.resident, hinted.missed) == (none.loads, none.resident, none.missed)


def _chain_trace(path: Path, tokens: int, seed: int = 0) -> Path:
    """4 layers, 8 experts, top-2: layer 0 routes at random, each later layer by a fixed map of
    the previous layer's route (what a transition table learns exactly)."""
    rng = random.Random(seed)
    perm = [rng.sample(range(8), 8) for _ in range(4)]
    lines = []
    for t in range(tokens):
        route = tuple(sorted(rng.sample(range(8), 2)))
        for layer in range(4):
            if layer:
                route = tuple(sorted({perm[layer][e] for e in route}))
            lines.append(json.dumps({"seq": t // 50, "token": t % 50, "layer": layer, "experts": list(route)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_predictors_replay_a_trace_through_every_policy(tmp_path, capsys):
    """--predictor on a bare trace: fitted on the first share of its tokens, every policy (predictive
    included, with the fitted prior) replays the rest with and without the predictor's prefetches.
    On a trace whose layers follow their predecessor exactly, transition predicts every later
    layer: only layer 0 ever misses (its prediction is the frequency prior)."""
    trace = _chain_trace(tmp_path / "chain.jsonl", 400)
    args = ["--trace", str(trace), "--experts-per-layer", "8", "--cache", "6", "--quiet", "--json",
            "--predictor", "transition", "--fit", "0.5", "--policies", ",".join(RUNTIME_POLICIES)]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["policy"], r["predictor"]) for r in rows] == [
        (p, q) for p in RUNTIME_POLICIES for q in ("none", "transition")]
    for r in rows:
        assert r["tokens"] == 200 and r["accesses"] == 200 * 4 * 2
        if r["predictor"] == "transition":
            assert all(c["loads"] == 0 for layer, c in r["per_layer"].items() if layer != "0"), r
            assert r["wasted_prefetches"] <= 200 * 2  # only layer 0's guesses (the frequency prior) miss
    none = {r["policy"]: r for r in rows if r["predictor"] == "none"}
    assert all(r["hits"] > none[r["policy"]]["hits"] for r in rows if r["predictor"] == "transition")


def test_predictive_replays_a_bare_trace_and_never_beats_belady(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.jsonl", seed=3)
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "3,6", "--quiet", "--json",
                     "--policies", "predictive"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in rows] == ["predictive", "predictive"]
    assert all(r["loads_over_min"] >= 1.0 and r["hits"] + r["loads"] == r["accesses"] for r in rows)


@pytest.mark.parametrize("extra,says", [
    (["--predictor", "frequency", "--fit", "1"], "--fit must be between 0 and 1"),
    (["--predictor", "routing_path"], "invalid choice: 'routing_path'"),
    (["--predictor", "frequency", "--fit", "0.001"], "leaves no tokens to fit on"),
])
def test_trace_predictor_bad_input_is_one_line(tmp_path, capsys, extra, says):
    trace = write_trace(tmp_path / "trace.jsonl", tokens=10)
    assert cli.main(["--trace", str(trace), "--experts-per-layer", "8", "--cache", "4", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
