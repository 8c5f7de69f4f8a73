"""The benchmark's sections. Each returns plain dicts that the report prints and saves."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.attack_step import PassCounter
from pipeline.attacks import fgsm
from pipeline.attacks.losses import succeeded
from pipeline.attacks.targets import next_class
from pipeline.bench.implementations import ATTACKS, PEER_PACKAGES, Setup, ours
from pipeline.bench.measure import (
    Batch,
    forward,
    forward_backward,
    forward_jacobian,
    forwards,
    median_seconds,
    over_batches,
)
from pipeline.config import PROJECT_ROOT, build
from pipeline.metrics import l2
from pipeline.models.adversarial import Recipe
from pipeline.models.training import checkpoint_for
from pipeline.parallel import split_or_call
from pipeline.tracking.store import Tracker

OURS = "advex-pipeline"


def _label(peer: str) -> str:
    try:
        return f"{peer} {version(PEER_PACKAGES[peer])}"
    except PackageNotFoundError:
        return peer


def _agreement(theirs: torch.Tensor, ours: torch.Tensor, their_acc: float, our_acc: float) -> dict:
    same_image = (theirs == ours).flatten(1).all(1)
    return {
        "identical_fraction": same_image.float().mean().item(),
        "max_abs_difference": (theirs - ours).abs().max().item(),
        "agrees": their_acc == our_acc,
    }


def _as_attack_step(setup: Setup, fn: Batch) -> Batch:
    """fn as the attack step runs a batch here: split over CPU cores when it splits."""
    return lambda x, y: split_or_call(setup.split, fn, x, y)


def _outcome(setup: Setup, x, y, x_adv, clean_correct) -> dict:
    """Adversarial accuracy, success rate (over clean-correct images) and mean L2 of successes."""
    logits = over_batches(forward(setup.model), setup.batch_size)(x_adv, y)
    target = next_class(y, setup.num_classes) if setup.targeted else None
    success = succeeded(logits, y, setup.targeted, target) & clean_correct
    distance = l2(x_adv - x)
    return {
        "adv_accuracy": (logits.argmax(1) == y).float().mean().item(),
        "success_rate": success.sum().item() / max(clean_correct.sum().item(), 1),
        "l2_mean": distance[success].mean().item() if success.any() else float("nan"),
    }


def attack_rows(
    name: str, setup: Setup, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup_images: int = 16
) -> list[dict]:
    """Images/s of our attack, each installed peer and the floor; the forward+backward passes
    each makes per image (counted with hooks), success, mean L2 and agreement with ours.

    With a CPU split, ours and the floor appear twice: as the attack step runs them (each batch
    split over the cores) and as plain calls; each is compared with the floor run the same way.
    Warm-up calls use the first `warmup_images` images; the timed calls give the outputs."""
    attack, bs = ATTACKS[name], setup.batch_size
    our_run = ours(setup)
    floor_passes = attack.floor(setup.hyper)
    jacobian_rows = attack.jacobian_rows(setup.hyper, setup.num_classes)
    if jacobian_rows:  # a counted pass of ours is a forward and a batched backward of that many rows
        floor = forward_jacobian(setup.our_model, jacobian_rows)
        floor_name = f"floor: fwd + {jacobian_rows}-logit Jacobian, as many as counted in ours"
    elif attack.forward_only:  # a black-box attack: its floor is forward passes only
        floor = forwards(setup.our_model, floor_passes or 1)
        floor_name = f"floor: {floor_passes} forward passes (no gradients)"
    else:
        floor = forward_backward(setup.our_model, floor_passes or 1)
        floor_name = f"floor: {floor_passes} fwd+bwd" if floor_passes else "floor: fwd+bwd as counted in ours"
    rows = []  # (key, label, role, run over all images, floor key)
    if setup.split is not None:
        cores = f"split over {setup.split.workers} cores"
        rows += [
            ("ours", f"{OURS} ({cores})", "ours", _as_attack_step(setup, our_run), "floor_split"),
            ("floor_split", f"{floor_name} ({cores})", "floor", _as_attack_step(setup, floor), "floor_split"),
        ]
    rows += [
        (
            "ours_one_call" if setup.split else "ours",
            f"{OURS} (one call per batch)",
            "ours",
            our_run,
            "floor",
        ),
        ("floor", floor_name, "floor", floor, "floor"),
    ]
    missing, specs = [], {peer: attack.peer(peer) for peer in attack.peers}
    for peer, spec in specs.items():
        try:
            label = _label(peer) + (f" ({spec.note})" if spec.note else "")
            rows.append((peer, label, "peer", spec.make(setup), "floor"))
        except ImportError as error:
            missing.append(
                {
                    "attack": name,
                    "key": peer,
                    "implementation": peer,
                    "role": "peer",
                    "note": f"not installed ({error}); `uv sync --extra bench`",
                }
            )
    runs = {key: (run if role == "peer" else over_batches(run, bs)) for key, _, role, run, _ in rows}

    # the peers attack the model as given, ours and the floor the model the attack step attacks
    counters = {id(model): PassCounter(model) for model in (setup.model, setup.our_model)}
    counter_of = {
        key: counters[id(setup.model if role == "peer" else setup.our_model)] for key, _, role, _, _ in rows
    }
    outputs, passes = {}, {}

    def timed(key):
        counter = counter_of[key]

        def call():
            before = counter.backward
            counter.counting = True
            outputs[key] = runs[key](x, y)
            counter.counting = False
            passes[key] = (counter.backward - before) / len(x)

        return call

    try:
        seconds = median_seconds(
            {key: timed(key) for key in runs},
            repeats,
            setup.device,
            # cast: mypy types a lambda's default-valued parameter as a required one
            warmups={
                key: cast(Callable[[], object], lambda run=run: run(x[:warmup_images], y[:warmup_images]))
                for key, run in runs.items()
            },
        )
    finally:
        for counter in counters.values():
            counter.remove()
    if floor_passes is None:  # one counted pass per image was timed: scale to ours
        for floor_key in ("floor", "floor_split"):
            if floor_key in seconds:
                seconds[floor_key] *= passes["ours"]
                passes[floor_key] = passes["ours"]
    speed = {key: len(x) / s for key, s in seconds.items()}
    # the fastest peer doing the same work as ours (not one that skips part of it)
    fastest_peer = max(
        (speed[key] for key, _, role, _, _ in rows if role == "peer" and specs[key].same_work),
        default=float("nan"),
    )
    clean_correct = over_batches(forward(setup.model), bs)(x, y).argmax(1) == y
    outcome = {
        key: _outcome(setup, x, y, outputs[key], clean_correct)
        for key, _, role, _, _ in rows
        if role != "floor"
    }

    table = []
    for key, label, role, _, floor_key in sorted(rows, key=lambda r: ["ours", "peer", "floor"].index(r[2])):
        peer_spec = specs.get(key)
        # random starts: each library, and each slice of a split batch, draws its own
        exact = (peer_spec.exact if peer_spec else attack.exact) and not setup.params.get("random_start")
        row = {
            "attack": name,
            "key": key,
            "implementation": label,
            "role": role,
            "exact": exact,
            "images": len(x),
            "repeats": repeats,
            "images_per_second": speed[key],
            "floor": floor_key,
            "vs_floor": speed[key] / speed[floor_key],
            "vs_fastest_peer": speed[key] / fastest_peer,
            "passes_per_image": passes[key],
            "params": dict(setup.params),
        }
        if peer_spec and not peer_spec.same_work:
            row["same_work"] = False
        if key in outcome:
            row.update(outcome[key])
            if key != "ours":
                row.update(
                    _agreement(
                        outputs[key], outputs["ours"], row["adv_accuracy"], outcome["ours"]["adv_accuracy"]
                    )
                )
        table.append(row)
    return table + missing


def model_passes(setup: Setup, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    """Forward and forward+backward passes (one call per batch) of the model as given and as
    ours attacks it (on a CPU with fast_cpu_model: pipeline.models.fast), in img/s, and the
    speed-ups the rewritten copy brings."""
    fns: dict[str, Callable[[], object]] = {}
    for name, model in (("given", setup.model), ("ours", setup.our_model)):
        for kind, make in (("forward", forward), ("forward_backward", forward_backward)):
            run = over_batches(make(model), setup.batch_size)
            fns[f"{name}_{kind}"] = partial(run, x, y)
    seconds = median_seconds(fns, repeats, setup.device)
    result: dict = {"images": len(x), "rewritten": setup.fast_model is not None}
    result |= {f"{key}_images_per_second": len(x) / s for key, s in seconds.items()}
    for kind in ("forward", "forward_backward"):
        result[f"{kind}_speedup"] = seconds[f"given_{kind}"] / seconds[f"ours_{kind}"]
    return result


def eps_list_row(setup: Setup, eps_list: list[float], x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    """FGSM over K eps as the attack step runs it: one gradient + K evaluations, against K
    separate attack+evaluation jobs. Expected costs from the passes measured the same way:
    1 fwd+bwd + K fwd, and K (fwd+bwd + fwd)."""
    model, bs, k = setup.our_model, setup.batch_size, len(eps_list)
    evaluate = forward(model)

    def one_gradient(xb, yb):
        return torch.cat([evaluate(x_adv, yb) for x_adv in fgsm(model, xb, yb, eps_list)])

    def separate(eps):
        return lambda xb, yb: evaluate(fgsm(model, xb, yb, eps), yb)

    def timed(fn):
        run = over_batches(_as_attack_step(setup, fn), bs)
        return lambda: run(x, y)

    t = median_seconds(
        {
            "list": timed(one_gradient),
            "separate": lambda: [timed(separate(eps))() for eps in eps_list],
            "fwd_bwd": timed(forward_backward(model)),
            "fwd": timed(evaluate),
        },
        repeats,
        setup.device,
    )
    expected_list = t["fwd_bwd"] + k * t["fwd"]
    expected_separate = k * (t["fwd_bwd"] + t["fwd"])
    return {
        "eps_list": list(eps_list),
        "images": len(x),
        "list_seconds": t["list"],
        "list_expected_seconds": expected_list,
        "list_vs_expected": t["list"] / expected_list,
        "separate_seconds": t["separate"],
        "separate_expected_seconds": expected_separate,
        "separate_vs_expected": t["separate"] / expected_separate,
        "speedup": t["separate"] / t["list"],
    }


def _train_afresh(cfg: DictConfig, tracker: Tracker) -> tuple[dict, float]:
    """(model card, wall seconds) of training cfg's model from scratch into a temporary folder
    (the cache untouched)."""
    cfg = cfg.copy()
    data = build(cfg.data.module)
    data.prepare_data()
    with tempfile.TemporaryDirectory() as tmp:
        OmegaConf.update(cfg, "train.force", True)
        OmegaConf.update(cfg, "paths.checkpoints", tmp)
        start = time.perf_counter()
        info = checkpoint_for(cfg, data, tracker).info
        return info, time.perf_counter() - start


def training(cfg: DictConfig, tracker: Tracker) -> dict:
    """Train the configured model from scratch; then, with `adversarial_training`, that recipe
    beside its floor."""
    info, wall = _train_afresh(cfg, tracker)
    result = {
        "model": cfg.model.name,
        "epochs": cfg.train.epochs,
        "wall_seconds": wall,
        "fit_seconds": info["train_seconds"],
        "test_accuracy": info["test_accuracy"],
    }
    if cfg.get("adversarial_training"):
        result["adversarial"] = adversarial_training(cfg, tracker)
    return result


def adversarial_training(cfg: DictConfig, tracker: Tracker) -> dict:
    """Adversarial training (`cfg.adversarial_training`, a `train` config) against its floor:
    (inner steps + 1) forward+backward passes per training image, timed over the same batch size
    on the same model. The training steps are timed batch by batch (the per-epoch robustness check
    and validation apart)."""
    recipe = cfg.copy()
    recipe.train = OmegaConf.create(OmegaConf.to_container(cfg.adversarial_training, resolve=True))
    info, wall = _train_afresh(recipe, tracker)
    train = recipe.train
    passes = Recipe.from_config(cast(dict, OmegaConf.to_container(train))).inner_steps + 1
    images = train.n_train or (60_000 - recipe.data.module.val_size)
    images *= info["epochs_run"]
    net = build(recipe.model.net)
    x = torch.rand(train.batch_size * 8, 1, 28, 28)
    y = torch.randint(0, recipe.data.num_classes, (len(x),))
    floor = over_batches(forward_backward(net, passes), train.batch_size)
    seconds = median_seconds({"floor": lambda: floor(x, y)}, repeats=5, device=torch.device("cpu"))
    floor_per_second = len(x) / seconds["floor"]
    ours_per_second = images / info["train_step_seconds"]
    return {
        "recipe": info["recipe"],
        "passes_per_image": passes,
        "images": images,
        "wall_seconds": wall,
        "step_seconds": info["train_step_seconds"],
        "check_seconds": info["robust_eval_seconds"],
        "images_per_second": ours_per_second,
        "floor_images_per_second": floor_per_second,
        "vs_floor": ours_per_second / floor_per_second,
        "test_accuracy": info["test_accuracy"],
        "val_pgd_accuracy": info["val_pgd_accuracy"],
    }


def end_to_end(cfg: DictConfig, checkpoint: str) -> dict:
    """The demo sweep as a user runs it (a fresh process, attacking the already trained
    `checkpoint`), split into start-up, per-job setup, attack compute, tracking, and the rest."""
    sweep = list(cfg.end_to_end.sweep)
    accelerator = "gpu" if cfg.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        Tracker(uri).all_runs()  # create the store now: users' stores already exist
        command = [
            sys.executable,
            "-m",
            "pipeline",
            *sweep,
            f"n_eval={cfg.end_to_end.n_eval}",
            "trainer.enable_progress_bar=false",
            f"trainer.accelerator={accelerator}",
            f"paths.outputs={tmp}",
            f"paths.data={cfg.paths.data}",
            f"checkpoint={checkpoint}",
            "-m",
        ]
        launched = time.time()
        done = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        )
        wall = time.time() - launched
        if done.returncode != 0:
            raise RuntimeError(f"sweep failed: {done.stderr.strip().splitlines()[-1:]}")
        runs = Tracker(uri).all_runs()
    parent = next(r for r in runs if r.data.tags.get("stage") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]

    def total(key):
        return sum(r.data.metrics[key] for r in children)

    last_child_end = max(r.info.end_time for r in children) / 1000
    parts = {
        "startup_seconds": parent.info.start_time / 1000 - launched,
        "setup_seconds": total("seconds_setup"),
        "attack_seconds": total("seconds_attack_step"),
        "tracking_seconds": total("seconds_tracking") + parent.info.end_time / 1000 - last_child_end,
    }
    parts["other_seconds"] = wall - sum(parts.values())
    return {
        "sweep": " ".join(sweep),
        "n_eval": cfg.end_to_end.n_eval,
        "jobs": len(children),
        "wall_seconds": wall,
        **parts,
        "attack_fraction": parts["attack_seconds"] / wall,
        "attack_generation_seconds": total("attack_seconds"),
    }
