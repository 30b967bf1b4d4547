#!/usr/bin/env bash
# claude-sandbox.sh: run Claude Code in a container, optionally with Seq (--otel) and the otelproxy
# logging proxy (--log-api) beside it on one user-defined network. See sandbox/README.md.
#
# Secrets never appear on a command line: every credential is passed to the runtime by name
# (`-e NAME`), so the runtime copies the value from this script's environment.
# Written for bash 3.2+ (macOS) as well as current bash: no associative arrays, no mapfile, and
# empty arrays are expanded as ${a[@]+"${a[@]}"} so `set -u` accepts them.
set -euo pipefail

case ${BASH_SOURCE[0]} in
  */*) script_dir=${BASH_SOURCE[0]%/*} ;;
  *) script_dir=. ;;
esac
SCRIPT_DIR=$(cd "$script_dir" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
readonly SCRIPT_DIR REPO_ROOT

readonly CLAUDE_IMAGE=${CLAUDE_SANDBOX_IMAGE:-claude-sandbox:local}
readonly PROXY_IMAGE=${OTELPROXY_IMAGE:-otelproxy:local}
readonly SEQ_IMAGE=${SEQ_IMAGE:-docker.io/datalust/seq:latest}
readonly CLAUDE_VERSION=${CLAUDE_CODE_VERSION:-latest}
# The image's non-root user (`node` in the Node base image).
readonly CLAUDE_UID=1000
readonly CLAUDE_HOME=/home/node
readonly HOST_CLAUDE_MOUNT=/opt/claude-host
readonly SEQ_INGEST_URL=http://seq:5341
readonly PROXY_URL=http://api-logger:8000

mode=""
runtime=""
name=claude-sandbox
port_base=5480
dry_run=0
remove_on_exit=0
otel=0
log_api=0
volumes=0
repo=""
branch=""
claude_args=()

# Plain printf: the script needs nothing but bash and the container runtime.
usage() {
  printf '%s' 'Usage: claude-sandbox.sh [flags] [mode] [-- claude arguments...]

Run Claude Code in a container. Modes:
  mount     the current directory is /workspace (default)
  clone     --repo URL [--branch B] is cloned into a volume that is /workspace
  recover   reattach to the kept Claude container (and restart its Seq/proxy)
  clean     remove the containers and the network; with --volumes the volumes too
  build     build the Claude Code image and the otelproxy image

Flags:
  --otel               start Seq and send the telemetry of Claude Code itself to it
  --log-api            start the otelproxy container (exporting to that Seq) and point
                       Claude Code at it; needs --otel
  --runtime R          podman or docker (default: podman if present, else docker)
  --name N             name of the Claude container; also prefixes the others
                       (default: claude-sandbox)
  --port-base P        the Seq UI on 127.0.0.1:P, the proxy on 127.0.0.1:P+1 (default: 5480)
  --rm                 remove the Claude container when it exits (recover cannot resume it)
  --repo URL           repository to clone (clone mode)
  --branch B           branch to clone (clone mode)
  --volumes            with clean: also remove the volumes (home, workspace, record, Seq data)
  --dry-run            print every container command, one per line; run nothing
  -h, --help           show this help

Credentials, passed from this environment by name, never by value:
  ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN, CLAUDE_CODE_OAUTH_TOKEN   for Claude Code
  SEQ_API_KEY                     Seq API key for the telemetry and the proxy (optional)
  SEQ_FIRSTRUN_ADMINPASSWORD      Seq admin password on first start; without it Seq
                                  starts with authentication off (bound to 127.0.0.1)
~/.claude is mounted read-only when present, so a subscription login works.

Environment: CLAUDE_SANDBOX_IMAGE, OTELPROXY_IMAGE, SEQ_IMAGE, CLAUDE_CODE_VERSION,
NODE_IMAGE and PYTHON_IMAGE (base images for build), OTELPROXY_DEFAULT_UPSTREAM (the
upstream of the proxy instead of https://api.anthropic.com).
'
}

die() { # message [status]
  printf 'claude-sandbox: %s\n' "$1" >&2
  exit "${2:-1}"
}

note() {
  printf 'claude-sandbox: %s\n' "$*" >&2
}

# Run a container command, or with --dry-run print it instead: one line, each word quoted only
# when the shell needs it, so the line can be pasted back into a shell.
run() {
  if ((dry_run)); then
    local word line=""
    for word in "$@"; do
      if [[ ! $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf -v word '%q' "$word"; fi
      line+=" $word"
    done
    printf '%s\n' "${line# }"
  else
    "$@"
  fi
}

# run, but what the runtime prints (the name or id of what it made or started) is dropped:
# stdout is Claude Code's. A dry run still prints the command.
run_quiet() {
  if ((dry_run)); then run "$@"; else "$@" >/dev/null; fi
}

# True when the runtime knows the object. Never called in dry-run (everything counts as absent).
runtime_has() { # kind name
  local verb=inspect
  if [[ $runtime == podman && $1 != container ]]; then
    verb=exists # podman: network/image/volume exists; docker has only inspect
  fi
  "$runtime" "$1" "$verb" "$2" >/dev/null 2>&1
}

exists() { # kind name
  ((dry_run)) && return 1
  runtime_has "$1" "$2"
}

container_state() { # name -> running | stopped | absent
  local running
  if ((dry_run)) ||
    ! running=$("$runtime" container inspect --format '{{.State.Running}}' "$1" 2>/dev/null); then
    echo absent
  elif [[ $running == true ]]; then
    echo running
  else
    echo stopped
  fi
}

# Rootless podman maps the invoking user into the container; root podman has no user namespace
# and refuses --userns=keep-id. A dry run asks no runtime, so it goes by the invoking user.
podman_is_rootless() {
  if ((dry_run)); then
    ((EUID != 0))
  else
    [[ $(podman info --format '{{.Host.Security.Rootless}}' 2>/dev/null) == true ]]
  fi
}

need_value() { # flag remaining-argument-count next-argument
  if (($2 < 2)) || [[ $3 == -* ]]; then die "$1 needs a value (see --help)" 2; fi
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --otel) otel=1 ;;
      --log-api) log_api=1 ;;
      --dry-run) dry_run=1 ;;
      --rm) remove_on_exit=1 ;;
      --volumes) volumes=1 ;;
      --runtime | --name | --port-base | --repo | --branch)
        need_value "$1" $# "${2-}"
        set_option "$1" "$2"
        shift
        ;;
      --runtime=* | --name=* | --port-base=* | --repo=* | --branch=*)
        set_option "${1%%=*}" "${1#*=}"
        ;;
      --)
        shift
        claude_args=("$@")
        break
        ;;
      -*) die "unknown flag: $1 (see --help)" 2 ;;
      mount | clone | recover | clean | build)
        [[ -z $mode ]] || die "one mode at a time: got '$mode' and '$1'" 2
        mode=$1
        ;;
      *) die "unknown mode: $1 (modes: mount clone recover clean build)" 2 ;;
    esac
    shift
  done
  mode=${mode:-mount}
}

set_option() { # flag value
  case $1 in
    --runtime) runtime=$2 ;;
    --name) name=$2 ;;
    --port-base) port_base=$2 ;;
    --repo) repo=$2 ;;
    --branch) branch=$2 ;;
  esac
}

validate() {
  if ((log_api && !otel)); then
    die "--log-api needs --otel: the proxy exports its record to the Seq that --otel starts" 2
  fi
  case $runtime in
    "" | podman | docker) ;;
    *) die "--runtime must be podman or docker, not '$runtime'" 2 ;;
  esac
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] ||
    die "--name must be letters, digits, '_', '.', '-' (got '$name')" 2
  if ! [[ $port_base =~ ^[0-9]{1,5}$ ]] || ((10#$port_base < 1 || 10#$port_base > 65534)); then
    die "--port-base must be a port number from 1 to 65534 (got '$port_base')" 2
  fi
  port_base=$((10#$port_base))
  if [[ $mode == clone ]]; then
    [[ -n $repo ]] || die "clone needs --repo URL" 2
  elif [[ -n $repo || -n $branch ]]; then
    die "--repo and --branch are for clone mode only" 2
  fi
  if ((${#claude_args[@]})) && [[ $mode != mount && $mode != clone ]]; then
    die "arguments after -- are for Claude Code in mount or clone mode" 2
  fi
}

detect_runtime() {
  if [[ -n $runtime ]]; then
    # A dry run only prints, so a named runtime need not be installed.
    ((dry_run)) || command -v "$runtime" >/dev/null 2>&1 ||
      die "container runtime '$runtime' not found on PATH"
  elif command -v podman >/dev/null 2>&1; then
    runtime=podman
  elif command -v docker >/dev/null 2>&1; then
    runtime=docker
  else
    die "no container runtime found: install podman or docker, or name one with --runtime"
  fi
}

build_image() { # image containerfile context [build arguments...]
  local image=$1 file=$2 context=$3
  shift 3
  local format=()
  # podman builds OCI images by default, which drop HEALTHCHECK; the docker format keeps it.
  [[ $runtime == podman ]] && format=(--format docker)
  run "$runtime" build ${format[@]+"${format[@]}"} -t "$image" -f "$file" "$@" "$context"
}

# NODE_IMAGE and PYTHON_IMAGE name other base images (a mirror, or images built locally).
build_claude_image() {
  local base=()
  if [[ -n ${NODE_IMAGE:-} ]]; then base=(--build-arg "NODE_IMAGE=$NODE_IMAGE"); fi
  build_image "$CLAUDE_IMAGE" "$SCRIPT_DIR/Containerfile.claude" "$SCRIPT_DIR" \
    --build-arg "CLAUDE_CODE_VERSION=$CLAUDE_VERSION" ${base[@]+"${base[@]}"}
}

build_proxy_image() {
  local base=()
  if [[ -n ${PYTHON_IMAGE:-} ]]; then base=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"); fi
  build_image "$PROXY_IMAGE" "$REPO_ROOT/Containerfile" "$REPO_ROOT" ${base[@]+"${base[@]}"}
}

ensure_images() {
  exists image "$CLAUDE_IMAGE" || build_claude_image
  if ((log_api)); then
    exists image "$PROXY_IMAGE" || build_proxy_image
  fi
}

ensure_network() {
  exists network "$network" || run_quiet "$runtime" network create "$network"
}

# Reuse a running container, start a stopped one, or create it detached.
ensure_service() { # container [run arguments...]
  local container=$1
  shift
  case $(container_state "$container") in
    running) note "reusing running container $container" ;;
    stopped) run_quiet "$runtime" start "$container" ;;
    absent) run_quiet "$runtime" run -d --name "$container" "$@" ;;
  esac
}

start_seq() {
  local args=(--network "$network" --network-alias seq
    -p "127.0.0.1:$port_base:80" -v "$name-seq-data:/data" -e ACCEPT_EULA=Y)
  if [[ -n ${SEQ_FIRSTRUN_ADMINPASSWORD:-} ]]; then
    args+=(-e SEQ_FIRSTRUN_ADMINPASSWORD)
  else
    args+=(-e SEQ_FIRSTRUN_NOAUTHENTICATION=true)
  fi
  ensure_service "$name-seq" "${args[@]}" "$SEQ_IMAGE"
}

# The proxy must reach seq:5341 before any traffic, or its first exports are given up on. Asked
# in the proxy container itself (exec), once it runs: up to $2 seconds, as Seq takes a while to
# accept connections after it starts. `seq` resolves as soon as Seq's container runs, so a name
# that still fails to resolve after 10 s, or takes more than 2 s to (longer than an export can
# wait), means this container's DNS is broken: exit status 3.
proxy_reaches_seq() { # container seconds
  run "$runtime" exec "$1" python -c '
import socket, sys, time
start = time.monotonic()
while True:
    began = time.monotonic()
    try:
        address = socket.getaddrinfo("seq", 5341, type=socket.SOCK_STREAM)[0][4][:2]
        took = time.monotonic() - began
        dns = took > 2
        problem = f"resolving seq took {took:.0f} s"
        if not dns:
            socket.create_connection(address, timeout=2).close()
            break
    except socket.gaierror as error:
        dns, problem = True, f"seq does not resolve ({error})"
    except OSError as error:
        dns, problem = False, f"seq:5341 does not answer ({error})"
    waited = time.monotonic() - start
    if (dns and waited > 10) or waited > float(sys.argv[1]):
        print(f"the proxy container cannot reach Seq: {problem}", file=sys.stderr)
        sys.exit(3 if dns else 1)
    time.sleep(0.5)
' "$2"
}

# Rootless podman 4.3 (aardvark-dns 1.4) at times leaves one new container's DNS queries
# unanswered while it answers the other containers': `seq` then takes 10-20 s to resolve in the
# proxy, or fails to, and every export times out (sandbox/README.md). The proxy normally finds
# `seq` in its /etc/hosts (start_proxy), so this is the fallback for when the runtime gave no
# address: restarting the proxy container sets its network up again.
wait_for_seq() { # proxy container
  local status=0
  proxy_reaches_seq "$1" 60 || status=$?
  case $status in
    0) return 0 ;;
    3) ;;
    *)
      note "Seq is not reachable from the proxy yet; its export retries"
      return 0
      ;;
  esac
  note "the proxy container cannot resolve seq; restarting it"
  run_quiet "$runtime" restart "$1"
  proxy_reaches_seq "$1" 30 || note "Seq is still not reachable from the proxy; its export retries"
}

# Seq's address on the sandbox network, as the runtime reports it (a dry run cannot ask: it
# shows a placeholder). Empty when the runtime gives none.
seq_address() {
  if ((dry_run)); then
    printf '<address-of-%s>\n' "$name-seq"
  else
    "$runtime" container inspect \
      --format "{{(index .NetworkSettings.Networks \"$network\").IPAddress}}" "$name-seq" \
      2>/dev/null || true
  fi
}

# The `seq` entries a kept proxy container was created with (--add-host), one per line.
proxy_seq_hosts() { # container
  local line
  while IFS= read -r line; do
    if [[ $line == seq:* ]]; then printf '%s\n' "$line"; fi
  done < <("$runtime" container inspect \
    --format '{{range .HostConfig.ExtraHosts}}{{println .}}{{end}}' "$1" 2>/dev/null || true)
}

# The proxy finds Seq by the address the runtime gave it, written into its /etc/hosts, and not
# by DNS: under rootless podman 4.3 (aardvark-dns 1.4) the proxy's queries for `seq` at times
# went unanswered for 10-22 s, longer than an export may take (sandbox/README.md). A kept proxy
# made for another address (Seq's container was recreated, or got another address when it
# started again) is replaced, as an existing container's hosts cannot be changed.
start_proxy() {
  local was seq_ip
  was=$(container_state "$name-api-logger")
  seq_ip=$(seq_address)
  if [[ $was != absent && -n $seq_ip && $(proxy_seq_hosts "$name-api-logger") != "seq:$seq_ip" ]]; then
    note "Seq's address is now $seq_ip: replacing the proxy container made for another"
    run_quiet "$runtime" rm -f "$name-api-logger"
    was=absent
  fi
  local args=(--network "$network" --network-alias api-logger
    -p "127.0.0.1:$((port_base + 1)):8000" -v "$name-logs:/var/log/otelproxy"
    -e "OTELPROXY_SEQ_URL=$SEQ_INGEST_URL")
  if [[ -n $seq_ip ]]; then
    args+=(--add-host "seq:$seq_ip")
  else
    note "the runtime gave no address for $name-seq: the proxy finds it by DNS"
  fi
  if [[ -n ${SEQ_API_KEY:-} ]]; then
    export OTELPROXY_SEQ_API_KEY=$SEQ_API_KEY
    args+=(-e OTELPROXY_SEQ_API_KEY)
  fi
  # Another Anthropic-compatible upstream (a gateway, or a fake one in tests).
  if [[ -n ${OTELPROXY_DEFAULT_UPSTREAM:-} ]]; then args+=(-e OTELPROXY_DEFAULT_UPSTREAM); fi
  ensure_service "$name-api-logger" "${args[@]}" "$PROXY_IMAGE"
  if ((otel)) && [[ $was != running ]]; then wait_for_seq "$name-api-logger"; fi
}

start_companions() {
  if ((otel)); then start_seq; fi
  if ((log_api)); then start_proxy; fi
}

claude_run_args() { # fills the array `args`
  args=(-i --name "$name" --network "$network" --init --security-opt no-new-privileges)
  if ((dry_run)) || [[ -t 0 ]]; then args+=(-t); fi
  if ((remove_on_exit)); then args+=(--rm); fi
  if [[ $runtime == podman ]] && podman_is_rootless; then
    # Files the container writes in /workspace belong to the invoking user on the host.
    # (Root podman refuses keep-id; there, as with docker, the container user is uid 1000.)
    args+=("--userns=keep-id:uid=$CLAUDE_UID,gid=$CLAUDE_UID")
  fi
  if [[ $mode == clone ]]; then
    args+=(-v "$name-workspace:/workspace")
    export CLAUDE_SANDBOX_REPO=$repo # by name: a clone URL may carry a token
    args+=(-e CLAUDE_SANDBOX_REPO)
    if [[ -n $branch ]]; then
      export CLAUDE_SANDBOX_BRANCH=$branch
      args+=(-e CLAUDE_SANDBOX_BRANCH)
    fi
  else
    args+=(-v "$PWD:/workspace")
  fi
  args+=(-w /workspace -v "$name-home:$CLAUDE_HOME")
  if [[ -d $HOME/.claude ]]; then
    args+=(-v "$HOME/.claude:$HOST_CLAUDE_MOUNT:ro")
  fi
  local var
  for var in ANTHROPIC_API_KEY ANTHROPIC_AUTH_TOKEN CLAUDE_CODE_OAUTH_TOKEN; do
    if [[ -n ${!var:-} ]]; then args+=(-e "$var"); fi
  done
  if ((otel)); then
    args+=(-e CLAUDE_CODE_ENABLE_TELEMETRY=1 -e OTEL_LOGS_EXPORTER=otlp
      -e OTEL_METRICS_EXPORTER=none -e OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
      -e "OTEL_EXPORTER_OTLP_ENDPOINT=$SEQ_INGEST_URL/ingest/otlp")
    if [[ -n ${SEQ_API_KEY:-} ]]; then
      export OTEL_EXPORTER_OTLP_HEADERS="X-Seq-ApiKey=$SEQ_API_KEY"
      args+=(-e OTEL_EXPORTER_OTLP_HEADERS)
    fi
  fi
  if ((log_api)); then args+=(-e "ANTHROPIC_BASE_URL=$PROXY_URL"); fi
}

start_claude() {
  case $(container_state "$name") in
    running) die "container $name is already running: attach with 'recover', or pick another --name" ;;
    stopped)
      # Its state lives in the home and workspace volumes, which the new container mounts again.
      note "replacing the stopped container $name (its volumes are kept)"
      run "$runtime" rm "$name"
      ;;
    absent) ;;
  esac
  local -a args
  claude_run_args
  run "$runtime" run "${args[@]}" "$CLAUDE_IMAGE" claude ${claude_args[@]+"${claude_args[@]}"}
}

announce() {
  ((dry_run)) && return 0
  if ((otel)); then note "Seq UI: http://127.0.0.1:$port_base"; fi
  if ((log_api)); then note "otelproxy: http://127.0.0.1:$((port_base + 1))"; fi
}

start_sandbox() { # mount and clone
  ensure_images
  ensure_network
  start_companions
  announce
  start_claude
}

resume_if_stopped() { # container
  if [[ $(container_state "$1") == stopped ]]; then run_quiet "$runtime" start "$1"; fi
}

recover() {
  ensure_network
  if ((otel)); then start_seq; else resume_if_stopped "$name-seq"; fi
  if ((log_api)); then start_proxy; else resume_if_stopped "$name-api-logger"; fi
  announce
  local state
  state=$(container_state "$name")
  # A dry run cannot look, so it shows the command for a kept, stopped container.
  ((dry_run)) && state=stopped
  case $state in
    running) run "$runtime" attach "$name" ;;
    stopped) run "$runtime" start --attach --interactive "$name" ;;
    absent) die "no kept container named $name: start one with 'mount' or 'clone' (without --rm)" ;;
  esac
}

# In a dry run every object counts as present, so the whole clean-up is shown.
remove_if_present() { # kind name [remove command...]
  local kind=$1 object=$2
  shift 2
  if ((dry_run)) || runtime_has "$kind" "$object"; then run "$runtime" "$@" "$object"; fi
}

clean() {
  local container volume
  for container in "$name" "$name-api-logger" "$name-seq"; do
    remove_if_present container "$container" rm -f
  done
  remove_if_present network "$network" network rm
  if ((volumes)); then
    for volume in "$name-home" "$name-workspace" "$name-logs" "$name-seq-data"; do
      remove_if_present volume "$volume" volume rm
    done
  fi
}

main() {
  parse_args "$@"
  validate
  detect_runtime
  network=$name-net
  case $mode in
    mount | clone) start_sandbox ;;
    recover) recover ;;
    clean) clean ;;
    build)
      build_proxy_image
      build_claude_image
      ;;
  esac
}

main "$@"
