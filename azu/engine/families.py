"""Per-family differences, in one table.

azu runs every family through ``transformers``' own base-model forward with the layer list cut down
to the stage's layers (each keeps its global index). What differs between families is only which
modules of the base model belong to the first stage (embeddings, learned positions, OPT's
``project_in``, BLOOM's embedding norm) and which to the last (final norm, OPT's ``project_out``):
on any other stage those are neutralised so the hidden state passes through them unchanged.

A model type missing from the table gets the generic fallback: any ``XForCausalLM`` whose base model
keeps its decoder layers in a ModuleList named ``layers``, ``h`` or ``blocks`` and its final norm
under one of the usual names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from azu.errors import UnsupportedArchitecture

# What to put in place of a module on a stage that does not own it.
#   "zero_positions": a module returning zeros shaped like the positions (learned position embeddings
#                     are added inside the base forward: adding exact zeros leaves the hidden unchanged)
#   "identity":       pass the hidden state through
#   "none":           set the attribute to None (the forward checks `if self.x is not None`)
Neutral = Literal["zero_positions", "identity", "none"]

LAYER_LISTS = ("layers", "h", "blocks")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


@dataclass(frozen=True)
class Family:
    name: str
    layers: str = "layers"
    # Path from the CausalLM's base model to the module that owns the layer list (OPT: "decoder").
    inner: str = ""
    first_stage: dict[str, Neutral] = field(default_factory=dict)
    last_stage: dict[str, Neutral] = field(default_factory=lambda: {"norm": "identity"})
    # Decode steps of several jobs can run as one batch: rotary positions passed explicitly, no ALiBi
    # or learned positions computed from the cache length inside the forward.
    batch_decode: bool = False


_LLAMA_LIKE = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "phi3",
    "gemma",
    "gemma2",
    "starcoder2",
    "deepseek_v2",
)

_TABLE: dict[str, Family] = {}


def register(model_type: str, family: Family) -> None:
    if model_type in _TABLE:
        raise ValueError(f"family {model_type!r} is registered twice")
    _TABLE[model_type] = family


for _t in _LLAMA_LIKE:
    register(_t, Family(_t, batch_decode=True))
register("phi", Family("phi", last_stage={"final_layernorm": "identity"}, batch_decode=True))
register(
    "gpt2", Family("gpt2", layers="h", first_stage={"wpe": "zero_positions"}, last_stage={"ln_f": "identity"})
)
register(
    "gpt_neo",
    Family("gpt_neo", layers="h", first_stage={"wpe": "zero_positions"}, last_stage={"ln_f": "identity"}),
)
register("gptj", Family("gptj", layers="h", last_stage={"ln_f": "identity"}))
register(
    "opt",
    Family(
        "opt",
        inner="decoder",
        first_stage={"embed_positions": "zero_positions", "project_in": "none"},
        last_stage={"final_layer_norm": "identity", "project_out": "none"},
    ),
)
register(
    "bloom",
    Family(
        "bloom",
        layers="h",
        first_stage={"word_embeddings_layernorm": "identity"},
        last_stage={"ln_f": "identity"},
    ),
)
register("falcon", Family("falcon", layers="h", last_stage={"ln_f": "identity"}))
register("mpt", Family("mpt", layers="blocks", last_stage={"norm_f": "identity"}))

SUPPORTED = tuple(sorted(_TABLE))


def family_for(model_type: str, architecture: str, base_module=None) -> Family:
    """The table's entry, or the generic fallback inferred from the (meta) base model's attributes."""
    if model_type in _TABLE:
        return _TABLE[model_type]
    if not architecture.endswith("ForCausalLM") or base_module is None:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} (model_type {model_type!r}) is not supported: azu serves causal "
            f"LMs ({', '.join(SUPPORTED)}, or any XForCausalLM with the usual layer naming)"
        )
    import torch.nn as nn

    layers = next((n for n in LAYER_LISTS if isinstance(getattr(base_module, n, None), nn.ModuleList)), None)
    norm = next((n for n in FINAL_NORMS if isinstance(getattr(base_module, n, None), nn.Module)), None)
    if layers is None or norm is None:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} does not follow the XForCausalLM -> XDecoderLayer naming azu's "
            f"generic fallback needs (a ModuleList named one of {LAYER_LISTS} and a final norm named one of "
            f"{FINAL_NORMS})"
        )
    return Family(f"generic:{model_type}", layers=layers, last_stage={norm: "identity"})
