"""Target strategies for targeted attacks."""

import torch

from pipeline.attacks.targets import choose_targets, random_offsets


def test_strategies():
    y = torch.tensor([0, 3, 9])
    logits = torch.tensor(
        [
            [5.0, 1, 2, 0.5, 3, 3, 3, 3, 3, 3],
            [1.0, 0, 2, 9, 3, 3, 3, 3, 3, 3],
            [1.0, 2, 2, 2, 3, 3, 3, -1, 3, 9],
        ]
    )
    assert choose_targets("next", y, logits).tolist() == [1, 4, 0]
    assert choose_targets("least_likely", y, logits).tolist() == [3, 1, 7]
    assert choose_targets(4, y, logits).tolist() == [4, 4, 4]


def test_random_targets_are_seeded_and_never_the_true_class():
    y = torch.randint(0, 10, (1000,))
    logits = torch.zeros(1000, 10)
    first = choose_targets("random", y, logits, random_offsets(1000, 10, seed=0))
    again = choose_targets("random", y, logits, random_offsets(1000, 10, seed=0))
    other = choose_targets("random", y, logits, random_offsets(1000, 10, seed=1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first != y).all()
    assert set(first.tolist()) == set(range(10))
