"""expertflow-bench: runs end to end on a tiny preset and reports consistent cache numbers."""

from __future__ import annotations

import json

from expertflow.tools import bench


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
    assert "ratio" in capsys.readouterr().out


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
