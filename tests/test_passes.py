"""One pass per model (analysis/engine/passes.py): everything read from a recorded pass equals what the separate
passes it replaces computed -- CKA, the chance controls, predictions, accuracy, probe features -- and the suite
runs each model through the test data once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tunelens.analysis.engine.passes import PassCache, record_pass
from tunelens.analysis.measures.cka_models import (
    cka_against_chance,
    cka_chance_from_passes,
    cka_from_passes,
    cka_matrix,
    randomly_initialised,
)
from tunelens.analysis.measures.interpolation import interpolate
from tunelens.analysis.measures.interventions import rewind
from tunelens.analysis.measures.probes import layer_features, probe_layers
from tunelens.analysis.steps.evaluation import predictions_from_passes, predictions_table
from tunelens.core.evaluation import evaluate
from tunelens.core.stages import stages
from tunelens.finetune.models import build_model

LAYERS = ["stem", "layer1", "layer2", "layer3", "layer4", "avgpool"]


def _loader(n=40, bs=16, seed=0, classes=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % classes
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def _pair():
    a = build_model("tiny_resnet", 6, seed=0)
    b = build_model("tiny_resnet", 6, seed=1)
    return a.eval(), b.eval()


def _layers(model: nn.Module) -> list[str]:
    return stages(model, torch.zeros(1, 3, 32, 32)).cka_layers()


def test_cka_from_passes_equals_cka_matrix():
    a, b = _pair()
    layers = _layers(a)
    loader = _loader()
    pa, pb = record_pass(a, loader, layers, "cpu"), record_pass(b, loader, layers, "cpu")
    direct = cka_matrix(a, b, loader, layers=layers, device="cpu", n_boot=200, seed=3)
    shared = cka_from_passes(pa, pb, layers, n_boot=200, seed=3)
    assert len(pa.grams) == 3 and pa.n_samples == 40  # batches of 16, 16, 8
    for x, y in ((direct.ab, shared.ab), (direct.aa, shared.aa), (direct.bb, shared.bb)):
        assert np.array_equal(x.to_numpy(), y.to_numpy())
    pd.testing.assert_frame_equal(direct.diagonal, shared.diagonal)
    pd.testing.assert_frame_equal(direct.activations, shared.activations)
    sub = layers[1:3]  # a subset of the recorded layers: only those rows
    part = cka_from_passes(pa, pb, sub, n_boot=10)
    assert list(part.ab.index) == sub and set(part.activations["layer"]) == set(sub)
    assert np.allclose(part.ab.to_numpy(), direct.ab.loc[sub, sub].to_numpy(), atol=1e-12)


def test_chance_from_passes_equals_cka_against_chance():
    a, b = _pair()
    scratch = build_model("tiny_resnet", 6, seed=5).eval()
    rand = randomly_initialised(a, seed=4)
    layers = _layers(a)
    loader = _loader()
    direct = cka_against_chance(a, b, loader, layers=layers, random_model=rand, scratch=scratch, device="cpu", seed=2)
    cache = PassCache(loader, layers, "cpu")
    shared = cka_chance_from_passes(
        cache.get(a), cache.get(b), cache.get(rand, keep=False), cache.get(scratch), layers, seed=2
    )
    pd.testing.assert_frame_equal(direct, shared)
    assert a in cache and rand not in cache and cache.get(a) is cache.get(a)


def test_pass_outputs_equal_separate_passes():
    a, b = _pair()
    layers = _layers(a)
    loader = _loader()
    cache = PassCache(loader, layers, "cpu")
    direct = predictions_table({"a": a, "b": b}, loader, torch.device("cpu"))
    shared = predictions_from_passes({"a": cache.get(a), "b": cache.get(b)})
    pd.testing.assert_frame_equal(direct, shared)
    ref = evaluate(b, loader, "cpu")
    got = cache.get(b).metrics()
    assert got["n"] == ref["n"] == 40 and got["acc"] == ref["acc"] and got["loss"] == pytest.approx(ref["loss"], 1e-12)
    # a subset of positions: the same as evaluating those samples alone
    subset = [1, 5, 17, 33, 39]
    x, y = loader.dataset.tensors
    alone = evaluate(b, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[subset], y[subset])), "cpu")
    sub = cache.get(b).metrics(subset)
    assert sub["n"] == 5 and sub["acc"] == alone["acc"] and sub["loss"] == pytest.approx(alone["loss"], 1e-6)
    feats, labels = layer_features(b, loader, layers, "cpu")
    shared_feats = cache.get(b).features(layers)
    for n in layers:
        assert np.array_equal(feats[n], shared_feats[n])
    assert np.array_equal(labels, cache.get(b).targets())


def test_probes_rewind_and_interpolation_reuse_measurements():
    a, b = _pair()
    layers = _layers(a)
    train, test = _loader(n=48, seed=1), _loader()
    p = record_pass(b, test, layers, "cpu")
    direct = probe_layers(b, train, test, layers, name="b")
    shared = probe_layers(b, train, None, layers, name="b", test_features=(p.features(layers), p.targets()))
    pd.testing.assert_frame_equal(direct, shared)
    with pytest.raises(ValueError, match="test_loader or test_features"):
        probe_layers(b, train, None, layers)
    r0 = rewind(a, b, test).table
    r1 = rewind(a, b, test, reference=p.metrics()).table
    pd.testing.assert_frame_equal(r0, r1, check_exact=False, rtol=1e-12)
    rw = r0.set_index("group")
    ends = {"base": dict(rw.loc["all_but_head", ["acc", "loss"]]), "tuned": dict(rw.loc["none", ["acc", "loss"]])}
    i0 = interpolate(a, b, test, steps=3, train_loader=train)
    i1 = interpolate(a, b, test, steps=3, train_loader=train, endpoints=ends)
    pd.testing.assert_frame_equal(i0.table, i1.table)
    assert i0.endpoints == i1.endpoints  # the same numbers, read from the rewind table


def test_suite_runs_each_model_through_the_test_data_once(monkeypatch):
    """Evaluation and CKA (with its random and from-scratch controls) over a base, two tuned models and
    scratch: each model sees the test images once, in the shared pass."""
    from tunelens.analysis.engine.registry import analysis_defaults
    from tunelens.analysis.suite import analyze_models

    data = {"train": _loader(n=48, seed=1).dataset, "test": _loader(n=32, seed=2).dataset}
    models = {n: build_model("tiny_resnet", 6, seed=i) for i, n in enumerate(("base", "full", "lp", "scratch"))}
    roles = {"base": "base", "full": "tuned", "lp": "tuned", "scratch": "control"}
    manifests = {n: {"role": r, "strategy": n} for n, r in roles.items()}
    test_rows = {t.numpy().tobytes() for t in data["test"].tensors[0]}
    seen: dict[str, int] = {}

    # the suite may run copies (channels-last on the CPU): a model is known by its first weights
    def key(m: nn.Module) -> bytes:
        return next(m.parameters()).detach().contiguous().numpy().tobytes()

    names = {key(m): n for n, m in models.items()}
    original = nn.Module.__call__

    def counting(self, *args, **kwargs):
        if type(self).__name__ == "TinyResNet" and args and args[0][0].numpy().tobytes() in test_rows:
            name = names.get(key(self), "other")
            seen[name] = seen.get(name, 0) + len(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__call__", counting)
    settings = analysis_defaults()
    settings.update(budget="none", primary="full")
    for name in ("attribution", "functional", "weights", "intruders", "forgetting", "lora_vs_full", "strategies"):
        settings[name] = False
    res = analyze_models(
        models, manifests, data, settings, device=torch.device("cpu"), log=lambda _: None, progress=False
    )
    assert not res.summary.get("failed"), res.summary.get("failed")
    assert {"predictions", "cka_chance", "cka_diagonal"} <= set(res.tables)
    # the base once more on one image: the stage map is traced on the first test image; "other": the
    # random-weights control of CKA
    assert seen == {"base": 32 + 1, "full": 32, "lp": 32, "scratch": 32, "other": 32}


def test_channels_last_only_where_it_helps_and_never_on_the_callers_model():
    import torchvision

    from tunelens.core.models import channels_last_helps, fast_layout

    resnet = build_model("tiny_resnet", 6, seed=0).eval()
    assert channels_last_helps(resnet, "cpu") and not channels_last_helps(resnet, "cuda")
    assert not channels_last_helps(torchvision.models.vgg11(num_classes=3), "cpu")  # no BatchNorm
    assert not channels_last_helps(torchvision.models.convnext_tiny(num_classes=3), "cpu")  # LayerNorm
    assert not channels_last_helps(nn.Linear(3, 2), "cpu")
    fast = fast_layout(resnet, "cpu")
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert fast is not resnet and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in resnet.parameters())  # the caller's model is as it was
    for (k, a), b in zip(resnet.state_dict().items(), fast.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(resnet(x), fast(x), atol=1e-5, rtol=1e-4)  # rounding only
    vgg = torchvision.models.vgg11(num_classes=3)
    assert fast_layout(vgg, "cpu") is vgg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pass_matches_cpu():
    """The shared pass, the CKA read from it, the rewind (resumed) and the interpolation on a GPU agree with the
    CPU to float32 rounding."""
    a, b = _pair()
    layers = _layers(a)
    loader = _loader()
    cpu = cka_from_passes(record_pass(a, loader, layers, "cpu"), record_pass(b, loader, layers, "cpu"), layers)
    pa, pb = record_pass(a, loader, layers, "cuda"), record_pass(b, loader, layers, "cuda")
    gpu = cka_from_passes(pa, pb, layers)
    assert np.allclose(cpu.ab.to_numpy(), gpu.ab.to_numpy(), atol=1e-4)
    assert pb.metrics()["acc"] == record_pass(b, loader, layers, "cpu").metrics()["acc"]
    r_cpu, r_gpu = rewind(a, b, loader, device="cpu", resume=True), rewind(a, b, loader, device="cuda", resume=True)
    assert np.allclose(r_cpu.table["loss"], r_gpu.table["loss"], atol=1e-4)
    i_cpu = interpolate(a, b, loader, steps=3, train_loader=loader, device="cpu")
    i_gpu = interpolate(a, b, loader, steps=3, train_loader=loader, device="cuda")
    assert np.allclose(i_cpu.table["loss"], i_gpu.table["loss"], atol=1e-3)


def test_saliency_and_input_x_gradient_share_one_backward_pass(monkeypatch):
    """Both maps come from one gradient per model and input set, equal to Captum's own two methods."""
    from tunelens.analysis.measures.attribution import study_run as study_mod
    from tunelens.analysis.measures.attribution.study import attribution_study

    a, b = _pair()
    ds = _loader(n=8).dataset
    calls: list[str] = []
    real = study_mod.attribute_group

    def counting(models, inputs, targets, method, **kw):
        calls.append(method)
        return real(models, inputs, targets, method, **kw)

    monkeypatch.setattr(study_mod, "attribute_group", counting)
    kw = dict(n_images=8, device="cpu", n_boot=20, faithfulness=False, threads=None)
    shared = attribution_study(a, b, ds, methods=("saliency", "input_x_gradient"), **kw)
    assert calls == ["saliency", "saliency"]  # the gradients: base/tuned/floors, then the shifted ceiling
    calls.clear()
    apart = attribution_study(  # an option of its own switches sharing off: Captum's Saliency and InputXGradient
        a, b, ds, methods=("saliency", "input_x_gradient"), options={"saliency": {"abs": True}}, **kw
    )
    assert calls == ["saliency", "saliency", "input_x_gradient", "input_x_gradient"]
    cols = [c for c in shared.comparisons.columns if c not in ("seconds",)]
    pd.testing.assert_frame_equal(shared.comparisons[cols], apart.comparisons[cols])
