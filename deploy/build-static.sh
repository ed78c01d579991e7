#!/usr/bin/env bash
# Static binaries of cohort-coordinator, cohort-agent, cohort-ca and cohort-sim (musl; no libc needed on
# the target host or in a FROM-scratch image), copied to dist/ with their sizes.
#
#   deploy/build-static.sh            # installs the musl target and musl-tools when missing
#
# Fallback when the musl target cannot be fetched: glibc with +crt-static
# (COHORT_STATIC=gnu deploy/build-static.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${COHORT_STATIC:-musl}"
if [ "$mode" = musl ]; then
    target=x86_64-unknown-linux-musl
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    if ! command -v musl-gcc >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends musl-tools >/dev/null
    fi
    export CC_x86_64_unknown_linux_musl=musl-gcc
    cargo build --release --locked --workspace --target "$target"
    # Last, and alone: the shipped agent without the `faults` feature cohort-sim turns on.
    cargo build --release --locked -p cohort-agent --target "$target"
else
    target=x86_64-unknown-linux-gnu
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --workspace --target "$target"
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked -p cohort-agent --target "$target"
fi

mkdir -p dist
for bin in cohort-coordinator cohort-agent cohort-ca cohort-sim; do
    cp "target/$target/release/$bin" dist/
    strip dist/$bin 2>/dev/null || true
    # A static executable asks for no program interpreter (the dynamic loader).
    if readelf -l "dist/$bin" | grep -q "program interpreter"; then
        echo "dist/$bin is dynamically linked" >&2
        exit 1
    fi
done
ls -l dist/ | awk 'NR > 1 { printf "%-20s %6.1f MiB\n", $9, $5 / 1048576 }'
