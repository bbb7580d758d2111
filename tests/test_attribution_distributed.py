"""The attribution study sharded over 2 gloo processes equals the single-process study."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _distributed import run_two_ranks, single_thread

pytestmark = pytest.mark.slow

METHODS = ("saliency", "integrated_gradients", "grad_cam")


def _study():
    from tunelens.analysis.measures.attribution.study import attribution_study
    from tunelens.finetune.data import ShapesSpec, make_shapes
    from tunelens.finetune.models import build_model

    data = make_shapes(ShapesSpec(task="target", train_per_class=2, val_per_class=1, test_per_class=2, seed=3))
    base, tuned = build_model("tiny_resnet", 6, seed=1), build_model("tiny_resnet", 6, seed=2)
    st = attribution_study(
        base,
        tuned,
        data["test"],
        methods=METHODS,
        n_images=9,
        seed=0,
        device="cpu",
        n_boot=200,
        threads=1,
        faithfulness=True,
        faithfulness_steps=4,
    )
    return {"comparisons": st.comparisons, "summary": st.summary, "maps": st.maps}


def _study_on_rank(rank: int) -> dict:
    return _study()


def test_sharded_attribution_equals_single_process(tmp_path):
    dd = run_two_ranks(_study_on_rank, tmp_path)
    single = single_thread(_study)
    cols = [c for c in single["comparisons"].columns if c != "seconds"]
    pd.testing.assert_frame_equal(dd["comparisons"][cols], single["comparisons"][cols], rtol=1e-5, atol=1e-6)
    num = [c for c in single["summary"].columns if c not in ("seconds",) and single["summary"][c].dtype.kind == "f"]
    np.testing.assert_allclose(dd["summary"][num].to_numpy(), single["summary"][num].to_numpy(), rtol=1e-5, atol=1e-6)
    for m in METHODS:
        for key, arr in single["maps"][m].items():
            np.testing.assert_allclose(dd["maps"][m][key], arr, rtol=1e-5, atol=1e-6)
