"""``tunelens compare``'s validation: every input checked, in the order a mistake is most likely found, before
anything is written to ``--out``: flags -> configuration -> architecture -> checkpoints -> data -> a smoke
pass -> manifests and notes. A bad input raises :class:`~tunelens.compare.plan.CompareError` (one line, exit
status 2). Text models (``--arch hf:...``) take :func:`tunelens.compare.text.validate_text` after the output
folder's checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelens.compare.checkpoints import check_architecture, load_checkpoints, n_out, unchanged_findings
from tunelens.compare.data import load_images
from tunelens.compare.flags import check_image_flags, check_out, check_out_and_data
from tunelens.compare.manifests import external_manifests, image_notes
from tunelens.compare.plan import Plan
from tunelens.compare.settings import complete_configuration, configuration, resolve_device
from tunelens.compare.smoke import forward_check

__all__ = ["validate"]


def validate(args: argparse.Namespace, log=print) -> Plan:
    """Check every input and load models and data; raises :class:`CompareError` (nothing is written)."""
    from tunelens.analysis.io.loading import check_finite
    from tunelens.core.naming import head_name

    out = Path(args.out)
    check_out(out)
    check_out_and_data(out, args.data)
    if args.arch.startswith("hf:"):  # a BERT-family text model on a CSV of sentences
        from tunelens.compare.text import validate_text

        return validate_text(args, log)
    check_image_flags(args)
    device = resolve_device(args)
    cfg = configuration(args)
    check_architecture(args.arch)
    ck = load_checkpoints(args, log)
    models, names, files = ck.models, ck.names, ck.files
    head = head_name(models["base"])
    img = load_images(args, ck)
    ds, train, test = img.dataset, img.train, img.test
    forward_check(args.arch, models, test)

    # everything is valid: describe it (first: tuned files that changed nothing)
    notes, found = unchanged_findings(models, dict(zip(names, args.tuned, strict=False)))
    if notes:
        log(f"[compare] {len(notes)} tuned checkpoint(s) hold exactly the base model's weights")
    nonfinite = {n: bad for n, m in models.items() if (bad := check_finite(m.state_dict()))}
    base_k = n_out(models["base"])
    notes += image_notes(ds, head, base_k, len(train), args.limit, img.weights)
    unchanged = {f["id"].removeprefix("identical_") for f in found}
    tuned_ok = sorted((n for n in names if n not in nonfinite), key=lambda n: n in unchanged)
    complete_configuration(cfg, args, ds, names, tuned_ok, len(test))

    manifests = external_manifests(args, models, files, list(ds.classes), n_out)
    for name in models:
        if name in ck.adapters:
            manifests[name].update(adapter=True, strategy="lora (PEFT adapter)")
    if img.weights is not None:
        desc = f"{args.arch} with torchvision's {img.weights} weights ({base_k} outputs), from {files['base']}."
    else:
        desc = f"{args.arch} from {files['base']} ({base_k}-output head{', ' + head if head else ''})."
    return Plan(
        arch=args.arch,
        out=out,
        models=models,
        manifests=manifests,
        train=train,
        test=test,
        dataset=ds,
        cfg=cfg,
        device=device,
        notes=notes,
        nonfinite=nonfinite,
        findings=found,
        base_description=desc,
        progress=not args.no_progress,
        source=img.source,
    )
