"""The one place the library talks to Hugging Face checkpoints as models: tokenizer and model loading, prompt
encoding with the chat template, and the end-of-response rule.

Fisher estimation (`sarmerge fisher`), the evaluation backends and token analysis all use these functions, so they
read the same prompt ids and end the same model's response at the same tokens.

End of response: the ids in generation_config.json's `eos_token_id` (an int or a list: a chat model's end-of-turn
token usually lives only there), then the tokenizer's EOS, then config.json's `eos_token_id`, deduplicated in that
order. The first one is the id appended to reference responses; any of them stops generation.

Tokenizers: transformers 5 picks the tokenizer class from the model type, so `AutoTokenizer` would reload a
character-level `tokenizer.json` beside a Qwen2 config as `Qwen2Tokenizer`, which drops whitespace (SPEC §12).
`load_tokenizer` loads tokenizers marked `sarmerge_char_level` with `PreTrainedTokenizerFast` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sarmerge.errors import SarmergeError
from sarmerge.layout import CONFIG_FILE, GENERATION_CONFIG_FILE, read_json_file

CHAR_LEVEL_KEY = "sarmerge_char_level"  # in tokenizer_config.json: load with PreTrainedTokenizerFast, not Auto


def load_tokenizer(path: str | Path) -> Any:
    """Load a checkpoint's tokenizer (left padding; pad = EOS when it has no pad token); raw errors propagate."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    cfg = read_json_file(path / "tokenizer_config.json")
    if cfg.get(CHAR_LEVEL_KEY):
        tok = PreTrainedTokenizerFast.from_pretrained(path)
        tok.padding_side = "left"
        return tok
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def checkpoint_tokenizer(path: str | Path) -> Any:
    """`load_tokenizer`, with any failure as one SarmergeError naming the checkpoint."""
    try:
        return load_tokenizer(path)
    except SarmergeError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a broken tokenizer
        raise SarmergeError(f"{path}: cannot load the tokenizer: {e}") from e


def load_causal_lm(path: str | Path, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                   progress: bool = True) -> torch.nn.Module:
    """AutoModelForCausalLM in `dtype` on `device`, in eval mode; failures are one SarmergeError naming the path."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # a bad config or weights surfaces as OSError, ValueError, KeyError, RuntimeError, ...
        raise SarmergeError(f"{path}: cannot load as a causal LM: {e}") from e
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def render_prompt(tokenizer: Any, prompt: str, *, chat_template: bool = True,
                  completion_prompt: str | None = None) -> tuple[str, list[int]]:
    """What the model reads for one user prompt, as text and ids.

    With a chat template (and `chat_template`): the prompt as a single user turn plus the generation prompt, tokenized
    without extra special tokens (the template holds them all). Otherwise the bare text (`completion_prompt` when
    given) with the tokenizer's own special tokens.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = completion_prompt if completion_prompt is not None else prompt
    return text, list(tokenizer(text)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str, *, chat_template: bool = True) -> list[int]:
    """The ids of `render_prompt`."""
    return render_prompt(tokenizer, prompt, chat_template=chat_template)[1]


def end_of_response_ids(model_dir: str | Path | None, tokenizer: Any) -> list[int]:
    """The ids that end a response, in rule order (see the module doc); `model_dir` None = the tokenizer alone."""
    gen: dict = {}
    config: dict = {}
    if model_dir is not None and Path(model_dir).is_dir():
        gen = read_json_file(Path(model_dir) / GENERATION_CONFIG_FILE)
        config = read_json_file(Path(model_dir) / CONFIG_FILE)
    ids: list[int] = []
    for source in (gen.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None), config.get("eos_token_id")):
        for token in source if isinstance(source, list | tuple) else [source]:
            if isinstance(token, int) and not isinstance(token, bool) and token not in ids:
                ids.append(token)
    return ids
