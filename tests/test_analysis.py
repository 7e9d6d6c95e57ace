"""Analysis reports: geometry metrics on constructed task vectors with known answers, JS divergence against hand
computation, end-to-end `sarmerge analyze` on real tiny checkpoints (plots, pages), and bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sarmerge.analysis import geometry_report, js_divergence, render_report, token_report
from sarmerge.analysis.geometry import GeometryStats, layer_of, module_of, tensor_stats, top_singular_vectors
from sarmerge.analysis.tokens import _encode, read_prompts
from sarmerge.cli import main
from sarmerge.zoo.tiny import load_tokenizer, save_checkpoint, tiny_model

LABELS = ["a", "b"]


def derive(base: torch.Tensor, *models: torch.Tensor, eps: float = 1e-5, top_k: int = 0, svd: str = "auto") -> dict:
    labels = [chr(ord("a") + i) for i in range(len(models))]
    return tensor_stats(base, list(models), eps=eps, top_k=top_k, svd=svd).derive(labels)


# ---------------------------------------------------------------- metrics with known answers


def test_disjoint_supports_have_zero_jaccard_zero_cosine_and_all_energy_unshared():
    base = torch.randn(1000)
    tau_a, tau_b = torch.zeros(1000), torch.zeros(1000)
    tau_a[:300] = torch.randn(300)
    tau_b[500:600] = torch.randn(100)
    pair = derive(base, base + tau_a, base + tau_b)["pairs"][0]
    assert pair["jaccard"] == 0.0
    assert pair["overlap_ratio"] == 0.0
    assert pair["cosine"] == 0.0
    assert pair["orth_energy_share"] == 1.0
    assert pair["sign_conflict"] is None  # no overlap: undefined, not 0
    assert pair["unshared_energy_a"] == pytest.approx(1.0)
    assert pair["unshared_energy_b"] == pytest.approx(1.0)


def test_identical_updates_have_jaccard_and_cosine_one_and_no_conflicts():
    base = torch.randn(50, 40)
    tau = torch.randn(50, 40) * (torch.rand(50, 40) < 0.2)
    out = derive(base, base + tau, base + tau)
    pair = out["pairs"][0]
    assert pair["jaccard"] == 1.0
    assert pair["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert pair["orth_energy_share"] == pytest.approx(0.0, abs=1e-6)
    assert pair["sign_conflict"] == 0.0
    assert pair["unshared_energy_a"] == 0.0
    p = out["models"]["a"]["density"]
    assert pair["jaccard_chance"] == pytest.approx(p / (2 - p))
    assert out["models"]["a"]["sparsity"] == pytest.approx(float((tau == 0).float().mean()))


@pytest.mark.parametrize("degrees", [30.0, 90.0, 120.0])
def test_rotated_update_has_cosine_of_the_angle_and_sin_squared_orthogonal_energy(degrees):
    theta = math.radians(degrees)
    base = torch.zeros(8)
    tau_a = torch.zeros(8)
    tau_a[0] = 2.0
    tau_b = torch.zeros(8)
    tau_b[0], tau_b[1] = 2.0 * math.cos(theta), 2.0 * math.sin(theta)
    pair = derive(base, tau_a, tau_b)["pairs"][0]
    assert pair["cosine"] == pytest.approx(math.cos(theta), abs=1e-6)
    assert pair["orth_energy_share"] == pytest.approx(math.sin(theta) ** 2, abs=1e-6)
    if degrees == 90.0:
        # b moved coordinate 1 only (cos 90° is below ε): disjoint supports.
        assert pair["jaccard"] == 0.0
    else:
        assert pair["jaccard"] == pytest.approx(0.5)  # {0} vs {0, 1}
        assert pair["sign_conflict"] == (1.0 if degrees > 90 else 0.0)  # coordinate 0 flips sign past 90°


def test_entries_within_eps_count_as_unchanged():
    base = torch.zeros(10)
    model = torch.tensor([0, 1e-6, -1e-6, 5e-6, 2e-5, -3e-5, 0.1, 0, 0, 0])
    assert derive(base, model, eps=1e-5)["models"]["a"]["sparsity"] == pytest.approx(0.7)
    assert derive(base, model, eps=0.0)["models"]["a"]["sparsity"] == pytest.approx(0.4)


def test_independent_random_supports_overlap_at_chance_and_avoiding_ones_below():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    base = torch.zeros(n)
    a = (torch.rand(n, generator=g) < 0.2) * torch.randn(n, generator=g)
    b = (torch.rand(n, generator=g) < 0.3) * torch.randn(n, generator=g)
    pair = derive(base, a, b)["pairs"][0]
    assert pair["jaccard_chance"] == pytest.approx(0.2 * 0.3 / (0.2 + 0.3 - 0.06), rel=0.02)
    assert pair["overlap_ratio"] == pytest.approx(1.0, abs=0.03)
    assert pair["sign_conflict"] == pytest.approx(0.5, abs=0.02)  # independent signs
    assert abs(pair["cosine"]) < 0.01
    # b restricted to where a did not move: supports avoid each other far below chance.
    avoid = derive(base, a, b * (a == 0))["pairs"][0]
    assert avoid["overlap_ratio"] == 0.0


def _orthogonal_base(m: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    w = (u[:, :r] * spectrum) @ v[:, :r].T
    return w.float(), u.float(), v.float()


def test_off_principal_update_has_zero_top_k_energy_and_principal_one_has_all_of_it():
    m, n, k = 40, 30, 4
    w, u, v = _orthogonal_base(m, n, torch.linspace(10, 1, 30, dtype=torch.float64))
    off = torch.outer(u[:, -1], v[:, -1])  # lives in the least significant directions
    on = torch.outer(u[:, 0], v[:, 1])  # inside the top-4 subspace on both sides
    left_only = torch.outer(u[:, 2], v[:, -1])  # principal output direction, off-principal input
    out = derive(w, w + off, w + on, w + left_only, top_k=k)["models"]
    assert out["a"]["principal_energy"] == pytest.approx(0.0, abs=1e-6)
    assert out["a"]["principal_energy_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert out["b"]["principal_energy"] == pytest.approx(1.0, abs=1e-5)
    assert out["c"]["principal_energy_left"] == pytest.approx(1.0, abs=1e-5)
    assert out["c"]["principal_energy_right"] == pytest.approx(0.0, abs=1e-5)
    assert out["c"]["principal_energy"] == pytest.approx(0.0, abs=1e-5)
    assert out["a"]["principal_energy_chance"] == pytest.approx(k * k / (m * n))
    assert out["a"]["principal_energy_left_chance"] == pytest.approx(k / m)


def test_random_update_sits_at_the_random_subspace_expectation():
    m, n, k = 200, 150, 10
    w, _, _ = _orthogonal_base(m, n, torch.linspace(20, 1, 150, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    out = derive(w, w + torch.randn(m, n, generator=g), top_k=k)["models"]["a"]
    assert out["principal_energy_left"] == pytest.approx(k / m, rel=0.15)
    assert out["principal_energy_ratio"] == pytest.approx(1.0, rel=0.35)


def test_randomized_svd_finds_the_same_top_subspace_as_the_exact_one():
    m, n, k = 300, 240, 8
    gap = torch.cat(
        [torch.linspace(50, 30, k, dtype=torch.float64), torch.linspace(3, 0.1, n - k, dtype=torch.float64)]
    )
    w, u, v = _orthogonal_base(m, n, gap, seed=1)
    u_low, v_low = top_singular_vectors(w, k, "lowrank", name="x")
    u_ex, v_ex = top_singular_vectors(w, k, "exact")
    # Same subspaces: the projectors agree.
    assert torch.allclose(u_low @ u_low.T, u_ex @ u_ex.T, atol=1e-4)
    assert torch.allclose(v_low @ v_low.T, v_ex @ v_ex.T, atol=1e-4)
    delta = torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, -1], v[:, -1])
    assert derive(w, w + delta, top_k=k, svd="lowrank")["models"]["a"]["principal_energy"] == pytest.approx(
        0.5, abs=1e-4
    )
    # A slowly decaying (power-law) spectrum, no gap: the metric still matches the exact SVD's.
    w, u, v = _orthogonal_base(m, n, torch.arange(1, n + 1, dtype=torch.float64) ** -0.5, seed=2)
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(m, n, generator=g) * 0.1 + torch.outer(u[:, 0], v[:, 0])
    exact, low = (derive(w, w + delta, top_k=16, svd=mode)["models"]["a"] for mode in ("exact", "lowrank"))
    for key in ("principal_energy", "principal_energy_left", "principal_energy_right"):
        assert low[key] == pytest.approx(exact[key], rel=0.02), key


def test_aggregated_stats_equal_the_stats_of_the_concatenated_vectors():
    g = torch.Generator().manual_seed(5)
    bases = [torch.randn(300, generator=g) for _ in range(3)]
    models = [
        [b + (torch.rand(300, generator=g) < p) * torch.randn(300, generator=g) for p in (0.2, 0.5)] for b in bases
    ]
    total = GeometryStats(2)
    for base, ms in zip(bases, models, strict=True):
        total.add(tensor_stats(base, ms, eps=1e-5, top_k=0))
    whole = tensor_stats(torch.cat(bases), [torch.cat([ms[i] for ms in models]) for i in range(2)], eps=1e-5, top_k=0)
    got, want = total.derive(LABELS), whole.derive(LABELS)
    for key, value in want["pairs"][0].items():
        if key not in ("a", "b", "jaccard_chance", "overlap_ratio"):  # chance is per tensor (next test)
            assert got["pairs"][0][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    for label in LABELS:
        for key, value in want["models"][label].items():
            if value is None:  # spectral metrics (top_k=0)
                assert got["models"][label][key] is None, key
            else:
                assert got["models"][label][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_aggregate_chance_keeps_each_tensors_density_so_independent_layers_read_as_chance():
    # Layer 1: a dense, b sparse; layer 2 the other way round. Supports are independent within each layer, but
    # pooled densities would predict more overlap than independence gives (the model would look "avoiding").
    g = torch.Generator().manual_seed(8)
    n = 200_000
    total = GeometryStats(2)
    for pa, pb in ((0.6, 0.05), (0.05, 0.6)):
        base = torch.zeros(n)
        a = (torch.rand(n, generator=g) < pa) * torch.randn(n, generator=g)
        b = (torch.rand(n, generator=g) < pb) * torch.randn(n, generator=g)
        total.add(tensor_stats(base, [a, b], eps=1e-5, top_k=0))
    pair = total.derive(LABELS)["pairs"][0]
    assert pair["overlap_ratio"] == pytest.approx(1.0, abs=0.03)
    pooled = 0.325 * 0.325 / (0.65 - 0.325 * 0.325)  # what one density per model would predict
    assert pair["jaccard"] < 0.8 * pooled


def test_chunked_processing_matches_one_pass_and_leaves_the_inputs_untouched():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(37, 23, generator=g)
    models = [base + (torch.rand(37, 23, generator=g) < p) * torch.randn(37, 23, generator=g) for p in (0.3, 0.6)]
    copies = [base.clone(), *(m.clone() for m in models)]
    one = tensor_stats(base, models, eps=1e-5, top_k=3, chunk_elems=10**9).derive(LABELS)
    rows = tensor_stats(base, models, eps=1e-5, top_k=3, chunk_elems=50).derive(LABELS)  # 2 rows per chunk
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *models], strict=True))
    numeric = lambda d: {k: v for k, v in d.items() if not isinstance(v, str)}  # noqa: E731
    assert numeric(rows["pairs"][0]) == pytest.approx(numeric(one["pairs"][0]), rel=1e-5)
    for label in LABELS:
        assert rows["models"][label] == pytest.approx(one["models"][label], rel=1e-5)


def test_layer_and_module_names_are_parsed():
    assert layer_of("model.layers.17.mlp.down_proj.weight") == 17
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("model.embed_tokens.weight") is None
    assert module_of("model.layers.0.self_attn.q_proj.weight") == "q_proj"
    assert module_of("model.layers.0.self_attn.q_proj.bias") == "q_proj.bias"
    assert module_of("model.layers.0.input_layernorm.weight") == "input_layernorm"
    assert module_of("lm_head.weight") == "lm_head"


# ---------------------------------------------------------------- JS divergence


def test_js_divergence_matches_hand_computations_in_bits():
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = ½·½·ln(4/3) + ½·ln(4/3) = ¾ ln(4/3) nats.
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.tensor([[0.0, -math.inf]])
    assert float(js_divergence(p, q)[0]) == pytest.approx(0.75 * math.log2(4 / 3), rel=1e-9)
    assert float(js_divergence(q, p)[0]) == pytest.approx(0.75 * math.log2(4 / 3), rel=1e-9)  # symmetric
    # Disjoint distributions: exactly 1 bit; identical ones: 0.
    assert float(js_divergence(torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, 0.0]]))[0]) == 1.0
    logits = torch.randn(4, 50)
    assert torch.all(js_divergence(logits, logits) < 1e-12)
    # A generic case against an independent numpy computation.
    rng = np.random.default_rng(0)
    pa, qa = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(7))
    ma = (pa + qa) / 2
    want = 0.5 * np.sum(pa * np.log2(pa / ma)) + 0.5 * np.sum(qa * np.log2(qa / ma))
    got = float(js_divergence(torch.tensor(np.log(pa))[None], torch.tensor(np.log(qa))[None])[0])
    assert got == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- prompt files


def test_prompt_files_jsonl_and_plain_text(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1", "answer": 2}\n\n{"prompt": "two\\nlines"}\n')
    assert read_prompts(f) == ["1+1", "two\nlines"]
    t = tmp_path / "p.txt"
    t.write_text("first prompt\n\n  second {not json}\n")
    assert read_prompts(t) == ["first prompt", "  second {not json}"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.jsonl", "", "no prompts"),
        ("blank.txt", "\n  \n", "no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl:2: invalid JSON"),
        ("field.jsonl", '{"question": "x"}\n', r"field\.jsonl:1: expected an object with a non-empty string field"),
    ],
)
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, text, message):
    from sarmerge.errors import SarmergeError

    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(SarmergeError, match=message):
        read_prompts(f)


# ---------------------------------------------------------------- end to end on real tiny checkpoints


def _perturb(src: Path, dst: Path, seed: int, fraction: float = 0.2, only: str | None = None) -> Path:
    """Copy checkpoint `src` to `dst` with a sparse random update on `fraction` of every (or the `only`) tensor."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if only is None or only in name:
            moved = torch.rand(t.shape, generator=g) < fraction
            tensors[name] = (t.float() + moved * torch.randn(t.shape, generator=g) * 0.05).to(t.dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    model, tok = tiny_model(0)
    save_checkpoint(model, tok, root / "base", dtype=torch.bfloat16)
    _perturb(root / "base", root / "math", seed=1)
    _perturb(root / "base", root / "code", seed=2)
    # An "RL" model that differs only in its output head, strongly enough to change some predictions.
    _perturb(root / "base", root / "rl", seed=3, fraction=0.5, only="lm_head")
    other, tok2 = tiny_model(0, hidden=32, intermediate=64)
    save_checkpoint(other, tok2, root / "other_shape", dtype=torch.bfloat16)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["12+7", "3*4", "abc"]))
    return root


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 300 and height >= 200, (path, width, height)
    assert len(data) > 10_000, path  # a real figure, not an empty canvas


def _assert_self_contained_page(page: Path, plots: list[str]) -> str:
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(plots)
    if page.suffix == ".html":
        assert not re.search(r'src="(?!data:)', text)  # nothing loaded from outside the page
    return text


@pytest.fixture(scope="module")
def geometry(family, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("geo") / "report"
    rep = geometry_report(family / "base", [family / "math", family / "code"], out, top_k=4, progress=False)
    return out, rep


def test_geometry_report_matches_a_direct_whole_model_computation(family, geometry):
    out, rep = geometry
    saved = json.loads((out / "report.json").read_text())
    assert saved["model"] == rep["model"]
    base = load_file(family / "base" / "model.safetensors")
    taus = {
        m: {n: t.float() - base[n].float() for n, t in load_file(family / m / "model.safetensors").items()}
        for m in ("math", "code")
    }
    flat = {m: torch.cat([t.reshape(-1) for t in taus[m].values()]) for m in taus}
    sparsity = float((flat["math"].abs() <= 1e-5).double().mean())
    assert rep["model"]["models"]["math"]["sparsity"] == pytest.approx(sparsity, abs=1e-9)
    assert 0.78 < sparsity < 0.85  # 20 % of entries were perturbed (a few round away in bf16)
    cos = float(torch.nn.functional.cosine_similarity(flat["math"], flat["code"], dim=0))
    pair = rep["model"]["pairs"][0]
    assert pair["cosine"] == pytest.approx(cos, abs=1e-5)
    assert pair["overlap_ratio"] == pytest.approx(1.0, abs=0.1)  # independent supports
    # Per layer: layer 1 computed directly from its tensors.
    layer1 = [n for n in base if ".layers.1." in n]
    l1 = torch.cat([taus["code"][n].reshape(-1) for n in layer1])
    assert rep["layers"]["1"]["models"]["code"]["sparsity"] == pytest.approx(float((l1.abs() <= 1e-5).double().mean()))
    assert list(rep["layers"]) == ["0", "1", "non-layer"]
    assert {t["name"] for t in rep["tensors"]} == set(base)


def test_geometry_report_writes_readable_plots_and_self_contained_pages(geometry):
    out, rep = geometry
    plots = [p["file"] for p in rep["plots"]]
    assert set(plots) == {
        "geometry_layers_models.png",
        "geometry_layers_pairs.png",
        "geometry_pair_matrices.png",
        "geometry_sparsity_hist.png",
        "geometry_module_sparsity.png",
    }
    for name in plots:
        _assert_png(out / name)
    html = _assert_self_contained_page(out / "report.html", plots)
    assert "At a glance" in html and "math vs code" in html
    _assert_self_contained_page(out / "report.md", plots)
    assert not list(out.parent.glob(".report.partial-*"))


def test_identical_model_reports_full_sparsity_and_undefined_cosine(family, tmp_path):
    rep = geometry_report(
        family / "base",
        [family / "base", family / "math"],
        tmp_path / "g",
        top_k=0,
        names=["same", "math"],
        progress=False,
    )
    assert rep["model"]["models"]["same"]["sparsity"] == 1.0
    assert rep["model"]["models"]["same"]["norm"] == 0.0
    assert rep["model"]["pairs"][0]["cosine"] is None
    assert rep["model"]["models"]["math"]["principal_energy"] is None  # top-k 0: spectral metric skipped
    assert (tmp_path / "g" / "report.html").exists()


@pytest.fixture(scope="module")
def tokens(family, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tok") / "report"
    rep = token_report(family / "base", family / "rl", family / "prompts.jsonl", out, max_new_tokens=12, progress=False)
    return out, rep


def test_token_report_positions_buckets_and_pages(family, tokens):
    out, rep = tokens
    s = rep["summary"]
    lines = [json.loads(x) for x in (out / "positions.jsonl").read_text().splitlines()]
    assert s["responses"] == 3 == len(lines)
    assert s["positions"] == sum(len(x["js"]) for x in lines) == sum(r["tokens"] for r in rep["per_response"])
    assert sum(b["positions"] for b in rep["position_buckets"].values()) == s["positions"]
    assert sum(b["share_of_large"] for b in rep["position_buckets"].values()) == pytest.approx(1.0)
    js = np.concatenate([x["js"] for x in lines])
    assert s["near_zero_share"] == pytest.approx(float(np.mean(js <= 1e-3)))
    assert s["js_max"] > 1e-3  # the perturbed head moves some predictions
    assert 0 <= s["rl_top_in_base_topk_share"] <= 1
    for line in lines:
        assert len(line["js"]) == len(line["dlogp"]) == len(line["tokens"]) == len(line["in_topk"])
    plots = [p["file"] for p in rep["plots"]]
    assert len(plots) == 4
    for name in plots:
        _assert_png(out / name)
    _assert_self_contained_page(out / "report.html", plots)
    _assert_self_contained_page(out / "report.md", plots)


def test_token_scores_match_a_direct_forward_pass(family, tokens):
    from transformers import AutoModelForCausalLM

    out, _ = tokens
    first = json.loads((out / "positions.jsonl").read_text().splitlines()[0])
    tok = load_tokenizer(family / "rl")
    prompt = _encode(tok, first["prompt"], chat_template=True)
    assert tok.decode(prompt).endswith("=")  # the tiny tokenizer's chat template appends "="
    ids = torch.tensor([prompt + first["token_ids"]])
    models = [AutoModelForCausalLM.from_pretrained(family / m, dtype=torch.float32) for m in ("rl", "base")]
    with torch.no_grad():
        rl_logits, base_logits = (m(input_ids=ids).logits[0, len(prompt) - 1 : -1] for m in models)
    # Greedy decoding: every chosen token is the RL model's argmax.
    assert rl_logits.argmax(-1).tolist() == first["token_ids"]
    want = js_divergence(rl_logits, base_logits).numpy()
    assert np.allclose(first["js"], want, atol=1e-6)
    chosen = torch.tensor(first["token_ids"])[:, None]
    dlogp = (rl_logits.log_softmax(-1).gather(-1, chosen) - base_logits.log_softmax(-1).gather(-1, chosen))[:, 0]
    assert np.allclose(first["dlogp"], dlogp.numpy(), atol=1e-5)


def test_same_model_as_base_has_only_near_zero_positions(family, tmp_path):
    rep = token_report(
        family / "base", family / "base", family / "prompts.jsonl", tmp_path / "t", max_new_tokens=6, progress=False
    )
    s = rep["summary"]
    assert s["near_zero_share"] == 1.0
    assert s["js_max"] < 1e-9
    assert s["rl_top_equals_base_top_share"] == 1.0
    assert abs(s["dlogp_mean"]) < 1e-9


def test_sampled_responses_are_reproducible_for_a_seed(family, tmp_path):
    kw = {"max_new_tokens": 8, "sample": True, "seed": 11, "progress": False}
    a = token_report(family / "base", family / "rl", family / "prompts.jsonl", tmp_path / "a", **kw)
    b = token_report(family / "base", family / "rl", family / "prompts.jsonl", tmp_path / "b", **kw)
    assert [r["response"] for r in a["per_response"]] == [r["response"] for r in b["per_response"]]
    assert a["summary"] == b["summary"]


def test_combined_page_via_cli_embeds_both_reports(geometry, tokens, tmp_path, capsys):
    page = tmp_path / "analysis.html"
    assert (
        main(["analyze", "report", "--geometry", str(geometry[0]), "--tokens", str(tokens[0]), "--out", str(page)]) == 0
    )
    text = _assert_self_contained_page(page, [p["file"] for p in geometry[1]["plots"] + tokens[1]["plots"]])
    assert "Update geometry" in text and "Token-level divergence" in text
    assert render_report(tmp_path / "both", geometry=geometry[0]) == [
        tmp_path / "both" / "report.html",
        tmp_path / "both" / "report.md",
    ]


# ---------------------------------------------------------------- CLI and bad inputs


def test_cli_geometry_prints_a_summary(family, tmp_path, capsys):
    out = tmp_path / "g"
    code = main(
        [
            "analyze",
            "geometry",
            "--base",
            str(family / "base"),
            "--models",
            str(family / "math"),
            str(family / "code"),
            "--out",
            str(out),
            "--top-k",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"math: sparsity \d+\.\d%", printed)
    assert "math vs code: overlap" in printed
    assert json.loads((out / "report.json").read_text())["settings"]["top_k"] == 2


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_mismatched_models_fail_clearly_and_write_nothing(family, tmp_path, capsys):
    out = tmp_path / "g"
    err = _cli_error(
        [
            "analyze",
            "geometry",
            "--base",
            str(family / "base"),
            "--models",
            str(family / "math"),
            str(family / "other_shape"),
            "--out",
            str(out),
            "--no-progress",
        ],
        capsys,
    )
    assert "other_shape" in err and "shape" in err
    assert not out.exists() and not list(tmp_path.glob(".g.partial-*"))
    err = _cli_error(
        [
            "analyze",
            "tokens",
            "--base",
            str(family / "base"),
            "--model",
            str(family / "other_shape"),
            "--prompts",
            str(family / "prompts.jsonl"),
            "--out",
            str(tmp_path / "t"),
            "--no-progress",
        ],
        capsys,
    )
    assert "other_shape" in err and "shape" in err


def test_missing_model_and_existing_output_fail_clearly(family, tmp_path, capsys):
    err = _cli_error(
        [
            "analyze",
            "geometry",
            "--base",
            str(family / "base"),
            "--models",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "g"),
        ],
        capsys,
    )
    assert "nope: no such checkpoint" in err
    (tmp_path / "exists").mkdir()
    err = _cli_error(
        [
            "analyze",
            "geometry",
            "--base",
            str(family / "base"),
            "--models",
            str(family / "math"),
            "--out",
            str(tmp_path / "exists"),
        ],
        capsys,
    )
    assert "already exists" in err


def test_empty_prompt_file_fails_clearly(family, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "t"
    err = _cli_error(
        [
            "analyze",
            "tokens",
            "--base",
            str(family / "base"),
            "--model",
            str(family / "rl"),
            "--prompts",
            str(empty),
            "--out",
            str(out),
            "--no-progress",
        ],
        capsys,
    )
    assert "empty.jsonl: no prompts" in err
    assert not out.exists()


def test_out_of_range_options_fail_clearly(family, tmp_path, capsys):
    err = _cli_error(
        [
            "analyze",
            "geometry",
            "--base",
            str(family / "base"),
            "--models",
            str(family / "math"),
            "--out",
            str(tmp_path / "g"),
            "--eps",
            "-1",
        ],
        capsys,
    )
    assert "--eps" in err
    err = _cli_error(
        [
            "analyze",
            "tokens",
            "--base",
            str(family / "base"),
            "--model",
            str(family / "rl"),
            "--prompts",
            str(family / "prompts.jsonl"),
            "--out",
            str(tmp_path / "t"),
            "--top-p",
            "0",
        ],
        capsys,
    )
    assert "--top-p" in err
    err = _cli_error(["analyze", "report", "--out", str(tmp_path / "r.html")], capsys)
    assert "nothing to render" in err
