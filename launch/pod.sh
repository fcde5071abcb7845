#!/usr/bin/env bash
# Runs one o1jax launcher on every worker of a Cloud TPU VM slice, creating the slice when it does not exist.
#
#   bash launch/pod.sh --name=o1jax-v5e16 --zone=us-west4-a --accelerator=v5litepod-16 \
#       --version=v2-alpha-tpuv5-lite -- train --config=configs/gemma2_2b_gsm8k.py --workdir=gs://BUCKET/run1
#   bash launch/pod.sh ... --dry-run -- train ...      # print every command, run none
#
# Everything after `--` is the app (a launcher in launch/: train, solve, plan, ...) and its flags, passed to every
# worker unchanged: `--config.note='a b "c"'` arrives as the one argument it is here.
#
# Steps, each one command (with --dry-run printed one per line, shell-quoted, comments starting with #):
#   1. slice: `gcloud compute tpus tpu-vm describe NAME`. A slice that exists is reused when its accelerator type
#      is --accelerator and it is READY (anything else is an error); one that does not is created with
#      `tpu-vm create NAME --accelerator-type=... --version=...` (plus any --create-arg).
#   2. code: a `git archive` of --ref (default HEAD: committed files only; uncommitted changes stay behind, with a
#      note on stderr) copied to every worker (`tpu-vm scp --worker=all`), or with --repo=URL a `git clone` of
#      it on every worker. Either way it is unpacked into a fresh --dir; the .venv, checkpoints/ and runs/ of an
#      earlier deploy move over into it, so a redeploy neither reinstalls nor loses a downloaded checkpoint.
#   3. environment: `bash launch/install.sh tpu` on every worker (skip with --no-install).
#   4. --setup=COMMAND, when given, on every worker in --dir: e.g. copying a Hugging Face checkpoint into
#      checkpoints/ (`gcloud storage cp -r gs://BUCKET/gemma-2-2b-it checkpoints/`), which model.path names.
#   5. the app: ONE `tpu-vm ssh --worker=all` runs the same `.venv/bin/python -m launch.APP FLAGS...` on every
#      worker, with O1JAX_DISTRIBUTED=auto in its environment: o1jax.parallel.initialize then calls
#      jax.distributed.initialize() with no arguments, and JAX reads the coordinator (worker 0), the process
#      count and each worker's rank from the TPU VM metadata. The app runs in the foreground of the ssh sessions
#      (its output interleaved; --logs=DIR keeps one file per worker): a lost connection stops it, and the same
#      command resumes a self-play run from its last checkpoint.
#
# Options (all --option=value):
#   --name=NAME            the slice (TPU VM) name                                                    (required)
#   --zone=ZONE            its zone, e.g. us-west4-a                                                  (required)
#   --accelerator=TYPE     accelerator type, e.g. v4-8, v5litepod-16, v5p-64, v6e-16                 (required)
#   --version=VERSION      TPU runtime version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite        (required)
#   --project=PROJECT      passed to every gcloud command (default: gcloud's configured project)
#   --create-arg=ARG       one more argument for `tpu-vm create` (repeatable): --create-arg=--spot
#   --repo=URL             git clone URL on the workers instead of copying this checkout
#   --ref=REF              commit, branch or tag to deploy (default HEAD)
#   --dir=DIR              the repository's directory on the workers, relative to home (default o1jax)
#   --no-install           skip launch/install.sh (the workers' .venv is already set up)
#   --setup=COMMAND        a shell command to run on every worker in DIR before the app
#   --env=NAME=VALUE       an environment variable for the app (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...
#   --logs=DIR             also write each worker's output of the app to DIR/ on this machine
#   --internal-ip          reach the workers by their internal IPs (from a VM in the same network)
#   --dry-run              print the commands instead of running them
# A missing or bad option ends the script with one `error: ...` line on stderr and exit status 2; a failing
# gcloud command ends it with that command's status. Needs gcloud (authenticated) and git.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# One word, quoted for a POSIX shell when it holds anything beyond plain characters (the workers' login shell
# parses the ssh command; --dry-run lines parse back to the same words).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

name="" zone="" accelerator="" version="" project="" repo="" ref="HEAD" dir="o1jax" setup="" logs=""
install=1 dry_run=0 internal_ip=0
create_args=() envs=()
while (($#)); do
  arg=$1
  shift
  case $arg in
    --) break ;;
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --internal-ip) internal_ip=1 ;;
    --name=*) name=${arg#*=} ;;
    --zone=*) zone=${arg#*=} ;;
    --accelerator=*) accelerator=${arg#*=} ;;
    --version=*) version=${arg#*=} ;;
    --project=*) project=${arg#*=} ;;
    --create-arg=*) create_args+=("${arg#*=}") ;;
    --repo=*) repo=${arg#*=} ;;
    --ref=*) ref=${arg#*=} ;;
    --dir=*) dir=${arg#*=} ;;
    --setup=*) setup=${arg#*=} ;;
    --env=*) envs+=("${arg#*=}") ;;
    --logs=*) logs=${arg#*=} ;;
    --name | --zone | --accelerator | --version | --project | --create-arg | --repo | --ref | --dir | --setup | \
      --env | --logs)
      die "option $arg needs a value: $arg=VALUE." ;;
    *) die "unknown option $(quote "$arg") before --; expected the options at the top of launch/pod.sh," \
      "then -- APP FLAGS." ;;
  esac
done

for required in name zone accelerator version; do
  [[ -n ${!required} ]] || die "--$required is missing; see the options at the top of launch/pod.sh."
done
# TPU node names: lowercase letters, digits and hyphens, starting with a letter (GCE resource names).
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name=$(quote "$name") is not a TPU name; expected lowercase letters, digits and hyphens," \
    "starting with a letter."
[[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator=$(quote "$accelerator") is not an accelerator type; expected e.g. v4-8, v5litepod-16," \
    "v5p-64, v6e-16."
[[ -n $dir && $dir != *"'"* ]] || die "--dir=$(quote "$dir") must be a non-empty path without quotes."
for variable in ${envs[@]+"${envs[@]}"}; do
  [[ $variable =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$(quote "$variable") is not NAME=VALUE."
done
(($#)) || die "no app given; put the launcher and its flags after --, e.g." \
  "-- train --config=configs/gemma2_2b_gsm8k.py."
app=$1
shift
if ! [[ $app =~ ^[a-z_][a-z0-9_]*$ && -f launch/$app.py && $app != app && $app != __init__ ]]; then
  apps=$(find launch -maxdepth 1 -name '*.py' ! -name '__init__.py' ! -name 'app.py' -printf '%f\n' | sed 's/\.py$//' |
    sort | paste -sd ' ')
  die "unknown app $(quote "$app"); expected one of the launchers in launch/: $apps."
fi
if [[ -z $repo ]]; then
  git rev-parse --verify --quiet "$ref^{commit}" >/dev/null ||
    die "--ref=$(quote "$ref") is not a commit of this repository."
  if [[ $ref == HEAD && -n $(git status --porcelain --untracked-files=no) ]]; then
    echo "note: uncommitted changes are not copied (a git archive of HEAD); commit them to deploy them." >&2
  fi
fi

zone_args=("--zone=$zone")
[[ -z $project ]] || zone_args+=("--project=$project")
worker_args=("${zone_args[@]}" --worker=all)
((internal_ip == 0)) || worker_args+=(--internal-ip)

run() {
  if ((dry_run)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

# Runs a shell command on every worker.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${worker_args[@]}" "--command=$1"
}

# 1. The slice.
describe=(gcloud compute tpus tpu-vm describe "$name" "${zone_args[@]}" "--format=value(acceleratorType,state)")
create=(gcloud compute tpus tpu-vm create "$name" "${zone_args[@]}" "--accelerator-type=$accelerator"
  "--version=$version" ${create_args[@]+"${create_args[@]}"})
if ((dry_run)); then
  echo "# the slice: reused when describe finds it READY with accelerator type $accelerator, else created"
  run "${describe[@]}"
  run "${create[@]}"
elif found=$("${describe[@]}" 2>/dev/null); then
  read -r found_type found_state <<<"$found"
  [[ ${found_type,,} == "${accelerator,,}" ]] ||
    die "slice $name exists with accelerator type ${found_type:-unknown}, not $accelerator; pick another" \
      "--name or delete it (gcloud compute tpus tpu-vm delete $name --zone=$zone)."
  [[ $found_state == READY ]] ||
    die "slice $name is ${found_state:-in an unknown state}, not READY; start it" \
      "(gcloud compute tpus tpu-vm start $name --zone=$zone) or delete it."
  echo "reusing slice $name ($found_type, $found_state)"
else
  run "${create[@]}"
fi

# 2. The code, unpacked into a fresh $dir that inherits the kept entries of the old one.
old=$(quote "$dir") new=$(quote "$dir.new")
keep="for entry in .venv checkpoints runs; do if [ -e $old/\$entry ]; then mv $old/\$entry $new/; fi; done"
keep+=" && rm -rf $old && mv $new $old"
if [[ -n $repo ]]; then
  fetch="rm -rf $new && git clone --quiet $(quote "$repo") $new && git -C $new checkout --quiet $(quote "$ref")"
  on_workers "$fetch && $keep"
else
  archive="${TMPDIR:-/tmp}/o1jax-$name.tar.gz"
  run git archive --format=tar.gz "--output=$archive" "$ref"
  run gcloud compute tpus tpu-vm scp "$archive" "$name:o1jax-deploy.tar.gz" "${worker_args[@]}"
  unpack="rm -rf $new && mkdir -p $new && tar -xzf o1jax-deploy.tar.gz -C $new && rm -f o1jax-deploy.tar.gz"
  on_workers "$unpack && $keep"
fi

# 3. The environment, 4. the user's setup.
((install == 0)) || on_workers "cd $old && bash launch/install.sh tpu"
[[ -z $setup ]] || on_workers "cd $old && $setup"

# 5. The app: the same command line on every worker, in one ssh.
app_command="cd $old && $(quote_all env O1JAX_DISTRIBUTED=auto ${envs[@]+"${envs[@]}"} .venv/bin/python -m \
  "launch.$app" "$@")"
if [[ -n $logs ]]; then
  ((dry_run)) || mkdir -p "$logs"
  run gcloud compute tpus tpu-vm ssh "$name" "${worker_args[@]}" "--output-directory=$logs" "--command=$app_command"
else
  on_workers "$app_command"
fi
