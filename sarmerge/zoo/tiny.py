"""A tiny Qwen2-style causal LM with a character-level tokenizer, saved in Hugging Face layout.

Its tokenizer is marked `sarmerge_char_level`, so `sarmerge.hf.load_tokenizer` (re-exported here) keeps whitespace.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from sarmerge.hf import CHAR_LEVEL_KEY, load_tokenizer  # noqa: F401 - re-exported (the general loader lives in hf)

SPECIAL = ["<pad>", "<bos>", "<eos>"]
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
    )
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 176,
    max_positions: int = 256,
) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_model(seed: int = 0, **config_kw: int) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Qwen2 and its char tokenizer (deterministic for a seed)."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(len(tok), **config_kw))
    return model, tok


def save_checkpoint(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """save_pretrained in HF layout (safetensors), marking char tokenizers so `load_tokenizer` keeps whitespace."""
    out = Path(out)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[CHAR_LEVEL_KEY] = isinstance(tok.backend_tokenizer.model, models.WordLevel)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return out
