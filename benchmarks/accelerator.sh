#!/usr/bin/env bash
# Every accelerator timing the scale issues still owe, in one call (benchmarks/accelerator.py says
# which, and benchmarks/README.md how to run it on the device machine):
#
#   bash benchmarks/accelerator.sh --commit <hash>     # results: $OUT/accelerator.jsonl (./ without $OUT)
#   bash benchmarks/accelerator.sh --dry-run           # the same steps at tiny shapes on CPU
#
# Wheels carried in .whl/ (packages the host's image lacks) are installed into /tmp/site first and
# put on PYTHONPATH after the checkout. $PYTHON names the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/accelerator.py --out "${OUT:-.}/accelerator.jsonl" "$@"
