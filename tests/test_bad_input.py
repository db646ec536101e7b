"""Bad input: every case ends in one line that says what is wrong and what to do, a non-zero exit
(or LoadError), no traceback, and nothing half-written next to the output."""

from __future__ import annotations

import json
import os
import shutil
import time
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertflow import runtime
from expertflow.runtime import LoadError, load
from expertflow.runtime.store.manifest import digest_of
from expertflow.tools.make import artefact
from expertflow.tools.cli.compile import main

# Runs the CLI with sockets disabled: an attempt to reach the network is a traceback and exit 1,
# so "exit 2 with one line" also proves nothing was fetched.
OFFLINE_MAIN = ("import socket, sys\n"
                "def refuse(*a, **k): raise AssertionError('expertflow-compile tried the network')\n"
                "socket.socket.connect = refuse\n"
                "from expertflow.tools.cli.compile import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
PREFIX = "expertflow-compile: error: "


def run_cli(*args: str, env: dict[str, str] | None = None, guarded: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: guarded (no sockets), or exactly as ``python -m`` runs it."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    entry = ["-c", OFFLINE_MAIN] if guarded else ["-m", "expertflow.tools.cli.compile"]
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
    monkeypatch.setattr("expertflow.tools.make.source.os.access",
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


@pytest.mark.parametrize("kind", ["file", "foreign_dir", "file_as_parent", "foreign_manifest", "unsigned_manifest"])
def test_force_refuses_what_is_not_a_compiled_dir(kind: str, mixtral_src: str, tmp_path: Path, capsys) -> None:
    # --force deletes a directory: it must never delete a user's file or unrelated directory.
    victim = tmp_path / "victim"
    if kind in ("foreign_dir", "foreign_manifest", "unsigned_manifest"):
        victim.mkdir()
        (victim / "thesis.tex").write_text("irreplaceable")
        if kind == "foreign_manifest":  # a web app's manifest
            (victim / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
        if kind == "unsigned_manifest":  # looks like ours, but its digest does not check out
            (victim / "manifest.json").write_text(json.dumps({"schema_version": 3, "files": {}}))
    else:
        victim.write_text("irreplaceable")
    out = victim / "out" if kind == "file_as_parent" else victim
    assert main([mixtral_src, "-o", str(out), "--force", "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert {"file": "is not a directory", "foreign_dir": "it has no manifest.json",
            "file_as_parent": "is not a directory",
            "foreign_manifest": "its manifest.json is not one this ExpertFlow wrote",
            "unsigned_manifest": "its manifest.json is not one this ExpertFlow wrote"}[kind] in line
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
    assert set(files) == {"dense.safetensors", "experts.safetensors", "expert_digests.safetensors", "graph.json",
                          "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
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


def edit_manifest(path: Path, edit, resign: bool = True) -> None:
    """Edits the manifest; ``resign`` recomputes its digest, as a forger would."""
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    if resign:
        manifest["digest"] = digest_of(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def forge(path: Path, name: str, data: bytes) -> None:
    """Replaces a file and re-signs everything, as a stranger shipping a whole directory can."""
    (path / name).write_bytes(data)
    edit_manifest(path, lambda m: m["files"].update({name: artefact.file_digest(path / name)}))


def _experts_header(path: Path, edit) -> None:
    data = (path / "experts.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    forge(path, "experts.safetensors", struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _part_offset(m: dict) -> None:
    m["layouts"][0]["parts"][0]["shape"].reverse()  # same bytes, well formed, not the model's


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
    "truncated_weights": (lambda d: _truncate(d / "dense.safetensors"), "dense.safetensors is"),
    "other_schema": (lambda d: edit_manifest(d, lambda m: m.update(schema_version=99)), "schema version 99"),
    "schema_as_string": (lambda d: edit_manifest(d, lambda m: m.update(schema_version="3")),
                         "schema_version '3' is not an integer"),
    "hand_edit": (lambda d: edit_manifest(d, lambda m: m["config"].update(rms_norm_eps=1e-3), resign=False),
                  "does not match its own digest"),
    "unlisted_file": (lambda d: edit_manifest(d, lambda m: m["files"].pop("graph.json")),
                      "no checksum for graph.json"),
    "no_layouts": (lambda d: edit_manifest(d, lambda m: m.pop("layouts")), "layouts is NoneType"),
    "bad_model_type": (lambda d: edit_manifest(d, lambda m: m.update(model_type="nonsense")),
                       "config does not make a 'nonsense' config"),
    "manifest_not_json": (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    "manifest_a_directory": (lambda d: ((d / "manifest.json").unlink(), (d / "manifest.json").mkdir()),
                             "manifest.json is not a regular file"),
    "absolute_path": (lambda d: edit_manifest(d, lambda m: m["files"].update({"/etc/hostname": "0" * 64})),
                      "'/etc/hostname' leaves the directory"),
    "parent_path": (lambda d: edit_manifest(d, lambda m: m["files"].update({"../x": "0" * 64})),
                    "'../x' leaves the directory"),
    "fifo": (lambda d: ((d / "graph.json").unlink(), os.mkfifo(d / "graph.json")), "graph.json is not a regular file"),
    "symlink": (lambda d: ((d / "dense.safetensors").unlink(), (d / "dense.safetensors").symlink_to("/etc/hostname")),
                "dense.safetensors is a symlink"),
    "huge_header": (lambda d: forge(d, "experts.safetensors", struct.pack("<Q", 2**63) + b"{}"),
                    "header claims 9223372036854775808 bytes"),
    "header_not_utf8": (lambda d: forge(d, "experts.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{}"),
                        "header is not JSON"),
    "truncated_experts": (lambda d: forge(d, "experts.safetensors", (d / "experts.safetensors").read_bytes()[:5000]),
                          "inside the file"),
    "shared_blob": (lambda d: _experts_header(d, lambda h: h["layers.0.experts.1"].update(
        data_offsets=h["layers.0.experts.0"]["data_offsets"])), "overlap"),
    "negative_size": (lambda d: edit_manifest(d, lambda m: m["layouts"][0].update(blob_bytes=-5)),
                      "layouts[0].blob_bytes is -5"),
    "huge_experts": (lambda d: edit_manifest(d, lambda m: m["layouts"][0].update(num_experts=8 * 10**12)),
                     "layouts[0].num_experts is 8000000000000"),
    "moved_part": (lambda d: edit_manifest(d, _part_offset), "layout of MoE layer 0 is not what its config compiles"),
    "hub_kernel": (lambda d: edit_manifest(d, lambda m: m.update(attn_implementation="kernels-community/evil")),
                   "attn_implementation 'kernels-community/evil' is not one of"),
    "remote_code": (lambda d: edit_manifest(d, lambda m: m["config"].update(auto_map={"AutoConfig": "x.Y"})),
                    "config.auto_map names remote code"),
    "forged_graph": (lambda d: forge(d, "graph.json", (d / "graph.json").read_bytes().replace(b'"dim": -1', b'"dim": 0')
                                     if b'"dim": -1' in (d / "graph.json").read_bytes() else
                                     (d / "graph.json").read_bytes().replace(b"torch.topk", b"torch.sort")),
                     "graph.json is not the graph its manifest's config and options compile to"),
}


def _config(**fields) -> object:
    return lambda d: edit_manifest(d, lambda m: m["config"].update(fields))


def _raw_manifest(d: Path, text: str) -> None:
    """A manifest as text: what a forger writes when json.dumps would not (1e400)."""
    (d / "manifest.json").write_text(text)


# A stranger's config and manifest, re-signed: each costs time or memory before any check unless
# refused first (issue 20: num_labels 10**9 cost 3 GiB and 22 s, 512 layers 120 s of compiling).
COSTLY = {
    "num_labels": (_config(num_labels=10**9), "config.num_labels is 1000000000, expected 0 to 65536"),
    "deep": (_config(num_hidden_layers=512), "config.num_hidden_layers is 512, expected an integer from 1 to 192"),
    "layers_without_layouts": (_config(num_hidden_layers=40), "config.num_hidden_layers is 40 for 4 MoE layer layouts"),
    "zero_heads": (_config(num_attention_heads=0), "config.num_attention_heads is 0, expected an integer from 1"),
    "wrong_type": (_config(hidden_act=5), "config does not make a 'mixtral' config (Validation error for field"),
    "vast_vocabulary": (_config(vocab_size=2**30), "config.vocab_size is 1073741824, expected an integer from 1"),
    "huge_number": (_config(max_position_embeddings=10**40), "config.max_position_embeddings is 1000000000000000"),
    "infinite_rope": (lambda d: _raw_manifest(d, (d / "manifest.json").read_text().replace(
        '"rope_theta": 1000000.0', '"rope_theta": 1e400')), "holds the non-finite number 1e400"),
    "nan": (lambda d: _raw_manifest(d, (d / "manifest.json").read_text().replace(
        '"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')), "holds the non-finite number NaN"),
    "huge_manifest": (lambda d: _raw_manifest(d, '{"x": [' + "{}," * (40 * 2**20) + "{}]}"),
                      "bytes, more than the 1048576 a real model needs"),
    "beams": (lambda d: forge(d, "generation_config.json", json.dumps({"num_beams": 10**6}).encode()),
              "generation_config.json: num_beams is 1000000, expected an integer from 1 to 64"),
}


@pytest.mark.parametrize("case", sorted(COSTLY))
def test_load_refuses_a_costly_config_in_bounded_time_and_memory(case: str, copy_of: Path) -> None:
    import tracemalloc

    tamper, expected = COSTLY[case]
    tamper(copy_of)
    tracemalloc.start()
    start = time.monotonic()
    try:
        message = load_error(copy_of)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expected in message, message
    assert time.monotonic() - start < 20, f"took {time.monotonic() - start:.0f} s"
    assert peak < 256 * 2**20, f"Python allocated {peak >> 20} MiB before the error"


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_load_refuses_a_tampered_directory(case: str, copy_of: Path) -> None:
    tamper, expected = TAMPERING[case]
    tamper(copy_of)
    message = load_error(copy_of)
    assert expected in message, message


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


# --- killed compiles ---------------------------------------------------------------------------

_SLOW_COMPILE = """
import sys, time
from pathlib import Path
from expertflow.tools.make import artefact
from expertflow.tools.cli.compile import main

def slow(weights, layouts, tmp, progress):
    (tmp / "dense.safetensors").write_bytes(b"half")
    Path(sys.argv[1]).write_text(str(tmp))
    time.sleep(60)

artefact.write_weights = slow
sys.exit(main(sys.argv[2:]))
"""


def _start_slow_compile(mixtral_src: str, out: Path, ready: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMPILE, str(ready), mixtral_src, "-o", str(out), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    return proc


def test_sigterm_cleans_up_like_ctrl_c(mixtral_src: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = _start_slow_compile(mixtral_src, work / "out", tmp_path / "ready")
    assert Path((tmp_path / "ready").read_text()).exists()  # the partial directory is there now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read().strip() == "expertflow-compile: interrupted; nothing was written"
    assert list(work.iterdir()) == []


def test_a_killed_compile_is_cleaned_up_by_the_next(mixtral_src: str, tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = _start_slow_compile(mixtral_src, work / "out", tmp_path / "ready")
    partial = Path((tmp_path / "ready").read_text())
    proc.kill()  # SIGKILL: no handler runs, the partial directory stays
    proc.wait(timeout=60)
    assert partial.exists()
    assert main([mixtral_src, "-o", str(work / "out"), "--quiet", "--no-dumps"]) == 0
    err = capsys.readouterr().err
    assert f"removed {partial}, left by a compile that was killed" in err
    assert sorted(p.name for p in work.iterdir()) == ["out"]
