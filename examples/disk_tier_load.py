"""Disk tier against the in-memory load on load-mixtral-8x7b-shaped (CPU): load time, decode time,
peak RSS and bytes read, each variant in its own process with the experts file dropped from the
page cache first. Usage: python examples/disk_tier_load.py [memory|disk BUDGET [COMPILED_DIR]]
(no arguments: compile the preset into ./compiled-mx8-shaped if needed, then run both at 25%)."""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("compiled-mx8-shaped")

def drop(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

def child(kind, budget):
    import torch
    from expertflow import runtime
    drop(OUT / "experts.safetensors")
    t = time.perf_counter()
    kw = {"expert_cache": budget} if kind == "memory" else {"host_memory": budget}
    m = runtime.load(OUT, **kw)
    load_s = time.perf_counter() - t
    ids = torch.tensor([[1, 5, 9, 200, 31, 7, 99, 1000]])
    m(ids)  # prefill + warm
    m.reset_stats()
    t = time.perf_counter()
    out = m.generate(ids, max_new_tokens=8, do_sample=False)
    dec = (time.perf_counter() - t) / 8
    s = m.stats()
    print(json.dumps({"kind": kind, "budget": budget, "slots": s["slots"], "load_s": round(load_s, 3),
                      "s_per_token": round(dec, 3), "bytes_moved": s["total"]["bytes_moved"],
                      "disk": s.get("disk"), "tokens": out[0, -8:].tolist(),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))

if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1], sys.argv[2]); sys.exit()
    if not (OUT / "manifest.json").exists():
        t = time.perf_counter()
        subprocess.run(["expertflow-compile", "load-mixtral-8x7b-shaped", "-o", str(OUT), "--quiet", "--no-dumps"], check=True)
        print("compile s", round(time.perf_counter() - t, 1))
    print("experts GiB", round((OUT / "experts.safetensors").stat().st_size / 2**30, 2))
    for kind in ("memory", "disk"):
        subprocess.run([sys.executable, __file__, kind, "25%", str(OUT)], check=True)
