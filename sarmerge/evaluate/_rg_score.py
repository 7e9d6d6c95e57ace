"""In-sandbox reasoning-gym scorer: one answer per process (no sarmerge imports; runs in the venv's interpreter).

stdin: {"nonce", "task", "seed", "size", "index", "answer"} (JSON; the answer is data, never code on a command line).
The entry is regenerated here from (task, seed, size, index); the result goes to the report fd the host gave this
process: {"nonce", "score"} or {"nonce", "error": <exception type name>}. Several reasoning-gym scorers `eval` or
`sympy.parse_expr` the answer: that is why this runs in the sandbox and nowhere else.
"""

import json
import os
import sys


def main() -> None:
    report = os.fdopen(int(os.environ.pop("SARMERGE_REPORT_FD")), "w")
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    out = {"nonce": job["nonce"]}
    try:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(job["task"], seed=job["seed"], size=job["size"])
        entry = dataset[job["index"]]
        score = dataset.score_answer(job["answer"], entry)
        out["score"] = float(score)
    except BaseException as e:  # a scorer crash on garbage output is a wrong answer
        out["error"] = type(e).__name__
    report.write(json.dumps(out) + "\n")
    report.flush()
    report.close()


if __name__ == "__main__":
    main()
