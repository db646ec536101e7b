"""expertflow-generate: text in, text out; transformers' text for the same prompt; its errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertflow import runtime
from expertflow.runtime.store.manifest import digest_of
from expertflow.tools.make import artefact
from expertflow.tools.cli.generate import main

PROMPT = "Beautiful is better than"


def _hf_text(model_dir: Path, prompt: str, chat: bool = False, **kwargs) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tok(prompt, return_tensors="pt")
    out = hf.generate(**inputs, **kwargs)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generates_transformers_text_and_reuses_the_compile(model_dir, tmp_path, capsys):
    args = ["tiny-qwen3-moe", PROMPT, "--max-new-tokens", "12", "--cache-dir", str(tmp_path), "--budget", "3"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + _hf_text(model_dir("tiny-qwen3-moe"), PROMPT, max_new_tokens=12, do_sample=False) + "\n"
    assert "compiling tiny-qwen3-moe once into" in err and "seeded random weights" in err
    compiled = list((tmp_path / "compiled").iterdir())
    assert len(compiled) == 1 and (compiled[0] / "manifest.json").is_file()
    assert compiled[0].name.startswith("tiny-qwen3-moe-")
    assert main(args + ["--stats"]) == 0  # the second run reuses the compiled copy
    stdout, err = capsys.readouterr()
    assert stdout == out  # the statistics go to stderr: stdout is the text alone
    assert "compiling" not in err and list((tmp_path / "compiled").iterdir()) == compiled
    head, rest = err.split("expert cache: 3 slots (each holds one expert) in one pool shared by every MoE layer\n")
    table = rest.splitlines()
    assert table[0].split() == ["layer", "hits", "misses", "hit", "rate", "precision", "recall", "wasted",
                                "cancelled", "dropped", "split", "MiB", "moved", "stall", "ms"]
    assert [row.split()[0] for row in table[2:8]] == ["0", "1", "2", "3", "-----", "total"]
    for term in ("hit rate = hits / (hits + misses)", "recall: predicted experts the router chose / experts the "
                 "router chose", "dropped: predictions with no free slot", "split: steps needing more experts"):
        assert term in " ".join(" ".join(table[8:]).split())
    total = runtime.load(compiled[0], expert_cache=3)
    total.generate(**AutoTokenizer.from_pretrained(model_dir("tiny-qwen3-moe"))(PROMPT, return_tensors="pt"),
                   max_new_tokens=12, do_sample=False)
    want = total.stats()["total"]
    cells = table[7].split()
    assert [int(c) for c in cells[1:3] + cells[6:10]] == [
        want["hits"], want["misses"], want["prefetch_wasted"], want["prefetch_cancelled"], want["prefetch_dropped"],
        want["split_steps"]]
    # the prefill needs more than 3 experts in each of the 4 MoE layers; a decode step's top-k fits
    assert want["split_steps"] == 4 and want["waves"] > 12 * 4


def test_chat_and_sampling_on_a_compiled_directory(model_dir, compiled_dir, capsys):
    path = compiled_dir("tiny-mixtral")
    assert main([str(path), "Is flat better than nested?", "--chat", "--max-new-tokens", "8", "--quiet"]) == 0
    want = _hf_text(model_dir("tiny-mixtral"), "Is flat better than nested?", chat=True, max_new_tokens=8,
                    do_sample=False)
    assert capsys.readouterr().out == want + "\n"
    runs = []
    for _ in range(2):
        assert main([str(path), PROMPT, "--sample", "--seed", "5", "--temperature", "0.9", "--top-p", "0.9",
                     "--max-new-tokens", "8", "--quiet"]) == 0
        runs.append(capsys.readouterr().out)
    torch.manual_seed(5)
    sampled = _hf_text(model_dir("tiny-mixtral"), PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9,
                       top_p=0.9, top_k=50)
    assert runs[0] == runs[1] == PROMPT + sampled + "\n"


def _no_tokenizer(compiled: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bare"
    shutil.copytree(compiled, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in artefact.TEXT_FILES:
        (copy / name).unlink(missing_ok=True)
        manifest["files"].pop(name, None)
    manifest["digest"] = digest_of(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _tampered_tokenizer(compiled: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(compiled, copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"<s>"', '"<x>"'))
    return copy


@pytest.mark.parametrize("make, extra, expected", [
    (lambda c, t: "no-such-model", [], "no-such-model does not exist"),
    (lambda c, t: c, ["--budget", "lots"], "is not a size or a fraction"),
    (lambda c, t: c, ["--device", "banana"], "use 'cpu' or 'cuda'"),
    (_no_tokenizer, [], "has no tokenizer: its source model shipped none"),
    (_tampered_tokenizer, [], "tokenizer.json does not match its checksum"),
])
def test_bad_input_is_one_line(make, extra, expected, compiled_dir, tmp_path, capsys):
    path = make(compiled_dir("tiny-mixtral"), tmp_path)
    rc = main([str(path), PROMPT, "--max-new-tokens", "2", "--quiet", "--cache-dir", str(tmp_path / "c"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and expected in err, err
    assert err.startswith("expertflow-generate: error: ")


def test_load_tokenizer_refuses_a_tampered_file(compiled_dir, tmp_path):
    with pytest.raises(runtime.LoadError, match="tokenizer.json does not match its checksum"):
        runtime.load_tokenizer(_tampered_tokenizer(compiled_dir("tiny-mixtral"), tmp_path))


def test_a_prompts_file_gives_one_json_line_per_prompt_as_transformers(model_dir, compiled_dir, tmp_path, capsys):
    prompts = ["Beautiful is better than", "Flat is better\nthan nested.", "Errors should never", "Now is better"]
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join([json.dumps(prompts[0]), json.dumps({"prompt": prompts[1]}), "",
                               json.dumps(prompts[2]), json.dumps(prompts[3])]) + "\n")
    assert main([str(compiled_dir("tiny-mixtral")), "--prompts-file", str(file), "--batch-size", "3",
                 "--max-new-tokens", "6", "--budget", "3", "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = [_hf_text(model_dir("tiny-mixtral"), p, max_new_tokens=6, do_sample=False) for p in prompts]
    assert lines == [{"index": i, "prompt": p, "text": w} for i, (p, w) in enumerate(zip(prompts, want))]
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"prompt": 3}\n')
    (tmp_path / "blank.txt").write_text("\n \n")
    for name, says in (("bad.jsonl", "bad.jsonl, line 2: expected a non-empty JSON string"),
                       ("blank.txt", "holds no prompts: write one per line"), ("missing.txt", "cannot read it")):
        assert main([str(compiled_dir("tiny-mixtral")), "--prompts-file", str(tmp_path / name), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--max-new-tokens", "--budget", "--device", "--sample", "--temperature", "--top-k", "--top-p",
                   "--seed", "--chat", "--stats", "--cache-dir", "--quiet", "--prompts-file", "--batch-size",
                   "--schedule", "--repetition-penalty", "--stop", "--interactive", "--system", "--host-memory",
                   "--memory"):
        assert option in text


ROOT = Path(__file__).resolve().parents[1]


def test_readme_snippet_runs_when_pasted(compiled_dir, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    assert "expertflow-compile tiny-mixtral -o compiled/" in readme
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    shutil.copytree(compiled_dir("tiny-mixtral"), tmp_path / "compiled")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(eval(out[0])) == 2 and re.fullmatch(r"torch.Size\(\[2, \d+, 384\]\)", out[1]), out
    assert "'bytes_moved'" in out[2]


def test_example_names_its_directory_and_prints_text(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), "tiny-qwen3-moe", "--tokens", "6"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compiled tiny-qwen3-moe into compiled/tiny-qwen3-moe" in proc.stdout
    assert "seeded random weights" in proc.stdout and (tmp_path / "compiled/tiny-qwen3-moe/manifest.json").is_file()
    assert proc.stdout.count("new text: ") == 2 and "total" in proc.stdout
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), "tiny-qwen3-moe", "--budget",
                            "lots"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "is not a size" in again.stderr


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, model_dir) -> Path:
    """A dense Llama, with the tiny-mixtral preset's tokenizer."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    path = tmp_path_factory.mktemp("dense")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir("tiny-mixtral")).save_pretrained(path)
    return path


def test_models_it_cannot_run_are_refused_from_the_config_before_any_work(dense_dir, model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir("tiny-mixtral"), bare)
    for name in artefact.TEXT_FILES:
        (bare / name).unlink(missing_ok=True)
    capsys.readouterr()
    for source, says in ((dense_dir, f"cannot run {dense_dir}: LlamaForCausalLM has no MoE layer: no module uses "
                                     "transformers' experts interface"),
                         (bare, f"{bare} ships no tokenizer (tokenizer.json, tokenizer.model, spiece.model, "
                                "vocab.json, vocab.txt), so text cannot become tokens: save the model's tokenizer")):
        assert main([str(source), PROMPT, "--cache-dir", str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"expertflow-generate: error: {says}") and err.count("\n") == 1, err
        assert not (tmp_path / "cache").exists()  # nothing compiled, not even a cache directory


def test_errors_name_the_command_line_flags_and_a_long_run_is_warned(compiled_dir, capsys):
    path = str(compiled_dir("tiny-mixtral"))
    capsys.readouterr()
    assert main([path, PROMPT, "--budget", "0", "--quiet"]) == 2
    assert capsys.readouterr().err == ("expertflow-generate: error: --budget 0 holds no expert: the minimum is 1 "
                                       "slot\n")
    assert main([path, PROMPT, "--max-new-tokens", "505", "--budget", "all"]) == 0  # 9 prompt tokens: 514 > 512
    err = capsys.readouterr().err
    assert ("warning: 9 prompt tokens + --max-new-tokens 505 exceed the model's context of 512 positions; text "
            "past it is unreliable\n") in err
    assert main([path, PROMPT, "--max-new-tokens", "2", "--budget", "all"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_device_cuda_without_a_gpu_fails_with_the_arguments():
    """Before transformers is imported or anything compiled (it took 17 s, a compile, to say so)."""
    child = ("import sys; from expertflow.tools.cli.generate import main; rc = main(sys.argv[1:]); "
             "print('transformers' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", child, "tiny-trained-moe", "hi", "--device", "cuda", "--cache-dir",
                           "/nonexistent/never-made"], capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert proc.stdout == "False 2\n"
    assert proc.stderr == ("expertflow-generate: error: --device cuda but no CUDA GPU is available to torch; use "
                           "--device cpu\n")


def test_the_compile_cache_names_lists_cleans_and_sweeps_killed_runs(model_dir, tmp_path, monkeypatch, capsys):
    import transformers

    from expertflow.tools.cli import compile_cache

    shutil.copytree(model_dir("tiny-mixtral"), tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    killed = cache / "compiled" / f".my-model-0123456789ab.partial-{dead}-x1y2"
    killed.mkdir(parents=True)
    (killed / "experts.safetensors").write_bytes(b"half")
    args = ["./my-model", PROMPT, "--max-new-tokens", "2", "--cache-dir", str(cache)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"removed {killed}, left by a compile that was killed" in err and not killed.exists()
    (entry,) = (cache / "compiled").iterdir()
    assert re.fullmatch(r"my-model-[0-9a-f]{12}", entry.name)  # visible, readable: not ._my-model-...
    # the entry serves every transformers release: the loader derives the graph again under another one
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    assert compile_cache.fingerprint("./my-model", tmp_path / "my-model") == entry.name[-12:]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # undo() went back
    # an entry this installation's loader refuses (here: a graph.json it cannot read) is ours to
    # rebuild: the next run recompiles it in place and generates, it does not fail
    (entry / "graph.json").write_text("{}")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"recompiling ./my-model into {entry}: the entry does not load with this installation (" in err
    assert "graph.json" in err and [p.name for p in (cache / "compiled").iterdir()] == [entry.name]
    assert main(args) == 0 and "compiling" not in capsys.readouterr().err  # the rebuilt entry loads
    assert main(["--list-cache", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out.splitlines()
    size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    assert listing[1].split() == [f"{size / 2**20:.1f}", "MiB", json.loads((entry / "manifest.json").read_text())[
        "created"], "./my-model", str(entry)]
    assert listing[2].startswith(f"{size / 2**20:>6.1f} MiB in 1 entry")
    assert main(["--clean-cache", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"removed {entry}\n1 removed from {cache / 'compiled'}\n"
    assert list((cache / "compiled").iterdir()) == []
    assert main(["--list-cache", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"no compiled models in {cache / 'compiled'}\n"
    with pytest.raises(SystemExit) as exit_:
        main(["--list-cache", "tiny-mixtral"])
    assert exit_.value.code == 2


def test_the_copy_thread_is_joined_when_the_model_goes_and_at_exit(compiled_dir):
    import gc
    import threading

    path = compiled_dir("tiny-mixtral")
    model = runtime.load(path, expert_cache=4)
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    threads = model.context.cache.engine._threads
    assert threads and all(t.is_alive() for t in threads)
    del model
    gc.collect()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive() and thread not in threading.enumerate()
    child = ("import sys, torch; from expertflow import runtime; m = runtime.load(sys.argv[1], expert_cache='auto'); "
             "m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)")
    for _ in range(3):  # the abort was intermittent: it was seen once in 9 runs
        proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stderr) == (0, "")
