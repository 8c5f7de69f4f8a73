"""The benchmark harness on a tiny model and a few images, one repeat: structure and agreement, not speed."""

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.bench import startup
from pipeline.bench.harness import run_bench
from pipeline.bench.implementations import ATTACKS, hyper_parameters
from pipeline.bench.report import findings
from pipeline.errors import ConfigError
from tests.conftest import make_config, small_overrides

PEERS = {"torchattacks", "foolbox", "art", "advertorch"}
NEW_ATTACKS = ("bim", "pgd", "pgd_l2", "mifgsm", "cw_l2", "deepfool")


def bench_config(outputs, *extra):
    return make_config(
        [
            *small_overrides(outputs),
            "n=48",
            "batch_size=16",
            "repeats=1",
            "cpu_workers=2",
            "end_to_end.n_eval=32",
            "adversarial_training.n_train=500",
            "adversarial_training.robust_eval.n=50",
            *extra,
        ],
        name="bench",
    )


@pytest.mark.slow
def test_every_section_on_a_tiny_model(mnist_root, store, tmp_path, monkeypatch):
    quick = {k: v for k, v in startup.COMMANDS.items() if k != "job_imports_seconds"}  # ~30 s each
    monkeypatch.setattr(startup, "COMMANDS", quick)
    # fast_cpu_model=false: ours attacks the model the peers attack, so exact peers match bit for bit
    report = run_bench(bench_config(tmp_path, "eps=0.2", "attacks=[fgsm]", "fast_cpu_model=false"))
    assert set(report["startup"]) == set(quick) and all(s > 0 for s in report["startup"].values())

    rows = {r["key"]: r for r in report["attacks"]}
    assert [r["role"] for r in report["attacks"]] == ["ours"] * 2 + ["peer"] * 4 + ["floor"] * 2
    assert set(rows) == {"ours", "ours_one_call", "floor", "floor_split", *PEERS}
    assert rows["ours"]["implementation"] == "advex-pipeline (split over 2 cores)"
    assert rows["floor"]["implementation"] == "floor: 1 fwd+bwd"
    fastest_peer = max(rows[p]["images_per_second"] for p in PEERS)
    for row in rows.values():
        assert row["attack"] == "fgsm" and row["images_per_second"] > 0
        floor = rows[row["floor"]]["images_per_second"]
        assert row["vs_floor"] == pytest.approx(row["images_per_second"] / floor)
        assert row["vs_fastest_peer"] == pytest.approx(row["images_per_second"] / fastest_peer)
    assert rows["ours"]["floor"] == "floor_split" and rows["ours_one_call"]["floor"] == "floor"
    assert rows["ours"]["passes_per_image"] == rows["floor"]["passes_per_image"] == 1  # counted
    assert 0 <= rows["ours"]["adv_accuracy"] < 1
    for key in (*PEERS, "ours_one_call"):  # FGSM is deterministic: every one gives our adversarials
        assert rows[key]["identical_fraction"] == 1.0 and rows[key]["max_abs_difference"] == 0
        assert rows[key]["agrees"] and rows[key]["adv_accuracy"] == rows["ours"]["adv_accuracy"]

    passes = report["model_passes"]  # fast_cpu_model=false: the given model both times
    assert passes["rewritten"] is False and passes["images"] == 48
    assert passes["forward_speedup"] > 0 and passes["ours_forward_backward_images_per_second"] > 0
    eps = report["eps_list"]
    assert eps["eps_list"] == [0.05, 0.1, 0.2] and eps["images"] == 48
    assert eps["list_vs_expected"] > 0 and eps["speedup"] > 0
    assert report["training"]["test_accuracy"] > 0.5 and report["training"]["wall_seconds"] > 0
    adversarial = report["training"]["adversarial"]
    assert adversarial["recipe"].startswith("adversarial pgd eps=0.3")  # PGD-3: 4 passes per image
    assert adversarial["passes_per_image"] == 4 and adversarial["images"] == 500
    assert adversarial["vs_floor"] == pytest.approx(
        adversarial["images_per_second"] / adversarial["floor_images_per_second"]
    )
    assert 0 < adversarial["step_seconds"] < adversarial["wall_seconds"]
    e2e = report["end_to_end"]
    assert e2e["jobs"] == 3 and e2e["n_eval"] == 32
    parts = ("startup_seconds", "setup_seconds", "attack_seconds", "tracking_seconds", "other_seconds")
    assert sum(e2e[p] for p in parts) == pytest.approx(e2e["wall_seconds"])
    assert all(e2e[p] > 0 for p in parts[:4])

    (json_path,) = (tmp_path / "bench").glob("*.json")
    assert json.loads(json_path.read_text())["attacks"] == json.loads(json.dumps(report["attacks"]))
    markdown = json_path.with_suffix(".md").read_text()
    assert "| fgsm | advex-pipeline (split over 2 cores) |" in markdown
    assert markdown.count("identical adversarials") == 5
    assert "Ours and its floor attack the model as the attack step does" not in markdown
    assert "**end to end**" in markdown and "**training**" in markdown
    assert "**model passes** on 48 images" in markdown and "the same model (not rewritten)" in markdown
    assert "**adversarial training** adversarial pgd" in markdown

    run = MlflowClient(store).get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["machine.cores"] and run.data.tags["machine.torch"]
    assert run.data.metrics["fgsm.ours.images_per_second"] == rows["ours"]["images_per_second"]
    assert "end_to_end.attack_fraction" in run.data.metrics


@pytest.mark.slow
def test_optimisation_attack_rows(mnist_root, store, tmp_path):
    report = run_bench(
        bench_config(
            tmp_path,
            "attacks=[szegedy_sgd,lbfgs]",
            "sections=[attacks]",
            "per_attack.szegedy_sgd.n=8",
            "per_attack.lbfgs.n=8",
        )
    )
    rows = {(r["attack"], r["key"]): r for r in report["attacks"]}
    sgd = {key: r for (attack, key), r in rows.items() if attack == "szegedy_sgd"}
    assert set(sgd) == {"ours", "ours_one_call", "floor", "floor_split"}  # no peer implements it
    assert all(r["passes_per_image"] == 100 and r["images"] == 8 for r in sgd.values())
    assert sgd["ours_one_call"]["identical_fraction"] == 1
    lbfgs = {key: r for (attack, key), r in rows.items() if attack == "lbfgs"}
    assert set(lbfgs) == {"ours", "ours_one_call", "floor", "floor_split", "advertorch"}
    assert lbfgs["floor"]["passes_per_image"] == lbfgs["ours"]["passes_per_image"] > 10  # as counted
    theirs = lbfgs["advertorch"]
    assert not theirs["exact"] and theirs["passes_per_image"] > lbfgs["ours"]["passes_per_image"]
    assert 0 < theirs["success_rate"] <= 1 and theirs["l2_mean"] > 0
    assert lbfgs["ours"]["success_rate"] >= theirs["success_rate"]
    markdown = (next((tmp_path / "bench").glob("*.md"))).read_text()
    assert "| lbfgs | advertorch 0.2.3 | 8 × 1 |" in markdown and "different solver" in markdown


@pytest.mark.slow
def test_iterative_and_minimal_norm_rows(mnist_root, store, tmp_path):
    steps = [f"per_attack.{attack}.steps=5" for attack in ("bim", "pgd", "pgd_l2", "mifgsm")]
    report = run_bench(
        bench_config(
            tmp_path,
            f"attacks=[{','.join(NEW_ATTACKS)}]",
            "sections=[attacks]",
            "n=12",
            "fast_cpu_model=false",  # the peers' model: exact peers match bit for bit
            *steps,
            "per_attack.cw_l2.n=8",
            "per_attack.cw_l2.binary_steps=2",
            "per_attack.cw_l2.steps=10",
            "per_attack.deepfool.steps=10",
        )
    )
    rows = {(r["attack"], r["key"]): r for r in report["attacks"]}
    peers = {"torchattacks", "foolbox", "art"}
    for attack in NEW_ATTACKS:
        keys = {key for (a, key) in rows if a == attack}
        assert keys == {
            "ours",
            "ours_one_call",
            "floor",
            "floor_split",
            *(peers - {"art"} if attack == "cw_l2" else peers),
        }, attack
        assert rows[attack, "ours"]["images"] == (8 if attack == "cw_l2" else 12)
        assert rows[attack, "ours_one_call"]["agrees"]  # split over cores or not: the same attack

    # the same hyper-parameters for ours and every peer, in every row
    assert rows["bim", "torchattacks"]["params"] == {"eps": 0.1, "alpha": 0.1 / 5, "steps": 5}
    assert rows["pgd_l2", "art"]["params"] == {
        "eps": 1.5,
        "alpha": 2.5 * 1.5 / 5,
        "steps": 5,
        "random_start": False,
    }
    assert rows["cw_l2", "foolbox"]["params"]["binary_steps"] == 2

    # floors: the iterative attacks' steps; cw_l2 and deepfool as counted in ours
    for attack in ("bim", "pgd", "pgd_l2", "mifgsm"):
        assert rows[attack, "ours"]["passes_per_image"] == rows[attack, "floor"]["passes_per_image"] == 5
    for attack in ("cw_l2", "deepfool"):
        assert rows[attack, "floor"]["passes_per_image"] == rows[attack, "ours"]["passes_per_image"] > 1
    assert rows["deepfool", "floor"]["implementation"].startswith("floor: fwd + 9-logit Jacobian")

    # exact peers give our adversarials (to float rounding) and our adversarial accuracy
    not_exact = {
        ("mifgsm", "foolbox"),
        ("cw_l2", "torchattacks"),
        ("cw_l2", "foolbox"),
        ("deepfool", "torchattacks"),
        ("deepfool", "art"),
    }
    for (attack, key), row in rows.items():
        if row["role"] != "peer":
            continue
        assert row["exact"] == ((attack, key) not in not_exact), (attack, key)
        if row["exact"]:
            assert row["agrees"], (attack, key)
            assert row["adv_accuracy"] == rows[attack, "ours"]["adv_accuracy"]
            if attack != "pgd_l2":  # the L2 libraries normalise and project in other orders
                assert row["max_abs_difference"] < 1e-4, (attack, key)
    for key in ("torchattacks", "foolbox", "art"):  # the same float operations: bit for bit
        assert rows["pgd", key]["identical_fraction"] == 1
    assert rows["mifgsm", "torchattacks"]["identical_fraction"] == 1
    assert not [f for f in findings(report) if "adv accuracy" in f]
    assert rows["cw_l2", "torchattacks"]["same_work"] is False  # no search over c

    markdown = next((tmp_path / "bench").glob("*.md")).read_text()
    assert "the same for ours and every peer: bim: eps 0.1, alpha 0.02, steps 5;" in markdown
    assert "pgd_l2: eps 1.5, alpha 0.75, steps 5, random_start False" in markdown
    assert "(fixed c=1: no search over c) † |" in markdown


def per_attack(name, *overrides):
    """per_attack.<name> of the composed bench config: conf/attack/<name>.yaml with conf/bench.yaml's
    settings and `overrides` over it."""
    return make_config(list(overrides), name="bench").per_attack[name]


def test_hyper_parameters():
    assert hyper_parameters(
        "pgd", per_attack("pgd", "eps=0.3", "per_attack.pgd.n=5", "per_attack.pgd.steps=4")
    ) == {"eps": 0.3, "alpha": 2.5 * 0.3 / 4, "steps": 4, "random_start": False}
    assert hyper_parameters("bim", per_attack("bim", "per_attack.bim.alpha=0.05"))["alpha"] == 0.05
    assert hyper_parameters("pgd_l2", per_attack("pgd_l2", "eps=0.1"))["eps"] == 1.5  # its own L2 radius
    assert hyper_parameters("deepfool", per_attack("deepfool", "eps=0.1")) == {
        "steps": 50,
        "overshoot": 0.02,
        "candidates": 10,
    }
    assert hyper_parameters("lbfgs", per_attack("lbfgs", "per_attack.lbfgs.repeats=1")) == {}
    assert ATTACKS["pgd"].floor({"steps": 7}) == 7 and ATTACKS["cw_l2"].floor({}) is None
    assert ATTACKS["deepfool"].jacobian_rows({"candidates": None}, 10) == 9
    assert not ATTACKS["mifgsm"].peer("foolbox").exact and ATTACKS["mifgsm"].peer("art").exact
    with pytest.raises(ConfigError, match=r"per_attack.bim: unknown key\(s\) \['decay'\]"):
        hyper_parameters("bim", per_attack("bim", "+per_attack.bim.decay=0.5"))


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "attacks=[nope]",
            r"no benchmark for attack\(s\) \['nope'\]; choose from \['apgd', 'autoattack', 'bim', 'cw_l2', "
            r"'deepfool', 'fgsm', 'lbfgs', 'mifgsm', 'pgd', 'pgd_l2', 'square', 'szegedy_sgd'\]",
        ),
        ("sections=[attacks,speed]", r"unknown section\(s\) \['speed'\]"),
        ("n=0", r"n=0 must be a positive integer"),
        ("batch_size=-1", r"batch_size=-1 must be a positive integer"),
        ("+per_attack.cw_l2.stepz=10", r"per_attack.cw_l2: unknown key\(s\) \['stepz'\]"),
        ("per_attack.pgd.repeats=0", r"per_attack.pgd.repeats=0 must be a positive integer"),
    ],
)
def test_bad_bench_config(override, message, store, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_bench(bench_config(tmp_path, override))


@pytest.mark.slow
def test_autoattack_family_rows(mnist_root, store, tmp_path):
    report = run_bench(
        bench_config(
            tmp_path,
            "attacks=[apgd,square,autoattack]",
            "sections=[attacks,model_passes]",
            "n=8",
            "per_attack.apgd.steps=10",
            "per_attack.square.queries=100",
        )
    )
    rows = {(r["attack"], r["key"]): r for r in report["attacks"]}
    for attack in ("apgd", "square", "autoattack"):
        keys = {key for (a, key) in rows if a == attack}
        assert keys == {"ours", "ours_one_call", "floor", "floor_split", "torchattacks"}, attack
        assert rows[attack, "torchattacks"]["exact"] is False  # random starts and squares
    assert rows["apgd", "floor"]["passes_per_image"] == 10
    # early exit: no more gradients than a fwd+bwd per step, fewer once images are fooled
    assert rows["apgd", "ours"]["passes_per_image"] <= 10
    # Square is black-box: not one backward pass, against a floor of forward passes only
    assert rows["square", "ours"]["passes_per_image"] == 0
    assert rows["square", "floor"]["implementation"] == "floor: 100 forward passes (no gradients)"
    # the ensemble at the original's settings against torchattacks' forced to 100 iterations
    ours, theirs = rows["autoattack", "ours"], rows["autoattack", "torchattacks"]
    assert ours["adv_accuracy"] <= theirs["adv_accuracy"] + 1 / 8
    assert "forced to 100 iterations" in theirs["implementation"]
    # ours and its floor attacked the model as the attack step does on a CPU, the peers the given one
    assert report["config"]["fast_cpu_model"] is True and report["model_passes"]["rewritten"] is True
    markdown = next((tmp_path / "bench").glob("*.md")).read_text()
    assert "Ours and its floor attack the model as the attack step does on a CPU" in markdown
