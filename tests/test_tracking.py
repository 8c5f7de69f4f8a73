"""Sweep bookkeeping: which keys a multirun sweeps, and the series its summary plots draw."""

from types import SimpleNamespace

from pipeline.tracking.sweep import sweep_series, swept_keys


def test_swept_keys_from_the_command_line_and_experiment_configs():
    assert swept_keys(["attack=fgsm", "eps=0.05,0.1,0.2"]) == ["eps"]
    assert swept_keys(["attack=fgsm,lbfgs", "seed=0", "eps=range(0.1,0.3,0.1)"]) == ["attack", "eps"]
    assert swept_keys(["experiment=szegedy_table1"], {"model": "fc10_1,fc100_100"}) == ["model"]
    assert swept_keys(["model=mlp,cnn"], {"model": "fc10_1"}) == ["model"]  # the command line wins


def _run(params, metrics):
    return SimpleNamespace(data=SimpleNamespace(params=params, metrics=metrics))


def test_series_against_the_numeric_key_one_line_per_other_value():
    runs = [
        _run({"eps": e, "attack.name": a}, {"success_rate": s})
        for e, a, s in (("0.2", "fgsm", 0.6), ("0.1", "fgsm", 0.2), ("0.1", "pgd", 0.5))
    ]
    x_key, series = sweep_series(runs, ["attack", "eps"], ("success_rate",))
    assert x_key == "eps"
    assert series["success_rate"] == {"attack=fgsm": ([0.1, 0.2], [0.2, 0.6]), "attack=pgd": ([0.1], [0.5])}


def test_series_against_a_categorical_key():
    runs = [_run({"model.name": m}, {"l2_mean": v}) for m, v in (("fc10", 1.0), ("cnn", 2.0))]
    x_key, series = sweep_series(runs, ["model"], ("l2_mean",))
    assert x_key == "model" and series["l2_mean"] == {"": (["cnn", "fc10"], [2.0, 1.0])}
