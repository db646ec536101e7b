"""Route-aware request scheduling: generate_many gives each prompt what it would get alone."""

from __future__ import annotations

import random

import pytest
import torch

from expertflow import runtime
from expertflow.ir import ops
from expertflow.runtime.generate.scheduler import distinct_experts, plan_batches

NAME = "tiny-trained-moe"
PROMPTS = ["def __init__(self", "The quick brown fox jumps over", "1, 2, 3, 4, 5,", "import os\nimport sys\n",
           "Return the number of", "x = 12345 + 678", "class Error(Exception):"]


@pytest.fixture(scope="module")
def model(compiled_dir):
    return runtime.load(compiled_dir(NAME), expert_cache=3)  # 3 of 32 experts: every step evicts


@pytest.fixture(scope="module")
def alone(model):
    tokenizer = runtime.load_tokenizer(model.directory)
    out = []
    for text in PROMPTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False)[0].tolist())
    return out


@pytest.mark.parametrize("schedule,batch_size,continuous",
                         [("route-aware", 3, None), ("route-aware", 8, False), ("fifo", 2, False), ("fifo", 2, None)])
def test_each_output_is_the_prompts_own(model, alone, schedule, batch_size, continuous):
    tokenizer = runtime.load_tokenizer(model.directory)
    ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    got = model.generate_many(ids, batch_size=batch_size, schedule=schedule, max_new_tokens=10, do_sample=False,
                              continuous=continuous)
    assert got == alone
    assert model.last_schedule.continuous == (continuous is None)
    batches = model.last_schedule.batches
    assert sorted(i for b in batches for i in b) == list(range(len(PROMPTS)))
    assert all(len(b) <= batch_size for b in batches)
    if schedule == "fifo":
        assert batches == [[0, 1], [2, 3], [4, 5], [6]]


def test_strings_in_text_out(model, alone):
    tokenizer = runtime.load_tokenizer(model.directory)
    got = model.generate_many(PROMPTS, batch_size=4, max_new_tokens=10, do_sample=False)
    want = [tokenizer.decode(a[len(tokenizer(p)["input_ids"]):], skip_special_tokens=True) for a, p in zip(alone, PROMPTS)]
    assert got == want


def test_route_aware_groups_alike_routes_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 32)[[0, 1, 2, 3]] * 5
    rng = random.Random(1)
    kinds = [rng.randrange(4) for _ in range(40)]
    est = torch.stack([centres[k] + 0.1 * torch.rand(32, generator=gen) for k in kinds])
    lengths = [10] * 40
    a = plan_batches(est, lengths, 5, "route-aware")
    assert a == plan_batches(est.clone(), list(lengths), 5, "route-aware")
    assert sorted(i for b in a for i in b) == list(range(40))
    for batch in a:  # a batch mixes kinds only when a kind has run out of members
        assert len({kinds[i] for i in batch}) <= 2
    sets = [{(0, int(torch.argmax(e)))} for e in est]
    fifo = plan_batches(est, lengths, 5, "fifo")
    assert sum(distinct_experts(sets, a)) < sum(distinct_experts(sets, fifo))


@pytest.mark.parametrize("prompts,batch_size,says", [
    ([], 2, "non-empty list of prompts"),
    ([[1, 2]], 0, "batch_size=0"),
    ([[1, 2]], 2.5, "batch_size=2.5"),
    ([[1, 2], "x", 3], 2, "prompt 2 is neither"),
])
def test_bad_requests_are_one_line(model, prompts, batch_size, says):
    with pytest.raises(ValueError, match=says) as err:
        model.generate_many(prompts, batch_size=batch_size, max_new_tokens=2)
    assert "\n" not in str(err.value)


def test_a_prompt_longer_than_the_context_is_refused(model):
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context of {limit}") as err:
        model.generate_many([[5] * 3, [5] * limit], batch_size=2, max_new_tokens=4)
    assert "prompt 1 has" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="schedule='random'"):
        model.generate_many([[5]], schedule="random")


@pytest.mark.parametrize("seed", range(5))
def test_permute_then_unpermute_is_the_identity(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(17, 6, generator=gen)
    perm = torch.randperm(17, generator=gen)
    torch.testing.assert_close(ops.unpermute(perm, x[perm]), x, rtol=0, atol=0)


def test_a_layer_in_waves_computes_each_wave_on_its_own_rows(compiled_dir, model_dir, hf_reference, monkeypatch,
                                                             tmp_path):
    """Prefill at 3 slots: each layer needs more experts than fit, so it computes in waves. The
    permute node orders the tokens by wave, so waves compute fewer rows in all than waves x tokens,
    and the logits stay Hugging Face's; without the node every wave computes every row."""
    from conftest import PROMPT_MASK, PROMPTS as IDS
    from expertflow.passes.options import CompileOptions
    from expertflow.runtime.generate.context import RuntimeContext
    from expertflow.tools.cli.compile import compile_model

    rows: list[int] = []
    run = RuntimeContext._run

    def counting(self, layer, hidden, index, weights, slots):
        rows.append(hidden.shape[0])
        return run(self, layer, hidden, index, weights, slots)

    monkeypatch.setattr(RuntimeContext, "_run", counting)
    _, logits, _ = hf_reference("tiny-mixtral")
    plain = compile_model(str(model_dir("tiny-mixtral")), tmp_path / "plain",
                          CompileOptions(permute=False), quiet=True, dumps=False)
    used = {}
    for name, path in (("permuted", compiled_dir("tiny-mixtral")), ("plain", plain)):
        model = runtime.load(path, expert_cache=3)
        rows.clear()
        torch.testing.assert_close(model(IDS, attention_mask=PROMPT_MASK).logits, logits)
        waves = model.stats()["total"]["waves"]
        assert waves > len(model.context.cache.layouts)  # some layer ran in more than one wave
        used[name] = (sum(rows), waves * IDS.numel())
    assert used["plain"][0] == used["plain"][1]
    assert used["permuted"][0] < used["permuted"][1]
