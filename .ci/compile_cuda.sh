#!/usr/bin/env bash
# Compile every Torch-free CUDA kernel file in csrc/ for Hopper with nvcc alone. Nothing CUDA runs on the
# CI machine, but a kernel that does not compile never reaches the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find csrc -name '*.cu' | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "no .cu kernel files in csrc/ yet"
  exit 0
fi
if ! command -v nvcc >/dev/null; then
  echo "nvcc not found: skipping the compile check of ${#files[@]} .cu files"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  if grep -q '#include <torch\|#include <ATen\|#include <c10' "$f"; then
    echo "error: $f includes Torch headers; kernel files must stay Torch-free (bindings go in .cpp)"
    exit 1
  fi
  # -Xptxas -v: registers, spills and shared memory per kernel instance; any local-memory spill fails the check
  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v -Icsrc -c "$f" \
    -o "$out/$(basename "$f").o" 2>"$out/ptxas.log" || { cat "$out/ptxas.log"; exit 1; }
  regs=$( (grep -o 'Used [0-9]* registers' "$out/ptxas.log" || true) | awk '{print $2}' | sort -n | tail -1)
  smem=$( (grep -o '[0-9]* bytes smem' "$out/ptxas.log" || true) | awk '{print $1}' | sort -n | tail -1)
  if grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$out/ptxas.log"; then
    grep -E 'Compiling entry|spill' "$out/ptxas.log"
    echo "error: $f spills registers to local memory (ptxas lines above)"
    exit 1
  fi
  echo "ok  $f  (max ${regs:-0} registers, no spills, max ${smem:-0} bytes static smem)"
done
