"""The AutoAttack ensemble's bookkeeping, transfer attacks and the gradient-masking checks: which
component broke each image, components run only on images still robust, the tracked breakdown, a
surrogate's adversarials evaluated on the attacked model, and masked gradients caught."""

import inspect
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from pipeline import masking
from pipeline.attacks import ensemble as aa
from pipeline.attacks import fgsm, pgd
from pipeline.config import attack_config, config_hash
from pipeline.metrics import component_summary
from pipeline.run import run
from tests.conftest import all_runs, attack_params, make_config, small_overrides
from tests.test_attack_properties import cases, random_problem

QUICK = {"quick": [{"name": "fgsm", "attack": "fgsm"}, {"name": "pgd", "attack": "pgd", "steps": 10}]}


def _relu_problem(n=40, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)]
    model = nn.Sequential(*layers).eval().requires_grad_(False)
    x = torch.rand(n, 1, 6, 6)
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 5  # four images misclassified before any attack
    return model, x, y


def test_each_image_is_credited_to_the_first_component_that_breaks_it():
    model, x, y = _relu_problem()  # at eps 0.2 fgsm breaks 5 images, pgd 5 more, 26 stay robust
    seeds = torch.arange(len(x))
    info: dict = {}
    x_adv = aa.autoattack(
        model, x, y, 0.2, norm="linf", version="quick", versions=QUICK, seeds=seeds, info=info
    )
    by_fgsm = model(fgsm(model, x, y, 0.2)).argmax(1) != y
    pgd_alone = pgd(model, x, y, 0.2, **attack_params("pgd", steps=10), seeds=seeds + aa.SEED_STRIDE)
    by_pgd = model(pgd_alone).argmax(1) != y
    correct = model(x).argmax(1) == y
    expected = torch.full_like(y, aa.ROBUST)
    expected[correct & ~by_fgsm & by_pgd] = 1
    expected[correct & by_fgsm] = 0
    expected[~correct] = aa.MISCLASSIFIED
    assert torch.equal(info[aa.BROKEN_BY], expected)
    assert (
        0 < int((expected == 0).sum()) and 0 < int((expected == 1).sum()) and 0 < int((expected == -1).sum())
    )
    # robust accuracy is the accuracy under the per-image worst case of the components
    assert torch.equal(model(x_adv).argmax(1) == y, correct & ~by_fgsm & ~by_pgd)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6
    summary = component_summary(info[aa.BROKEN_BY], info[aa.COMPONENT_SECONDS], ["fgsm", "pgd"], 2.0)
    assert summary["broken"] == [int((expected == 0).sum()), int((expected == 1).sum())]
    assert summary["robust_accuracy_after"][-1] == pytest.approx(float((expected == -1).float().mean()))
    assert sum(summary["seconds"]) == pytest.approx(2.0)


def test_a_component_sees_only_the_images_every_earlier_one_failed_on(monkeypatch):
    # a model that reads the mean pixel: bright images are class 0, dark ones class 1
    class Brightness(nn.Module):
        def forward(self, x):
            s = x.flatten(1).mean(1) - 0.5
            return torch.stack([s, -s], 1)

    model = Brightness()
    x = 0.6 + 0.4 * torch.rand(10, 1, 4, 4)
    y = torch.zeros(10, dtype=torch.long)
    seen = []

    def darken_every_other(model, x, y, eps, **kwargs):  # breaks the first, third, ... image given
        out = x.clone()
        out[::2] = 1 - x[::2]
        return out

    def record(model, x, y, eps, **kwargs):
        seen.append(x.clone())
        return x

    monkeypatch.setattr(
        aa, "_attack", lambda name: ({"first": darken_every_other, "second": record}[name], {})
    )
    versions = {"v": [{"name": "a", "attack": "first"}, {"name": "b", "attack": "second"}]}
    info: dict = {}
    x_adv = aa.autoattack(model, x, y, 1.0, norm="linf", version="v", versions=versions, info=info)
    assert torch.equal(seen[0], x[1::2])
    assert torch.equal(x_adv[::2], 1 - x[::2]) and torch.equal(x_adv[1::2], x[1::2])
    assert info[aa.BROKEN_BY].tolist() == [0, aa.ROBUST] * 5


def test_autoattack_refuses_targets_and_unknown_versions():
    model, x, y = _relu_problem(4)
    with pytest.raises(ValueError, match="untargeted"):
        aa.autoattack(model, x, y, 0.1, norm="linf", version="quick", versions=QUICK, targeted=True, target=y)
    with pytest.raises(ValueError, match="version='nope'"):
        aa.autoattack(model, x, y, 0.1, norm="linf", version="nope", versions=QUICK)


class Quantised(nn.Module):
    """`net` on inputs rounded to 1/4 steps: the gradient is zero everywhere (shattered gradients,
    Athalye et al.'s first case), so gradient attacks cannot move while black-box ones can."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


def test_masked_gradients_are_caught_by_square_and_by_the_unbounded_budget(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:96], y[:96]
    masked = Quantised(model).eval()
    versions = {
        "v": [
            {"name": "pgd", "attack": "pgd", "steps": 10},
            {"name": "square", "attack": "square", "queries": 300},
        ]
    }
    parts = aa.components(versions, "v")
    counts = {}
    for name, net in (("plain", model), ("masked", masked)):
        info: dict = {}
        aa.autoattack(
            net, x, y, 0.15, norm="linf", version="v", versions=versions, seeds=torch.arange(96), info=info
        )
        suspicion = masking.blackbox_beats_whitebox(info, parts, tolerance=0.01)
        counts[name] = suspicion.count if suspicion else 0
    assert counts["masked"] >= 10 and counts["masked"] > 3 * counts["plain"]

    # at eps 0.5 a working attack fools (almost) every image; through masked gradients it cannot
    for net, suspect in ((model, False), (masked, True)):
        x_adv = pgd(net, x, y, 0.5, **attack_params("pgd", steps=20), seeds=torch.arange(96))
        accuracy = (net(x_adv).argmax(1) == y).float().mean().item()
        found = masking.unbounded_not_reached([0.5], "linf", [{"adv_accuracy": accuracy}], 0.5, 0.05)
        assert (found is not None) == suspect, accuracy


def test_transfer_check_counts_images_only_the_transfer_fooled():
    samples = {
        "success": torch.tensor([True, True, False, True]),
        "whitebox_success": torch.tensor([True, False, False, True]),
    }
    found = masking.transfer_beats_whitebox(samples, tolerance=0.1)
    assert found is not None and found.count == 1 and "1 of 4" in found.message
    assert masking.transfer_beats_whitebox(samples, tolerance=0.25) is None
    samples["whitebox_success"][1] = True
    assert masking.transfer_beats_whitebox(samples, tolerance=0.0) is None


def test_autoattack_run_logs_the_components_breakdown(mnist_root, store, tmp_path, capsys):
    versions = "[{name:fgsm,attack:fgsm},{name:pgd,attack:pgd,steps:3}]"
    metrics = run(
        make_config(
            small_overrides(
                tmp_path, "attack=autoattack", f"+attack.versions.quick={versions}", "attack.version=quick"
            )
        )
    )
    assert metrics["adv_accuracy"] == pytest.approx(metrics["robust_accuracy_after_pgd"])
    assert metrics["robust_accuracy_after_fgsm"] >= metrics["robust_accuracy_after_pgd"]
    n = 200
    broken = metrics["broken_by_fgsm"] + metrics["broken_by_pgd"]
    assert broken == round(n * (metrics["clean_accuracy"] - metrics["adv_accuracy"]))
    assert "broken_by_median" not in metrics
    printed = capsys.readouterr().out
    assert f"  components: fgsm broke {metrics['broken_by_fgsm']:.0f} → " in printed
    (attack_run,) = [r for r in all_runs(store, "mnist") if r.data.tags.get("stage") == "attack"]
    client = MlflowClient(store)
    run_id = attack_run.info.run_id
    assert {"components_eps0.1.json", "components_eps0.1.png"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    table = json.loads(
        open(client.download_artifacts(run_id, "components_eps0.1.json", str(tmp_path))).read()
    )
    assert table["columns"] == ["component", "broken", "robust_accuracy_after", "seconds"]
    assert [row[0] for row in table["data"]] == ["fgsm", "pgd"]


def test_a_transfer_from_the_attacked_model_itself_equals_the_white_box_attack(mnist_root, store, tmp_path):
    run(make_config(small_overrides(tmp_path)))  # trains and caches the attacked CNN
    (checkpoint,) = (tmp_path / "checkpoints").glob("cnn-*.ckpt")
    metrics = run(
        make_config(small_overrides(tmp_path, "attack=pgd", "attack.steps=5", f"attack.source={checkpoint}"))
    )
    assert (
        metrics["transfer_success_rate"] == metrics["whitebox_success_rate"] == metrics["source_success_rate"]
    )
    assert metrics["transfer_beats_whitebox"] == 0 and metrics["transfer_success_rate"] > 0.1
    # the attacked model is never queried while the adversarials are crafted
    assert metrics["forward_passes_per_image"] == 0 and metrics["backward_passes_per_image"] == 0


def test_a_transfer_from_another_model_config_is_weaker_and_tagged(mnist_root, store, tmp_path):
    metrics = run(make_config(small_overrides(tmp_path, "attack=pgd", "attack.steps=5", "attack.source=mlp")))
    assert 0 < metrics["transfer_success_rate"] < metrics["whitebox_success_rate"]
    assert metrics["source_success_rate"] > metrics["transfer_success_rate"]
    (attack_run,) = [r for r in all_runs(store, "mnist") if r.data.tags.get("stage") == "attack"]
    tags = attack_run.data.tags
    assert (
        tags["source"] == "mlp" and "source.checkpoint_hash" in tags and "mlp-" in tags["source.checkpoint"]
    )
    assert tags.get("masking_suspect") is None


def test_a_suspect_run_is_tagged_and_warned_and_keeps_its_config_hash(mnist_root, store, tmp_path, capsys):
    # at eps 0.1 an FGSM leaves most images standing: with the unbounded budget set that low, suspect
    cfg = make_config(small_overrides(tmp_path, "masking.unbounded_eps=0.1"))
    metrics = run(cfg)
    (attack_run,) = [r for r in all_runs(store, "mnist") if r.data.tags.get("stage") == "attack"]
    tags = attack_run.data.tags
    assert tags["masking_suspect"] == "true"
    assert tags["masking.unbounded"] == str(round(100 * metrics["adv_accuracy"]))
    assert (
        f"warning: masking_suspect: adversarial accuracy is still {metrics['adv_accuracy']:.1%} at eps=0.1"
        in (capsys.readouterr().out)
    )
    assert tags["config_hash"] == config_hash(make_config(small_overrides(tmp_path)))


def test_every_version_names_attack_configs_and_keys_their_functions_take():
    versions = OmegaConf.to_container(attack_config("autoattack").versions)
    assert [p["name"] for p in aa.components(versions, "standard")] == [
        "apgd_ce",
        "apgd_t",
        "fab_t",
        "square",
    ]
    for version in versions:
        for part in aa.components(versions, version):
            call = aa.component_call(part, "l2")
            assert set(call.keywords) <= set(inspect.signature(call.func).parameters), (version, part)
            assert call.keywords["norm"] == "l2"
    standard = {p["name"]: aa.component_call(p, "linf").keywords for p in aa.components(versions, "standard")}
    # the original's settings, read from each component's own config
    assert standard["apgd_ce"]["steps"] == standard["apgd_t"]["steps"] == standard["fab_t"]["steps"] == 100
    assert standard["apgd_t"]["n_targets"] == standard["fab_t"]["n_targets"] == 9
    assert standard["square"]["queries"] == 5000 and standard["square"]["p_init"] == 0.8


CHEAP = {
    "cheap": [
        {"name": "apgd_ce", "attack": "apgd", "steps": 3},
        {"name": "apgd_t", "attack": "apgd_t", "steps": 2, "n_targets": 2},
        {"name": "fab_t", "attack": "fab", "steps": 2, "n_targets": 2},
        {"name": "square", "attack": "square", "queries": 20},
    ]
}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, scale=st.floats(0.0, 1.0))
def test_autoattack_stays_in_the_box_and_the_ball(norm, case, scale):
    model, x, y, _ = random_problem(case)
    eps = scale if norm == "linf" else 6 * scale
    info: dict = {}
    x_adv = aa.autoattack(
        model, x, y, eps, norm=norm, version="cheap", versions=CHEAP, seeds=torch.arange(len(x)), info=info
    )
    assert torch.isfinite(x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-6) + 1e-6).all()
    broken = info[aa.BROKEN_BY] >= 0
    assert torch.equal(model(x_adv).argmax(1) != y, broken | (info[aa.BROKEN_BY] == aa.MISCLASSIFIED))
