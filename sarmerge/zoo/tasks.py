"""Verifiable tasks for the model zoo: seeded generators with disjoint train/val/test splits and exact-match rewards.

A problem is `Problem(id, prompt, answer)`, where `prompt` is the *user message*; callers build the model input with the
tokenizer's chat template (`chat_prompt`), so training, evaluation and Fisher calibration share one prompt construction.

Splits are disjoint by construction, whatever the seeds: every problem of a task's space belongs to exactly one split,
decided by a hash of its prompt (10 % test, 10 % val, 80 % train), and `generate(n, seed, split)` draws only from its
own split. Two calls with the same seed and split return the same list.

Tasks:
- `math`: sums of 2–4 single digits (`3+5+2` → `10`), compact prompt for the tiny char-level family.
- `code`: the output of a one-line Python string expression (reverse, upper, repeat, index, slice, concatenation) over
  short lowercase strings; the answer is what CPython prints, checked against `eval` in the tests.
- `math_nl`, `code_nl`: problems of the same kind (math: `a plus/minus b`, operands 0..50) asked in natural language
  for instruction-tuned LLMs (SmolLM2); the scorer extracts the final answer from free text.
- `code_mcq_nl`: the `code` expressions as a four-option multiple choice (the answer, the typical slip and two other
  near misses, in seeded random order); the reward is 1 when the first standalone option letter of the completion is
  the right one (a hedge listing several letters counts as its first). SmolLM2-135M-Instruct solves ~4 % of the
  free-form `code_nl` problems (measured, 300 test problems) but does pick options, so sampled completions disagree
  within a GRPO group; but it sits at chance (25 %) and 20 GRPO steps did not move it.
- `code_int_nl`: what `print(...)` shows for a one-line Python integer expression (floor division, modulo, operator
  precedence, `len` of a list, `max`), the final integer of the reply scored. SmolLM2-135M-Instruct gets ~16 % right
  (it knows `max` and `%` partly, precedence not at all), but its reward is too rare for 20 GRPO steps to learn from
  (measured: mean reward 0.07 per step, gains of -1 and -3.5 points).
- `code_minmax_nl`: what `print(max(...))` or `print(min(...))` shows for 2-5 integers 0..30, the final integer of the
  reply scored. The base gets 25 % of 200 test problems (max 30 %, min 20 %; it mostly names a wrong list element);
  20 GRPO steps at lr 2e-5 gained +1.0 (not significant) and +7.5 points (p = 0.003) for the two seeds; 40 steps
  (the family default) +19.5 and +12.5 (p < 1e-5).
- `code_minmax2_nl`: the same for two distinct integers 0..50. The base gets 51 %, so about half of each GRPO group
  disagrees; one 20-step trial at lr 2e-5 gained +11 points (p = 6e-5, 200 test problems), but the two seeds of
  a `zoo smollm2-grpo` family gained only +2.5 and +2.0 (not significant): at 20 steps the gain depends on the seed.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sarmerge.errors import SarmergeError

SPLITS = ("train", "val", "test")
# share of each task's problem space per split, by prompt hash (percent); disjoint and exhaustive
_SPLIT_BOUNDS = {"test": (0, 10), "val": (10, 20), "train": (20, 100)}


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the user message; apply the chat template with `chat_prompt`
    answer: str
    # the answer of a plausible mistake (e.g. a dropped carry): imperfect SFT demonstrations use it, never the scorer
    slip: str = field(default="", compare=False, repr=False)

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer}


def split_of(task: str, prompt: str) -> str:
    """The split a problem belongs to, a pure function of (task, prompt)."""
    bucket = int.from_bytes(hashlib.sha256(f"{task}\0{prompt}".encode()).digest()[:4], "big") % 100
    return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the answer."""
    return float(completion.strip() == answer)


_NUMBER = re.compile(r"-?\d+")


def last_integer_match(completion: str, answer: str) -> float:
    """1.0 when the last integer in free text equals the answer (e.g. "23 + 34 = 57." → 57)."""
    numbers = _NUMBER.findall(completion.replace(",", ""))
    return float(bool(numbers) and numbers[-1] == answer)


_EVALUATES_TO = re.compile(r"evaluates?\s+to\s*:?\s*(\S+)", re.IGNORECASE)


def _unquote(text: str) -> str:
    return text.strip().strip("`").strip().rstrip(".,;:").strip().strip("`'\"")


def string_output_match(completion: str, answer: str) -> float:
    """1.0 when the stated output equals the answer: the value after "evaluates to" when the model says so (quotes,
    backticks and trailing punctuation removed), else the first non-empty line (an "Output:" prefix removed)."""
    stated = _EVALUATES_TO.search(completion)
    if stated:
        return float(_unquote(stated.group(1)) == answer)
    for line in completion.splitlines():
        text = _unquote(line)
        if text.lower().startswith("output:"):
            text = _unquote(text[len("output:"):])
        if text:
            return float(text == answer)
    return 0.0


@dataclass(frozen=True)
class Task:
    """A verifiable task: `sample(rng) -> (prompt, answer, slip)` spans the problem space; `score` is the reward."""

    name: str
    domain: str
    description: str
    sample: Callable[[random.Random], tuple[str, str, str]]
    scorer: Callable[[str, str], float]
    max_answer_chars: int
    max_new_tokens: int | None = None  # generation budget; None → max_answer_chars + 2 (char-level, answer + eos)

    def generate(self, n: int, seed: int = 0, split: str = "test") -> list[Problem]:
        """`n` distinct problems of `split`, the same list for the same (n, seed, split)."""
        if split not in SPLITS:
            raise SarmergeError(f"task {self.name}: split {split!r} is not one of {', '.join(SPLITS)}")
        if n < 0:
            raise SarmergeError(f"task {self.name}: n={n} must be >= 0")
        rng = random.Random(f"{self.name}:{seed}:{split}")
        seen: set[str] = set()
        out: list[Problem] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise SarmergeError(f"task {self.name}: split {split!r} has fewer than n={n} distinct problems "
                                    f"(found {len(out)})")
            prompt, answer, slip = self.sample(rng)
            if prompt in seen or split_of(self.name, prompt) != split:
                continue
            seen.add(prompt)
            out.append(self._problem(prompt, answer, slip))
        return out

    def stream(self, seed: int = 0, split: str = "train") -> Iterator[Problem]:
        """An endless seeded stream of problems of `split`, repeats allowed (for training on small problem spaces)."""
        rng = random.Random(f"{self.name}:{seed}:{split}:stream")
        while True:
            prompt, answer, slip = self.sample(rng)
            if split_of(self.name, prompt) == split:
                yield self._problem(prompt, answer, slip)

    def _problem(self, prompt: str, answer: str, slip: str) -> Problem:
        pid = hashlib.sha256(f"{self.name}\0{prompt}".encode()).hexdigest()[:12]
        return Problem(id=f"{self.name}-{pid}", prompt=prompt, answer=answer, slip=slip)

    def score(self, completion: str, answer: str) -> float:
        """Reward in [0, 1] of one completion (the text generated after the prompt) against the reference answer."""
        return self.scorer(completion, answer)


def _digit_sum(rng: random.Random) -> tuple[str, str, str]:
    # sums of 2–4 single digits: learnable by a ~1M-parameter model within a few hundred SFT steps, unlike
    # two-digit operands with carries (measured: < 10 % after 400 steps). Slip: the last operand is forgotten.
    digits = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    return "+".join(map(str, digits)), str(sum(digits)), str(sum(digits[:-1]))


def _math_nl(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}? Reply with only the final number.", str(a + b), str(a + b + 1)
    return f"What is {a} minus {b}? Reply with only the final number.", str(a - b), str(b - a)


_LETTERS = "abcdefgh"


def _word(rng: random.Random, lo: int = 2, hi: int = 5) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def string_expression(rng: random.Random) -> tuple[str, str, str]:
    """A one-line Python string expression, what it evaluates to (the tests check it with eval), and a slip.

    The slip is the answer of a typical misreading (string not reversed, slice off by one, ...); never the answer.
    """
    s = _word(rng)
    kind = rng.randrange(6)
    if kind == 0:
        if s == s[::-1]:  # a palindrome's slip would be right
            s += "b" if s[0] == "a" else "a"
        return f"'{s}'[::-1]", s[::-1], s
    if kind == 1:
        return f"'{s}'.upper()", s.upper(), s
    if kind == 2:
        k = rng.randint(2, 3)
        s = s[:3]
        return f"'{s}'*{k}", s * k, s * (k + 1)
    if kind == 3:
        i = rng.randrange(len(s) - 1)
        return f"'{s}'[{i}]", s[i], s[i:]  # index read as a slice
    if kind == 4:
        i = rng.randrange(1, len(s))
        return f"'{s}'[{i}:]", s[i:], s[i - 1:]  # off by one
    t = _word(rng, 1, 3)
    return f"'{s}'+'{t}'", s + t, s  # the concatenation forgotten


def _code_nl(rng: random.Random) -> tuple[str, str, str]:
    expr, answer, slip = string_expression(rng)
    prompt = f"What does the Python expression {expr} evaluate to? Reply with only the resulting string, no quotes."
    return prompt, answer, slip


def _code_int_nl(rng: random.Random) -> tuple[str, str, str]:
    # Python integer semantics SmolLM2-135M-Instruct gets partly right (measured: ~16 % greedy, 38 % on max(), none
    # on a negative precedence result, so that kind is left out): floor division, modulo, precedence, len, max
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9)
    kind = rng.randrange(5)
    if kind == 0:
        expr, value, slip = f"{a} // {b}", a // b, a / b
    elif kind == 1:
        expr, value, slip = f"{a} % {b}", a % b, a // b
    elif kind == 2:
        expr, value, slip = f"{a} + {b} * {c}", a + b * c, (a + b) * c  # precedence ignored
    elif kind == 3:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 6))]
        expr, value, slip = f"len({xs})", len(xs), len(xs) - 1
    else:
        xs = [rng.randint(0, 30) for _ in range(rng.randint(2, 5))]
        expr, value, slip = f"max({', '.join(map(str, xs))})", max(xs), xs[-1]
    prompt = f"What does this Python code print?\nprint({expr})\nReply with only the printed value."
    wrong = int(slip) if int(slip) != value else value + 1  # a slip is never the answer
    return prompt, str(value), str(wrong)


def _code_minmax_nl(rng: random.Random) -> tuple[str, str, str]:
    xs = [rng.randint(0, 30) for _ in range(rng.randint(2, 5))]
    if len(set(xs)) == 1:  # max == min: the slip would be right
        xs[-1] = (xs[-1] + 1) % 31
    fn, value, slip = (("max", max(xs), min(xs)) if rng.random() < 0.5 else ("min", min(xs), max(xs)))
    prompt = (f"What does this Python code print?\nprint({fn}({', '.join(map(str, xs))}))\n"
              "Reply with only the printed value.")
    return prompt, str(value), str(slip)  # slip: max and min confused


def _code_minmax2_nl(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(51), 2)
    fn, value, slip = (("max", max(a, b), min(a, b)) if rng.random() < 0.5 else ("min", min(a, b), max(a, b)))
    prompt = f"What does this Python code print?\nprint({fn}({a}, {b}))\nReply with only the printed value."
    return prompt, str(value), str(slip)


OPTION_LETTERS = "ABCD"
_OPTION = re.compile(r"\b([A-D])\b")


def option_letter_match(completion: str, answer: str) -> float:
    """1.0 when the first standalone option letter (A–D) in the completion is the answer's letter."""
    found = _OPTION.search(completion)
    return float(bool(found) and found.group(1) == answer)


def _near_misses(rng: random.Random, answer: str, slip: str) -> list[str]:
    # plausible wrong values of a string expression: case, order and off-by-one mistakes, then random strings
    return [answer[::-1], answer.upper(), answer.lower(), answer.capitalize(), answer[1:], answer[:-1],
            answer + answer[-1:], slip[::-1], "".join(rng.choice(_LETTERS) for _ in range(max(1, len(answer))))]


def _code_mcq_nl(rng: random.Random) -> tuple[str, str, str]:
    expr, answer, slip = string_expression(rng)
    options = {answer, slip}
    while len(options) < len(OPTION_LETTERS):
        candidate = rng.choice(_near_misses(rng, answer, slip))
        if candidate:
            options.add(candidate)
    ordered = sorted(options)
    rng.shuffle(ordered)
    body = "\n".join(f"{letter}) {text}" for letter, text in zip(OPTION_LETTERS, ordered, strict=True))
    prompt = (f"What does the Python expression {expr} evaluate to?\n{body}\n"
              "Reply with only the letter of the correct option.")
    letter = OPTION_LETTERS[ordered.index(answer)]
    return prompt, letter, OPTION_LETTERS[ordered.index(slip)]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("math", "math", "sum of 2-4 single digits, e.g. 3+5+2, compact prompt", _digit_sum, exact_match, 2),
        Task("code", "code", "output of a one-line Python string expression, compact prompt", string_expression,
             exact_match, 8),
        Task("math_nl", "math", "a plus/minus b, operands 0..50, natural-language prompt", _math_nl,
             last_integer_match, 4, max_new_tokens=24),
        Task("code_nl", "code", "output of a one-line Python string expression, natural-language prompt", _code_nl,
             string_output_match, 8, max_new_tokens=24),
        Task("code_int_nl", "code", "what print() shows for a one-line Python integer expression (//, %, operator "
             "precedence, len, max), natural-language prompt", _code_int_nl, last_integer_match, 4,
             max_new_tokens=16),
        Task("code_minmax_nl", "code", "what print() shows for max(...) or min(...) of 2-5 integers 0..30, "
             "natural-language prompt", _code_minmax_nl, last_integer_match, 4, max_new_tokens=16),
        Task("code_minmax2_nl", "code", "what print() shows for max(a, b) or min(a, b), distinct integers 0..50, "
             "natural-language prompt", _code_minmax2_nl, last_integer_match, 4, max_new_tokens=16),
        Task("code_mcq_nl", "code", "output of a one-line Python string expression, 4-option multiple choice, "
             "natural-language prompt", _code_mcq_nl, option_letter_match, 1, max_new_tokens=8),
    ]
}


def get_task(name: str) -> Task:
    """The task called `name` (see `TASKS`); unknown → SarmergeError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise SarmergeError(f"unknown zoo task {name!r}; known: {', '.join(TASKS)}") from None


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The model input for a user prompt: the tokenizer's chat template with the generation prompt appended."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt
