#!/usr/bin/env bash
# Mutation testing of curvature/ and optimizers/ with mutmut (optional extra "mutation").
#
#   bash tools/mutation.sh                                  # every module, the configured test subset
#   bash tools/mutation.sh optimizers/fallback.py           # only these files
#   MUTMUT_TESTS="tests/optimizers/test_param_groups.py" bash tools/mutation.sh optimizers/fallback.py
#                                                           # ... and only these tests
#   MUTMUT_JOBS=2 (parallel mutants, default 2)
#   MUTMUT_NAMES="optimizers.driver.x__compare_state__mutmut_1 optimizers.driver.xǁCurvatureOptimizerǁ_skip*" \
#     MUTMUT_TESTS=... bash tools/mutation.sh optimizers/driver.py
#                                                           # re-run only these mutants (fnmatch patterns allowed)
#
# The configuration is [tool.mutmut] in pyproject.toml (test subset: the exact tests of tests/optimizers
# and tests/curvature; slow end-to-end tests excluded). Results: `python -m mutmut results`,
# `python -m mutmut show NAME`. Reviewed equivalent mutants: tests/equivalent_mutants.md.
# Not part of `bash run.sh test` or .ci/run (a full run takes hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# mutmut runs each mutant in a process forked from one that already ran torch: an OpenMP thread pool
# does not survive fork(), and every mutant then hangs until its timeout. One thread avoids that.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The run writes its settings into pyproject.toml and restores the file on exit: refuse to start over uncommitted
# edits of it (another run in this checkout, or changes that a commit would then mix with the temporary lines).
if git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet -- pyproject.toml; then
  echo "tools/mutation.sh: pyproject.toml has uncommitted changes (is another mutation run going in this checkout?); commit or undo them first" >&2
  exit 2
fi
python -c "import mutmut" 2>/dev/null || python -m pip install -q "mutmut==3.8.1"
rm -rf mutants
ORIG=$(mktemp)
cp pyproject.toml "$ORIG"
trap 'cp "$ORIG" pyproject.toml && rm -f "$ORIG"' EXIT
ONLY="$*" python - <<'PY'
import os, pathlib, re
p = pathlib.Path("pyproject.toml")
text = p.read_text()
extra = ""
if os.environ.get("ONLY"):
    extra += "only_mutate = [%s]\n" % ", ".join(f'"{f}"' for f in os.environ["ONLY"].split())
if os.environ.get("MUTMUT_TESTS"):
    text = re.sub(r"pytest_add_cli_args_test_selection = \[[^\]]*\]\n", "", text)
    extra += "pytest_add_cli_args_test_selection = [%s]\n" % ", ".join(f'"{t}"' for t in os.environ["MUTMUT_TESTS"].split())
p.write_text(text.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + extra, 1))
PY
# Names are split on spaces but never glob-expanded by the shell (mutmut matches them itself).
read -r -a NAMES <<< "${MUTMUT_NAMES:-}"
python -m mutmut run --max-children "${MUTMUT_JOBS:-2}" "${NAMES[@]}"
python -m mutmut results --all true 2>/dev/null || python -m mutmut results
