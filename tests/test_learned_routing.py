"""Learned routing: calibration, the routing-path predictor, cache policies, the prefetch replay."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertflow import runtime
from expertflow.passes.options import CompileOptions
from expertflow.runtime.store.manifest import LoadError
from expertflow.tools.cli import simulate
from expertflow.tools.sim.cache_sim import Access, simulate as demand_replay
from expertflow.tools.cli.compile import Calibration, compile_model
from expertflow.runtime.observe.routing import Request
from expertflow.tools.sim.prefetch_sim import Issue, from_log, replay, reuse_from_log
from expertflow.tools.make.source import UserError, resolve_model
from expertflow.tools.make.train_predictor import multi_hot, train_path_predictor

NAME = "tiny-trained-moe"
PROMPTS = ["def __init__(self", "import os\nimport sys\n", "class Error(Exception):"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "c"
    options = CompileOptions(predictor="routing_path", policy="predictive")
    return compile_model(NAME, out, options, dumps=False, calibration=Calibration("builtin", 1024, seed=0))


def _random_trace(rng: random.Random, layers: int, experts: int, k: int, tokens: int) -> list[Access]:
    return [Access(0, t, j, tuple(sorted(rng.sample(range(experts), k)))) for t in range(tokens) for j in range(layers)]


def _random_issues(rng: random.Random, trace: list[Access], experts: int, k: int, layers: int) -> list[list[Issue]]:
    issues: list[list[Issue]] = [[] for _ in trace]
    for s in range(len(trace)):
        lead = rng.randint(0, min(s % layers, 2))
        deferred = rng.random() < 0.5  # read back at the wait of step s - lead, copied after it
        issues[s - lead].append(Issue(s, tuple(sorted(rng.sample(range(experts), k))), deferred=deferred))
    return issues


@pytest.mark.parametrize("seed", range(60))
def test_no_policy_or_predictor_beats_belady(seed):
    rng = random.Random(seed)
    layers, experts, k = rng.randint(1, 4), rng.randint(2, 6), 2
    k = min(k, experts)
    trace = _random_trace(rng, layers, experts, k, rng.randint(3, 25))
    issues = _random_issues(rng, trace, experts, k, layers)
    for cache in (k, k + 1, 2 * k + 1, layers * experts):
        best = demand_replay(trace, "belady", cache).loads
        for policy in ("lru", "lfu", "layer_cycle", "predictive"):
            for plan in ([[] for _ in trace], issues):
                assert replay(trace, plan, policy, cache).loads >= best


@pytest.mark.parametrize("seed", range(30))
def test_runtime_policies_replay_as_the_reference_simulator(seed):
    # cache_sim's LRU, LFU and layer-cycle are checked against brute force (test_simulate.py);
    # the runtime's policy objects, driven by the prefetch replay without predictions, must agree.
    rng = random.Random(seed)
    trace = _random_trace(rng, rng.randint(1, 4), 6, 2, 30)
    for policy, cache in itertools.product(("lru", "lfu", "layer_cycle"), (2, 3, 5, 9)):
        ref = demand_replay(trace, policy, cache)
        got = replay(trace, [[] for _ in trace], policy, cache)
        assert (got.loads, got.hits) == (ref.loads, ref.hits), (policy, cache)


def test_training_is_deterministic_under_a_seed():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=gen)
    routes = torch.randint(0, 8, (300, 3, 2), generator=gen)
    a, _ = train_path_predictor(x, routes, 8, 2, seed=5, epochs=3)
    b, _ = train_path_predictor(x, routes, 8, 2, seed=5, epochs=3)
    c, _ = train_path_predictor(x, routes, 8, 2, seed=6, epochs=3)
    for name, value in a.tensors().items():
        torch.testing.assert_close(value, b.tensors()[name], rtol=0, atol=0)
    assert not torch.equal(a.tensors()["w1"], c.tensors()["w1"])
    context = (torch.randn(300, 16, generator=gen), torch.rand(300, generator=gen) > 0.1)
    d, _ = train_path_predictor(x, routes, 8, 2, seed=5, epochs=3, context=context)
    e, _ = train_path_predictor(x, routes, 8, 2, seed=5, epochs=3, context=context)
    assert d.context and d.tensors()["w1"].shape == (256, 32)
    for name, value in d.tensors().items():
        torch.testing.assert_close(value, e.tensors()[name], rtol=0, atol=0)


def test_training_stops_on_validation_and_keeps_the_best_epoch():
    """Routes that are noise cannot be learned: the held-out sequences' loss rises as the network
    memorises, so training stops early and returns the epoch whose held-out loss was lowest."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(800, 16, generator=gen)
    routes = torch.randint(0, 8, (800, 3, 2), generator=gen)
    seq = torch.arange(800) // 50  # 16 sequences; the last 2 validate
    model, report = train_path_predictor(x, routes, 8, 2, seed=0, epochs=40, seq=seq, validation=0.125,
                                         patience=2)
    assert 2 < report.epochs < 40 and report.validation_loss is not None
    val = seq >= 14
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        kept = float(loss(model.scores(x[val]), multi_hot(routes[val], 8)))
    assert kept == pytest.approx(report.validation_loss, rel=1e-6)
    full, whole = train_path_predictor(x[~val], routes[~val], 8, 2, seed=0, epochs=40)  # the same tokens, no stop
    with torch.no_grad():
        assert kept < float(loss(full.scores(x[val]), multi_hot(routes[val], 8)))
    assert whole.epochs == 40 and whole.validation_loss is None
    again, _ = train_path_predictor(x, routes, 8, 2, seed=0, epochs=40, seq=seq, validation=0.125, patience=2)
    for name, value in model.tensors().items():
        torch.testing.assert_close(value, again.tensors()[name], rtol=0, atol=0)


def test_decode_predicts_from_the_previous_steps_context(calibrated):
    """The routing-path predictor reads, at a decode step, the last MoE block's input of the
    previous step's last position (kept by the graph's path_context node); prefill has none."""
    model = runtime.load(calibrated, expert_cache=5)
    predictor = model.context.path_predictor
    assert predictor.context
    assert sum(n.target.__name__ == "path_context" for n in model.graph_module.graph.nodes
               if n.op == "call_function") == 1
    kept, seen = [], []
    keep, forward = model.context.path_context, type(predictor).forward

    def spy_keep(hidden):
        kept.append(hidden.detach().clone())
        keep(hidden)

    def spy_forward(self, hidden, context=None):
        if self is predictor:  # not its second stage (the same class)
            seen.append(None if context is None else context.clone())
        return forward(self, hidden, context)

    model.context.path_context = spy_keep
    type(predictor).forward = spy_forward
    try:
        batch = runtime.load_tokenizer(calibrated)(PROMPTS[:2], return_tensors="pt", padding=True)
        model.generate(**batch, max_new_tokens=4, do_sample=False)
    finally:
        type(predictor).forward = forward
    assert len(seen) == 4 and seen[0] is None
    for step in range(1, 4):
        last = kept[step - 1].reshape(2, -1, kept[step - 1].shape[-1])[:, -1]
        torch.testing.assert_close(seen[step], last, rtol=0, atol=0)
    ids = torch.randn(2, 1, predictor.hidden)
    assert not torch.equal(predictor.scores(ids[:, 0], seen[1], torch.ones(2, dtype=torch.bool)),
                           predictor.scores(ids[:, 0]))


def test_the_second_stage_reads_the_first_layers_output_with_the_same_context(calibrated):
    """refine_path, after the first MoE layer, scores the later layers from [embedding, that
    layer's output] and the context predict_path read at the same step; those layers' prefetches
    name its top-k."""
    model = runtime.load(calibrated, expert_cache=5, record_routing=True)
    refiner, ctx = model.context.path_refiner, model.context
    assert refiner.context == refiner.hidden // 2 and refiner.layers == len(ctx.cache.layouts) - 1
    seen, first, forward = [], [], type(refiner).forward

    def spy(self, hidden, context=None):
        out = forward(self, hidden, context)
        if self is refiner:
            seen.append((hidden.clone(), None if context is None else context.clone(), out.clone()))
        else:
            first.append(None if context is None else context.clone())
        return out

    type(refiner).forward = spy
    try:
        batch = runtime.load_tokenizer(calibrated)(PROMPTS[:1], return_tensors="pt")
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        type(refiner).forward = forward
    assert len(seen) == len(first) == 3 and seen[0][1] is None
    layers = sorted(ctx.cache.layouts)
    prefetches = [r for r in model.routing.log if r.kind == "prefetch"]
    for step in (1, 2):
        hidden, context, out = seen[step]
        assert hidden.shape[-1] == refiner.hidden
        torch.testing.assert_close(context, first[step], rtol=0, atol=0)
        step_prefetches = prefetches[step * len(layers):(step + 1) * len(layers)]
        for j, p in enumerate(step_prefetches[1:]):
            assert p.layer == layers[j + 1] and sorted(p.experts) == sorted(out[0, j].tolist())


def test_calibration_writes_traces_predictor_and_prior(calibrated):
    manifest = json.loads((calibrated / "manifest.json").read_text())
    for name in ("calibration.safetensors", "predictor.safetensors", "refiner.safetensors", "prior.safetensors",
                 "tables.safetensors"):
        assert name in manifest["files"]
    cal = manifest["calibration"]
    assert cal["train_tokens"] == 1024 and cal["heldout_tokens"] >= 128
    assert cal["routing_path"]["parameters"] > 0
    assert manifest["options"] == {"lookahead": 1, "predictor": "routing_path", "policy": "predictive",
                                   "permute": True, "prefetch": "copy"}
    assert "reuse.safetensors" in manifest["files"] and cal["routing_path"]["reuse"]["parameters"] > 0


@pytest.mark.parametrize("predictor,policy", list(itertools.product(
    ("routing_path", "cross_layer_gate", "transition", "frequency", "none"),
    ("layer_cycle", "lru", "lfu", "predictive"))))
def test_every_predictor_and_policy_gives_hf_tokens(calibrated, predictor, policy):
    source = resolve_model(NAME)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    batch = AutoTokenizer.from_pretrained(source)(PROMPTS, return_tensors="pt", padding=True)
    want = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    model = runtime.load(calibrated, expert_cache=5, predictor=predictor, policy=policy)
    torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=False), want)
    stats = model.stats()["total"]
    assert stats["hits"] == stats["resident"] + stats["in_flight"]
    assert (stats["predicted"] > 0) == (predictor != "none")


@pytest.mark.parametrize("predictor,policy,slots,prefetch", [
    ("cross_layer_gate", "layer_cycle", 5, "copy"), ("cross_layer_gate", "predictive", 16, "copy"),
    ("routing_path", "lru", 8, "copy"), ("routing_path", "predictive", 5, "copy"),
    ("routing_path", "predictive", 8, "hint"), ("cross_layer_gate", "lru", 8, "hint"),
    ("none", "predictive", 8, "copy"), ("none", "lfu", 16, "copy"),
    ("transition", "predictive", 8, "copy"), ("frequency", "layer_cycle", 16, "copy")])
def test_the_simulator_counts_what_the_runtime_did_with_prefetch(calibrated, predictor, policy, slots, prefetch):
    """The runtime's own requests (prefetches and waits, in its order), replayed by the simulator
    with the same policy and prior, give the runtime's hits and bytes within 2%, counting a
    prefetch the runtime cancelled before its copy started as moved (the replay has no clock):
    without a predictor they are equal."""
    model = runtime.load(calibrated, expert_cache=slots, predictor=predictor, policy=policy, record_routing=True,
                         prefetch=prefetch)
    batch = runtime.load_tokenizer(calibrated)(["def __init__(self"], return_tensors="pt")
    model.generate(**batch, max_new_tokens=40, do_sample=False)
    trace, issues = from_log(model.routing.log)
    reuse = reuse_from_log(model.routing.log)  # the reuse predictor's estimates, as each wait read them
    assert bool(reuse) == (predictor == "routing_path" and policy == "predictive")
    blob = json.loads((calibrated / "manifest.json").read_text())["memory_plan"]["expert_blob_bytes"]
    got = replay(trace, issues, policy, slots, predictor, blob, model.context.cache.policy.prior
                 if policy == "predictive" else None, reuse=reuse)
    stats = model.stats()["total"]
    assert got.accesses == stats["hits"] + stats["misses"]
    assert got.predicted == stats["predicted"] and (got.predicted > 0) == (predictor != "none")
    assert abs(got.hits - stats["hits"]) <= 0.02 * got.accesses, (got, stats)
    # a copy still queued when its layer's wait finds it unneeded is cancelled (no byte moves):
    # a clock the replay does not have decides that, so the replay counts it as moved
    moved = stats["bytes_moved"] + stats["prefetch_cancelled"] * blob
    assert abs(got.bytes - moved) <= 0.02 * got.bytes, (got, stats)
    if predictor == "none" or prefetch == "hint":  # nothing copied early: nothing to cancel
        assert (got.hits, got.bytes) == (stats["hits"], stats["bytes_moved"])
    if prefetch == "hint":
        assert got.prefetch_loads == 0 and stats["bytes_moved"] == stats["misses"] * blob  # demand loads only


def test_the_runtime_log_becomes_steps_and_issues():
    log = [Request("prefetch", 0, (1, 2)), Request("wait", 0, (2, 3)), Request("prefetch", 1, (4,)),
           Request("prefetch", 0, (5,)), Request("wait", 1, (4,)), Request("wait", 0, (5, 1)),
           Request("prefetch", 1, (0,))]  # the last one's layer never ran again: dropped
    trace, issues = from_log(log)
    assert [(a.layer, a.experts) for a in trace] == [(0, (2, 3)), (1, (4,)), (0, (1, 5))]
    d = {"deferred": True}  # read back at the wait that follows, with its routing decision
    assert issues == [[Issue(0, (1, 2), **d)], [Issue(1, (4,), **d), Issue(2, (5,), **d)], []]


def test_routing_path_needs_a_predictor_file(compiled_dir, tmp_path):
    with pytest.raises(LoadError, match="has no routing-path predictor"):
        runtime.load(compiled_dir("tiny-mixtral"), expert_cache=3, predictor="routing_path")
    with pytest.raises(LoadError, match="has no routing tables for predictor='transition'"):
        runtime.load(compiled_dir("tiny-mixtral"), expert_cache=3, predictor="transition")
    with pytest.raises(UserError, match="--predictor frequency is fitted on calibration traces"):
        compile_model("tiny-mixtral", tmp_path / "y", CompileOptions(predictor="frequency"))
    with pytest.raises(LoadError, match="unknown cache policy 'mru'"):
        runtime.load(compiled_dir("tiny-mixtral"), expert_cache=3, policy="mru")
    with pytest.raises(UserError, match="pass --calibration"):
        compile_model("tiny-mixtral", tmp_path / "x", CompileOptions(predictor="routing_path"))


@pytest.mark.parametrize("forge,message", [
    (lambda t: t.update(w2=t["w2"][:-1]), "w2 is torch.float32"),
    (lambda t: t.update(mean=t["mean"][:-1]), "mean is torch.float32"),
    (lambda t: t.update(w1=torch.cat([t["w1"], t["w1"][:, :1]], 1)), "expected float32 (128,)"),
])
def test_a_forged_predictor_is_refused_in_one_line(calibrated, tmp_path, forge, message):
    forged = _forge(calibrated, tmp_path, "predictor.safetensors", forge)
    with pytest.raises(LoadError) as err:
        runtime.load(forged, expert_cache=4)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("forge,message", [
    (lambda t: t.update(w1=t["w1"][:, :-128]), "expected float32 (256,)"),   # a stage-1 network in its place
    (lambda t: t.update(w2=torch.cat([t["w2"], t["w2"][:8]])), "w2 is torch.float32 (32, 256), expected float32 (24, 256)"),
    (lambda t: t.update(std=-t["std"]), "non-positive std"),
])
def test_a_forged_second_stage_is_refused_in_one_line(calibrated, tmp_path, forge, message):
    forged = _forge(calibrated, tmp_path, "refiner.safetensors", forge)
    with pytest.raises(LoadError) as err:
        runtime.load(forged, expert_cache=4)
    assert message in str(err.value) and "\n" not in str(err.value)


def _forge(calibrated, tmp_path, name, forge):
    """A copy of ``calibrated`` whose ``name`` is rewritten by ``forge`` and re-checksummed (a
    stranger's directory is consistent: only the values can be hostile)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from expertflow.runtime.store.digest import file_digest
    from expertflow.runtime.store.manifest import digest_of

    forged = tmp_path / "forged"
    shutil.copytree(calibrated, forged)
    t = load_file(str(forged / name))
    forge(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(forged / name))
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["files"][name] = file_digest(forged / name)
    manifest["digest"] = digest_of(manifest)
    (forged / "manifest.json").write_text(json.dumps(manifest))
    return forged


@pytest.mark.parametrize("forge,message", [
    (lambda t: t.update(transition=t["transition"][:, :-1]), "transition is torch.float32 (4, 7, 8)"),
    (lambda t: t.update(frequency=-t["frequency"]), "expected non-negative finite float32 counts (4, 8)"),
    (lambda t: t.update(top_k=torch.tensor([9])), "top_k is torch.int64 [9], expected one int64 in 1..8"),
    (lambda t: t.pop("top_k"), "expected frequency, top_k and transition"),
])
def test_forged_routing_tables_are_refused_in_one_line(calibrated, tmp_path, forge, message):
    forged = _forge(calibrated, tmp_path, "tables.safetensors", forge)
    with pytest.raises(LoadError) as err:
        runtime.load(forged, expert_cache=4, predictor="transition")
    assert message in str(err.value) and "\n" not in str(err.value)
    runtime.load(forged, expert_cache=4, predictor="cross_layer_gate")  # only the predictor reading them fails


def test_the_transition_prefetch_names_what_the_tables_say(calibrated):
    """Each decode step's prefetch for layer j names, for the step's token, layer j's k experts
    with the most calibration transitions from the experts layer j-1 just chose (ties: the more
    popular, then the lower id), counted here by hand from the shipped tables."""
    from safetensors.torch import load_file

    tables = load_file(str(calibrated / "tables.safetensors"))
    model = runtime.load(calibrated, expert_cache=8, predictor="transition", record_routing=True)
    batch = runtime.load_tokenizer(calibrated)(["def __init__(self"], return_tensors="pt")
    model.generate(**batch, max_new_tokens=6, do_sample=False)
    layers = sorted(model.context.cache.layouts)
    log = model.routing.log
    k, n = int(tables["top_k"]), tables["frequency"].shape[1]
    decode = [i for i, r in enumerate(log) if r.kind == "wait"][len(layers)]  # after the prompt's step
    checked = 0
    for p, w in zip(log[decode:], log[decode + 1:]):
        if p.kind != "prefetch" or p.layer == layers[0]:
            continue
        j = layers.index(p.layer)  # read back at layer j-1's wait, which logs that layer's route next
        assert w.kind == "wait" and w.layer == layers[j - 1] and len(w.experts) == k
        score = [sum(float(tables["transition"][j, a, b]) for a in w.experts)
                 + 1e-3 * float(tables["frequency"][j, b]) for b in range(n)]
        assert sorted(p.experts) == sorted(sorted(range(n), key=lambda b: (-score[b], b))[:k])
        checked += 1
    assert checked >= 10


def test_simulate_a_compiled_directory(calibrated, capsys):
    assert simulate.main([str(calibrated), "--cache", "8,16", "--json", "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows, recall = lines[:-1], lines[-1]["recall"]
    assert {"policy", "predictor", "cache", "accesses", "hits", "hit_rate", "loads", "bytes"} <= set(rows[0])
    oracle = [r for r in rows if r["predictor"] == "oracle"]
    assert all(r["ready_at_wait"] == 1.0 for r in oracle)
    assert all(r["loads"] >= r["min_loads"] for r in rows)
    for cache in (8, 16):  # the causal bound: the oracle's best, prefetched or told as hints
        bound = {r["causal_bound_loads"] for r in rows if r["cache"] == cache}
        assert bound == {min(r["loads"] for r in rows if r["cache"] == cache
                             and r["predictor"] in ("oracle", "oracle:hint"))}
        # a hint moves nothing: only the predictive policy reads hints, the others replay as "none"
        for policy in ("lru", "lfu", "layer_cycle"):
            same = {r["loads"] for r in rows if r["cache"] == cache and r["policy"] == policy
                    and r["predictor"] in ("none", "oracle:hint", "oracle+next:hint", "routing_path:hint",
                                           "routing_path+next:hint")}
            assert len(same) == 1, (policy, cache, same)
        told = {r["predictor"]: r for r in rows if r["cache"] == cache and r["policy"] == "predictive"}
        assert told["routing_path+next:hint"]["accesses"] == told["routing_path:hint"]["accesses"]
    assert {"routing_path", "cross_layer_gate@1", "frequency", "transition"} <= set(recall)
    assert 0 < recall["routing_path"]["recall"] <= 1


def test_simulate_host_tiers_are_cache_sizes_timed_by_the_disk(calibrated, capsys):
    """--host-memory resolves as runtime.load(host_memory=) does (25% of 32 experts: 8 slots) and
    --disk-bandwidth times those reads: the rows of --cache 8 --bandwidth, byte for byte."""
    def rows(*args: str) -> list[dict]:
        assert simulate.main([str(calibrated), *args, "--policies", "layer_cycle", "--layer-ms", "0.05",
                              "--json", "--quiet"]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()][:-1]

    tier = rows("--host-memory", "25%", "--disk-bandwidth", "1.5")
    assert {r["cache"] for r in tier} == {8} and all(r["ms_per_token"] > 0 for r in tier)
    assert tier == rows("--cache", "8", "--bandwidth", "1.5", "--copy-queue", "cpu")
    # a GPU's queue (--bandwidth's default) makes a demand copy wait behind the prefetch chunks on
    # the copy stream: slower for the predictors that copy ahead
    gpu = rows("--cache", "8", "--bandwidth", "1.5")
    assert sum(r["ms_per_token"] for r in gpu) > sum(r["ms_per_token"] for r in tier)
    assert simulate.main([str(calibrated), "--cache", "8", "--disk-bandwidth", "1", "--layer-ms", "1"]) == 2
    assert "give it with --host-memory" in capsys.readouterr().err


def test_simulate_without_calibration_says_what_to_do(compiled_dir, capsys):
    path = compiled_dir("tiny-mixtral")
    capsys.readouterr()  # building the fixture may print progress of its own
    assert simulate.main([str(path), "--cache", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no calibration traces" in err and "--calibration builtin" in err and "\n" not in err


def test_simulate_compares_request_schedules(calibrated, capsys):
    assert simulate.main([str(calibrated), "--cache", "8,16", "--schedule", "2,4", "--prompt-len", "16",
                          "--json", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["schedule"], r["batch"], r["cache"]) for r in rows} == \
        set(itertools.product(("fifo", "route-aware"), (2, 4), (8, 16)))
    for r in rows:
        assert r["micro_batches"] == -(-r["requests"] // r["batch"])
        # tiny-trained-moe: 4 MoE layers of 8 experts, top-2: a step touches at most min(2B, 8) per layer
        assert 0 < r["distinct_experts_per_step"] <= 4 * min(2 * r["batch"], 8)
        assert r["loads"] <= r["accesses"] and r["bytes"] == r["loads"] * json.loads(
            (calibrated / "manifest.json").read_text())["memory_plan"]["expert_blob_bytes"]
    for size in (2, 4):  # the same decode tokens either way: only the grouping differs
        fifo, aware = ([r for r in rows if r["schedule"] == s and r["batch"] == size and r["cache"] == 8][0]
                       for s in ("fifo", "route-aware"))
        assert fifo["requests"] == aware["requests"]
    assert simulate.main([str(calibrated), "--cache", "8", "--schedule", "0"]) == 2


@pytest.mark.parametrize("prefetch", ["copy", "hint"])
def test_the_routing_path_predictor_costs_no_host_read_of_its_own(calibrated, prefetch):
    # Every layer's prefetch is issued before the first layer; the first wait reads them all back
    # with its own routing decision (and the reuse estimates), so a step still makes one host read
    # per MoE layer.
    from test_host_syncs import syncs_per_step

    model = runtime.load(calibrated, expert_cache=5, prefetch=prefetch)
    assert model.context.reuse_predictor is not None
    ids = torch.tensor([[5, 9, 13, 2], [7, 7, 1, 3]])
    counts = syncs_per_step(model, ids, torch.ones_like(ids), steps=3)
    assert counts == [len(model.context.cache.layouts)] * 4
    assert model.stats()["total"]["predicted"] > 0


def test_route_estimates_come_from_the_routing_path_predictor_without_a_forward(calibrated, monkeypatch):
    """With a routing-path predictor, generate_many estimates each prompt's route from its token
    embeddings alone: no model forward runs for it, the estimate is the predictor's top-k share
    per layer, and every output is still the prompt's own."""
    from expertflow.runtime.generate import batching

    model = runtime.load(calibrated, expert_cache=5)
    tokenizer = runtime.load_tokenizer(calibrated)
    ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    steps = []
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: steps.append(1) or pytest.fail("forward ran"))
    est = batching.route_estimates(model, ids, 2, 0)
    monkeypatch.undo()
    assert not steps
    k, layers = model.config.num_experts_per_tok, len(model.context.cache.layouts)
    shares = est.view(len(ids), layers, -1)
    torch.testing.assert_close(shares.sum(-1), torch.full((len(ids), layers), float(k)))
    first = model.context.path_predictor(model.get_input_embeddings()(torch.tensor(ids[0])))
    assert torch.equal(shares[0, 0] * len(ids[0]), torch.bincount(first[:, 0].flatten(), minlength=shares.shape[-1]).float())
    alone = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0].tolist() for p in ids]
    assert model.generate_many(ids, batch_size=2, max_new_tokens=6, do_sample=False) == alone


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-gpt-oss", "tiny-llama4"])
def test_learned_predictors_on_other_architectures(name, tmp_path):
    """DeepSeek-V3 (dense first layers, shared experts, grouped routing), GPT-OSS (biased experts,
    sinks) and Llama 4 (MoE every other layer, input-scaled experts rewritten to run sparsely):
    calibration finds the first MoE layer's output for the second stage, and every
    learned predictor keeps Hugging Face's tokens at three slots."""
    out = compile_model(name, tmp_path / "c", CompileOptions(predictor="routing_path"), dumps=False,
                        calibration=Calibration("builtin", 512))
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    for predictor in ("routing_path", "transition", "frequency"):
        model = runtime.load(out, expert_cache=3, predictor=predictor)
        ops_called = {n.target.__name__ for n in model.graph_module.graph.nodes if n.op == "call_function"}
        assert ("refine_path" in ops_called) == (predictor == "routing_path")
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), predictor
        assert model.stats()["total"]["predicted_used"] > 0


def test_reuse_targets_match_a_brute_force_count():
    """next_use: 1 where a (layer, expert)'s next use after a token is within h tokens of it (in
    the same sequence); weight 0 where the sequence ends before h with no use seen."""
    from expertflow.tools.make.train_predictor import next_use

    rng = random.Random(3)
    seq = torch.tensor([0] * 9 + [1] * 6)
    experts = torch.tensor([[rng.sample(range(5), 2) for _ in range(3)] for _ in range(15)])
    horizons = (1, 2, 4)
    within, known = next_use(experts, seq, 5, horizons)
    for t in range(15):
        later = [u for u in range(t + 1, 15) if seq[u] == seq[t]]
        for j in range(3):
            for e in range(5):
                uses = [u - t for u in later if e in experts[u, j].tolist()]
                for i, h in enumerate(horizons):
                    row = j * len(horizons) + i
                    assert within[t, row, e] == float(bool(uses) and uses[0] <= h)
                    assert known[t, row, e] == float((bool(uses) and uses[0] <= h) or len(later) >= h)


def test_the_predictive_policy_evicts_the_farthest_expected_reuse():
    """With reuse estimates, a key's learned next use is its layer's distance plus (tokens to its
    next use, less one if its layer already ran this step) whole cycles; it is blended
    (geometric, ONLINE_WEIGHT) with the next use its decayed recent use rate implies; announced
    keys stay certain."""
    from expertflow.runtime.cache.policy import ONLINE_WEIGHT, RECENCY, make_policy
    from expertflow.runtime.predict.reuse import SCALE

    def blend(learned: float, d: int, rate: float) -> float:
        online = d + 3 * (1 / max(rate, 1e-3) - 1)
        return learned ** (1 - ONLINE_WEIGHT) * online ** ONLINE_WEIGHT

    policy = make_policy("predictive", [0, 1, 2])
    estimates = [1.0, 6.0, 2.0, 2.5, 9.0, 1.5]  # layers 0..2 x experts 0..1
    policy.expect([int(v * SCALE) for v in estimates])
    policy.begin(0)
    policy.use((0, 0))
    policy.use((0, 0))  # one use per step
    policy.begin(1)  # layer 0 ran this step; layer 2 has not
    policy.hint(2, [0])
    used = 1 - RECENCY
    expected = {(0, 0): blend(2 + 3 * 0, 2, used), (0, 1): blend(2 + 3 * 5, 2, 0),
                (1, 0): blend(3 + 3 * 1, 3, 0), (1, 1): blend(3 + 3 * 1.5, 3, 0),
                (2, 0): 1, (2, 1): blend(1 + 3 * 1.5, 1, 0)}
    for key, want in expected.items():
        assert policy.next_use(key) == pytest.approx(want), key
    assert policy.victim(list(expected)) == (0, 1)
    policy.begin(2)
    policy.begin(0)  # the next step: one token nearer, the use one token older
    assert policy.next_use((0, 1)) == pytest.approx(blend(3 + 3 * 4, 3, 0))
    assert policy.next_use((0, 0)) == pytest.approx(blend(3 + 3 * 0, 3, used * RECENCY))
    policy.use((0, 0))
    assert policy.recent[(0, 0)] == (pytest.approx(used * RECENCY + used), 1)


@pytest.mark.parametrize("forge,message", [
    (lambda t: t.update(w2=t["w2"][:-8]), "expected float32 (192, 256)"),
    (lambda t: t.update(b1=t["b1"] * float("nan")), "non-finite values"),
])
def test_a_forged_reuse_predictor_is_refused_in_one_line(calibrated, tmp_path, forge, message):
    forged = _forge(calibrated, tmp_path, "reuse.safetensors", forge)
    with pytest.raises(LoadError) as err:
        runtime.load(forged, expert_cache=4)
    assert message in str(err.value) and "\n" not in str(err.value)
    runtime.load(forged, expert_cache=4, policy="lru")  # only the predictive policy reads it


def test_hints_keep_hf_tokens_and_copy_nothing_early(calibrated):
    source = resolve_model(NAME)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    batch = AutoTokenizer.from_pretrained(source)(PROMPTS, return_tensors="pt", padding=True)
    want = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    model = runtime.load(calibrated, expert_cache=5, prefetch="hint")
    prefetches = [n for n in model.graph_module.graph.nodes if n.op == "call_function"
                  and n.target.__name__ == "prefetch"]
    assert prefetches and all(n.args[3:] == (False,) for n in prefetches)
    assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=False), want)
    stats = model.stats()["total"]
    assert stats["predicted"] > 0 and stats["in_flight"] == 0 and stats["prefetch_wasted"] == 0
    blob = json.loads((calibrated / "manifest.json").read_text())["memory_plan"]["expert_blob_bytes"]
    assert stats["bytes_moved"] == stats["misses"] * blob


def test_load_does_not_hash_what_it_never_reads_and_the_simulator_still_checks_it(calibrated, tmp_path):
    """The calibration traces hold hidden states (hundreds of MB on a large model) that only the
    simulator reads: runtime.load skips their checksum; expertflow-simulate refuses a damaged file."""
    import shutil

    from expertflow.tools.sim.simulate_compiled import evaluate

    damaged = tmp_path / "damaged"
    shutil.copytree(calibrated, damaged)
    with open(damaged / "calibration.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    model = runtime.load(damaged, expert_cache=4)
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
    with pytest.raises(LoadError, match="calibration.safetensors does not match its checksum"):
        evaluate(damaged, [4], ["lru"], "token", None)
    (damaged / "tables.safetensors").write_bytes(b"x")  # a file the runtime reads is still checked
    with pytest.raises(LoadError, match="tables.safetensors does not match its checksum"):
        runtime.load(damaged, expert_cache=4)


def test_a_bf16_model_calibrates_with_its_hidden_states_kept_in_bf16(tmp_path):
    """Hidden states are recorded in the model's 16-bit type (half the file of float32, nothing
    lost), the predictors train from them, and the compiled bf16 model keeps HF's tokens."""
    from safetensors import safe_open

    source = resolve_model(NAME)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    hf.save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "bf16")
    out = compile_model(str(tmp_path / "bf16"), tmp_path / "c", CompileOptions(predictor="routing_path"),
                        dumps=False, calibration=Calibration("builtin", 512, seed=0))
    with safe_open(str(out / "calibration.safetensors"), "pt") as f:
        kinds = {name: f.get_slice(name).get_dtype() for name in ("embeds", "late", "first_out", "experts")}
        assert "early" not in f.keys()
    assert kinds == {"embeds": "BF16", "late": "BF16", "first_out": "BF16", "experts": "I32"}
    ids = AutoTokenizer.from_pretrained(source)(PROMPTS[0], return_tensors="pt").input_ids
    want = hf.generate(ids, max_new_tokens=6, do_sample=False)
    got = runtime.load(out, expert_cache=6).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(20))
def test_the_predictive_victim_is_the_first_farthest_next_use(seed):
    """``victim`` scores every candidate in one frame (speed); it must pick exactly the first
    candidate of largest ``next_use``, with or without reuse estimates, hints and uses."""
    from expertflow.runtime.cache.policy import make_policy
    from expertflow.runtime.predict.reuse import SCALE

    rng = random.Random(seed)
    layers, experts = [0, 2, 5], 4
    policy = make_policy("predictive", layers)
    if seed % 2:
        policy.expect([int(rng.uniform(1, 40) * SCALE) for _ in range(len(layers) * experts)])
    for _ in range(rng.randint(1, 12)):
        layer = rng.choice(layers)
        policy.begin(layer)
        for e in rng.sample(range(experts), 2):
            policy.use((layer, e))
        if rng.random() < 0.5:
            policy.hint(rng.choice(layers), rng.sample(range(experts), 2))
        keys = [(l, e) for l in layers for e in range(experts)]
        rng.shuffle(keys)
        scores = [policy.next_use(k) for k in keys]
        assert policy.victim(keys) == keys[scores.index(max(scores))]


def test_the_server_engine_admits_by_predicted_route_and_each_request_gets_its_solo_tokens(calibrated):
    """expertflow-serve's engine with a routing-path predictor: when more requests wait than
    there are places, it picks by predicted route (their estimates are made and kept), and every
    request still gets exactly the tokens it gets alone."""
    import threading

    from expertflow.runtime.generate import engine as eng

    model = runtime.load(calibrated, expert_cache=8, batch_size=2)
    tokenizer = runtime.load_tokenizer(calibrated)
    texts = PROMPTS + ["for key, value in", "return None", "while True:"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        expected.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                       do_sample=False)[0, len(p):].tolist())
    engine = eng.Engine(model, max_batch=2, max_queue=16)
    got = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    requests = []
    try:
        for i, p in enumerate(prompts):
            requests.append(engine.submit(eng.Request(p, eng.Sampling(6), got[i].append,
                                                      lambda reason, i=i: done[i].set())))
            if i == 0:
                while not got[0]:
                    threading.Event().wait(0.001)
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    assert got == expected
    assert sum(r.estimate is not None for r in requests) >= 2  # admitted by route, not by arrival alone
