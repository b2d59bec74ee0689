#!/usr/bin/env bash
# Builds a stand-in for a base image when no registry answers, from Debian's packages only:
#
#   tests/container/standin.sh python:3.11-slim        # Debian's python3 (3.11) and pip
#   tests/container/standin.sh rabbitmq:3-management   # Debian's rabbitmq-server, management
#                                                      # and prometheus plugins
#   tests/container/standin.sh base                    # only the cached minbase root
#
# A minbase bookworm root (debootstrap, from the mirror apt uses; cached in $LANE_CACHE) gets the
# packages in a chroot, the host's extra CA certificates (a TLS-intercepting proxy's, so pip
# works inside builds) and, for RabbitMQ, an entrypoint that behaves as the official image's does
# for what docker-compose.yml uses: /etc/rabbitmq/conf.d/*.conf, RABBITMQ_ERLANG_COOKIE, the node
# name rabbit@<hostname>, rabbitmq-diagnostics for the healthcheck. Then `docker import`, with the
# label org.bangui-geo.standin saying what it is. Needs root, debootstrap and a Docker engine.
set -euo pipefail
IMAGE="$1"
LANE_CACHE="${LANE_CACHE:-/var/cache/bangui-geo-lane}"
BASE="$LANE_CACHE/bookworm-minbase"

mirror() {
  local uri
  uri="$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ')"
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -f "$BASE/.complete" ]; then
  rm -rf "$BASE"
  mkdir -p "$LANE_CACHE"
  echo "debootstrap --variant=minbase bookworm from $(mirror)"
  debootstrap --variant=minbase bookworm "$BASE" "$(mirror)"
  touch "$BASE/.complete"
fi
[ "$IMAGE" = base ] && exit 0  # only the cached root (scripts/container-lane builds it first)

ROOT="$(mktemp -d "$LANE_CACHE/root.XXXXXX")"
trap 'umount "$ROOT/var/cache/apt/archives" "$ROOT/proc" 2>/dev/null || true; rm -rf "$ROOT"' EXIT
cp -a "$BASE/." "$ROOT/"
rm -f "$ROOT/.complete"
cp /etc/apt/sources.list "$ROOT/etc/apt/sources.list" 2>/dev/null || true
if ls /etc/apt/sources.list.d/debian.sources >/dev/null 2>&1; then
  cp /etc/apt/sources.list.d/debian.sources "$ROOT/etc/apt/sources.list.d/"
  : > "$ROOT/etc/apt/sources.list"
fi
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
mount -t proc proc "$ROOT/proc"
# The .deb files are kept for the next build of this stand-in (one folder per image: apt locks
# it, and the two stand-ins are built at once).
ARCHIVES="$LANE_CACHE/apt-archives/${IMAGE%%:*}"
mkdir -p "$ARCHIVES/partial"
mount --bind "$ARCHIVES" "$ROOT/var/cache/apt/archives"

in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

case "$IMAGE" in
  python:3.11-slim)
    packages=(ca-certificates python3 python3-pip python3-venv python-is-python3)
    label="debian-bookworm python3 stand-in for $IMAGE"
    ;;
  rabbitmq:3-management)
    packages=(ca-certificates rabbitmq-server)
    label="debian-bookworm rabbitmq-server stand-in for $IMAGE"
    ;;
  *) echo "no stand-in for $IMAGE" >&2; exit 2 ;;
esac

in_root apt-get update -qq
# No fsync per file: a crash mid-build only means building the stand-in again.
in_root apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-unsafe-io "${packages[@]}"
# The host's extra CA certificates (e.g. a TLS-intercepting proxy's), trusted inside the image.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
in_root update-ca-certificates >/dev/null

changes=()
case "$IMAGE" in
  python:3.11-slim)
    # The official image's pip installs into its own Python; Debian's refuses (PEP 668).
    rm -f "$ROOT"/usr/lib/python3*/EXTERNALLY-MANAGED
    changes+=(--change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'
              --change 'ENV LANG=C.UTF-8'
              --change 'CMD ["python3"]')
    ;;
  rabbitmq:3-management)
    printf '[rabbitmq_management,rabbitmq_prometheus].\n' > "$ROOT/etc/rabbitmq/enabled_plugins"
    : > "$ROOT/etc/rabbitmq/rabbitmq-env.conf"
    rm -f "$ROOT/etc/rabbitmq/rabbitmq.conf"
    mkdir -p "$ROOT/etc/rabbitmq/conf.d"
    # As the official image's 10-defaults.conf.
    cat > "$ROOT/etc/rabbitmq/conf.d/10-defaults.conf" <<'EOF'
## DEFAULT SETTINGS ARE NOT MEANT TO BE TAKEN STRAIGHT INTO PRODUCTION
loopback_users.guest = false
listeners.tcp.default = 5672
default_pass = guest
default_user = guest
management.tcp.port = 15672
log.console = true
log.file = false
EOF
    cat > "$ROOT/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# Stand-in entrypoint: the parts of the official image's that docker-compose.yml relies on.
set -e
cookie=/var/lib/rabbitmq/.erlang.cookie
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
  printf '%s' "$RABBITMQ_ERLANG_COOKIE" > "$cookie"
  chown rabbitmq:rabbitmq "$cookie"
  chmod 600 "$cookie"
fi
chown rabbitmq:rabbitmq /var/lib/rabbitmq
unset RABBITMQ_ERLANG_COOKIE
if [ "$1" = rabbitmq-server ]; then
  shift
  export HOME=/var/lib/rabbitmq RABBITMQ_CONFIG_FILES=/etc/rabbitmq/conf.d
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
EOF
    chmod +x "$ROOT/usr/local/bin/docker-entrypoint.sh"
    rm -rf "$ROOT/var/lib/rabbitmq/mnesia" "$ROOT/var/lib/rabbitmq/.erlang.cookie"
    # As the official image, which says its version in RABBITMQ_VERSION.
    version="$(in_root dpkg-query -W -f '${Version}' rabbitmq-server | cut -d- -f1)"
    changes+=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
              --change 'ENV LANG=C.UTF-8'
              --change "ENV RABBITMQ_VERSION=$version"
              --change 'VOLUME /var/lib/rabbitmq'
              --change 'EXPOSE 4369 5671 5672 15671 15672 15692 25672'
              --change 'ENTRYPOINT ["docker-entrypoint.sh"]'
              --change 'CMD ["rabbitmq-server"]')
    ;;
esac

umount "$ROOT/var/cache/apt/archives" "$ROOT/proc"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT/usr/sbin/policy-rc.d"
tar -C "$ROOT" --numeric-owner -c . \
  | docker import "${changes[@]}" --change "LABEL org.bangui-geo.standin=\"$label\"" - "$IMAGE"
echo "built stand-in $IMAGE"
