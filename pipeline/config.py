"""Config helpers: the project-root resolver, validation of user values, flattening for MLflow,
and the attack function an attack config describes (`attack_fn`)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import math
from collections.abc import Callable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any, cast

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from pipeline.errors import ConfigError, PipelineError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"

# conf/config.yaml places outputs/ under ${project_root:} whatever the working directory.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)

TARGET_STRATEGIES = ("next", "random", "least_likely")
TRAINING_METHODS = ("fgsm_rs", "n_fgsm", "pgd", "trades")  # pipeline.models.adversarial
OVERFIT_ACTIONS = ("warn", "stop", "restart")  # pipeline.models.robustness

# Keys that say how or where a job runs, not what it computes: left out of a job's config hash
# (resume matching) and of a sweep's identity. cpu_workers changes no number (tested);
# fast_cpu_model changes numbers only by float rounding, as another thread count would.
RUN_CONTROL = (
    "resume",
    "fail_fast",
    "cpu_workers",
    "fast_cpu_model",
    "paths.",
    "tracking.",
    "trainer.enable_progress_bar",
    "hydra.",
    "masking.",  # the gradient-masking checks only tag and warn; the numbers stay the same
)
# keys whose null default means what the config meant before they existed: left out of the
# config hash while null, so adding them kept the hashes of earlier runs
NULL_IS_ABSENT = ("attack.source",)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ConfigError(f"{name}={value!r} is not a number; pass a float such as {name}=0.1")
    return float(value)


def _eps(name: str, value: Any, norm: str = "linf") -> float:
    eps = _number(name, value)
    if norm == "l2" and eps < 0.0:
        raise ConfigError(f"{name}={value} is negative: pass an L2 radius ≥ 0, e.g. {name}=2.0")
    if norm != "l2" and not 0.0 <= eps <= 1.0:
        raise ConfigError(
            f"{name}={value} is out of range: eps is measured in [0,1] pixel space; "
            f"pass a value between 0 and 1, e.g. {name}=0.1"
        )
    return eps


def _positive_int(name: str, value: Any, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer, e.g. {name}=100")
    if upper is not None and value > upper:
        raise ConfigError(
            f"{name}={value} is larger than the {upper} images available; pass {name}=1..{upper}"
        )
    return value


def eps_values(cfg: DictConfig) -> list[float | None]:
    """The eps values one attack job evaluates: `attack.eps_list` if given, else `attack.eps`;
    `[None]` for an attack without an eps budget (`attack.eps: null`, e.g. lbfgs). L∞ radii lie in
    [0,1]; L2 radii (`attack.norm: l2`) are any non-negative number."""
    norm = cfg.attack.get("norm", "linf")
    eps_list = cfg.attack.get("eps_list")
    if eps_list is None:
        return [None] if cfg.attack.get("eps") is None else [_eps("eps", cfg.attack.eps, norm)]
    if not isinstance(eps_list, ListConfig | list) or len(eps_list) == 0:
        raise ConfigError(
            f"attack.eps_list={eps_list!r} must be a non-empty list, e.g. attack.eps_list=[0.05,0.1,0.2]"
        )
    return [_eps("attack.eps_list", e, norm) for e in eps_list]


def _attack_numbers(cfg: DictConfig) -> None:
    """Attack hyper-parameters (reg, lr, steps, c_init, ...) are non-negative numbers."""
    for key, value in cfg.attack.items():
        if key in ("eps", "target", "norm") or isinstance(value, bool) or not isinstance(value, Real):
            continue
        if math.isnan(value) or value < 0:
            raise ConfigError(
                f"attack.{key}={value} must be a non-negative number "
                f"(conf/attack/{cfg.attack.name}.yaml has its default)"
            )


def check_n_eval(n_eval: int | None, available: int | None) -> None:
    """n_eval is a positive integer no larger than the images available (None: all of them)."""
    if n_eval is not None:
        _positive_int("n_eval", n_eval, upper=available)


def check_devices(cfg: DictConfig, multirun: bool) -> None:
    """A multi-device attack step re-runs the command line for its other ranks, which a multirun
    cannot share: one device per job there."""
    devices = cfg.trainer.devices
    many = devices > 1 if isinstance(devices, int) else not isinstance(devices, str) and len(devices) > 1
    if many and multirun:
        raise ConfigError(
            f"trainer.devices={devices} works for a single run, not inside a multirun; "
            "run each point as its own command, or give each job one device"
        )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError with a one-line fix for any value the pipeline cannot run with (n_eval
    against a photo folder's size is checked once the photos are read)."""
    pretrained = is_pretrained(cfg)
    if pretrained != bool(cfg.data.get("pretrained_models")):
        kind = "an ImageNet" if pretrained else "an MNIST"
        raise ConfigError(
            f"model={cfg.model.name} is {kind} model and data={cfg.data.name} does not "
            "fit it; use data=mnist with cnn, mlp or fc*, data=imagenet with vgg16 "
            "(model.arch=...) or efficientnet_lite0"
        )
    _number("eps", cfg.eps)
    norm = cfg.attack.get("norm", "linf")
    if norm not in ("linf", "l2"):
        raise ConfigError(f"attack.norm={norm!r} is unknown; pass attack.norm=linf or attack.norm=l2")
    eps_values(cfg)
    check_n_eval(cfg.n_eval, cfg.data.get("test_size"))
    _positive_int("attack.batch_size", cfg.attack.batch_size)
    _attack_numbers(cfg)
    attack_kwargs(cfg.attack)  # the function exists and takes every hyper-parameter given
    for switch in ("resume", "fail_fast", "fast_cpu_model"):
        if not isinstance(cfg.get(switch, False), bool):
            raise ConfigError(f"{switch}={cfg[switch]!r} must be true or false")
    workers = cfg.cpu_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"cpu_workers={workers!r} must be 'auto' or a positive integer")
    wait_s = cfg.tracking.get("wait_s", 0)
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or wait_s < 0:
        raise ConfigError(f"tracking.wait_s={wait_s!r} must be a number of seconds ≥ 0 (0: do not wait)")
    check_training(cfg.train, cfg.data.get("module", {}).get("val_size"))
    versions = cfg.attack.get("versions")
    if versions is not None and cfg.attack.get("version") not in versions:
        raise ConfigError(
            f"attack.version={cfg.attack.get('version')!r} is unknown; pass one of "
            + ", ".join(f"attack.version={v}" for v in versions)
        )
    check_source(cfg.attack.get("source"))
    if cfg.attack.targeted and cfg.attack.get("untargeted_only"):
        raise ConfigError(
            f"attack={cfg.attack.name} is untargeted only; drop attack.targeted=true "
            "or choose a targeted attack (fgsm, bim, pgd, mifgsm, cw_l2, lbfgs)"
        )
    if cfg.attack.targeted:
        target = cfg.attack.target
        n_classes = cfg.data.num_classes
        is_class = isinstance(target, int) and not isinstance(target, bool)
        if is_class and not 0 <= target < n_classes:
            raise ConfigError(
                f"attack.target={target} is not a class index; "
                f"pass 0..{n_classes - 1} or one of {', '.join(TARGET_STRATEGIES)}"
            )
        if not is_class and target not in TARGET_STRATEGIES:
            raise ConfigError(
                f"attack.target={target!r} is unknown; pass one of "
                f"{', '.join(TARGET_STRATEGIES)} or a class index 0..{n_classes - 1}"
            )


def check_training(train: DictConfig, val_size: int | None = None) -> None:
    """The `train` config's values: sizes, and for adversarial training its method and numbers
    (`val_size`: the validation images the per-epoch robustness check can draw from)."""
    _positive_int("train.batch_size", train.batch_size)
    _positive_int("train.epochs", train.epochs)
    if train.n_train is not None:
        _positive_int("train.n_train", train.n_train)
    method = train.get("method")
    if method is None:
        return
    if method not in TRAINING_METHODS:
        raise ConfigError(
            f"train.method={method!r} is unknown; use fgsm_rs, n_fgsm or pgd (train=adversarial) "
            "or train=trades"
        )
    _eps("train.eps", train.eps)
    _positive_int("train.steps", train.steps)
    if train.alpha is not None and _number("train.alpha", train.alpha) <= 0:
        raise ConfigError(f"train.alpha={train.alpha} must be positive (or null for the method's default)")
    for key in ("noise", "ramp_epochs", "init_std"):
        if key in train and _number(f"train.{key}", train[key]) < 0:
            raise ConfigError(f"train.{key}={train[key]} must be ≥ 0")
    if method == "trades" and ("beta" not in train or _number("train.beta", train.beta) < 0):
        raise ConfigError(
            f"train.beta={train.get('beta')} must be a number ≥ 0 (TRADES' robustness weight, e.g. "
            "train.beta=6); train=trades sets it"
        )
    if train.get("robust_eval"):
        _positive_int("train.robust_eval.n", train.robust_eval.n, upper=val_size)
        _positive_int("train.robust_eval.steps", train.robust_eval.steps)
    if train.get("overfit"):
        if train.overfit.action not in OVERFIT_ACTIONS:
            raise ConfigError(
                f"train.overfit.action={train.overfit.action!r} is unknown; use {', '.join(OVERFIT_ACTIONS)}"
            )
        gap = _number("train.overfit.gap", train.overfit.gap)
        if not 0 < gap <= 1:
            raise ConfigError(f"train.overfit.gap={gap} must lie in (0, 1], e.g. train.overfit.gap=0.3")


def check_source(source: Any) -> None:
    """attack.source (a transfer attack's surrogate) is null, a conf/model name or a .ckpt file."""
    if source is None:
        return
    if str(source).endswith(".ckpt"):
        if not Path(str(source)).is_file():
            raise ConfigError(
                f"attack.source={source} does not exist; pass an existing checkpoint "
                "(outputs/checkpoints/ holds the trained ones) or a model name, e.g. attack.source=mlp"
            )
        return
    options = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    if str(source) not in options:
        raise ConfigError(
            f"attack.source={source!r} is neither a .ckpt file nor a model config; "
            f"pass one of {', '.join(options)} or a checkpoint path"
        )


def source_config(cfg: DictConfig) -> DictConfig:
    """The job's config with conf/model/<attack.source>.yaml as its model: the surrogate of a
    transfer attack is trained (or read from the checkpoint cache) as that model would be."""
    surrogate = cfg.copy()
    with open_dict(surrogate):
        surrogate.model = _load(CONFIG_DIR / "model" / f"{cfg.attack.source}.yaml", CONFIG_DIR)
        surrogate.checkpoint = None
    if is_pretrained(surrogate) != is_pretrained(cfg):
        raise ConfigError(
            f"attack.source={cfg.attack.source} does not fit data={cfg.data.name}; "
            "pick a source model for the same data as the attacked one"
        )
    return surrogate


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, letting the pipeline's own one-line errors through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, PipelineError):
            raise error.__cause__ from None
        raise


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Nested config → {"attack.name": "fgsm", "eps": 0.1, ...} (lists stay whole)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in cast(dict[str, Any], container).items():  # a dict config's keys are strings
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def short_hash(text: str) -> str:
    """16 hex digits of the text's SHA-256: the names of configs, sweeps and checkpoints."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_run_control(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in RUN_CONTROL)


def config_hash(cfg: DictConfig) -> str:
    """16 hex digits naming what a job computes: its resolved config without the run-control keys
    (a sweep point rerun with the same hash gives the same numbers)."""
    job = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }  # a multirun's master config has it
    values = {
        k: v
        for k, v in flatten(job).items()
        if not _is_run_control(k) and not (v is None and k in NULL_IS_ABSENT)
    }
    return short_hash(json.dumps(values, sort_keys=True, default=str))


def sweep_key(overrides: list[str]) -> str:
    """16 hex digits naming a sweep: its command-line overrides in any order, run-control ones left
    out (so `resume=false` or another `paths.outputs` still name the same sweep)."""
    kept = sorted(o for o in overrides if not _is_run_control(o.split("=", 1)[0].lstrip("+~")))
    return short_hash("\n".join(kept))


def is_pretrained(cfg: DictConfig) -> bool:
    """Whether the model comes with its weights (ImageNet) rather than trained by the pipeline."""
    return "pretrained" in cfg.model


# ---------------------------------------------------------------- attacks from their configs

# Keys of an attack config (conf/attack_base.yaml and conf/attack/<name>.yaml) that are not bound
# to the attack function: what the attack is, and how a job runs it. `eps`, `targeted` and `target`
# (a strategy, turned into one class per image) are given with every call by whoever runs it.
ATTACK_RUN_KEYS = (
    "name",
    "function",
    "eps",
    "eps_list",
    "targeted",
    "target",
    "batch_size",
    "n_examples",
    "untargeted_only",
    "source",
)


def attack_function(attack_cfg: DictConfig | Mapping, where: str = "attack") -> Callable:
    """The function named by the config's `function` key (e.g. pipeline.attacks.deepfool)."""
    path = attack_cfg.get("function")
    module, _, name = str(path).rpartition(".")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"{where}.function={path!r} cannot be imported ({error}); name a function "
            f"such as {where}.function=pipeline.attacks.fgsm"
        ) from None
    if not callable(function):
        raise ConfigError(f"{where}.function={path!r} is not a function")
    return function


def attack_kwargs(
    attack_cfg: DictConfig | Mapping, where: str = "attack", other_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The hyper-parameters an attack config gives its function: every key but the run keys (and
    `other_keys`, read by the caller) that the function's signature takes as a keyword argument.
    A key it does not take is a ConfigError (unless the function takes **kwargs)."""
    function = attack_function(attack_cfg, where)
    parameters = inspect.signature(function).parameters
    named = {
        key for key, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    } - set(ATTACK_RUN_KEYS)
    # an attack config's keys are strings
    keys = cast(
        list[str], [key for key in attack_cfg if key not in ATTACK_RUN_KEYS and key not in other_keys]
    )
    unknown = sorted(key for key in keys if key not in named)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; {attack_cfg.get('function')} takes "
            f"{sorted(named - {'model', 'x', 'y', 'seeds', 'info'})}"
        )
    kwargs = {}
    for key in keys:
        if key in named:
            value = attack_cfg[key]
            kwargs[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return kwargs


def attack_fn(attack_cfg: DictConfig | Mapping) -> Callable:
    """The attack a config describes: its function with the config's hyper-parameters bound, to be
    called as `attack(model, x, y, [eps=...], targeted=..., target=..., ...)`."""
    return functools.partial(attack_function(attack_cfg), **attack_kwargs(attack_cfg))


def _load(path: Path, config_dir: Path) -> DictConfig:
    """A config file merged over its `defaults:` (same-group names and /absolute ones), as Hydra
    composes them; interpolations are left unresolved."""
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no config {path.relative_to(config_dir)}; choose from {options}")
    node = OmegaConf.load(path)
    assert isinstance(node, DictConfig)  # config files are mappings
    defaults = list(node.pop("defaults", None) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        if entry == "_self_":
            merged = cast(DictConfig, OmegaConf.merge(merged, node))  # merged mappings are a mapping
            continue
        name = str(entry).split("@", 1)[0]
        parent = config_dir if name.startswith("/") else path.parent
        included = _load(parent / f"{name.lstrip('/')}.yaml", config_dir)
        merged = cast(DictConfig, OmegaConf.merge(merged, included))  # merged mappings are a mapping
    return merged


def attack_config(name: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """conf/attack/<name>.yaml as `attack=<name>` composes it, without Hydra (its `${eps}` and
    `${data...}` stay unresolved)."""
    return _load(Path(config_dir) / "attack" / f"{name}.yaml", Path(config_dir))


def attack_defaults(name: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The hyper-parameters of attack `name` as conf/attack/<name>.yaml sets them, as keyword
    arguments of its function: `pgd(model, x, y, 0.1, **attack_defaults("pgd"))`."""
    return attack_kwargs(attack_config(name, config_dir), where=name)
