"""expertflow-bench: runs end to end on a tiny preset and reports consistent cache numbers."""

from __future__ import annotations

import json

import pytest

from expertflow.tools.cli import bench


def test_bench_reports_consistent_numbers(tmp_path, compiled_dir, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["tiny-mixtral", "--compiled", str(compiled_dir("tiny-mixtral")), "--tokens", "4",
                     "--repeats", "1", "--budget", "25%", "--skip-compile-memory", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    stats = result["offload_stats"]
    assert result["offload_slots"] == round(result["all_slots"] * 0.25) == 8
    assert stats["hits"] + stats["misses"] == stats["needed"] > 0
    blob = 98304  # tiny-mixtral: gate_up (128x64) + down (64x128) float32, 64-byte aligned
    assert stats["bytes_moved"] % blob == 0 and stats["bytes_moved"] >= stats["misses"] * blob
    assert result["resident_over_hf"] == result["resident_s_per_token"] / result["hf_eager_s_per_token"]
    # the header's figures are the table's rows, in the table's unit: one measurement, never two
    rows = {row["name"]: row for row in result["rows"]}
    assert result["offload_run"] == "ExpertFlow cross_layer_gate, layer_cycle" == result["rows"][-1]["name"]
    assert rows[result["offload_run"]]["cache"] == stats
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    hf, resident = rows["HF eager, all resident"]["decode_tok_s"], rows["ExpertFlow, all resident"]["decode_tok_s"]
    assert header.startswith(f"decode tok/s: HF eager {hf:,.1f}, ExpertFlow all resident {resident:,.1f} ")
    assert f"| HF eager, all resident | {rows['HF eager, all resident']['prefill_tok_s']:,.1f} | {hf:,.1f} |" in out
    offload = rows[result["offload_run"]]["decode_tok_s"]
    assert f"ExpertFlow cross_layer_gate, layer_cycle: {offload:,.1f} decode tok/s" in out
    assert "s/token" not in out


def test_bench_bad_model_is_one_line_error(capsys):
    assert bench.main(["no-such-model-dir", "--skip-compile-memory"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("expertflow-bench: error:") and "\n" not in err


def test_bench_removes_its_own_compile_and_says_weights_are_random(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the bench's own compile goes
    rc = bench.main(["tiny-qwen3-moe", "--tokens", "2", "--repeats", "1", "--skip-compile-memory"])
    out = capsys.readouterr().out
    assert rc == 0 and "seeded random weights" in out
    assert not list(tmp_path.glob("expertflow-bench-*")), list(tmp_path.iterdir())


def test_bench_compares_every_way_of_running_on_the_same_budget(tmp_path, compiled_dir):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = bench.main(["tiny-mixtral", "--compiled", str(compiled_dir("tiny-mixtral")), "--gen-len", "3",
                     "--repeats", "1", "--budget", "6", "--skip-compile-memory", "--json", str(out),
                     "--markdown", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["HF eager, all resident", "ExpertFlow, all resident", "transformers + accelerate CPU offload",
                          "on-demand LRU (no prefetch)", "ExpertFlow cross_layer_gate, layer_cycle"]
    assert rows["transformers + accelerate CPU offload"]["skipped"]  # no GPU here: said why, not faked
    bandwidth = result["h2d_bytes_per_s"]
    for name in ("on-demand LRU (no prefetch)", "ExpertFlow cross_layer_gate, layer_cycle"):
        row = rows[name]
        assert row["slots"] == 6 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
        assert round(row["bytes_per_token"] * 3) % 98304 == 0  # whole experts moved in 3 decode steps
        # the bound is what the row's demand needed (moved less its wasted prefetches), not what it moved
        assert row["needed_per_token"] == (row["cache"]["bytes_moved"] - row["cache"]["bytes_wasted"]) / 3
        assert row["needed_per_token"] <= row["bytes_per_token"]
        assert row["bound_s_per_token"] == pytest.approx(row["needed_per_token"] / bandwidth)
        if row["bytes_per_token"]:
            assert row["over_bound"] == pytest.approx((1 / row["decode_tok_s"]) / row["bound_s_per_token"])
    table = md.read_text().splitlines()
    assert table[0].startswith("| run | prefill tok/s | decode tok/s |") and len(table) == 2 + 4 + 1
    assert table[-1] == "- transformers + accelerate CPU offload: not run (accelerate offloads to a GPU; this run is " \
                        "on the CPU)"


def test_bench_gpu_memory_picks_the_slots_that_fit(tmp_path, compiled_dir, capsys):
    out = tmp_path / "bench.json"
    args = ["tiny-mixtral", "--compiled", str(compiled_dir("tiny-mixtral")), "--gen-len", "2", "--repeats", "1",
            "--skip-compile-memory", "--json", str(out)]
    capsys.readouterr()  # the fixture's own compile output
    assert bench.main(args + ["--gpu-memory", "25%"]) == 2
    assert capsys.readouterr().err.strip() == ("expertflow-bench: error: --gpu-memory '25%' is not a size; give one "
                                               "such as '24GiB'")
    assert bench.main(args + ["--gpu-memory", "258MiB"]) == 0
    result = json.loads(out.read_text())
    # 258 MiB less a 256 MiB margin, the dense weights and the KV cache, in 98,304-byte slots
    assert 0 < result["offload_slots"] < result["all_slots"]


def test_bench_disk_tier_rows_each_in_a_process_give_the_same_tokens(tmp_path, compiled_dir, capsys):
    """--host-memory: every row (all in memory, accelerate's disk offload when installed, LRU, each
    predictor) in its own process gives the same greedy tokens; what each tier row read is what its
    cache moved, and the simulator's replay of its own requests moves the same bytes within 2%
    (the timed replay's are the row's prediction, shown beside them)."""
    out = tmp_path / "disk.json"
    assert bench.main(["tiny-mixtral", "--compiled", str(compiled_dir("tiny-mixtral")), "--host-memory", "25%",
                       "--tokens", "4", "--prompt-len", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["disk_tier"]
    rows = {row["name"]: row for row in result["rows"]}
    assert result["slots"] == 8 and list(rows)[0] == "ExpertFlow, every expert in memory"
    tier = [row for name, row in rows.items() if name.startswith(("on-demand", "ExpertFlow cross"))]
    assert len(tier) == 2 and all("error" not in row for row in tier), rows
    resident = rows["ExpertFlow, every expert in memory"]
    for row in tier:
        assert row["tokens"] == resident["tokens"] and row["slots"] == 8
        assert row["disk"]["bytes_read"] == row["bytes_moved"] > 0
        # the untimed replay never cancels a queued prefetch: the runtime's bytes and its cancelled ones
        replayed, moved = row["simulated"]["bytes_untimed"], row["bytes_moved"] + row["cancelled"] * 98304
        assert abs(replayed - moved) <= 0.02 * moved, (replayed, moved)
        assert row["bound_s_per_token"] > 0 and row["peak_rss"] > 0
    accelerate = rows["transformers + accelerate disk offload"]
    assert "error" in accelerate or accelerate["tokens"] == resident["tokens"]
    text = capsys.readouterr().out
    assert "| on-demand LRU (no prefetch) |" in text and "forecast (expertflow-simulate --predict)" in text


def test_bench_a_reference_that_does_not_fit_is_a_row_skipped_and_the_rest_run(tmp_path, compiled_dir,
                                                                                monkeypatch, capsys):
    """Rows run one model at a time; a model that fits only offloaded (HF eager out of memory here)
    still gets its offloaded rows, and the header and table say what did not fit."""
    from transformers import AutoModelForCausalLM

    def too_big(*args, **kwargs):
        raise MemoryError("CPU out of memory: tried to allocate 94.00 GiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", too_big)
    out = tmp_path / "bench.json"
    rc = bench.main(["tiny-mixtral", "--compiled", str(compiled_dir("tiny-mixtral")), "--gen-len", "2",
                     "--repeats", "1", "--budget", "6", "--skip-compile-memory", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["HF eager, all resident"]["skipped"] == ("does not fit in this device's memory (CPU out of memory: "
                                                         "tried to allocate 94.00 GiB)")
    assert rows["ExpertFlow cross_layer_gate, layer_cycle"]["decode_tok_s"] > 0
    assert result["hf_eager_s_per_token"] is None and result["resident_over_hf"] is None
    text = capsys.readouterr().out
    assert "decode tok/s: HF eager did not fit, ExpertFlow all resident" in text
    assert "- HF eager, all resident: not run (does not fit in this device's memory" in text


def test_bench_rows_each_see_only_their_own_model(compiled_dir, monkeypatch):
    """A row's model is dropped and collected before the next row loads: its peak is its own."""
    import gc
    import weakref

    import torch

    from expertflow import runtime
    from expertflow.tools.cli import bench_rows

    alive = []

    def load():
        model = runtime.load(compiled_dir("tiny-mixtral"))
        alive.append(weakref.ref(model))
        return model

    ids = torch.tensor([[5, 6, 7]])
    for _ in range(2):
        row = bench_rows.one_model_row("ExpertFlow", load, bench.ef_stepper, ids, 2, 1, torch.device("cpu"))
        assert row.decode_tok_s > 0
        assert all(ref() is None for ref in alive), "an earlier row's model is still alive"
    gc.collect()
