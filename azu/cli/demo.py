"""Tiny random models of every supported family, saved as normal Hugging Face model folders.

Nothing can be downloaded on a test machine, so tests and the local network (``azu up``) build their
models here from ``transformers``' own config classes. Weights are re-drawn with a larger spread than
the default initializer so the logits are not flat and greedy decoding has clear winners.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB_SIZE = 320  # 256 bytes + specials of the demo tokenizer, padded
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_COMMON_LLAMA: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

# family -> (config class name, kwargs). Sliding windows are small (16) so a 40-token prompt crosses them.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_COMMON_LLAMA)),
    "mistral": ("MistralConfig", dict(_COMMON_LLAMA, sliding_window=16)),
    "mixtral": (
        "MixtralConfig",
        dict(_COMMON_LLAMA, num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(_COMMON_LLAMA, use_sliding_window=True, sliding_window=16, max_window_layers=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _COMMON_LLAMA,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=2,
            mlp_only_layers=[],
        ),
    ),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4, n_positions=512)),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            window_size=16,
            max_position_embeddings=512,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=512),
    ),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=4,
            ffn_dim=128,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=512,
        ),
    ),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB_SIZE, hidden_size=64, n_layer=4, n_head=4)),
    "falcon": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            alibi=False,
            max_position_embeddings=512,
        ),
    ),
    "falcon_alibi": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            alibi=True,
            multi_query=True,
            new_decoder_architecture=False,
            parallel_attn=False,
            bias=True,
        ),
    ),
    "mpt": (
        "MptConfig",
        dict(vocab_size=VOCAB_SIZE, d_model=64, n_layers=4, n_heads=4, max_seq_len=512, expansion_ratio=2),
    ),
    "phi": (
        "PhiConfig",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
            partial_rotary_factor=0.5,
        ),
    ),
    "phi3": ("Phi3Config", dict(_COMMON_LLAMA, pad_token_id=0)),
    "gemma": ("GemmaConfig", dict(_COMMON_LLAMA, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        dict(
            _COMMON_LLAMA,
            head_dim=16,
            sliding_window=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=16,
        ),
    ),
    "starcoder2": (
        "Starcoder2Config",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=16,
            max_position_embeddings=512,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            _COMMON_LLAMA,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
    ),
    # Not in azu's table: exercises the generic XForCausalLM -> XDecoderLayer fallback.
    "stablelm": ("StableLmConfig", dict(_COMMON_LLAMA)),
}

# The demo model `azu up` and `azu generate --demo` serve: Llama-shaped, big enough to be a pipeline.
DEMO_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def build_config(family: str, **overrides: Any):
    import transformers

    try:
        class_name, kwargs = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown demo family {family!r}; known: {', '.join(sorted(FAMILIES))}") from None
    config = getattr(transformers, class_name)(**{**kwargs, **overrides})
    # Token ids of the demo tokenizer's specials (pad 0, bos 1, eos 2).
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return config


def perturb_(model, *, seed: int, scale: float = 0.2) -> None:
    """Re-draw every weight so the logits are far from flat (default inits give near-ties). The draws are
    made on the model's device (a model built on a GPU: seconds for billions of weights, not minutes)."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=device)
            if param.ndim == 1:  # norms near 1, biases near 0
                is_norm = "norm" in name or "ln" in name
                param.copy_(1.0 + 0.1 * noise if is_norm else 0.02 * noise)
            elif any(k in name for k in _EMBEDDING_NAMES):
                param.copy_(noise)
            else:
                param.copy_(noise * scale * (64 / param.shape[-1]) ** 0.5)


_EMBEDDING_NAMES = ("wte", "wpe", "embed_tokens", "word_embeddings", "embed_positions", "embed_in")


def build_model(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    dtype: str | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> Path:
    """Build a tiny random ``family`` model and ``save_pretrained`` it (safetensors) into ``out_dir``.

    ``max_shard_size`` (e.g. ``"50KB"``) saves a sharded checkpoint with ``model.safetensors.index.json``.
    ``dtype`` (default float32) is the dtype saved; ``device`` where the weights are drawn (a big model on a
    GPU: the benches' 7B shape).
    """
    import torch
    import transformers

    from azu.engine.stage import parse_dtype

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config(family, **overrides)
    as_asked = {"dtype": parse_dtype(dtype)} if dtype else {}  # else transformers' default, as before
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, **as_asked)
    model.eval()
    perturb_(model, seed=seed)
    kwargs: dict[str, Any] = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        save_tokenizer(out)
    return out


def build_demo_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    return build_model("llama", out_dir, seed=seed, **DEMO_CONFIG)


def save_tokenizer(out_dir: str | Path) -> None:
    """A byte-level tokenizer (every UTF-8 byte is a token) with chat specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    # Keep only the files a tokenizer needs; the chat template travels inside tokenizer_config.json.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def add_arguments(parser) -> None:
    parser.add_argument("out", help="folder to write the model into")
    parser.add_argument("--family", default="demo", help=f"demo or one of: {', '.join(FAMILIES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--max-shard-size", default=None, help='other families: split the checkpoint '
                        'into files of at most this size, e.g. "200KB" (default: one file)')

def run(args) -> int:
    if args.family == "demo":
        path = build_demo_model(args.out, seed=args.seed)
    else:
        path = build_model(args.family, args.out, seed=args.seed, max_shard_size=args.max_shard_size)
    print(path)
    return 0
