"""The disk tier (``runtime.load(dir, host_memory=...)`` on CPU): experts stay in the compiled
directory's file and are read into slots when asked, each read checked against its blob's digest.
Exact against transformers at every budget; the bytes read are the bytes the cache moved; a bad
blob is a one-line error where it is needed and never a wrong token; the file stays the one
loaded; nothing leaks."""

from __future__ import annotations

import gc
import blake3
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROMPT_MASK, PROMPTS, assert_matches_hf
from expertflow import runtime
from expertflow.runtime.cache.streams import Ticket
from expertflow.runtime.store.budget import kv_cache_bytes
from expertflow.runtime.store.disk import DiskStore
from expertflow.runtime.store.host import DIGESTS, HostStore, blob_key
from expertflow.runtime.store.digest import file_digest
from expertflow.runtime.store.manifest import LoadError, digest_of
from expertflow.tools.sim.prefetch_sim import from_log, replay

NAME = "tiny-mixtral"


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _blob_span(path: Path, layer: int, expert: int) -> tuple[int, int]:
    header = _header(path)
    base = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    start, end = header[blob_key(layer, expert)]["data_offsets"]
    return base + start, base + end


@pytest.mark.parametrize("budget", [2, "25%", 7])
def test_exact_at_every_host_budget(compiled_dir, hf_reference, budget):
    """Every budget from one layer's top-k (2) up gives transformers' logits and greedy tokens; what the cache
    moved is exactly what was read from the file, and nothing of the experts was read at load."""
    directory = compiled_dir(NAME)
    model = runtime.load(directory, host_memory=budget)
    store = model.context.cache.store
    assert isinstance(store, DiskStore) and store.stats.reads == 0  # load read headers only
    hf, _, _ = hf_reference(NAME)
    assert_matches_hf(model, hf, 6)
    stats = model.stats()
    assert stats["disk"]["bytes_read"] == stats["total"]["bytes_moved"] > 0
    blob = model.context.cache.layouts[0].blob_bytes  # one layout: every read is one blob
    assert stats["disk"]["bytes_read"] == stats["disk"]["reads"] * blob


def test_same_bytes_and_logits_as_the_memory_store_at_the_same_slots(compiled_dir):
    directory = compiled_dir(NAME)
    memory, disk = runtime.load(directory, expert_cache=3), runtime.load(directory, host_memory=3)
    torch.testing.assert_close(disk(PROMPTS, attention_mask=PROMPT_MASK).logits,
                               memory(PROMPTS, attention_mask=PROMPT_MASK).logits, rtol=0, atol=0)
    assert disk.stats()["total"]["bytes_moved"] == memory.stats()["total"]["bytes_moved"]
    assert disk.stats()["disk"]["bytes_read"] == disk.stats()["total"]["bytes_moved"]


def test_every_expert_fitting_is_read_once_at_load(compiled_dir, hf_reference):
    """A host tier that holds every expert reads each blob once at load (checked), into the slots:
    no second copy in an arena, and no read after."""
    model = runtime.load(compiled_dir(NAME), host_memory="100%")
    store = model.context.cache.store
    every = sum(lay.num_experts for lay in model.context.cache.layouts.values())
    assert isinstance(store, DiskStore) and store.stats.reads == every
    hf, _, _ = hf_reference(NAME)
    assert_matches_hf(model, hf, 4)
    assert store.stats.reads == every and model.stats()["total"]["misses"] == 0
    assert isinstance(runtime.load(compiled_dir(NAME), expert_cache="100%").context.cache.store, HostStore)


def test_one_total_memory_is_split_dense_kv_margin_then_slots(compiled_dir, hf_reference):
    """memory= a size: the dense weights, a KV cache and the margin come first, the host tier's
    slots get the rest (said by model.budget), the other experts stay on disk; exact tokens."""
    directory = compiled_dir(NAME)
    manifest = json.loads((directory / "manifest.json").read_text())
    probe = runtime.load(directory, host_memory=2)
    one = probe.context.cache.layouts[0].blob_bytes
    kv = kv_cache_bytes(probe.config, 1, probe.config.max_position_embeddings, 4)
    total = manifest["memory_plan"]["dense_bytes"] + kv + 256 * 2**20 + 3 * one + one // 2  # margin: 256 MiB
    model = runtime.load(directory, memory=f"{total}B")
    assert model.stats()["slots"] == 3 and isinstance(model.context.cache.store, DiskStore)
    said = model.budget.describe()
    assert said.startswith(f"memory='{total}B': 3 slots") and "the other 29 experts stay on disk" in said
    hf, _, _ = hf_reference(NAME)
    assert_matches_hf(model, hf, 4)


@pytest.mark.parametrize("kwargs,says", [
    ({"memory": "25%"}, "memory='25%': give the total for the host as a size"),
    ({"memory": "1MiB"}, "memory='1MiB': 1.0 MiB holds .* not one expert slot .* give a larger total"),
    ({"memory": "1GiB", "host_memory": 3}, "give one of expert_cache, host_memory and memory"),
    ({"host_memory": 1}, "host_memory=1 holds 1 expert slot.s., fewer than the 2 experts each token is routed to: "
                         "give at least 2 slots"),
])
def test_bad_memory_totals_are_one_line(compiled_dir, kwargs, says):
    with pytest.raises(LoadError, match=says) as err:
        runtime.load(compiled_dir(NAME), **kwargs)
    assert "\n" not in str(err.value)


def _copy(directory: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(directory, out)
    return out


def test_a_flipped_byte_is_caught_where_it_is_needed_and_never_computed(compiled_dir, tmp_path):
    """One byte of one blob flipped: load succeeds (it reads no blob); the step that needs that
    expert fails in one line naming layer, expert and file; the next call fails again instead of
    computing with the slot's bytes."""
    directory = _copy(compiled_dir(NAME), tmp_path)
    experts = directory / "experts.safetensors"
    start, _ = _blob_span(experts, 0, 0)
    data = bytearray(experts.read_bytes())
    data[start + 5] ^= 0x40
    experts.write_bytes(bytes(data))
    layouts = runtime.load(compiled_dir(NAME), expert_cache=1).context.cache.layouts
    every = sum(lay.num_experts for lay in layouts.values())
    model = runtime.load(directory, host_memory=every - 1)  # on disk: each expert read at its first use
    for _ in range(2):
        with pytest.raises(LoadError) as err:
            model(PROMPTS, attention_mask=PROMPT_MASK)
        message = str(err.value)
        assert "layer 0 expert 0 does not match its checksum" in message and str(experts) in message
        assert "\n" not in message


def test_a_truncated_file_is_refused_at_load(compiled_dir, tmp_path):
    directory = _copy(compiled_dir(NAME), tmp_path)
    experts = directory / "experts.safetensors"
    os.truncate(experts, experts.stat().st_size - 100)
    with pytest.raises(LoadError, match="inside the file") as err:
        runtime.load(directory, host_memory=3)
    assert "\n" not in str(err.value)


def test_a_file_replaced_while_loaded_is_not_the_one_read(compiled_dir, hf_reference, tmp_path):
    """The file is held open from load: a different file renamed over it changes nothing read."""
    directory = _copy(compiled_dir(NAME), tmp_path)
    model = runtime.load(directory, host_memory=2)
    experts = directory / "experts.safetensors"
    impostor = directory / "impostor"
    impostor.write_bytes(bytes(experts.stat().st_size))  # all zeros, the same size
    os.replace(impostor, experts)
    hf, _, _ = hf_reference(NAME)
    assert_matches_hf(model, hf, 4)


def test_digests_are_written_per_blob_and_required_for_the_disk_tier(compiled_dir, tmp_path):
    directory = compiled_dir(NAME)
    manifest = json.loads((directory / "manifest.json").read_text())
    table = load_file(directory / DIGESTS)
    experts = (directory / "experts.safetensors").read_bytes()
    start, end = _blob_span(directory / "experts.safetensors", 1, 3)
    assert bytes(table["blake3.layers.1"][3].tolist()) == blake3.blake3(experts[start:end]).digest()
    assert manifest["files"][DIGESTS] == file_digest(directory / DIGESTS)
    # a directory without them (an older compile) loads in memory, and refuses the disk tier in one line
    old = _copy(directory, tmp_path)
    manifest["files"].pop(DIGESTS)
    (old / DIGESTS).unlink()
    manifest["digest"] = digest_of(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    runtime.load(old, expert_cache=3)
    with pytest.raises(LoadError, match="no per-blob digests .* recompile it to stream experts from disk"):
        runtime.load(old, host_memory=3)


@pytest.mark.parametrize("kwargs,says", [
    ({"host_memory": 0}, "host_memory=0 holds no expert"),
    ({"host_memory": "2 bananas"}, "host_memory='2 bananas' is not a size"),
    ({"host_memory": 3, "expert_cache": 3}, "give one of expert_cache, host_memory and memory, not host_memory"),
])
def test_bad_host_budgets_are_one_line(compiled_dir, kwargs, says):
    with pytest.raises(LoadError, match=says) as err:
        runtime.load(compiled_dir(NAME), **kwargs)
    assert "\n" not in str(err.value)


def test_no_file_descriptor_or_thread_leaks(compiled_dir):
    """Loading, running and dropping models again and again leaves the process's open files and
    threads as they were (the file and the copy engine's worker end with their model)."""
    def counts() -> tuple[int, int]:
        gc.collect()
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    directory = compiled_dir(NAME)
    runtime.load(directory, host_memory=2)(PROMPTS, attention_mask=PROMPT_MASK)  # warm imports and caches
    before = counts()
    for _ in range(5):
        model = runtime.load(directory, host_memory=2)
        model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=3)
        del model
    assert counts() == before


def test_a_thousand_steps_leak_no_descriptor_or_thread(compiled_dir):
    """1,000 decode steps at the smallest tier (every step reads from disk, four readers): open
    files and threads stay as they were after the first call."""
    model = runtime.load(compiled_dir(NAME), host_memory=2)
    ids = torch.tensor([[5, 6, 7]])
    model.generate(ids, max_new_tokens=2, do_sample=False)
    gc.collect()
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(4):
        model.generate(ids, max_new_tokens=250, min_new_tokens=250, do_sample=False)
    gc.collect()
    assert (len(os.listdir("/proc/self/fd")), threading.active_count()) == (fds, threads)
    disk = model.stats()["disk"]
    assert disk["reads"] > 1000 and disk["direct"] == model.context.cache.store.stats.direct


def test_generate_cli_streams_from_disk_with_the_same_text(compiled_dir, capsys):
    """expertflow-generate --host-memory: the text --budget gives at the same slots, and --stats
    says what was read; with --budget too, one line and exit 2."""
    from expertflow.tools.cli.generate import main

    directory = str(compiled_dir(NAME))
    args = [directory, "hello there", "--max-new-tokens", "6", "--quiet"]
    assert main([*args, "--budget", "3"]) == 0
    from_memory = capsys.readouterr().out
    assert main([*args, "--host-memory", "3", "--stats"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == from_memory and "MiB read" in streamed.out + streamed.err
    assert main([*args, "--host-memory", "3", "--budget", "3"]) == 2
    err = capsys.readouterr().err
    assert "--host-memory and --budget both size the expert slots" in err and err.count("\n") == 1


@pytest.mark.parametrize("policy", ["layer_cycle", "lru"])
def test_the_simulator_counts_the_bytes_the_disk_tier_read(compiled_dir, policy):
    """The runtime's own requests, replayed by the simulator (the same cache model, with a clock),
    give the bytes the disk tier read within 2% (a queued prefetch cancelled before its read is
    the difference: the replay has no clock), and the same hits."""
    model = runtime.load(compiled_dir(NAME), host_memory=3, policy=policy, record_routing=True)
    model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=8)
    trace, issues = from_log(model.routing.log)
    blob = model.context.cache.layouts[0].blob_bytes
    got = replay(trace, issues, policy, 3, "cross_layer_gate", blob)
    stats = model.stats()
    read = stats["disk"]["bytes_read"] + stats["total"]["prefetch_cancelled"] * blob
    assert abs(got.bytes - read) <= 0.02 * got.bytes, (got.bytes, read)
    assert got.accesses == stats["total"]["hits"] + stats["total"]["misses"]
    assert abs(got.hits - stats["total"]["hits"]) <= 0.02 * got.accesses


def test_an_interrupt_while_a_read_is_awaited_leaves_the_next_call_exact(compiled_dir, hf_reference, monkeypatch):
    """Ctrl-C lands while the compute waits for a blob being read: the call stops, and the next
    one gives transformers' logits and tokens (nothing half-read is ever computed with)."""
    model = runtime.load(compiled_dir(NAME), host_memory=2)
    waits, real = [0], Ticket.wait

    def interrupted(ticket):
        waits[0] += 1
        if waits[0] == 7:
            raise KeyboardInterrupt
        real(ticket)

    monkeypatch.setattr(Ticket, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model(PROMPTS, attention_mask=PROMPT_MASK)
    monkeypatch.setattr(Ticket, "wait", real)
    hf, _, _ = hf_reference(NAME)
    assert_matches_hf(model, hf, 4)


def test_without_blake3_compile_writes_sha256_digests_that_the_loader_checks(tmp_path, monkeypatch, hf_reference):
    """An environment without the blake3 package (an image installed with --no-deps) compiles
    sha256 digests, named so; the disk tier checks them (exact tokens, a flipped byte caught)."""
    from expertflow.passes.options import CompileOptions
    from expertflow.runtime.store import digest
    from expertflow.tools.cli.compile import compile_model

    monkeypatch.setattr(digest, "blake3", None)
    out = compile_model(NAME, tmp_path / "c", CompileOptions(), dumps=False)
    monkeypatch.undo()
    assert set(load_file(out / DIGESTS)) == {f"sha256.layers.{layer}" for layer in range(4)}
    model = runtime.load(out, host_memory=2)
    assert model.context.cache.store.algorithm == "sha256"
    hf, _, _ = hf_reference(NAME)
    assert_matches_hf(model, hf, 3)
    experts = out / "experts.safetensors"
    start, _ = _blob_span(experts, 0, 0)
    with open(experts, "r+b") as f:
        f.seek(start + 9)
        byte = f.read(1)
        f.seek(start + 9)
        f.write(bytes([byte[0] ^ 1]))
    model = runtime.load(out, host_memory=31)  # as the blake3 test: layer 0 expert 0 is read at its first use
    with pytest.raises(LoadError, match="layer 0 expert 0 does not match its checksum"):
        model(PROMPTS, attention_mask=PROMPT_MASK)


def test_a_large_blob_is_read_in_chunks_and_a_prefetch_pauses_between_them(compiled_dir, monkeypatch):
    """Chunked reads: the bytes and the check are those of one read, and ``pause`` (a prefetch's)
    runs between chunks, never before the first."""
    from expertflow.runtime.store import disk

    model = runtime.load(compiled_dir(NAME), host_memory=2)
    store = model.context.cache.store
    blob = store.blob(0, 1)
    monkeypatch.setattr(disk, "CHUNK", 4 * 4096)
    chunks = -(-blob.nbytes // disk.CHUNK)
    pauses = []
    dst = torch.zeros(blob.nbytes + 4096, dtype=torch.uint8)[:blob.nbytes]
    store.read_into(blob, dst, lambda: pauses.append(1))
    whole = torch.zeros_like(dst)
    store.read_into(blob, whole)
    assert chunks > 2 and len(pauses) == chunks - 1 and torch.equal(dst, whole)


class _Gate:
    """A disk blob whose read waits for ``release``: a demand read under way."""

    nbytes = 8

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def read_into(self, dst, pause=None):
        self.started.set()
        assert self.release.wait(10)
        dst.fill_(2)


class _Chunked:
    """A prefetch read in four chunks, calling ``pause`` between them as DiskStore does."""

    nbytes = 8

    def __init__(self):
        self.done: list[int] = []

    def read_into(self, dst, pause=None):
        for i in range(4):
            if i and pause is not None:
                pause()
            self.done.append(i)
        dst.fill_(1)


def test_a_prefetch_read_gives_the_disk_to_a_demand_read():
    """With several readers, a demand read under way pauses every prefetch read at its next chunk
    boundary; the prefetch goes on once the demand read is over."""
    from expertflow.runtime.cache.streams import CopyEngine

    engine = CopyEngine(torch.device("cpu"), readers=3)
    gate, chunked = _Gate(), _Chunked()
    slots = torch.zeros(2, 8, dtype=torch.uint8)
    try:
        demand = engine.submit((0, 0), slots[0], gate, demand=True)
        assert gate.started.wait(10)
        prefetch = engine.submit((0, 1), slots[1], chunked)
        deadline = threading.Event()
        deadline.wait(0.3)  # the prefetch's worker has had time to read on, and must not have
        assert chunked.done == [0] and not prefetch.ready()
        gate.release.set()
        demand.wait()
        prefetch.wait()
        assert chunked.done == [0, 1, 2, 3] and slots.tolist() == [[2] * 8, [1] * 8]
    finally:
        gate.release.set()
        engine.close()
