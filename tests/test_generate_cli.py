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
from expertflow.runtime.manifest import digest_of
from expertflow.tools import artefact
from expertflow.tools.generate import main

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
    assert main(args + ["--stats"]) == 0  # the second run reuses the compiled copy
    out, err = capsys.readouterr()
    assert "compiling" not in err and list((tmp_path / "compiled").iterdir()) == compiled
    table = out.split("expert cache: 3 slots per pool\n")[1].splitlines()
    assert table[0].split() == ["layer", "hits", "misses", "hit", "rate", "precision", "recall", "waves", "MiB",
                                "moved", "stall", "ms"]
    assert [row.split()[0] for row in table[2:]] == ["0", "1", "2", "3", "-----", "total"]
    hits, misses = int(table[-1].split()[1]), int(table[-1].split()[2])
    assert hits + misses > 0


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
                   "--schedule"):
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
