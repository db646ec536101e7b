"""Bad input: every case ends in one line that says what is wrong and what to do, a non-zero exit
(or LoadError), no traceback, and nothing half-written next to the output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertflow import runtime
from expertflow.ir.serialize import SCHEMA, GraphFormatError, graph_from_json
from expertflow.runtime import LoadError, load
from expertflow.tools import artefact
from expertflow.tools.compile import main

# Runs the CLI with sockets disabled: an attempt to reach the network is a traceback and exit 1,
# so "exit 2 with one line" also proves nothing was fetched.
OFFLINE_MAIN = ("import socket, sys\n"
                "def refuse(*a, **k): raise AssertionError('expertflow-compile tried the network')\n"
                "socket.socket.connect = refuse\n"
                "from expertflow.tools.compile import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
PREFIX = "expertflow-compile: error: "


def run_cli(*args: str, env: dict[str, str] | None = None, guarded: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: guarded (no sockets), or exactly as ``python -m`` runs it."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    entry = ["-c", OFFLINE_MAIN] if guarded else ["-m", "expertflow.tools.compile"]
    return subprocess.run([sys.executable, *entry, *args, "--quiet"], capture_output=True, text=True,
                          env=full_env, timeout=300)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0]


def assert_untouched(parent: Path, before: set[str]) -> None:
    """No new entry under ``parent``: no output, no ``.NAME.partial-*`` or ``.NAME.old-*`` dir."""
    assert set(os.listdir(parent)) == before


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A dense model (no MoE layer) saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    path = tmp_path_factory.mktemp("llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mixtral_src(model_dir) -> str:
    """The tiny-mixtral preset directory, made before any test captures its output."""
    return str(model_dir("tiny-mixtral"))


# --- compile: the CLI in a subprocess -------------------------------------------------------

def test_model_without_moe_layers(llama_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(str(llama_dir), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "has no MoE layer" in one_line(proc.stderr)
    assert_untouched(tmp_path, set())


def test_missing_path(tmp_path: Path) -> None:
    proc = run_cli(str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), guarded=False)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "does not exist" in line and "preset" in line
    assert_untouched(tmp_path, set())


def test_hub_id_not_in_local_cache(tmp_path: Path) -> None:
    hub = tmp_path / "hf"
    hub.mkdir()
    proc = run_cli("someorg/not-cached-moe", "-o", str(tmp_path / "out"),
                   env={"HF_HOME": str(hub), "HF_HUB_CACHE": str(hub / "hub")})
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "not in the local Hugging Face cache" in line
    assert "`hf download someorg/not-cached-moe`" in line
    assert_untouched(tmp_path, {"hf"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through chmod 000; see the os.access variant")
def test_unreadable_model_dir(mixtral_src: str, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    shutil.copytree(mixtral_src, locked)
    locked.chmod(0)
    try:
        proc = run_cli(str(locked), "-o", str(tmp_path / "out"))
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2
    assert "not readable" in one_line(proc.stderr)
    assert_untouched(tmp_path, {"locked"})


# --- compile: main() in process (fast: failures come before the model loads) ------------------

def test_unreadable_model_dir_even_as_root(mixtral_src: str, tmp_path: Path, capsys, monkeypatch) -> None:
    # Root bypasses permission bits, so deny the access check itself for this one directory.
    src = mixtral_src
    real_access = os.access
    monkeypatch.setattr("expertflow.tools.source.os.access",
                        lambda p, mode: False if str(p) == src else real_access(p, mode))
    assert main([src, "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{src} is not readable" in one_line(capsys.readouterr().err)
    assert_untouched(tmp_path, set())


def _unknown_architecture(d: Path) -> None:
    (d / "config.json").write_text(json.dumps({"model_type": "nonsense"}))


def _truncated_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:100])


@pytest.mark.parametrize("damage, expected", [
    # transformers words this one as two paragraphs; safetensors raises its own exception type
    (_unknown_architecture, "cannot read the config of"), (_truncated_weights, "cannot load the weights of"),
])
def test_broken_model_dir(damage, expected: str, mixtral_src: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "model"
    shutil.copytree(mixtral_src, src)
    damage(src)
    assert main([str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert expected in one_line(capsys.readouterr().err)
    assert_untouched(tmp_path, {"model"})


def test_existing_output_is_refused_without_force(mixtral_src: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main([mixtral_src, "-o", str(out), "--quiet"]) == 2
    assert "already exists; pass --force" in one_line(capsys.readouterr().err)
    assert (out / "mine.txt").read_text() == "keep me"
    assert_untouched(tmp_path, {"out"})


@pytest.mark.parametrize("kind", ["file", "foreign_dir", "file_as_parent"])
def test_force_refuses_what_is_not_a_compiled_dir(kind: str, mixtral_src: str, tmp_path: Path, capsys) -> None:
    # --force deletes a directory: it must never delete a user's file or unrelated directory.
    victim = tmp_path / "victim"
    if kind == "foreign_dir":
        victim.mkdir()
        (victim / "thesis.tex").write_text("irreplaceable")
    else:
        victim.write_text("irreplaceable")
    out = victim / "out" if kind == "file_as_parent" else victim
    assert main([mixtral_src, "-o", str(out), "--force", "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert {"file": "is not a directory", "foreign_dir": "no manifest.json",
            "file_as_parent": "is not a directory"}[kind] in line
    assert "irreplaceable" in (victim.read_text() if victim.is_file() else (victim / "thesis.tex").read_text())
    assert_untouched(tmp_path, {"victim"})


def test_force_replaces_a_compiled_dir(mixtral_src: str, compiled_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(compiled_dir("tiny-mixtral"), out)
    (out / "stale.txt").write_text("from the last compile")
    assert main([mixtral_src, "-o", str(out), "--force", "--no-dumps", "--quiet"]) == 0
    assert "compiled" in capsys.readouterr().out
    assert not (out / "stale.txt").exists() and not (out / "dumps").exists()
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert set(files) == {"dense.safetensors", "experts.safetensors", "graph.json", "generation_config.json",
                          "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert_untouched(tmp_path, {"out"})


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_compile_leaves_nothing(existing: bool, mixtral_src: str, compiled_dir, tmp_path: Path,
                                            capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    if existing:
        shutil.copytree(compiled_dir("tiny-mixtral"), out)
    before_files = sorted(p.name for p in out.iterdir()) if existing else None

    def interrupted(lm, layouts, tmp: Path, progress) -> None:
        (tmp / "dense.safetensors").write_bytes(b"half")  # something half-written to clean up
        raise KeyboardInterrupt

    monkeypatch.setattr(artefact, "write_weights", interrupted)
    args = [mixtral_src, "-o", str(out), "--quiet"] + (["--force"] if existing else [])
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == "expertflow-compile: interrupted; nothing was written"
    assert_untouched(tmp_path, {"out"} if existing else set())
    if existing:  # --force must not have removed the old result before the new one was complete
        assert sorted(p.name for p in out.iterdir()) == before_files


def test_failing_build_in_a_new_parent_leaves_no_parent(mixtral_src: str, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    def disk_full(lm, layouts, tmp: Path, progress) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artefact, "write_weights", disk_full)
    assert main([mixtral_src, "-o", str(tmp_path / "a" / "b" / "out"), "--quiet"]) == 2
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert_untouched(tmp_path, set())  # the parents a/ and a/b/ it made are gone too


# --- runtime.load -----------------------------------------------------------------------------

@pytest.fixture
def copy_of(compiled_dir, tmp_path: Path):
    """A private copy of the compiled tiny-mixtral directory, free to tamper with."""
    dst = tmp_path / "compiled"
    shutil.copytree(compiled_dir("tiny-mixtral"), dst)
    return dst


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(LoadError) as info:
        load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_load_missing_and_non_directory_paths(tmp_path: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in load_error(tmp_path / "file")
    assert "no manifest.json" in load_error(tmp_path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


TAMPERING = {
    "missing_file": (lambda d: (d / "experts.safetensors").unlink(), "experts.safetensors is missing"),
    "edited_graph": (lambda d: (d / "graph.json").write_text((d / "graph.json").read_text() + " "),
                     "graph.json does not match its checksum"),
    "truncated_weights": (lambda d: _truncate(d / "dense.safetensors"), "dense.safetensors does not match"),
    "other_schema": (lambda d: edit_manifest(d, lambda m: m.update(schema_version=99)), "schema version 99"),
    "unlisted_file": (lambda d: edit_manifest(d, lambda m: m["files"].pop("graph.json")),
                      "no checksum for graph.json"),
    "no_layouts": (lambda d: edit_manifest(d, lambda m: m.pop("layouts")), "malformed layouts"),
    "bad_model_type": (lambda d: edit_manifest(d, lambda m: m.update(model_type="nonsense")),
                       "manifest.json is malformed"),
    "manifest_not_json": (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    # A directory in its place cannot be read even by root: the unreadable-file case.
    "manifest_unreadable": (lambda d: ((d / "manifest.json").unlink(), (d / "manifest.json").mkdir()),
                            "manifest.json is unreadable"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_load_refuses_a_tampered_directory(case: str, copy_of: Path) -> None:
    tamper, expected = TAMPERING[case]
    tamper(copy_of)
    message = load_error(copy_of)
    assert expected in message
    assert "recompile" in message


@pytest.mark.parametrize("budget, expected", [
    (0, "minimum is 1 slot"), (-2, "minimum is 1 slot"), ("1KiB", "minimum is 1 slot"),
    ("lots", "is not a size"), ("1.2.3MiB", "is not a size"), ("4 parsecs", "is not a size"),
    (2.5, "give a slot count"), (True, "give a slot count"), ("8", "is a string of digits: pass the int 8"),
    ("0%", "above 0% and at most 100%"), ("150%", "above 0% and at most 100%"), ("25 percent", "is not a size"),
])
def test_load_refuses_a_bad_budget(budget, expected: str, compiled_dir) -> None:
    assert expected in load_error(compiled_dir("tiny-mixtral"), expert_cache=budget)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_load_on_cuda_without_gpu(compiled_dir) -> None:
    assert "no CUDA GPU is available" in load_error(compiled_dir("tiny-mixtral"), device="cuda")


@pytest.mark.parametrize("device", ["banana", "tpu"])
def test_load_on_unknown_device(device: str, compiled_dir) -> None:
    assert "use 'cpu' or 'cuda'" in load_error(compiled_dir("tiny-mixtral"), device=device)


def _node(name: str, op: str, target: str, args: list) -> dict:
    return {"name": name, "op": op, "target": target, "args": args, "kwargs": {"dict": []}, "meta": {}}


# Reaches os.system through dunder attributes of a tensor; every step but the last is allowlisted
# by module, which is why getattr and call_method must refuse private names.
ESCAPE = [_node("x", "placeholder", "x", []),
          _node("cls", "call_function", "getattr", [{"node": "x"}, "__class__"]),
          _node("fn", "call_function", "getattr", [{"node": "cls"}, "__deepcopy__"]),
          _node("glb", "call_function", "getattr", [{"node": "fn"}, "__globals__"]),
          _node("output", "output", "output", [{"node": "glb"}])]


@pytest.mark.parametrize("nodes, expected", [
    ([_node("x", "placeholder", "x", []), _node("r", "call_function", "os.system", ["true"]),
      _node("output", "output", "output", [{"node": "r"}])], "'os.system' is outside the allowlist"),
    ([_node("x", "placeholder", "x", []), _node("r", "call_function", "torch.save", [{"node": "x"}, "/tmp/f"]),
      _node("output", "output", "output", [{"node": "r"}])], "'torch.save' is outside the allowlist"),
    ([_node("x", "placeholder", "x", []), _node("r", "call_method", "__call__", [{"node": "x"}]),
      _node("output", "output", "output", [{"node": "r"}])], "not a public torch.Tensor method"),
    (ESCAPE, "only public attributes"),
])
def test_graph_json_target_outside_allowlist(nodes: list, expected: str) -> None:
    with pytest.raises(GraphFormatError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        graph_from_json({"schema": SCHEMA, "nodes": nodes}, torch.nn.Module())


def test_load_refuses_graph_outside_allowlist_even_with_a_valid_checksum(copy_of: Path) -> None:
    graph = json.loads((copy_of / "graph.json").read_text())
    victim = next(n for n in graph["nodes"] if n["target"] == "torch.topk")
    victim["target"] = "os.system"
    (copy_of / "graph.json").write_text(json.dumps(graph))
    edit_manifest(copy_of, lambda m: m["files"].update({"graph.json": artefact.sha256(copy_of / "graph.json")}))
    message = load_error(copy_of)
    assert "graph.json is not a valid ExpertFlow graph" in message
    assert "'os.system' is outside the allowlist" in message


# Wrong inputs to a loaded model: one line naming the argument and what it expects.

BAD_INPUTS = {
    "string": (lambda m: m("Hello"), "input_ids is a string; it must be a 2-D tensor of token ids"),
    "list": (lambda m: m([[5, 6, 7]]), "input_ids is a list; it must be a 2-D torch tensor"),
    "1-D": (lambda m: m(torch.tensor([5, 6, 7])), "input_ids has shape (3,); it must be 2-D (batch, sequence); "
                                                  "add the batch dimension: ids[None]"),
    "float": (lambda m: m(torch.ones(1, 3)), "input_ids has dtype torch.float32; token ids are integers"),
    "too large": (lambda m: m(torch.tensor([[5, 100000]])), "input_ids holds token id 100000, outside this "
                                                            "model's vocabulary [0, 384)"),
    "negative": (lambda m: m(torch.tensor([[-1, 5]])), "input_ids holds token id -1, outside"),
    "mask shape": (lambda m: m(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 4)),
                   "attention_mask has shape (1, 4); it must be (1, 3)"),
    "mask list": (lambda m: m(torch.tensor([[5, 6, 7]]), attention_mask=[[1, 1, 1]]),
                  "attention_mask is a list; it must be a torch tensor"),
    "generate string": (lambda m: m.generate("Hello"), "inputs is a string; it must be a 2-D tensor of token ids"),
    "generate 1-D": (lambda m: m.generate(torch.tensor([5, 6])), "inputs has shape (2,); it must be 2-D"),
    "generate kwarg list": (lambda m: m.generate(input_ids=[[5, 6]]), "input_ids is a list"),
    "embeds": (lambda m: m(inputs_embeds=torch.ones(1, 2, 64)), "inputs_embeds is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_model_refuses_bad_input(case: str, compiled_dir) -> None:
    call, expected = BAD_INPUTS[case]
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=2)
    with pytest.raises(ValueError) as err:
        call(model)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
