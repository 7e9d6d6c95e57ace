"""In-sandbox reasoning-gym scorer: one answer per process (no sarmerge imports; runs in the venv's interpreter).

stdin: {"nonce", "task", "seed", "size", "index", "entry", "answer"} (JSON; the answer is data, never code on a command
line). The dataset (its scorer's config) is regenerated here from (task, seed, size); the entry is the host's own,
pickled by the host (trusted data: generators iterate sets, so a regenerated entry can differ under another hash
seed), or, if it would not pickle, regenerated and checked against the host's question. The result goes to the
report fd the host gave this
process: {"nonce", "score"} or {"nonce", "error": <exception type name>}. Several reasoning-gym scorers `eval` or
`sympy.parse_expr` the answer: that is why this runs in the sandbox and nowhere else. Code run that way shares this
process, so it could also forge the report; the host therefore hands such scorers only answers inside a data grammar
that cannot name anything but numbers and symbols (sarmerge.evaluate.rg_audit), and refuses tasks it has none for.
"""

import base64
import json
import os
import pickle
import sys


def stricter(task: str, answer: str | None, entry: dict, score: float) -> float:
    """sarmerge's corrections where an upstream scorer gives full marks to a wrong answer (hostile review, 2026-12-02;
    reasoning-gym 0.1.25): 0 where the answer does not solve the item."""
    if score < 1.0 or answer is None:
        return score
    if task == "intermediate_integration" and "Integral" in answer:
        return 0.0  # the scorer checks d/dx(answer) == integrand, which Integral(integrand, x) always passes
    if task == "puzzle24":
        import re

        import sympy

        # the scorer checks for four in-range numbers and int(value) == 24: not that they are the puzzle's
        # numbers (1*2*3*4 won every item), nor that the value is 24 and not 24.8 truncated
        used = sorted(int(n) for n in re.findall(r"[0-9]+", answer))
        if used != sorted(entry["metadata"]["numbers"]) or sympy.parse_expr(answer) != 24:
            return 0.0
    return score


def main() -> None:
    report = os.fdopen(int(os.environ.pop("SARMERGE_REPORT_FD")), "w")
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    out = {"nonce": job["nonce"]}
    try:
        if job["answer"] is not None and type(job["answer"]) is not str:
            raise TypeError("the answer must be text")
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(job["task"], seed=job["seed"], size=job["size"])
        if job.get("entry_pickle"):
            entry = pickle.loads(base64.b64decode(job["entry_pickle"]))  # written by the host, before any answer
        else:
            entry = dataset[job["index"]]
            if entry["question"] != job["question"]:
                raise LookupError("regenerated entry differs from the one the model saw")
        score = dataset.score_answer(job["answer"], entry)
        out["score"] = stricter(job["task"], job["answer"], entry, float(score))
    except BaseException as e:  # a scorer crash on garbage output is a wrong answer
        out["error"] = type(e).__name__
    report.write(json.dumps(out) + "\n")
    report.flush()
    report.close()


if __name__ == "__main__":
    main()
