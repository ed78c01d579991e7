#!/usr/bin/env bash
# Prepares the demo federation beside this file by the enrolment a real one follows, all on
# this machine: the consortium's CA (ca/), the coordinator's key and four hospitals' keys each
# made by their own command (pki/coordinator, pki/sites/NAME), the CA signing only their
# requests, and each hospital's CSV copied into its bundle, which is all its agent mounts.
# In a real federation ca/ lives on the consortium's offline machine and each key on its
# own host; the commands are the same.
set -euo pipefail
cd "$(dirname "$0")"
coordinator="${COHORT_COORDINATOR:-cohort-coordinator}"
agent="${COHORT_AGENT:-cohort-agent}"
ca="${COHORT_CA:-cohort-ca}"
names=127.0.0.1,localhost
rm -rf ca pki state site-state
"$ca" init --ca ca >/dev/null
"$coordinator" enroll --names "$names" --out pki/coordinator >/dev/null
"$ca" sign --ca ca --role coordinator pki/coordinator/request.csr.pem >/dev/null
for site in cleveland hungary switzerland va; do
    "$agent" enroll --name "$site" --out "pki/sites/$site" >/dev/null
    "$ca" sign --ca ca "pki/sites/$site/request.csr.pem" \
        --coordinator-names "$names" --coordinator-url https://127.0.0.1:7700 >/dev/null
done
# What the CA sends back (no private key in any of it), unpacked where each key lives.
cp ca/coordinator/* pki/coordinator/
cp ca/ca.pem pki/ca.pem
for site in cleveland hungary switzerland va; do
    cp "ca/sites/$site/"* "pki/sites/$site/"
    cp "../../data/heart-disease/$site.csv" "pki/sites/$site/data.csv"
    # What each site adds to the agent.toml it received: where its contribution ledger lives
    # (a volume of its own that outlives the container; the bundle is mounted read-only), and
    # a policy a federation of four can meet (three others, one of which may drop out; the
    # default asks for 5 live others).
    { echo 'state_dir = "/state"'; cat "pki/sites/$site/agent.toml"; printf '\n[policy]\nmin_live_neighbours = 2\n'; } \
        > "pki/sites/$site/agent.toml.new"
    mv "pki/sites/$site/agent.toml.new" "pki/sites/$site/agent.toml"
    mkdir -p "site-state/$site"
done
# The containers run as 65532: they must read their bundle and write their state.
mkdir -p state
chmod -R a+rX pki
chmod a+rwx state
chmod -R a+rwx site-state
echo "ready: podman-compose up (or docker compose up) in $(pwd)"
