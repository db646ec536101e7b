"""Host synchronisations in the hot path: one per MoE layer per step (the wait reads its routing
decision and every prefetch issued since in one transfer), none anywhere else in the cache."""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from expertflow import runtime
from expertflow.runtime.cache.expert_cache import ExpertCache
from expertflow.runtime.generate import inputs
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


#: Reads of a tensor's values: on a GPU each blocks the host until the device catches up.
_READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu"}
#: Functions whose output's size depends on values (a GPU reports it to the host): ``isin`` on a
#: large test set takes a ``_unique`` path that does.
_DATA_SIZED = {"nonzero", "argwhere", "isin", "unique", "unique_consecutive", "masked_select", "bincount"}
_PACKAGE = str(Path(runtime.__file__).parent.parent)
_RUNTIME = str(Path(runtime.__file__).parent)
_THIS = str(Path(__file__))


class SyncProbe(TorchFunctionMode):
    """Counts, on CPU, every call that would synchronise the host with a GPU: a read of a tensor
    that came from the device (the model's inputs, weights, caches, slots, and whatever is
    computed from them), by the file and function that made it. Tensors the probe saw made from
    host data alone (``torch.tensor(list)``, factories, and what is computed from those only) are
    host tensors: reading them costs nothing on a GPU either."""

    def __init__(self):
        super().__init__()
        self.host = WeakIdKeyDictionary()
        self.syncs: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = any(t not in self.host for t in tensors)
        name = getattr(func, "__name__", str(func))
        if device and self._syncs(name, args, kwargs):
            self.syncs[(name, self._origin())] += 1
        out = func(*args, **kwargs)
        if not device:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[t] = True
        return out

    @staticmethod
    def _syncs(name: str, args, kwargs) -> bool:
        if name in _READS or name in _DATA_SIZED:
            return True
        if name == "__getitem__":  # a boolean mask: the result's size is the mask's count
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:]))
        if name == "repeat_interleave":
            return "output_size" not in kwargs
        return False

    @staticmethod
    def _origin() -> str:
        for frame in reversed(traceback.extract_stack()):
            if "/torch/" not in frame.filename and frame.filename != _THIS:
                return f"{frame.filename}:{frame.name}"
        return "?"


@pytest.mark.parametrize("preset,predictor,budget", [
    ("tiny-mixtral", "cross_layer_gate", 3), ("tiny-mixtral", "cross_layer_gate", None),
    ("tiny-mixtral", "none", 3), ("tiny-mixtral", "none", None),
    ("tiny-qwen3-next", "none", 3),  # linear-attention layers count their tokens on the device
])
def test_the_runtime_reads_the_device_once_per_moe_layer(compiled_dir, monkeypatch, preset, predictor, budget):
    """Every host read a decode step makes, counted as a GPU would pay them: the runtime makes
    exactly one per MoE layer (the wait's designated read), none for input checks, waves,
    tables or cache lengths; transformers' own functions are not held to this. Budget 3 splits
    steps in waves."""
    model = runtime.load(compiled_dir(preset), expert_cache=budget, predictor=predictor)
    layers = len(model.context.cache.layouts)
    kv = model.new_cache()
    monkeypatch.setattr(inputs, "on_host", lambda t: False)  # the checks take their device path, as on a GPU
    with torch.no_grad():
        logits = model(PROMPTS, attention_mask=PROMPT_MASK, cache=kv).logits
        mask = PROMPT_MASK
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            probe = SyncProbe()
            with probe:
                logits = model(logits[:, -1:].argmax(-1), attention_mask=mask, cache=kv).logits
            ours = {k: n for k, n in probe.syncs.items() if k[1].startswith(_PACKAGE)}
            designated = ours.pop(("tolist", f"{_RUNTIME}/cache/expert_cache.py:_host_ids"), 0)
            assert designated == layers and not ours, f"host reads besides one per MoE layer: {ours}"
    assert (sum(s.split_steps for s in model.context.cache.stats.values()) > 0) == (budget is not None)


def test_the_sync_probe_sees_reads_of_device_values_only():
    """The probe above can fail: it counts int() and isin on a computed tensor, not on host data."""
    weights = torch.randn(4)
    probe = SyncProbe()
    with probe:
        top = weights.topk(2).indices
        int(top[0])
        torch.isin(top, top)
        int(torch.tensor([1, 2]).max())
        torch.tensor([3, 4]).tolist()
    assert sorted(name for name, _ in probe.syncs.elements()) == ["__int__", "isin"]


def test_ids_on_a_device_are_checked_there(compiled_dir, monkeypatch):
    """The device path of the input check (no host read): an id outside the vocabulary still
    stops the step with the message (on CPU the device assertion raises at once)."""
    model = runtime.load(compiled_dir("tiny-mixtral"))
    monkeypatch.setattr(inputs, "on_host", lambda t: False)
    with pytest.raises(RuntimeError, match=r"input_ids holds a token id outside this model's vocabulary"):
        model(torch.tensor([[1, model.config.vocab_size]]))
