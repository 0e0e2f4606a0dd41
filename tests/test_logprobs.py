"""Chunked logprobs on one rank equal the full-vocab log_softmax/gather reference (values and grads).

The TP=2 (two ranks, vocab-sharded) version of the same checks is tests/test_logprobs_dist.py.
"""
import pytest
import torch

from megatron_grpo.models.logprobs import naive_logprobs, token_logprobs, vocab_parallel_logprobs


def _data(n=37, v=101, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return logits, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("inplace", [False, True])
def test_values_and_grads_match_naive(temperature, chunk, inplace):
    logits, targets = _data()
    vocab = 96  # ids 96..100 are padding rows of the embedding
    targets = targets.clamp(max=vocab - 1)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(len(targets), generator=g), torch.randn(len(targets), generator=g)

    ref_in = logits.clone().requires_grad_()
    ref_lp, ref_ent = naive_logprobs(ref_in, targets, temperature=temperature, vocab_size=vocab, with_entropy=True)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()

    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # non-leaf: what a model output is (inplace backward may reuse its storage)
    lp, ent = vocab_parallel_logprobs(x, targets, temperature=temperature, vocab_size=vocab, chunk_size=chunk,
                                      with_entropy=True, inplace_backward=inplace)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    assert (lp - ref_lp).abs().max() <= 1e-5
    assert (ent - ref_ent).abs().max() <= 1e-5
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    assert (leaf.grad[:, :vocab] - ref_in.grad[:, :vocab]).abs().max() <= 1e-5
    assert leaf.grad[:, vocab:].abs().max() == 0  # padding rows get no gradient


def test_logprob_only_grad_and_bf16_input():
    logits, targets = _data(dtype=torch.bfloat16)
    ref_in = logits.clone().requires_grad_()
    naive_logprobs(ref_in, targets).sum().backward()
    x = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(x, targets, chunk_size=8)
    assert (lp - naive_logprobs(logits, targets)).abs().max() <= 1e-5  # fp32 math on bf16 input
    lp.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert (x.grad.float() - ref_in.grad.float()).abs().max() <= 1e-2  # bf16 rounding of the grad only


def test_token_logprobs_alignment_and_mask():
    b, t, v = 3, 9, 50
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 4:9] = True
    mask[1, 2:5] = True  # row 2: nothing wanted
    lp = token_logprobs(logits, ids, mask, chunk_size=2)
    full = torch.log_softmax(logits, -1)
    for i in range(b):
        for j in range(t):
            want = full[i, j - 1, ids[i, j]] if (mask[i, j] and j > 0) else 0.0
            assert abs(float(lp[i, j]) - float(want)) <= 1e-6, (i, j)
    # all positions (mask=None): position 0 is 0, the rest predicted from the previous position
    lp_all, ent = token_logprobs(logits, ids, with_entropy=True)
    assert (lp_all[:, 0] == 0).all() and (ent[:, 0] == 0).all()
    ref = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (lp_all[:, 1:] - ref).abs().max() <= 1e-6


def test_masked_rows_get_zero_grad_and_inplace_reuses_storage():
    b, t, v = 2, 6, 40
    g = torch.Generator().manual_seed(3)
    leaf = torch.randn(b, t, v, generator=g).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t)
    mask[:, 3:] = 1
    logits = leaf * 2.0
    token_logprobs(logits, ids, mask, inplace_backward=True).sum().backward()
    # rows 0..1 predict nothing wanted (positions 1, 2 are masked): exactly zero gradient
    assert leaf.grad[:, :2].abs().max() == 0 and leaf.grad[:, 5].abs().max() == 0
    assert leaf.grad[:, 2:5].abs().max() > 0
    ref = leaf.detach().clone().requires_grad_()
    full = torch.log_softmax(ref * 2.0, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    (full * mask[:, 1:]).sum().backward()
    assert (leaf.grad - ref.grad).abs().max() <= 1e-5


def test_rejects_bad_arguments():
    logits, targets = _data()
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(logits, targets, vocab_size=500)
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(logits, targets, backend="nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("chunk", [3, 64])
def test_token_logprobs_grads_all_paths(dtype, inplace, chunk):
    """Masked rows make chunks that are contiguous (views) or not (gathered); bf16 writes via copy."""
    b, t, v = 4, 10, 70
    g = torch.Generator().manual_seed(4)
    base = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 64, (b, t), generator=g)
    mask = torch.zeros(b, t)
    for i in range(b):
        mask[i, 2 + i : 2 + i + 3 + i] = 1
    w_lp, w_ent = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)

    ref_leaf = base.float().clone().requires_grad_()
    x = ref_leaf / 0.9
    ls = torch.log_softmax(x[:, :-1, :64], -1)
    ref_lp = torch.cat([torch.zeros(b, 1), ls.gather(-1, ids[:, 1:, None]).squeeze(-1)], 1) * mask
    ref_ent = torch.cat([torch.zeros(b, 1), -(ls.exp() * ls).sum(-1)], 1) * mask
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()

    leaf = base.clone().requires_grad_()
    lp, ent = token_logprobs(leaf * 1, ids, mask, temperature=0.9, vocab_size=64, chunk_size=chunk,
                             with_entropy=True, inplace_backward=inplace)
    assert (lp - ref_lp).abs().max() <= 1e-5 and (ent - ref_ent).abs().max() <= 1e-5
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the gradient itself is stored in bf16
    assert (leaf.grad.float() - ref_leaf.grad).abs().max() <= tol
