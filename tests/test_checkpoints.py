import json

import pytest
import torch

import tunelens.finetune.checkpoints as ck
from tunelens.finetune.checkpoints import CheckpointError, load_checkpoint, save_checkpoint


def _sd():
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "b": torch.randn(4)}


def test_roundtrip_and_manifest(tmp_path):
    p = tmp_path / "m.safetensors"
    man = save_checkpoint(p, _sd(), {"arch": "x", "seed": 1})
    sd, m2 = load_checkpoint(p)
    assert torch.equal(sd["w"], _sd()["w"])
    assert m2["sha256"] == man["sha256"] == ck.sha256_file(p)
    assert m2["arch"] == "x" and "torch" in m2["versions"]


def test_crash_mid_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"

    def crash(tensors, path):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # half a file
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, _sd(), {})
    assert not p.exists() and not p.with_suffix(".json").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(p)


def test_crash_between_weights_and_manifest(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, _sd(), {"v": 1})
    new = {k: v + 1 for k, v in _sd().items()}

    def crash(path, text):
        raise KeyboardInterrupt("killed before the manifest")

    monkeypatch.setattr(ck, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, new, {"v": 2})
    # new weights, old manifest: the sha256 no longer matches, so it does not load as valid
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(p)


def test_weights_without_manifest_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, _sd(), {})
    p.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        load_checkpoint(p)


def test_truncated_file_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, _sd(), {})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)
    man = json.loads(p.with_suffix(".json").read_text())
    man["sha256"] = ck.sha256_file(p)  # even a manifest that vouches for it cannot make it parse
    p.with_suffix(".json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(p)
