import contextlib
import hashlib

import torch

from tunelens.finetune.checkpoints import save_checkpoint
from tunelens.finetune.data import ShapesSpec, make_shapes
from tunelens.finetune.models import build_model
from tunelens.finetune.train import TrainConfig, train


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_data_is_deterministic_and_seeded():
    spec = ShapesSpec(task="target", train_per_class=3, val_per_class=1, test_per_class=1, seed=5)
    a, b = make_shapes(spec), make_shapes(spec)
    c = make_shapes(ShapesSpec(task="target", train_per_class=3, val_per_class=1, test_per_class=1, seed=6))
    assert _digest(a["train"].images) == _digest(b["train"].images)
    assert torch.equal(a["train"].masks, b["train"].masks) and torch.equal(a["train"].labels, b["train"].labels)
    assert _digest(a["train"].images) != _digest(c["train"].images)
    assert a["train"].masks.any(dim=(1, 2)).all()  # every image has an object


def test_same_seed_same_checkpoint_hash(tmp_path):
    data = make_shapes(ShapesSpec(task="source", train_per_class=8, val_per_class=2, test_per_class=1))
    hashes = []
    for i in range(2):
        model = build_model("tiny_resnet", 8, seed=3)
        res = train(
            model,
            data["train"],
            data["val"],
            TrainConfig(epochs=2, batch_size=16, seed=3, device="cpu"),
            progress=False,
        )
        man = save_checkpoint(tmp_path / f"m{i}.safetensors", res.model.state_dict(), {"seed": 3})
        hashes.append(man["sha256"])
    assert hashes[0] == hashes[1]
    model = build_model("tiny_resnet", 8, seed=4)
    res = train(
        model, data["train"], data["val"], TrainConfig(epochs=2, batch_size=16, seed=4, device="cpu"), progress=False
    )
    assert save_checkpoint(tmp_path / "m2.safetensors", res.model.state_dict(), {})["sha256"] != hashes[0]


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    data = make_shapes(ShapesSpec(task="source", train_per_class=8, val_per_class=2, test_per_class=1))
    cfg = TrainConfig(epochs=3, batch_size=16, seed=1, device="cpu")
    ref = train(build_model("tiny_resnet", 8, seed=1), data["train"], data["val"], cfg, progress=False)

    resume = tmp_path / "run.resume.pt"
    import tunelens.finetune.train as tr

    calls = {"n": 0}
    orig = tr.evaluate

    def interrupt_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    tr.evaluate = interrupt_on_second_epoch
    try:
        with contextlib.suppress(KeyboardInterrupt):
            train(
                build_model("tiny_resnet", 8, seed=1),
                data["train"],
                data["val"],
                cfg,
                resume_path=resume,
                progress=False,
            )
    finally:
        tr.evaluate = orig
    assert resume.exists()
    st = torch.load(resume, weights_only=True)
    assert st["epoch"] == 1
    res = train(
        build_model("tiny_resnet", 8, seed=1), data["train"], data["val"], cfg, resume_path=resume, progress=False
    )
    assert not resume.exists()
    assert len(res.history) == 3
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k
