#!/usr/bin/env bash
# Wall times of `dvc repro` cold and with nothing changed, and of a scheduled-retraining run
# that stops early, on the bundled sample with the project's params, in a throwaway git + DVC
# copy of the project (so neither workspace/ nor the tracking store here is touched).
#
#   bash bench/dvc_repro.sh [WORKDIR]      (default WORKDIR: a new temp folder; uses .venv/bin)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
WORK=${1:-$(mktemp -d -t lesionml-dvc-bench-XXXX)}
mkdir -p "$WORK/project"
cd "$ROOT"
git ls-files | grep -v '^tests/\|^bench/' | tar -cf - -T - | tar -xf - -C "$WORK/project"
cd "$WORK/project"
export PATH="$BIN:$PATH" PYTHONPATH="$WORK/project" PREFECT_HOME="$WORK/prefect-home"
unset PREFECT_API_URL MLFLOW_TRACKING_URI
git init -q && dvc remote modify local url "$WORK/remote"
git add -A && git -c user.email=bench@example.com -c user.name=bench commit -qm project

timed() {  # label, log, command...
    local label=$1 log=$2; shift 2
    local start end
    start=$(date +%s.%N); "$@" > "$log" 2>&1; end=$(date +%s.%N)
    printf '%-44s %8.1f s\n' "$label" "$(echo "$end - $start" | bc)"
}
timed "dvc repro (cold)" "$WORK/cold.log" dvc repro
grep -E "Running stage|^done in" "$WORK/cold.log" | paste - - | awk '{printf "  %-40s %8s s\n", $3, $(NF-1)}'
timed "dvc repro (nothing changed)" "$WORK/again.log" dvc repro
echo "  stages run: $(grep -c 'Running stage' "$WORK/again.log" || true)"
timed "lesionml retrain (nothing changed)" "$WORK/retrain.log" lesionml retrain
echo "  $(grep -E '^(retrained|nothing changed)' "$WORK/retrain.log")"
echo "logs and the project copy: $WORK"
