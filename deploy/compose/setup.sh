#!/usr/bin/env bash
# Prepares the demo federation beside this file: a fresh PKI (coordinator at 127.0.0.1:7700)
# and each hospital's CSV copied into its own bundle, which is all its agent mounts.
set -euo pipefail
cd "$(dirname "$0")"
coordinator="${COHORT_COORDINATOR:-cohort-coordinator}"
rm -rf pki state
"$coordinator" provision --out pki --sites cleveland,hungary,switzerland,va \
    --coordinator-names 127.0.0.1,localhost --coordinator-url https://127.0.0.1:7700 >/dev/null
for site in cleveland hungary switzerland va; do
    cp "../../data/heart-disease/$site.csv" "pki/sites/$site/data.csv"
done
# The containers run as 65532: they must read their bundle and write the coordinator's state.
mkdir -p state
chmod -R a+rX pki
chmod a+rwx state
echo "ready: podman-compose up (or docker compose up) in $(pwd)"
