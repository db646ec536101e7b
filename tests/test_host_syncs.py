"""Host synchronisations in the hot path: one per MoE layer per step (the wait reads its routing
decision and every prefetch issued since in one transfer), none anywhere else in the cache."""

from __future__ import annotations

import contextlib

import pytest
import torch

from expertflow import runtime
from expertflow.runtime.cache.expert_cache import ExpertCache
from expertflow.runtime.generate.context import RuntimeContext
from expertflow.runtime.cache.device_state import SlotTable
from expertflow.runtime.cache.streams import CopyEngine

from conftest import PROMPT_MASK, PROMPTS


def syncs_per_step(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[int]:
    """Host reads the cache made in the prefill and in each of ``steps`` greedy decode steps."""
    cache, kv = model.context.cache, model.new_cache()
    counts, before = [], cache.host_syncs
    logits = model(ids, attention_mask=mask, cache=kv).logits
    for _ in range(steps + 1):
        counts.append(cache.host_syncs - before)
        before = cache.host_syncs
        if len(counts) > steps:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(logits[:, -1:].argmax(-1), attention_mask=mask, cache=kv).logits
    return counts


@pytest.mark.parametrize("predictor", ["cross_layer_gate", "none"])
@pytest.mark.parametrize("budget", [3, None])
def test_one_host_read_per_moe_layer_per_step(compiled_dir, predictor, budget):
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=budget, predictor=predictor)
    layers = len(model.context.cache.layouts)
    counts = syncs_per_step(model, PROMPTS, PROMPT_MASK, steps=4)
    assert counts == [layers] * 5, f"expected {layers} host reads per step, got {counts}"


def test_the_slot_table_reaches_the_device_once_per_change():
    table = SlotTable(4, torch.device("cpu"))
    table.set(2, 7)
    assert table.get(2) == 7 and table.on_device().tolist() == [-1, -1, 7, -1, -1]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def sync_mode(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _strict(fn):
    """``fn`` with any host synchronisation an error (CUDA's sync debug mode)."""
    def run(*args, **kwargs):
        with sync_mode("error"):
            return fn(*args, **kwargs)
    return run


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("budget", [3, None])
def test_no_host_sync_in_the_cache_but_the_routing_read(compiled_dir, monkeypatch, budget):
    """The cache's prefetch, wait, slot-table upload and release run with synchronisation as an
    error; only the one designated read (``ExpertCache._host_ids``) may synchronise. The experts
    function and attention are transformers' and are not held to this."""
    allowed = ExpertCache._host_ids

    def designated(self, tensors):
        with sync_mode("default"):
            return allowed(self, tensors)

    monkeypatch.setattr(ExpertCache, "_host_ids", designated)
    for cls, name in ((RuntimeContext, "prefetch"), (RuntimeContext, "wait"), (SlotTable, "on_device"),
                      (CopyEngine, "mark_read")):
        monkeypatch.setattr(cls, name, _strict(getattr(cls, name)))
    model = runtime.load(compiled_dir("tiny-mixtral"), device="cuda", expert_cache=budget)
    layers = len(model.context.cache.layouts)
    counts = syncs_per_step(model, PROMPTS.cuda(), PROMPT_MASK.cuda(), steps=8)
    assert counts == [layers] * 9
