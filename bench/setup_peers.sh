#!/usr/bin/env bash
# Create bench/.peers-venv with the peer systems the benchmark compares
# DataFlare against: Bytewax 0.21.x and Pathway, plus orjson for the plain
# Python baseline and py-spy for the profiles of DataFlare.
#
# The peers live in their own virtual environment so that they never touch
# the project's requirements.lock or .venv.
#
# Usage: bash bench/setup_peers.sh [PYTHON]   (default: python3.11)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.peers-venv"
python="${1:-python3.11}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "bytewax>=0.21,<0.22" pathway orjson py-spy
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("bytewax", "pathway", "orjson", "py-spy"):
    print(f"{name} {version(name)}")
PY
