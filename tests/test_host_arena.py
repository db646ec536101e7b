"""The host store keeps every expert in one arena: exact bytes, one read, checked before use."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from expertflow import runtime
from expertflow.runtime.store import arena as arena_mod
from expertflow.runtime.store import manifest as manifest_mod
from expertflow.runtime.assemble.loader import _layouts
from expertflow.runtime.store.digest import file_digest
from expertflow.runtime.store.manifest import LoadError, read_manifest
from expertflow.runtime.store.host import HostStore

NAME = "tiny-trained-moe"


def _store(directory, **kw) -> HostStore:
    manifest = read_manifest(directory)
    return HostStore(directory / "experts.safetensors", _layouts(manifest, "m"), **kw)


def test_one_page_aligned_arena_of_exactly_the_expert_bytes(compiled_dir):
    directory = compiled_dir(NAME)
    store = _store(directory, digest=file_digest(directory / "experts.safetensors"))
    plan = read_manifest(directory)["memory_plan"]
    arena = store.arena.data
    assert store.nbytes == plan["expert_bytes_total"]
    assert arena.numel() <= 1.05 * plan["expert_bytes_total"]
    assert arena.data_ptr() % 4096 == 0 and not store.arena.pinned  # pinned only on CUDA
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    for key, blob in store.blobs.items():  # views into the arena, not copies
        assert lo <= blob.data_ptr() and blob.data_ptr() + blob.numel() <= hi, key
    layer = min(_layouts(read_manifest(directory), "m"))
    assert torch.equal(store.blob(layer, 1), store.blobs[f"layers.{layer}.experts.1"])


def test_the_experts_are_read_once(compiled_dir, monkeypatch):
    hashed = []
    real = manifest_mod.file_digest
    monkeypatch.setattr(manifest_mod, "file_digest", lambda path, like=None: hashed.append(path.name) or real(path, like))
    reads = []
    real_fill = arena_mod._fill
    monkeypatch.setattr(arena_mod, "_fill", lambda *a: reads.append(a[0].name) or real_fill(*a))
    runtime.load(compiled_dir(NAME), expert_cache=4)
    assert "experts.safetensors" not in hashed and reads == ["experts.safetensors"]


def test_a_changed_expert_byte_fails_the_checksum_of_the_one_read(compiled_dir, tmp_path):
    directory = tmp_path / "c"
    shutil.copytree(compiled_dir(NAME), directory)
    path = directory / "experts.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="does not match its checksum"):
        runtime.load(directory, expert_cache=4)
    runtime.load(directory, expert_cache=4, verify=False)  # the layout itself is sound


def test_a_host_too_small_is_told_before_anything_is_allocated(compiled_dir, monkeypatch):
    monkeypatch.setattr(arena_mod, "available_host_bytes", lambda: 1_000_000)
    monkeypatch.setattr(arena_mod.mmap, "mmap", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(LoadError) as err:
        runtime.load(compiled_dir(NAME), expert_cache=4)
    message = str(err.value)
    assert "host memory" in message and "0.00 GiB is available" in message and "\n" not in message
    need = read_manifest(compiled_dir(NAME))["memory_plan"]["expert_bytes_total"]
    assert f"{need / 2**30:.2f} GiB" in message


def test_padding_beyond_the_blobs_is_refused(compiled_dir, tmp_path):
    source = compiled_dir(NAME) / "experts.safetensors"
    raw = source.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    shift = len(data) // 10  # 10% of unused bytes in front of every blob
    for key, info in header.items():
        if key != "__metadata__":
            info["data_offsets"] = [o + shift for o in info["data_offsets"]]
    blob = json.dumps(header).encode()
    path = tmp_path / "experts.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(shift) + data)
    with pytest.raises(LoadError, match="data section holds"):
        HostStore(path, _layouts(read_manifest(compiled_dir(NAME)), "m"))


def test_auto_budget_takes_what_free_memory_leaves(compiled_dir, monkeypatch):
    from expertflow.runtime.assemble import memory

    directory = compiled_dir(NAME)
    plan = read_manifest(directory)["memory_plan"]
    model = runtime.load(directory, expert_cache="auto")
    assert model.stats()["slots"] == plan["all_resident_slots"] and "expert_cache='auto'" in model.budget.describe()
    # a host with room for the experts' arena, the margin and exactly 5 slots beyond them
    margin = 256 * 2**20
    monkeypatch.setattr(memory, "available_host_bytes",
                        lambda: plan["expert_bytes_total"] + plan["dense_bytes"] + margin + 5 * plan["expert_blob_bytes"])
    model = runtime.load(directory, expert_cache="auto", max_context=1, batch_size=1)
    kv = model.budget.kv
    assert kv > 0 and model.stats()["slots"] == 5 - -(-kv // plan["expert_blob_bytes"])
    monkeypatch.setattr(memory, "available_host_bytes", lambda: plan["expert_bytes_total"])
    with pytest.raises(LoadError, match="not one expert slot"):
        runtime.load(directory, expert_cache="auto")
    with pytest.raises(LoadError, match="must be positive integers"):
        runtime.load(directory, expert_cache="auto", batch_size=0)


class _Driver:
    """CUDA's host registration as the driver keeps it: registering an address twice is error 712."""

    def __init__(self):
        self.registered: set[int] = set()
        self.calls: list[tuple[str, int]] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.calls.append(("register", pointer))
        if pointer in self.registered:
            return 712
        self.registered.add(pointer)
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:
        self.calls.append(("unregister", pointer))
        if pointer not in self.registered:
            return 1  # not registered
        self.registered.remove(pointer)
        return 0


def test_a_pinned_arena_is_unregistered_when_its_model_goes_so_a_reload_pins_again(compiled_dir, monkeypatch):
    """Issue 24's reload defect: the arena registered with CUDA was never unregistered, so the next
    load (often given the same address) failed with error 712. Dropping the store, or closing it,
    unregisters it, before its mapping is unmapped."""
    import gc

    driver = _Driver()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: driver)
    directory = compiled_dir(NAME)
    for _ in range(3):  # load, drop, load again: each registration succeeds
        store = _store(directory, pin=True)
        pointer = store.arena.data.data_ptr()
        assert store.arena.pinned and pointer in driver.registered
        del store
        gc.collect()
        assert pointer not in driver.registered and driver.calls[-1] == ("unregister", pointer)
    store = _store(directory, pin=True)
    store.close()
    store.close()  # once only
    assert [c for c, _ in driver.calls].count("unregister") == 4 and not driver.registered
