"""Answer extraction and checking: math answers (verified with math-verify) and code blocks.

`extract_answer` finds the model's final answer in this order: the last `\\boxed{...}` (or `\\fbox{}`), a GSM8K-style
`#### N`, a final-answer phrase ("the answer is ...", "Final Answer: ..."), and last the last number in the text.
`check_answer` compares it with the reference through math-verify (symbolic and numeric equivalence), falling back to
a normalised string comparison for non-mathematical answers such as "Yes"/"No".
"""

from __future__ import annotations

import logging
import re
import textwrap
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
# possessive \s*+: with plain \s* the two runs split the same whitespace every way before failing, quadratic on a
# "the answer is" followed by a long blank run (13 s for 20 000 newlines on the host, outside any sandbox limit)
_PHRASE = re.compile(
    r"(?:final answer|the answer is|answer is|answer\s*+:)\s*+(?:is\s*+)?:?\s*+(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# Where a completion-style (no chat template) function body ends: the next top-level statement.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#", "\n```")


@dataclass(frozen=True)
class Extracted:
    answer: str | None
    method: str  # boxed | hashes | phrase | last_number | none


_BRACE = re.compile(r"[{}]")


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` whose brace closes. One pass matches every brace (scanning forward
    from each `\\boxed{` instead is quadratic in a completion of many unclosed ones)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    closes: dict[int, int] = {}
    opened: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            opened.append(m.start())
        elif opened:
            closes[opened.pop()] = m.start()
    for start in reversed(starts):
        end = closes.get(start - 1)
        if end is not None:
            return text[start:end]
    return None


def _clean(answer: str) -> str:
    previous = None
    while previous != answer:  # peel "$42$." / "\\(x\\)" / "**7**" down to the answer
        previous = answer
        answer = answer.strip().rstrip(".").strip()
        answer = re.sub(r"^\$+|\$+$", "", answer)  # inline math delimiters
        answer = re.sub(r"^\\\(|\\\)$", "", answer)
        answer = re.sub(r"^\*\*|\*\*$", "", answer)  # markdown bold
    return answer


def extract_answer(text: str) -> Extracted:
    """The model's final answer in `text` (see module doc for the order of rules)."""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return Extracted(_clean(boxed), "boxed")
    hashes = _HASHES.findall(text)
    if hashes:
        return Extracted(_clean(hashes[-1]).replace(",", ""), "hashes")
    phrases = _PHRASE.findall(text)
    if phrases:
        phrase = _clean(phrases[-1].split("\n")[0])
        if phrase:
            return Extracted(phrase, "phrase")
    numbers = _NUMBER.findall(text)
    if numbers:
        return Extracted(numbers[-1].replace(",", ""), "last_number")
    return Extracted(None, "none")


def gsm8k_gold(solution: str) -> str:
    """The reference answer of a GSM8K solution: what follows its `#### `."""
    found = _HASHES.findall(solution)
    if not found:
        raise ValueError("no '#### <answer>' line")
    return found[-1].strip().replace(",", "")


def _normalise(s: str) -> str:
    s = s.lower().strip().rstrip(".")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"[\s$]|\\[,;!: ]", "", s)
    return s


def _as_number(s: str) -> str:
    # a trailing percent sign is presentation ("10\\%" and "10" are the same answer, as graders usually rule)
    s = re.sub(r"\s*\\?%$", "", s.strip())
    # plain numbers lose thousands separators ("1,234" is one number, not a tuple, in GSM8K-style answers)
    return s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s


def check_answer(gold: str, predicted: str | None) -> bool:
    """True when `predicted` is mathematically equivalent to `gold` (math-verify) or equal after normalisation."""
    if predicted is None or not predicted.strip():
        return False
    if _normalise(gold) == _normalise(predicted):
        return True
    from math_verify import LatexExtractionConfig, parse, verify

    # LaTeX extraction only: its parser (latex2sympy) builds expressions without eval. The default config also
    # tries ExprExtractionConfig, which hands text to sympy.parse_expr (an eval); model text never goes there.
    latex_only = [LatexExtractionConfig()]

    # math-verify times out with SIGALRM, which only the main thread may use
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    try:
        g = parse("\\boxed{" + _as_number(gold) + "}", extraction_config=latex_only, parsing_timeout=timeout)
        p = parse("\\boxed{" + _as_number(predicted) + "}", extraction_config=latex_only, parsing_timeout=timeout)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=timeout))
    except Exception as e:  # math-verify raises assorted sympy errors on odd input: a wrong answer, not a crash
        log.debug("math-verify failed on gold=%r predicted=%r: %s", gold, predicted, e)
        return False


def extract_code(completion: str) -> str:
    """The code a completion proposes: its fenced block that defines something (else its first block, else all)."""
    blocks = _FENCE.findall(completion)
    if blocks:
        for block in blocks:
            if re.search(r"^\s*(def|class|import|from)\s", block, re.MULTILINE):
                return block
        return blocks[0]
    return completion


def humaneval_candidate(prompt: str, completion: str, entry_point: str) -> tuple[str, str]:
    """(candidate program, extracted code) of one HumanEval sample: the prompt's imports and helpers plus the model's
    function. The official tests never join it: the trusted harness runs them in another process (harness.py)."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # a whole function: keep the prompt before it for its imports and helpers; the later def wins
        body = textwrap.dedent(code)
        program = prompt + "\n    pass\n\n" + body
    else:
        # a body continuation (completion-style prompt): stop at the next top-level statement
        body = code
        for stop in CODE_STOPS:
            cut = body.find(stop)
            if cut != -1:
                body = body[:cut]
        program = prompt + body
    return program + "\n", body


def mbpp_candidate(completion: str) -> tuple[str, str]:
    """(candidate program, extracted code) of one MBPP sample: the model's code alone (the setup and asserts are
    trusted and run in the harness process)."""
    code = textwrap.dedent(extract_code(completion))
    return code + "\n", code
