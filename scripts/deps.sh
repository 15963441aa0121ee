#!/usr/bin/env bash
# Installs what onebox's build, demo and tests need on a fresh Debian
# machine. Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps: installing ${need[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "deps: missing ${need[*]} (install them, or run as root on Debian); netns tests will skip" >&2
  fi
fi
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH=$PATH:/usr/local/go/bin
fi
command -v go >/dev/null 2>&1 || { echo "deps: Go is required (https://go.dev/dl), 1.26 or newer" >&2; exit 1; }
go mod download
