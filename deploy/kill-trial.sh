#!/bin/bash
# The real binaries as separate processes, the way a hospital network lives with them:
# enrolment (cohort-ca, cohort-coordinator enroll, four cohort-agent enroll), four agents, and
# a coordinator killed -9 every 1.5-7.5 s (KILLS times; every fifth kill also an agent, which
# is started again) before it runs to ROUNDS. Prints the kill counts and every exit code; the
# logs are in $T (coord.log, SITE.log).
#   cargo build --release --workspace && ROUNDS=4000 KILLS=60 deploy/kill-trial.sh
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
B=${B:-$root/target/release}
T=${T:-/tmp/cohort-kill-trial}; rm -rf "$T"; mkdir -p "$T"; cd "$T"
ROUNDS=${ROUNDS:-2000}
export COHORT_STATUS_TOKEN=trialtoken-0123456789
$B/cohort-ca init --ca ca >/dev/null
$B/cohort-coordinator enroll --names localhost,127.0.0.1 --out host >/dev/null
$B/cohort-ca sign --ca ca --role coordinator host/request.csr.pem >/dev/null
SITES="cleveland hungary switzerland va"
for s in $SITES; do
  $B/cohort-agent enroll --name $s --out $s >/dev/null
  $B/cohort-ca sign --ca ca $s/request.csr.pem --coordinator-url https://127.0.0.1:7790 --coordinator-names localhost >/dev/null
  cp ca/sites/$s/* $s/
  cp $root/data/heart-disease/$s.csv $s/data.csv
  printf '\n[policy]\nmin_live_neighbours = 2\n' >> $s/agent.toml
  sed -i 's/^\[data\]/[reconnect]\ninitial_ms = 100\nmax_ms = 1000\n\n[data]/' $s/agent.toml
done
cp ca/coordinator/* host/
cat > host/coordinator.toml <<TOML
listen = "127.0.0.1:7790"
data_dir = "data"
[tls]
ca_cert = "ca.pem"
cert = "cert.pem"
key = "key.pem"
crl = "crl.pem"
registry = "registry.toml"
manifest = "manifest.toml"
[rounds]
count = $ROUNDS
min_sites = 4
stage_timeout_secs = 10
train_timeout_secs = 20
[secagg]
quant_bits = 20
modulus_bits = 64
max_weight = 1000
[model]
kind = "logreg"
[status]
listen = "127.0.0.1:7791"
[schema]
label = { column = "num", greater_than = 0 }
features = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
[training]
learning_rate = 0.001
batch_size = 8
local_steps = 2
TOML
declare -A AP
start_agent() { (cd $1 && exec $B/cohort-agent run --config agent.toml >> ../$1.log 2>&1) & AP[$1]=$!; }
for s in $SITES; do start_agent $s; done
kills=0; akills=0
for i in $(seq 1 ${KILLS:-40}); do
  (cd host && exec $B/cohort-coordinator run --config coordinator.toml >> ../coord.log 2>&1) &
  C=$!
  sleep $(awk -v r=$RANDOM 'BEGIN{printf "%.2f", 1.5 + (r % 600) / 100}')
  if ! kill -0 $C 2>/dev/null; then wait $C; echo "coordinator exited early: $?"; break; fi
  kill -9 $C; wait $C 2>/dev/null; kills=$((kills+1))
  if [ $((i % 5)) -eq 0 ]; then
    s=$(echo $SITES | tr ' ' '\n' | shuf -n1)
    kill -9 ${AP[$s]} 2>/dev/null; wait ${AP[$s]} 2>/dev/null; akills=$((akills+1)); start_agent $s
  fi
done
echo "coordinator kill -9: $kills, agent kill -9: $akills"
(cd host && exec $B/cohort-coordinator run --config coordinator.toml --exit-when-done >> ../coord.log 2>&1); echo "final coordinator exit: $?"
for s in $SITES; do wait ${AP[$s]}; echo "$s exit: $?"; done
