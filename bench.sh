#!/usr/bin/env bash
# Run the benchmark of issue 4 (bench/run.py): installs what is missing first.
# Arguments go to bench/run.py, e.g. a quick run:
#   ./bench.sh --size-mib 256 --files 1000 --targets local,nimbus,nimbus-gcs,rclone,rclone-gcs,raw-gcs
# Needs root (cold reads drop the kernel page cache; FUSE mounts).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
# fio for random I/O, rclone for the comparison mounts, git and tar for the tree job.
NIMBUS_EXTRA_PKGS="rclone fio git tar" nimbus_bootstrap bench
cd "$NIMBUS_ROOT"
exec "$VENV/bin/python" bench/run.py "$@"
