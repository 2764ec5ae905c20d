#!/usr/bin/env bash
# One GPU check (issue 26, item 7): environment, the attention kernels at real size, the XL, L and
# Transformer L train steps beside their compile-only prediction, a decode bench; writes
# gpu_check.json and gpu_check.md into OUT_DIR (benchmarks/gpu_check.py says what each part does).
# Under 8 minutes on one H100; each part has its own time budget and records its own failure.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py flags, e.g. --tiny, --bench_args=...]
#
# On the lent GPU machine (see ../shared/gpu/README.md; once, here: echo /.whl/ >> .git/info/exclude
# && mkdir -p .whl && cp ../shared/gpu/wheels/*.whl .whl/), the device tool's `run` with
# carry [".whl"] and timeout_s 540:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 || exit 1; bash benchmarks/gpu_check.sh "$OUT"
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py flags]" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py --out="$out" "$@"
