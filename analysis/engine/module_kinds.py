"""The kind of module a transformer tensor belongs to, from its name: attention q/k/v/o, MLP gate/up/down, norms,
embeddings, lm_head (Llama, Mistral, Qwen, GPT-2, BERT and similar naming); other names fall back to
:func:`tunelens.core.text.submodule_kind` (BERT-family kinds, ``other``)."""

from __future__ import annotations

import re

from tunelens.core.text import submodule_kind

__all__ = ["module_kind"]

_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(lm_head|output_layer|embed_out)\.", "lm_head"),
    (r"(norm|ln_\w+|ln\d*|layernorm|LayerNorm)\.(weight|bias)$", "norm"),
    (
        r"(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embeddings?)\.",
        "embeddings",
    ),
    (r"(qkv_proj|c_attn|query_key_value|Wqkv)\.", "qkv"),
    (r"(q_proj|self\.query|\.wq|\.q)\.", "q"),
    (r"(k_proj|self\.key|\.wk|\.k)\.", "k"),
    (r"(v_proj|self\.value|\.wv|\.v)\.", "v"),
    (r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|\.wo|dense_out)\.", "o"),
    (r"(gate_proj|w1|gate_up_proj)\.", "gate"),
    (r"(up_proj|w3|intermediate\.dense|mlp\.c_fc|fc1|dense_h_to_4h)\.", "up"),
    (r"(down_proj|w2|(?<!attention\.)output\.dense|mlp\.c_proj|fc2|dense_4h_to_h)\.", "down"),
)
_COMPILED = tuple((re.compile(p), k) for p, k in _RULES)


def module_kind(name: str) -> str:
    """``q``, ``k``, ``v``, ``o``, ``qkv``, ``gate``, ``up``, ``down``, ``norm``, ``embeddings``, ``lm_head``,
    else :func:`tunelens.core.text.submodule_kind` of ``name`` (e.g. ``head``, ``other``)."""
    for pat, kind in _COMPILED:
        if pat.search(name):
            return kind
    return submodule_kind(name)
