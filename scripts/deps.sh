#!/usr/bin/env bash
# Installs what onebox's build, demo and tests need on a fresh Debian
# machine. Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package: iproute2 for the network-namespace testbed,
# a C compiler for the memory shim (LD_PRELOAD), and the real programs the
# integration tests run through onebox (python3, curl, git, sqlite3).
need=()
for pair in ip:iproute2 setpriv:util-linux cc:gcc python3:python3 curl:curl git:git sqlite3:sqlite3; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if command -v cc >/dev/null 2>&1 && ! echo '#include <stdio.h>' | cc -E - >/dev/null 2>&1; then
  need+=(libc6-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps: installing ${need[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "deps: missing ${need[*]} (install them, or run as root on Debian); the tests that need them will skip" >&2
    if [ "${CI:-}" = "true" ]; then exit 1; fi
  fi
fi
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH=$PATH:/usr/local/go/bin
fi
command -v go >/dev/null 2>&1 || { echo "deps: Go is required (https://go.dev/dl), 1.26 or newer" >&2; exit 1; }
go mod download

# A working CRIU (>= 4.1) for process checkpoint/restore. As root it is
# installed privately under /opt/onebox/criu when the system's does not work;
# in CI a failure here fails the run (the CRIU tests must not skip there).
if [ "$(id -u)" -eq 0 ]; then
  if ! out=$(./scripts/install-criu.sh 2>&1); then
    echo "$out" >&2
    if [ "${CI:-}" = "true" ]; then
      echo "deps: could not install a working criu" >&2
      exit 1
    fi
    echo "deps: no working criu; CRIU tests will skip" >&2
  fi
fi
