"""``tunelens compare``'s images: the data folder read (with the torchvision weights' own transform where
those weights are the base), one class per tuned output, split into train and test; ``--source-data`` likewise."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from tunelens.compare.checkpoints import Checkpoints, n_out
from tunelens.compare.class_names import check_class_names, parse_classes
from tunelens.compare.plan import CompareError

__all__ = ["ImageData", "load_images", "source_data"]


@dataclass
class ImageData:
    """The data folder (``dataset``), its splits, the base's source task (``source``, may be empty) and the
    torchvision weights whose transform prepared the images (None: tunelens's own)."""

    dataset: Any
    train: Any
    test: Any
    source: dict[str, Any] = field(default_factory=dict)
    weights: Any = None


def load_images(args: argparse.Namespace, ck: Checkpoints) -> ImageData:
    """The images of ``--data``: read, checked against every tuned head, split. CompareError on bad data."""
    from tunelens.analysis.io.datafolder import DataFolderError, image_folder, split_train_test
    from tunelens.analysis.io.loading import is_torchvision_spec, torchvision_weights
    from tunelens.core.naming import head_name

    models, names = ck.models, ck.names
    transform, weights = None, None
    if is_torchvision_spec(args.base) and args.image_size is None and args.normalize is None:
        weights = torchvision_weights(args.arch, args.base)
        transform = weights.transforms()
    try:
        ds = image_folder(
            args.data,
            image_size=args.image_size or 224,
            normalize=args.normalize or "imagenet",
            limit=args.limit,
            masks_csv=args.masks,
            transform=transform,
            seed=args.seed,
        )
    except DataFolderError as e:
        raise CompareError(f"--data {args.data}: {e}" if "data folder" not in str(e) else str(e)) from None
    order = parse_classes(getattr(args, "classes", None))
    if order is not None:  # --classes: the head's output order
        check_class_names(order, list(ds.classes), args.data)
        ds.reorder_classes(order)
    n_cls = len(ds.classes)
    if n_cls < 2:
        raise CompareError(
            f"--data {args.data} has one class ({ds.classes[0]}); a classifier comparison needs at "
            "least two class sub-folders"
        )
    for name, spec in zip(names, args.tuned, strict=False):
        k = n_out(models[name])
        if k != n_cls:
            shown = ", ".join(ds.classes[:8]) + (" ..." if n_cls > 8 else "")
            raise CompareError(
                f"--data {args.data} has {n_cls} classes ({shown}) but --tuned {spec} has a "
                f"{k}-class head ({head_name(models[name])}): the data folder needs one sub-folder per "
                "class the tuned model was trained on (sorted order = output order)"
            )
    train, test = split_train_test(ds, args.test_fraction, args.seed)
    source = source_data(args, n_out(models["base"]), transform, image_folder, split_train_test, DataFolderError)
    if len(set(getattr(train, "targets", []))) < 2 or len(test) < 2:
        raise CompareError(
            f"--data {args.data}: too few images ({len(ds)}) to split into a training part with two "
            f"classes and a test part: raise --limit or add images"
        )
    return ImageData(ds, train, test, source, weights)


def source_data(args, n_base: int, transform, image_folder, split_train_test, DataFolderError) -> dict:
    """``--source-data``: the base's own task, split like --data; its classes must match the base head."""
    if getattr(args, "source_data", None) is None:
        return {}
    try:
        src = image_folder(
            args.source_data,
            image_size=args.image_size or 224,
            normalize=args.normalize or "imagenet",
            limit=args.limit,
            transform=transform,
            seed=args.seed,
        )
    except DataFolderError as e:
        raise CompareError(f"--source-data {args.source_data}: {e}") from None
    if len(src.classes) != n_base:
        raise CompareError(
            f"--source-data {args.source_data} has {len(src.classes)} classes but the base head has {n_base} "
            "outputs: give the ImageFolder of the task --base was trained on (one sub-folder per class, sorted "
            "order = output order), or leave --source-data out"
        )
    tr, te = split_train_test(src, args.test_fraction, args.seed)
    if len(set(tr.targets)) < 2 or len(te) < 2:
        raise CompareError(f"--source-data {args.source_data}: too few images to split into train and test")
    return {"source_train": tr, "source_test": te}
