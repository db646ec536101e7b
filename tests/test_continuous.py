"""Continuous batching: sequences that finish leave, waiting prompts join, outputs stay their own."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from expertflow import runtime

TEXTS = ["def __init__(self", "The quick brown fox jumps over", "1, 2, 3, 4, 5,", "import os\nimport sys\n",
         "Return the number of", "x = 12345 + 678", "class Error(Exception):"]
NEW = 12


def _alone(model, prompts, **options):
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, **options)[0].tolist())
    return out


def _frequent_token(model, prompts) -> int:
    """A token the prompts generate often: as end-of-sequence it makes rows finish at different steps."""
    made = _alone(model, prompts, do_sample=False)
    return Counter(t for out, p in zip(made, prompts) for t in out[len(p):]).most_common(1)[0][0]


@pytest.fixture(scope="module")
def trained(compiled_dir):
    model = runtime.load(compiled_dir("tiny-trained-moe"), expert_cache=3)  # 3 of 32 experts: every step evicts
    tokenizer = runtime.load_tokenizer(model.directory)
    return model, [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("schedule", ["route-aware", "fifo"])
@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3, "min_new_tokens": 2}])
def test_finished_rows_leave_and_waiting_prompts_join(trained, schedule, options):
    model, prompts = trained
    eos = _frequent_token(model, prompts)
    want = _alone(model, prompts, do_sample=False, eos_token_id=eos, **options)
    lengths = [len(w) - len(p) for w, p in zip(want, prompts)]
    assert len(set(lengths)) > 2  # rows really finish at different steps
    got = model.generate_many(prompts, batch_size=3, schedule=schedule, max_new_tokens=NEW, do_sample=False,
                              eos_token_id=eos, **options)
    assert got == want
    made = model.last_schedule
    assert made.continuous
    assert sorted(i for group in made.batches for i in group) == list(range(len(prompts)))
    assert all(len(group) <= 3 for group in made.batches)
    # fixed micro-batches would be ceil(7 / 3) = 3 groups; prompts joined one by one as rows finished
    assert len(made.batches) > math.ceil(len(prompts) / 3)
    if schedule == "fifo":
        assert [i for group in made.batches for i in group] == list(range(len(prompts)))
    again = model.generate_many(prompts, batch_size=3, schedule=schedule, max_new_tokens=NEW, do_sample=False,
                                eos_token_id=eos, **options)
    assert again == got and model.last_schedule == made  # deterministic


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_continuous_batching_keeps_other_architectures_exact(compiled_dir, name):
    model = runtime.load(compiled_dir(name), expert_cache=4)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3, 7, 4, 6)]
    eos = _frequent_token(model, prompts)
    want = _alone(model, prompts, do_sample=False, eos_token_id=eos)
    got = model.generate_many(prompts, batch_size=2, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert model.last_schedule.continuous
    assert got == want


def test_sliding_window_caches_fall_back_to_fixed_micro_batches(compiled_dir):
    model = runtime.load(compiled_dir("tiny-gpt-oss"), expert_cache=4)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    got = model.generate_many(prompts, batch_size=2, max_new_tokens=4, do_sample=False)
    assert not model.last_schedule.continuous
    assert got == [a[:len(p) + 4] for a, p in zip(_alone(model, prompts, do_sample=False), prompts)]
    with pytest.raises(ValueError, match="continuous batching cannot run this request: .*sliding-window") as err:
        model.generate_many(prompts, batch_size=2, max_new_tokens=4, continuous=True)
    assert "\n" not in str(err.value) and "continuous=False" in str(err.value)


def test_what_only_generate_can_do_is_refused_or_runs_in_fixed_batches(trained):
    model, prompts = trained
    with pytest.raises(ValueError, match="beam search") as err:
        model.generate_many(prompts[:3], batch_size=2, max_new_tokens=3, num_beams=2, continuous=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="continuous=.maybe.: give True, False or None"):
        model.generate_many(prompts[:3], batch_size=2, max_new_tokens=3, continuous="maybe")
    out = model.generate_many(prompts[:3], batch_size=2, max_new_tokens=3, num_beams=2)
    assert not model.last_schedule.continuous and [len(o) - len(p) for o, p in zip(out, prompts)] == [3, 3, 3]


def test_sampling_is_per_row_and_reproducible(trained):
    model, prompts = trained
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate_many(prompts, batch_size=3, max_new_tokens=5, do_sample=True, top_k=20))
    assert runs[0] == runs[1]
    assert model.last_schedule.continuous and all(len(o) == len(p) + 5 for o, p in zip(runs[0], prompts))


@pytest.mark.parametrize("continuous", [None, False])
def test_each_prompt_can_have_its_own_new_token_limit(trained, continuous):
    model, prompts = trained
    limits = [3, 12, 1, 7, 5, 9, 2]
    full = _alone(model, prompts, do_sample=False)
    got = model.generate_many(prompts, batch_size=3, max_new_tokens=limits, do_sample=False, continuous=continuous)
    assert got == [f[:len(p) + n] for f, p, n in zip(full, prompts, limits)]
    assert model.last_schedule.continuous == (continuous is None)
    if continuous is None:  # the 1-token prompt leaves at once: more admissions than fixed batches
        assert len(model.last_schedule.batches) > math.ceil(len(prompts) / 3)
    with pytest.raises(ValueError, match=r"max_new_tokens is a list of 2; give one positive int per prompt \(7\)"):
        model.generate_many(prompts, batch_size=3, max_new_tokens=[3, 4], continuous=continuous)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")  # the reference: generate's own
@pytest.mark.parametrize("options", [{}, {"max_length": 30}])
def test_generates_length_rules_are_generates(trained, options):
    """No max_new_tokens: transformers' default is 20 new tokens per prompt, whatever its length;
    an explicit max_length counts the prompt. Each row follows the rule for its own prompt."""
    model, prompts = trained
    want = []
    for p in prompts[:4]:
        ids = torch.tensor([p])
        want.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **options)[0].tolist())
    got = model.generate_many(prompts[:4], batch_size=2, do_sample=False, **options)
    assert model.last_schedule.continuous and got == want
    if options:
        with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens but max_length is 9: raise max_length"):
            model.generate_many(prompts[:4], batch_size=2, do_sample=False, max_length=9)


@pytest.mark.parametrize("continuous", [False, None])
def test_a_callers_pad_token_id_pads_and_reaches_generate_once(compiled_dir, hf_reference, continuous):
    """generate_many(..., continuous=False, pad_token_id=0) passed pad_token_id to generate twice
    (a TypeError); the tokens are HF's, each prompt generated alone."""
    model = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=3)
    hf = hf_reference("tiny-mixtral")[0]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    got = model.generate_many(prompts, batch_size=2, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              continuous=continuous)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=6,
                            do_sample=False, pad_token_id=0)[0].tolist() for p in prompts]
    assert got == want and model.last_schedule.continuous == (continuous is None)
