"""Calibration data: the JSONL reader, the shipped sets, and tokenized examples laid out for a run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from sarmerge.hf import encode_prompt
from sarmerge.options import Mode

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED_DATA = {"math": DATA_DIR / "calib_math.jsonl", "code": DATA_DIR / "calib_code.jsonl"}


@dataclass(frozen=True)
class CalibrationRecord:
    """One line of a calibration JSONL file."""

    line: int
    prompt: str
    response: str | None


def resolve_data(data: str | os.PathLike[str]) -> Path:
    """A path, or `math` / `code` for the shipped calibration sets (used when no such file exists)."""
    path = Path(data)
    if not path.exists() and str(data) in SHIPPED_DATA:
        return SHIPPED_DATA[str(data)]
    return path


def read_calibration(path: Path, mode: Mode) -> list[CalibrationRecord]:
    """Parse and validate a calibration JSONL; every error names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SarmergeError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SarmergeError(f"{path}: cannot read calibration file: {e}") from e
    records = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SarmergeError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise SarmergeError(f"{where}: expected a JSON object with a 'prompt' field, got {type(row).__name__}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            got = "missing" if prompt is None else f"got {prompt!r}"
            raise SarmergeError(f"{where}: field 'prompt' must be a non-empty string ({got})")
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise SarmergeError(f"{where}: field 'response' must be a string, got {type(response).__name__}")
        if mode == "empirical" and response is None:
            raise SarmergeError(f"{where}: field 'response' is missing; --mode empirical needs a reference response")
        records.append(CalibrationRecord(number, prompt, response))
    if not records:
        raise SarmergeError(f"{path}: no examples (the file is empty)")
    return records


@dataclass
class Example:
    """A tokenized calibration example; `index` is its position in the run (it seeds its sampled response)."""

    index: int
    line: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_limit: int = 0  # sampled mode: most tokens to draw
    truncated: bool = False  # empirical mode: the reference was cut to fit the context


def context_length(config: dict[str, Any]) -> int | None:
    """The model's maximum sequence length, from its config.json (the text part of a multimodal one)."""
    text_config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = text_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_examples(records: Sequence[CalibrationRecord], tokenizer: Any, *, mode: Mode, n_examples: int | None,
                   context: int | None, max_new_tokens: int, eos_id: int | None, source: str) -> list[Example]:
    """Tokenize and check every record, then lay out the run: the first N in file order (sampled mode cycles the
    prompts when N exceeds the file, each repetition with its own sample)."""
    n = len(records) if n_examples is None else n_examples
    if mode == "empirical" and n > len(records):
        raise SarmergeError(f"{source}: --examples {n} but the file has only {len(records)} examples "
                            "(empirical mode uses each reference response once)")
    encoded = []
    for r in records:
        ids = encode_prompt(tokenizer, r.prompt)
        if not ids:
            raise SarmergeError(f"{source}:{r.line}: prompt encodes to no tokens")
        if context is not None and len(ids) >= context:
            raise SarmergeError(f"{source}:{r.line}: prompt is {len(ids)} tokens, longer than the model's context "
                                f"of {context} tokens (it must leave room for at least one response token)")
        response = None
        if mode == "empirical":
            response = list(tokenizer(r.response, add_special_tokens=False)["input_ids"])
            if eos_id is not None:
                response.append(eos_id)  # the reference ends where the model should stop
            if not response:
                raise SarmergeError(f"{source}:{r.line}: response encodes to no tokens and the model has no EOS token")
        encoded.append((r.line, ids, response))
    examples = []
    for i in range(n):
        line, ids, response = encoded[i % len(encoded)]
        room = context - len(ids) if context is not None else None
        if response is not None:
            cut = room is not None and len(response) > room
            examples.append(Example(i, line, ids, response[:room] if cut else response, truncated=cut))
        else:
            examples.append(Example(i, line, ids, response_limit=min(max_new_tokens, room or max_new_tokens)))
    return examples
