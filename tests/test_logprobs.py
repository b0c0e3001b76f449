"""Chunked token log-probs and entropy equal the full log-softmax, values and gradients."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.core.logprobs import token_entropy, token_logprobs


def _full(hidden, weight, bias, targets):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), vocab=st.integers(2, 300), hidden=st.integers(1, 16),
       chunk=st.integers(1, 2000), with_bias=st.booleans(), seed=st.integers(0, 10_000))
def test_chunked_logprobs_and_gradients_match_log_softmax(n, vocab, hidden, chunk, with_bias,
                                                          seed):
    gen = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(n, hidden, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).requires_grad_() if with_bias \
        else None
    y = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float32)

    chunked = token_logprobs(h.float(), w.float(), y, None if b is None else b.float(),
                             chunk_elements=chunk)
    reference = _full(h.float(), w.float(), None if b is None else b.float(), y)
    assert chunked.dtype == torch.float32 and chunked.shape == (n,)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)

    params = [h, w] + ([b] if b is not None else [])
    if n == 0:
        return
    got = torch.autograd.grad((chunked * upstream).sum(), [h, w] if b is None else [h, w, b],
                              allow_unused=True)
    h2, w2 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b2 = None if b is None else b.detach().float().requires_grad_()
    want = torch.autograd.grad((_full(h2, w2, b2, y) * upstream).sum(),
                               [h2, w2] if b2 is None else [h2, w2, b2])
    assert len(got) == len(params)
    for g, r in zip(got, want, strict=True):
        # A weight gradient sums n terms that can cancel: float32 rounding of either side is
        # then relative to the terms' size, not to the (small) sum.
        scale = max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g.float(), r, atol=5e-5 * scale, rtol=1e-4)


def test_chunked_logprobs_reach_float32_leaves():
    """The usual case: fp32 parameters that require grad, gradient through the checkpoint."""
    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    token_logprobs(h, w, y, chunk_elements=22).sum().backward()  # 2 rows per chunk
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    _full(h, w, None, y).sum().backward()
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), vocab=st.integers(2, 200), chunk=st.integers(1, 1000),
       seed=st.integers(0, 10_000))
def test_chunked_entropy_matches_definition(n, vocab, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    h = 2 * torch.randn(n, 8, generator=gen)
    w = torch.randn(vocab, 8, generator=gen)
    probs = torch.softmax((h @ w.T).double(), -1)
    want = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    got = token_entropy(h, w, chunk_elements=chunk)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert bool((got >= -1e-5).all()) and bool((got <= torch.log(torch.tensor(vocab)) + 1e-4).all())


def test_uniform_logits_give_log_vocab():
    h = torch.zeros(3, 4)
    w = torch.randn(50, 4)
    torch.testing.assert_close(token_logprobs(h, w, torch.tensor([0, 7, 49])),
                               torch.full((3,), -torch.log(torch.tensor(50.0)).item()))
    torch.testing.assert_close(token_entropy(h, w), torch.full((3,), torch.log(torch.tensor(50.0))
                                                                 .item()))


def test_temperature_divides_the_logits_after_the_bias():
    """log softmax((h W^T + b) / T): the distribution a rollout at temperature T sampled
    from; with gradients through the chunk checkpoint; T = 1 is the plain path bit for bit."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(9, 4, generator=gen, requires_grad=True)
    w = torch.randn(13, 4, generator=gen, requires_grad=True)
    b = torch.randn(13, generator=gen)
    y = torch.randint(0, 13, (9,), generator=gen)
    for t in (0.6, 1.7):
        logits = (h @ w.T + b) / t
        want = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
        got = token_logprobs(h, w, y, b, chunk_elements=26, temperature=t)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        g_got = torch.autograd.grad(got.sum(), [h, w])
        g_want = torch.autograd.grad(want.sum(), [h, w])
        for g, r in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        p = torch.softmax(logits.detach(), -1)
        entropy = -(p * torch.log_softmax(logits.detach(), -1)).sum(-1)
        torch.testing.assert_close(token_entropy(h.detach(), w.detach(), b, 26, t), entropy,
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(token_logprobs(h, w, y, b, 26, temperature=1.0),
                           token_logprobs(h, w, y, b, 26))
        assert torch.equal(token_entropy(h, w, b, 26, 1.0), token_entropy(h, w, b, 26))
