"""The checkpoint reader and streaming writer against the reference safetensors library, and their failure modes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sarmerge.checkpoint import Checkpoint, ShardedWriter, all_finite, atomic_output_dir, parse_size
from sarmerge.errors import SarmergeError

TENSORS = {
    "a.weight": torch.randn(5, 7).to(torch.bfloat16),
    "b.weight": torch.randn(3, 4, 2, dtype=torch.float16),
    "c.bias": torch.randn(11),
    "d.ids": torch.arange(6, dtype=torch.int64),
    "e.empty": torch.zeros(0, 4),
}


def test_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"k": "v"})
    ck = Checkpoint(tmp_path)
    assert set(ck.names) == set(TENSORS) and ck.metadata["k"] == "v"
    for name, t in TENSORS.items():
        got = ck.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_writer_output_is_standard_safetensors_and_sharded_by_size(tmp_path):
    plan = [(n, tuple(t.shape), code) for (n, t), code in zip(TENSORS.items(), ["BF16", "F16", "F32", "I64", "F32"])]
    w = ShardedWriter(tmp_path, plan, max_shard_bytes=80, metadata={"who": "test"})
    for n, t in TENSORS.items():
        w.write(n, t)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(w.shard_names) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    for shard in w.shard_names:
        raw = (tmp_path / shard).read_bytes()
        assert struct.unpack("<Q", raw[:8])[0] % 8 == 0  # aligned data section
        with safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata()["who"] == "test"
        for n, t in load_file(tmp_path / shard).items():
            assert torch.equal(t, TENSORS[n])
    ck = Checkpoint(tmp_path)
    assert all(torch.equal(ck.read(n), t) for n, t in TENSORS.items())


def test_writer_rejects_out_of_plan_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [("x", (2,), "F32")], 1 << 20)
    with pytest.raises(RuntimeError, match="planned"):
        w.write("y", torch.zeros(2))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "not a safetensors file"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"), "corrupt or truncated safetensors header"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope"), "not JSON"),
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated: tensor"),
    ],
    ids=["tiny", "header-too-long", "not-json", "truncated-data"],
)
def test_damaged_files_are_named(tmp_path, damage, message):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, f)
    damage(f)
    with pytest.raises(SarmergeError, match=message) as e:
        Checkpoint(tmp_path)
    assert str(f) in str(e.value)


def test_sharded_index_problems(tmp_path):
    save_file({"w1": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SarmergeError, match=r"missing shard model-00002-of-00002\.safetensors"):
        Checkpoint(tmp_path)
    index["weight_map"]["w2"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SarmergeError, match=r"'w2' is listed in model-00001-of-00002\.safetensors but not found"):
        Checkpoint(tmp_path)
    index["weight_map"]["w2"] = "../escape.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SarmergeError, match="outside the checkpoint"):
        Checkpoint(tmp_path)


def test_pickle_refused_unless_allowed(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SarmergeError, match=r"pickle.*--allow-pickle"):
        Checkpoint(tmp_path)
    assert torch.equal(Checkpoint(tmp_path, allow_pickle=True).read("w"), torch.arange(3.0))


def test_nan_and_inf_are_named(tmp_path):
    save_file(
        {"ok": torch.zeros(3), "bad.weight": torch.tensor([1.0, float("nan"), float("inf")])},
        tmp_path / "model.safetensors",
    )
    ck = Checkpoint(tmp_path)
    ck.read("ok")
    with pytest.raises(SarmergeError, match=r"'bad.weight' contains 2 NaN/Inf"):
        ck.read("bad.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_is_exact_where_the_fast_sum_overflows(dtype):
    big = torch.full((1000,), 3e38, dtype=torch.float64).to(dtype)  # finite, but its fp32 sum is inf
    assert not torch.isfinite(big.sum(dtype=torch.float32)) and all_finite(big)
    assert all_finite(torch.randn(4096).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for t in (big.clone(), torch.randn(4096).to(dtype)):
            t[len(t) // 2] = bad
            assert not all_finite(t), (dtype, bad)


def test_missing_and_empty_checkpoints(tmp_path):
    with pytest.raises(SarmergeError, match="no such checkpoint"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(SarmergeError, match="no weights found"):
        Checkpoint(tmp_path)


def test_atomic_output_dir_leaves_nothing_on_failure_and_cleans_stale(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError), atomic_output_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise ValueError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    stale = tmp_path / ".out.partial-999999999"  # a dead PID's leftovers
    stale.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("done")
    assert (out / "f").read_text() == "done" and not stale.exists()
    with pytest.raises(SarmergeError, match="already exists"), atomic_output_dir(out):
        pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "g").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["g"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("100KB") == 100_000
    assert parse_size(123) == 123
    with pytest.raises(SarmergeError, match="invalid size 'lots'"):
        parse_size("lots")


def test_the_torch_free_layout_agrees_with_torch():
    """sarmerge.layout spells dtypes without torch: every code's name and byte size must be torch's own."""
    import torch

    from sarmerge import checkpoint, layout

    for code, name in layout.DTYPE_NAMES.items():
        dtype = getattr(torch, name)
        assert torch.empty((), dtype=dtype).element_size() == layout.ELEMENT_SIZES[code], code
        assert checkpoint.SAFETENSORS_DTYPES[code] is dtype
    assert set(layout.ELEMENT_SIZES) == set(layout.DTYPE_NAMES)
    floats = {c for c, n in layout.DTYPE_NAMES.items() if getattr(torch, n).is_floating_point and "float8" not in n}
    assert floats == layout.FLOAT_CODES  # fp8 is stored, never merged
    # one implementation, re-exported where the engine has always imported it from
    for name in ("read_header", "atomic_output_dir", "parse_size", "sha256_file", "copy_aux_files", "AUX_FILES"):
        assert getattr(checkpoint, name) is getattr(layout, name), name
    content = layout.CONTENT_FILES
    assert content == (*layout.AUX_FILES, layout.INDEX_FILE)
