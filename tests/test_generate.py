"""transformers' own generation drives the compiled model: every mode gives transformers' tokens.

Sampling (seeded) and beam search for every architecture; streamers, stopping criteria, logits
processors, a GenerationConfig, ``return_dict_in_generate`` with scores, ``max_length`` and the
eos/pad keywords; ``transformers.pipeline`` with the tokenizer carried in the compiled directory.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, EVICT, PROMPT_MASK, PROMPTS
from transformers import (AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList, TextStreamer, pipeline)
from transformers.generation.streamers import BaseStreamer

from expertflow import runtime

MODES = {
    "sample": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "beam2": dict(do_sample=False, num_beams=2),
    "beam2-sample": dict(do_sample=True, num_beams=2, num_return_sequences=2, top_k=0),
}


def _both(hf, model, **kwargs):
    """transformers' generate on the eager model and on the compiled one, from the same seed."""
    torch.manual_seed(1234)
    ref = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, **kwargs)
    torch.manual_seed(1234)
    out = model.generate(PROMPTS, attention_mask=PROMPT_MASK, **kwargs)
    return ref, out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ARCHS)
def test_generation_modes_match_transformers(name, mode, compiled_dir, hf_reference):
    hf = hf_reference(name)[0]
    model = runtime.load(compiled_dir(name), expert_cache=EVICT)
    ref, out = _both(hf, model, max_new_tokens=12, **MODES[mode])
    assert out.shape[1] >= PROMPTS.shape[1] + 6, out  # not a trivial early stop
    assert torch.equal(out, ref), f"{name} {mode}:\n{out}\nHF:\n{ref}"
    if mode == "sample":  # sampling really sampled
        greedy = model.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=12, do_sample=False)
        assert not torch.equal(out, greedy)


@pytest.fixture(scope="module")
def pair(hf_reference, compiled_dir):
    return hf_reference("tiny-qwen3-moe")[0], runtime.load(compiled_dir("tiny-qwen3-moe"), expert_cache=EVICT)


def test_scores_and_dict_output_match(pair):
    hf, model = pair
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True)
    ref, out = _both(hf, model, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == 6
    for mine, theirs in zip(out.logits, ref.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


class _StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class _Forbid(LogitsProcessor):
    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def __call__(self, input_ids, scores):
        scores[:, self.tokens] = float("-inf")
        return scores


def test_stopping_criteria_logits_processors_and_config(pair):
    hf, model = pair
    greedy = hf.generate(PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=10, do_sample=False)
    first_new = greedy[:, PROMPTS.shape[1]]
    # Forbidding the tokens greedy picks first changes the output: the processor is applied.
    ref, out = _both(hf, model, max_new_tokens=10, do_sample=False,
                     logits_processor=LogitsProcessorList([_Forbid(first_new.tolist())]))
    assert torch.equal(out, ref) and not torch.equal(out[:, :greedy.shape[1]], greedy)
    # A custom stopping criterion on a token greedy reaches: both stop at the same place.
    stop = int(greedy[1, PROMPTS.shape[1] + 3])
    ref, out = _both(hf, model, max_new_tokens=10, do_sample=False,
                     stopping_criteria=StoppingCriteriaList([_StopAfterToken(stop)]))
    assert torch.equal(out, ref)
    after = slice(PROMPTS.shape[1] + 4, None)  # the second sequence stopped, then was padded
    assert (out[1, after] == hf.generation_config.pad_token_id).all() and not torch.equal(out[1, after], greedy[1, after])
    config = GenerationConfig(max_new_tokens=9, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2,
                              eos_token_id=stop, pad_token_id=0)
    ref, out = _both(hf, model, generation_config=config)
    assert torch.equal(out, ref)
    ref, out = _both(hf, model, max_length=PROMPTS.shape[1] + 5, eos_token_id=[stop, 2], pad_token_id=3)
    assert torch.equal(out, ref) and out.shape[1] <= PROMPTS.shape[1] + 5


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.chunks.append(torch.tensor([-1]))


def test_streamers_see_every_token(pair, compiled_dir, capsys):
    hf, model = pair
    ids, mask = PROMPTS[1:], PROMPT_MASK[1:]  # streamers take one sequence
    collected = _Collect()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, streamer=collected)
    assert torch.equal(out, hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
    assert torch.equal(torch.cat(collected.chunks[:-1]), out[0]) and collected.chunks[-1].item() == -1
    tokenizer = runtime.load_tokenizer(compiled_dir("tiny-qwen3-moe"))
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                   streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.strip() == tokenizer.decode(out[0, ids.shape[1]:]).strip()


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3"])
@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(do_sample=False, num_beams=2)], ids=["greedy", "beam2"])
def test_pipeline_matches_transformers(name, kwargs, compiled_dir, model_dir, hf_reference):
    hf = hf_reference(name)[0]
    model = runtime.load(compiled_dir(name), expert_cache=EVICT)
    prompts = ["Beautiful is better than", "Errors should never"]
    ours = pipeline("text-generation", model=model, tokenizer=runtime.load_tokenizer(compiled_dir(name)))
    theirs = pipeline("text-generation", model=hf, tokenizer=AutoTokenizer.from_pretrained(model_dir(name)))
    got = ours(prompts, max_new_tokens=10, **kwargs)
    want = theirs(prompts, max_new_tokens=10, **kwargs)
    assert got == want
    assert all(len(g[0]["generated_text"]) > len(p) for g, p in zip(got, prompts))


def test_tokenizer_round_trips_through_compiled(compiled_dir, model_dir):
    path = compiled_dir("tiny-mixtral")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (path / name).read_bytes() == (model_dir("tiny-mixtral") / name).read_bytes(), name
    ours, theirs = runtime.load_tokenizer(path), AutoTokenizer.from_pretrained(model_dir("tiny-mixtral"))
    text = "Now is better than never, ünïcode → too."
    ids = ours(text).input_ids
    assert ids == theirs(text).input_ids and ours.decode(ids, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "Is flat better than nested?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert runtime.load(path).generation_config.eos_token_id == theirs.eos_token_id


def test_forward_is_a_causal_lm_output(pair):
    hf, model = pair
    out = model(PROMPTS, attention_mask=PROMPT_MASK, use_cache=True)
    ref = hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    cache = out[1]  # the cache, whatever this transformers release names its field
    assert cache.get_seq_length() == PROMPTS.shape[1]
    last = model(PROMPTS, attention_mask=PROMPT_MASK, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], ref.logits[:, -1], atol=1e-5, rtol=0)
    labels = PROMPTS.masked_fill(PROMPT_MASK == 0, -100)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK, labels=labels).loss,
                               hf(input_ids=PROMPTS, attention_mask=PROMPT_MASK, labels=labels).loss)
    logits, returned = model(PROMPTS, attention_mask=PROMPT_MASK, return_dict=False)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
