"""A compiled directory from a stranger: known attacks are refused, and random ones too.

The attacker ships a whole directory, so every checksum and the manifest's digest are
recomputed (``forge``). Each attack would create a canary file if it ran code; the canary must
never appear, and the load must end in a one-line LoadError. The fuzz test mutates graph.json and
manifest.json at random, thousands of cases, and asserts each either loads and gives exactly the
original logits or is refused with LoadError.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS

from expertflow import runtime
from expertflow.runtime.store.digest import file_digest
from expertflow.runtime.store.manifest import digest_of


def write(path: Path, graph: Any = None, manifest: dict | None = None, resign: bool = True) -> None:
    """Writes graph.json and/or manifest.json and re-signs them, as a stranger shipping a directory can."""
    if graph is not None:
        (path / "graph.json").write_text(json.dumps(graph))
    manifest = manifest if manifest is not None else json.loads((path / "manifest.json").read_text())
    if resign and isinstance(manifest, dict):
        if isinstance(manifest.get("files"), dict) and graph is not None:
            manifest["files"]["graph.json"] = file_digest(path / "graph.json")
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

    def state(path: Any, name: Any) -> dict:  # what a model keeps on its cache (ops.set_cache_state)
        return {"name": "st", "op": "call_function", "target": "expertflow.ir.ops.set_cache_state",
                "args": {"tuple": [{"node": "cache"}, {"tuple": path}, name, {"node": "input_ids"}]},
                "kwargs": {"dict": []}, "meta": {}}

    def cache_state_dunder(g):
        g["nodes"].insert(6, state([], "__class__"))

    def cache_state_elsewhere(g):  # only the cache or one of its layers holds state
        g["nodes"].insert(6, state(["config", 0], "x"))

    return {f.__name__: f for f in (placeholder, keyword, node_name, dunder_get_attr, attrgetter, operator_call,
                                    getattr_dunder, builtin_key_callable, eval_target, os_system, torch_load,
                                    method_call, aliasing_method, hook, module_escape, cache_state_dunder,
                                    cache_state_elsewhere)}


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


# --- the stranger's tokenizer, chat template and read-once files ------------------------------

_OPENED: list[str] | None = None
_ON_OPEN: list[Any] = [None]


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))
        callback, _ON_OPEN[0] = _ON_OPEN[0], None  # what it opens itself is not reported to it
        try:
            if callback is not None:
                callback(_OPENED[-1])
        finally:
            _ON_OPEN[0] = callback


@contextlib.contextmanager
def opens(on_open: Any = None) -> Iterator[list[str]]:
    """Every file Python opens inside the block (an audit hook, called before the open happens:
    open(), os.open, numpy's memmap); ``on_open(path)`` runs then."""
    global _OPENED
    if not getattr(opens, "hooked", False):
        sys.addaudithook(_audit)
        opens.hooked = True  # type: ignore[attr-defined]
    _OPENED, _ON_OPEN[0] = (seen := []), on_open
    try:
        yield seen
    finally:
        _OPENED, _ON_OPEN[0] = None, None


def ship(path: Path, files: dict[str, bytes | None]) -> None:
    """Writes (or, for None, removes) files and re-signs the manifest, as a stranger can."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name, data in files.items():
        if data is None:
            (path / name).unlink(missing_ok=True)
            manifest["files"].pop(name, None)
        else:
            (path / name).write_bytes(data)
            manifest["files"][name] = file_digest(path / name)
    write(path, manifest=manifest)


def _one_line_load_error(call) -> str:
    start = time.monotonic()
    with pytest.raises(runtime.LoadError) as err:
        call()
    assert time.monotonic() - start < 20, "the error took too long"
    message = str(err.value)
    assert message and "\n" not in message
    return message


def _bpe_as_vocab_files(path: Path, **config: Any) -> dict[str, bytes | None]:
    """The directory's tokenizer as GPT-2's vocab.json + merges.txt instead of tokenizer.json."""
    model = json.loads((path / "tokenizer.json").read_text())["model"]
    merges = "\n".join(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
    config = {**json.loads((path / "tokenizer_config.json").read_text()), "tokenizer_class": "GPT2Tokenizer", **config}
    return {"tokenizer.json": None, "vocab.json": json.dumps(model["vocab"]).encode(),
            "merges.txt": f"#version: 0.2\n{merges}\n".encode(), "tokenizer_config.json": json.dumps(config).encode()}


@pytest.mark.parametrize("key", ["gguf_file", "vocab_file", "merges_file", "tokenizer_file"])
def test_tokenizer_config_cannot_name_a_file_outside_the_directory(key, victim, tmp_path):
    """gguf_file made transformers read any path; the other file keys are left out of what it sees
    (saved configs carry their author's paths), so the tokenizer loads from the listed files."""
    path, _, _, _ = victim
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    ship(path, _bpe_as_vocab_files(path, **{key: str(secret) if key != "merges_file" else "../secret.gguf"}))
    with opens() as seen:
        if key == "gguf_file":
            message = _one_line_load_error(lambda: runtime.load_tokenizer(path))
            assert "gguf_file " in message and "names a file outside the tokenizer files the manifest" in message
        else:
            assert runtime.load_tokenizer(path)("hello world")["input_ids"]
    assert str(secret.resolve()) not in seen, "the tokenizer read a file outside the directory"
    assert {p for p in seen if p.startswith(str(path.resolve()))} <= {
        str((path / n).resolve()) for n in ("manifest.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                            "chat_template.jinja")}


def test_vocab_files_the_manifest_lists_still_load(victim):
    path, _, _, _ = victim
    ship(path, _bpe_as_vocab_files(path))
    assert runtime.load_tokenizer(path)("hello world")["input_ids"]


@pytest.mark.parametrize("name", ["AutoModelForCausalLM", "os.system", "../evil", "NoSuchTokenizer", ["x"]])
def test_tokenizer_class_must_be_one_of_transformers_tokenizers(name, victim):
    path, _, _, canary = victim
    config = json.loads((path / "tokenizer_config.json").read_text())
    ship(path, {"tokenizer_config.json": json.dumps(dict(config, tokenizer_class=name)).encode()})
    message = _one_line_load_error(lambda: runtime.load_tokenizer(path))
    assert "is not one of transformers' tokenizer classes" in message, message
    assert not canary.exists()


def _with_pipeline(path: Path, **parts: Any) -> dict[str, bytes]:
    spec = json.loads((path / "tokenizer.json").read_text())
    spec.update(parts)
    return {"tokenizer.json": json.dumps(spec).encode()}


CHARSMAP = base64.b64encode(struct.pack("<I", 8) + bytes(8) + b"l" * 100 + b"\0").decode()  # a char -> 100 l's
EXPLODING = {"type": "Sequence", "normalizers": [
    {"type": "Replace", "pattern": {"String": "l"}, "content": "l" * 10} for _ in range(8)]}  # "hello": 2*10**8 l's


@pytest.mark.parametrize("parts, expected", [
    (dict(normalizer=EXPLODING), "its Replace and Precompiled steps can grow a text more than 64 times"),
    (dict(normalizer={"type": "Replace", "pattern": {"Regex": ""}, "content": "x" * 100}), "grow a text"),
    (dict(normalizer={"type": "Sequence", "normalizers": [{"type": "Precompiled",
                                                           "precompiled_charsmap": CHARSMAP}] * 2}), "grow a text"),
    (dict(decoder={"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "a"},
                                                     "content": "a" * 5}] * 3}), "grow a text"),
    (dict(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}),
     "nests quantifiers and can backtrack without end"),
    (dict(normalizer={"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 300}), "chains more than 256"),
])
def test_tokenizer_json_that_would_explode_is_refused(parts, expected, victim):
    path, _, _, _ = victim
    ship(path, _with_pipeline(path, **parts))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = _one_line_load_error(lambda: runtime.load_tokenizer(path))
    assert expected in message, message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 512 * 1024, "the load grew memory"


def test_real_tokenizer_pipelines_pass_the_checks(victim):
    """GPT-2's, Llama 3's and DeepSeek-V3's split patterns, SentencePiece's normalizers."""
    path, _, _, _ = victim
    patterns = [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+",
                r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
                r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
    split = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in patterns]
    normalizer = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}, {"type": "NFKC"}]}
    ship(path, _with_pipeline(path, normalizer=normalizer, pre_tokenizer={
        "type": "Sequence", "pretokenizers": [*split, {"type": "ByteLevel", "add_prefix_space": False,
                                                       "trim_offsets": True, "use_regex": False}]}))
    assert runtime.load_tokenizer(path)("hello  world")["input_ids"]


def test_a_tokenizers_panic_is_one_line(victim):
    """A regex past Oniguruma's backtracking limit makes tokenizers panic (a BaseException)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from expertflow.runtime.store.tokenizer import encode_text

    path, _, _, _ = victim
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+b"}, "behavior": "Isolated",
                             "invert": False}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    message = _one_line_load_error(lambda: encode_text(tokenizer, "a" * 40))
    assert "the tokenizer failed on this text (tokenizers panicked: " in message, message


CHAT_ATTACKS = {
    "repeat": ("{{ 'x' * 10**10 }}", "repeats 1 characters 10000000000 times"),
    "nested_ranges": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                      "ran more than 1000000 steps"),
    "doubling_macro": ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('ab', 60) }}",
                       "more than 1048576"),
    "doubling_namespace": ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                           "{% endfor %}{{ ns.s }}", "joins 2097152 characters"),
    "wide_filter": ("{{ 'a'|center(10**9) }}", "passes 1000000000 to the center filter"),
    "wide_format": ("{{ '{:>999999999}'.format(1) }}", "formats a field of a million characters"),
    "printf_width": ("{{ '%999999999d' % 1 }}", "formats a field of a million characters"),
    "power": ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
              "{{ ns.x }}", "built a number of"),
    "sandbox": ("{{ ''.__class__.__mro__ }}", "the chat template fails (SecurityError: access to attribute"),
    "renders_nothing": ("{% if false %}x{% endif %}", "the chat template rendered no text for this conversation"),
    "raises": ("{{ raise_exception('roles must alternate') }}", "(TemplateError: roles must alternate)"),
}


@pytest.mark.parametrize("case", sorted(CHAT_ATTACKS))
def test_chat_templates_run_bounded(case, victim):
    from expertflow.runtime.store.chat import render_chat

    path, _, _, canary = victim
    template, expected = CHAT_ATTACKS[case]
    ship(path, {"chat_template.jinja": template.encode()})
    tokenizer = runtime.load_tokenizer(path)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = _one_line_load_error(lambda: render_chat(tokenizer, [{"role": "user", "content": "hello"}]))
    assert expected in message, message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 512 * 1024, "the template grew memory"
    assert not canary.exists()


REAL_TEMPLATES = {  # shapes of released models' templates: loops, slicing, raise_exception, filters
    "mistral": "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
               "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
               "{{- bos_token }}{%- for m in loop_messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{- raise_exception('roles must alternate') }}{%- endif %}{%- if m['role'] == 'user' %}"
               "{%- if loop.first and system is defined %}"
               "{{- ' [INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' }}{%- else %}{{- ' [INST] ' + "
               "m['content'] + ' [/INST]' }}{%- endif %}{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}"
               "{%- endfor %}",
    "llama3": "{{- bos_token }}{%- for m in messages %}"
              "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
              " + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- "
              "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
    "generation_tag": "{% for m in messages %}{% generation %}{{ m.content ~ '|' ~ (m|tojson) }}{% endgeneration %}"
                      "{% endfor %}{{ '%5d' % 3 }}{{ '{:>4}'.format('a') }}"
                      "{{ messages|map(attribute='role')|join(',') }}"
                      "{% set ns = namespace(x=0) %}{% for i in range(10) %}{% set ns.x = ns.x + i %}{% endfor %}"
                      "{{ ns.x }}",
}


@pytest.mark.parametrize("name", ["directory's", *sorted(REAL_TEMPLATES)])
def test_bounded_chat_rendering_is_transformers_text(name, victim):
    from expertflow.runtime.store.chat import render_chat

    path, _, _, _ = victim
    if name in REAL_TEMPLATES:
        ship(path, {"chat_template.jinja": REAL_TEMPLATES[name].encode()})
    tokenizer = runtime.load_tokenizer(path)
    for chat in ([{"role": "user", "content": "hello"}],
                 [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x" * 50_000}]):
        assert render_chat(tokenizer, chat) == tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                                              tokenize=False)


def test_the_cli_reports_a_costly_chat_template_in_one_line(victim):
    path, _, _, _ = victim
    ship(path, {"chat_template.jinja": CHAT_ATTACKS["repeat"][0].encode()})
    # The CLI's own peak, VmHWM of its process after exec, which it prints as it exits: getrusage's
    # maxrss of a child also counts the pytest process it was forked from.
    child = ("import runpy, sys\n"
             "sys.argv = ['expertflow-generate', sys.argv[1], 'hello', '--chat', '--quiet']\n"
             "try:\n    runpy.run_module('expertflow.tools.cli.generate', run_name='__main__')\n"
             "finally:\n    print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expertflow-generate: error: the chat template repeats"), lines
    assert time.monotonic() - start < 60
    peak_kib = int(proc.stdout.split()[-1])
    assert peak_kib < 3 * 2**20, f"the CLI grew to {peak_kib / 2**20:.1f} GiB"


def test_weights_changed_after_their_check_are_never_used(victim, hf_reference):
    """dense.safetensors swapped for other weights (same size, same header) as soon as it has been
    opened once: the load refuses them or computes with the checked ones, never the swapped ones."""
    path, _, _, _ = victim
    dense = path / "dense.safetensors"
    original = dense.read_bytes()
    forged = original[:-4096] + bytes(4096)  # the last weights zeroed
    opened = []

    def swap(name: str) -> None:
        if name == str(dense.resolve()):
            opened.append(name)
            if len(opened) > 1:
                dense.write_bytes(forged)

    with opens(swap):
        try:
            model = runtime.load(path, expert_cache=3)
        except runtime.LoadError as exc:
            assert "dense.safetensors does not match its checksum" in str(exc), str(exc)
            return
    assert opened, "dense.safetensors was never opened"
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, hf_reference("tiny-mixtral")[1],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["graph.json", "generation_config.json", "manifest.json"])
def test_load_reads_each_file_once(name, victim):
    """The file whose checksum is checked is the file parsed: one open, so no swap in between."""
    path, _, _, _ = victim
    with opens() as seen:
        runtime.load(path, expert_cache=3)
    assert seen.count(str((path / name).resolve())) == 1, seen


def test_tokenizer_files_are_read_once(victim):
    path, _, _, _ = victim
    with opens() as seen:
        runtime.load_tokenizer(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert seen.count(str((path / name).resolve())) == 1, (name, seen)


def _permuted_experts(data: bytes) -> bytes:
    """experts.safetensors with layer 0's experts 0 and 1 swapped in the header only (same length)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    a, b = header["layers.0.experts.0"], header["layers.0.experts.1"]
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:]


@pytest.mark.parametrize("at", [1, 2, 3])
def test_experts_changed_between_opens_are_never_mixed(at, victim):
    """The manifest lists experts file B; the first opens see file A (another header over the same
    blobs), B from open number ``at`` on: the model is B's, or the load is refused. The header
    checked must be the header hashed with the blobs."""
    path, _, _, _ = victim
    experts = path / "experts.safetensors"
    original = experts.read_bytes()
    other = _permuted_experts(original)
    ship(path, {"experts.safetensors": other})
    expected = runtime.load(path, expert_cache=3)(PROMPTS, attention_mask=PROMPT_MASK).logits
    experts.write_bytes(original)
    opened = []

    def swap(name: str) -> None:
        if name == str(experts.resolve()):
            opened.append(name)
            if len(opened) == at:
                experts.write_bytes(other)

    with opens(swap):
        try:
            model = runtime.load(path, expert_cache=3)
        except runtime.LoadError as exc:
            assert "experts.safetensors changed while it was read" in str(exc) or \
                "experts.safetensors does not match its checksum" in str(exc), str(exc)
            return
    assert len(opened) >= at, opened
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, expected, atol=1e-5, rtol=0)
