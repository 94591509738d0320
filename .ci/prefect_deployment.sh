#!/usr/bin/env bash
# End-to-end check of the Prefect deployment in prefect.yaml: a throwaway Prefect server, the
# `cleanse-process` work pool, the deploy command of docs/prefect.md (verbatim), a process worker,
# one `cleanse/local` run with the default estimators on a tiny configuration (iris, a small MLP,
# no MLflow), then `cleanse run` (the CLI) on the same params into another folder: every score table
# and flag of the worker's run must equal the CLI's. Prints PASS or FAIL as its last line.
#
#   bash .ci/prefect_deployment.sh        # from the repo root, with .venv/bin on PATH
#
# Environment: TIMEOUT_S (flow-run timeout, default 600), KEEP_TMP=1 keeps the temporary folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TIMEOUT_S="${TIMEOUT_S:-600}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/cleanse-prefect-ci.XXXXXX")"
OUT="$TMP/out"
CLI_OUT="$TMP/cli"
SERVER_PID=""
WORKER_PID=""
STARTED=$SECONDS

descendants() {  # every process below $1 (flow runs start in their own sessions, not our groups)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}

stop() {  # stop a process we started, its group (setsid made its pid the group id) and its children
  local pid="$1" name="$2" begun=$SECONDS children child _
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  children="$(descendants "$pid")"
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 25); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  for child in $children; do kill -KILL "$child" 2>/dev/null || true; done  # e.g. a flow run left running
  echo "   stopped the $name in $((SECONDS - begun)) s"
}

finish() {
  local rc=$?
  stop "$WORKER_PID" worker
  stop "$SERVER_PID" server
  if [[ $rc -ne 0 ]]; then
    for log in server worker; do
      [[ -f "$TMP/$log.log" ]] && { echo "---- last lines of the $log log ----"; tail -n 40 "$TMP/$log.log"; }
    done
    echo "FAIL: prefect deployment check ($((SECONDS - STARTED)) s; logs in $TMP)"
  else
    echo "PASS: prefect deployment cleanse/local (default estimators) completed and matches the CLI's scores ($((SECONDS - STARTED)) s)"
    [[ "${KEEP_TMP:-0}" == 1 ]] || rm -rf "$TMP"
  fi
  exit $rc
}
trap finish EXIT

command -v prefect >/dev/null || { echo "prefect not on PATH (add .venv/bin)"; exit 1; }
PYTHON="$(dirname "$(command -v prefect)")/python"

export PREFECT_HOME="$TMP/prefect-home"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=2
export PREFECT_CLI_COLORS=false
unset PREFECT_API_URL PREFECT_PROFILE MLFLOW_TRACKING_URI

PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

echo "== prefect server on port $PORT (PREFECT_HOME=$PREFECT_HOME)"
setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
disown "$SERVER_PID"
for _ in $(seq 1 120); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited"; exit 1; }
  sleep 1
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "server not healthy after 120 s"; exit 1; }
echo "   healthy after $((SECONDS - STARTED)) s"

echo "== work pool and deployment"
prefect work-pool create cleanse-process --type process --overwrite
# The deploy line of docs/prefect.md, run verbatim, so the documented command is the tested one.
DEPLOY_CMD="$(grep -E '^prefect --no-prompt deploy ' docs/prefect.md | head -n1 | sed 's/[[:space:]]*#.*$//')"
[[ -n "$DEPLOY_CMD" ]] || { echo "no 'prefect --no-prompt deploy' line in docs/prefect.md"; exit 1; }
echo "   $DEPLOY_CMD"
bash -euo pipefail -c "$DEPLOY_CMD"
for name in cleanse/local memorization/memorization cleanse-sweep/sweep; do
  prefect deployment inspect "$name" >/dev/null || { echo "deployment $name missing after the documented deploy"; exit 1; }
done
DEPLOYMENT="$(prefect deployment inspect 'cleanse/local')"
grep -q "set_working_directory" <<<"$DEPLOYMENT" || { echo "deployment has no set_working_directory pull step"; exit 1; }

echo "== worker"
setsid prefect worker start --pool cleanse-process --type process >"$TMP/worker.log" 2>&1 &
WORKER_PID=$!
disown "$WORKER_PID"  # no job-control notice when it is stopped

# The default estimators (params.yaml's, which are the built-in defaults) on iris with a small MLP:
# influence and influence_val then share torch's forward-mode AD across the worker's threads.
OVERRIDES=("data.source=sklearn:iris" "model.arch=mlp" "model.hidden=[8]" "model.epochs=8"
           "corruption.fraction=0.15" "scorers.cleanlab.folds=3" "tracking.enabled=false")
PARAMS="$("$PYTHON" -c 'import json, sys; print(json.dumps({
    "params_file": "params.yaml", "overrides": sys.argv[2:], "estimators": None, "out": sys.argv[1]}))' "$OUT" "${OVERRIDES[@]}")"
echo "== prefect deployment run 'cleanse/local' --params '$PARAMS'"
prefect deployment run 'cleanse/local' --params "$PARAMS" --watch --watch-timeout "$TIMEOUT_S" | tee "$TMP/run.log"
FLOW_RUN_ID="$(grep -oE 'UUID: [0-9a-f-]{36}' "$TMP/run.log" | head -n1 | cut -d' ' -f2)"

STATE="$("$PYTHON" - "$FLOW_RUN_ID" <<'PY'
import sys
from prefect.client.orchestration import get_client

with get_client(sync_client=True) as client:
    print(client.read_flow_run(sys.argv[1]).state.type.value)
PY
)"
echo "   flow run $FLOW_RUN_ID: $STATE"
[[ "$STATE" == COMPLETED ]] || { echo "flow run is $STATE, not COMPLETED"; exit 1; }

echo "== cleanse run (the CLI) on the same params -> $CLI_OUT"
SETS=()
for override in "${OVERRIDES[@]}"; do SETS+=(--set "$override"); done
"$(dirname "$PYTHON")/cleanse" run --no-prefect --params params.yaml "${SETS[@]}" --out "$CLI_OUT" >"$TMP/cli.log" 2>&1 \
  || { tail -n 30 "$TMP/cli.log"; echo "cleanse run failed"; exit 1; }

"$PYTHON" - "$OUT" "$CLI_OUT" <<'PY'
import json, sys
from pathlib import Path

import numpy as np
import pandas as pd

from cleanse.config import load_params

worker, cli = Path(sys.argv[1]), Path(sys.argv[2])
metrics = json.loads((worker / "reports" / "metrics.json").read_text())
names = list(metrics["estimators"])
defaults = load_params(None, []).estimators
assert sorted(names) == sorted(defaults), f"worker ran {names}, the defaults are {defaults}"
for name in names:
    a = pd.read_parquet(worker / "scores" / f"{name}.parquet")
    b = pd.read_parquet(cli / "scores" / f"{name}.parquet")
    assert a["sample_id"].tolist() == b["sample_id"].tolist(), name
    gap = float(np.max(np.abs(a["score"].to_numpy() - b["score"].to_numpy())))
    scale = float(np.max(np.abs(b["score"].to_numpy())))
    assert np.allclose(a["score"], b["score"], rtol=1e-6, atol=1e-9 * scale), f"{name}: max |diff| {gap:.3g}"
    fa = pd.read_parquet(worker / "flags" / f"{name}.parquet")["is_flagged"].tolist()
    fb = pd.read_parquet(cli / "flags" / f"{name}.parquet")["is_flagged"].tolist()
    assert fa == fb, f"{name}: flags differ"
    print(f"   {name}: {len(a)} scores, max |worker - cli| = {gap:.3g} (scale {scale:.3g}), {sum(fa)} flagged in both")
print(f"   worker and CLI agree on {len(names)} default estimators; baseline {metrics['baseline']}")
PY
