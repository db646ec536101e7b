"""Every routing option the swept architectures' config classes offer: compile -> load -> exact.

The sweep (``tests/test_sweep.py``) builds each architecture at its defaults; real checkpoints set
options the defaults leave off (DeepSeek-V2's group-limited routing, sigmoid scores, renormalised
top-k, a shared expert, dense layers between MoE layers). ``tools/presets/routing_options`` reads them
from each config class and the code that branches on them, not from a list of models. Each is
built at tiny size, saved, compiled (which runs the loader's own checks before the directory
appears), loaded at 1 slot and with every expert resident, and compared with transformers'
``from_pretrained`` of the same directory: the padded prompt batch's logits and greedy tokens.
Where transformers itself fails on an option, the test is skipped with transformers' error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS
from test_sweep import expected_to_pass

from expertflow.tools.presets.routing_options import Option, companions, routing_options

NEW_TOKENS = 4
#: Options ExpertFlow does not compile yet, each with what stops it (the compile refuses them, naming it).
KNOWN_GAPS: dict[str, str] = {}
OPTIONS = [pytest.param(option, marks=pytest.mark.xfail(reason=KNOWN_GAPS[option.id], strict=True))
           if option.id in KNOWN_GAPS else option
           for model_type in expected_to_pass() for option in routing_options(model_type)]


def test_options_are_found_in_the_config_classes() -> None:
    """The scan finds the options the issue names, in the models that offer them."""
    found = {(o.model_type, o.field, str(o.value)) for o in (getattr(p, "values", (p,))[0] for p in OPTIONS)}
    for expected in [("deepseek_v2", "topk_method", "group_limited_greedy"), ("qwen3_moe", "norm_topk_prob", "True"),
                     ("cohere2_moe", "expert_selection_fn", "sigmoid"), ("deepseek_v3", "first_k_dense_replace", "0")]:
        assert expected in found, f"{expected} missing from {sorted(found)[:20]}"
    assert companions("deepseek_v2") == {"n_group": 2, "topk_group": 1}


def _hf(option: Option, out: Path) -> tuple[Any, dict[str, Any]]:
    """transformers' model of ``option`` saved to ``out`` and its outputs, or a skip with its
    error: first with the option alone, then with the unset fields it may need."""
    from transformers import AutoModelForCausalLM

    from expertflow.tools.presets.tiny_config import build_tiny

    first = None
    for extra in ({}, companions(option.model_type)):
        overrides = {**extra, option.field: option.value}
        try:
            model = build_tiny(option.model_type, seed=0, **overrides)
        except Exception as exc:  # transformers' config or model refuses the setting
            first = first or _why(exc)
            continue
        assert getattr(model.config, option.field) == option.value, f"tiny_config dropped {option.id}"
        try:
            model.save_pretrained(out)
            hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
                tokens = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
            return (logits, tokens), overrides
        except Exception as exc:  # transformers' own failure on this setting: reported, not hidden
            first = first or _why(exc)
    pytest.skip(f"transformers fails on {option.id}: {first}")


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.id)
def test_option_compiles_loads_and_is_exact(option: Option, tmp_path: Path) -> None:
    from expertflow import runtime
    from expertflow.passes.options import CompileOptions
    from expertflow.tools.cli.compile import compile_model

    (logits, tokens), overrides = _hf(option, tmp_path / "hf")
    compiled = compile_model(str(tmp_path / "hf"), tmp_path / "compiled", CompileOptions(), dumps=False, quiet=True)
    for budget in (1, None):
        model = runtime.load(compiled, expert_cache=budget)
        where = f"{option.id} ({overrides}) at {budget} slots"
        torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, logits, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{where}: {m}")
        out = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS)
        assert torch.equal(out, tokens), f"{where}:\n{out}\nHF:\n{tokens}"


# What compiles loads: compile runs the loader's own checks on what it wrote.

def _group_limited() -> Any:
    from expertflow.tools.presets.tiny_config import build_tiny

    return build_tiny("deepseek_v2", seed=0, topk_method="group_limited_greedy", **companions("deepseek_v2"))


def test_a_graph_the_loader_refuses_is_a_compile_error_naming_the_node(tmp_path: Path, monkeypatch, capsys) -> None:
    """With the closed lists as they were before named-tuple fields (DeepSeek-V2's group-limited
    routing reads ``.max(dim=-1).values``), compiling fails naming the node, and leaves nothing."""
    from expertflow.ir import allowlist
    from expertflow.tools.cli import compile as cli

    _group_limited().save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(allowlist, "RETURN_FIELDS", {})
    capsys.readouterr()
    code = cli.main([str(tmp_path / "hf"), "-o", str(tmp_path / "compiled"), "--quiet", "--no-dumps"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the compiled directory would not load: graph.json is not a valid ExpertFlow graph" in err, err
    assert re.search(r"node 'getattr_\d+': getattr of \('values',\) from \(max_\d+,\)", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "a refused compile left files behind"


def test_named_tuple_fields_are_read_only_from_the_call_that_returns_them() -> None:
    """``getattr(x, "values")`` loads where x is torch's max/min/topk/sort, and nowhere else."""
    from expertflow.ir.serialize import GraphFormatError, graph_from_json, graph_to_json
    from expertflow.ir.skeleton import build_skeleton
    from expertflow.passes.driver import Driver
    from expertflow.passes.pipeline import compile_graph

    config = _group_limited().config
    stored = graph_to_json(compile_graph(build_skeleton(config, torch.float32))[0].graph)
    driver = Driver(build_skeleton(config, torch.float32))
    reads = [n for n in stored["nodes"] if n["target"] == "getattr" and n["args"]["tuple"][1] == "values"]
    assert reads, "the group-limited router no longer reads .values: this test tests nothing"
    graph_from_json(stored, driver)  # accepted as compiled
    for source in ("input_ids", "ef_ctx", reads[0]["name"]):
        reads[0]["args"]["tuple"][0] = {"node": source}
        if source == reads[0]["name"]:
            continue  # a node cannot read itself; fx refuses that on its own
        with pytest.raises(GraphFormatError, match=rf"node '{reads[0]['name']}': getattr of \('values',\)"):
            graph_from_json(stored, driver)
