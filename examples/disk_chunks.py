"""Disk tier: decode time against the read chunk size (``runtime/store/disk.py`` ``CHUNK``).

Each measurement runs in its own process: the compiled directory's files are dropped from the
page cache, the model is loaded with ``host_memory`` (25% by default) and a predictor, a 2-token
warm-up runs, then ``--tokens`` greedy tokens are timed. Rows: chunk sizes; columns: predictors;
``--rounds`` alternating rounds, so a slow moment of the disk falls on every row alike.

    python examples/disk_chunks.py COMPILED --chunks 32,128,512 --predictors none,cross_layer_gate
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(compiled: Path, predictor: str, chunk_mib: int, host_memory: str, tokens: int) -> float:
    import torch

    from expertflow import runtime
    from expertflow.runtime.store import disk
    from expertflow.tools.cli.bench_disk import drop_files

    disk.CHUNK = chunk_mib * 2**20
    drop_files(compiled)
    model = runtime.load(compiled, host_memory=host_memory, predictor=predictor,
                         policy="lru" if predictor == "none" else None)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compiled", type=Path, help="a compiled directory (with per-blob digests)")
    p.add_argument("--chunks", default="32,128,512", help="chunk sizes in MiB, comma-separated")
    p.add_argument("--predictors", default="none,cross_layer_gate", help="predictors, comma-separated "
                   "(none runs with the LRU policy: on-demand loading)")
    p.add_argument("--host-memory", default="25%", help="the host tier (default 25%%)")
    p.add_argument("--tokens", type=int, default=9, help="greedy tokens timed (default 9)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--one", nargs=2, metavar=("PREDICTOR", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.compiled, args.one[0], int(args.one[1]), args.host_memory, args.tokens)))
        return
    chunks = [int(c) for c in args.chunks.split(",")]
    predictors = args.predictors.split(",")
    seconds: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for chunk in chunks:
            for predictor in predictors:
                out = subprocess.run([sys.executable, __file__, str(args.compiled), "--one", predictor, str(chunk),
                                      "--host-memory", args.host_memory, "--tokens", str(args.tokens)],
                                     check=True, capture_output=True, text=True).stdout
                seconds.setdefault((chunk, predictor), []).append(json.loads(out.splitlines()[-1]))
    print(f"seconds for {args.tokens} tokens, host_memory {args.host_memory}, {args.rounds} rounds")
    print("| chunk | " + " | ".join(predictors) + " |\n|---|" + "---|" * len(predictors))
    for chunk in chunks:
        print(f"| {chunk} MiB | " + " | ".join(" / ".join(f"{s:.2f}" for s in seconds[(chunk, p)])
                                               for p in predictors) + " |")


if __name__ == "__main__":
    main()
