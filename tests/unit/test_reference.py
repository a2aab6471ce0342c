"""uniprefill.reference on the tiny models of every family (transformers only, no engine)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import TINY_MODELS
from uniprefill.config import UniPrefillConfig
from uniprefill.families import layer_types
from uniprefill.ops import select_tokens
from uniprefill.reference import generate

N = 700  # > tiny-gemma3's 128-token window, several 16-token blocks
RULE = dict(block_size=16, sink=32, last_q=32, min_prompt_len=0)


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request, prepared):
    return AutoModelForCausalLM.from_pretrained(prepared(request.param), dtype=torch.float32)


def prompt(seed=0):
    return torch.randint(10, 1000, (N,), generator=torch.Generator().manual_seed(seed))


def test_without_drop_layers_it_is_the_model(model):
    ids = prompt()
    with torch.no_grad():
        logits = model(ids[None]).logits[0, -1].float()
        hf_tokens = model.generate(ids[None], max_new_tokens=6, do_sample=False)[0, N:].tolist()
    ours = generate(model, ids, config=None, max_new_tokens=6)
    torch.testing.assert_close(ours.first_logits, logits, atol=1e-4, rtol=1e-4)
    assert ours.tokens[: len(hf_tokens)] == hf_tokens
    assert ours.kept_per_stage == [N] and set(ours.layer_tokens) == {N}


def test_p_one_keeps_every_token_and_the_output(model):
    config = UniPrefillConfig(p=1.0, **RULE).resolve(layer_types(model.config))
    ours = generate(model, prompt(), config=config, max_new_tokens=6)
    assert ours.kept_per_stage == [N] * (len(config.drop_layers) + 1)
    assert ours.tokens == generate(model, prompt(), config=None, max_new_tokens=6).tokens


def test_pruning_compounds_and_later_layers_see_only_kept_tokens(model):
    config = UniPrefillConfig(p=0.9, **RULE).resolve(layer_types(model.config))
    ours = generate(model, prompt(), config=config, max_new_tokens=6)
    kept = ours.kept_per_stage
    assert kept[0] == N and all(a > b for a, b in zip(kept, kept[1:], strict=False))
    assert kept[-1] >= RULE["sink"] + RULE["last_q"]
    stage = 0
    for layer, tokens in enumerate(ours.layer_tokens):  # a drop layer itself runs on its stage
        assert tokens == kept[stage]
        stage += layer in config.drop_layers
    assert len(ours.tokens) == 6
    for survivors, count in zip(ours.kept_positions, kept[1:], strict=True):
        assert len(survivors) == count and bool((survivors.diff() > 0).all())  # order kept
        assert survivors[-1] == N - 1  # the last token always survives


def test_selection_backends_agree_inside_the_model(model):
    config = UniPrefillConfig(p=0.9, **RULE).resolve(layer_types(model.config))
    fast = generate(model, prompt(1), config=config, max_new_tokens=4, backend="torch")
    oracle = generate(model, prompt(1), config=config, max_new_tokens=4, backend="oracle")
    assert fast.kept_per_stage == oracle.kept_per_stage and fast.tokens == oracle.tokens


def test_unresolved_config_is_refused(model):
    with pytest.raises(ValueError, match="resolve the config first"):
        generate(model, prompt(), config=UniPrefillConfig(), max_new_tokens=1)


def test_replayed_kept_positions_give_the_same_prefill(model):
    config = UniPrefillConfig(p=0.9, **RULE).resolve(layer_types(model.config))
    first = generate(model, prompt(), config=config, max_new_tokens=4)
    replay = generate(
        model, prompt(), config=config, max_new_tokens=4, keep_positions=first.kept_positions
    )
    assert replay.kept_per_stage == first.kept_per_stage and replay.tokens == first.tokens
    for a, b in zip(replay.kept_positions, first.kept_positions, strict=True):
        assert torch.equal(a, b)


def test_a_reused_prefix_keeps_its_selection_and_every_later_token(model):
    config = UniPrefillConfig(p=0.9, **RULE).resolve(layer_types(model.config))
    first = generate(model, prompt(), config=config, max_new_tokens=1)
    longer = torch.cat([prompt(), prompt(2)[:50]])
    later = torch.arange(N, N + 50)
    reused = [torch.cat([kept, later]) for kept in first.kept_positions]
    ours = generate(model, longer, config=config, max_new_tokens=1, keep_positions=reused)
    assert ours.kept_per_stage == [N + 50] + [len(k) + 50 for k in first.kept_positions]


def test_captures_of_an_unpruned_run_give_the_first_drop_layers_selection(model):
    """What the policy study scores on: an unpruned run's captured queries and keys at a drop
    layer. Before the first drop nothing differs, so selecting from them is the pruned run's
    first selection exactly; capturing changes nothing else."""
    config = UniPrefillConfig(p=0.9, **RULE).resolve(layer_types(model.config))
    first = config.drop_layers[0]
    plain = generate(model, prompt(), config=None, max_new_tokens=4)
    captured = generate(model, prompt(), config=None, max_new_tokens=4, capture=frozenset([first]))
    assert captured.tokens == plain.tokens and set(captured.captured) == {first}
    query, key = captured.captured[first]
    selection = select_tokens(
        query[0].transpose(0, 1), key[0].transpose(0, 1), torch.tensor([0, N]),
        p=config.p, rule=config.rule,
    )  # fmt: skip
    pruned = generate(model, prompt(), config=config, max_new_tokens=4)
    assert torch.equal(selection.kept_indices, pruned.kept_positions[0])
