#!/usr/bin/env bash
# Re-pin hack/kube/go.mod to another Kubernetes release:  hack/kube/pin.sh 1.34.4
# Generates `replace k8s.io/<staging> => k8s.io/<staging> v0.X.Y` for every staging module
# listed in k8s.io/kubernetes's own go.mod (they are `v0.0.0` + local replaces upstream),
# then runs `go mod tidy`. Binaries are cached per version, so a new pin rebuilds.
set -euo pipefail
V="${1#v}"
[[ "$V" =~ ^1\.[0-9]+\.[0-9]+$ ]] || { echo "usage: $0 1.X.Y" >&2; exit 2; }
cd "$(dirname "$0")"
export GOFLAGS=-mod=mod
mod=$(go mod download -json "k8s.io/kubernetes@v$V" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
{
  echo "// Pins the Kubernetes binaries hack/cluster builds (control plane, kubectl, node)."
  echo "// Regenerate with: hack/kube/pin.sh <k8s version>"
  echo "module reranker-fleet/hack/kube"
  echo
  echo "go $(sed -n 's/^go //p' "$mod")"
  echo
  echo "godebug default=go$(sed -n 's/^go \([0-9]*\.[0-9]*\).*/\1/p' "$mod")"
  echo
  echo "require k8s.io/kubernetes v$V"
  echo
  echo "replace ("
  sed -n '/^replace (/,/^)/p' "$mod" | awk -v v="v0.${V#1.}" '/=>/ {print "\t" $1 " => " $1 " " v}'
  echo ")"
} > go.mod
rm -f go.sum
go mod tidy
echo "pinned k8s.io/kubernetes v$V ($(grep -c '=>' go.mod) staging modules replaced)" >&2
