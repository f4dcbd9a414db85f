#!/usr/bin/env bash
# Create .venv with the exact versions that were tested (constraints.txt) and install this
# project into it (editable, with the test extra). Safe to run again: it only adds what
# is missing. About 4 minutes and 6.5 GB on a fresh machine (torch is the standard build,
# which runs on the CPU here and on a GPU elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # A full disk fails deep inside pip ("No space left on device") after minutes; say it first.
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
    echo "setup_env.sh: a new .venv needs about 6.5 GB (8 GB with the tests' files); $(pwd) has $((free_kb / 1024)) MB free" >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "pip==26.3"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"

# DeepSpeed compiles its CPU shared-memory communication op on first use (about a minute
# on 2 cores); build it here, once, into ~/.cache/torch_extensions, so the first run and
# the tests do not pay for it inside a time-limited worker start.
.venv/bin/python - <<'PY'
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() == "cpu":
    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
PY
echo "environment ready: .venv"
