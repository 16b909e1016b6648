#!/usr/bin/env bash
# Install into .venv and run the tests (the same command CI runs).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -r requirements.txt
pytest -q
