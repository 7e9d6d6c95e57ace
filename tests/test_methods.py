"""Every merge method against an independent dense reference written here, plus the SAR properties of SPEC §4.6."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sarmerge.methods import TensorGroup, all_methods, get_method
from sarmerge.methods._ops import topk_mask

SHAPES = [(7,), (5, 9), (4, 3, 6)]


def family(shape, n=3, seed=0, sparsity=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        moved = torch.rand(shape, generator=g) > sparsity
        models.append(base + moved * torch.randn(shape, generator=g) * 0.1)
    return base.to(dtype).float(), [m.to(dtype).float() for m in models]


def group(base, models, weights=None, densities=None, fishers=None, seed=0, name="t"):
    """Methods may work in place on their inputs (as the engine allows), so each group gets its own copies."""
    n = len(models)
    return TensorGroup(
        name=name,
        base=None if base is None else base.clone(),
        models=[m.clone() for m in models],
        weights=weights or [1.0] * n,
        densities=densities or [None] * n,
        fishers=fishers or [None] * n,
        generator=torch.Generator().manual_seed(seed),
    )


def run(method, g, **params):
    m = get_method(method)
    return m.fn(g, m.params.model_validate(params))


# ---- independent references: flat Python loops over entries --------------------------------------------------------


def ref_topk(x, k):
    """k largest |x|, ties to the lowest index (stable sort)."""
    flat = x.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
    keep = set(order[:k])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat)]).reshape(x.shape)


def ref_ties(base, models, weights, density, lam):
    k = base.numel() if density >= 1 else max(1, int(density * base.numel()))  # SPEC §4.8: max(1, ⌊density·n⌋)
    taus = [ref_topk(m - base, k).flatten() for m in models]
    out = []
    for j in range(base.numel()):
        s = sum(w * t[j].item() for w, t in zip(weights, taus))
        gamma = 1.0 if s >= 0 else -1.0
        num = den = 0.0
        for w, t in zip(weights, taus):
            v = w * t[j].item()
            if v != 0 and math.copysign(1, v) == gamma:
                num, den = num + v, den + w
        out.append(num / den if den else 0.0)
    return base + lam * torch.tensor(out).reshape(base.shape)


def ref_ram(base, models, eps, boost_r=None, weights=None):
    taus = [w * (m - base).flatten() for w, m in zip(weights or [1.0] * len(models), models)]
    n = base.numel()
    movers = [[abs(t[j].item()) > eps for j in range(n)] for t in taus]
    count = [sum(movers[t][j] for t in range(len(taus))) for j in range(n)]
    boosts = [1.0] * len(taus)
    if boost_r is not None:
        for t in range(len(taus)):
            uniq = sum(1 for j in range(n) if movers[t][j] and count[j] == 1)
            over = sum(1 for j in range(n) if movers[t][j] and count[j] >= 2)
            rho = over / uniq if uniq else 0.0
            boosts[t] = 1 + (boost_r - 1) * min(1.0, rho)
    out = []
    for j in range(n):
        if count[j] == 1:
            t = next(t for t in range(len(taus)) if movers[t][j])
            out.append(taus[t][j].item() * boosts[t])
        elif count[j] >= 2:
            out.append(sum(taus[t][j].item() for t in range(len(taus)) if movers[t][j]) / count[j])
        else:
            out.append(0.0)
    return base + torch.tensor(out).reshape(base.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
class TestAgainstReference:
    def test_linear(self, shape, dtype):
        _, models = family(shape, dtype=dtype)
        w = [0.5, 1.0, 2.5]
        expect = sum(wi * m for wi, m in zip(w, models)) / sum(w)
        torch.testing.assert_close(run("linear", group(None, models, w)), expect)

    def test_task_arithmetic(self, shape, dtype):
        base, models = family(shape, dtype=dtype)
        w = [0.3, 1.0, 0.7]
        expect = base + 0.8 * sum(wi * (m - base) for wi, m in zip(w, models))
        torch.testing.assert_close(run("task_arithmetic", group(base, models, w), **{"lambda": 0.8}), expect)

    def test_ties(self, shape, dtype):
        base, models = family(shape, dtype=dtype)
        w = [1.0, 0.5, 2.0]
        got = run("ties", group(base, models, w), density=0.4, **{"lambda": 1.2})
        torch.testing.assert_close(got, ref_ties(base, models, w, 0.4, 1.2))

    def test_ram(self, shape, dtype):
        base, models = family(shape, dtype=dtype)
        torch.testing.assert_close(run("ram", group(base, models)), ref_ram(base, models, 1e-5))
        if dtype == torch.float32:  # weighted τ_t enter the support test and the average (dtype-independent)
            w = [1.0, 0.5, 2.0]
            torch.testing.assert_close(run("ram", group(base, models, w)), ref_ram(base, models, 1e-5, weights=w))

    def test_ram_plus(self, shape, dtype):
        base, models = family(shape, dtype=dtype)
        torch.testing.assert_close(run("ram_plus", group(base, models), r=1.7), ref_ram(base, models, 1e-5, 1.7))
        if dtype == torch.float32:
            w = [2.0, 1.0, 0.25]
            torch.testing.assert_close(run("ram_plus", group(base, models, w), r=1.7),
                                       ref_ram(base, models, 1e-5, 1.7, weights=w))

    def test_fisher(self, shape, dtype):
        _, models = family(shape, dtype=dtype)
        g = torch.Generator().manual_seed(9)
        fishers = [torch.rand(shape, generator=g) for _ in models]
        fishers[0].flatten()[0] = 0.0  # floored, not a division by zero
        w = [1.0, 2.0, 0.5]
        num = sum(wi * f.clamp(min=1e-6) * m for wi, f, m in zip(w, fishers, models))
        den = sum(wi * f.clamp(min=1e-6) for wi, f in zip(w, fishers))
        torch.testing.assert_close(run("fisher", group(None, models, w, fishers=fishers)), num / den)

    def test_model_stock(self, shape, dtype):
        base, models = family(shape, dtype=dtype)
        rows = lambda x: x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)  # noqa: E731
        b, ms = rows(base), [rows(m) for m in models]
        out = torch.empty_like(b)
        for r in range(b.shape[0]):
            taus = [m[r] - b[r] for m in ms]
            cos = [
                torch.dot(taus[i], taus[j]) / (taus[i].norm() * taus[j].norm())
                for i in range(3)
                for j in range(i + 1, 3)
            ]
            c = sum(cos) / len(cos)
            t = 3 * c / (1 + 2 * c)
            out[r] = t * sum(m[r] for m in ms) / 3 + (1 - t) * b[r]
        torch.testing.assert_close(run("model_stock", group(base, models)), out.reshape(base.shape))

    def test_slerp(self, shape, dtype):
        base, models = family(shape, dtype=dtype, sparsity=0.0)
        a, b = base, models[0] * 1.5 + 0.3  # not collinear
        # one angle for the whole tensor seen as a vector (mergekit 0.1.5), not one per row
        fa, fb = a.flatten().double(), b.flatten().double()
        omega = torch.acos((fa / fa.norm()).dot(fb / fb.norm()).clamp(-1, 1))
        expect = (torch.sin(0.3 * omega) * fb + torch.sin(0.7 * omega) * fa) / torch.sin(omega)
        got = run("slerp", group(a, [b]), t=0.3)
        torch.testing.assert_close(got, expect.float().reshape(a.shape), rtol=1e-4, atol=1e-5)


def test_slerp_endpoints_and_collinear_fallback():
    base, models = family((6, 8))
    torch.testing.assert_close(run("slerp", group(base, [models[0]]), t=0.0), base)
    torch.testing.assert_close(run("slerp", group(base, [models[0]]), t=1.0), models[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run("slerp", group(base, [2 * base]), t=0.5), 1.5 * base)  # collinear → lerp


def test_slerp_is_one_interpolation_per_whole_tensor_not_per_row():
    """Two rows at very different angles: a per-row slerp would give each row its own angle; mergekit (and we)
    interpolate the tensor as one vector, which is a plain rescaled mix of the rows by the same two coefficients."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # row 0 at 90°, row 1 identical
    got = run("slerp", group(a, [b]), t=0.5)
    fa, fb = a.flatten(), b.flatten()
    omega = torch.acos(fa.dot(fb) / (fa.norm() * fb.norm()))  # 60° for the whole tensor
    coef = torch.sin(0.5 * omega) / torch.sin(omega)
    torch.testing.assert_close(got, coef * (a + b))
    assert not torch.allclose(got[1], b[1])  # a per-row slerp would return row 1 unchanged


def test_top_k_keeps_at_least_one_entry():
    """SPEC §4.8: top-k keeps max(1, ⌊density·n⌋): a 64-entry bias at density 0.01 keeps its largest entry."""
    base = torch.zeros(64)
    tau = torch.linspace(0.1, 1.0, 64)
    got = run("ties", group(base, [base + tau]), density=0.01)
    assert int((got != 0).sum()) == 1 and got[63] == tau[63]


def test_dare_is_seeded_unbiased_and_matches_definition():
    base, models = family((64, 64), n=2, sparsity=0.0)
    g1 = run("dare_linear", group(base, models, seed=3), density=0.3)
    g2 = run("dare_linear", group(base, models, seed=3), density=0.3)
    g3 = run("dare_linear", group(base, models, seed=4), density=0.3)
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)
    # Definition: each τ entry is either dropped or scaled by exactly 1/density.
    gen = torch.Generator().manual_seed(3)
    expect = base.clone()
    for m in models:
        keep = torch.rand(base.shape, generator=gen) < 0.3
        expect += (m - base) * keep / 0.3
    torch.testing.assert_close(g1, expect)
    # Unbiased: over many seeds the mean update approaches task arithmetic (seeded, 5 % relative margin).
    mean = sum(run("dare_linear", group(base, models, seed=s), density=0.3) for s in range(200)) / 200
    ta = base + sum(m - base for m in models)
    assert (mean - ta).norm() / (ta - base).norm() < 0.15


def test_dare_ties_uses_sign_election_on_dropped_vectors():
    base, models = family((10, 10))
    got = run("dare_ties", group(base, models, seed=1), density=0.6)
    gen = torch.Generator().manual_seed(1)
    dropped = [(m - base) * (torch.rand(base.shape, generator=gen) < 0.6) / 0.6 for m in models]
    # TIES reference on the dropped vectors with density 1.
    expect = ref_ties(base, [base + d for d in dropped], [1.0] * 3, 1.0, 1.0)
    torch.testing.assert_close(got, expect)


def test_breadcrumbs_masks_outliers_and_small_entries():
    base = torch.zeros(100)
    tau = torch.arange(1, 101, dtype=torch.float32)  # |τ| ranks are the values themselves
    got = run("breadcrumbs", group(base, [base + tau]), density=0.5, gamma=0.1) - base
    expect = torch.where((tau > 40) & (tau <= 90), tau, torch.zeros_like(tau))  # drop top 10, keep next 50
    torch.testing.assert_close(got, expect)


def test_della_keep_rate_and_rescale():
    base, models = family((200, 50), n=1, sparsity=0.0)
    got = run("della_linear", group(base, models, seed=0), density=0.4, epsilon=0.1) - base
    tau = models[0] - base
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.02  # seeded; expected keep rate = density
    # Larger magnitudes are kept more often (probability rises with rank).
    big = tau.abs() > tau.abs().median()
    # Expected keep rates: 0.45 for the upper half of ranks, 0.35 for the lower half.
    assert kept[big].float().mean() > kept[~big].float().mean() + 0.06
    # Survivors are scaled by 1/p with p in [0.3, 0.5].
    ratio = got[kept] / tau[kept]
    assert ratio.min() >= 1 / 0.5 - 1e-4 and ratio.max() <= 1 / 0.3 + 1e-4


def test_topk_mask_exact_count_with_ties():
    x = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, 0.0])
    m = topk_mask(x, 2)
    assert m.tolist() == [False, True, True, False, False, False]  # ties go to the lowest index
    assert int(topk_mask(torch.ones(1000), 377).sum()) == 377


# ---- SAR properties (SPEC §4.6) ------------------------------------------------------------------------------------

SAR_VARIANTS = [
    {"arbitration": a, "sensitivity": s, "rescale": r}
    for a in ("hard", "fisher_avg", "hybrid")
    for s in ("fisher_delta2", "fisher", "delta2")
    for r in ("norm", "none", "ram_plus", "dare")
]


def fishers_for(models, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(models[0].shape, generator=g) for _ in models]


@pytest.mark.parametrize("params", SAR_VARIANTS, ids=lambda p: "-".join(p.values()))
def test_sar_one_model_gives_that_model(params):
    base, models = family((6, 7), n=1)
    got = run("sar", group(base, models[:1], fishers=fishers_for(models[:1])), **params)
    torch.testing.assert_close(got, models[0])


@pytest.mark.parametrize("params", SAR_VARIANTS, ids=lambda p: "-".join(p.values()))
def test_sar_identical_models_give_that_model(params):
    base, models = family((6, 7), n=1)
    same = [models[0].clone() for _ in range(3)]
    if params["rescale"] == "ram_plus":
        params = {**params, "r": 1.0}  # no unique entries anyway; the boost is a no-op
    got = run("sar", group(base, same, fishers=fishers_for(same)), **params)
    torch.testing.assert_close(got, models[0])


@pytest.mark.parametrize("arbitration", ["hard", "fisher_avg", "hybrid"])
def test_sar_disjoint_supports_density_one_is_sum_of_updates(arbitration):
    base = torch.randn(12, 10)
    owner = torch.randint(0, 4, base.shape, generator=torch.Generator().manual_seed(1))  # 3 = nobody moved
    models = [base + (owner == t) * (0.05 + torch.rand(base.shape)) for t in range(3)]
    got = run("sar", group(base, models, fishers=fishers_for(models)), arbitration=arbitration, density=1.0)
    torch.testing.assert_close(got, base + sum(m - base for m in models))


def test_sar_equal_fisher_fisher_avg_is_ram_overlap_average():
    base, models = family((20, 20), sparsity=0.4)
    equal = [torch.full(base.shape, 0.7) for _ in models]
    got = run("sar", group(base, models, fishers=equal), arbitration="fisher_avg", rescale="none")
    torch.testing.assert_close(got, ref_ram(base, models, 1e-5))


def test_sar_hard_arbitration_keeps_the_most_sensitive_mover():
    base = torch.zeros(3)
    a, b = base + torch.tensor([1.0, 1.0, 0.0]), base + torch.tensor([-2.0, 0.0, 0.0])
    fa, fb = torch.tensor([10.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    # Entry 0: s_a = 10·1 = 10 > s_b = 1·4 → a wins. Entry 1: only a moved → kept.
    got = run("sar", group(base, [a, b], fishers=[fa, fb]), rescale="none")
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0]))
    got = run("sar", group(base, [a, b], fishers=[fa, fb]), sensitivity="delta2", rescale="none")
    torch.testing.assert_close(got, torch.tensor([-2.0, 1.0, 0.0]))


def test_sar_hybrid_averages_agreeing_signs_and_picks_on_conflict():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([3.0, -3.0])
    fa, fb = torch.tensor([3.0, 100.0]), torch.tensor([1.0, 1.0])
    got = run("sar", group(base, [a, b], fishers=[fa, fb]), arbitration="hybrid", rescale="none")
    # Entry 0 agrees: (3·1 + 1·3)/(3+1) = 1.5. Entry 1 conflicts: s_a = 100 > s_b = 9 → a's update 1.
    torch.testing.assert_close(got, torch.tensor([1.5, 1.0]))


def test_sar_sparsification_keeps_top_density_within_support_and_rescales_norm():
    base, models = family((30, 30), n=2, sparsity=0.7)
    f = fishers_for(models)
    full = run("sar", group(base, models, fishers=f), rescale="none") - base
    support = full != 0
    sparse = run("sar", group(base, models, fishers=f), density=0.25, rescale="none") - base
    assert int((sparse != 0).sum()) == int(0.25 * int(support.sum()))
    assert ((sparse != 0) <= support).all()
    kept_min = sparse[sparse != 0].abs().min()
    assert (full[support & (sparse == 0)].abs() <= kept_min).all()  # the largest were kept
    normed = run("sar", group(base, models, fishers=f), density=0.25, rescale="norm") - base
    torch.testing.assert_close(normed.norm(), full.norm())
    dare = run("sar", group(base, models, fishers=f), density=0.25, rescale="dare") - base
    torch.testing.assert_close(dare, sparse / 0.25)


def test_every_registered_method_runs_and_is_deterministic():
    base, models = family((8, 8), n=2)
    f = fishers_for(models)
    for name, m in all_methods().items():
        ms = models[:1] if m.max_models == 1 else models
        g1 = group(base, ms, fishers=f[: len(ms)], seed=11)
        g2 = group(base, ms, fishers=f[: len(ms)], seed=11)
        p = m.params()
        out1, out2 = m.fn(g1, p), m.fn(g2, p)
        assert out1.shape == base.shape and torch.isfinite(out1).all(), name
        assert torch.equal(out1, out2), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 0.013, 0.2, 0.5, 0.999, 1.0])
def test_streamed_topk_over_row_chunks_equals_the_whole_tensor_mask(dtype, density):
    """Radix select over row chunks (two histogram passes, then the mask with ties in flat order) == topk_mask."""
    from sarmerge.methods._ops import radix_high, radix_low, streamed_topk_mask

    g = torch.Generator().manual_seed(3)
    # few distinct magnitudes (bf16-like updates), zeros and both signs: many ties at every threshold
    x = (torch.randint(-6, 7, (97, 31), generator=g).to(dtype) * 2.0**-9) * (torch.rand(97, 31, generator=g) < 0.7)
    k = int(density * x.numel())
    for rows in (1, 7, 40, 97):
        chunks = list(torch.split(x, rows))
        high = sum(radix_high(c) for c in chunks)
        low = sum(radix_low(c, high, k) for c in chunks)
        taken = torch.zeros(1, dtype=torch.int64)
        mask = torch.cat([streamed_topk_mask(c, high, low, k, taken) for c in chunks])
        assert torch.equal(mask, topk_mask(x, k)), (rows, density)
        assert int(mask.sum()) == k


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.3, 2.0]])
def test_blocked_sign_election_is_bitwise_the_textbook_ties_mean(monkeypatch, weights):
    """The cache-blocked election (blocks of CPU_BLOCK entries over the flattened tensors) gives the bits of
    Σ_{t: sgn(w_t τ_t) = γ} w_t τ_t / Σ_{t: agree} w_t, for non-contiguous inputs and blocks that end mid-row."""
    from sarmerge.methods import _ops

    monkeypatch.setattr(_ops, "CPU_BLOCK", 37)
    g = torch.Generator().manual_seed(5)
    deltas = [((torch.randint(-4, 5, (23, 19), generator=g) * 2.0**-8) * (torch.rand(23, 19, generator=g) < 0.6)).t()
              for _ in weights]
    deltas[1][:, :3] = -0.0
    total = sum(w * d for w, d in zip(weights, deltas, strict=True))
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [torch.sign(w * d) == sign for w, d in zip(weights, deltas, strict=True)]
    num = sum(torch.where(a, w * d, 0.0) for a, w, d in zip(agree, weights, deltas, strict=True))
    den = sum(a.float() * w for a, w in zip(agree, weights, strict=True))
    want = num / torch.where(den != 0, den, torch.ones_like(den))
    got = _ops.sign_consensus_merge(deltas, weights)
    assert got.shape == deltas[0].shape
    assert torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32))


BLOCKED_CASES = {
    "ram": ("ram", {}),
    "ram_plus": ("ram_plus", {}),
    "sar": ("sar", {}),
    "sar-hybrid-norm": ("sar", {"arbitration": "hybrid", "rescale": "norm"}),
    "sar-fisher_avg-dare": ("sar", {"arbitration": "fisher_avg", "rescale": "dare", "sensitivity": "fisher"}),
    "sar-delta2": ("sar", {"sensitivity": "delta2"}),
}


@pytest.mark.parametrize("case", sorted(BLOCKED_CASES))
def test_cache_blocked_elementwise_merges_are_bitwise_the_whole_tensor_merge(monkeypatch, case):
    """Blocks that end mid-row (and a transposed, non-contiguous τ) give the same bits as one block over the whole
    tensor, for the merged values and for RAM+'s support counts; SAR also with a model that has no Fisher."""
    from sarmerge.methods import _ops

    method, params = BLOCKED_CASES[case]
    g = torch.Generator().manual_seed(9)
    base = torch.randn(29, 31, generator=g)
    models = [base + torch.randn(29, 31, generator=g) * (torch.rand(29, 31, generator=g) < 0.4) * 1e-2
              for _ in range(3)]
    models[2] = models[2].t().contiguous().t()  # same values, column-major strides
    weights = [0.7, 1.3, -0.4]
    fishers = [torch.rand(29, 31, generator=g), None, torch.rand(29, 31, generator=g)] if method == "sar" else None
    whole = run(method, group(base, models, weights=weights, fishers=fishers), **params)
    monkeypatch.setattr(_ops, "CPU_BLOCK", 37)
    blocked = run(method, group(base, models, weights=weights, fishers=fishers), **params)
    assert torch.equal(blocked.view(torch.int32), whole.view(torch.int32))
    assert not torch.equal(whole, base)  # the merge moved something


# ---- the method protocol (#16) and the mergekit dialect (SPEC §4.8) --------------------------------------------------


def test_method_protocol_declares_fisher_use_and_chunking():
    sar, ties, fisher = get_method("sar"), get_method("ties"), get_method("fisher")
    assert sar.needs_fisher(sar.params()) and fisher.needs_fisher(fisher.params())
    assert not sar.needs_fisher(sar.params(sensitivity="delta2", arbitration="hard"))
    assert not ties.needs_fisher(ties.params())  # fisher="none": no schema can ask for one
    assert sar.chunking_for(sar.params(density=0.5)) == "tensor"
    assert sar.chunking_for(sar.params()) == "multi_pass"
    assert ties.chunking_for(ties.params()) == "multi_pass"
    assert ties.chunking_for(ties.params(semantics="mergekit")) == "tensor"  # mergekit's kernels: whole tensors


def mergekit_cfg(**kw):
    from sarmerge.config import parse_config

    return parse_config(kw, source="mk.yaml")


def test_a_mergekit_yaml_becomes_a_mergekit_semantics_config():
    cfg = mergekit_cfg(
        merge_method="ties", base_model="/m/base", dtype="bfloat16",
        models=[{"model": "/m/base"}, {"model": "/m/a", "parameters": {"weight": 0.5, "density": 0.3}},
                {"model": "/m/b", "parameters": {"weight": 0.8}}],
        parameters={"density": 0.7, "int8_mask": True},
    )
    assert cfg.method == "ties" and cfg.base_model == "/m/base"
    assert [(e.model, e.weight, e.density) for e in cfg.models] == [("/m/a", 0.5, 0.3), ("/m/b", 0.8, 0.7)]
    p = cfg.method_params()
    assert p.semantics == "mergekit" and p.normalize is True and p.rescale is False  # mergekit's ties defaults
    assert (cfg.dtype, cfg.out_dtype) == ("bfloat16", "bfloat16")  # mergekit writes what it computed in
    ram = mergekit_cfg(merge_method="ramplus_tl", base_model="/m/base", models=[{"model": "/m/a"}],
                       out_dtype="float16", tokenizer_source="/m/a")
    p = ram.method_params()
    assert ram.method == "ram_plus" and (p.r, p.alpha) == (0.1, 0.2) and ram.out_dtype == "float16"
    assert ram.tokenizer == "/m/a"
    # dare_ties/breadcrumbs_ties default normalize: false there
    assert mergekit_cfg(merge_method="dare_ties", base_model="/b", models=[{"model": "/a"}]).method_params().normalize \
        is False


def test_mergekit_linear_averages_the_base_and_dtype_defaults_to_the_stored_one(tmp_path):
    from sarmerge.checkpoint import DTYPE_CODES, ShardedWriter

    writer = ShardedWriter(tmp_path, [("w", (2, 2), DTYPE_CODES[torch.bfloat16])], 1 << 20)
    writer.write("w", torch.ones(2, 2, dtype=torch.bfloat16))
    writer.close()
    # no dtype: mergekit computes in (and writes) the stored dtype
    cfg = mergekit_cfg(merge_method="linear", base_model=str(tmp_path), parameters={"weight": 0.5},
                       models=[{"model": "/m/a", "parameters": {"weight": 2.0}}])
    assert [(e.model, e.weight) for e in cfg.models] == [("/m/a", 2.0), (str(tmp_path), 0.5)]
    assert (cfg.dtype, cfg.out_dtype) == ("bfloat16", None)


def test_mergekit_filters_become_per_tensor_overrides():
    cfg = mergekit_cfg(merge_method="slerp", base_model="/b", models=[{"model": "/b"}, {"model": "/a"}],
                       parameters={"t": [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}]})
    assert cfg.params_for("model.layers.0.self_attn.q_proj.weight").t == 0.2
    assert cfg.params_for("model.layers.0.mlp.up_proj.weight").t == 0.6


@pytest.mark.parametrize(("raw", "message"), [
    ({"merge_method": "slerp", "slices": [{"sources": []}], "base_model": "/b"},
     "slices (layer ranges) are not supported"),
    ({"merge_method": "nuslerp", "models": [{"model": "/a"}]}, "'nuslerp' has no sarmerge counterpart"),
    ({"merge_method": "slerp", "base_model": "/b", "models": [{"model": "/a"}], "parameters": {"t": [0, 0.5, 1]}},
     "gradients"),
    ({"merge_method": "breadcrumbs", "base_model": "/b", "models": [{"model": "/a", "parameters": {"gamma": 0.1}},
                                                                    {"model": "/c", "parameters": {"gamma": 0.2}}]},
     "parameters.gamma: differs between models"),
    ({"merge_method": "ties", "base_model": "/b", "models": [{"model": "/a"}], "tokenizer_source": "union"},
     "union"),
    ({"merge_method": "ties", "base_model": "/b", "models": [{"model": "/a"}], "chat_templat": "x"},
     "unknown field(s) ['chat_templat']"),
    ({"merge_method": "ties", "base_model": "/b", "models": [{"model": "/a+/lora"}]}, "LoRA"),
    ({"merge_method": "ties", "base_model": "/b", "models": [{"model": "/b"}]}, "lists only the base model"),
    ({"merge_method": "ties", "base_model": "/b", "models": [{"model": "/a"}], "dtype": "int4"}, "dtype: 'int4'"),
])
def test_unsupported_mergekit_configs_fail_with_one_clear_error(raw, message):
    from sarmerge.errors import SarmergeError

    with pytest.raises(SarmergeError, match="mk.yaml: mergekit config: .*" + re.escape(message)):
        mergekit_cfg(**raw)


def test_mergekit_only_parameters_are_refused_in_a_sarmerge_config():
    from sarmerge.config import parse_config
    from sarmerge.errors import SarmergeError

    with pytest.raises(SarmergeError, match="normalize: only meaningful with semantics: mergekit"):
        parse_config({"method": "ties", "base_model": "/b", "models": [{"model": "/a"}],
                      "parameters": {"normalize": False}})
    with pytest.raises(SarmergeError, match="r must be ≥ 1"):
        parse_config({"method": "ram_plus", "base_model": "/b", "models": [{"model": "/a"}],
                      "parameters": {"r": 0.1}})


def test_ramplus_tl_semantics_boost_and_ignore_weights():
    """mergekit's ramplus_tl: unique updates × (1 + r·clamp(shared_t/unique_t, 0, α)), weights ignored."""
    base = torch.zeros(12)
    a = torch.zeros(12)
    a[:10] = 1.0  # 10 unique + entry 9 shared below
    b = torch.zeros(12)
    b[9:12] = 2.0  # entry 9 shared, 10 and 11 unique
    got = run("ram_plus", group(base, [a, b], weights=[3.0, 5.0]), semantics="mergekit")
    boost_a = 1 + 0.1 * min(0.2, 1 / 9)  # a: 9 unique, 1 shared
    boost_b = 1 + 0.1 * min(0.2, 1 / 2)  # b: 2 unique, 1 shared → clamped at α
    expect = torch.tensor([boost_a] * 9 + [1.5] + [2 * boost_b] * 2)
    torch.testing.assert_close(got, expect)
    ram = run("ram", group(base, [a, b], weights=[3.0, 5.0]), semantics="mergekit")
    torch.testing.assert_close(ram, torch.tensor([1.0] * 9 + [1.5, 2.0, 2.0]))


def test_model_stock_mergekit_default_is_one_t_per_tensor():
    base, models = family((6, 5), n=3, sparsity=0.0)
    per_tensor = run("model_stock", group(base, models), semantics="mergekit")
    per_row = run("model_stock", group(base, models), semantics="mergekit", filter_wise=True)
    taus = [(m - base).flatten() for m in models]
    cos = sum(torch.dot(taus[i], taus[j]) / (taus[i].norm() * taus[j].norm())
              for i in range(3) for j in range(i + 1, 3)) / 3
    t = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(per_tensor, t * sum(models) / 3 + (1 - t) * base)
    torch.testing.assert_close(per_row, run("model_stock", group(base, models)), rtol=1e-5, atol=1e-6)


def test_methods_command_says_where_each_method_differs_from_mergekit(capsys):
    from sarmerge.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.count("vs mergekit:") == len(all_methods())
    assert "ramplus_tl: boost 1 + r·clamp" in out and "no mergekit counterpart" in out
