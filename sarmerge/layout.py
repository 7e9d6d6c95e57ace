"""On-disk layout shared by the library and the pipeline, without torch: file names, hashing, atomic output folders,
sizes, the safetensors header and the dtype names.

Importing this module costs only the standard library, so pipeline steps that never touch a tensor (cache hits, the
registry, the Airflow side) can use the very same names and rules as the merge engine instead of copying them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sarmerge.errors import SarmergeError

# ----------------------------------------------------------------------------------------------- file names ---

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MERGE_MANIFEST = "merge_manifest.json"
FISHER_MANIFEST = "fisher_manifest.json"
MODEL_CARD = "README.md"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Files copied from the tokenizer source next to the merged weights.
AUX_FILES = (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# The files besides the weights whose bytes define a checkpoint (README and manifests carry timestamps).
CONTENT_FILES = (*AUX_FILES, INDEX_FILE)
# The last stdout line of every pipeline step is RESULT_PREFIX + JSON: the local runner, DockerOperator (which pushes
# the last log line to XCom) and the Kubernetes runner all read it.
RESULT_PREFIX = "SARMERGE_RESULT "

# ------------------------------------------------------------------------------------------------ dtype names ---

# safetensors dtype code → torch dtype attribute name (`getattr(torch, name)`), and its bytes per element.
DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
ELEMENT_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# Dtypes a merge may compute in or write (the merge config's `dtype` / `out_dtype`).
MERGE_DTYPES = ("float32", "float64", "bfloat16", "float16")
# Dtypes a model is loaded in for Fisher, evaluation and analysis.
MODEL_DTYPES = ("float32", "bfloat16", "float16")

# ---------------------------------------------------------------------------------------------------- hashing ---


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (memory stays flat for multi-GB shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_sha256(files: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """One digest for a set of weight files: a single file's own sha256; for shards, the sha256 of their
    `sha256sum`-style listing. Returns it with the per-file digests."""
    digests = {f.name: sha256_file(f) for f in files}
    if len(digests) == 1:
        return next(iter(digests.values())), digests
    listing = "".join(f"{d}  {n}\n" for n, d in sorted(digests.items()))
    return hashlib.sha256(listing.encode()).hexdigest(), digests


def read_json_file(path: Path) -> dict:
    """A JSON object file (config.json, generation_config.json, ...); {} when absent, one clear error when broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SarmergeError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise SarmergeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------------ sizes ---


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', 1000 → bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise SarmergeError(f"invalid size {text!r} (use e.g. 500MB, 2GB, 1GiB)") from None


# ------------------------------------------------------------------------------------------ safetensors header ---

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def element_size(code: str) -> int:
    return ELEMENT_SIZES[code]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; every failure names the file (and the tensor)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SarmergeError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SarmergeError(
                    f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise SarmergeError(f"{path}: cannot read: {e.strerror}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SarmergeError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise SarmergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SarmergeError(f"{path}: tensor {name!r} has a malformed header entry: {entry!r}") from e
        if code not in DTYPE_NAMES:
            raise SarmergeError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        expected = math.prod(shape) * element_size(code)
        if hi - lo != expected or lo < 0:
            raise SarmergeError(
                f"{path}: tensor {name!r} byte range [{lo}, {hi}) does not match shape {list(shape)} {code}"
            )
        if data_start + hi > size:
            raise SarmergeError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + hi} but the file has {size} bytes"
            )
        infos[name] = TensorInfo(name, code, shape, path, data_start + lo, data_start + hi)
    return infos, metadata


def header_bytes(entries: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The serialized header of a safetensors file holding `entries` (name, shape, code) in order; and the data size."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, code in entries:
        n = math.prod(shape) * element_size(code)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, offset


# ------------------------------------------------------------------------------------- atomic output folders ---


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside `out`; it becomes `out` only if the block completes.

    A killed process leaves only a hidden `.NAME.partial-PID` sibling, which the next run removes.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SarmergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def copy_aux_files(src: Path, dst: Path, *, out_dtype: str | None = None) -> list[str]:
    """Copy config/tokenizer/chat-template/generation files; record the output dtype in config.json."""
    copied = []
    for name in AUX_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, dst / name)
            copied.append(name)
    cfg = dst / CONFIG_FILE
    if out_dtype and cfg.exists():
        data = json.loads(cfg.read_text())
        data["torch_dtype" if "torch_dtype" in data else "dtype"] = out_dtype
        cfg.write_text(json.dumps(data, indent=2) + "\n")
    return copied
