#!/usr/bin/env bash
# Mount the shared run directory on a cluster node: usage
#
#   bash cluster/mount_shared.sh NFS_SOURCE [MOUNT_POINT]     # MOUNT_POINT defaults to /mnt/shared
#
# Why every node needs it: Ray Train persists each worker's checkpoint files from the node
# the worker runs on, and refuses a storage path that is not the same directory on every
# node ("Unable to set up cluster storage"), and rank 0 writes metrics.jsonl, images/ and
# lora/ wherever it runs. So a multi-node run needs run.output_dir on a file system that
# all nodes mount at one path: AWS EFS, GCP Filestore, or an NFS export on premises.
# The cluster YAMLs call this from setup_commands; it is safe to run again.
set -euo pipefail

source=${1:?usage: mount_shared.sh NFS_SOURCE [MOUNT_POINT]}
mount_point=${2:-/mnt/shared}

case $source in
  *REPLACE_ME*)
    echo "mount_shared.sh: '$source' is a placeholder: put your NFS server (EFS, Filestore, ...) in the" \
         "cluster YAML's setup_commands first (see cluster/README.md, 'Shared run directory')" >&2
    exit 2 ;;
esac

if mountpoint -q "$mount_point" 2>/dev/null; then
  echo "$mount_point already mounted"
  exit 0
fi
if ! command -v mount.nfs >/dev/null 2>&1; then
  sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq nfs-common
fi
sudo mkdir -p "$mount_point"
# Options from the EFS and Filestore guides; the NFS version is negotiated (EFS: 4.1, Filestore basic: 3).
sudo mount -t nfs -o hard,timeo=600,retrans=2,noresvport,rsize=1048576,wsize=1048576 "$source" "$mount_point"
# Every node logs in as the same user (same image), so one owner works for all of them.
sudo mkdir -p "$mount_point/runs"
sudo chown "$(id -u):$(id -g)" "$mount_point/runs"
echo "mounted $source at $mount_point; use run.output_dir=$mount_point/runs"
