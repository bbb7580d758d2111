"""ImageFolder data for your own checkpoints (tunelens.analysis.io.datafolder): modes, limits, masks and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tunelens.analysis.io.datafolder import IMAGENET_MEAN, IMAGENET_STD, DataFolderError, image_folder, split_train_test


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4, size=(40, 48)) -> Path:
    rng = np.random.default_rng(0)
    h, w = size
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_classes_modes_and_values(tmp_path):
    root = make_folder(tmp_path / "data")
    Image.fromarray(np.full((40, 48), 128, np.uint8), "L").save(root / "cat" / "gray.png")
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 0] = 255  # red, half of it transparent (-> white)
    rgba[:, :24, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "rgba.png")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).convert("P").save(root / "fox" / "palette.png")
    Image.fromarray(np.full((40, 48), 30000, np.uint16)).save(root / "fox" / "deep16.png")
    (root / "fox" / "notes.txt").write_text("ignored")
    ds = image_folder(root, image_size=16, normalize="none")
    assert ds.classes == ["cat", "dog", "fox"] and len(ds) == 16
    assert ds.modes["L"] == 1 and ds.modes["RGBA"] == 1 and ds.modes["P"] == 1 and sum(ds.modes.values()) == 16
    assert "converted to RGB" in ds.describe()
    x, y = ds[ds.samples.index((root / "cat" / "gray.png", 0))]
    assert x.shape == (3, 16, 16) and y == 0
    torch.testing.assert_close(x, torch.full_like(x, 128 / 255))
    x, _ = ds[[p for p, _ in ds.samples].index(root / "dog" / "rgba.png")]
    assert torch.allclose(x[:, :, :6], torch.tensor([1.0, 0, 0])[:, None, None])  # opaque red
    assert torch.allclose(x[:, :, -6:], torch.ones(3, 16, 6))  # transparent -> white
    x, _ = ds[[p for p, _ in ds.samples].index(root / "fox" / "deep16.png")]
    assert abs(float(x.mean()) - 30000 / 65535) < 0.01
    # ImageNet normalisation and the torchvision ImageFolder class order
    dn = image_folder(root, image_size=16)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(dn[3][0], (ds[3][0] - mean) / std)
    from torchvision.datasets import ImageFolder

    assert ImageFolder(str(root)).classes == ds.classes


def test_limit_is_spread_over_classes_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    a = image_folder(root, image_size=8, limit=7, seed=3)
    b = image_folder(root, image_size=8, limit=7, seed=3)
    assert len(a) == 7 and a.samples == b.samples
    assert sorted(np.bincount(a.targets).tolist()) == [2, 2, 3]
    tr, te = split_train_test(a, 0.5, seed=0)
    assert sorted(tr.indices + te.indices) == list(range(7)) and not set(tr.indices) & set(te.indices)
    assert set(tr.targets) == {0, 1, 2} and set(te.targets) == {0, 1, 2} and tr.classes == a.classes
    assert split_train_test(a, 0.5, seed=0)[0].indices == tr.indices


def test_unreadable_files(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = image_folder(root, image_size=8)
    assert len(ds) == 6 and ds.skipped[0][0] == root / "dog" / "broken.png" and "skipped" in ds.describe()
    for p in (root / "fox").iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(DataFolderError, match=r"class folder .*fox has no readable image .*fox"):
        image_folder(root, image_size=8)
    bad = make_folder(tmp_path / "bad", classes=("a", "b"), per_class=1)
    for p in bad.rglob("*.png"):
        p.write_bytes(b"garbage")
    with pytest.raises(DataFolderError, match=r"no readable images: the first, .*a/0.png"):
        image_folder(bad)


def test_folder_errors(tmp_path):
    with pytest.raises(DataFolderError, match=r"does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataFolderError, match=r"is a file"):
        image_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFolderError, match=r"no class sub-folders .*empty"):
        image_folder(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(DataFolderError, match=r"holds 1 image"):
        image_folder(flat)
    root = make_folder(tmp_path / "data", per_class=1)
    (root / "zebra").mkdir()
    with pytest.raises(DataFolderError, match=r"class folder .*zebra has no images"):
        image_folder(root)
    (root / "zebra").rmdir()
    (root / "cat" / "0.png").unlink()
    (root / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataFolderError, match=r"cat has no images"):
        image_folder(root)


def test_masks_csv_boxes_and_pngs(tmp_path):
    root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=(40, 80))
    m = np.zeros((40, 80), np.uint8)
    m[:, 40:] = 255  # right half
    Image.fromarray(m).save(tmp_path / "m.png")
    csv = tmp_path / "masks.csv"
    csv.write_text(
        "path,mask,x0,y0,x1,y1\n"
        "a/0.png,m.png,,,,\n"
        "a/1.png,,0,0,40,20\n"  # top-left quarter
        "b/0.png,m.png,,,,\n"
        "b/1.png,,0,0,80,40\n"
    )
    ds = image_folder(root, image_size=16, masks_csv=csv)
    assert ds.has_masks
    _x, _y, mask = ds[0]
    assert mask.dtype == torch.bool and mask.shape == (16, 16)
    assert mask[:, 8:].all() and not mask[:, :8].any()
    _, _, box = ds[1]
    assert box[:8, :8].all() and box.sum() == 64
    assert ds[3][2].all()
    # a limit keeps only the selected images' rows
    assert len(image_folder(root, image_size=16, masks_csv=csv, limit=2)[0]) == 3
    csv.write_text("path,x0,y0,x1,y1\na/0.png,0,0,4,4\n")
    with pytest.raises(DataFolderError, match=r"no row for a/1.png"):
        image_folder(root, masks_csv=csv)
    csv.write_text("path,x0,y0,x1,y1\na/0.png,0,0,4,4\nc/9.png,0,0,4,4\n")
    with pytest.raises(DataFolderError, match=r"'c/9.png' is not an image"):
        image_folder(root, masks_csv=csv)
    csv.write_text("path,box\na/0.png,1\n")
    with pytest.raises(DataFolderError, match=r"needs the columns"):
        image_folder(root, masks_csv=csv)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    csv.write_text("path,mask\n" + "".join(f"{c}/{i}.png,small.png\n" for c in "ab" for i in range(2)))
    with pytest.raises(DataFolderError, match=r"10x10 pixels but its image a/0.png is 80x40"):
        image_folder(root, masks_csv=csv)
    with pytest.raises(DataFolderError, match=r"does not exist"):
        image_folder(root, masks_csv=tmp_path / "none.csv")


def test_torchvision_preset_transform_with_masks(tmp_path):
    from torchvision.transforms._presets import ImageClassification

    root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=1, size=(40, 80))
    csv = tmp_path / "boxes.csv"
    csv.write_text("path,x0,y0,x1,y1\na/0.png,0,0,40,40\nb/0.png,40,0,80,40\n")
    ds = image_folder(root, transform=ImageClassification(crop_size=16, resize_size=20), masks_csv=csv)
    x, _y, mask = ds[0]
    assert x.shape == (3, 16, 16) and mask.shape == (16, 16)
    # resize to 20x40, centre crop 16 (columns 12..27): the left half of the image covers columns 0..3 of it
    assert mask[:, :8].all() and not mask[:, 8:].any()


def _box_csv(path: Path, rows: dict[str, str]) -> Path:
    path.write_text("path,x0,y0,x1,y1\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    return path


def test_every_mask_row_is_checked_up_front(tmp_path):
    """A non-finite box in a later row, or a row pointing outside the data folder: an error naming the CSV line."""
    root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=(40, 80))
    ok = {f"{c}/{i}.png": "0,0,40,20" for c in "ab" for i in range(2)}
    for bad in ("1e400", "inf", "nan"):
        csv = _box_csv(tmp_path / "m.csv", dict(ok, **{"b/1.png": f"0,0,{bad},20"}))
        with pytest.raises(
            DataFolderError, match=r"line 5: the box of 'b/1.png' has a coordinate that is not a finite"
        ):
            image_folder(root, image_size=16, masks_csv=csv)
    # a row for an image that --limit leaves out is checked too
    csv = _box_csv(tmp_path / "m.csv", dict(ok, **{"b/1.png": "0,0,inf,20"}))
    with pytest.raises(DataFolderError, match=r"line 5"):
        image_folder(root, image_size=16, masks_csv=csv, limit=2)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    csv = _box_csv(tmp_path / "m.csv", dict(ok, **{"../outside.png": "0,0,4,4"}))
    with pytest.raises(DataFolderError, match=r"line 6: '../outside.png' lies outside the data folder"):
        image_folder(root, image_size=16, masks_csv=csv)


def test_empty_ground_truth_is_left_out_and_counted(tmp_path):
    root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=(40, 80))
    Image.fromarray(np.zeros((40, 80), np.uint8)).save(tmp_path / "zero.png")
    rows = {f"{c}/{i}.png": "0,0,40,20" for c in "ab" for i in range(3)}
    rows["a/1.png"] = "100,100,120,120"  # outside the 80x40 image
    rows["b/2.png"] = "3.1,3.1,3.3,3.3"  # rounds to no pixel
    csv = _box_csv(tmp_path / "m.csv", rows)
    ds = image_folder(root, image_size=16, masks_csv=csv)
    assert ds.masks_dropped == 2 and len(ds) == 4
    assert {p.name for p, _ in ds.masks_dropped_files} == {"1.png", "2.png"}
    assert all(bool(ds[i][2].any()) for i in range(len(ds)))
    assert "empty ground-truth mask left out" in ds.describe()
    # an all-zero mask image
    csv.write_text("path,mask\n" + "".join(f"{c}/{i}.png,zero.png\n" for c in "ab" for i in range(3)))
    with pytest.raises(DataFolderError, match=r"ground truth of every selected image is empty .*all zero"):
        image_folder(root, image_size=16, masks_csv=csv)
    # a class left without a single usable mask
    rows = {f"{c}/{i}.png": ("0,0,40,20" if c == "a" else "200,200,300,300") for c in "ab" for i in range(3)}
    with pytest.raises(DataFolderError, match=r"every image of class b has an empty ground truth"):
        image_folder(root, image_size=16, masks_csv=_box_csv(tmp_path / "m.csv", rows))


def test_dot_folders_are_classes_as_in_torchvision(tmp_path):
    """torchvision's find_classes lists every directory, '.' names included: so does image_folder."""
    from torchvision.datasets.folder import find_classes

    root = make_folder(tmp_path / "data", classes=(".hidden", "a", "b"), per_class=2)
    ds = image_folder(root, image_size=16)
    assert ds.classes == find_classes(str(root))[0] == [".hidden", "a", "b"]
    (root / ".ipynb_checkpoints").mkdir()
    with pytest.raises(DataFolderError, match=r"ipynb_checkpoints has no images.*'\.' are classes too"):
        image_folder(root, image_size=16)
