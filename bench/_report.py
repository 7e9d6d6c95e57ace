"""Shared helpers for benchmark scripts: a machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import fcntl
import os
import platform
from pathlib import Path

from sarmerge.errors import SarmergeError

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:NAME -->` markers in BENCHMARKS.md, under a file lock."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    with open(ROOT / ".benchmarks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        block = f"{start}\n{body.rstrip()}\n{end}"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip() + f"\n\n## {name}\n\n{block}\n"
        BENCHMARKS.write_text(text)


def replace_block(path: Path, begin: str, end: str, text: str) -> None:
    """Replace the text between the `begin` and `end` markers of `path` (appending the block when it has none)."""
    doc = path.read_text() if path.exists() else ""
    if doc.count(begin) > 1 or doc.count(end) > 1 or (begin in doc) != (end in doc) or (
            begin in doc and doc.index(begin) > doc.index(end)):
        raise SarmergeError(f"{path}: needs at most one {begin} ... {end} block, in that order")
    if begin in doc:
        head, rest = doc.split(begin)
        path.write_text(head + begin + "\n" + text.rstrip("\n") + "\n" + rest[rest.index(end):])
    else:
        path.write_text(doc.rstrip("\n") + f"\n\n{begin}\n{text.rstrip()}\n{end}\n")
