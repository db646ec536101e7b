"""How fast on this machine, before anything is downloaded (``expertflow-simulate --predict``).

From a model's config alone (a local directory, a model in the Hugging Face cache, a preset or a
compiled directory) this builds the model on the meta device, so the expert blobs and the dense
weights have their real sizes and no weight is read; splits a memory total the way
``runtime.load(memory=...)`` does (``runtime/store/budget.auto_budget``: dense weights, KV cache
and margin first, the expert slots the rest, the other experts on disk); and probes this machine
once: the disk with direct reads of a scratch file, and decode compute with a matrix-vector
product in the model's dtype (a decode step reads each weight it uses once, so bytes/s of a
matvec is the rate at which a step's weights are consumed).

Per decoded token each MoE layer needs its top-k experts: ``accesses = layers * k``, of which a
share ``hit`` is in the host tier and the rest is read from disk. Without a routing trace ``hit``
is the share of experts the tier holds (uniform routing: a floor, since trained routers reuse
experts across neighbouring tokens); with ``--trace`` it is the layer-cycle replay's hit rate on
that trace. Each read is checked (its digest) on its reading thread, so a read costs the transfer
(one disk, shared) and the check (BLAKE3; both probed; a layer's reads are checked side by side on up to
as many cores as there are readers). The band runs from reads that never overlap compute (demand loading: compute +
reads) to reads fully hidden behind it (a perfect prefetcher: the larger of the two).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...ir.skeleton import build_skeleton
from ...passes.driver import is_experts_module
from ...runtime.assemble.derive import make_config
from ...runtime.store.budget import AutoBudget, all_slots, auto_budget, routed_per_token, size_text, slot_bytes
from ...runtime.store.direct import BLOCK, aligned, drop_cached, open_read
from ...runtime.store.disk import READERS
from ...runtime.store.digest import algorithm as digest_algorithm, blob_digest
from ...runtime.store.host import ExpertLayout
from ...runtime.store.manifest import LoadError, read_manifest
from ..presets import catalog
from ..shell import UserError


@dataclass(frozen=True)
class ModelShape:
    """What a config says of a model's weights: its MoE layers' expert layouts, the dense bytes,
    the bytes a decode step reads of them (no embedding table: a token reads one row), top-k."""

    layouts: dict[int, ExpertLayout]
    dense_bytes: int
    dense_read_bytes: int
    top_k: int
    dtype: torch.dtype
    config: Any

    @property
    def expert_bytes(self) -> int:
        return sum(lay.blob_bytes * lay.num_experts for lay in self.layouts.values())


def read_config(model: str) -> Any:
    """``model``'s config, reading nothing but config files (UserError when none can be found)."""
    from transformers import AutoConfig

    if catalog.is_random(model):
        return catalog.preset_config(model)
    path = catalog.shipped(model) if model in catalog.SHIPPED else Path(model).expanduser()
    try:
        if (path / "manifest.json").is_file():  # a compiled directory: the config it was compiled with
            return make_config(read_manifest(path), f"{path}/manifest.json")
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path)
        if path.exists():
            raise UserError(f"{model} has no config.json or manifest.json; pass a model directory, a compiled "
                            "directory, a cached hub id or a preset")
        if model.count("/") == 1 and not model.startswith((".", "/")):
            return AutoConfig.from_pretrained(model, local_files_only=True)
    except OSError:
        raise UserError(f"{model}'s config is not in the local Hugging Face cache and ExpertFlow never downloads; "
                        f"fetch only the config with `hf download {model} config.json`") from None
    except (LoadError, ValueError) as exc:
        raise UserError(f"{model}: {exc}") from None
    raise UserError(f"{model} does not exist; pass a model directory, a compiled directory, a cached hub id or a "
                    f"preset ({', '.join(catalog.names())})")


def model_shape(config: Any) -> ModelShape:
    """The model of ``config`` on the meta device, measured (UserError for a model with no experts)."""
    dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.bfloat16
    lm = build_skeleton(config, dtype)
    layouts, expert_params = {}, set()
    for path, module in lm.named_modules():
        if is_experts_module(module):
            layouts[len(layouts)] = ExpertLayout.for_module(len(layouts), path, module)
            expert_params |= {id(p) for p in module.parameters(recurse=False)}
    if not layouts:
        raise UserError(f"{type(lm).__name__} has no mixture-of-experts layers ExpertFlow can run")
    size = lambda p: p.numel() * p.element_size()
    dense = sum(size(p) for p in lm.parameters() if id(p) not in expert_params)
    embed = lm.get_input_embeddings()
    table = size(embed.weight) if embed is not None and embed.weight is not getattr(
        lm.get_output_embeddings(), "weight", None) else 0
    k = routed_per_token(config) or 1
    return ModelShape(layouts, dense, dense - table, k, dtype, config)


@dataclass(frozen=True)
class DiskProbe:
    gbps: float    # 1e9 bytes/s, one stream of ``chunk``-byte reads
    direct: bool   # False: the filesystem refused O_DIRECT, read buffered after dropping its pages
    nbytes: int


def probe_disk(directory: Path, nbytes: int, chunk: int) -> DiskProbe:
    """Writes ``nbytes`` of scratch to ``directory``, drops it from the page cache, reads it back
    in ``chunk``-byte reads (direct where allowed) and removes it."""
    chunk = max(BLOCK, chunk // BLOCK * BLOCK)
    nbytes = max(chunk, nbytes // chunk * chunk)
    fd, name = tempfile.mkstemp(prefix=".expertflow-probe-", dir=directory)
    try:
        block = os.urandom(min(chunk, 1 << 20))  # random: no filesystem compresses it away
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            drop_cached(f.fileno())
        rfd, direct = open_read(name)
        buf = aligned(chunk)
        try:
            start, got = time.perf_counter(), 0
            while got < nbytes:
                n = os.preadv(rfd, [buf], got)
                if n <= 0:
                    break
                got += n
            seconds = time.perf_counter() - start
        finally:
            os.close(rfd)
            buf.close()
    finally:
        os.unlink(name)
    return DiskProbe(got / max(seconds, 1e-9) / 1e9, direct, got)


def probe_decode(dtype: torch.dtype, nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Bytes of weights a one-token matrix-vector product consumes per second in ``dtype`` (the best of
    ``repeats``, after a warm-up): what a decode step's compute costs per weight byte here."""
    side = int(math.sqrt(nbytes / torch.empty((), dtype=dtype).element_size()))
    weight = torch.randn(side, side).to(dtype)
    x = torch.randn(1, side).to(dtype)
    linear = torch.nn.functional.linear  # as the model's layers compute: each output a contiguous row's dot
    linear(x, weight)  # warm-up: first-call dispatch and page faults
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return weight.numel() * weight.element_size() / best


def probe_check(nbytes: int = 64 * 2**20) -> float:
    """Bytes per second a blob's digest (``digest.blob_digest``, the algorithm compile writes here)
    checks: every blob read from disk is checked on the reading thread before it is used
    (``runtime/store/disk.py``), so a read costs its transfer and this."""
    data = os.urandom(nbytes)
    start = time.perf_counter()
    blob_digest(data, digest_algorithm())
    return nbytes / max(time.perf_counter() - start, 1e-9)


@dataclass(frozen=True)
class Forecast:
    shape: ModelShape
    tiers: AutoBudget
    disk: DiskProbe
    decode_bps: float
    check_bps: float  # the digest of what is read, on the reading thread
    hit: float
    hit_source: str

    @property
    def everything(self) -> bool:
        return self.tiers.slots >= all_slots(self.shape.layouts)

    def per_token(self) -> dict[str, float]:
        """Seconds per decoded token: compute, disk reads, and the band's two ends."""
        layers, k = len(self.shape.layouts), self.shape.top_k
        blob = max(lay.blob_bytes for lay in self.shape.layouts.values())
        compute = (self.shape.dense_read_bytes + layers * k * blob) / self.decode_bps
        misses = 0.0 if self.everything else layers * k * (1 - self.hit)
        # one disk shared by the reads in flight; their checks run side by side, a layer's misses
        # together, on as many cores as there are readers
        beside = max(1, min(k, READERS, os.cpu_count() or 1))
        read = misses * blob * (1 / (self.disk.gbps * 1e9) + 1 / (self.check_bps * beside))
        return {"compute_s": compute, "read_s": read, "misses": misses, "slow_s": compute + read,
                "fast_s": max(compute, read)}

    def to_json(self) -> dict[str, Any]:
        t = self.per_token()
        return {"slots": self.tiers.slots, "on_disk": self.tiers.on_disk, "slot_bytes": self.tiers.slot_bytes,
                "dense_bytes": self.shape.dense_bytes, "kv_bytes": self.tiers.kv, "margin_bytes": self.tiers.margin,
                "expert_bytes": self.shape.expert_bytes, "moe_layers": len(self.shape.layouts),
                "top_k": self.shape.top_k, "hit_rate": self.hit, "hit_source": self.hit_source,
                "disk_gbps": self.disk.gbps, "disk_direct": self.disk.direct, "decode_gbps": self.decode_bps / 1e9,
                "check_gbps": self.check_bps / 1e9,
                **t, "tokens_per_s_low": 1 / t["slow_s"], "tokens_per_s_high": 1 / t["fast_s"]}

    def render(self, model: str) -> str:
        j = self.to_json()
        how = "direct reads" if self.disk.direct else "buffered reads (this filesystem refused O_DIRECT)"
        tier = ("every expert fits: nothing is read from disk after load" if self.everything else
                f"host tier {j['slots']} slots ({size_text(j['slots'] * j['slot_bytes'])}), "
                f"{j['on_disk']} experts on disk")
        return "\n".join([
            (f"{model}: {j['moe_layers']} MoE layers, top-{j['top_k']}, experts {size_text(j['expert_bytes'])}, "
            f"dense weights {size_text(j['dense_bytes'])} ({self.shape.dtype})"),
            self.tiers.describe(),
            f"tiers: {tier}",
            (f"this machine: disk {j['disk_gbps']:.2f} GB/s ({how}, {size_text(self.disk.nbytes)} probed), "
            f"digest check {j['check_gbps']:.2f} GB/s, decode compute {j['decode_gbps']:.1f} GB/s of weights"),
            (f"hit rate {j['hit_rate']:.3f} ({self.hit_source}): {j['misses']:.1f} expert reads per token, "
            f"{1000 * j['read_s']:.1f} ms reading and {1000 * j['compute_s']:.1f} ms computing"),
            (f"decode: {j['tokens_per_s_low']:.2f} to {j['tokens_per_s_high']:.2f} tokens/s (reads never hidden .. "
            f"fully hidden behind compute)")])


def forecast_slots(shape: ModelShape, slots: int, given: str, disk: DiskProbe, rates: tuple[float, float],
                   hit: tuple[float, str] | None = None) -> Forecast:
    """The decode band of a host tier of ``slots`` (``host_memory=``, as slots), no memory split."""
    every = all_slots(shape.layouts)
    slots = min(slots, every)
    one = slot_bytes(shape.layouts)
    tiers = AutoBudget(slots, slots * one, shape.dense_bytes, 0, 0, one, f"host_memory={given!r}", every - slots)
    if hit is None:
        hit = (slots / every, "uniform routing: the share of experts held, a floor")
    return Forecast(shape, tiers, disk, rates[0], rates[1], hit[0], hit[1])


def forecast(shape: ModelShape, memory: int, given: str, disk: DiskProbe, rates: tuple[float, float], context: int,
             hit: tuple[float, str] | None = None) -> Forecast:
    """The tiers ``memory`` bytes buy (as ``runtime.load(memory=...)`` splits them) and the decode band;
    ``rates``: bytes/s of decode compute and of the blob check."""
    try:
        tiers = auto_budget(shape.layouts, memory, shape.dense_bytes, shape.config, 1, context, shape.dtype,
                            f"memory={given!r}")
    except LoadError as exc:
        raise UserError(str(exc)) from None
    every = all_slots(shape.layouts)
    tiers = AutoBudget(**{**tiers.__dict__, "on_disk": every - tiers.slots})
    if hit is None:
        hit = (tiers.slots / every, "uniform routing: the share of experts held, a floor")
    return Forecast(shape, tiers, disk, rates[0], rates[1], hit[0], hit[1])
