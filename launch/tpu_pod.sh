#!/usr/bin/env bash
# Run `pjlm train` on every host of a Cloud TPU VM slice (v4-32, v5litepod-16, ...): one process per
# host, each driving that host's chips; JAX finds the coordinator, the process count and this
# host's index from the TPU metadata, so the processes join one run over all chips of the slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh CONFIG.py WORKDIR [pjlm train options...]
#
#   e.g. TPU_NAME=my-v4-32 ZONE=us-central2-b REPO='~/pjlm' \
#          launch/tpu_pod.sh experiments/pretrain_synthetic.py /mnt/gcs/runs/pre1 --set train.steps=2000
#
# Arguments
#   CONFIG.py   an experiments/*.py file, as a path relative to REPO (or absolute on the workers)
#   WORKDIR     the run's work directory, the same on every host, on storage all hosts share: a
#               Cloud Storage URL (gs://bucket/runs/x: checkpoints written by Orbax directly, pjlm's
#               own files as whole objects; the workers need gcsfs, which INSTALL=1 adds), a bucket
#               mounted with gcsfuse (e.g. /mnt/gcs/runs/x) or a Filestore/NFS mount.
#   ...         passed on to `pjlm train` (e.g. --set optimizer.learning_rate=1e-3)
#
# Environment (read on this machine)
#   TPU_NAME    (required) the TPU VM's name
#   ZONE        (required) its zone
#   PROJECT     GCP project (default: gcloud's configured project)
#   REPO        the checkout of this repository on every worker (default: ~/pjlm); the same commit
#               must be there on all hosts (e.g. `--command "cd ~/pjlm && git pull"` first)
#   XLA_ENV     flags file under launch/xla/ to source on the workers (default: tpu_v4.env)
#   VENV        a virtualenv on the workers to activate first (default: none)
#   PYTHON      interpreter on the workers (default: python3)
#   INSTALL=1   first run `pip install -e '.[tpu]'` in REPO on every worker (the TPU jaxlib; a plain
#               `pip install -e .` gives a CPU-only one); '.[tpu,gcs]' for a gs:// WORKDIR
#   DRY_RUN=1   print the gcloud command instead of running it
#
# The script exports PJLM_DISTRIBUTED=1 on the workers, so pjlm calls jax.distributed.initialize().
# Every worker's output is streamed back here, interleaved. Ctrl-C stops the local ssh sessions; if
# workers keep running (the TPU then reports "already in use"), stop them with the same gcloud
# command and `--command "pkill -u $USER -f 'pjlm train'"` or by restarting the TPU VM.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -ge 2 ]] || { echo "tpu_pod.sh: need CONFIG.py and WORKDIR" >&2; usage 2; }
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"

CONFIG=$1 WORKDIR=$2
shift 2
EXTRAS=tpu
[[ "$WORKDIR" == gs://* ]] && EXTRAS=tpu,gcs  # pjlm reaches gs:// through etils.epath and gcsfs
REPO=${REPO:-'~/pjlm'}
XLA_ENV=${XLA_ENV:-tpu_v4.env}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -f "$HERE/xla/$XLA_ENV" ]] || { echo "tpu_pod.sh: no flags file launch/xla/$XLA_ENV" >&2; exit 2; }

# The remote command, each argument quoted for the workers' bash; a leading ~/ in REPO or VENV is
# kept unquoted so that the remote shell expands it to the remote home.
q() { printf '%q' "$1"; }
qpath() { case "$1" in '~') printf '~';; '~/'*) printf '~/%s' "$(q "${1#\~/}")";; *) q "$1";; esac; }
extra=""
for a in "$@"; do extra+=" $(q "$a")"; done
remote="cd $(qpath "$REPO")"
[[ -n "${VENV:-}" ]] && remote+=" && source $(qpath "$VENV")/bin/activate"
[[ "${INSTALL:-0}" == 1 ]] && remote+=" && $(q "$PYTHON") -m pip install -q -e '.[$EXTRAS]'"
remote+=" && source launch/xla/$(q "$XLA_ENV") && export PJLM_DISTRIBUTED=1"
remote+=" && $(q "$PYTHON") -m pjlm train $(q "$CONFIG") --workdir $(q "$WORKDIR")$extra"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote")
[[ -n "${PROJECT:-}" ]] && cmd+=(--project "$PROJECT")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "on every worker: $remote"
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
