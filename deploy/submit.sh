#!/usr/bin/env bash
# Submit a vireo training run to a Ray cluster with `ray job submit`. One run_id names the run everywhere:
# the run directory, the MLflow run (tag run_id), the Prometheus label, and this job's submission id and
# metadata. The working tree travels as the job's working_dir (.gitignore'd paths and .git stay behind,
# so the commit travels as VIREO_GIT_COMMIT).
#
#   deploy/submit.sh http://HEAD:8265 configs/r1v3_38b.yaml [key=value ...]
#
# Environment: RUNTIME_ENV (default deploy/runtime_env.yaml), RUN_ID (default <config>-<time>),
# RAY (the ray CLI, default `ray`; its version must be the cluster's), PYTHON (the interpreter on the
# cluster, default `python`).
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
commit=$(git rev-parse HEAD 2>/dev/null || true)
exec "${RAY:-ray}" job submit --address "$address" --working-dir . \
  --runtime-env "${RUNTIME_ENV:-deploy/runtime_env.yaml}" \
  --submission-id "$run_id" --metadata-json "{\"run_id\": \"$run_id\", \"git_commit\": \"$commit\"}" \
  -- env VIREO_GIT_COMMIT="$commit" "${PYTHON:-python}" -m services.cli train "$config" \
  tracking.run_id="$run_id" "$@"
