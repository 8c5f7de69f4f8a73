"""Every attack setting is written once, in conf/attack/<name>.yaml: the job, the benchmark (ours
and the peers) and `make published` all read it from there."""

import inspect
import shutil

import pytest
import torch
import torchattacks
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from torch import nn

from pipeline.bench.implementations import ATTACKS, Setup, configure, hyper_parameters
from pipeline.config import (
    CONFIG_DIR,
    attack_config,
    attack_defaults,
    attack_fn,
    attack_function,
    attack_kwargs,
    validate,
)
from pipeline.errors import ConfigError
from pipeline.papers import published
from tests.conftest import make_config

NAMES = sorted(p.stem for p in (CONFIG_DIR / "attack").glob("*.yaml"))


def _compose(config_dir, name, *overrides):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _setup() -> Setup:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval().requires_grad_(False)
    return Setup(model, 0.1, 8, torch.device("cpu"), (1, 4, 4), 10)


@pytest.fixture
def edited_conf(tmp_path):
    """A copy of conf/ with DeepFool's and PGD's `steps` and BIM's changed in their attack configs."""
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    for name, old, new in (
        ("deepfool", "steps: 50 ", "steps: 7  "),
        ("pgd", "steps: 40", "steps: 9"),
        ("bim", "steps: 10", "steps: 3"),
    ):
        path = conf / "attack" / f"{name}.yaml"
        text = path.read_text()
        assert text.count(old) == 1
        path.write_text(text.replace(old, new))
    return conf


def test_a_default_changed_in_the_attack_config_changes_everywhere(edited_conf, monkeypatch):
    # the job: attack=deepfool builds its callable from the flat keys
    job = _compose(edited_conf, "config", "attack=deepfool")
    assert attack_fn(job.attack).keywords["steps"] == 7
    assert attack_defaults("deepfool", edited_conf)["steps"] == 7
    assert attack_defaults("pgd_l2", edited_conf)["steps"] == 9  # pgd_l2 extends pgd

    # the benchmark: ours (every hyper-parameter) and the peers (the shared ones)
    bench = _compose(edited_conf, "bench")
    setup = configure(_setup(), "deepfool", bench.per_attack.deepfool)
    assert setup.hyper["steps"] == setup.params["steps"] == 7
    made = {}
    monkeypatch.setattr(torchattacks, "DeepFool", lambda model, **kwargs: made.update(kwargs))
    ATTACKS["deepfool"].peer("torchattacks").make(setup)
    assert made == {"steps": 7, "overshoot": 0.02}
    for name in ("pgd", "pgd_l2"):
        assert hyper_parameters(name, bench.per_attack[name])["steps"] == 9
        assert configure(_setup(), name, bench.per_attack[name]).hyper["restarts"] == 1
    assert hyper_parameters("bim", bench.per_attack.bim)["steps"] == 3
    # a deliberate deviation of the benchmark stays what conf/bench.yaml says
    assert hyper_parameters("pgd", bench.per_attack.pgd)["random_start"] is False

    # make published: the measurement's call sees the new default, and its own deviation
    # (bim.steps: 20 in conf/published.yaml) wins over the attack's
    settings = published._settings(_compose(edited_conf, "published"), 10_000)
    assert settings["deepfool"]["steps"] == 7 and settings["bim"]["steps"] == 20
    calls = {}

    def recording_deepfool(model, x, y, **kwargs):
        calls.update(kwargs)
        return x

    monkeypatch.setattr(published, "deepfool", recording_deepfool)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    published.measure_deepfool(_setup().model, x, y, settings["deepfool"], None)
    assert calls == {"steps": 7, "overshoot": 0.02, "candidates": 10}


@pytest.mark.parametrize("name", NAMES)
def test_attack_config_without_hydra_is_what_hydra_composes(name):
    composed = make_config([f"attack={name}"]).attack
    assert attack_kwargs(composed) == attack_defaults(name)
    assert attack_config(name).name == composed.name == name
    assert attack_config(name).targeted == composed.targeted


@pytest.mark.parametrize("name", NAMES)
def test_the_attack_functions_do_not_restate_the_config(name):
    """Every hyper-parameter the config sets is a keyword-only argument without a default."""
    parameters = inspect.signature(attack_function(attack_config(name))).parameters
    for key in attack_defaults(name):
        assert parameters[key].kind == parameters[key].KEYWORD_ONLY, (name, key)
        assert parameters[key].default is inspect.Parameter.empty, (name, key)


def test_the_shared_base_is_not_an_attack():
    assert "attack_base" not in NAMES
    with pytest.raises(MissingConfigException, match="Could not find 'attack/attack_base'"):
        make_config(["attack=attack_base"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["attack=bim", "+attack.decay=0.5"], r"^attack: unknown key\(s\) \['decay'\]; pipeline.attacks.bim"),
        (["attack.function=pipeline.attacks.nope"], r"^attack.function='pipeline.attacks.nope' cannot be"),
        (["attack.function=pipeline.attacks.losses"], r"is not a function"),
    ],
)
def test_attack_function_and_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(overrides))
