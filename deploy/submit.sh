#!/usr/bin/env bash
# Submit a vireo training run to a Ray cluster with `ray job submit`. One run_id names the run everywhere:
# the run directory, the MLflow run (tag run_id), the Prometheus label, and this job's submission id and
# metadata. The working tree travels as the job's working_dir (.gitignore'd paths and .git stay behind,
# so the commit travels as VIREO_GIT_COMMIT).
#
#   deploy/submit.sh http://HEAD:8265 configs/r1v3_38b.yaml [key=value ...]
#
# Environment: RUNTIME_ENV (default deploy/runtime_env.yaml), RUN_ID (default <config>-<time>; letters,
# digits, `.`, `_`, `-`), RAY (the ray CLI, default `ray`; its version must be the cluster's), PYTHON (the
# interpreter on the cluster, default `python`).
# Ray token authentication (Ray >= 2.52; RAY_AUTH_MODE defaults to token here): the token is
# RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else the Kubernetes Secret named by
# RAY_AUTH_SECRET (key auth_token, read with kubectl; deploy/kuberay/ray-auth-secret.yaml), else
# ~/.ray/auth_token. RAY_AUTH_MODE=disabled talks to a cluster without authentication.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RAY_DASHBOARD_ADDRESS CONFIG [key=value ...]" >&2
  exit 2
fi
address=$1
config=$2
shift 2
cd "$(dirname "$0")/.."
run_id=${RUN_ID:-$(basename "$config" .yaml)-$(date +%Y%m%d-%H%M%S)}
if ! [[ $run_id =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "$0: RUN_ID must be letters, digits, '.', '_' or '-' (it names a directory, an MLflow tag and a" \
    "Prometheus label), got: $run_id" >&2
  exit 2
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
    && [ -n "${RAY_AUTH_SECRET:-}" ]; then
  RAY_AUTH_TOKEN=$(kubectl get secret "$RAY_AUTH_SECRET" -o jsonpath='{.data.auth_token}' | base64 -d)
  export RAY_AUTH_TOKEN
fi
commit=$(git rev-parse HEAD 2>/dev/null || true)
metadata=$(python3 -c 'import json, sys; print(json.dumps({"run_id": sys.argv[1], "git_commit": sys.argv[2]}))' \
  "$run_id" "$commit")
exec "${RAY:-ray}" job submit --address "$address" --working-dir . \
  --runtime-env "${RUNTIME_ENV:-deploy/runtime_env.yaml}" \
  --submission-id "$run_id" --metadata-json "$metadata" \
  -- env VIREO_GIT_COMMIT="$commit" "${PYTHON:-python}" -m services.cli train "$config" \
  tracking.run_id="$run_id" "$@"
