"""The benchmark report: the machine, markdown tables, files under outputs/bench/, an MLflow run."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from pipeline.bench.startup import command
from pipeline.config import flatten
from pipeline.tracking.store import Tracker


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _fmt(value, spec: str) -> str:
    if value is None:
        return ""
    return "–" if value != value else format(value, spec)  # NaN: nothing to compare with


def _passes(row: dict) -> str:
    # 0 means the hook on the model never fired: the library calls the layers itself (ART does
    # for nn.Sequential models)
    return f"{row['passes_per_image']:.1f}" if row["passes_per_image"] else "n/a"


def _agreement(row: dict) -> str:
    if row["identical_fraction"] == 1:
        return "identical adversarials"
    if not row["exact"]:  # a different solver: compare what it achieves
        return "different solver (compare success and L2)"
    text = f"{row['identical_fraction']:.1%} identical, max diff {row['max_abs_difference']:.2g}"
    return text + ("" if row["agrees"] else " — **adv acc differs**")


def _hyper_parameters(rows: list[dict]) -> list[str]:
    """One "bim: eps 0.1, alpha 0.01, steps 10" per attack that has hyper-parameters."""
    seen = {}
    for r in rows:
        if r.get("params") and r["attack"] not in seen:
            seen[r["attack"]] = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["params"].items()
            )
    return [f"{attack}: {text}" for attack, text in seen.items()]


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"# Benchmark {report['date']} (commit {report['commit'][:10]})",
        "",
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), GPU: {m['gpu']}, "
        f"device {m['device']}, torch {m['torch']}; MNIST test images (up to {c['n']}; per "
        f"attack row: images × timed repeats, median reported), batch {c['batch_size']}, "
        f"FGSM eps {c['eps']}.",
        "",
    ]
    if c.get("fast_cpu_model") and m["device"] == "cpu":
        lines += [
            "Ours and its floor attack the model as the attack step does on a CPU (fast_cpu_model: "
            "channels_last, a GEMM input gradient, ReLU after max-pooling; the same function up to "
            "float rounding), the peers the model as given; fast_cpu_model=false gives both the same "
            "model (exact peers then give identical adversarials).",
            "",
        ]
    if report.get("attacks"):
        lines += [
            "| attack | implementation | images × repeats | img/s | vs floor | vs fastest peer "
            "| fwd+bwd / image | success | mean L2 | adv acc | agreement |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report["attacks"]:
            if "note" in r:
                lines.append(f"| {r['attack']} | {r['implementation']} | | | | | | | | | {r['note']} |")
                continue
            agreement = _agreement(r) if "identical_fraction" in r else ""
            speed = r["images_per_second"]
            mark = " †" if r.get("same_work") is False else ""
            lines.append(
                f"| {r['attack']} | {r['implementation']}{mark} | {r['images']} × {r['repeats']} | "
                f"{speed:,.{0 if speed >= 100 else 1}f} | {r['vs_floor']:.2f} | "
                f"{_fmt(r['vs_fastest_peer'], '.2f')} | {_passes(r)} | "
                f"{_fmt(r.get('success_rate'), '.1%')} | {_fmt(r.get('l2_mean'), '.4f')} | "
                f"{_fmt(r.get('adv_accuracy'), '.4f')} | {agreement} |"
            )
        lines += [
            "",
            "vs floor: against the floor run the same way (rows split over cores against the "
            "split floor). Agreement: adversarials compared image by image with ours. "
            "†: does less work than ours, left out of vs fastest peer.",
            "",
        ]
        params = _hyper_parameters(report["attacks"])
        if params:
            lines += ["Hyper-parameters, the same for ours and every peer: " + "; ".join(params) + ".", ""]
    if p := report.get("model_passes"):
        model = "rewritten for a CPU (fast_cpu_model)" if p["rewritten"] else "the same model (not rewritten)"
        lines += [
            f"**model passes** on {p['images']} images, one call per batch, the model as given → as "
            f"ours attacks it, {model}: forward {p['given_forward_images_per_second']:,.0f} → "
            f"{p['ours_forward_images_per_second']:,.0f} img/s ({p['forward_speedup']:.2f}×), "
            f"forward+backward {p['given_forward_backward_images_per_second']:,.0f} → "
            f"{p['ours_forward_backward_images_per_second']:,.0f} img/s "
            f"({p['forward_backward_speedup']:.2f}×)",
            "",
        ]
    if e := report.get("eps_list"):
        lines += [
            f"**eps list** {e['eps_list']} on {e['images']} images: one gradient "
            f"{e['list_seconds']:.3f} s (expected 1 fwd+bwd + {len(e['eps_list'])} fwd = "
            f"{e['list_expected_seconds']:.3f} s, ratio {e['list_vs_expected']:.2f}); separate jobs "
            f"{e['separate_seconds']:.3f} s (expected {e['separate_expected_seconds']:.3f} s, "
            f"ratio {e['separate_vs_expected']:.2f}); speed-up {e['speedup']:.2f}×",
            "",
        ]
    if t := report.get("training"):
        lines += [
            f"**training** {t['model']}, {t['epochs']} epochs: {t['wall_seconds']:.1f} s wall "
            f"({t['fit_seconds']:.1f} s fitting), test accuracy {t['test_accuracy']:.4f}",
            "",
        ]
        if a := t.get("adversarial"):
            lines += [
                f"**adversarial training** {a['recipe']}: {a['images']} training images in "
                f"{a['step_seconds']:.1f} s of training steps ({a['images_per_second']:.0f} img/s; "
                f"floor {a['passes_per_image']} fwd+bwd per image: {a['floor_images_per_second']:.0f} "
                f"img/s, ratio {a['vs_floor']:.2f}), plus {a['check_seconds']:.1f} s of per-epoch "
                f"robustness checks; {a['wall_seconds']:.1f} s wall; test accuracy "
                f"{a['test_accuracy']:.4f}, validation PGD accuracy {a['val_pgd_accuracy']:.4f}",
                "",
            ]
    if s := report.get("end_to_end"):
        lines += [
            f"**end to end** `python -m pipeline {s['sweep']} n_eval={s['n_eval']} -m` "
            f"(checkpoint cached): {s['wall_seconds']:.1f} s wall = start-up "
            f"{s['startup_seconds']:.1f} + job setup {s['setup_seconds']:.1f} + attack compute "
            f"{s['attack_seconds']:.1f} + tracking {s['tracking_seconds']:.1f} + other "
            f"{s['other_seconds']:.1f}; attack compute is {s['attack_fraction']:.0%} of the wall "
            f"time (generating adversarials alone {s['attack_generation_seconds']:.2f} s)",
            "",
        ]
    if s := report.get("startup"):
        lines += [
            "**start-up** (median wall time of a fresh process): "
            + "; ".join(f"`{command(key)}` {seconds:.2f} s" for key, seconds in s.items()),
            "",
        ]
    return "\n".join(lines)


def findings(report: dict) -> list[str]:
    """Where a peer disagrees with us: a deterministic attack whose adversarial accuracy differs
    from ours, or a different solver that succeeds more often or (an attack without an eps
    budget, which minimises the perturbation) with smaller perturbations."""
    rows = [r for r in report.get("attacks", []) if "identical_fraction" in r]
    ours = {r["attack"]: r for r in report.get("attacks", []) if r["key"] == "ours"}
    found = []
    for r in rows:
        mine = ours[r["attack"]]
        if r["exact"] and not r["agrees"]:
            found.append(
                f"{r['implementation']} {r['attack']}: adv accuracy {r['adv_accuracy']:.4f}, "
                f"ours {mine['adv_accuracy']:.4f}"
            )
        minimises = "eps" not in r.get("params", {})
        if not r["exact"] and (
            r["success_rate"] > mine["success_rate"] or (minimises and r["l2_mean"] < mine["l2_mean"])
        ):
            found.append(
                f"{r['implementation']} {r['attack']}: success {r['success_rate']:.1%} / mean L2 "
                f"{r['l2_mean']:.4f}, ours {mine['success_rate']:.1%} / {mine['l2_mean']:.4f}"
            )
    return found


def save(report: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / report["date"].replace(":", "-").replace(" ", "_")
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(markdown(report) + "\n")
    return json_path, md_path


def _metrics(report: dict) -> dict[str, float]:
    metrics = {}
    for r in report.get("attacks", []):
        if "images_per_second" in r:
            key = f"{r['attack']}.{r['key']}"
            metrics.update(
                {
                    f"{key}.{field}": r[field]
                    for field in (
                        "images_per_second",
                        "vs_floor",
                        "vs_fastest_peer",
                        "passes_per_image",
                        "success_rate",
                        "l2_mean",
                    )
                    if isinstance(r.get(field), float) and r[field] == r[field]
                }
            )
    for section in ("model_passes", "eps_list", "training", "end_to_end", "startup"):
        for key, value in flatten(report.get(section, {})).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{section}.{key}"] = value
    return metrics


def log(tracker: Tracker, experiment: str, report: dict, paths: tuple[Path, ...]) -> str:
    params = {f"bench.{k}": v for k, v in report["config"].items()}
    tags = {"stage": "bench", **{f"machine.{k}": str(v) for k, v in report["machine"].items()}}
    with tracker.run(experiment, f"bench {report['date']}", params, tags) as run_id:
        tracker.log_metrics(run_id, _metrics(report))
        for path in paths:
            tracker.log_artifact(run_id, path)
    return run_id
