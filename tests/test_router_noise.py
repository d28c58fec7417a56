"""The router's training noise perturbs the order of near-tied tokens without changing how many
tokens are kept, or which kind, at any temperature (planted-signal features: a question topic and
a planted fraction of image tokens aligned with it)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slime_adapters import CosineTokenRouter

B, N, L, D = 8, 576, 8, 64


def _planted(seed: int, signal: float = 0.6, relevant_frac: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    topic = F.normalize(torch.randn(B, 1, D, generator=g, dtype=torch.float64), dim=-1)
    text = 0.8 * topic + 0.6 * F.normalize(torch.randn(B, L, D, generator=g,
                                                       dtype=torch.float64), dim=-1)
    relevant = torch.rand(B, N, generator=g).argsort(1).argsort(1) < round(relevant_frac * N)
    alpha = relevant.double().unsqueeze(-1) * signal
    other = F.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    image = alpha * topic + (1 - alpha**2).sqrt() * other
    return image * (0.5 + torch.rand(B, N, 1, generator=g, dtype=torch.float64)), text, relevant


def _kept_and_recall(router, image, text, relevant, draws: int = 4):
    kept, recall = [], []
    for _ in range(draws):
        keep = router(image, text).keep_mask
        kept.append(keep.double().mean().item())
        recall.append(((keep & relevant).sum() / relevant.sum()).item())
    return sum(kept) / draws, sum(recall) / draws


@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.02])
@pytest.mark.parametrize("gamma", [0.5, 0.95])
def test_training_keeps_as_many_and_the_same_kind_as_eval(temperature, gamma):
    image, text, relevant = _planted(seed=int(100 * temperature) + int(10 * gamma))
    router = CosineTokenRouter(gamma=gamma, temperature=temperature, noise_std=0.1)
    torch.manual_seed(0)
    eval_kept, eval_recall = _kept_and_recall(router.eval(), image, text, relevant, draws=1)
    train_kept, train_recall = _kept_and_recall(router.train(), image, text, relevant)
    assert 1 / 1.5 <= train_kept / eval_kept <= 1.5, (train_kept, eval_kept)
    assert abs(train_recall - eval_recall) <= 0.1, (train_recall, eval_recall)


def test_noise_std_is_in_logit_units_at_every_temperature():
    # the same draw moves the logits s / T by the same amount whatever T
    image, text, _ = _planted(seed=3)
    picks = []
    for temperature in (1.0, 0.01):
        router = CosineTokenRouter(gamma=0.5, temperature=temperature, noise_std=0.3).train()
        torch.manual_seed(7)
        noisy = router(image, text).scores
        eval_scores = router.eval()(image, text).scores
        # log-probabilities differ from eval's by the noise minus a per-row constant
        delta = noisy.log() - eval_scores.log()
        delta = delta - delta.mean(dim=1, keepdim=True)
        picks.append(delta)
        assert math.isclose(delta.std().item(), 0.3, rel_tol=0.05), delta.std().item()
    assert torch.allclose(picks[0], picks[1], atol=1e-6)


def test_training_noise_still_reorders_near_ties():
    image, text, _ = _planted(seed=5, signal=0.0)  # no signal: every score is a near tie
    router = CosineTokenRouter(gamma=0.5, temperature=0.02, noise_std=0.1)
    eval_keep = router.eval()(image, text).keep_mask
    torch.manual_seed(1)
    train_keep = router.train()(image, text).keep_mask
    assert not torch.equal(eval_keep, train_keep)
