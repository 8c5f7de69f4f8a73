"""Metrics on hand-made cases: success only over clean-correct images, norms, aggregation.
Then every public function against a brute-force reference in plain Python on random inputs (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.metrics import (
    EXTRA_KEYS,
    METRIC_KEYS,
    MIN_NORM_KEYS,
    l0,
    l2,
    linf,
    min_norm_summary,
    per_sample,
    robustness_curve,
    summarize,
    szegedy_distortion,
)


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
    x_adv[0, 0, 0, 0] = 0.3  # image 0: one pixel, +0.3
    x_adv[1] = 0.1  # image 1: all four pixels, +0.1
    y = torch.tensor([0, 1, 2, 3])
    clean = _logits([0, 1, 0, 3])  # image 2 misclassified before the attack
    adv = _logits([1, 1, 0, 2])  # images 0 and 3 flipped, image 1 held, image 2 still wrong
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
    clean[:, 0] = 5.0  # all three correct when clean
    adv = torch.arange(8.0).repeat(3, 1)  # class 0 ranked last: out of the top 5
    adv[1, 0] = 3.5  # ranked 4th: still in the top 5
    adv[2] = 0.0
    adv[2, 0] = 1.0  # still the top-1
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
    samples = {
        "l2": torch.rand(n, generator=g) * 3,
        "success": torch.rand(n, generator=g) > 0.3,
        "clean_correct": torch.rand(n, generator=g) > 0.1,
    }
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


# ---- brute-force references: plain Python over lists of floats, one image at a time ----

SETTINGS = settings(max_examples=60, deadline=None)
NAN = float("nan")


def _close(got, want):
    return (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)


def _mean(values):
    return sum(values) / len(values)


def _lower_median(values):
    return sorted(values)[(len(values) - 1) // 2]  # torch.median: the lower middle value of an even count


def _argmax(row):
    return row.index(max(row))  # the first of tied maxima, as torch.max documents


def _softmax(row):
    exps = [math.exp(v - max(row)) for v in row]
    return [e / sum(exps) for e in exps]


def _left_top5(logits, y):
    """Whether class y is out of the 5 largest logits; None where ties straddle the cut (topk's order
    among ties is unspecified)."""
    above = sum(v > logits[y] for v in logits)
    level = sum(v >= logits[y] for j, v in enumerate(logits) if j != y)
    return True if above >= 5 else False if level < 5 else None


def _distances(row):
    squares = sum(v * v for v in row)
    return {
        "l0": sum(v != 0 for v in row),
        "l2": math.sqrt(squares),
        "linf": max(abs(v) for v in row),
        "distortion": math.sqrt(squares / len(row)),
    }


def _per_sample(x, x_adv, y, clean, adv, target):
    out = []
    for i in range(len(y)):
        clean_pred, adv_pred = _argmax(clean[i]), _argmax(adv[i])
        correct = clean_pred == y[i]
        fooled = adv_pred == target[i] if target is not None else adv_pred != y[i]
        out.append(
            {
                "clean_pred": clean_pred,
                "clean_confidence": max(_softmax(clean[i])),
                "adv_pred": adv_pred,
                "adv_confidence": max(_softmax(adv[i])),
                "clean_correct": correct,
                "adv_correct": adv_pred == y[i],
                "success": correct and fooled,
                "top5_success": correct and _left_top5(adv[i], y[i]),
                **_distances([b - a for a, b in zip(x[i], x_adv[i], strict=True)]),
            }
        )
    return out


def _summarize(s):
    correct = [i for i, c in enumerate(s["clean_correct"]) if c]
    found = [d for d, ok in zip(s["distortion"], s["success"], strict=True) if ok]

    def rate(key):
        return sum(s[key][i] for i in correct) / len(correct) if correct else NAN

    return {
        "clean_accuracy": _mean(s["clean_correct"]),
        "adv_accuracy": _mean(s["adv_correct"]),
        "success_rate": rate("success"),
        "top5_success_rate": rate("top5_success"),
        "l2_mean": _mean(s["l2"]),
        "l2_median": _lower_median(s["l2"]),
        "linf_mean": _mean(s["linf"]),
        "linf_max": max(s["linf"]),
        "l0_mean": _mean(s["l0"]),
        "confidence_adv_mean": _mean(s["adv_confidence"]),
        "confidence_clean_mean": _mean(s["clean_confidence"]),
        "szegedy_distortion_mean": _mean(found) if found else NAN,
    }


def _successful_l2(s):
    return [d for d, ok in zip(s["l2"], s["success"], strict=True) if ok]


# ---- random inputs ----

shapes = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)  # one image: (1,2,3), (2,), ...
pixels = st.sampled_from([0.0, 1.0]) | st.floats(0, 1, width=32)
# small integers give exact ties; tiny floats give logits closer than float32's softmax can tell apart
logits_values = (
    st.integers(-2, 2).map(float) | st.floats(-20, 20, width=32) | st.floats(-(2.0**-20), 2.0**-20, width=32)
)


@st.composite
def attack_batches(draw):
    # 6 classes often: only there can the true class leave the top 5
    n, shape, k = draw(st.integers(1, 8)), draw(shapes), draw(st.integers(2, 6) | st.just(6))
    size = math.prod(shape)
    x = draw(st.lists(st.lists(pixels, min_size=size, max_size=size), min_size=n, max_size=n))
    # None keeps the clean pixel: exact zeros in the perturbation, whole images untouched
    moves = draw(st.lists(st.lists(st.none() | pixels, min_size=size, max_size=size), min_size=n, max_size=n))
    x_adv = [
        [p if q is None else q for p, q in zip(a, m, strict=True)] for a, m in zip(x, moves, strict=True)
    ]
    labels = st.lists(st.integers(0, k - 1), min_size=n, max_size=n)
    logit_row = st.lists(logits_values, min_size=k, max_size=k)
    clean = draw(st.lists(logit_row, min_size=n, max_size=n))
    # labels: all the clean prediction, all another class (no clean-correct image: NaN rates), or random
    shift = draw(st.sampled_from([0, 1, None]))
    y = draw(labels) if shift is None else [(_argmax(row) + shift) % k for row in clean]
    # per image, adversarial logits unchanged (no untargeted success), negated (the clean prediction
    # ranked last: out of the top 5 of 6 classes) or new
    adv = [draw(st.sampled_from([row, [-v for v in row]]) | logit_row) for row in clean]
    return shape, x, x_adv, y, clean, adv, draw(st.none() | labels)


def _run_per_sample(shape, x, x_adv, y, clean, adv, target):
    images = [torch.tensor(v).reshape(len(y), *shape) for v in (x, x_adv)]
    targets = None if target is None else torch.tensor(target)
    samples = per_sample(*images, torch.tensor(y), torch.tensor(clean), torch.tensor(adv), targets)
    return {key: value.tolist() for key, value in samples.items()}


@st.composite
def outcomes(draw):
    """Per-image outcomes as per_sample gives them: success only among the clean-correct images."""
    n = draw(st.integers(1, 8))
    flags = st.lists(st.booleans(), min_size=n, max_size=n)
    correct, hit = draw(flags), draw(flags)
    norms = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 10, width=32)  # zeros and repeats included
    return {
        "clean_correct": torch.tensor(correct),
        "success": torch.tensor([c and h for c, h in zip(correct, hit, strict=True)]),
        "l2": torch.tensor(draw(st.lists(norms, min_size=n, max_size=n))),
    }


# ---- the properties ----


@SETTINGS
@given(shape=shapes, n=st.integers(1, 8), data=st.data())
def test_distances_match_brute_force(shape, n, data):
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0]) | st.floats(-1, 1, width=32)
    size = math.prod(shape)
    delta = data.draw(st.lists(st.lists(values, min_size=size, max_size=size), min_size=n, max_size=n))
    got = {
        name: f(torch.tensor(delta).reshape(n, *shape)).tolist()
        for name, f in [("l0", l0), ("l2", l2), ("linf", linf), ("distortion", szegedy_distortion)]
    }
    for i, row in enumerate(delta):
        want = _distances(row)
        assert got["l0"][i] == want["l0"]
        for name in ("l2", "linf", "distortion"):
            assert _close(got[name][i], want[name]), (name, i)


@SETTINGS
@given(case=attack_batches())
def test_per_sample_matches_brute_force(case):
    shape, x, x_adv, y, clean, adv, target = case
    got = _run_per_sample(*case)
    for i, want in enumerate(_per_sample(x, x_adv, y, clean, adv, target)):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert _close(got[key][i], value), (key, i)
            elif value is not None:  # None: top-5 membership decided by a tie
                assert got[key][i] == value, (key, i)


@SETTINGS
@given(case=attack_batches())
def test_summarize_matches_brute_force(case):
    samples = _run_per_sample(*case)
    got = summarize({key: torch.tensor(value) for key, value in samples.items()})
    want = _summarize(samples)
    assert got.keys() == want.keys() and set(got) <= {*METRIC_KEYS, *EXTRA_KEYS}
    for key, value in want.items():
        assert _close(got[key], value), key


@SETTINGS
@given(samples=outcomes())
def test_min_norm_summary_matches_brute_force(samples):
    found = _successful_l2({key: value.tolist() for key, value in samples.items()})
    got = min_norm_summary(samples)
    assert tuple(got) == MIN_NORM_KEYS
    assert _close(got["min_l2_mean"], _mean(found) if found else NAN)
    assert _close(got["min_l2_median"], _lower_median(found) if found else NAN)


@SETTINGS
@given(samples=outcomes(), points=st.integers(2, 8))
def test_robustness_curve_matches_brute_force(samples, points):
    s = {key: value.tolist() for key, value in samples.items()}
    top = max(_successful_l2(s), default=0.0)
    radii, accuracy = robustness_curve(samples, points)
    if top > 0:
        assert len(radii) == points and radii[0] == 0.0 and radii[-1] == top
        assert all(_close(r, top * i / (points - 1)) for i, r in enumerate(radii))
    else:  # nothing to sweep: every radius is 0
        assert radii and set(radii) == {0.0}
    images = list(zip(s["clean_correct"], s["success"], s["l2"], strict=True))
    for r, acc in zip(radii, accuracy, strict=True):
        assert _close(acc, _mean([c and not (ok and d <= r) for c, ok, d in images])), r


def test_prediction_is_the_argmax_of_the_logits_even_when_softmax_cannot_tell_them_apart():
    logits = torch.tensor([[0.0, 1e-8], [-8.47e-8, -6.05e-8]])
    samples = per_sample(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1, 1]), logits, logits)
    assert samples["clean_pred"].tolist() == [1, 1] and samples["clean_correct"].all()
    assert samples["clean_confidence"].tolist() == pytest.approx([0.5, 0.5])
