#!/usr/bin/env bash
# Mutation testing of curvature/ and optimizers/ with mutmut (optional extra "mutation").
#
#   bash tools/mutation.sh                      # every module of curvature/ and optimizers/ (hours on 2 cores)
#   bash tools/mutation.sh optimizers/fallback.py curvature/capture.py   # only these files
#
# The configuration is [tool.mutmut] in pyproject.toml (fast test subset: tests/optimizers, tests/curvature).
# Results: `mutmut results` / `mutmut show NAME`; reviewed equivalent mutants: tests/equivalent_mutants.md.
# Not part of `bash run.sh test` or .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import mutmut" 2>/dev/null || python -m pip install -q "mutmut==3.8.1"
rm -rf mutants
if [ "$#" -gt 0 ]; then
    only=$(printf '"%s",' "$@")
    export MUTMUT_ONLY="[${only%,}]"
    export ORIG; ORIG=$(mktemp)
    python - <<'PY'
import os, re, pathlib
p = pathlib.Path("pyproject.toml")
text = p.read_text()
text = re.sub(r'\nonly_mutate = .*', '', text)
text = text.replace("[tool.mutmut]\n", f"[tool.mutmut]\nonly_mutate = {os.environ['MUTMUT_ONLY']}\n", 1)
pathlib.Path(os.environ["ORIG"]).write_text(p.read_text())
p.write_text(text)
PY
    trap 'cp "$ORIG" pyproject.toml && rm -f "$ORIG"' EXIT
fi
python -m mutmut run --max-children "${MUTMUT_JOBS:-2}"
python -m mutmut results
