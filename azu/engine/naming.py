"""Which part of the model a checkpoint tensor belongs to, from its name alone.

Used by the sharder (to split a checkpoint into embeddings / layer_NNNNN / head files) and by the
stage loader. Works on the on-disk names of every supported family: the decoder stack is a list
named ``layers``, ``h`` or ``blocks``; the final norm (and OPT's ``project_out``) and ``lm_head``
belong to the head; everything else outside the stack belongs to the embeddings.
"""

from __future__ import annotations

import re
from typing import Literal

# The first ``<stack>.<index>.`` in the name. Non-greedy so that expert indices
# (``...layers.3.mlp.experts.7.w1``) never win over the layer index.
_LAYER_RE = re.compile(r"^(?:.*?\.)??(?:layers|h|blocks)\.(\d+)\.")
# Modules after the decoder stack, by their attribute name inside the base model.
_HEAD_MODULES = frozenset(
    {"norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "project_out"}
)

Part = int | Literal["embeddings", "head"]


def classify_tensor(name: str) -> Part:
    """Return the global layer index of ``name``, or ``"embeddings"`` / ``"head"``."""
    match = _LAYER_RE.match(name)
    if match:
        return int(match.group(1))
    if name.startswith("lm_head.") or name == "lm_head":
        return "head"
    parts = name.split(".")
    # "<base>.<module>.weight" (model.norm.weight, transformer.ln_f.bias, model.decoder.project_out.weight)
    if any(p in _HEAD_MODULES for p in parts[:-1]):
        return "head"
    return "embeddings"
