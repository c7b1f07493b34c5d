#!/usr/bin/env bash
# Puts the benchmark's two peers into .peers/ (git-ignored), on a machine with internet access:
#   .peers/flashmla    DeepSeek's FlashMLA (prebuilt library and its Python interface)
#   .peers/flashinfer  FlashInfer's batch-MLA sources and their setup script, built on the GPU
#                      machine by scripts/gpu_check.sh (bash .peers/flashinfer/flashinfer_setup.sh)
# The fetch scripts come from ../shared/peers next to the checkout (PEERS_SRC overrides); a peer
# already in place is kept unless --force is given.
#
#   bash scripts/get_peers.sh [--force]
#
# Then name .peers in what travels to the GPU machine with the checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=${PEERS_SRC:-../shared/peers}
force=0
[[ ${1:-} == --force ]] && force=1
if [[ ! -d $src ]]; then
  echo "no peer scripts in $src; nothing fetched" >&2
  exit 1
fi
mkdir -p .peers
rc=0
if [[ $force -eq 1 || ! -f .peers/flashmla/flash_mla_interface.py ]]; then
  bash "$src/get_flashmla.sh" .peers/flashmla || { echo "FlashMLA: fetch failed" >&2; rc=1; }
else
  echo "FlashMLA peer already in .peers/flashmla"
fi
if [[ $force -eq 1 || ! -f .peers/flashinfer/flashinfer_min.tar.xz ]]; then
  bash "$src/get_flashinfer.sh" .peers/flashinfer || { echo "FlashInfer: fetch failed" >&2; rc=1; }
else
  echo "FlashInfer peer already in .peers/flashinfer"
fi
if [[ -d .peers/flashinfer ]]; then
  install -m 0755 "$src/flashinfer_setup.sh" .peers/flashinfer/flashinfer_setup.sh
fi
du -sh .peers/* 2>/dev/null || true
exit $rc
