"""`sarmerge merge` end to end on tiny Qwen2 checkpoints: outputs, manifests, preflight errors, bad configs, kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sarmerge.checkpoint import Checkpoint, sha256_file
from sarmerge.cli import main
from sarmerge.fisher_store import FisherStore, save_fisher
from sarmerge.methods import all_methods, get_method
from sarmerge.synthetic import write_family
from sarmerge.zoo.tiny import load_tokenizer, save_checkpoint, tiny_model


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    """A tiny bf16 RLVR-like family: base + 3 children with sparse updates; child2 is stored in 3 shards."""
    root = tmp_path_factory.mktemp("fam")
    base, tok = tiny_model(0)
    save_checkpoint(base, tok, root / "base", dtype=torch.bfloat16)
    for i in range(3):
        m, _ = tiny_model(0)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((torch.rand(p.shape, generator=g) < 0.2) * torch.randn(p.shape, generator=g) * 0.02)
        save_checkpoint(m, tok, root / f"child{i}", dtype=torch.bfloat16, max_shard_size="150KB" if i == 2 else "5GB")
    return root


def write_cfg(path: Path, **cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def fisher_for(fam: Path, child: str, out: Path, support: bool = False) -> Path:
    """A deterministic stand-in Fisher (positive, model-shaped) in the real store format."""
    if out.exists():
        return out
    ck, base = Checkpoint(fam / child), Checkpoint(fam / "base")
    g = torch.Generator().manual_seed(len(child))
    fisher = {n: torch.rand(ck.info(n).shape, generator=g) for n in ck.names}
    taus = {n: ck.read(n).float() - base.read(n).float() for n in ck.names} if support else None
    out.mkdir(parents=True)
    save_fisher(out, fisher, {"mode": "test"}, support_taus=taus)
    return out


def cfg_for(method: str, fam: Path, tmp: Path) -> dict:
    spec = get_method(method)
    children = ["child0"] if spec.max_models == 1 else ["child0", "child1", "child2"]
    models = [{"model": str(fam / c)} for c in children]
    if spec.fisher != "none":
        for m, c in zip(models, children, strict=True):
            m["fisher"] = str(fisher_for(fam, c, tmp.parent / f"fisher-{c}"))
    return {"method": method, "base_model": str(fam / "base"), "models": models, "seed": 7}


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_method_merges_a_real_family_matching_the_in_memory_method(method, fam, tmp_path):
    cfg = write_cfg(tmp_path / "merge.yaml", **cfg_for(method, fam, tmp_path))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    # Same result as running the method on whole in-memory state dicts.
    spec = get_method(method)
    raw = yaml.safe_load(cfg.read_text())
    base = load_file(fam / "base" / "model.safetensors")
    models = [Checkpoint(m["model"]) for m in raw["models"]]
    fishers = [FisherStore(m["fisher"]) if "fisher" in m else None for m in raw["models"]]
    merged = Checkpoint(out)
    from sarmerge.merge import tensor_seed
    from sarmerge.methods import TensorGroup

    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"):
        b = base[name].float()
        ms = [m.read(name).float() for m in models]
        g = TensorGroup(
            name,
            b,
            ms,
            [1.0] * len(ms),
            [None] * len(ms),
            [f.dense(name, m - b) if f else None for f, m in zip(fishers, ms, strict=True)],
            torch.Generator().manual_seed(tensor_seed(7, name)),
        )
        expect = spec.fn(g, spec.params()).to(torch.bfloat16)
        assert torch.equal(merged.read(name), expect), name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = load_tokenizer(out)
    ids = tok(["12+3="], return_tensors="pt")
    gen = loaded.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4


def test_output_layout_manifest_and_card(fam, tmp_path):
    cfg = write_cfg(
        tmp_path / "m.yaml",
        method="ties",
        base_model="../fam_link/base",
        models=[{"model": "../fam_link/child0"}, {"model": "../fam_link/child2"}],
        parameters={"density": 0.03},
        overrides=[{"pattern": r"mlp\.", "parameters": {"density": 0.15}}],
    )
    (tmp_path.parent / "fam_link").unlink(missing_ok=True)
    (tmp_path.parent / "fam_link").symlink_to(fam)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--out-shard-size", "100KB", "--no-progress"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2
    for aux in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "merge_manifest.json",
    ):
        assert aux in files, aux
    m = json.loads((out / "merge_manifest.json").read_text())
    assert m["method"] == "ties" and m["seed"] == 0
    assert m["config"]["parameters"] == {"density": 0.03, "lambda": 1.0}  # defaults resolved
    child0 = next(i for i in m["inputs"] if i["path"].endswith("child0"))
    assert child0["files"][0]["sha256"] == sha256_file(fam / "child0" / "model.safetensors")
    child2 = next(i for i in m["inputs"] if i["path"].endswith("child2"))
    assert len(child2["files"]) == len(list((fam / "child2").glob("*.safetensors"))) > 1  # every shard hashed
    assert set(m["timings_s"]) >= {"preflight", "merge", "total"} and m["git_revision"]
    card = (out / "README.md").read_text()
    assert "ties" in card and "merge_manifest.json" in card
    # The regex override reached the MLP tensors only (≤ 2 × 15 % vs ≤ 2 × 3 % of entries updated).
    b = Checkpoint(fam / "base")
    o = Checkpoint(out)
    mlp = o.read("model.layers.0.mlp.up_proj.weight").float() - b.read("model.layers.0.mlp.up_proj.weight").float()
    attn = (
        o.read("model.layers.0.self_attn.q_proj.weight").float()
        - b.read("model.layers.0.self_attn.q_proj.weight").float()
    )
    assert (mlp != 0).float().mean() > 0.15 and (attn != 0).float().mean() <= 0.06


def test_dare_is_reproducible_from_seed(fam, tmp_path):
    base = {
        "method": "dare_ties",
        "base_model": str(fam / "base"),
        "models": [{"model": str(fam / "child0")}, {"model": str(fam / "child1")}],
        "parameters": {"density": 0.5},
    }
    digests = []
    for i, seed in enumerate([1, 1, 2]):
        cfg = write_cfg(tmp_path / f"{i}.yaml", **base, seed=seed)
        assert main(["merge", str(cfg), str(tmp_path / f"o{i}"), "--no-progress", "--threads", str(1 + i % 2)]) == 0
        digests.append(sha256_file(tmp_path / f"o{i}" / "model.safetensors"))
    assert digests[0] == digests[1] != digests[2]


def test_support_layout_fisher_gives_the_same_sar_merge_as_dense(fam, tmp_path):
    outs = []
    for support in (False, True):
        models = [
            {"model": str(fam / c), "fisher": str(fisher_for(fam, c, tmp_path / f"f-{c}-{support}", support))}
            for c in ("child0", "child1")
        ]
        cfg = write_cfg(tmp_path / f"s{support}.yaml", method="sar", base_model=str(fam / "base"), models=models)
        assert main(["merge", str(cfg), str(tmp_path / f"o{support}"), "--no-progress"]) == 0
        outs.append(sha256_file(tmp_path / f"o{support}" / "model.safetensors"))
    assert outs[0] == outs[1]
    dense = sum(f.stat().st_size for f in (tmp_path / "f-child0-False").glob("*.safetensors"))
    sparse = sum(f.stat().st_size for f in (tmp_path / "f-child0-True").glob("*.safetensors"))
    assert sparse < 0.4 * dense  # ~20 % of entries moved


def test_padded_embedding_rows_are_kept(tmp_path):
    """Embedding rows beyond the tokenizer's vocabulary (Qwen2.5-style padding) are merged as stored."""
    for name, shift in (("base", 0.0), ("a", 0.1), ("b", -0.2)):
        d = tmp_path / name
        d.mkdir()
        save_file({"model.embed_tokens.weight": torch.full((104, 4), 1.0 + shift)}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 104}))
    cfg = write_cfg(
        tmp_path / "c.yaml", method="task_arithmetic", base_model="base", models=[{"model": "a"}, {"model": "b"}]
    )
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    emb = Checkpoint(tmp_path / "out").read("model.embed_tokens.weight")
    assert emb.shape == (104, 4)
    torch.testing.assert_close(emb, torch.full((104, 4), 0.9))


def _clone(fam: Path, tmp: Path, name: str = "bad") -> Path:
    dst = tmp / name
    shutil.copytree(fam / "child0", dst)
    return dst


def _edit_weights(ck_dir: Path, fn) -> None:
    f = ck_dir / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


BAD_INPUTS = {
    "shape": (
        lambda d: _edit_weights(d, lambda t: t.__setitem__("lm_head.weight", torch.zeros(5, 64))),
        r"tensor 'lm_head.weight' has shape \[5, 64\] but .* has \[99, 64\]",
    ),
    "dtype": (
        lambda d: _edit_weights(d, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].float())),
        r"tensor 'model.norm.weight' has dtype F32 but .* has BF16",
    ),
    "missing-tensor": (
        lambda d: _edit_weights(d, lambda t: t.pop("model.norm.weight")),
        r"lacks tensor 'model.norm.weight'",
    ),
    "extra-tensor": (
        lambda d: _edit_weights(d, lambda t: t.__setitem__("extra.bias", torch.zeros(2))),
        r"has extra tensor 'extra.bias'",
    ),
    "nan": (
        lambda d: _edit_weights(d, lambda t: t["model.norm.weight"].__setitem__(0, float("nan"))),
        r"tensor 'model.norm.weight' contains 1 NaN/Inf",
    ),
    "architecture": (
        lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"qwen2"', '"llama"')),
        r"model_type = 'llama' but .* has 'qwen2'",
    ),
    "vocab": (
        lambda d: (d / "tokenizer.json").write_text(
            json.dumps({**json.loads((d / "tokenizer.json").read_text()), "model": {"vocab": {"a": 0}}})
        ),
        r"vocabulary has 3 tokens but .* has 99",
    ),
    "truncated": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
        r"model.safetensors: truncated: tensor",
    ),
    "no-config": (  # issue #11 item 9: architecture and vocabulary could not be checked
        lambda d: (d / "config.json").unlink(),
        r"/bad: not a model directory \(no config.json\)",
    ),
    "pickle": (
        lambda d: ((d / "model.safetensors").unlink(), torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")),
        r"--allow-pickle",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_fail_clearly_and_write_nothing(case, fam, tmp_path, capsys):
    damage, message = BAD_INPUTS[case]
    bad = _clone(fam, tmp_path)
    damage(bad)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        method="ram",
        base_model=str(fam / "base"),
        models=[{"model": str(fam / "child1")}, {"model": str(bad)}],
    )
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_merge_that_overflows_is_refused_naming_the_tensor(fam, tmp_path, capsys):
    # finite inputs, a result that is not: λ = 1e40 is a valid float in the config but overflows fp32 compute
    cfg = write_cfg(tmp_path / "c.yaml", method="task_arithmetic", base_model=str(fam / "base"),
                    parameters={"lambda": 1e40}, models=[{"model": str(fam / "child1")}])
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "method 'task_arithmetic' produced NaN/Inf (check its parameters)" in err and "tensor '" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("case", ["no-config", "shape", "vocab"])
def test_check_runs_the_preflight_alone(case, fam, tmp_path, capsys):
    models = [{"model": str(fam / "child1")}, {"model": str(fam / "child0")}]
    cfg = write_cfg(tmp_path / "c.yaml", method="ties", base_model=str(fam / "base"), models=models)
    assert main(["merge", "--check", str(cfg)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ok: ties of base base + 2 model(s): ") and "nothing written" in out[0]
    bad = _clone(fam, tmp_path)
    BAD_INPUTS[case][0](bad)
    models[1]["model"] = str(bad)
    cfg = write_cfg(tmp_path / "c.yaml", method="ties", base_model=str(fam / "base"), models=models)
    assert main(["merge", "--check", str(cfg)]) == 2
    err = capsys.readouterr().err
    import re

    assert len(err.strip().splitlines()) == 1 and re.search(BAD_INPUTS[case][1], err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "c.yaml"]  # nothing written
    assert main(["merge", str(cfg)]) == 2
    assert "output directory OUT is required" in capsys.readouterr().err


BAD_CONFIGS = {
    "unknown-method": ({"method": "magic"}, r"unknown merge method 'magic'; choose one of: .*sar.*ties"),
    "bad-knob": (
        {"method": "sar", "parameters": {"arbitration": "vote"}},
        r"field 'arbitration': Input should be 'hard', 'fisher_avg' or 'hybrid' \(got 'vote'\)",
    ),
    "out-of-range": ({"method": "ties", "parameters": {"density": 1.5}}, r"field 'density': .*less than or equal to 1"),
    "unknown-param": ({"method": "ties", "parameters": {"dencity": 0.5}}, r"field 'dencity': unknown field"),
    "unknown-field": ({"method": "ties", "modles": []}, r"field 'modles': unknown field"),
    "needs-fisher": ({"method": "fisher"}, r"needs a fisher: path for every model"),
    "needs-base": ({"method": "ties", "base_model": None}, r"method 'ties' needs base_model"),
    "slerp-count": ({"method": "slerp"}, r"takes exactly 1 model"),
    "bad-regex": ({"method": "ties", "overrides": [{"pattern": "(", "parameters": {}}]}, r"invalid regex '\('"),
    "bad-override": (
        {"method": "ties", "overrides": [{"pattern": "mlp", "parameters": {"density": 0}}]},
        r"field 'density': Input should be greater than 0",
    ),
    "bad-dtype": ({"method": "ties", "out_dtype": "int8"}, r"field 'out_dtype': Input should be"),
    "missing-model": (
        {"method": "ties", "models": [{"model": "/nonexistent/model"}]},
        r"/nonexistent/model: no such checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_name_the_field_and_allowed_values(case, fam, tmp_path, capsys):
    patch, message = BAD_CONFIGS[case]
    cfg = {
        "method": "ties",
        "base_model": str(fam / "base"),
        "models": [{"model": str(fam / "child0")}, {"model": str(fam / "child1")}],
        **patch,
    }
    path = write_cfg(tmp_path / "c.yaml", **cfg)
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    import re

    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_and_existing_output(fam, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    assert main(["merge", str(bad), str(tmp_path / "o"), "--no-progress"]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    cfg = write_cfg(tmp_path / "c.yaml", method="linear", models=[{"model": str(fam / "child0")}])
    (tmp_path / "exists").mkdir()
    assert main(["merge", str(cfg), str(tmp_path / "exists"), "--no-progress"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(tmp_path / "exists"), "--no-progress", "--overwrite"]) == 0


def test_sigkill_mid_merge_leaves_no_output_and_rerun_succeeds(tmp_path):
    members = write_family(tmp_path / "fam", params_target=3e7, children=3, shard_size="20MB")
    cfg = write_cfg(
        tmp_path / "c.yaml", method="ties", base_model=str(members[0]), models=[{"model": str(m)} for m in members[1:]]
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "sarmerge",
        "merge",
        str(cfg),
        str(out),
        "--no-progress",
        "--out-shard-size",
        "10MB",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    partial = None
    while time.time() < deadline and proc.poll() is None:
        partial = next(tmp_path.glob(".out.partial-*"), None)
        if partial and any(f.stat().st_size > 0 for f in partial.glob("*.safetensors")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "merge finished before it could be killed; make the family larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert (out / "merge_manifest.json").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert len(Checkpoint(out).names) == len(Checkpoint(members[0]).names)


@pytest.mark.parametrize(  # slerp interpolates per whole tensor since 0e732f0 (one angle per tensor, as mergekit)
    "method", ["linear", "task_arithmetic", "ram", "ram_plus", "ties", "sar", "sar-norm", "fisher", "model_stock"]
)
def test_row_chunked_streaming_gives_identical_output(method, fam, tmp_path):
    """Element-, row-wise and multi-pass methods stream tensors in row chunks; the bytes must not depend on the chunk
    size (multi-pass: per-tensor statistics summed over passes of chunks equal the whole tensor's — support counts
    for RAM+/SAR, TIES's exact top-k with ties broken in flat order)."""
    from sarmerge.config import parse_config
    from sarmerge.merge import run_merge

    method, _, variant = method.partition("-")
    raw = cfg_for(method, fam, tmp_path)
    if method == "sar":  # exercise the support-layout Fisher's running offsets across chunks
        # the defaults (RAM+ rescale: a statistics pass, then the merge) and the norm rescale (one pass)
        raw["parameters"] = {"rescale": "norm", "density": 1.0} if variant == "norm" else {}
        for m in raw["models"]:
            m["fisher"] = str(
                fisher_for(fam, Path(m["model"]).name, tmp_path.parent / f"sf-{Path(m['model']).name}", support=True)
            )
    cfg = parse_config(raw)
    assert cfg.spec.chunking_for(cfg.method_params()) in ("element", "row", "multi_pass")
    run_merge(cfg, tmp_path / "whole", progress=False)
    run_merge(cfg, tmp_path / "chunked", progress=False, chunk_elements=150)  # a few rows per chunk
    assert sha256_file(tmp_path / "whole" / "model.safetensors") == sha256_file(
        tmp_path / "chunked" / "model.safetensors"
    )


def test_methods_command_lists_every_method_with_how_it_streams(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")}
    assert set(lines) == set(all_methods())
    assert lines["ties"].endswith("row chunks after 2 statistics passes]")
    assert lines["sar"].endswith("row chunks after 1 statistics pass]")  # its defaults: density 1, RAM+ rescale
    assert lines["task_arithmetic"].endswith("[needs base_model; row chunks]")
    assert lines["dare_ties"].endswith("whole tensors]")


# ---------------------------------------------------------------------------------------------- byte digests ---
# Pinned sha256 of tiny merges, so refactors of the engine, the checkpoint I/O and the layout helpers cannot change a
# merged byte unnoticed. Inputs come from seeded CPU generators (stable across torch versions), not model init. The
# pinned methods/densities avoid slerp and the top-k rounding edge (int(density·n) ≥ 1 on every tensor here).
DIGEST_SHAPES = {"embed.weight": (12, 8), "layer.proj.weight": (16, 8), "layer.proj.bias": (16,), "norm.weight": (8,)}
DIGEST_CASES = {
    "linear": ({"method": "linear"}, False),
    "task_arithmetic": ({"method": "task_arithmetic", "parameters": {"lambda": 0.7}, "out_dtype": "float32"}, False),
    "ties": ({"method": "ties", "parameters": {"density": 0.3}}, False),  # below the 40 % update support
    "ties_full": ({"method": "ties", "parameters": {"density": 1.0}}, False),
    "sar": ({"method": "sar"}, True),
    "ram_plus": ({"method": "ram_plus"}, False),
    "ram": ({"method": "ram"}, False),  # recorded at 4136ccf, before RAM's one-select-per-model rewrite
}
# Recorded from the engine at ab2df3c, before the consolidation of issue #16.
_CONFIG_AS_INPUT = "c19810855fe324de5da22311ef27246ade35490fca3030484aaf8bafa5e532ea"
DIGESTS = {
    "linear": {
        "model.safetensors": "85efb817139c5dc9ae6c3f54e0b0683af2b43f0f103058bf023d9e45d193d25b",
        "config.json": _CONFIG_AS_INPUT,
    },
    "ram": {
        "model.safetensors": "dd9a6880aeac6fdc5edc9b961557ca23eb57c659b60edc8fdceade622bffa753",
        "config.json": _CONFIG_AS_INPUT,
    },
    "ram_plus": {
        "model.safetensors": "93bbda9ba908788f25be06d2aeeb748602a0be12399ac8063483d772d7750b40",
        "config.json": _CONFIG_AS_INPUT,
    },
    "sar": {
        "model.safetensors": "41c50f58d6571d595c5444fdee75874c04e692fe84c928944ac002e084a26d6b",
        "config.json": _CONFIG_AS_INPUT,
    },
    "task_arithmetic": {
        "model.safetensors": "00b8ef5f4649e6c228fbb01ff8d0e1d34ed8456c564aa9b944a058231b481080",
        "config.json": "3a1e90410ada477efc8e559c721345eb2131c479ac51ce48a88ad30065ee3190",  # out_dtype recorded
    },
    "ties": {
        "model.safetensors": "3b104f08f8869fadaf08b5dd32ea07892db6d25bf5eb88d716dd6cc720e57feb",
        "config.json": _CONFIG_AS_INPUT,
    },
    "ties_full": {
        "model.safetensors": "b465b1774d35102a10047434214bb0bf809f1f17ec0a76791f09498b36aee6ac",
        "config.json": _CONFIG_AS_INPUT,
    },
}


def _digest_family(root: Path) -> Path:
    if (root / "base").exists():
        return root
    g = torch.Generator().manual_seed(1234)
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in DIGEST_SHAPES.items()}
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 12, "hidden_size": 8}
    for name in ("base", "a", "b"):
        tensors = base
        if name != "base":
            tensors = {
                n: (t.float() + (torch.rand(t.shape, generator=g) < 0.4) * torch.randn(t.shape, generator=g) * 0.1)
                .to(torch.bfloat16)
                for n, t in base.items()
            }
        (root / name).mkdir(parents=True)
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(config))
        if name != "base":
            gf = torch.Generator().manual_seed(len(name))
            fisher = {n: torch.rand(s, generator=gf) + 0.01 for n, s in DIGEST_SHAPES.items()}
            (root / f"fisher-{name}").mkdir()
            save_fisher(root / f"fisher-{name}", fisher, {"mode": "test"})
    return root


@pytest.mark.parametrize("case", sorted(DIGEST_CASES))
def test_merge_bytes_are_pinned(case, tmp_path_factory):
    root = _digest_family(tmp_path_factory.getbasetemp() / "digest-family")
    extra, with_fisher = DIGEST_CASES[case]
    models = [{"model": str(root / m), **({"fisher": str(root / f"fisher-{m}")} if with_fisher else {})}
              for m in ("a", "b")]
    cfg = write_cfg(tmp_path_factory.mktemp("cfg") / "merge.yaml", base_model=str(root / "base"), models=models,
                    seed=3, **extra)
    out = tmp_path_factory.mktemp("out") / "merged"
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    got = {f: sha256_file(out / f) for f in ("model.safetensors", "config.json")}
    assert got == DIGESTS[case]
