"""`tunelens compare` on checkpoints made with plain torchvision code (not tunelens).

A resnet18 "base" (10 classes, random init) and a "tuned" copy with a 3-class head trained a
few SGD steps on a generated ImageFolder of PNGs, saved in the layouts people use; the report
for each; a ``module:function`` factory; every bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from tunelens.cli import main

FAST = [
    "--image-size",
    "32",
    "--limit",
    "12",
    "--no-progress",
    "--device",
    "cpu",
    "--set",
    "analysis.attribution_images=4",
    "--set",
    "analysis.interpolation_steps=3",
]


def make_images(root: Path, classes=("circle", "square", "triangle"), per_class: int = 6, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            a[8:24, 8:24, ci % 3] = 230  # a class-coloured square
            Image.fromarray(a).save(root / c / f"{i:02d}.png")
    Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8), "L").save(root / classes[0] / "gray.png")
    Image.fromarray((rng.random((size, size, 4)) * 255).astype(np.uint8), "RGBA").save(root / classes[1] / "rgba.png")
    return root


def train_tuned(base: torch.nn.Module, data: Path, n_classes: int, steps: int = 3) -> torch.nn.Module:
    """Plain torchvision fine-tuning: new head, a few SGD steps on the ImageFolder."""
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize((32, 32)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(data), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    tuned = copy.deepcopy(base)
    tuned.fc = torch.nn.Linear(tuned.fc.in_features, n_classes)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.01, momentum=0.9)
    tuned.train()
    it = iter(loader)
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    return tuned.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    data = make_images(root / "data")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    torch.save(base.state_dict(), root / "base.pt")
    tuned = train_tuned(base, data, 3)
    sd = tuned.state_dict()
    files = {
        "plain": root / "tuned_plain.pt",
        "nested": root / "tuned_nested.pth",
        "reference": root / "tuned_reference.pth",
        "ddp": root / "tuned_ddp.pt",
        "compiled": root / "tuned_compiled.pt",
        "safetensors": root / "tuned.safetensors",
    }
    torch.save(sd, files["plain"])
    torch.save({"state_dict": sd, "epoch": 3}, files["nested"])
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=0.01)}, files["reference"])
    torch.save({f"module.{k}": v for k, v in sd.items()}, files["ddp"])
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, files["compiled"])
    save_file({k: v.contiguous() for k, v in sd.items()}, files["safetensors"])
    return {"root": root, "data": data, "base": root / "base.pt", "tuned": files, "sd": sd}


def compare(pair, out: Path, *extra: str, base=None, tuned=None, data=None, arch="resnet18") -> int:
    argv = [
        "compare",
        "--arch",
        arch,
        "--base",
        str(base or pair["base"]),
        "--data",
        str(data or pair["data"]),
        "--out",
        str(out),
    ]
    for t in tuned if tuned is not None else [pair["tuned"]["safetensors"]]:
        argv += ["--tuned", str(t)]
    return main(argv + FAST + list(extra))


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    argv = [
        "compare",
        "--arch",
        "resnet18",
        "--base",
        str(pair["base"]),
        "--tuned",
        str(pair["tuned"]["safetensors"]),
        "--data",
        str(pair["data"]),
        "--out",
        str(out),
    ] + FAST
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_compare_writes_the_report(report, capsys):
    html = (report / "report" / "index.html").read_text()
    summary = json.loads((report / "results" / "summary.json").read_text())
    assert "Weight deltas" in html and "tuned" in summary["tuned"]
    # the base head (10 classes) is not the tuned one (3): replaced, and said so
    deltas = (report / "results" / "weight_deltas.csv").read_text()
    assert "fc.weight" in deltas and "replaced" in deltas
    assert any("linear-probe head" in n for n in summary["notes"])
    assert "linear-probe head" in html
    cka = report / "results" / "cka_diagonal.csv"
    if cka.exists():  # CKA compares the backbones: the two heads answer different tasks
        import pandas as pd

        layers = set(pd.read_csv(cka)["layer"])
        assert "layer4" in layers and "fc" not in layers
        assert "fc diverges" not in html
    # absent things say so
    assert "localisation" in summary["skipped"] and "training curves" in summary["skipped"]
    assert "Not run" in html and "ground-truth masks" in html
    # mixed modes were converted, checkpoints are identified by their sha256
    assert any("converted to RGB" in n for n in summary["notes"])
    from tunelens.core.files import sha256_file

    assert summary["checkpoints"]["tuned"]["sha256"] == sha256_file(Path(str(summary["checkpoints"]["tuned"]["file"])))
    assert summary["data"]["classes"] == ["circle", "square", "triangle"]


@pytest.mark.slow
def test_report_is_replaced_only_when_complete(report, pair, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(report, out)
    before = (out / "report" / "index.html").read_bytes()
    # bad input: nothing touched
    assert compare(pair, out, tuned=[pair["root"] / "missing.pt"]) == 2
    # a crash in the middle of the analyses: the old results and report stay
    import tunelens.analysis.suite as analysis_suite

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(analysis_suite, "analyze_models", boom)
    capsys.readouterr()
    assert compare(pair, out) == 1  # one line, no traceback
    assert "internal error: RuntimeError: simulated crash" in capsys.readouterr().err
    assert (out / "report" / "index.html").read_bytes() == before
    assert (out / "results" / "summary.json").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["report", "results"]


@pytest.mark.parametrize("layout", ["plain", "nested", "reference", "ddp", "compiled", "safetensors"])
def test_every_layout_validates(pair, layout, tmp_path):
    """Each layout passes the whole validation of `tunelens compare` (the analyses are the same for all)."""
    from tunelens.cli import build_parser
    from tunelens.compare import validate

    out = tmp_path / "out"
    args = build_parser().parse_args(
        [
            "compare",
            "--arch",
            "resnet18",
            "--base",
            str(pair["base"]),
            "--tuned",
            str(pair["tuned"][layout]),
            "--data",
            str(pair["data"]),
            "--out",
            str(out),
        ]
        + FAST
    )
    plan = validate(args, log=lambda *a: None)
    name = next(n for n in plan.models if n != "base")
    got = plan.models[name].state_dict()
    assert all(torch.equal(got[k], v) for k, v in pair["sd"].items())
    assert plan.manifests[name]["role"] == "tuned" and len(plan.test) >= 3
    assert not out.exists()


@pytest.mark.slow
def test_user_factory(tmp_path, monkeypatch, capsys):
    """--arch module:function with the user's own network class, imported from the working directory."""
    (tmp_path / "byo_cli_nets.py").write_text(
        "from torch import nn\n\n\n"
        "class SmallNet(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(\n"
        "            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),\n"
        "            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),\n"
        "            nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()))\n"
        "        self.avgpool = nn.AdaptiveAvgPool2d(1)\n"
        "        self.classifier = nn.Linear(16, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.classifier(self.avgpool(self.features(x)).flatten(1))\n\n\n"
        "def small_net(num_classes=10):\n"
        "    return SmallNet(num_classes)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    nets = importlib.import_module("byo_cli_nets")
    make_images(tmp_path / "data", classes=("a", "b"), per_class=6)
    torch.manual_seed(0)
    base = nets.small_net(num_classes=10)
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.pt")
    tuned = copy.deepcopy(base)
    tuned.classifier = torch.nn.Linear(16, 2)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    torch.save({f"module.{k}": v for k, v in tuned.state_dict().items()}, tmp_path / "tuned.pt")
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--arch",
            "byo_cli_nets:small_net",
            "--base",
            "base.pt",
            "--tuned",
            "tuned.pt",
            "--data",
            "data",
            "--out",
            str(out),
        ]
        + FAST
    )
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out.resolve() / 'report' / 'index.html'}"
    deltas = (out / "results" / "weight_deltas.csv").read_text()
    assert "features.0.0.weight" in deltas and "classifier.weight" in deltas


@pytest.mark.slow
def test_nan_weights_are_a_finding(pair, tmp_path, capsys):
    sd = {k: v.clone() for k, v in pair["sd"].items()}
    sd["layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["fc.bias"][0] = float("inf")
    torch.save(sd, tmp_path / "diverged.pt")
    out = tmp_path / "out"
    assert compare(pair, out, tuned=[tmp_path / "diverged.pt"]) == 0
    summary = json.loads((out / "results" / "summary.json").read_text())
    f = next(f for f in summary["findings"] if f["id"] == "nonfinite_diverged")
    assert "NaN or infinite" in f["text"] and "layer3.0.conv1.weight" in f["text"] and "fc.bias" in f["text"]
    assert "NaN" in summary["skipped"]["weights"] and "NaN" in summary["skipped"]["functional"]
    html = (out / "report" / "index.html").read_text()
    assert "layer3.0.conv1.weight" in html and "Not run" in html


def _bad(tmp: Path, pair) -> dict:
    """name -> (compare() keyword arguments, extra argv, words the one-line message must hold)."""
    root = pair["root"]
    trunc = tmp / "trunc.pt"
    raw = pair["tuned"]["plain"].read_bytes()
    trunc.write_bytes(raw[: len(raw) // 3])
    trunc_st = tmp / "trunc.safetensors"
    raw = pair["tuned"]["safetensors"].read_bytes()
    trunc_st.write_bytes(raw[: len(raw) - 100])
    (tmp / "notes.pt").write_text("not weights at all")
    flipped = bytearray(pair["tuned"]["plain"].read_bytes())
    mid = len(flipped) // 2
    flipped[mid : mid + 4096] = bytes(b ^ 0xFF for b in flipped[mid : mid + 4096])
    (tmp / "flipped.pt").write_bytes(bytes(flipped))
    import zipfile

    with zipfile.ZipFile(tmp / "photos.pt", "w") as z:
        z.writestr("holiday.txt", "not a checkpoint")
    torch.save({"epoch": 4, "acc": 0.5}, tmp / "no_tensors.pt")
    two = make_images(tmp / "two_classes", classes=("a", "b"), per_class=3)
    (tmp / "empty").mkdir()
    unreadable = tmp / "unreadable"
    for c in ("a", "b", "c"):
        (unreadable / c).mkdir(parents=True)
        (unreadable / c / "x.png").write_bytes(b"not a png")
    torch_home = tmp / "torch_home"
    return {
        "missing file": (dict(tuned=[root / "nope.pt"]), [], ["--tuned", "nope.pt", "no such file"]),
        "missing base": (dict(base=root / "nope_base.pt"), [], ["--base", "no such file"]),
        "truncated": (dict(tuned=[trunc]), [], ["trunc.pt", "truncated or corrupt"]),
        "truncated safetensors": (dict(tuned=[trunc_st]), [], ["truncated or corrupt"]),
        "not a checkpoint": (dict(tuned=[tmp / "notes.pt"]), [], ["not a checkpoint"]),
        "corrupt zip": (
            dict(tuned=[tmp / "flipped.pt"]),
            [],
            ["flipped.pt is corrupt: CRC check failed for member", "re-save or re-download"],
        ),
        "plain zip": (dict(tuned=[tmp / "photos.pt"]), [], ["zip archive without a torch data.pkl", "holiday.txt"]),
        "no tensors": (dict(tuned=[tmp / "no_tensors.pt"]), [], ["no tensors", "'epoch'"]),
        "architecture mismatch": (
            dict(arch="resnet34"),
            [],
            ["does not fit architecture resnet34", "missing key", "layer1.2", "--arch resnet18"],
        ),
        "unknown arch": (dict(arch="resnet19"), [], ["--arch resnet19", "unknown architecture", "resnet18"]),
        "bad factory": (dict(arch="no_such_module:make"), [], ["cannot import module 'no_such_module'"]),
        "classes do not match the head": (dict(data=two), [], ["2 classes (a, b)", "3-class head"]),
        "empty data folder": (dict(data=tmp / "empty"), [], ["no class sub-folders"]),
        "missing data folder": (dict(data=tmp / "nodata"), [], ["data folder", "does not exist"]),
        "unreadable data folder": (dict(data=unreadable), [], ["no readable images", "x.png"]),
        "torchvision weights not cached": (
            dict(base="torchvision:IMAGENET1K_V1"),
            ["TORCH_HOME"],
            [
                str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"),
                "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            ],
        ),
        "bad image size": (dict(), ["--image-size", "4"], ["--image-size"]),
        "out is a file": (dict(), ["OUTFILE"], ["is a file"]),
    }


BAD = [
    "missing file",
    "missing base",
    "truncated",
    "truncated safetensors",
    "not a checkpoint",
    "corrupt zip",
    "plain zip",
    "no tensors",
    "architecture mismatch",
    "unknown arch",
    "bad factory",
    "classes do not match the head",
    "empty data folder",
    "missing data folder",
    "unreadable data folder",
    "torchvision weights not cached",
    "bad image size",
    "out is a file",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_and_writes_nothing(pair, tmp_path, case, capsys, monkeypatch):
    kwargs, extra, words = _bad(tmp_path, pair)[case]
    out = tmp_path / "out"
    if "TORCH_HOME" in extra:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        extra = []
    if "OUTFILE" in extra:
        out.write_text("a file")
        extra = []
    capsys.readouterr()
    rc = compare(pair, out, *extra, **kwargs)
    cap = capsys.readouterr()
    assert rc == 2, cap
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelens: error: "), cap.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    if case == "out is a file":
        assert out.read_text() == "a file"
    else:
        assert not out.exists()


def test_code_running_pickle_is_refused(pair, tmp_path):
    """A checkpoint whose unpickling would create a file: refused (exit 2), and the file is never created."""
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": pair["sd"], "callback": Payload()}, evil)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelens",
            "compare",
            "--arch",
            "resnet18",
            "--base",
            str(pair["base"]),
            "--tuned",
            str(evil),
            "--data",
            str(pair["data"]),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "system" in err[0], proc.stderr
    assert "torch.save(model.state_dict()" in err[0]
    assert not marker.exists() and not out.exists()


def test_out_holding_the_users_checkpoints_is_refused(pair, tmp_path, monkeypatch, capsys):
    """The user's base.pt and ft.pt in p/results/, --out .: exit 2, the files stay, the message names results/."""
    import shutil

    p = tmp_path / "p"
    (p / "results").mkdir(parents=True)
    shutil.copy(pair["base"], p / "results" / "base.pt")
    shutil.copy(pair["tuned"]["plain"], p / "results" / "ft.pt")
    shutil.copytree(pair["data"], p / "images")
    before = {f: (p / "results" / f).read_bytes() for f in ("base.pt", "ft.pt")}
    monkeypatch.chdir(p)
    capsys.readouterr()
    argv = ["compare", "--arch", "resnet18", "--base", "results/base.pt", "--tuned", "results/ft.pt"]
    rc = main(argv + ["--data", "images", "--out", ".", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "results" in err[0] and "did not write" in err[0] and "another --out" in err[0], err
    assert {f: (p / "results" / f).read_bytes() for f in before} == before
    assert sorted(x.name for x in p.iterdir()) == ["images", "results"]
    # a report/ folder of the user's is protected the same way
    (p / "results" / "base.pt").rename(p / "base.pt")
    (p / "results" / "ft.pt").rename(p / "ft.pt")
    (p / "report").mkdir()
    (p / "report" / "notes.txt").write_text("mine")
    rc = main(
        ["compare", "--arch", "resnet18", "--base", "base.pt", "--tuned", "ft.pt"]
        + ["--data", "images"]
        + ["--out", ".", *FAST]
    )
    assert rc == 2 and "report" in capsys.readouterr().err
    assert (p / "report" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_second_run_replaces_its_own_output(report, pair, tmp_path, capsys):
    """Folders tunelens wrote carry the marker and are replaced by the next run; the user's file beside them stays."""
    import shutil

    from tunelens.core.files import OWNER_MARKER

    out = tmp_path / "out"
    shutil.copytree(report, out)
    (out / "my_notes.txt").write_text("mine")
    for sub in ("results", "report"):
        marker = json.loads((out / sub / OWNER_MARKER).read_text())
        assert marker["tool"] == "tunelens" and marker["run_id"] and marker["kind"] == sub
    old_id = json.loads((out / "report" / OWNER_MARKER).read_text())["run_id"]
    (out / "report" / "index.html").write_text("old")
    off = [a for k in ("attribution", "functional", "intruders") for a in ("--set", f"analysis.{k}=false")]
    assert compare(pair, out, *off) == 0  # what is checked is the folders, not the costly analyses
    assert "Weight deltas" in (out / "report" / "index.html").read_text()
    assert json.loads((out / "report" / OWNER_MARKER).read_text())["run_id"] != old_id
    assert (out / "my_notes.txt").read_text() == "mine"


def test_pipeline_never_replaces_folders_it_did_not_write(tmp_path, capsys):
    """`tunelens report` into a report/ of the user's, `tunelens finetune` into a checkpoints/ of the user's: exit 2."""
    out = tmp_path / "art"
    (out / "report").mkdir(parents=True)
    (out / "report" / "slides.html").write_text("mine")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "base.safetensors").write_text("mine")
    assert main(["report", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "report" in err and "did not write" in err
    assert main(["finetune", "--quick", "--no-progress", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints" in err and "did not write" in err
    assert (out / "report" / "slides.html").read_text() == "mine"
    assert (out / "checkpoints" / "base.safetensors").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["base.safetensors"]


def test_out_and_data_must_not_overlap_and_out_must_be_a_folder(pair, tmp_path, capsys):
    """--out inside --data (or equal, or via a symlink), --data inside --out/results, --out below a file or
    a dangling symlink, a huge --image-size: exit 2, one line, nothing written."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pair["data"], data)
    (tmp_path / "link_to_data").symlink_to(data)
    (tmp_path / "o" / "results").mkdir(parents=True)
    shutil.copytree(pair["data"], tmp_path / "o" / "results" / "imgs")
    from tunelens.core.files import OWNER_MARKER

    (tmp_path / "o" / "results" / OWNER_MARKER).write_text("{}")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        (dict(data=data), data, ["is --data"]),
        (dict(data=data), data / "out", ["inside --data"]),
        (dict(data=data), tmp_path / "link_to_data" / "out", ["inside --data"]),
        (dict(data=tmp_path / "o" / "results" / "imgs"), tmp_path / "o", ["lies in", "results"]),
        (dict(), tmp_path / "afile" / "out", ["below", "which is a file"]),
        (dict(), tmp_path / "dangling", ["dangling symbolic link"]),
        (dict(), tmp_path / "dangling" / "sub", ["dangling symbolic link"]),
    ]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for kwargs, out, words in cases:
        capsys.readouterr()
        assert compare(pair, out, **kwargs) == 2, (out, capsys.readouterr())
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (words, err)
    assert compare(pair, tmp_path / "out", "--image-size", "100000") == 2
    err = capsys.readouterr().err
    assert "at most 4096" in err and "float tensor" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_damaged_run_files_are_one_line_errors(tmp_path, capsys):
    """`analyze --force` on a truncated checkpoint, a damaged checkpoints/manifest.json or results/summary.json:
    exit 2 and one line naming the file, no traceback."""
    from tunelens.core.files import OWNER_MARKER
    from tunelens.finetune.checkpoints import save_checkpoint

    out = tmp_path / "art"
    ck = out / "checkpoints"
    man = save_checkpoint(ck / "base.safetensors", {"w": torch.zeros(64, 64)}, {"arch": "resnet18", "num_classes": 2})
    (ck / "manifest.json").write_text(
        json.dumps({"checkpoints": {"base": {"file": man["file"], "sha256": man["sha256"]}}})
    )
    raw = (ck / "base.safetensors").read_bytes()
    (ck / "base.safetensors").write_bytes(raw[: len(raw) // 2])
    argv = ["--quick", "--no-progress", "--device", "cpu", "--out", str(out)]
    cases = [
        (["analyze", "--force", *argv], None, ["base.safetensors", "sha256"]),
        (
            ["analyze", *argv],
            lambda: (ck / "manifest.json").write_text('{"checkpoints": {'),
            ["manifest.json", "not valid JSON"],
        ),
        (["analyze", *argv], lambda: (ck / "manifest.json").write_text("[]"), ["manifest.json", "no 'checkpoints'"]),
        (["report", "--out", str(out)], lambda: _results(out), ["summary.json", "not valid JSON", "tunelens analyze"]),
    ]

    def _results(out):
        (out / "results").mkdir()
        (out / "results" / OWNER_MARKER).write_text("{}")
        (out / "results" / "summary.json").write_text('{"key": ')

    for argv_, prepare, words in cases:
        if prepare is not None:
            prepare()
        capsys.readouterr()
        assert main(argv_) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tunelens: error: "), err
        assert all(w in err[0] for w in words), (words, err)
    assert not (out / "report").exists()


def test_tuned_identical_to_base_is_said_first(pair, tmp_path, capsys):
    """The same file as --base and --tuned (and a copy of it): a top caveat says nothing changed; the analyses run."""
    import shutil

    same = pair["tuned"]["plain"]
    copy_ = shutil.copy(same, tmp_path / "copy_of_base.pt")
    changed = {k: v.clone() for k, v in pair["sd"].items()}
    changed["fc.bias"] += 0.1
    torch.save(changed, tmp_path / "changed.pt")
    out = tmp_path / "out"
    # the caveats come from the checkpoints: the costly analyses are off (three tuned models)
    off = [a for k in ("attribution", "functional", "intruders") for a in ("--set", f"analysis.{k}=false")]
    assert compare(pair, out, *off, base=same, tuned=[same, copy_, tmp_path / "changed.pt"]) == 0
    summary = json.loads((out / "results" / "summary.json").read_text())
    top = summary["findings"][:2]
    assert {f["id"] for f in top} == {"identical_tuned_plain", "identical_copy_of_base"}, top
    assert all(f["kind"] == "caveat" and "exactly the base model's weights: nothing changed" in f["text"] for f in top)
    assert str(same) in top[0]["text"] or str(same) in top[1]["text"]
    assert not any(f["id"] == "identical_changed" for f in summary["findings"])
    assert sum("nothing changed" in n for n in summary["notes"]) == 2
    assert summary["config"]["analysis"]["primary"] == "changed"  # a model that did change
    assert "nothing changed" in (out / "report" / "index.html").read_text()


def _validate(pair, out: Path, *extra: str):
    from tunelens.cli import build_parser
    from tunelens.compare import validate

    argv = ["compare", "--arch", "resnet18", "--base", str(pair["base"]), "--tuned", str(pair["tuned"]["plain"])]
    args = build_parser().parse_args(argv + ["--data", str(pair["data"]), "--out", str(out), *FAST, *extra])
    return validate(args, log=lambda *a: None)


def test_mask_rows_are_named_and_empty_ones_noted(pair, tmp_path, capsys):
    """An inf box in a later row: exit 2 naming the CSV line (not "the image transform"); empty boxes are
    left out, counted, and noted."""
    from tunelens.analysis.io.datafolder import image_folder

    ds = image_folder(pair["data"], image_size=32, limit=12)
    rows = [str(p.relative_to(pair["data"])) for p, _ in ds.samples]
    csv = tmp_path / "boxes.csv"
    boxes = ["8,8,24,24"] * len(rows)
    boxes[-1] = "8,8,1e400,24"
    csv.write_text("path,x0,y0,x1,y1\n" + "".join(f"{r},{b}\n" for r, b in zip(rows, boxes, strict=True)))
    out = tmp_path / "out"
    capsys.readouterr()
    assert compare(pair, out, "--masks", str(csv), tuned=[pair["tuned"]["plain"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"line {len(rows) + 1}" in err[0] and "not a finite number" in err[0], err
    assert "transform" not in err[0] and not out.exists()
    boxes[-1] = "40,40,50,50"  # outside the 32x32 image
    csv.write_text("path,x0,y0,x1,y1\n" + "".join(f"{r},{b}\n" for r, b in zip(rows, boxes, strict=True)))
    plan = _validate(pair, out, "--masks", str(csv))
    assert plan.dataset.masks_dropped == 1 and len(plan.dataset) == len(rows) - 1
    assert any("1 image(s) were left out because their ground-truth mask is empty" in n for n in plan.notes)
    assert not out.exists()
