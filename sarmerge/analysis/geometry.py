"""Update geometry of checkpoints that share a base: how sparse, overlapping and orthogonal their task vectors are.

Streams tensor by tensor (one tensor of every model in memory at a time, plus one prefetched group), so memory stays
flat in model size. Every metric is derived from additive sufficient statistics (counts, squared norms, dot products,
projected energies), so per-layer and whole-model values are exact aggregates, not averages of per-tensor ratios.

Definitions (τ_i = θ_i − θ₀ in fp32; S_i = {j : |τ_i[j]| > ε}; p_i = |S_i| / n):

- sparsity_i = 1 − p_i, the share of weights the update leaves (numerically) unchanged.
- jaccard(a, b) = |S_a ∩ S_b| / |S_a ∪ S_b|; jaccard_chance = p_a p_b / (p_a + p_b − p_a p_b), the Jaccard of
  independent, uniformly placed supports of the same densities; overlap_ratio = jaccard / jaccard_chance (1 = chance,
  < 1 = the updates avoid each other, > 1 = they crowd onto the same weights). For a layer or the whole model the
  chance level keeps each tensor's own densities: Σ_t n_t p_a,t p_b,t / Σ_t n_t (p_a,t + p_b,t − p_a,t p_b,t), so
  layers of different sparsity do not masquerade as avoidance.
- cosine(a, b) = ⟨τ_a, τ_b⟩ / (‖τ_a‖ ‖τ_b‖).
- sign_conflict(a, b): share of S_a ∩ S_b where sign(τ_a) ≠ sign(τ_b).
- orth_energy_share(a, b) = 1 − cosine², the share of ‖τ_b‖² orthogonal to τ_a (the residual of projecting τ_b on
  τ_a); symmetric.
- unshared_energy_a(a, b): share of ‖τ_a‖² on coordinates outside S_b (what a coordinate-wise merge keeps from a
  untouched); unshared_energy_b likewise.
- principal_energy_i (2-D weights only): with W₀ ≈ U Σ Vᵀ and U_k, V_k its top-k singular vectors,
  ‖U_kᵀ τ_i V_k‖²_F / ‖τ_i‖²_F, the share of the update's energy inside the top-k singular subspace of the base
  matrix (both sides). An isotropic random update has expectation principal_energy_chance = k² / (m n);
  principal_energy_ratio = principal / chance (< 1: off-principal). One-sided variants: principal_energy_left
  ‖U_kᵀ τ‖² / ‖τ‖² (chance k / m) and principal_energy_right ‖τ V_k‖² / ‖τ‖² (chance k / n). Aggregates weight each
  matrix by ‖τ‖², chance included.
- norm_i = ‖τ_i‖₂; rel_norm_i = ‖τ_i‖₂ / ‖θ₀‖₂.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from sarmerge import __version__
from sarmerge.checkpoint import FLOAT_CODES, Checkpoint
from sarmerge.errors import SarmergeError

log = logging.getLogger(__name__)

SvdMode = Literal["auto", "exact", "lowrank"]
# Exact SVD below this many columns/rows (min side); randomized above it, where exact LAPACK SVD gets slow.
EXACT_SVD_MAX_SIDE = 512
LOWRANK_NITER = 4
# Entries per processing chunk: small enough for cache-friendly fp32 temporaries, and < 2^24 so fp32 counts are exact.
CHUNK_ELEMS = 1 << 20
# log10|τ| histogram of non-zero update entries (whole model), to show where ε sits in the magnitude distribution.
MAG_BINS = np.linspace(-10.0, 1.0, 111)
MAG_SAMPLE = 8
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
NON_LAYER = "non-layer"


def layer_of(name: str) -> int | None:
    """Transformer block index parsed from a tensor name (`model.layers.7.mlp.up_proj.weight` → 7), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """Short module kind for display: `model.layers.7.self_attn.q_proj.weight` → `q_proj` (biases keep `.bias`)."""
    m = _LAYER_RE.search(name)
    rest = name[m.end() :] if m else name.removeprefix("model.")
    rest = rest.removesuffix(".weight")
    for prefix in ("self_attn.", "mlp.", "attn.", "attention."):
        rest = rest.removeprefix(prefix)
    return rest


@dataclass
class GeometryStats:
    """Additive sufficient statistics for N task vectors over a set of tensors."""

    n_models: int
    numel: int = 0
    tensors: int = 0
    base_sq: float = 0.0
    support: np.ndarray = field(default=None)  # (N,) |S_i|
    sq: np.ndarray = field(default=None)  # (N,) ‖τ_i‖²
    dot: np.ndarray = field(default=None)  # (N, N) ⟨τ_i, τ_j⟩
    inter: np.ndarray = field(default=None)  # (N, N) |S_i ∩ S_j|
    conflict: np.ndarray = field(default=None)  # (N, N) sign conflicts on S_i ∩ S_j
    chance_inter: np.ndarray = field(default=None)  # (N, N) Σ over tensors of |S_i| |S_j| / n (independent placement)
    outside: np.ndarray = field(default=None)  # (N, N) [i, j] = Σ τ_j² over coordinates outside S_i
    mat_sq: np.ndarray = field(default=None)  # (N,) ‖τ_i‖² over the matrices with a spectral measurement
    proj2: np.ndarray = field(default=None)  # (N,) ‖U_kᵀ τ V_k‖²
    proj_left: np.ndarray = field(default=None)
    proj_right: np.ndarray = field(default=None)
    chance2: np.ndarray = field(default=None)  # (N,) Σ chance · ‖τ‖² (energy-weighted expectation)
    chance_left: np.ndarray = field(default=None)
    chance_right: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        n = self.n_models
        for name in (
            "support",
            "sq",
            "mat_sq",
            "proj2",
            "proj_left",
            "proj_right",
            "chance2",
            "chance_left",
            "chance_right",
        ):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(n))
        for name in ("dot", "inter", "conflict", "outside", "chance_inter"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros((n, n)))

    def add(self, other: GeometryStats) -> None:
        self.numel += other.numel
        self.tensors += other.tensors
        self.base_sq += other.base_sq
        for name in (
            "support",
            "sq",
            "dot",
            "inter",
            "conflict",
            "outside",
            "chance_inter",
            "mat_sq",
            "proj2",
            "proj_left",
            "proj_right",
            "chance2",
            "chance_left",
            "chance_right",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def derive(self, labels: list[str]) -> dict[str, Any]:
        """Turn the sums into the documented metrics (None where undefined, e.g. an empty overlap)."""
        n = max(self.numel, 1)
        p = self.support / n
        models = {}
        for i, label in enumerate(labels):
            principal = _ratio(self.proj2[i], self.mat_sq[i])
            chance = _ratio(self.chance2[i], self.mat_sq[i])
            models[label] = {
                "sparsity": _clean(1.0 - p[i]),
                "density": _clean(p[i]),
                "support": int(self.support[i]),
                "norm": _clean(math.sqrt(self.sq[i])),
                "rel_norm": _ratio(math.sqrt(self.sq[i]), math.sqrt(self.base_sq)),
                "principal_energy": principal,
                "principal_energy_chance": chance,
                "principal_energy_ratio": _ratio(principal, chance),
                "principal_energy_left": _ratio(self.proj_left[i], self.mat_sq[i]),
                "principal_energy_left_chance": _ratio(self.chance_left[i], self.mat_sq[i]),
                "principal_energy_right": _ratio(self.proj_right[i], self.mat_sq[i]),
                "principal_energy_right_chance": _ratio(self.chance_right[i], self.mat_sq[i]),
            }
        pairs = []
        for a in range(self.n_models):
            for b in range(a + 1, self.n_models):
                inter = self.inter[a, b]
                union = self.support[a] + self.support[b] - inter
                jaccard = _ratio(inter, union)
                chance_inter = self.chance_inter[a, b]
                chance = _ratio(chance_inter, self.support[a] + self.support[b] - chance_inter)
                cosine = _ratio(self.dot[a, b], math.sqrt(self.sq[a] * self.sq[b]))
                pairs.append(
                    {
                        "a": labels[a],
                        "b": labels[b],
                        "intersection": int(inter),
                        "jaccard": jaccard,
                        "jaccard_chance": chance,
                        "overlap_ratio": _ratio(jaccard, chance),
                        "cosine": cosine,
                        "sign_conflict": _ratio(self.conflict[a, b], inter),
                        "orth_energy_share": None if cosine is None else _clean(1.0 - min(cosine * cosine, 1.0)),
                        "unshared_energy_a": _ratio(self.outside[b, a], self.sq[a]),
                        "unshared_energy_b": _ratio(self.outside[a, b], self.sq[b]),
                    }
                )
        return {
            "numel": self.numel,
            "tensors": self.tensors,
            "base_norm": _clean(math.sqrt(self.base_sq)),
            "models": models,
            "pairs": pairs,
        }


def _clean(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return _clean(num / den)


def _seed_for(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def top_singular_vectors(
    w: torch.Tensor, k: int, mode: SvdMode = "auto", *, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """U_k (m×k), V_k (n×k) of the top-k singular subspaces of `w`; randomized (seeded by `name`) for large ones."""
    m, n = w.shape
    k = min(k, m, n)
    if mode == "exact" or (mode == "auto" and min(m, n) <= EXACT_SVD_MAX_SIDE):
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k], vh[:k].T
    q = min(m, n, 2 * k + 8)  # oversampling makes the top-k subspace accurate when the spectrum decays slowly
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(name))
        u, _, v = torch.svd_lowrank(w, q=q, niter=LOWRANK_NITER)
    return u[:, :k], v[:, :k]


def tensor_stats(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    eps: float,
    top_k: int,
    svd: SvdMode = "auto",
    name: str = "",
    mag_hist: np.ndarray | None = None,
    chunk_elems: int = CHUNK_ELEMS,
) -> GeometryStats:
    """Sufficient statistics of one tensor's task vectors (see the module doc for what each becomes).

    Works through the tensor in chunks of whole rows (about `chunk_elems` entries), so the fp32 temporaries stay small
    and cache-friendly whatever the tensor size. Counts come from dot products of ±1/0 sign vectors, which are exact
    in fp32 per chunk (< 2^24 entries) and summed as Python numbers across chunks.
    `mag_hist` (N × len(MAG_BINS)), if given, accumulates the log10|τ| histogram of non-zero entries (estimated from a
    1-in-MAG_SAMPLE sample in large chunks); its last column counts exact zeros (exactly).
    """
    n_models = len(models)
    st = GeometryStats(n_models, numel=base.numel(), tensors=1)
    if base.numel() == 0:
        return st
    spectral = top_k > 0 and base.dim() == 2 and min(base.shape) >= 2
    rows, cols = (base.shape[0], base.shape[1]) if base.dim() == 2 else (1, base.numel())
    if spectral:
        k = min(top_k, rows, cols)
        u, v = top_singular_vectors(base.to(torch.float32), k, svd, name=name)
        left = [torch.zeros(k, cols) for _ in range(n_models)]  # U_kᵀ τ, accumulated over row chunks
    base2 = base.reshape(rows, cols)
    models2 = [m.reshape(rows, cols) for m in models]
    step = max(1, min(rows, chunk_elems // max(cols, 1)))
    for r0 in range(0, rows, step):
        b = base2[r0 : r0 + step].to(torch.float32)
        st.base_sq += float(torch.dot(b.reshape(-1), b.reshape(-1)))
        taus, signs, supports, squares = [], [], [], []
        for i, m in enumerate(models2):
            t = m[r0 : r0 + step].to(torch.float32) - b  # out of place: fp32 inputs must not be modified
            flat = t.reshape(-1)
            moved = flat.abs() > eps
            sign = torch.sign(flat).mul_(moved)  # ±1 on the support S_i, 0 elsewhere
            support = moved.to(torch.float32)
            sq = flat * flat
            st.support[i] += int(torch.count_nonzero(moved))
            st.sq[i] += float(torch.dot(flat, flat))
            if mag_hist is not None:
                zeros = flat.numel() - int(torch.count_nonzero(flat))
                # The magnitude histogram only feeds a plot: a systematic 1-in-MAG_SAMPLE sample of large chunks
                # (rescaled) keeps its shape and saves most of the cost of log10 over every entry.
                stride = MAG_SAMPLE if flat.numel() >= 64 * MAG_SAMPLE else 1
                sample = flat[::stride]
                logs = torch.log10(sample.abs()).clamp_(MAG_BINS[0], MAG_BINS[-1])  # zeros land in bin 0 ...
                hist = torch.histc(logs, bins=len(MAG_BINS) - 1, min=MAG_BINS[0], max=MAG_BINS[-1]).numpy()
                hist[0] -= sample.numel() - int(torch.count_nonzero(sample))  # ... and are taken out again here
                mag_hist[i, :-1] += hist * (flat.numel() / sample.numel())
                mag_hist[i, -1] += zeros
            if spectral:
                left[i] += u[r0 : r0 + step].T @ t
                st.proj_right[i] += float((t @ v).square().sum())
            taus.append(flat)
            signs.append(sign)
            supports.append(support)
            squares.append(sq)
        for i in range(n_models):
            for j in range(n_models):
                if i == j:
                    continue
                # Energy of τ_j on coordinates model i moved; the rest of ‖τ_j‖² is outside S_i.
                st.outside[i, j] += float(torch.dot(supports[i], squares[j]))
                if j > i:
                    inter = float(torch.dot(supports[i], supports[j]))
                    agree_minus_conflict = float(torch.dot(signs[i], signs[j]))
                    st.inter[i, j] += inter
                    st.conflict[i, j] += (inter - agree_minus_conflict) / 2
                    st.dot[i, j] += float(torch.dot(taus[i], taus[j]))
    for i in range(n_models):
        st.dot[i, i] = st.sq[i]
        st.inter[i, i] = st.support[i]
        for j in range(n_models):
            st.chance_inter[i, j] = st.support[i] * st.support[j] / st.numel
        for j in range(n_models):
            if j != i:
                st.outside[i, j] = max(st.sq[j] - st.outside[i, j], 0.0)
            if j > i:
                st.inter[j, i], st.conflict[j, i], st.dot[j, i] = st.inter[i, j], st.conflict[i, j], st.dot[i, j]
        if spectral:
            st.mat_sq[i] = st.sq[i]
            st.proj_left[i] = float(left[i].square().sum())
            st.proj2[i] = float((left[i] @ v).square().sum())
            st.chance2[i] = st.sq[i] * k * k / (rows * cols)
            st.chance_left[i] = st.sq[i] * k / rows
            st.chance_right[i] = st.sq[i] * k / cols
    return st


def _labels(models: list[str | Path], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(models):
            raise SarmergeError(f"--names: got {len(names)} name(s) for {len(models)} model(s)")
        labels = list(names)
    else:
        labels = [Path(m).name or str(m) for m in models]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def open_family(
    base: str | Path, models: list[str | Path], *, allow_pickle: bool = False
) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open base + models and cross-check them as the merge engine does (names, shapes, dtypes, vocab)."""
    from sarmerge.merge import open_checkpoints

    if not models:
        raise SarmergeError("analysis needs at least one model besides the base")
    inputs = open_checkpoints(base, models, allow_pickle=allow_pickle)
    assert inputs.base is not None
    return inputs.base, inputs.models


def analyze_geometry(
    base: str | Path,
    models: list[str | Path],
    *,
    names: list[str] | None = None,
    eps: float = 1e-5,
    top_k: int = 16,
    svd: SvdMode = "auto",
    threads: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the geometry report (a JSON-ready dict) without writing anything."""
    if eps < 0:
        raise SarmergeError(f"--eps must be >= 0, got {eps}")
    if top_k < 0:
        raise SarmergeError(f"--top-k must be >= 0, got {top_k}")
    if svd not in ("auto", "exact", "lowrank"):
        raise SarmergeError(f"--svd must be auto, exact or lowrank, got {svd!r}")
    if threads:
        torch.set_num_threads(threads)
    labels = _labels(models, names)
    t0 = time.perf_counter()
    base_ckpt, model_ckpts = open_family(base, models, allow_pickle=allow_pickle)
    n_models = len(model_ckpts)
    names_all = [n for n in base_ckpt.names if base_ckpt.tensors[n].dtype in FLOAT_CODES]
    skipped = [n for n in base_ckpt.names if base_ckpt.tensors[n].dtype not in FLOAT_CODES]
    total = GeometryStats(n_models)
    by_layer: dict[str, GeometryStats] = {}
    by_module: dict[str, GeometryStats] = {}
    mag_hist = np.zeros((n_models, len(MAG_BINS)))
    per_tensor = []

    def load(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return base_ckpt.read(name), [c.read(name) for c in model_ckpts]

    try:
        bar = tqdm(
            total=sum(base_ckpt.tensors[n].nbytes for n in names_all) * (n_models + 1),
            unit="B",
            unit_scale=True,
            desc="analyze geometry",
            disable=not progress,
        )
        with ThreadPoolExecutor(1) as loader:
            nxt = loader.submit(load, names_all[0]) if names_all else None
            for idx, name in enumerate(names_all):
                b, ms = nxt.result()
                nxt = loader.submit(load, names_all[idx + 1]) if idx + 1 < len(names_all) else None
                st = tensor_stats(b, ms, eps=eps, top_k=top_k, svd=svd, name=name, mag_hist=mag_hist)
                del b, ms
                layer = layer_of(name)
                layer_key = str(layer) if layer is not None else NON_LAYER
                module = module_of(name)
                total.add(st)
                by_layer.setdefault(layer_key, GeometryStats(n_models)).add(st)
                by_module.setdefault(module, GeometryStats(n_models)).add(st)
                per_tensor.append(
                    {
                        "name": name,
                        "layer": layer,
                        "module": module,
                        "shape": list(base_ckpt.tensors[name].shape),
                        **st.derive(labels),
                    }
                )
                bar.update(base_ckpt.tensors[name].nbytes * (n_models + 1))
        bar.close()
    finally:
        base_ckpt.close()
        for c in model_ckpts:
            c.close()

    def layer_sort(key: str) -> tuple[int, int]:
        return (1, 0) if key == NON_LAYER else (0, int(key))

    return {
        "kind": "geometry",
        "sarmerge_version": __version__,
        "base": str(base),
        "models": {label: str(m) for label, m in zip(labels, models, strict=True)},
        "labels": labels,
        "settings": {
            "eps": eps,
            "top_k": top_k,
            "svd": svd,
            "exact_svd_max_side": EXACT_SVD_MAX_SIDE,
            "lowrank_niter": LOWRANK_NITER,
        },
        "skipped_non_float": skipped,
        "model": total.derive(labels),
        "layers": {k: by_layer[k].derive(labels) for k in sorted(by_layer, key=layer_sort)},
        "modules": {k: v.derive(labels) for k, v in by_module.items()},
        "tensors": per_tensor,
        "magnitude_histogram": {
            "log10_bin_edges": MAG_BINS.tolist(),
            "counts": {label: mag_hist[i, :-1].tolist() for i, label in enumerate(labels)},
            "exact_zeros": {label: int(mag_hist[i, -1]) for i, label in enumerate(labels)},
        },
        "timings_s": {"total": round(time.perf_counter() - t0, 3)},
    }


def geometry_report(
    base: str | Path,
    models: list[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Analyze, then write `out/` atomically: report.json, PNG plots, report.html and report.md; returns the report.

    `kwargs` go to `analyze_geometry` (names, eps, top_k, svd, threads, allow_pickle, progress).
    """
    import json
    from dataclasses import asdict

    from sarmerge.analysis.plots import geometry_plots
    from sarmerge.analysis.report import render_report
    from sarmerge.checkpoint import atomic_output_dir

    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        report = analyze_geometry(base, models, **kwargs)
        report["plots"] = [asdict(p) for p in geometry_plots(report, tmp)]
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        render_report(tmp, geometry={**report, "_dir": str(tmp)}, title="sarmerge update geometry")
    log.info("geometry report for %d model(s) written to %s", len(models), out)
    return report
