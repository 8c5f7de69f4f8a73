"""Metrics on hand-made cases: success only over clean-correct images, norms, aggregation."""

import math

import pytest
import torch

from pipeline.metrics import l0, l2, linf, per_sample, summarize


def _logits(predictions, n_classes=4):
    """Logits whose argmax is `predictions`, with softmax confidence known exactly."""
    logits = torch.zeros(len(predictions), n_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = math.log(3.0)
    return logits  # winner: 3 / (3 + n_classes - 1)


def test_distances_by_hand():
    delta = torch.tensor([[[[0.1, 0.0], [0.0, -0.2]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2,1,2,2)
    assert l0(delta).tolist() == [2.0, 0.0]
    assert torch.allclose(l2(delta), torch.tensor([math.sqrt(0.05), 0.0]))
    assert torch.allclose(linf(delta), torch.tensor([0.2, 0.0]))


def _case(target=None):
    x = torch.zeros(4, 1, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = 0.3          # image 0: one pixel, +0.3
    x_adv[1] = 0.1                   # image 1: all four pixels, +0.1
    y = torch.tensor([0, 1, 2, 3])
    clean = _logits([0, 1, 0, 3])    # image 2 misclassified before the attack
    adv = _logits([1, 1, 0, 2])      # images 0 and 3 flipped, image 1 held, image 2 still wrong
    return per_sample(x, x_adv, y, clean, adv, target)


def test_untargeted_success_counts_only_clean_correct_images():
    samples = _case()
    assert samples["success"].tolist() == [True, False, False, True]
    metrics = summarize(samples)
    assert metrics["clean_accuracy"] == 0.75
    assert metrics["adv_accuracy"] == 0.25
    assert metrics["success_rate"] == pytest.approx(2 / 3)
    assert metrics["top5_success_rate"] == 0  # with 4 classes the true one is always in the top 5
    assert metrics["confidence_clean_mean"] == pytest.approx(0.5)


def test_top5_success_means_the_true_class_left_the_top_5():
    y = torch.tensor([0, 0, 0])
    clean = torch.zeros(3, 8)
    clean[:, 0] = 5.0                                   # all three correct when clean
    adv = torch.arange(8.0).repeat(3, 1)                # class 0 ranked last: out of the top 5
    adv[1, 0] = 3.5                                     # ranked 4th: still in the top 5
    adv[2] = 0.0
    adv[2, 0] = 1.0                                     # still the top-1
    samples = per_sample(torch.zeros(3, 1), torch.zeros(3, 1), y, clean, adv)
    assert samples["top5_success"].tolist() == [True, False, False]
    assert samples["success"].tolist() == [True, True, False]
    assert summarize(samples)["top5_success_rate"] == pytest.approx(1 / 3)


def test_targeted_success_means_reaching_the_target():
    # image 0 reaches its target, 3 is flipped but to the wrong class, 2 reaches it but was wrong anyway
    samples = _case(target=torch.tensor([1, 2, 0, 1]))
    assert samples["success"].tolist() == [True, False, False, False]
    assert summarize(samples)["success_rate"] == pytest.approx(1 / 3)


def test_norm_and_confidence_aggregates():
    metrics = summarize(_case())
    assert metrics["l0_mean"] == pytest.approx((1 + 4 + 0 + 0) / 4)
    assert metrics["l2_mean"] == pytest.approx((0.3 + 0.2) / 4)
    assert metrics["l2_median"] == pytest.approx(0.0)  # torch's lower median of [0, 0, .2, .3]
    assert metrics["linf_mean"] == pytest.approx((0.3 + 0.1) / 4)
    assert metrics["linf_max"] == pytest.approx(0.3)
    assert metrics["confidence_adv_mean"] == pytest.approx(0.5)  # 3 / (3 + 3)
    # Szegedy's distortion sqrt(sum r² / n), n = 4 values, over the successful images 0 and 3
    assert metrics["szegedy_distortion_mean"] == pytest.approx((0.3 / 2 + 0.0) / 2)


def test_success_rate_is_nan_when_nothing_is_classified_correctly():
    x = torch.zeros(2, 1, 2, 2)
    samples = per_sample(x, x, torch.tensor([0, 1]), _logits([1, 0]), _logits([1, 0]))
    metrics = summarize(samples)
    assert math.isnan(metrics["success_rate"]) and math.isnan(metrics["szegedy_distortion_mean"])


def test_robustness_curve_against_brute_force():
    from pipeline.metrics import min_norm_summary, robustness_curve

    g = torch.Generator().manual_seed(0)
    n = 50
    samples = {"l2": torch.rand(n, generator=g) * 3, "success": torch.rand(n, generator=g) > 0.3,
               "clean_correct": torch.rand(n, generator=g) > 0.1}
    samples["success"] &= samples["clean_correct"]
    radii, accuracy = robustness_curve(samples, points=20)
    for r, acc in zip(radii, accuracy, strict=True):
        columns = zip(samples["clean_correct"], samples["success"], samples["l2"], strict=True)
        robust = [bool(c) and not (bool(s) and float(d) <= r) for c, s, d in columns]
        assert acc == pytest.approx(sum(robust) / n)
    found = sorted(float(d) for d, s in zip(samples["l2"], samples["success"], strict=True) if s)
    summary = min_norm_summary(samples)
    assert summary["min_l2_mean"] == pytest.approx(sum(found) / len(found))
    assert summary["min_l2_median"] == pytest.approx(found[(len(found) - 1) // 2])
    assert radii[-1] == pytest.approx(found[-1])
