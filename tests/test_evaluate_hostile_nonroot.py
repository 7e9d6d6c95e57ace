"""Non-root mode for real (issue 11 item 3): the sandbox is started by an unprivileged caller (uid 65534, as the
uid-1000 step images do), and hostile programs try what the old user-namespace path allowed: remount / read-write,
unmount /proc, write the caller's files, plant a .pth, read the caller's environment. The probe must report
isolation AND each hostile action must fail. Needs root (to become nobody with setpriv), bwrap and a system Python
that nobody can run (/usr/bin/python3: the venv's interpreter may live under a 0700 /root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534

DRIVER = r'''
import importlib.util, json, os, site, sys
repo, shared = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)  # sarmerge.errors only: the sandbox module imports nothing heavier
spec = importlib.util.spec_from_file_location("sandbox_nonroot", repo + "/sarmerge/evaluate/sandbox.py")
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox_nonroot"] = sandbox
spec.loader.exec_module(sandbox)
box = sandbox.Sandbox(sandbox.SandboxLimits(cpu_seconds=5, wall_seconds=30, memory_bytes=512 << 20))
caller_file = os.path.join(shared, "caller-owned.txt")
site_dirs = sorted(set(site.getsitepackages() + [site.getusersitepackages(), repo]))
hostile = {
    "remount": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.mount(None, b'/', None, ctypes.c_ulong(32 | 4096), None))",
    "umount_proc": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.umount2(b'/proc', 2))",
    "write_caller_file": f"open({caller_file!r}, 'a').write('pwned')\nprint('wrote')",
    "write_shared": f"open({os.path.join(shared, 'escape.txt')!r}, 'w').write('x')\nprint('wrote')",
    "plant_pth": ("import os\nok = []\nfor d in %r:\n    try:\n"
                  "        open(os.path.join(d, 'sarmerge-evil.pth'), 'w').write('import os')\n"
                  "        ok.append(d)\n    except OSError:\n        pass\nprint(len(ok))") % (site_dirs,),
    "caller_environ": f"import os\nprint('SARMERGE_CALLER_SECRET' in os.environ)\n"
                      f"print(open('/proc/{os.getpid()}/environ', 'rb').read())",
    "identity": "import os\nprint(os.getuid())\n"
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])",
}
out = {"caller_uid": os.getuid(), "isolation": box.isolation.as_dict(), "runs": {}, "site_dirs": site_dirs}
for name, program in hostile.items():
    r = box.run(program)
    out["runs"][name] = {"passed": r.passed, "stdout": r.stdout, "reason": r.reason}
print(json.dumps(out))
'''


@pytest.fixture
def shared() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sarmerge-nonroot-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("caller", ["nobody", "root-system-python"])
def test_non_root_caller_gets_an_unprivileged_locked_sandbox(shared: Path, caller: str) -> None:
    # root-system-python: a root caller whose interpreter every uid can reach (as in most images) drops to the
    # fresh uid with setpriv alone (no private mount namespace, i.e. no CAP_SYS_ADMIN needed: Docker's default)
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("bwrap") or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root (to become nobody), setpriv, bwrap and /usr/bin/python3")
    driver = shared / "driver.py"
    driver.write_text(DRIVER)
    os.chmod(driver, 0o644)
    caller_file = shared / "caller-owned.txt"
    caller_file.write_text("original")
    os.chown(caller_file, NOBODY, NOBODY)  # the caller's own file: only the sandbox's mounts can protect it
    env = {"PATH": "/usr/bin:/bin", "SARMERGE_CALLER_SECRET": "hunter2", "HOME": str(shared)}
    become = (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
              if caller == "nobody" else [])
    proc = subprocess.run([*become, str(SYSTEM_PYTHON), "-I", str(driver), str(REPO), str(shared)],
                          capture_output=True, text=True, env=env, cwd=shared, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["caller_uid"] == (NOBODY if caller == "nobody" else 0)
    iso = out["isolation"]
    # the probe reports isolation, and (below) every reported field holds against a hostile program
    assert iso["mode"] == "bwrap" and iso["isolated"], iso
    if caller == "nobody":
        assert iso["memory_cap"] == "rlimit-per-process"  # no cgroup for a non-root caller: stated, not hidden
    runs = out["runs"]
    assert runs["remount"]["stdout"].strip() == "-1", runs["remount"]
    assert runs["umount_proc"]["stdout"].strip() == "-1", runs["umount_proc"]
    assert not runs["write_caller_file"]["passed"] and caller_file.read_text() == "original"
    assert not runs["write_shared"]["passed"] and not (shared / "escape.txt").exists()
    assert runs["plant_pth"]["stdout"].strip() == "0"
    assert not any((Path(d) / "sarmerge-evil.pth").exists() for d in out["site_dirs"])
    environ = runs["caller_environ"]
    assert not environ["passed"] and environ["stdout"].strip() == "False" and "hunter2" not in environ["stdout"]
    uid, cap_eff = runs["identity"]["stdout"].split()
    assert int(uid) != 0 and int(cap_eff, 16) == 0
