"""select_tokens: every backend against the oracle, and the rule's properties
(docs/design/selection.md)."""

import dataclasses
import math

import pytest
import torch

from uniprefill.ops import SelectionRule, available_backends, select_tokens
from uniprefill.ops.select.oracle import token_scores_oracle
from uniprefill.ops.select.triton_scores import interpreting

# Triton kernels need a GPU, or Triton's interpreter on CPU (`make test` sets TRITON_INTERPRET=1).
RUNNABLE = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            b == "triton" and not (torch.cuda.is_available() or interpreting()),
            reason="triton needs a GPU or TRITON_INTERPRET=1",
        ),
    )
    for b in available_backends()
]
FAST_BACKENDS = [b for b in RUNNABLE if b.values[0] != "oracle"]
RULE = SelectionRule(block_size=16, sink=32, last_q=32)


def make_batch(lens, num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, num_q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    # A few strong keys give the rule something to find.
    k[torch.randint(0, total, (total // 50 + 1,), generator=gen)] *= 3
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, cu


def request_mass(q, k, start, end, block_size, last_q, normalize_over="all_blocks"):
    """Normalised block masses of one request, in float64, from the oracle's scores."""
    scores = token_scores_oracle(q[end - last_q : end], k[start:end]).double()
    n = end - start
    blocks = torch.stack([scores[b : b + block_size].sum() for b in range(0, n, block_size)])
    if normalize_over == "unforced_blocks":
        for i in range(len(blocks)):
            if (i + 1) * block_size <= RULE.sink or i * block_size >= n - last_q:
                blocks[i] = 0.0
    return blocks / blocks.sum()


def near_threshold_tokens(q, k, cu, p, block_size, last_q, eps=1e-4, normalize_over="all_blocks"):
    """Tokens of blocks whose mass-before-them is within eps of p: a backend may round them
    either way."""
    loose = torch.zeros(q.shape[0], dtype=torch.bool)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end - start <= RULE.sink + last_q:
            continue
        mass = request_mass(q, k, start, end, block_size, last_q, normalize_over)
        order = sorted(range(len(mass)), key=lambda b: (-float(mass[b]), b))
        before = 0.0
        for b in order:
            if abs(before - p) < eps:
                loose[start + b * block_size : min(end, start + (b + 1) * block_size)] = True
            before += float(mass[b])
    return loose


def fully_kept_blocks(keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """[num_blocks] bool: every token of the block survived (a partial last block included)."""
    return torch.tensor(
        [bool(keep[b : b + block_size].all()) for b in range(0, len(keep), block_size)]
    )


LENGTH_CASES = {
    "one-long": [2049],
    "not-block-multiples": [100, 63, 300],
    "mixed-with-decodes": [1, 700, 1, 1, 129, 1000],
    "all-too-short": [1, 64, 40],
}


def assert_same_tokens(q, k, cu, p, backend):
    ref = select_tokens(q, k, cu, p=p, rule=RULE, backend="oracle")
    got = select_tokens(q, k, cu, p=p, rule=RULE, backend=backend)
    differ = ref.keep != got.keep
    assert not (differ & ~near_threshold_tokens(q, k, cu, p, 16, 32)).any()
    if not differ.any():
        assert torch.equal(ref.cu_seqlens, got.cu_seqlens) and torch.equal(ref.lens, got.lens)
        assert torch.equal(ref.kept_indices, got.kept_indices)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("lens", LENGTH_CASES.values(), ids=LENGTH_CASES.keys())
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "gqa8"])
def test_backend_matches_oracle(backend, lens, heads):
    assert_same_tokens(*make_batch(lens, *heads), 0.9, backend)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.99])
@pytest.mark.parametrize("lens", LENGTH_CASES.values(), ids=LENGTH_CASES.keys())
def test_top_p_matches_oracle_at_other_p(lens, p):
    """p only enters the shared tail, so the cheapest fast backend covers it."""
    assert_same_tokens(*make_batch(lens, 4, 2), p, "torch")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_what_float32_keeps(backend, dtype):
    q, k, cu = make_batch([900, 1, 500], dtype=dtype, seed=3)
    ref = select_tokens(q.float(), k.float(), cu, p=0.9, rule=RULE, backend="oracle")
    got = select_tokens(q, k, cu, p=0.9, rule=RULE, backend=backend)
    differ = ref.keep != got.keep
    assert not (differ & ~near_threshold_tokens(q.float(), k.float(), cu, 0.9, 16, 32, 1e-3)).any()


@pytest.mark.parametrize("backend", RUNNABLE)
def test_rule_properties(backend):
    lens = [1, 1500, 1, 64, 700, 1]
    q, k, cu = make_batch(lens, seed=1)
    p = 0.8
    rule = dataclasses.replace(RULE, min_prompt_len=100)
    sel = select_tokens(q, k, cu, p=p, rule=rule, backend=backend)
    assert sel.cu_seqlens[0] == 0 and torch.equal(sel.lens, sel.cu_seqlens.diff())
    assert torch.equal(sel.kept_indices, sel.keep.nonzero().squeeze(1))
    bounds = cu.tolist()
    for r, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        n, keep = end - start, sel.keep[start:end]
        if n <= RULE.sink + RULE.last_q or n < 100:  # decodes and short prompts: untouched
            assert keep.all()
            continue
        assert keep[: RULE.sink].all() and keep[n - RULE.last_q :].all()
        assert not keep.all()  # something was pruned
        mass = request_mass(q, k, start, end, 16, 32)
        assert mass[fully_kept_blocks(keep, 16)].sum() >= p - 1e-6
        assert int(sel.lens[r]) == int(keep.sum())


@pytest.mark.parametrize("backend", RUNNABLE)
def test_batch_equals_each_request_alone(backend):
    lens = [800, 1, 333, 1, 1200]
    q, k, cu = make_batch(lens, seed=2)
    batch = select_tokens(q, k, cu, p=0.9, rule=RULE, backend=backend)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        one = torch.tensor([0, end - start], dtype=torch.int32)
        alone = select_tokens(q[start:end], k[start:end], one, p=0.9, rule=RULE, backend=backend)
        assert torch.equal(alone.keep, batch.keep[start:end])


@pytest.mark.parametrize("backend", RUNNABLE)
def test_per_request_p_equals_each_request_alone_with_its_p(backend):
    lens, ps = [800, 1, 1200, 900], [0.9, 0.5, 1.0, 0.5]
    q, k, cu = make_batch(lens, seed=5)
    batch = select_tokens(q, k, cu, p=torch.tensor(ps), rule=RULE, backend=backend)
    bounds = cu.tolist()
    for p, start, end in zip(ps, bounds[:-1], bounds[1:], strict=True):
        one = torch.tensor([0, end - start], dtype=torch.int32)
        alone = select_tokens(q[start:end], k[start:end], one, p=p, rule=RULE, backend=backend)
        assert torch.equal(alone.keep, batch.keep[start:end])
    assert batch.keep[bounds[2] : bounds[3]].all()  # p = 1.0: that request is kept whole
    assert not batch.keep.all()


@pytest.mark.parametrize("backend", RUNNABLE)
def test_per_request_queries_equal_each_request_alone_with_that_last_q(backend):
    """A request scored by its own query count (e.g. its question's tokens) keeps what the rule
    with last_q = that count keeps, whatever the other requests' counts; the short request's
    padding rows (the batch scores with the largest count) count for nothing."""
    lens, counts = [800, 1, 1200, 400], [5, 1, 70, 32]
    q, k, cu = make_batch(lens, seed=7)
    batch = select_tokens(q, k, cu, p=0.9, rule=RULE, backend=backend, queries=torch.tensor(counts))
    bounds = cu.tolist()
    for count, start, end in zip(counts, bounds[:-1], bounds[1:], strict=True):
        one = torch.tensor([0, end - start], dtype=torch.int32)
        rule = dataclasses.replace(RULE, last_q=count)
        alone = select_tokens(q[start:end], k[start:end], one, p=0.9, rule=rule, backend=backend)
        assert torch.equal(alone.keep, batch.keep[start:end])
        if end - start > RULE.sink + count:
            assert batch.keep[end - count : end].all() and not batch.keep[start:end].all()


def test_bad_query_counts_are_refused():
    q, k, cu = make_batch([300, 200])
    with pytest.raises(ValueError, match="queries must be an integer tensor"):
        select_tokens(q, k, cu, p=0.9, rule=RULE, queries=torch.tensor([4]))
    with pytest.raises(ValueError, match="at least one scoring query"):
        select_tokens(q, k, cu, p=0.9, rule=RULE, queries=torch.tensor([4, 0]))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_p_one_keeps_everything(backend):
    q, k, cu = make_batch([2000, 1, 500])
    sel = select_tokens(q, k, cu, p=1.0, rule=RULE, backend=backend)
    assert sel.keep.all() and torch.equal(sel.cu_seqlens, cu)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_tensor_parallel_hook_makes_split_heads_agree(backend):
    """Two fake ranks each hold half the heads; summing their block scores in the hook gives
    exactly the unsplit op's tokens."""
    q, k, cu = make_batch([1100, 1, 600], num_q_heads=8, num_kv_heads=4, seed=4)
    full = select_tokens(q, k, cu, p=0.9, rule=RULE, backend=backend)
    halves = [(q[:, :4], k[:, :2]), (q[:, 4:], k[:, 2:])]
    captured = []
    select_tokens(
        *halves[1],
        cu,
        p=0.9,
        rule=RULE,
        backend=backend,
        reduce_block_scores=lambda s: captured.append(s.clone()) or s,
    )
    rank0 = select_tokens(
        *halves[0],
        cu,
        p=0.9,
        rule=RULE,
        backend=backend,
        reduce_block_scores=lambda s: s + captured[0],
    )
    assert captured[0].dtype == torch.float32
    differ = rank0.keep != full.keep
    assert not (differ & ~near_threshold_tokens(q, k, cu, 0.9, 16, 32)).any()


@pytest.mark.parametrize("backend", RUNNABLE)
def test_ties_go_to_the_earlier_block(backend):
    n = 16 * 10 + 32
    q = torch.zeros(n, 2, 16)  # every visible key gets the same probability
    k = torch.randn(n, 2, 16)
    cu = torch.tensor([0, n], dtype=torch.int32)
    rule = SelectionRule(block_size=16, sink=0, last_q=32)
    sel = select_tokens(q, k, cu, p=0.05, rule=rule, backend=backend)
    # The 10 blocks before the last queries are seen by every query alike: the first one wins.
    assert sel.keep[: n - 32].view(-1, 16)[:, 0].tolist() == [True] + [False] * 9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(q=torch.randn(10, 3, 8), k=torch.randn(10, 2, 8)), "multiple of key heads"),
        (dict(k=torch.randn(9, 2, 8)), "must agree on tokens"),
        (dict(q=torch.randn(10, 4)), r"must be \[T, H, d\]"),
        (dict(cu=torch.tensor([0, 6, 4, 10])), "never decrease"),
        (dict(cu=torch.tensor([0, 4, 9])), "end at the token count 10"),
        (dict(cu=torch.tensor([0.0, 10.0])), "integer"),
        (dict(q=torch.randint(0, 3, (10, 4, 8))), "floating point"),
        (dict(p=0.0), r"p must be in \(0, 1\]"),
        (dict(p=1.2), r"p must be in \(0, 1\]"),
        (dict(p="high"), "p must be a number"),
        (dict(p=torch.tensor([0.5, 0.0])), r"every p must be in \(0, 1\]"),
        (dict(p=torch.tensor([0.5])), r"per-request p must be float32 \[B\] = \[2\]"),
        (dict(p=torch.tensor([0.5, 0.5], dtype=torch.float64)), "per-request p must be float32"),
        (dict(block_size=12), "power of two"),
        (dict(backend="cuda-magic"), "unknown backend 'cuda-magic'"),
    ],
    ids=lambda x: None if isinstance(x, dict) else x,
)
def test_bad_input_is_a_clear_value_error(change, message):
    args = dict(
        q=torch.randn(10, 4, 8),
        k=torch.randn(10, 2, 8),
        cu=torch.tensor([0, 4, 10]),
        p=0.9,
        block_size=16,
        backend="auto",
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        select_tokens(
            args["q"],
            args["k"],
            args["cu"],
            p=args["p"],
            rule=SelectionRule(block_size=args["block_size"], sink=2, last_q=2),
            backend=args["backend"],
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(sink=-1), "^sink must be a non-negative integer"),
        (dict(last_q=0), "^last_q must be at least 1"),
        (dict(min_prompt_len=1.5), "^min_prompt_len must be a non-negative integer"),
        (dict(normalize_over="some"), r"^normalize_over must be one of \['all_blocks'"),
    ],
    ids=lambda x: None if isinstance(x, dict) else x,
)
def test_rule_checks_itself(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(RULE, **change)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_unforced_normalization_counts_only_unforced_blocks(backend):
    lens = [1, 1500, 700]
    q, k, cu = make_batch(lens, seed=5)
    p, rule = 0.7, dataclasses.replace(RULE, normalize_over="unforced_blocks")
    ours = select_tokens(q, k, cu, p=p, rule=rule, backend=backend)
    ref = select_tokens(q, k, cu, p=p, rule=rule, backend="oracle")
    loose = near_threshold_tokens(q, k, cu, p, 16, 32, normalize_over="unforced_blocks")
    assert not ((ours.keep != ref.keep) & ~loose).any()
    bounds = cu.tolist()
    for start, end in zip(bounds[1:-1], bounds[2:], strict=True):
        mass = request_mass(q, k, start, end, 16, 32, "unforced_blocks")
        assert mass[fully_kept_blocks(ours.keep[start:end], 16)].sum() >= p - 1e-6


def test_scores_are_a_distribution_per_query():
    q, k, _ = make_batch([300])
    scores = token_scores_oracle(q[-32:], k)
    assert math.isclose(float(scores.sum()), 32 * 4, rel_tol=1e-5)  # 32 queries x 4 heads


def test_torch_backend_chunking_does_not_change_the_tokens(monkeypatch):
    """Chunks rescaled at the end must keep what one chunk over all keys keeps."""
    from uniprefill.ops.select import torch_scores

    q, k, cu = make_batch([1, 1500, 900], seed=6)
    monkeypatch.setattr(torch_scores, "TILE_ELEMENTS", 1 << 30)  # one chunk
    one_tile = select_tokens(q, k, cu, p=0.9, rule=RULE, backend="torch")
    monkeypatch.setattr(torch_scores, "TILE_ELEMENTS", 4 * 32 * 64)  # 64-key chunks
    chunked = select_tokens(q, k, cu, p=0.9, rule=RULE, backend="torch")
    differ = one_tile.keep != chunked.keep
    assert not (differ & ~near_threshold_tokens(q, k, cu, 0.9, 16, 32)).any()
