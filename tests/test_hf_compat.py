"""transformers' keyword names are read from signatures: either cache name works, both ways."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPT_MASK, PROMPTS
from torch import nn

from expertflow import runtime
from expertflow.ir.hf_compat import CACHE_KEYWORDS, cache_keyword_of, mask_cache_keyword, module_cache_keyword
from expertflow.ir.skeleton import build_skeleton
from expertflow.passes.driver import Driver
from expertflow.runtime.store.manifest import digest_of
from expertflow.tools.make import artefact


class _Old(nn.Module):
    def forward(self, hidden_states, past_key_values=None, **kwargs):
        return hidden_states


class _New(nn.Module):
    def forward(self, hidden_states, cache=None, **kwargs):
        return hidden_states


class _KwargsOnly(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states


def test_the_keyword_comes_from_the_signature():
    assert module_cache_keyword(_Old()) == "past_key_values"
    assert module_cache_keyword(_New()) == "cache"
    # A forward that passes **kwargs on takes the name of its transformers release.
    assert module_cache_keyword(_KwargsOnly()) == mask_cache_keyword()
    assert cache_keyword_of(len) is None and mask_cache_keyword() in CACHE_KEYWORDS


def test_the_driver_gives_layers_the_installed_name(compiled_dir):
    config = runtime.load(compiled_dir("tiny-mixtral"), expert_cache=2).config
    driver = Driver(build_skeleton(config, torch.float32))
    layer = driver.lm.model.layers[0]
    assert driver.cache_keyword == module_cache_keyword(layer) == cache_keyword_of(type(layer).forward)


def test_a_graph_from_another_release_runs_as_this_release_derives_it(compiled_dir, hf_reference, tmp_path):
    """graph.json calls attention with the cache keyword of the release that compiled it. A
    directory from a release with the other name is validated, then runs the graph this release
    derives from the same config and options, and still matches transformers."""
    copy = tmp_path / "other-release"
    shutil.copytree(compiled_dir("tiny-mixtral"), copy)
    graph = json.loads((copy / "graph.json").read_text())
    mine = mask_cache_keyword()
    other = next(k for k in CACHE_KEYWORDS if k != mine)
    renamed = 0
    for node in graph["nodes"]:
        for pair in node["kwargs"]["dict"] if node["op"] == "call_module" else []:
            if pair[0] == mine:
                pair[0], renamed = other, renamed + 1
    assert renamed == 4  # one attention call per decoder layer
    (copy / "graph.json").write_text(json.dumps(graph))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["graph.json"] = artefact.file_digest(copy / "graph.json")
    (copy / "manifest.json").write_text(json.dumps(dict(manifest, digest=digest_of(manifest))))
    with pytest.raises(runtime.LoadError, match="is not the graph its manifest's config and options compile to"):
        runtime.load(copy)  # the same release wrote it: the edit shows
    manifest["transformers"] = "5.0.0"
    (copy / "manifest.json").write_text(json.dumps(dict(manifest, digest=digest_of(manifest))))
    model = runtime.load(copy, expert_cache=3)
    calls = [n for n in model.graph_module.graph.nodes if n.op == "call_module" and mine in n.kwargs]
    assert len(calls) == 4 and not any(other in n.kwargs for n in model.graph_module.graph.nodes)
    torch.testing.assert_close(model(PROMPTS, attention_mask=PROMPT_MASK).logits, hf_reference("tiny-mixtral")[1],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_get_input_embeddings_is_the_models_token_embedding(compiled_dir, hf_reference, name):
    hf, _, _ = hf_reference(name)
    embed = runtime.load(compiled_dir(name), expert_cache=4).get_input_embeddings()
    assert isinstance(embed, nn.Embedding)
    torch.testing.assert_close(embed(PROMPTS), hf.get_input_embeddings()(PROMPTS), rtol=0, atol=0)
