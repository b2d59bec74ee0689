# Shared by scripts/test and scripts/demo: a project virtualenv and a local RabbitMQ.
# Sourced, not run. Idempotent: a second call costs a hash comparison and a port probe.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GEO_VENV:-$REPO_ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
  if [ ! -x "$PY" ]; then
    echo "==> creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.bangui-geo-installed" want
  want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing bangui-geo and its test dependencies"
    if ! { "$PY" -m pip install --upgrade pip && "$PY" -m pip install -e "$REPO_ROOT[test]"; } \
        >"$VENV/install.log" 2>&1; then
      cat "$VENV/install.log" >&2
      echo "installing bangui-geo failed (log above)" >&2
      return 1
    fi
    echo "$want" > "$stamp"
  fi
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Start the local broker if it is installed and stopped; wait until it takes connections.
ensure_rabbitmq() {
  local url="${1:-amqp://guest:guest@127.0.0.1:5672/}" hostport host port
  hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
  host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=5672
  if port_open "$host" "$port"; then return 0; fi
  case "$host" in localhost|127.0.0.1|::1) ;; *)
    echo "RabbitMQ at $host:$port is not reachable (and it is not local, so not started here)" >&2
    return 1 ;;
  esac
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "RabbitMQ is not running on $host:$port and rabbitmq-server is not installed" >&2
    return 1
  fi
  echo "==> starting RabbitMQ (rabbitmq-server -detached)"
  rabbitmq-server -detached || true
  for _ in $(seq 1 120); do
    if port_open "$host" "$port"; then
      rabbitmqctl await_startup >/dev/null 2>&1 || true
      return 0
    fi
    sleep 1
  done
  echo "RabbitMQ did not open $host:$port within 120 s" >&2
  return 1
}

# The management API makes per-test vhosts fast; tests fall back to rabbitmqctl without it.
ensure_rabbitmq_management() {
  if port_open 127.0.0.1 15672; then return 0; fi
  command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
  rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || return 0
  for _ in $(seq 1 30); do port_open 127.0.0.1 15672 && return 0; sleep 1; done
  return 0
}

# apt-get install PACKAGE [WHY] where this runs as root on a machine with apt-get: returns 1
# without trying otherwise (the caller says what is missing), and shows apt's log if it fails.
apt_install_as_root() {
  local package="$1" why="${2:+, $2}"
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  echo "==> installing $package (apt-get$why)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"; } \
    >/tmp/bangui-geo-apt.log 2>&1 || { cat /tmp/bangui-geo-apt.log >&2; return 1; }
}

# The fail2ban end-to-end test runs a real fail2ban-server (Debian package fail2ban).
ensure_fail2ban() {
  command -v fail2ban-server >/dev/null 2>&1 && return 0
  apt_install_as_root fail2ban && return 0
  echo "fail2ban-server is missing: install the fail2ban package (apt-get install -y fail2ban)" >&2
  return 1
}

# systemd-analyze checks the agent's unit (tests/unit/test_agent_deploy.py); no systemd needs to run.
ensure_systemd_analyze() {
  command -v systemd-analyze >/dev/null 2>&1 && return 0
  apt_install_as_root systemd "for systemd-analyze" && return 0
  echo "systemd-analyze is missing: install the systemd package (apt-get install -y systemd)" >&2
  return 1
}

# PostgreSQL for the tests of the postgres store: the local cluster, started if it is stopped
# (installed first where it is missing, with trust for loopback connections: a test machine).
ensure_postgres() {
  port_open 127.0.0.1 5432 && return 0
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install_as_root postgresql || {
      echo "PostgreSQL is not running on 127.0.0.1:5432 and is not installed" >&2
      return 1
    }
    local hba
    hba="$(ls /etc/postgresql/*/main/pg_hba.conf | tail -1)"
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  echo "==> starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | tail -1)" main start || true
  for _ in $(seq 1 30); do port_open 127.0.0.1 5432 && return 0; sleep 1; done
  echo "PostgreSQL did not open 127.0.0.1:5432 within 30 s" >&2
  return 1
}
