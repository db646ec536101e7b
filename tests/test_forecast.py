"""expertflow-simulate --predict: tiers and a decode band from a config alone, before a download.

The split is the one runtime.load(memory=...) makes on the compiled model (same slots); the sizes
are the compiled model's own; the disk probe really writes, reads and removes its scratch file;
a routing trace replaces the default curve with a replay's hit rate; bad input is one line."""

from __future__ import annotations

import json
import re

import pytest

from conftest import PROMPT_MASK, PROMPTS
from expertflow import runtime
from expertflow.runtime.store.budget import kv_cache_bytes
from expertflow.tools.cli.simulate import main
from expertflow.tools.sim.cache_sim import simulate
from expertflow.tools.sim.forecast import model_shape, probe_disk, read_config
from expertflow.tools.sim.trace_file import parse_trace

NAME = "tiny-mixtral"


def _predict(capsys, *args: str) -> dict:
    assert main(["--predict", *args, "--disk-bandwidth", "2", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("source", ["preset", "model_dir", "compiled"])
def test_the_forecast_splits_memory_as_the_runtime_does(compiled_dir, model_dir, capsys, source):
    """From the preset's name, its saved directory or the compiled one: the slots, the experts on
    disk and the sizes the compiled model has, and runtime.load(memory=) takes the same slots."""
    directory = compiled_dir(NAME)
    manifest = json.loads((directory / "manifest.json").read_text())
    plan = manifest["memory_plan"]
    model = runtime.load(directory, host_memory=2)
    one = model.context.cache.layouts[0].blob_bytes
    kv = kv_cache_bytes(model.config, 1, 512, 4)
    memory = f"{plan['dense_bytes'] + kv + 256 * 2**20 + 5 * one + one // 2}B"  # the margin: 256 MiB
    said = _predict(capsys, {"preset": NAME, "model_dir": str(model_dir(NAME)), "compiled": str(directory)}[source],
                    "--memory", memory)
    # dense: the parameters (the compiled file adds buffers and its header, padded to a 4 KiB block)
    assert said["dense_bytes"] == pytest.approx(plan["dense_bytes"], rel=0.01, abs=8192)
    assert said["expert_bytes"] == plan["expert_bytes_total"]
    assert (said["moe_layers"], said["top_k"], said["slot_bytes"]) == (4, 2, one)
    loaded = runtime.load(directory, memory=memory)
    assert said["slots"] == loaded.stats()["slots"] == 5 and said["on_disk"] == 32 - 5
    assert said["hit_rate"] == pytest.approx(5 / 32)
    assert 0 < said["tokens_per_s_low"] <= said["tokens_per_s_high"]
    assert said["slow_s"] == pytest.approx(said["compute_s"] + said["read_s"])


def test_every_expert_fitting_reads_nothing(capsys):
    said = _predict(capsys, NAME, "--memory", "1GiB")
    assert said["on_disk"] == 0 and said["read_s"] == 0 and said["tokens_per_s_low"] == said["tokens_per_s_high"]


def test_the_disk_probe_reads_what_it_wrote_and_leaves_nothing(tmp_path):
    probe = probe_disk(tmp_path, 3 * 2**20, 2**20)
    assert probe.nbytes == 3 * 2**20 and probe.gbps > 0
    assert list(tmp_path.iterdir()) == []


def test_a_routing_trace_gives_the_hit_rate_of_its_replay(compiled_dir, capsys, tmp_path):
    model = runtime.load(compiled_dir(NAME), expert_cache=4, record_routing=True)
    model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=6)
    trace = tmp_path / "routes.jsonl"
    model.routing.write_jsonl(trace)
    plan = json.loads((compiled_dir(NAME) / "manifest.json").read_text())["memory_plan"]
    one = model.context.cache.layouts[0].blob_bytes
    memory = f"{plan['dense_bytes'] + kv_cache_bytes(model.config, 1, 512, 4) + 256 * 2**20 + 6 * one + one // 2}B"
    said = _predict(capsys, NAME, "--memory", memory, "--trace", str(trace))
    replay = simulate(parse_trace(trace, 8), "layer_cycle", 6)
    assert said["hit_rate"] == replay.hit_rate != 6 / 32 and "replay of routes.jsonl" in said["hit_source"]


def test_the_probe_directory_is_where_the_scratch_goes(tmp_path, capsys):
    assert main(["--predict", NAME, "--memory", "300MiB", "--probe-dir", str(tmp_path), "--probe-mib", "2"]) == 0
    out = capsys.readouterr().out
    assert "2.0 MiB probed" in out and "tokens/s" in out and list(tmp_path.iterdir()) == []


def test_a_config_is_read_without_weights(model_dir):
    directory = model_dir(NAME)
    (directory / "model.safetensors").rename(directory / "elsewhere")  # no weights: the config is enough
    try:
        assert len(model_shape(read_config(str(directory))).layouts) == 4
    finally:
        (directory / "elsewhere").rename(directory / "model.safetensors")


@pytest.mark.parametrize("args,says", [
    ([NAME], "--predict needs --memory SIZE"),
    ([NAME, "--memory", "25%"], "--memory 25%: give a size such as 12GiB"),
    ([NAME, "--memory", "1MiB", "--disk-bandwidth", "1"], "--memory 1MiB: 1.0 MiB holds .* give a larger total"),
    (["no-such-org/no-such-model", "--memory", "1GiB", "--disk-bandwidth", "1"],
     "not in the local Hugging Face cache .*`hf download no-such-org/no-such-model config.json`"),
    (["./nowhere", "--memory", "1GiB", "--disk-bandwidth", "1"], "./nowhere does not exist"),
    ([NAME, "--memory", "1GiB", "--cache", "4"], "--predict goes alone"),
])
def test_bad_input_is_one_line(capsys, args, says):
    assert main(["--predict", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(says, err), err
