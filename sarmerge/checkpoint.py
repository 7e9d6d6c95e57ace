"""Checkpoint I/O: one reader for every model, Fisher and checkpoint file, and one streaming writer.

Reading parses the safetensors header ourselves and `preadv`s one tensor at a time into a fresh buffer. Unlike
`safe_open` (an mmap), this keeps the resident set bounded by the tensors in flight instead of every page touched,
so peak memory stays flat as models grow. Writing plans every shard's header up front from the known shapes and
dtypes, then streams each tensor's bytes to disk as soon as it is computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sarmerge.errors import SarmergeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied from the tokenizer source next to the merged weights.
AUX_FILES = (
    "config.json",
    "generation_config.json",
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
    return torch.empty((), dtype=SAFETENSORS_DTYPES[code]).element_size()


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
        if code not in SAFETENSORS_DTYPES:
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


def _read_bytes(fd: int, start: int, nbytes: int, path: Path) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], start + done)
        if got <= 0:
            raise SarmergeError(f"{path}: unexpected end of file at byte {start + done}")
        done += got
    return buf


class Checkpoint:
    """A Hugging Face-layout checkpoint (or a bare safetensors file), read lazily one tensor at a time."""

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self._pickled: dict[str, torch.Tensor] | None = None
        self._fds: dict[Path, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        if not self.path.exists():
            raise SarmergeError(f"{self.path}: no such checkpoint")
        self.files = self._weight_files(allow_pickle)
        if self._pickled is None:
            self._index_tensors()
        self.config = self._read_json("config.json")

    def _read_json(self, name: str) -> dict:
        f = self.path / name if self.path.is_dir() else None
        if f is None or not f.exists():
            return {}
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SarmergeError(f"{f}: invalid JSON: {e}") from e

    def _weight_files(self, allow_pickle: bool) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        index = p / INDEX_FILE
        if index.exists():
            weight_map = self._read_json(INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SarmergeError(f"{index}: missing or empty 'weight_map'")
            self._index_map = weight_map
            files = sorted({p / f for f in weight_map.values()})
            for f in files:
                if Path(f).resolve().parent != p.resolve():
                    raise SarmergeError(f"{index}: shard {f.name!r} points outside the checkpoint directory")
                if not f.exists():
                    raise SarmergeError(f"{index}: missing shard {f.name} (listed in the index, not on disk)")
            return files
        if (p / SINGLE_FILE).exists():
            return [p / SINGLE_FILE]
        found = sorted(p.glob("*.safetensors"))
        if found:
            return found
        pickles = sorted(p.glob("*.bin")) + sorted(p.glob("*.pt")) + sorted(p.glob("*.pth"))
        if pickles:
            if not allow_pickle:
                raise SarmergeError(
                    f"{p}: only pickle weights found ({pickles[0].name}); pickle can run arbitrary code, so it is "
                    "refused. Convert to safetensors, or pass --allow-pickle if you trust the file."
                )
            self._pickled = {}
            for f in pickles:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                self._pickled.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
            for name, t in self._pickled.items():
                self.tensors[name] = TensorInfo(name, DTYPE_CODES[t.dtype], tuple(t.shape), pickles[0], 0, 0)
            return pickles
        raise SarmergeError(f"{p}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")

    def _index_tensors(self) -> None:
        for f in self.files:
            infos, meta = read_header(f)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self.tensors:
                    raise SarmergeError(
                        f"{self.path}: tensor {name!r} appears in both {self.tensors[name].file.name} and {f.name}"
                    )
                self.tensors[name] = info
        weight_map = getattr(self, "_index_map", None)
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise SarmergeError(
                        f"{self.path / INDEX_FILE}: tensor {name!r} is listed in {fname} but not found there"
                    )

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SarmergeError(f"{self.path}: has no tensor {name!r}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None, *, check_finite: bool = True) -> torch.Tensor:
        """Load one tensor, or rows [r0, r1) of its first dimension, into fresh memory (never an mmap view)."""
        info = self.info(name)
        shape = info.shape
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        if self._pickled is not None:
            t = self._pickled[name]
            t = (t[r0:r1] if rows is not None else t).clone()
        else:
            row_numel = math.prod(shape[1:]) if shape else 1
            out_shape = ((r1 - r0), *shape[1:]) if rows is not None else shape
            nbytes = (r1 - r0) * row_numel * element_size(info.dtype)
            if nbytes == 0:
                t = torch.empty(out_shape, dtype=SAFETENSORS_DTYPES[info.dtype])
            else:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
                start = info.start + r0 * row_numel * element_size(info.dtype)
                buf = _read_bytes(fd, start, nbytes, info.file)
                t = torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[info.dtype]).reshape(out_shape)
        if check_finite and t.is_floating_point():
            check_finite_tensor(t, f"{info.file}: tensor {name!r}")
        return t

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def check_finite_tensor(t: torch.Tensor, what: str) -> None:
    """Raise naming `what` if t has NaN/Inf. One fp32 reduction on the fast path; the exact count only on failure."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise SarmergeError(f"{what} contains {bad} NaN/Inf value(s)")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _header_bytes(entries: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str]) -> tuple[bytes, int]:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, code in entries:
        n = math.prod(shape) * element_size(code)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, offset


class ShardedWriter:
    """Streams tensors, in a fixed planned order, into HF-style safetensors shards.

    Memory is one tensor: each shard's header is written first (shapes and dtypes are known before merging starts),
    then each tensor's bytes are appended as it arrives.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[tuple[str, tuple[int, ...], str]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for entry in plan:
            n = math.prod(entry[1]) * element_size(entry[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        total = len(shards)
        self.shard_names = (
            [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        )
        self._shards = shards
        self._queue: Iterator[tuple[int, tuple[str, tuple[int, ...], str]]] = (
            (i, e) for i, s in enumerate(shards) for e in s
        )
        self._current = -1
        self._file = None
        self._name, self._left = "", 0
        self.total_size = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append a whole tensor, or the next consecutive row chunk of one (chunks of a tensor arrive in order)."""
        code = DTYPE_CODES[tensor.dtype]
        if self._left == 0:
            shard, (planned, shape, planned_code) = next(self._queue)
            if name != planned or planned_code != code:
                raise RuntimeError(f"writer got {name} {code}, planned {planned} {planned_code}")
            if shard != self._current:
                self._open(shard)
            self._name, self._left = name, math.prod(shape) * element_size(code)
        elif name != self._name:
            raise RuntimeError(f"writer got {name} before {self._name} was complete")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        n = data.numel() * data.element_size()
        if n > self._left:
            raise RuntimeError(f"writer got {n} bytes for {name}, only {self._left} left in its planned shape")
        if n:
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._left -= n
        self.total_size += n

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._current = shard
        self._file = open(self.out_dir / self.shard_names[shard], "wb")  # noqa: SIM115 - closed in _open/close
        header, _ = _header_bytes(self._shards[shard], self.metadata)
        self._file.write(header)

    def close(self) -> None:
        if self._left or next(self._queue, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        if self._file is not None:
            self._file.close()
        if len(self.shard_names) > 1:
            weight_map = {name: self.shard_names[i] for i, s in enumerate(self._shards) for name, _, _ in s}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


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
    cfg = dst / "config.json"
    if out_dtype and cfg.exists():
        data = json.loads(cfg.read_text())
        data["torch_dtype" if "torch_dtype" in data else "dtype"] = out_dtype
        cfg.write_text(json.dumps(data, indent=2) + "\n")
    return copied
