"""The expert-cache budget: how many slots a request (slots, bytes, a fraction) buys on a model."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .manifest import LoadError
from .host import ExpertLayout

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Budget:
    """An expert-cache request before it meets a model: so many slots, bytes, or percent of the
    experts; ``None`` everywhere is every expert resident. :meth:`read` parses what a caller
    wrote (once); :meth:`slots_on` resolves it to slots on a model's layouts."""

    slots: int | None = None
    nbytes: float | None = None
    percent: float | None = None
    auto: bool = False  # the largest that fits the device's free memory (``auto_budget``)
    given: int | str | None = None  # what the caller wrote, for messages
    what: str = "expert_cache"  # the argument it came as, for messages

    @classmethod
    def read(cls, budget: int | str | None, what: str = "expert_cache") -> "Budget":
        """Reads ``expert_cache`` (or the argument ``what`` names, ``host_memory``): an int of slots,
        a size like '4GiB', a fraction like '25%', None, 'all' or 'auto'; LoadError for what no
        model could take, so a CLI can refuse it before compiling."""
        if budget is None or budget == "all":
            return cls(given=budget, what=what)
        if budget == "auto":
            return cls(auto=True, given=budget, what=what)
        if isinstance(budget, bool) or not isinstance(budget, (int, str)):
            raise LoadError(f"{what}={budget!r}: give a slot count (int), a size like '4GiB', a fraction "
                            "like '25%', 'auto' or 'all'")
        if isinstance(budget, int):
            if budget < 1:
                raise LoadError(f"{what}={budget!r} holds no expert: the minimum is 1 slot")
            return cls(slots=budget, given=budget, what=what)
        text = budget.strip()
        if re.fullmatch(r"[0-9]+", text):  # a size without a unit is too easily a slot count
            raise LoadError(f"{what}={budget!r} is a string of digits: pass the int {int(text)} for "
                            f"{int(text)} slots, or a size with its unit ('{text}MiB')")
        number = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
        if percent := re.fullmatch(number + r"\s*%", text):
            share = float(percent.group(1))
            if not 0 < share <= 100:
                raise LoadError(f"{what}={budget!r}: a fraction must be above 0% and at most 100%")
            return cls(percent=share, given=budget, what=what)
        match = re.fullmatch(number + r"\s*([A-Za-z]*)", text)
        if not match or match.group(2).upper() not in _UNITS:
            raise LoadError(f"{what}={budget!r} is not a size or a fraction; write e.g. '512MiB', '4GiB' or '25%'")
        return cls(nbytes=float(match.group(1)) * _UNITS[match.group(2).upper()], given=budget, what=what)

    def slots_on(self, layouts: dict[int, ExpertLayout]) -> int:
        """Slots per pool this request buys on a model with ``layouts`` (at most every expert)."""
        everything, one = all_slots(layouts), slot_bytes(layouts)
        if self.auto:
            raise LoadError(f"{self.what}='auto' needs the device's free memory: pass it to runtime.load")
        if self.slots is not None:
            slots = self.slots
        elif self.percent is not None:
            slots = max(1, round(everything * self.percent / 100))
        elif self.nbytes is not None:
            slots = int(self.nbytes // one)
        else:
            return everything
        if slots < 1:
            raise LoadError(f"{self.what}={self.given!r} holds no expert: the minimum is 1 slot "
                            f"({one} bytes); all resident is {everything} slots")
        return min(slots, everything)


def slot_bytes(layouts: dict[int, ExpertLayout]) -> int:
    """What one slot costs: a slot in every pool (layers whose experts differ in layout have a pool each)."""
    return max(lay.blob_bytes for lay in layouts.values()) * len({lay.signature for lay in layouts.values()})


def all_slots(layouts: dict[int, ExpertLayout]) -> int:
    """Slots per pool that hold every expert: the largest pool's experts."""
    per_pool: dict[tuple, int] = {}
    for lay in layouts.values():
        per_pool[lay.signature] = per_pool.get(lay.signature, 0) + lay.num_experts
    return max(per_pool.values())


#: Config names of the experts each token is routed to (top-k), as transformers' configs spell it.
TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "experts_per_token",
               "top_k_experts")


def routed_per_token(config: object) -> int | None:
    """The most experts one token of any MoE layer is routed to (a per-layer list gives its
    largest), or None when the config names no top-k."""
    for name in TOP_K_NAMES:
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        ks = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        if ks:
            return max(ks)
    return None


def budget_argument(text: str) -> int | str:
    """A command line's ``--budget``: digits are a slot count, anything else goes to Budget.read."""
    return int(text) if text.strip().isdigit() else text


def size_text(n: int) -> str:
    """Bytes as people read them: GiB from one GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class AutoBudget:
    """What ``expert_cache='auto'`` (or a total ``memory=``) chose, and from what (bytes)."""

    slots: int
    free: int        # free memory on the device the slots live on, or the total given
    dense: int       # the dense weights that will live there too
    kv: int          # KV cache for the requested batch and context
    margin: int      # kept free for activations and the allocator
    slot_bytes: int  # one slot in every pool
    request: str = "expert_cache='auto'"  # what the caller asked, as they wrote it
    on_disk: int = 0  # slots' worth of experts left on disk (the rest of a model under memory=)

    def describe(self) -> str:
        gib = size_text
        source = "free" if self.request.endswith("'auto'") else "given"
        rest = f"; the other {self.on_disk} experts stay on disk, read when needed" if self.on_disk else ""
        return (f"{self.request}: {self.slots} slots ({gib(self.slots * self.slot_bytes)}) from {gib(self.free)} "
                f"{source}, less dense weights {gib(self.dense)}, KV cache {gib(self.kv)} and margin "
                f"{gib(self.margin)}{rest}")


def auto_budget(layouts: dict[int, ExpertLayout], free: int, dense: int, config: object, batch: int, context: int,
                dtype: torch.dtype, request: str = "expert_cache='auto'") -> AutoBudget:
    """The most slots (up to every expert) that fit ``free`` bytes after ``dense`` bytes of dense
    weights, a KV cache (``kv_cache_bytes``) of ``config`` for ``batch`` sequences of ``context``
    tokens in ``dtype``, and a margin of 10% (at least 256 MiB); LoadError when not even one does.
    The one rule from memory to slots: ``expert_cache='auto'`` (runtime.load, the device's free
    memory) and expertflow-bench's ``--gpu-memory`` (an amount given) both read it."""
    one, everything = slot_bytes(layouts), all_slots(layouts)
    kv = kv_cache_bytes(config, batch, context, dtype.itemsize)
    margin = max(free // 10, 256 * 2**20)
    room = free - dense - kv - margin
    slots = min(everything, room // one) if room > 0 else 0
    if slots < 1:
        raise LoadError(f"{request}: {size_text(free)} holds the dense weights "
                        f"({size_text(dense)}), KV cache ({size_text(kv)}) and margin but not one expert slot "
                        f"({one} bytes); " + ("give a larger total" if request.startswith("memory=") else
                                               "use a smaller batch or context, or a larger device"))
    return AutoBudget(int(slots), free, dense, kv, margin, one, request)


def kv_cache_bytes(config: object, batch: int, context: int, element_size: int) -> int:
    """Keys and values of every attention layer for ``batch`` sequences of ``context`` tokens (an
    upper bound: sliding-window layers are counted at full length)."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    if getattr(config, "kv_lora_rank", None):  # multi-head latent attention caches per-head K and V
        k = heads * (int(getattr(config, "qk_nope_head_dim", 0)) + int(getattr(config, "qk_rope_head_dim", 0)))
        v = heads * int(getattr(config, "v_head_dim", 0))
    else:
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or int(getattr(config, "hidden_size", 0)) // heads)
        k = v = kv_heads * head_dim
    return layers * batch * context * (k + v) * element_size
