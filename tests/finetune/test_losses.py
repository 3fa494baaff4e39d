"""lm_loss_sum against plain F.cross_entropy on the full logits, values and gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_phi3.finetune.losses import IGNORE_INDEX, lm_loss_sum


def _setup(seed=0, B=2, T=13, H=8, V=11, bias=False, head_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    head.requires_grad_(head_grad)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    labels[1, 5] = IGNORE_INDEX
    return head, hidden, labels


def _reference(hidden, head, labels):
    """The plain way, written out: full logits, shift, cross-entropy summed over kept labels."""
    logits = (hidden @ head.weight.T + (head.bias if head.bias is not None else 0)).float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def _grads(fn, hidden, head):
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss, n = fn()
    (loss / n).backward()
    return loss.detach(), n, [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 7, 1024])
@pytest.mark.parametrize("bias,head_grad", [(False, False), (True, True)])
def test_matches_full_logits_cross_entropy(chunk_size, bias, head_grad):
    head, hidden, labels = _setup(bias=bias, head_grad=head_grad)
    ref_loss, ref_n, ref_grads = _grads(lambda: _reference(hidden, head, labels), hidden, head)
    loss, n, grads = _grads(lambda: lm_loss_sum(hidden, head, labels, chunk_size), hidden, head)
    assert n == ref_n == 17  # 24 shifted labels minus 7 ignored (labels[0, 0] is never a target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    assert len(grads) == len(ref_grads) == (3 if head_grad else 1)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_non_linear_head_uses_checkpointed_chunks():
    # A head that is not a plain nn.Linear takes the checkpoint path; same values and gradients.
    head, hidden, labels = _setup(V=9, head_grad=True)
    wrapped = nn.Sequential(head)
    ref_loss, _, ref_grads = _grads(lambda: _reference(hidden, head, labels), hidden, wrapped)
    loss, _, grads = _grads(lambda: lm_loss_sum(hidden, wrapped, labels, 4), hidden, wrapped)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_head_close_to_fp32_reference():
    head, hidden, labels = _setup(T=17, dtype=torch.bfloat16)
    loss, n, (grad,) = _grads(lambda: lm_loss_sum(hidden, head, labels, 6), hidden, head)
    ref_loss, _, (ref_grad,) = _grads(lambda: _reference(hidden, head, labels), hidden, head)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=0.05, rtol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-3, rtol=2e-2)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    head, hidden, labels = _setup()
    labels.fill_(IGNORE_INDEX)
    loss, n = lm_loss_sum(hidden, head, labels, 4)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_no_grad_gives_the_loss_only():
    head, hidden, labels = _setup()
    ref, _ = _reference(hidden, head, labels)
    with torch.no_grad():
        loss, _ = lm_loss_sum(hidden, head, labels, 3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size_is_rejected(bad):
    head, hidden, labels = _setup()
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None, got"):
        lm_loss_sum(hidden, head, labels, bad)


def test_mismatched_labels_are_rejected():
    head, hidden, labels = _setup()
    with pytest.raises(ValueError, match=r"labels \(B, T\).*labels \(2, 12\)"):
        lm_loss_sum(hidden, head, labels[:, :-1], 4)


def test_no_grad_evaluation_matches_and_forms_no_head_gradient(monkeypatch):
    # With a trainable head (modules_to_save=["lm_head"]) evaluation must not build the head's
    # (vocab, hidden) gradient: the fused function is not even entered under no_grad.
    import lora_phi3.finetune.losses as losses
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)  # weight requires grad
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    calls = []
    real_apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply",
                        lambda *a: calls.append(1) or real_apply(*a))
    with torch.no_grad():
        total, n = lm_loss_sum(hidden, head, labels, chunk_size=4)
    logits = head(hidden[:, :-1]).reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum",
                                                 ignore_index=-100)
    torch.testing.assert_close(total, expected.detach(), atol=1e-4, rtol=1e-5)
    assert int(n) == int((labels[:, 1:] != -100).sum()) and calls == []


def test_no_label_tokens_gives_zero_that_still_reaches_the_head():
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    total, n = lm_loss_sum(hidden, head, labels, chunk_size=4)
    total.backward()
    assert total.item() == 0.0 and int(n) == 0
    assert head.weight.grad is not None and torch.count_nonzero(head.weight.grad) == 0
