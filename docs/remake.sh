#!/bin/bash
# The README's pictures, drawn again by its smoke run in a temporary folder (left with nothing in it):
#     bash docs/remake.sh [ARCHIVE]        (default: ../shared/data/cifar10-jpg.tar.gz beside the project)
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
source=$(realpath "${1:-$project/../shared/data/cifar10-jpg.tar.gz}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
invoke -r "$project" all --epochs 3 --limit 4000 --image-size 64 --batch-size 64 --lr 0.03 --source "$source" \
    --data-dir "$work/data" --out-dir "$work/out"
cp "$work/out/pretrain.png" "$project/docs/curves.png"
cp "$work/out/finetune.confusion.png" "$project/docs/confusion.png"
cp "$work/out/mistakes.png" "$project/docs/mistakes.png"
