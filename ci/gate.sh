#!/usr/bin/env bash
# The CI gate (called by ci/github/robustgate.yml and ci/gitlab/.gitlab-ci.yml; `make ci-gate`).
#
#  1. `dvc pull` what the DVC remote already holds, so unchanged stages do not re-run;
#  2. `dvc repro gate`: every stage up to the release gate; a failing gate fails the job;
#  3. the gate table and the change since the approved model as the job summary
#     ($GITHUB_STEP_SUMMARY when set, else the log), written whether the gate passed or not;
#  4. on the release branch only: `dvc repro` (register: the approved alias moves) and
#     `dvc push` of data, models, ONNX file and report to the DVC remote.
#
# Environment: RELEASE_BRANCH (default release); CI_BRANCH overrides the branch the CI system
# reports (GITHUB_REF_NAME, CI_COMMIT_REF_NAME, else git's); DVC_REMOTE_URL adds that remote
# (local to this clone) and pulls/pushes there instead of the default remote; MLFLOW_TRACKING_URI
# points register and the summary at the team's tracking server; ROBUSTGATE_BIN the directory
# holding dvc and python (default .venv/bin when it exists, else PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1
BIN=${ROBUSTGATE_BIN:-}
if [ -z "$BIN" ] && [ -x .venv/bin/dvc ]; then BIN=.venv/bin; fi
DVC=${BIN:+$BIN/}dvc
PYTHON=${BIN:+$BIN/}python
[ -n "$BIN" ] || PYTHON=python3
RELEASE_BRANCH=${RELEASE_BRANCH:-release}
BRANCH=${CI_BRANCH:-${GITHUB_REF_NAME:-${CI_COMMIT_REF_NAME:-$(git rev-parse --abbrev-ref HEAD)}}}
REMOTE_ARGS=()
if [ -n "${DVC_REMOTE_URL:-}" ]; then
  "$DVC" remote add --local --force ci "$DVC_REMOTE_URL" >/dev/null || exit 2
  REMOTE_ARGS=(--remote ci)
fi
has_remote() { [ -n "${DVC_REMOTE_URL:-}" ] || [ -n "$("$DVC" remote default 2>/dev/null)" ]; }

echo "ci-gate: branch $BRANCH (release branch: $RELEASE_BRANCH)"
if has_remote; then
  "$DVC" pull --allow-missing --quiet "${REMOTE_ARGS[@]}" 2>/dev/null || echo "ci-gate: dvc pull found nothing to reuse"
fi

"$DVC" repro gate
gate_rc=$?
"$PYTHON" -m pipeline.ci_summary || echo "ci-gate: no job summary (the gate did not record a verdict)"
if [ "$gate_rc" -ne 0 ]; then
  echo "ci-gate: FAILED: dvc repro stopped (exit $gate_rc) before the release; nothing registered or pushed"
  exit 1
fi

if [ "$BRANCH" != "$RELEASE_BRANCH" ]; then
  echo "ci-gate: gate passed; not the release branch, so nothing registered or pushed"
  exit 0
fi
"$DVC" repro || { echo "ci-gate: FAILED: dvc repro (register) did not complete: see its line above"; exit 1; }
if ! has_remote; then
  echo "ci-gate: FAILED: release branch without a DVC remote (dvc remote add -d, or DVC_REMOTE_URL)"
  exit 1
fi
"$DVC" push "${REMOTE_ARGS[@]}" || { echo "ci-gate: FAILED: dvc push"; exit 1; }
if ! git diff --quiet HEAD -- dvc.lock metrics plots 2>/dev/null; then
  echo "ci-gate: note: dvc.lock, metrics/ or plots/ differ from the commit; commit them so that"
  echo "         \`robustgate audit <commit>\` finds the evidence just pushed"
fi
echo "ci-gate: released and pushed the evidence of $(git rev-parse --short HEAD)"
