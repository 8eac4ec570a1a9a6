#!/usr/bin/env bash
# Every CPU benchmark the README reports, one after another on a quiet machine, into out/ (about 40 minutes on
# 2 cores). Then: python scripts/readme_tables.py out/
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
mkdir -p out
for step in "${@:-speed kernels peer reuse quality}"; do
  for s in $step; do
    echo "== $s $(date +%T)"
    case "$s" in
      speed) $PY -m vlcache bench speed --sizes 1024,4096,8192 --out out/speed 2>&1 | tee out/speed.txt ;;
      kernels) $PY -m vlcache bench kernels --device cpu --out out/kernels 2>&1 | tee out/kernels.txt ;;
      peer) $PY -m vlcache bench peer --repeat 3 --out out/peer 2>&1 | tee out/peer.txt
            $PY -m vlcache bench peer --model embedded --repeat 3 --out out/peer-embedded 2>&1 | tee out/peer-embedded.txt ;;
      reuse) $PY -m vlcache bench reuse --out out/reuse 2>&1 | tee out/reuse.txt ;;
      quality) $PY -m vlcache bench quality --out out/quality 2>&1 | tee out/quality.txt ;;
      *) echo "unknown step $s" ;;
    esac
  done
done
echo "== done $(date +%T)"
