"""The lora strategy (peft): a rank-r update per adapted layer, only adapters and head train, BatchNorm stays put;
PEFT adapter folders merge onto a base exactly as peft's own merge_and_unload, and misfits are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from tunelens.analysis.io.adapters import AdapterError, merge_adapter
from tunelens.finetune.lora import add_lora, lora_targets, merge_lora, save_adapter
from tunelens.finetune.models import replace_head
from tunelens.finetune.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g))


def _tuned_lora(rank: int = 2, stages=("layer2", "layer4")):
    base = _tiny()
    model = copy.deepcopy(base)
    replace_head(model, 3, seed=1)
    pm = add_lora(model, rank, 4.0, list(stages), seed=1)
    cfg = TrainConfig(strategy="lora", epochs=2, batch_size=8, lr=0.5, augment=False, device="cpu")
    res = train(pm.base_model.model, _data(), None, cfg, progress=False, log=lambda *a: None)
    return base, pm, res


def _tiny():
    from tunelens.core.architectures import TinyResNet

    torch.manual_seed(0)
    return TinyResNet(num_classes=4, widths=(8, 16, 16, 32)).eval()


def test_lora_update_has_rank_at_most_r_and_only_adapters_and_head_train():
    rank = 2
    base, pm, res = _tuned_lora(rank)
    targets = set(lora_targets(base, ["layer2", "layer4"]))
    lora_params = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    head = pm.base_model.model.fc.modules_to_save["default"]
    assert res.trainable_params == lora_params + sum(p.numel() for p in head.parameters())
    merged = merge_lora(pm)
    sb, sm = base.state_dict(), merged.state_dict()
    assert set(sm) == set(sb)
    seen = 0
    for k, w0 in sb.items():
        if k.startswith("fc."):
            continue
        mod = k.rpartition(".")[0]
        d = (sm[k].double() - w0.double()).reshape(w0.shape[0], -1) if w0.ndim > 1 else sm[k] - w0
        if mod in targets and k.endswith(".weight"):
            r = int(torch.linalg.matrix_rank(d, rtol=1e-6))
            assert 0 < r <= rank, (k, r)
            seen += 1
        else:  # frozen: other convs, every BatchNorm parameter and running statistic
            assert torch.equal(sm[k], w0), k
    assert seen == len(targets)


def test_peft_saved_adapter_merges_like_merge_and_unload(tmp_path):
    base, pm, _ = _tuned_lora(2, stages=("layer1", "layer3"))
    save_adapter(pm, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    reference = copy.deepcopy(pm).merge_and_unload()
    ours = merge_adapter(base, tmp_path / "adapter")
    assert ours.fc.out_features == 3  # the adapter's new head replaced the base's 4-class one
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], rtol=0, atol=1e-6, msg=k)
    assert torch.equal(base.fc.weight, _tiny().fc.weight)  # the base was not changed


def test_adapter_that_does_not_fit_the_base_is_refused(tmp_path):
    _, pm, _ = _tuned_lora(2, stages=("layer4",))
    save_adapter(pm, tmp_path / "a")
    from tunelens.core.architectures import TinyResNet

    other = TinyResNet(num_classes=4, widths=(8, 16, 16, 64))  # layer4 of another width
    with pytest.raises(AdapterError, match="does not fit"):
        merge_adapter(other, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        merge_adapter(_tiny(), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="LoRA adapters only"):
        merge_adapter(_tiny(), tmp_path / "b")


def test_lora_stages_must_exist():
    with pytest.raises(ValueError, match="choose from"):
        add_lora(_tiny(), 2, 4.0, ["layer9"])
