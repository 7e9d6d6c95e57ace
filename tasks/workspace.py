"""Per-job DVC workspaces: each merge job is its own git + DVC repository, so concurrent DAG runs never meet on one
DVC lock (DVC fails at once on a busy repo, SPEC §12).

Layout of `<pipeline root>/workspaces/<job id>/`:

    dvc.yaml          the repo's stages (fisher, merge, evaluate, evaluate_inputs, analyze), copied verbatim
    params.yaml       the pipeline params plus this job's `job:` section
    job.json          registry identities of the base and parents, family, DAG runs that touched it
    inputs/           base/, one folder per parent, calib_<domain>.jsonl (tracked with `dvc add`)
    out/              stage outputs: fisher/<parent>, merged/<method>, eval/..., analysis
    tmp/              scratch (resume state, logs); ignored by git and DVC

The DAG's steps run the exact commands of the `dvc.yaml` stages (`python -m tasks.<step> --workspace .`), in parallel
where Airflow maps them; `commit` then records every stage in `dvc.lock` (`dvc commit`, one DVC call per job), pushes
the data to the DVC remote and the workspace to the lineage git repository under `jobs/<job id>`. Cloning that commit
and running `dvc pull` (or `dvc repro`) gives the merged weights back bit for bit.

Nothing committed holds a secret (SPEC §11): the workspace's params.yaml is the pipeline's with credential-like
`containers.env`/`task_env` values replaced and the DVC/lineage URLs stripped of credentials
(tasks.registry.strip_credentials); a URL's credentials live only in untracked repository config — the DVC remote's in
`.dvc/config.local`, the lineage remote's in `.git/config` (remote `lineage`) — and what is recorded (tmp/dvc.json,
then MLflow tags and descriptions) is the stripped URL.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sarmerge.errors import SarmergeError
from tasks.common import fault_point, read_json, run, step_main, write_json_atomic
from tasks.containers import is_secret_env
from tasks.params import REPO_ROOT, JobCfg, Params, dump_params, load_params, parse_params
from tasks.registry import strip_credentials

log = logging.getLogger(__name__)
WORKSPACE_STAGES = ("fisher", "merge", "evaluate", "evaluate_inputs", "analyze")
GIT_IDENTITY = ["-c", "user.name=sarmerge pipeline", "-c", "user.email=pipeline@sarmerge.invalid"]
LINEAGE_REMOTE = "lineage"
REDACTED = "<redacted: comes from the worker's environment>"


def dvc(*args: str, cwd: Path, what: str = "dvc") -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, what=what).stdout


def git(*args: str, cwd: Path) -> str:
    return run(["git", *GIT_IDENTITY, *args], cwd=cwd, what="git").stdout.strip()


def workspace_dvc_yaml(source: Path = REPO_ROOT / "dvc.yaml") -> str:
    """The repo's dvc.yaml restricted to the job stages (the repo's own input-building stages are left out)."""
    try:
        spec = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SarmergeError(f"{source}: cannot read the stage definitions: {e}") from e
    stages = {k: v for k, v in (spec.get("stages") or {}).items() if k in WORKSPACE_STAGES}
    missing = [s for s in WORKSPACE_STAGES if s not in stages]
    if missing:
        raise SarmergeError(f"{source}: stages {missing} are missing")
    return yaml.safe_dump({"stages": stages}, sort_keys=False)


def lineage_remote(params: Params) -> str:
    return params.dvc.git_remote or str(params.root / "lineage.git")


def dvc_remote(params: Params) -> str:
    return params.dvc.remote or str(params.root / "dvc-remote")


def committed_params(params: Params) -> Params:
    """The params as committed into a workspace: credentials out (values of credential-like variables, userinfo and
    secret query parameters of URLs)."""
    out = params.model_copy(deep=True)
    c = out.containers
    c.env = {k: REDACTED if is_secret_env(k) else v for k, v in c.env.items()}
    c.task_env = {t: {k: REDACTED if is_secret_env(k) else v for k, v in env.items()} for t, env in c.task_env.items()}
    out.dvc.remote = strip_credentials(out.dvc.remote)
    out.dvc.git_remote = strip_credentials(out.dvc.git_remote)
    return out


def _without(text: str, url: str) -> str:
    """An error message fit to log: a credential-carrying URL in it replaced by its stripped form."""
    return text.replace(url, strip_credentials(url)) if url else text


def _ensure_bare_repo(url: str) -> None:
    if "://" in url or ":" in url.split("/")[0]:
        return  # a real remote: it must exist already
    path = Path(url)
    if not (path / "HEAD").exists():
        path.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "--bare", str(path)], what="git init --bare")


class Workspace:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        self.params = load_params(self.path / "params.yaml")
        if self.params.job is None:
            raise SarmergeError(f"{self.path / 'params.yaml'}: no `job:` section; not a job workspace")
        self.job: JobCfg = self.params.job
        meta_file = self.path / "job.json"
        self.meta: dict[str, Any] = read_json(meta_file) if meta_file.exists() else {}

    # -- creation -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        path = Path(path)
        if not (path / "params.yaml").is_file():
            raise SarmergeError(f"{path}: not a job workspace (no params.yaml)")
        return cls(path)

    @classmethod
    def create(cls, path: Path, params: Params, job: JobCfg, meta: dict[str, Any],
               populate: Callable[[Path], None]) -> Workspace:
        """Build the workspace atomically: a killed creation leaves only a hidden partial folder, cleaned next time."""
        path = Path(path)
        if (path / ".sarmerge-ready").exists():
            return cls(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            job_params = parse_params({**committed_params(params).model_dump(mode="json"),
                                       "job": job.model_dump(mode="json")})
            header = "# Written by tasks/plan.py for one merge job; `dvc repro` here reproduces it.\n"
            (tmp / "params.yaml").write_text(header + dump_params(job_params))
            (tmp / "dvc.yaml").write_text(workspace_dvc_yaml())
            write_json_atomic(tmp / "job.json", meta)
            (tmp / ".gitignore").write_text("/tmp/\n")
            (tmp / "tmp").mkdir()
            populate(tmp / job.inputs)
            git("init", "-q", "-b", "main", cwd=tmp)
            # the lineage URL as given (credentials included) lives in .git/config, which is never pushed
            git("remote", "add", LINEAGE_REMOTE, lineage_remote(params), cwd=tmp)
            dvc("init", "-q", cwd=tmp)
            (tmp / ".dvcignore").write_text("/tmp/\n")
            # a shared cache across workspaces (content-addressed, written atomically), linked not copied
            dvc("config", "cache.dir", str(params.root / "dvc-cache"), cwd=tmp)
            dvc("config", "cache.type", "hardlink,symlink", cwd=tmp)
            dvc("config", "cache.shared", "group", cwd=tmp)
            remote_url = dvc_remote(params)
            dvc("remote", "add", "-d", "-f", "storage", strip_credentials(remote_url), cwd=tmp)
            if strip_credentials(remote_url) != remote_url:  # .dvc/config.local: git-ignored by DVC itself
                try:
                    dvc("remote", "modify", "--local", "storage", "url", remote_url, cwd=tmp)
                except SarmergeError as e:
                    raise SarmergeError(_without(str(e), remote_url)) from None
            dvc("config", "core.analytics", "false", cwd=tmp)
            dvc("add", "-q", job.inputs, cwd=tmp, what="dvc add inputs")
            git("add", "-A", cwd=tmp)
            git("commit", "-q", "-m", f"job {job.id}: inputs", cwd=tmp)
            (tmp / ".sarmerge-ready").write_text("")
            if path.exists():  # a previous creation that never finished its marker
                shutil.rmtree(path)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("workspace %s ready", path)
        return cls(path)

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> Path:
        return self.path / self.job.inputs

    def input_dir(self, name: str) -> Path:
        return self.inputs / name

    @property
    def base_dir(self) -> Path:
        return self.inputs / self.job.base

    def calib(self, domain: str) -> Path:
        return self.inputs / f"calib_{domain}.jsonl"

    @property
    def out(self) -> Path:
        return self.path / self.job.out

    def fisher_dir(self, parent: str) -> Path:
        return self.out / "fisher" / parent

    def merged_dir(self, method: str) -> Path:
        return self.out / "merged" / method

    def eval_dir(self, rel: str) -> Path:
        return self.out / "eval" / rel

    @property
    def analysis_dir(self) -> Path:
        return self.out / "analysis"

    @property
    def tmp(self) -> Path:
        d = self.path / "tmp"
        d.mkdir(exist_ok=True)
        return d

    def write_json(self, name: str, data: Any) -> Path:
        f = self.path / "tmp" / name
        write_json_atomic(f, data)
        return f

    # -- versioning ---------------------------------------------------------------------------------------------
    def commit(self) -> dict[str, str]:
        """Record every stage in dvc.lock, push data and lineage; idempotent (a retry re-checks and re-pushes)."""
        info_file = self.path / "tmp" / "dvc.json"
        dvc("commit", "-f", "-q", cwd=self.path, what="dvc commit")
        fault_point("commit.after_dvc_commit")
        try:
            dvc("push", "-q", cwd=self.path, what="dvc push")
        except SarmergeError as e:
            raise SarmergeError(_without(str(e), self._local_dvc_url())) from None
        git("add", "-A", cwd=self.path)
        if git("status", "--porcelain", cwd=self.path):
            git("commit", "-q", "-m", f"job {self.job.id}: outputs of every stage (dvc.lock)", cwd=self.path)
        rev = git("rev-parse", "HEAD", cwd=self.path)
        remotes = git("remote", cwd=self.path).split()
        # a workspace made before the `lineage` remote existed pushes to the URL of its params
        remote = git("remote", "get-url", LINEAGE_REMOTE, cwd=self.path) if LINEAGE_REMOTE in remotes \
            else lineage_remote(self.params)
        _ensure_bare_repo(remote)
        branch = f"jobs/{self.job.id}"
        # the branch belongs to this job alone; --force lets a retry replace an identical-content earlier commit
        try:
            git("push", "-q", "--force", LINEAGE_REMOTE if LINEAGE_REMOTE in remotes else remote,
                f"HEAD:refs/heads/{branch}", cwd=self.path)
        except SarmergeError as e:
            raise SarmergeError(_without(str(e), remote)) from None
        info = {"repo": strip_credentials(remote), "rev": rev, "branch": branch,
                "remote": strip_credentials(dvc_remote(self.params))}
        write_json_atomic(info_file, info)
        return info

    def _local_dvc_url(self) -> str:
        """The DVC remote URL with credentials (.dvc/config.local), or ''."""
        import configparser

        config = configparser.ConfigParser()
        config.read(self.path / ".dvc" / "config.local")
        return config.get("'remote \"storage\"'", "url", fallback="")

    def dvc_info(self) -> dict[str, str]:
        f = self.path / "tmp" / "dvc.json"
        if not f.exists():
            raise SarmergeError(f"{self.path}: not committed yet (run `python -m tasks.workspace commit` first)")
        return read_json(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.workspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("commit", help="dvc commit + push, git commit + push to the lineage repository")
    c.add_argument("--workspace", required=True, type=Path)
    args = parser.parse_args(argv)
    return step_main("tasks.workspace", lambda: Workspace.open(args.workspace).commit())


if __name__ == "__main__":
    sys.exit(main())
