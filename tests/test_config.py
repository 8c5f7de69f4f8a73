"""Every config group composes and instantiates; bad values give one-line errors."""

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from pipeline.config import CONFIG_DIR, attack_fn, build, flatten, validate
from pipeline.errors import ConfigError
from tests.conftest import make_config

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in CONFIG_DIR.iterdir()
    if group.is_dir()
}


def test_groups_exist():
    assert {"data", "model", "train", "attack", "tracking"} <= set(GROUPS)


# options that only fit a partner: ImageNet models need photos (and VGG16 random weights offline)
PARTNERS = {
    ("data", "imagenet"): ["model=efficientnet_lite0"],
    ("model", "vgg16"): ["data=imagenet", "model.weights=null"],
    ("model", "efficientnet_lite0"): ["data=imagenet"],
    ("experiment", "szegedy_table1"): [],
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    import torch

    cfg = make_config([f"{group}={option}", f"paths.outputs={tmp_path}", *PARTNERS.get((group, option), [])])
    validate(cfg)
    data = build(cfg.data.module)
    assert data.name == cfg.data.name and cfg.tracking.uri.startswith(("sqlite:///", "http"))
    if "pretrained" in cfg.model:  # an ImageNet classifier: [0,1] photos at its input size
        model = build(cfg.model.pretrained)
        assert model.net(torch.rand(1, 3, 224, 224)).shape == (1, 1000)
        assert len(model.class_names) == 1000 and cfg.data.num_classes == 1000
        return
    net = instantiate(cfg.model.net)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, cfg.data.num_classes)
    attack = attack_fn(cfg.attack)
    eps = {} if cfg.attack.eps is None else {"eps": cfg.attack.eps}
    options = {"targeted": True, "target": torch.tensor([1, 2])} if cfg.attack.targeted else {}
    if cfg.attack.name in ("lbfgs", "szegedy_sgd"):  # keep the compose check quick
        options.update({"lbfgs": {"c_steps": 1, "max_iter": 2}, "szegedy_sgd": {"steps": 2}}[cfg.attack.name])
    x_adv = attack(net.eval(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), **eps, **options)
    assert x_adv.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=vgg16"], r"model=vgg16 is an ImageNet model and data=mnist does not fit it"),
        (["data=imagenet"], r"model=cnn is an MNIST model and data=imagenet does not fit it"),
    ],
)
def test_data_and_model_must_fit(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(overrides))


def test_defaults_match_the_contract(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config([])
    assert (cfg.eps, cfg.seed, cfg.n_eval) == (0.1, 0, 5000)
    assert cfg.attack.eps == cfg.eps and cfg.model.name == "cnn" and cfg.attack.name == "fgsm"
    assert cfg.tracking.uri == f"sqlite:///{CONFIG_DIR.parent}/outputs/mlflow.db"


def test_tracking_uri_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert make_config([]).tracking.uri == "http://tracking.example:5000"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eps=-0.1"], r"eps=-0.1 is out of range.*between 0 and 1"),
        (["eps=1.5"], r"eps=1.5 is out of range"),
        (["eps=abc"], r"eps='abc' is not a number"),
        (["eps=nan"], r"is not a number"),
        (["attack.eps_list=[0.1,2]"], r"attack.eps_list=2 is out of range"),
        (["attack.eps_list=[]"], r"must be a non-empty list"),
        (["n_eval=0"], r"n_eval=0 must be a positive integer"),
        (["n_eval=10001"], r"n_eval=10001 is larger than the 10000 images"),
        (["attack.batch_size=0"], r"attack.batch_size=0 must be a positive integer"),
        (["attack=szegedy_sgd", "attack.reg=-1"], r"attack.reg=-1 must be a non-negative number"),
        (["attack=lbfgs", "attack.c_init=nan"], r"attack.c_init=nan must be a non-negative number"),
        (["cpu_workers=0"], r"cpu_workers=0 must be 'auto' or a positive integer"),
        (["cpu_workers=some"], r"cpu_workers='some' must be 'auto' or a positive integer"),
        (["fast_cpu_model=often"], r"fast_cpu_model='often' must be true or false"),
        (["attack.targeted=true", "attack.target=10"], r"attack.target=10 is not a class index"),
        (["attack.targeted=true", "attack.target=sideways"], r"attack.target='sideways' is unknown"),
    ],
)
def test_bad_values_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_config(overrides))


@pytest.mark.parametrize("target", ["next", "random", "least_likely", 0, 9])
def test_valid_targets_pass(target):
    validate(make_config(["attack.targeted=true", f"attack.target={target}"]))


def test_flatten_gives_dotted_keys():
    cfg = make_config([])
    flat = flatten(cfg)
    assert flat["attack.name"] == "fgsm" and flat["eps"] == 0.1 and flat["model.name"] == "cnn"
    assert flat["model.net.channels"] == [32, 64]
    with open_dict(cfg):
        cfg.extra = {"a": {"b": 1}}
    assert flatten(cfg)["extra.a.b"] == 1
