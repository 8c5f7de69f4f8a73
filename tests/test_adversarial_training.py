"""Adversarial training: the robustness it buys, its cache key, catastrophic overfitting caught while
training, TRADES' loss and inner attack, determinism, and what attack runs and sweeps record of it.

The end-to-end cases train a small CNN (16/32 channels) on 3000 images for 3 epochs of 60 batches
(180 steps): a few seconds per recipe on one CPU thread."""

import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.__main__ import main
from pipeline.attacks import fgsm, pgd
from pipeline.attacks.iterative import pgd_kl
from pipeline.attacks.projection import random_point
from pipeline.config import CONFIG_DIR, build, flatten
from pipeline.models import CNN, load_classifier
from pipeline.models.adversarial import Recipe, trades_loss
from pipeline.models.robustness import RobustnessMonitor
from pipeline.models.training import Checkpoint, checkpoint_for, checkpoint_hash, training_config
from pipeline.tracking.store import Tracker
from tests.conftest import DATA_ROOT, SMALL, attack_params, make_config, small_overrides
from tests.test_cli import invoke_ok, sweep_children

EPS = 0.3  # MNIST's L∞ radius for adversarial training (Madry et al.)

# the data and network every end-to-end recipe here shares
TINY = [
    "model.net.channels=[16,32]",
    "model.net.hidden=64",
    "data.module.val_size=1000",
    "train.n_train=3000",
    "train.epochs=3",
    "train.batch_size=50",
    "train.max_lr=2e-2",  # above the default's 5e-3: robust to PGD after 180 steps, not 1000s
    "train.log_every_n_steps=50",
    "seed=0",
]
# After a few hundred steps a healthy fast-recipe model still has FGSM − PGD accuracy ≈ 0.25-0.30
# (measured over seeds 0-4); a catastrophically overfit one > 0.6. The threshold sits between them.
GAP = 0.45
ADVERSARIAL = [
    "train=adversarial",
    "train.ramp_epochs=1",
    "train.robust_eval.n=100",
    f"train.overfit.gap={GAP}",
]
RECIPES = {
    "standard": ["train=default"],
    "fast": [*ADVERSARIAL, "train.method=fgsm_rs"],  # FGSM of 1.25·eps from a random start (Wong et al.)
    # plain FGSM (no random start, step eps): overfits catastrophically within 2 epochs here
    # (seed 0: FGSM − PGD accuracy 0.34, then 0.69; it does for 3 of seeds 0-4)
    "plain_fgsm": [*ADVERSARIAL, "train.method=n_fgsm", "train.noise=0", "train.overfit.action=stop"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core CPU two OpenMP threads wait on each other (the same
    training measured 146 s with two threads, 9 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Trained:
    net: nn.Module
    checkpoint: Checkpoint
    printed: str  # what training printed
    run: object  # its MLflow training run
    data: object  # the MNISTData it trained on


def _train(overrides: list[str], out, tracker: Tracker) -> Trained:
    cfg = make_config(small_overrides(out, *overrides))
    data = build(cfg.data.module)
    data.prepare_data()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        checkpoint = checkpoint_for(cfg, data, tracker)
    run = tracker.client.get_run(checkpoint.info["train_run_id"])
    return Trained(load_classifier(checkpoint.path), checkpoint, printed.getvalue(), run, data)


@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory):
    """recipe name → the model RECIPES[name] trains on TINY's data (each trained once per module)."""
    out = tmp_path_factory.mktemp("recipes")
    tracker = Tracker(f"sqlite:///{out}/mlflow.db", str(out / "artifacts"))
    models: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in models:
            models[name] = _train([*TINY, *RECIPES[name]], out, tracker)
        return models[name]

    return get


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def test_adversarial_training_resists_pgd_where_standard_training_does_not(trained):
    standard, defended = trained("standard"), trained("fast")
    _, images = standard.data.eval_subset(200, seed=0)
    x, y, _ = images.tensors
    clean, robust = {}, {}
    for name, model in (("standard", standard), ("fast", defended)):
        x_adv = pgd(model.net, x, y, EPS, **attack_params("pgd", steps=10), seeds=torch.arange(len(x)))
        clean[name], robust[name] = _accuracy(model.net, x, y), _accuracy(model.net, x_adv, y)
    # measured (seed 0): standard 0.96 clean / 0.00 under PGD-10; fast 0.945 / 0.52 (0.52-0.60 over seeds 0-4)
    assert robust["standard"] <= 0.05, robust
    assert robust["fast"] - robust["standard"] >= 0.25, robust
    assert min(clean.values()) >= 0.85, clean
    assert defended.checkpoint.info["val_pgd_accuracy"] >= 0.25  # the card's number agrees


# training keys that change no weight, left out of the cache key
NO_WEIGHT_KNOBS = {"force": True, "log_every_n_steps": 7, "name": "renamed"}
OTHER_STRINGS = {
    "method": ("fgsm_rs", "n_fgsm", "pgd", "trades"),
    "overfit.action": ("warn", "stop", "restart"),
}


def _changed(key: str, value):
    """Another value of a training setting, of the same kind."""
    if key in OTHER_STRINGS:
        return next(v for v in OTHER_STRINGS[key] if v != value)
    assert not isinstance(value, str), f"train.{key}: add its other values to OTHER_STRINGS"
    if value is None:
        return 100
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value * 2 if value else 0.5


@pytest.mark.parametrize("recipe", ["adversarial", "trades"])
def test_every_training_setting_is_in_the_cache_key(recipe, tmp_path):
    checksums = {"train-images-idx3-ubyte": "0" * 64}

    def digest(cfg) -> str:
        return checkpoint_hash(training_config(cfg, checksums))

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        base = [f"paths.outputs={tmp_path}", f"train={recipe}"]
        cfg = compose(config_name="config", overrides=base)
        settings = flatten(OmegaConf.to_container(cfg.train, resolve=True))
        expected = {"method", "eps", "alpha", "steps", "ramp_epochs", "epochs", "lr", "max_lr", "batch_size"}
        expected |= {
            "weight_decay",
            "n_train",
            "robust_eval.n",
            "robust_eval.steps",
            "overfit.gap",
            "overfit.action",
        }
        expected |= {"beta", "init_std"} if recipe == "trades" else {"noise"}
        assert expected <= set(settings) and set(NO_WEIGHT_KNOBS) <= set(settings)
        hashes = {}
        for key, value in settings.items():
            new = NO_WEIGHT_KNOBS[key] if key in NO_WEIGHT_KNOBS else _changed(key, value)
            hashes[key] = digest(compose(config_name="config", overrides=[*base, f"train.{key}={new}"]))
    unchanged = [key for key in settings if key not in NO_WEIGHT_KNOBS and hashes[key] == digest(cfg)]
    assert unchanged == [], f"train.{unchanged} left out of the cache key"
    assert all(hashes[key] == digest(cfg) for key in NO_WEIGHT_KNOBS)
    changed = [hashes[key] for key in settings if key not in NO_WEIGHT_KNOBS]
    assert len(set(changed)) == len(changed)  # no two settings collide either


def test_catastrophic_overfitting_is_caught_and_stops_training(trained):
    overfit, healthy = trained("plain_fgsm"), trained("fast")  # same data, seed and monitor
    card = overfit.checkpoint.info
    history = card["robustness_per_epoch"]
    (line,) = [line for line in overfit.printed.splitlines() if "catastrophic overfitting" in line]
    assert line.startswith(
        f"warning: catastrophic overfitting in epoch {history[-1]['epoch']}: PGD accuracy "
    )
    assert "(train.method=n_fgsm); training stopped" in line
    assert card["catastrophic_overfitting"].endswith(", stop")  # "epoch 1: FGSM 0.790 vs PGD 0.100, stop"
    assert overfit.run.data.tags["catastrophic_overfitting"] == card["catastrophic_overfitting"]
    assert json.loads(overfit.checkpoint.path.with_suffix(".json").read_text())["catastrophic_overfitting"]
    assert overfit.checkpoint.tags()["model.catastrophic_overfitting"] == card["catastrophic_overfitting"]
    assert card["epochs_run"] == len(history) < 3  # stopped early
    assert history[-1]["val_fgsm_accuracy"] - history[-1]["val_pgd_accuracy"] > GAP
    assert all(h["val_fgsm_accuracy"] - h["val_pgd_accuracy"] <= GAP for h in history[:-1])
    # the weights kept are the most robust epoch's: measured again, they score what that epoch did
    x, y = (t[:100] for t in overfit.data.val_set.tensors)
    monitor = RobustnessMonitor(eps=EPS, n=100, steps=10, gap=GAP, action="stop")
    best = history[card["best_epoch"]]
    assert monitor.measure(overfit.net, x, y) == pytest.approx({k: best[k] for k in best if k != "epoch"})

    info = healthy.checkpoint.info
    gaps = [h["val_fgsm_accuracy"] - h["val_pgd_accuracy"] for h in info["robustness_per_epoch"]]
    assert max(gaps) <= GAP - 0.1, gaps  # measured (seed 0): 0.25, 0.28, 0.26
    assert "catastrophic overfitting" not in healthy.printed
    assert info["catastrophic_overfitting"] is None and info["epochs_run"] == 3
    assert "catastrophic_overfitting" not in healthy.run.data.tags
    assert "model.catastrophic_overfitting" not in healthy.checkpoint.tags()


class FakeModule:
    """What RobustnessMonitor reads of a LightningModule: `net`, `device`, `recipe`, `log_dict`."""

    def __init__(self, recipe: Recipe) -> None:
        self.net = nn.Linear(4, 3)
        self.recipe = recipe
        self.device = torch.device("cpu")
        self.logged: list[dict] = []

    def log_dict(self, scores: dict, **kwargs) -> None:
        self.logged.append(scores)


def _epoch(monitor, trainer, module, epoch: int, fgsm_accuracy: float, pgd_accuracy: float) -> None:
    """One epoch's end, the monitor measuring the given accuracies."""
    scores = {"val_clean_accuracy": 0.9, "val_fgsm_accuracy": fgsm_accuracy, "val_pgd_accuracy": pgd_accuracy}
    monitor.measure = lambda net, x, y: scores
    trainer.current_epoch = epoch
    monitor.on_train_epoch_end(trainer, module)


def _weights(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("action", ["warn", "stop", "restart"])
def test_overfitting_actions(action, capsys):
    monitor = RobustnessMonitor(eps=EPS, n=5, steps=10, gap=0.3, action=action, method="fgsm_rs")
    module = FakeModule(Recipe(method="fgsm_rs", eps=EPS))
    val = TensorDataset(torch.rand(8, 4), torch.zeros(8, dtype=torch.long))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_set=val), current_epoch=0, should_stop=False)

    _epoch(monitor, trainer, module, 0, 0.6, 0.5)  # FGSM − PGD 0.1: healthy, the most robust so far
    best = _weights(module.net)
    with torch.no_grad():
        module.net.weight.add_(1.0)  # epoch 1 trains on
    overfit = _weights(module.net)
    _epoch(monitor, trainer, module, 1, 0.9, 0.2)  # FGSM − PGD 0.7 > 0.3

    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(
        "warning: catastrophic overfitting in epoch 1: PGD accuracy 0.200 while FGSM accuracy is 0.900 "
        "(train.method=fgsm_rs); "
    )
    (event,) = monitor.overfits
    assert (event.epoch, event.action) == (1, action)
    assert monitor.best_epoch == 0 and len(module.logged) == 2
    assert trainer.should_stop is (action == "stop")
    if action == "restart":  # back to epoch 0's weights, half the step from now on
        assert _same(_weights(module.net), best)
        assert module.recipe.step_scale == event.step_scale == 0.5
        assert module.recipe.step_size(EPS) == pytest.approx(0.5 * 1.25 * EPS)
        _epoch(monitor, trainer, module, 2, 0.8, 0.1)  # again: a quarter
        assert module.recipe.step_scale == 0.25
    else:
        assert _same(_weights(module.net), overfit)  # training goes on (or stops) where it was
        assert module.recipe.step_scale == 1.0
    monitor.on_fit_end(trainer, module)  # every action keeps the most robust epoch's weights
    assert _same(_weights(module.net), best)


def test_a_gap_within_the_threshold_is_no_overfitting(capsys):
    monitor = RobustnessMonitor(eps=EPS, n=5, steps=10, gap=0.3, action="stop")
    module = FakeModule(Recipe(method="fgsm_rs", eps=EPS))
    val = TensorDataset(torch.rand(8, 4), torch.zeros(8, dtype=torch.long))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_set=val), current_epoch=0, should_stop=False)
    _epoch(monitor, trainer, module, 0, 0.5, 0.25)
    _epoch(monitor, trainer, module, 1, 0.9, 0.65)
    assert monitor.overfits == [] and not trainer.should_stop and capsys.readouterr().out == ""
    assert monitor.best_epoch == 1


def test_no_overfitting_is_called_while_eps_ramps_up(capsys):
    # ramp_epochs=2: epoch 0 trains at up to eps/2, so its gap at eps is weakness, not masking
    monitor = RobustnessMonitor(eps=EPS, n=5, steps=10, gap=0.3, action="warn", ramp_epochs=2)
    module = FakeModule(Recipe(method="fgsm_rs", eps=EPS, ramp_epochs=2))
    val = TensorDataset(torch.rand(8, 4), torch.zeros(8, dtype=torch.long))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_set=val), current_epoch=0, should_stop=False)
    _epoch(monitor, trainer, module, 0, 0.5, 0.1)
    assert monitor.overfits == [] and capsys.readouterr().out == ""
    _epoch(monitor, trainer, module, 1, 0.7, 0.2)  # the radius reached eps in this epoch
    assert [o.epoch for o in monitor.overfits] == [1]


def _softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    exp = logits.exp()
    return exp / exp.sum(dim=1, keepdim=True)


def _trades_by_hand(
    clean: torch.Tensor, adversarial: torch.Tensor, y: torch.Tensor, beta: float
) -> torch.Tensor:
    """CE(clean, y) + beta · mean_i Σ_k p_ik log(p_ik / q_ik), p = softmax(clean) and
    q = softmax(adversarial), in plain tensor operations."""
    p, q = _softmax_by_hand(clean), _softmax_by_hand(adversarial)
    cross_entropy = -p[torch.arange(len(y)), y].log().mean()
    kl = (p * (p / q).log()).sum(dim=1).mean()
    return cross_entropy + beta * kl


def test_trades_loss_by_hand():
    # one image, fixed logits: CE = log(e² + 2) − 2; KL(p ‖ uniform) = Σ p_k log(3 p_k)
    clean, uniform = torch.tensor([[2.0, 0.0, 0.0]]), torch.zeros(1, 3)
    p = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    expected = math.log(math.exp(2) + 2) - 2 + 6 * sum(pk * math.log(3 * pk) for pk in p)
    assert trades_loss(clean, uniform, torch.tensor([0]), 6.0).item() == pytest.approx(expected, rel=1e-6)

    torch.manual_seed(0)
    net = nn.Linear(6, 4)  # a tiny model: logits of random inputs and of their perturbations
    x = torch.rand(5, 6)
    x_adv = (x + 0.2 * torch.randn(5, 6)).clamp(0, 1)
    y = torch.tensor([0, 1, 2, 3, 1])
    for beta in (0.0, 1.0, 6.0):
        loss = trades_loss(net(x), net(x_adv), y, beta)
        torch.testing.assert_close(loss, _trades_by_hand(net(x), net(x_adv), y, beta))
    assert trades_loss(net(x), net(x), y, 6.0).item() == pytest.approx(F.cross_entropy(net(x), y).item())

    # the trades recipe trains on that loss, x' from pgd_kl under the same random start
    recipe = Recipe(method="trades", eps=EPS, steps=3, beta=2.0)
    torch.manual_seed(1)
    loss, logits = recipe.loss(net, x, y, EPS)
    torch.manual_seed(1)
    x_kl = pgd_kl(net, x, y, EPS, alpha=2.5 * EPS / 3, steps=3, init_std=0.001)
    torch.testing.assert_close(loss, _trades_by_hand(net(x), net(x_kl), y, 2.0))
    torch.testing.assert_close(logits, net(x))


@pytest.fixture
def small_net_and_images():
    """A random small CNN and 16 images with saturated pixels (0 and 1, as MNIST's), labels."""
    torch.manual_seed(0)
    net = CNN(channels=(4, 8), hidden=16).eval()
    x = torch.rand(16, 1, 28, 28)
    x = torch.where(x < 0.5, torch.zeros_like(x), torch.where(x > 0.9, torch.ones_like(x), x))
    return net, x, torch.randint(0, 10, (16,))


def _kl_from_clean(net: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per image KL(f(x) ‖ f(z))."""
    with torch.no_grad():
        p, q = F.log_softmax(net(x), dim=1), F.log_softmax(net(z), dim=1)
    return (p.exp() * (p - q)).sum(dim=1)


def test_pgd_kl_stays_in_the_ball_raises_the_kl_and_is_reproducible(small_net_and_images):
    net, x, y = small_net_and_images
    init_std = 0.001
    torch.manual_seed(3)
    z = pgd_kl(net, x, y, EPS, alpha=None, steps=10, init_std=init_std)
    torch.manual_seed(3)
    start = torch.minimum(torch.maximum(x + init_std * torch.randn_like(x), x - EPS), x + EPS).clamp(0, 1)

    assert (z - x).abs().max() <= EPS + 1e-6 and z.min() >= 0 and z.max() <= 1
    assert (_kl_from_clean(net, x, z) > 10 * _kl_from_clean(net, x, start)).all()
    torch.manual_seed(3)
    assert torch.equal(pgd_kl(net, x, y, EPS, alpha=None, steps=10, init_std=init_std), z)
    torch.manual_seed(3)  # labels are not used
    assert torch.equal(pgd_kl(net, x, y.roll(1), EPS, alpha=None, steps=10, init_std=init_std), z)
    torch.manual_seed(3)  # no step: the noisy start
    torch.testing.assert_close(pgd_kl(net, x, y, EPS, alpha=None, steps=0, init_std=init_std), start)


def test_fgsm_rs_step_by_hand(small_net_and_images):
    net, x, y = small_net_and_images
    torch.manual_seed(7)
    got = Recipe(method="fgsm_rs", eps=EPS).adversarials(net, x, y, EPS)
    torch.manual_seed(7)
    start = random_point(x, EPS, "linf", None, 0)  # x + uniform(−eps, eps), in [0, 1]
    delta0 = start - x
    assert delta0.abs().max() <= EPS + 1e-6 and delta0.std() > EPS / 4  # spread over the ball
    z = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(z), y, reduction="sum"), z)
    expected = (x + (delta0 + 1.25 * EPS * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.equal(got, start)  # the step moved it

    # the overfitting recipe above: n_fgsm without noise is plain FGSM of step eps from x
    plain = Recipe(method="n_fgsm", eps=EPS, noise=0.0).adversarials(net, x, y, EPS)
    assert torch.equal(plain, fgsm(net, x, y, EPS))


def test_same_config_and_seed_give_identical_weights_and_robustness(mnist_root, tmp_path):
    overrides = [
        *TINY,
        *ADVERSARIAL,
        "train.n_train=500",
        "train.epochs=2",
        "train.robust_eval.n=50",
        "train.force=true",
    ]
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    first, second = (_train(overrides, tmp_path / folder, tracker) for folder in ("first", "second"))
    a, b = first.checkpoint, second.checkpoint
    assert a.hash == b.hash and a.path != b.path and a.info["train_run_id"] != b.info["train_run_id"]
    weights_a, weights_b = first.net.state_dict(), second.net.state_dict()
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert len(a.info["robustness_per_epoch"]) == 2
    assert a.info["robustness_per_epoch"] == b.info["robustness_per_epoch"]
    assert a.info["test_accuracy"] == b.info["test_accuracy"]
    for metric in ("val_clean_accuracy", "val_fgsm_accuracy", "val_pgd_accuracy"):
        histories = [
            [m.value for m in tracker.client.get_metric_history(model.run.info.run_id, metric)]
            for model in (first, second)
        ]
        assert len(histories[0]) == 2 and histories[0] == histories[1], metric


def test_attack_runs_carry_the_model_card_and_a_recipe_sweep_draws_one_line_per_recipe(
    mnist_root, store, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "argv", sys.argv)
    tiny = [
        "model.net.channels=[16,32]",
        "model.net.hidden=64",
        "data.module.val_size=1000",
        "train.n_train=300",
    ]
    sweep = ["train=default,adversarial", "attack=fgsm", "eps=0.1,0.3", "-m"]
    invoke_ok(
        main,
        [*SMALL, f"paths.data={DATA_ROOT}", *tiny, "train.batch_size=50", "n_eval=100", *sweep],
        tmp_path,
    )

    parents, children = sweep_children(store)
    (parent,) = parents
    kids = children[parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(kids) == 4
    assert parent.data.tags["sweep.swept_keys"] == "train,eps"
    for kid in kids:
        tags = kid.data.tags
        card = json.loads(Path(tags["checkpoint"]).with_suffix(".json").read_text())
        for key in ("recipe", "test_accuracy", "train_run_id"):
            assert tags[f"model.{key}"] == str(card[key]), key
        if kid.data.params["train.name"] == "adversarial":
            method = kid.data.params[
                "train.method"
            ]  # "adversarial pgd eps=0.3 ramp_epochs=2 steps=3, 1 epochs"
            assert tags["model.recipe"].startswith(f"adversarial {method} eps=0.3 ramp_epochs=2")
            assert tags["model.recipe"].endswith(", 1 epochs")
            assert tags["model.val_pgd_accuracy"] == str(card["val_pgd_accuracy"])
            assert tags["model.best_epoch"] == "0"
        else:
            assert tags["model.recipe"] == "default, 1 epochs"
            assert "model.val_pgd_accuracy" not in tags and "model.best_epoch" not in tags

    client = MlflowClient(store)
    series = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "summary_series.json", str(tmp_path))).read_text()
    )
    for metric in ("adv_accuracy", "success_rate"):
        assert set(series[metric]) == {"train=default", "train=adversarial"}, series[metric].keys()
        for line in series[metric].values():
            assert line["eps"] == [0.1, 0.3]
