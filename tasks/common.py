"""Small helpers shared by the steps: logging, the result line, atomic JSON, subprocesses, exit codes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError, run_cli
from sarmerge.layout import RESULT_PREFIX  # the last stdout line of every step: RESULT_PREFIX + json


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def emit_result(result: Any) -> None:
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)


def parse_result(output: str) -> Any:
    """The result a step printed (its last RESULT line), or None."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise SarmergeError(f"{path}: cannot read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise SarmergeError(f"{path}: invalid JSON: {e}") from e


def run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True,
        what: str | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; a failure raises SarmergeError with the command and its stderr tail."""
    logging.getLogger(__name__).debug("$ %s (cwd %s)", " ".join(cmd), cwd)
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise SarmergeError(f"{what or cmd[0]}: `{' '.join(cmd)}` failed with exit {proc.returncode}: {tail}")
    return proc


def step_main(name: str, fn: Callable[[], Any]) -> int:
    """Run a step body: its result becomes the RESULT line; a SarmergeError exits 2 with one clear message."""
    setup_logging(os.environ.get("SARMERGE_VERBOSE") == "1")
    return run_cli(name, lambda: emit_result(fn()))


def fault_point(name: str) -> None:
    """Fault injection for the retry tests: SIGKILL this process here when $SARMERGE_FAULT names this point.

    With $SARMERGE_FAULT_ONCE set to a folder, only the first process to reach the point dies (it leaves a marker
    file there), so an Airflow retry of the same task then runs through. Never set in production."""
    wanted = os.environ.get("SARMERGE_FAULT", "")
    if name not in wanted.split(","):
        return
    once = os.environ.get("SARMERGE_FAULT_ONCE")
    if once:
        Path(once).mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(Path(once) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    logging.getLogger(__name__).warning("fault injection: killing process %d at %s", os.getpid(), name)
    sys.stderr.flush()
    os.kill(os.getpid(), 9)
