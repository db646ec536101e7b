"""Every transformers MoE architecture, found by the experts interface, end to end at tiny size.

The sweep is derived from the installed transformers when the tests are collected: every model
type whose modeling code uses ``use_experts_implementation`` and that has an
``AutoModelForCausalLM`` class. Each is built at tiny size by ``tools/presets/tiny_config`` (seeded
random weights), saved with ``save_pretrained``, compiled, loaded at 1 slot and with every
expert resident, and compared with transformers' ``from_pretrained`` of the same directory:
the logits of the padded two-prompt batch, the logits of every cached decode step along HF's
greedy tokens, and 16 greedy tokens.

:data:`EXPECTED_FAILURES` lists the architectures ExpertFlow refuses, each with the module its
TraceFailure must name and why; compiling them must fail exactly so. Every other architecture
must pass. So a transformers upgrade that adds an architecture, or an ExpertFlow change that
makes one pass or fail, shows up here as a failing test to act on (add it to the table, or
remove it from the table).

``python tests/test_sweep.py`` prints the table of architectures and their status.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import transformers
from packaging.version import Version
from conftest import PROMPT_MASK, PROMPTS

NEW_TOKENS = 16
BUDGETS = [1, None]  # the minimum, and every expert resident


class Refusal(NamedTuple):
    module: str  # what TraceFailure.module must be
    says: str  # a phrase the message must contain
    reason: str  # for people: why ExpertFlow refuses it


#: Architectures ExpertFlow refuses, and where the refusal must point.
EXPECTED_FAILURES: dict[str, Refusal] = {
    # Empty: every architecture of transformers 5.17 to 5.25 whose experts ExpertFlow can call runs.
    # (qwen4_exp_text, the last one, keeps its indexer's position history on the cache object: the
    # graph carries it with ops.cache_state / extend_state / set_cache_state.)
}


@cache
def experts_architectures() -> dict[str, str]:
    """model_type -> causal-LM class name, for every model type whose modeling code uses the
    experts interface (``use_experts_implementation``) or builds the MoE block that ExpertFlow
    rewrites to it (``ir/input_scaled.DENSE_BLOCKS``: Llama 4)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from expertflow.ir.input_scaled import DENSE_BLOCKS

    rewritten = {cls.__module__.rpartition(".")[0] for cls in DENSE_BLOCKS}
    found = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if not isinstance(class_name, str):
            continue
        spec = importlib.util.find_spec(f"transformers.models.{model_type_to_module_name(model_type)}")
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(next(iter(spec.submodule_search_locations)))
        if spec.name in rewritten or \
                any("use_experts_implementation" in f.read_text(encoding="utf-8") for f in folder.glob("modeling_*.py")):
            found[model_type] = class_name
    return found


@cache
def aliases() -> dict[str, str]:
    """Model types whose causal-LM class belongs to another model type of the sweep (a composite
    config such as qwen3_5_moe whose causal LM is qwen3_5_moe_text's): tested as that one."""
    import transformers

    found = experts_architectures()
    out = {}
    for model_type, class_name in found.items():
        owner = getattr(getattr(transformers, class_name, None), "config_class", None)
        owner_type = getattr(owner, "model_type", model_type)
        if owner_type != model_type and owner_type in found:
            out[model_type] = owner_type
    return out


def expected_to_pass() -> list[str]:
    return [t for t in experts_architectures() if t not in EXPECTED_FAILURES and t not in aliases()]


def test_sweep_covers_the_interface() -> None:
    found = experts_architectures()
    assert len(found) >= 30, f"only {len(found)} architectures use the experts interface: is discovery broken?"
    stale = sorted(set(EXPECTED_FAILURES) - set(found))
    # The table was written against transformers 5.23; older releases lack some of its models.
    if Version(transformers.__version__) >= Version("5.23"):
        assert not stale, f"EXPECTED_FAILURES names architectures this transformers does not have: {stale}"
    assert {"mixtral", "qwen3_moe", "deepseek_v3"} <= set(expected_to_pass())


# Refused architectures: a TraceFailure that names the module.

@pytest.mark.parametrize("model_type", sorted(EXPECTED_FAILURES))
def test_refused_with_the_module_named(model_type: str) -> None:
    from expertflow.ir.skeleton import build_skeleton
    from expertflow.passes.pipeline import compile_graph
    from expertflow.passes.trace import TraceFailure
    from expertflow.tools.presets.tiny_config import tiny_config

    if model_type not in experts_architectures():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    expected = EXPECTED_FAILURES[model_type]
    skeleton = build_skeleton(tiny_config(model_type), torch.float32)
    with pytest.raises(TraceFailure) as err:
        compile_graph(skeleton)
    assert err.value.module == expected.module, str(err.value)
    assert f"'{expected.module}'" in str(err.value), str(err.value)
    assert expected.says in str(err.value), str(err.value)


# Supported architectures: exact against transformers.

class Reference(NamedTuple):
    compiled: Path
    logits: torch.Tensor  # the padded prompt batch
    tokens: torch.Tensor  # greedy generation, prompts included
    steps: torch.Tensor  # last-position logits of the prefill and of every decode step along ``tokens``
    hf: Any  # transformers' model, for the sampling and beam-search comparisons


def stepwise_logits(forward: Any, cache: Any, tokens: torch.Tensor, mask: torch.Tensor,
                    prompt_len: int) -> torch.Tensor:
    """The prefill of the prompts, then one cached step per token of ``tokens``, as generate runs
    them; the last-position logits of each. ``forward(ids, attention_mask, position_ids, cache)``."""
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = [forward(tokens[:, :prompt_len], mask, position_ids, cache)[:, -1]]
    for t in range(prompt_len, tokens.shape[1] - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        out.append(forward(tokens[:, t:t + 1], mask, position_ids, cache)[:, -1])
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(model_type)``: the tiny model compiled, and transformers' outputs, once each."""
    made: dict[str, Reference] = {}

    def make(model_type: str) -> Reference:
        if model_type not in made:
            from transformers import AutoModelForCausalLM

            from expertflow.ir.hf_compat import cache_keyword_of, new_cache

            from expertflow.passes.options import CompileOptions
            from expertflow.tools.cli.compile import compile_model
            from expertflow.tools.presets.tiny_config import build_tiny

            root = tmp_path_factory.mktemp(model_type)
            build_tiny(model_type, seed=0).save_pretrained(root / "hf")
            hf = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()

            def hf_forward(ids, mask, position_ids, cache):
                return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                          **{cache_keyword_of(type(hf).forward) or "past_key_values": cache}).logits

            with torch.no_grad():
                logits = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK).logits
                tokens = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS,
                                     do_sample=False)
                steps = stepwise_logits(hf_forward, new_cache(hf), tokens, PROMPT_MASK,
                                        PROMPTS.shape[1])
            compiled = compile_model(str(root / "hf"), root / "compiled", CompileOptions(), dumps=False, quiet=True)
            made[model_type] = Reference(compiled, logits, tokens, steps, hf)
        return made[model_type]

    return make


@pytest.mark.parametrize("budget", BUDGETS, ids=["1slot", "resident"])
@pytest.mark.parametrize("model_type", expected_to_pass())
def test_exact_against_transformers(model_type: str, budget: int | None, reference) -> None:
    from expertflow import runtime

    ref = reference(model_type)
    model = runtime.load(ref.compiled, expert_cache=budget)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, ref.logits, atol=1e-5, rtol=0)
    if budget == 1:  # the prefill alone needed more experts than the one slot: evictions happened
        stats = model.stats()
        assert stats["total"]["misses"] > 0 and max(s["needed"] for s in stats["layers"].values()) > 1, stats
    steps = stepwise_logits(lambda *a: model(*a).logits, model.new_cache(), ref.tokens, PROMPT_MASK, PROMPTS.shape[1])
    torch.testing.assert_close(steps, ref.steps, atol=1e-5, rtol=0)
    tokens = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW_TOKENS)
    assert torch.equal(tokens, ref.tokens), f"{model_type} at {budget} slots:\n{tokens}\nHF:\n{ref.tokens}"


#: transformers' generation modes besides greedy, each run on both models from the same seed.
MODES = {"sample": dict(do_sample=True, temperature=0.8, top_k=20), "beam2": dict(do_sample=False, num_beams=2)}


@pytest.mark.parametrize("model_type", expected_to_pass())
def test_sampling_and_beam_search_match(model_type: str, reference) -> None:
    from expertflow import runtime

    ref = reference(model_type)
    model = runtime.load(ref.compiled, expert_cache=1)
    for mode, kwargs in MODES.items():
        outs = []
        for generate in (ref.hf.generate, model.generate):
            torch.manual_seed(7)
            outs.append(generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=8, **kwargs))
        assert torch.equal(outs[1], outs[0]), f"{model_type} {mode}:\n{outs[1]}\nHF:\n{outs[0]}"


@pytest.mark.parametrize("model_type", sorted(aliases()))
def test_alias_is_swept_as_its_text_model(model_type: str) -> None:
    target = aliases()[model_type]
    assert target in expected_to_pass() or target in EXPECTED_FAILURES


def _table() -> str:
    rows = []
    for model_type, class_name in sorted(experts_architectures().items()):
        if model_type in aliases():
            status = f"alias of {aliases()[model_type]} (same causal-LM class)"
        elif model_type in EXPECTED_FAILURES:
            refusal = EXPECTED_FAILURES[model_type]
            status = f"refused at '{refusal.module}': {refusal.reason}"
        else:
            status = "pass"
        rows.append(f"{model_type:20s} {class_name:34s} {status}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())
