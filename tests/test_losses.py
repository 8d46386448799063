"""Distillation losses: closed-form values, stability, gradient direction, masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from lada.plugin.losses import (contrastive_loss, contrastive_margin, distillm2_loss, sequence_logprob_from_logits,
                                skew_kl)


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_contrastive_closed_form():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta * margin = 1
    loss = contrastive_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    # batch mean of two examples with margins 2 and 0
    loss = contrastive_loss(t(-1.0, -5.0), t(-3.0, -5.0), t(-2.0, -5.0), t(-2.0, -5.0), beta=0.5)
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_margin(t(-1.0), t(-3.0), t(-2.0), t(-2.0)).item() == 2.0


def test_contrastive_length_normalised_closed_form():
    # log-ratios 1 over 2 tokens and -1 over 4 tokens: margin 0.5 + 0.25
    loss = contrastive_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=1.0, pos_len=t(2.0), neg_len=t(4.0),
                            length_normalize=True)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    with pytest.raises(ValueError, match="pos_len"):
        contrastive_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), length_normalize=True)


def test_contrastive_stable_at_huge_magnitudes():
    for sign in (1.0, -1.0):
        pp = torch.tensor([sign * 1e4, -1e4], requires_grad=True)
        loss = contrastive_loss(pp, t(-sign * 1e4, 1e4), t(0.0, 0.0), t(0.0, 0.0), beta=1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pp.grad).all()
    # a hugely negative margin costs about beta * |margin|, not inf
    loss = contrastive_loss(t(-1e4), t(1e4), t(0.0), t(0.0), beta=1.0)
    assert loss.item() == pytest.approx(2e4, rel=1e-6)


def test_contrastive_step_increases_margin_and_ref_gets_no_grad():
    pp = torch.tensor([-4.0, -2.0], requires_grad=True)
    pn = torch.tensor([-3.0, -1.0], requires_grad=True)
    rp = torch.tensor([-3.5, -2.5], requires_grad=True)
    rn = torch.tensor([-3.0, -1.5], requires_grad=True)
    before = contrastive_margin(pp, pn, rp, rn).detach()
    contrastive_loss(pp, pn, rp, rn, beta=0.1).backward()
    assert rp.grad is None and rn.grad is None
    assert (pp.grad < 0).all() and (pn.grad > 0).all()  # raise y+, lower y-
    with torch.no_grad():
        pp -= 1.0 * pp.grad
        pn -= 1.0 * pn.grad
    after = contrastive_margin(pp, pn, rp, rn).detach()
    assert (after > before).all()


def test_contrastive_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        contrastive_loss(t(1.0, 2.0), t(1.0), t(1.0), t(1.0))


def test_sequence_logprob_matches_manual_and_ignores_padding():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]]])  # [1, 3, 2]
    labels = torch.tensor([[1, 1, -100]])
    mask = torch.tensor([[1, 1, 0]])
    # p(1) = 3/4 at t=0, p(1) = 1/4 at t=1
    expected = math.log(0.75) + math.log(0.25)
    assert sequence_logprob_from_logits(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)
    logits2 = logits.clone()
    logits2[0, 2] = torch.tensor([float("nan"), float("inf")])
    assert sequence_logprob_from_logits(logits2, labels, mask).item() == pytest.approx(expected, rel=1e-6)


def _logits_of(*probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_skew_kl_closed_form_and_alpha_zero_is_kl():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    mix = 0.1 * p + 0.9 * q
    expected = float((p * (p / mix).log()).sum())
    assert skew_kl(p.log(), q.log(), 0.1).item() == pytest.approx(expected, rel=1e-5)
    plain = F.kl_div(q.log(), p, reduction="sum").item()  # KL(p || q)
    assert skew_kl(p.log(), q.log(), 0.0).item() == pytest.approx(plain, rel=1e-5)


def test_distillm2_closed_form():
    # one real token each side, V = 2
    s_pos = _logits_of(0.25, 0.75).view(1, 1, 2)
    t_pos = _logits_of(0.5, 0.5).view(1, 1, 2)
    s_neg = _logits_of(0.25, 0.75).view(1, 1, 2)
    t_neg = _logits_of(0.5, 0.5).view(1, 1, 2)
    m = torch.ones(1, 1)
    a = 0.1
    skl = 0.5 * math.log(0.5 / (a * 0.5 + (1 - a) * 0.25)) + 0.5 * math.log(0.5 / (a * 0.5 + (1 - a) * 0.75))
    srkl = 0.25 * math.log(0.25 / ((1 - a) * 0.5 + a * 0.25)) + 0.75 * math.log(0.75 / ((1 - a) * 0.5 + a * 0.75))
    got = distillm2_loss(s_pos, t_pos, s_neg, t_neg, m, m, alpha=a).item()
    assert got == pytest.approx(skl + srkl, rel=1e-5)


def test_distillm2_masking_and_stability():
    g = torch.Generator().manual_seed(0)
    s_pos, t_pos = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    s_neg, t_neg = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    m_pos = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    m_neg = torch.tensor([[1, 1, 0], [1, 0, 0]])
    base = distillm2_loss(s_pos, t_pos, s_neg, t_neg, m_pos, m_neg)
    junk = [x.clone() for x in (s_pos, t_pos, s_neg, t_neg)]
    for x, m in zip(junk, (m_pos, m_pos, m_neg, m_neg)):
        x[~m.bool()] = torch.tensor(float("nan"))
    junk[0][0, 3, 0] = float("inf")
    for x in junk:
        x.requires_grad_(True)
    again = distillm2_loss(*junk, m_pos, m_neg)
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    again.backward()
    assert torch.isfinite(junk[0].grad).all() and torch.isfinite(junk[2].grad).all()
    # huge logits stay finite
    big = distillm2_loss(s_pos * 1e4, t_pos * 1e4, s_neg * 1e4, t_neg * 1e4, m_pos, m_neg)
    assert torch.isfinite(big)


def test_distillm2_step_moves_student_toward_teacher():
    g = torch.Generator().manual_seed(1)
    s_pos = torch.randn(1, 3, 6, generator=g, requires_grad=True)
    s_neg = torch.randn(1, 3, 6, generator=g, requires_grad=True)
    t_pos, t_neg = torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 6, generator=g)
    m = torch.ones(1, 3)
    before = distillm2_loss(s_pos, t_pos, s_neg, t_neg, m, m)
    before.backward()
    with torch.no_grad():
        s_pos -= 0.5 * s_pos.grad
        s_neg -= 0.5 * s_neg.grad
    after = distillm2_loss(s_pos, t_pos, s_neg, t_neg, m, m)
    assert after.item() < before.item()
    # identical student and teacher: zero loss
    assert distillm2_loss(t_pos, t_pos, t_neg, t_neg, m, m).item() == pytest.approx(0.0, abs=1e-6)
