"""A compiled directory from a stranger: known attacks are refused, and random ones too.

The attacker ships a whole directory, so every checksum and the manifest's digest are
recomputed (``forge``). Each attack would create a canary file if it ran code; the canary must
never appear, and the load must end in a one-line LoadError. The fuzz test mutates graph.json and
manifest.json at random, thousands of cases, and asserts each either loads and gives exactly the
original logits or is refused with LoadError.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS

from expertflow import runtime
from expertflow.runtime.manifest import digest_of, sha256


def write(path: Path, graph: Any = None, manifest: dict | None = None, resign: bool = True) -> None:
    """Writes graph.json and/or manifest.json and re-signs them, as a stranger shipping a directory can."""
    if graph is not None:
        (path / "graph.json").write_text(json.dumps(graph))
    manifest = manifest if manifest is not None else json.loads((path / "manifest.json").read_text())
    if resign and isinstance(manifest, dict):
        if isinstance(manifest.get("files"), dict) and graph is not None:
            manifest["files"]["graph.json"] = sha256(path / "graph.json")
        manifest["digest"] = digest_of(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def victim(compiled_dir, tmp_path):
    """A private copy of compiled tiny-mixtral, its graph and manifest, and a canary path."""
    path = tmp_path / "compiled"
    shutil.copytree(compiled_dir("tiny-mixtral"), path)
    graph = json.loads((path / "graph.json").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    return path, graph, manifest, tmp_path / "CANARY"


def _refused(path: Path, canary: Path) -> str:
    with pytest.raises(runtime.LoadError) as err:
        runtime.load(path)
    assert not canary.exists(), "the attack ran code"
    message = str(err.value)
    assert "\n" not in message
    return message


def _node(graph: dict, target: str) -> dict:
    return next(n for n in graph["nodes"] if n["target"] == target)


def _other_release(manifest: dict) -> dict:
    """The stored graph is then only validated (another release may compile differently)."""
    return dict(manifest, transformers="0.0.0")


def _payload(canary: Path) -> str:
    return f"__import__('os').system('touch {canary}')"


def _attacks(canary: Path) -> dict[str, Any]:
    touch = _payload(canary)

    def placeholder(g):  # a placeholder's target is pasted into ``def forward(self, <target>, ...)``
        g["nodes"][0]["target"] = f"input_ids=({touch})"

    def keyword(g):  # keyword names are pasted into ``f(x, <key>=...)``
        _node(g, "torch.topk")["kwargs"]["dict"].append([f"k=({touch}), z", 1])

    def node_name(g):
        g["nodes"][1]["name"] = f"x = {touch}; y"

    def dunder_get_attr(g):
        g["nodes"].insert(6, {"name": "glb", "op": "get_attr", "target": "lm.__class__.__init__.__globals__",
                              "args": {"tuple": []}, "kwargs": {"dict": []}, "meta": {}})

    def attrgetter(g):
        _node(g, "torch.topk")["target"] = "_operator.attrgetter"

    def operator_call(g):
        _node(g, "torch.topk")["target"] = "operator.call"

    def getattr_dunder(g):
        node = next(n for n in g["nodes"] if n["target"] == "getattr")
        node["args"]["tuple"][1] = "__class__"

    def builtin_key_callable(g):
        node = _node(g, "torch.topk")
        node["target"], node["kwargs"]["dict"] = "max", [["key", {"node": "ef_ctx"}]]

    def eval_target(g):
        _node(g, "torch.topk")["target"] = "builtins.eval"

    def os_system(g):
        _node(g, "torch.topk")["target"] = "os.system"

    def torch_load(g):
        _node(g, "torch.topk")["target"] = "torch.load"

    def method_call(g):
        node = next(n for n in g["nodes"] if n["op"] == "call_method")
        node["target"] = "__call__"

    def aliasing_method(g):  # as_strided reads memory outside the tensor
        next(n for n in g["nodes"] if n["op"] == "call_method")["target"] = "as_strided"

    def hook(g):
        next(n for n in g["nodes"] if n["op"] == "call_method")["target"] = "register_hook"

    def module_escape(g):
        node = next(n for n in g["nodes"] if n["op"] == "call_module")
        node["target"] = "lm.__class__"

    return {f.__name__: f for f in (placeholder, keyword, node_name, dunder_get_attr, attrgetter, operator_call,
                                    getattr_dunder, builtin_key_callable, eval_target, os_system, torch_load,
                                    method_call, aliasing_method, hook, module_escape)}


ATTACKS = sorted(_attacks(Path("x")))


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("release", ["same", "other"])
def test_graph_attacks_are_refused_before_any_code_is_built(attack, release, victim):
    path, graph, manifest, canary = victim
    _attacks(canary)[attack](graph)
    write(path, graph, manifest if release == "same" else _other_release(manifest))
    message = _refused(path, canary)
    assert "graph.json is not a valid ExpertFlow graph" in message, message


def test_the_canary_would_catch_a_successful_exploit(victim):
    path, _, _, canary = victim
    eval(compile(_payload(canary), "attack", "eval"))  # what an accepted payload would do
    assert canary.exists()


# --- fuzzing ----------------------------------------------------------------------------------

STRINGS = ["", "x", "__class__", "__globals__", "os.system", "builtins.eval", "torch.load", "operator.call",
           "lm.__class__", "input_ids", "ef_ctx", "cache", "getattr", "self", "torch", "a b", "../../etc/passwd",
           "/etc/hostname", "torch.topk", "topk", "view", "set_", "shape", "dim", "None", "1e309", "\u0000",
           "lm.model.layers.0.mlp.gate.weight", "lm.model.layers.0.self_attn"]
VALUES: list[Any] = [None, True, 0, -1, 1, 2, 3, 10**18, -(10**18), 0.5, float("1e300"), [], {}, [1, 2],
                     {"node": "input_ids"}, {"node": "nope"}, {"tuple": [1]}, {"slice": [None, 1, None]},
                     {"dtype": "float64"}, {"dtype": "__class__"}, {"device": "cpu"}, {"float": "nan"},
                     {"size": [1, -1]}, {"dict": [["k", 1]]}, {"ellipsis": True}, {"a": 1, "b": 2}]


def _random_value(rng: random.Random, canary: Path) -> Any:
    choice = rng.random()
    if choice < 0.35:
        return rng.choice(STRINGS + [_payload(canary)])
    return copy.deepcopy(rng.choice(VALUES))


def _mutate(tree: Any, rng: random.Random, canary: Path) -> Any:
    """One random change somewhere in a JSON tree: a value replaced, a key or item dropped, added
    or duplicated, or two list items swapped."""
    containers = []

    def walk(node: Any) -> None:
        if isinstance(node, (dict, list)):
            containers.append(node)
            for child in (node.values() if isinstance(node, dict) else node):
                walk(child)

    walk(tree)
    box = rng.choice(containers)
    action = rng.random()
    if isinstance(box, dict) and box:
        key = rng.choice(sorted(box, key=str))
        if action < 0.6:
            box[key] = _random_value(rng, canary)
        elif action < 0.8:
            del box[key]
        else:
            box[rng.choice(STRINGS)] = _random_value(rng, canary)
    elif isinstance(box, list) and box:
        i = rng.randrange(len(box))
        if action < 0.5:
            box[i] = _random_value(rng, canary)
        elif action < 0.7:
            del box[i]
        elif action < 0.85:
            box.insert(i, copy.deepcopy(box[rng.randrange(len(box))]))
        else:
            j = rng.randrange(len(box))
            box[i], box[j] = box[j], box[i]
    else:
        box.append(_random_value(rng, canary)) if isinstance(box, list) else box.update(x=1)
    return tree


def test_fuzzed_graph_and_manifest_load_exactly_or_are_refused(victim, hf_reference):
    """Thousands of random mutations (seeded), every checksum and digest recomputed. Manifest
    mutations skip the config's values: a forger may ship another model, and the config is where
    a model's numbers live; everything else in the manifest is derived or checked."""
    path, graph, manifest, canary = victim
    reference = hf_reference("tiny-mixtral")[1]
    rng = random.Random(20261125)
    outcomes = {"refused": 0, "exact": 0}
    deadline = time.monotonic() + 150
    cases = 0
    while cases < 2000 and time.monotonic() < deadline:
        cases += 1
        target = "graph" if rng.random() < 0.7 else "manifest"
        new_graph, new_manifest = copy.deepcopy(graph), copy.deepcopy(manifest)
        if target == "graph":
            for _ in range(rng.choice([1, 1, 2, 3])):
                new_graph = _mutate(new_graph, rng, canary)
            if rng.random() < 0.5:
                new_manifest = _other_release(new_manifest)
        else:
            config = new_manifest.pop("config")
            new_manifest = _mutate(new_manifest, rng, canary)
            if isinstance(new_manifest, dict):
                new_manifest["config"] = config
        write(path, new_graph, new_manifest)
        try:
            model = runtime.load(path, expert_cache=3)
        except runtime.LoadError as exc:
            assert "\n" not in str(exc), str(exc)
            outcomes["refused"] += 1
        else:
            logits = model(PROMPTS, attention_mask=PROMPT_MASK).logits
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0,
                                       msg=lambda m: f"case {cases} loaded and computed something else: {m}")
            outcomes["exact"] += 1
        assert not canary.exists(), f"case {cases} ran code"
    print(f"fuzz: {cases} cases, {outcomes}")
    assert cases >= 1000, f"only {cases} cases ran in the time budget"
    assert outcomes["refused"] > 0 and outcomes["exact"] > 0, outcomes
