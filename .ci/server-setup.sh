#!/usr/bin/env bash
# Create .venv-server with the Milvus standalone server used by the `server` tests and benchmarks.
# The PyPI package `milvus` 2.3.5 ships a real Milvus standalone binary (~250 MB unpacked per data
# dir) and the `milvus-server` wrapper; it is kept out of the project venv on purpose.
# Usage: .ci/server-setup.sh [VENV_DIR]   (default: <repo>/.venv-server); idempotent.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-server}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/milvus-server" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "milvus==2.3.5"
fi
"$venv/bin/python" -c 'import milvus; assert milvus.__version__ == "2.3.5", milvus.__version__'
echo "milvus-server: $venv/bin/milvus-server (export PIXFIND_MILVUS_SERVER_BIN to use another)"
