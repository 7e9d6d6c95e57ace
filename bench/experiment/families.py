"""The RLVR families the experiment runs on: reading, building (via the zoo) and their Fisher stores."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.experiment.design import ROOT
from sarmerge.errors import SarmergeError

__all__ = [
    "Family",
    "Specialist",
    "build_family",
    "compute_fishers",
    "family_overrides",
    "read_family",
]



@dataclass
class Specialist:
    label: str
    path: Path
    task: str
    domain: str
    seed: int


@dataclass
class Family:
    seed: int
    root: Path
    base: Path
    specialists: dict[str, Specialist]
    calibration: dict[str, Path]
    meta: dict[str, Any] = field(default_factory=dict)

    def by_domain(self) -> dict[str, list[Specialist]]:
        out: dict[str, list[Specialist]] = {}
        for s in sorted(self.specialists.values(), key=lambda s: (s.domain, s.seed, s.label)):
            out.setdefault(s.domain, []).append(s)
        return out

    def settings(self) -> dict[str, list[Specialist]]:
        """fusion: the first specialist of every domain; enhance_<d>: the first two seeds of domain d."""
        groups = self.by_domain()
        out = {"fusion": [g[0] for g in groups.values()]} if len(groups) >= 2 else {}
        for d, g in groups.items():
            if len(g) >= 2:
                out[f"enhance_{d}"] = g[:2]
        return out

    def domain_tasks(self) -> dict[str, str]:
        return {d: g[0].task for d, g in self.by_domain().items()}


def read_family(root: Path, seed: int) -> Family:
    """Read DIR/family.json as written by `sarmerge zoo tiny` (`sarmerge.zoo.family`; paths relative to DIR)."""
    from sarmerge.zoo.family import load_family

    meta = load_family(root)
    where = root / "family.json"
    try:
        base = root / meta["base"]["path"]
        specialists = {m["name"]: Specialist(label=m["name"], path=root / m["path"], task=m["task"],
                                             domain=m["domain"], seed=int(m["seed"])) for m in meta["members"]}
        calibration = {d: root / p for d, p in meta["calibration"].items()}
    except (KeyError, TypeError) as e:
        raise SarmergeError(f"{where}: unexpected family description (missing {e})") from e
    fam = Family(seed=seed, root=root, base=base, specialists=specialists, calibration=calibration, meta=meta)
    for d in fam.by_domain():
        if d not in calibration:
            raise SarmergeError(f"{where}: no calibration file for domain {d!r}")
    if "fusion" not in fam.settings():
        raise SarmergeError(f"{where}: fusion needs specialists of at least two domains")
    return fam


def family_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """`TinyFamilyConfig` keyword overrides from plain JSON (nested `sft` / `grpo` dicts become their configs)."""
    from sarmerge.zoo.train import GRPOConfig, SFTConfig

    out = dict(spec)
    if isinstance(out.get("sft"), dict):
        out["sft"] = SFTConfig(**out["sft"])
    if isinstance(out.get("grpo"), dict):
        out["grpo"] = GRPOConfig(**out["grpo"])
    if isinstance(out.get("tasks"), list):
        out["tasks"] = tuple(out["tasks"])
    return out


def build_family(root: Path, seed: int, *, overrides: dict[str, Any], rebuild: bool, progress: bool
                 ) -> tuple[Family, float | None, str]:
    """The tiny zoo family of `seed` in `root`: reused when `root` holds one built with the same configuration (the
    stamp ROOT.build.json records it and the zoo code it was built with), else built (or copied from the zoo's own
    cache). Returns the family, the seconds spent building (None when reused) and the zoo code fingerprint.

    Reuse goes by configuration, not by the zoo's code hash, so edits to the zoo that do not change the weights
    (logging, device plumbing) do not force a rebuild; the report states every family's zoo code fingerprint, and
    `--rebuild` starts afresh.
    """
    from sarmerge.zoo.family import TinyFamilyConfig, build_tiny_family, code_fingerprint

    kwargs = family_overrides(overrides)
    config = json.loads(json.dumps(dataclasses.replace(TinyFamilyConfig(), **kwargs, seed=seed).as_dict()))
    stamp = root.with_name(root.name + ".build.json")
    if not rebuild and (root / "family.json").exists() and stamp.exists():
        recorded = json.loads(stamp.read_text())
        if recorded.get("config") == config:
            return read_family(root, seed), None, recorded["zoo_code"]
    code = code_fingerprint()
    t0 = time.perf_counter()
    build_tiny_family(root, seed=seed, overwrite=True, progress=progress, **kwargs)
    stamp.write_text(json.dumps({"config": config, "zoo_code": code, "git_revision": _git_revision()}) + "\n")
    return read_family(root, seed), time.perf_counter() - t0, code


def compute_fishers(fam: Family, store: Path, *, examples: int, progress: bool) -> dict[str, dict[str, Path]]:
    """`sarmerge fisher` per specialist on its own domain's calibration data: layout -> path.

    Cached under `store/<family key>/`: the key hashes the family's code and configuration, so a rebuilt family
    never meets the Fisher of an older one.
    """
    from sarmerge.fisher import run_fisher
    from sarmerge.zoo.tasks import get_task

    out: dict[str, dict[str, Path]] = {}
    for label, s in fam.specialists.items():
        out[label] = {}
        for layout in ("support", "dense"):
            path = store / str(fam.meta.get("key", f"seed{fam.seed}")) / f"{label}-{layout}-{examples}"
            if not (path / "fisher_manifest.json").exists():
                run_fisher(s.path, fam.calibration[s.domain], path, mode="sampled", examples=examples,
                           support_of=fam.base if layout == "support" else None,
                           max_new_tokens=get_task(s.task).max_answer_chars + 2, seed=fam.seed, overwrite=True,
                           progress=progress)
            out[label][layout] = path
    return out


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
