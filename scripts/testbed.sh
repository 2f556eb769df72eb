#!/usr/bin/env bash
# The docker-compose testbed: Kubernetes-style service networking with no
# cluster (README, "docker-compose testbed").
#
#   scripts/testbed.sh up       build what is missing, start, wait until every agent ACKed
#   scripts/testbed.sh down     stop and remove containers, networks and volumes
#   scripts/testbed.sh status   agents and Services as the control plane sees them
#   scripts/testbed.sh build    release binaries and the image only
#   scripts/testbed.sh compose ARGS...   docker compose with the testbed's settings
#
# Environment:
#   SWITCHYARD_IMAGE       image the compose file runs (default switchyard:dev)
#   SWITCHYARD_BASE_IMAGE  base of that image; default switchyard-base:<codename>,
#                          built here with debootstrap when missing (no registry
#                          needed). A pullable debian:bookworm-slim works too.
#   COMPOSE_PROJECT_NAME   compose project (default switchyard)
#   SWITCHYARD_PROFILE     cargo profile of the binaries (default release)
#   SWITCHYARD_NET         first three octets of the testbed's /24 (default 10.210.0)
#   SWITCHYARD_NO_BUILD=1  `up` uses the image as it is (the tests set it)
set -euo pipefail
cd "$(dirname "$0")/.."

export SWITCHYARD_IMAGE="${SWITCHYARD_IMAGE:-switchyard:dev}"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-switchyard}"
profile="${SWITCHYARD_PROFILE:-release}"
codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")"
codename="${codename:-bookworm}"
base="${SWITCHYARD_BASE_IMAGE:-switchyard-base:$codename}"
# What the nodes need (iptables-nft, ip, conntrack, nft, sysctl) and what a
# user wants in the client (curl, dig, jq).
packages="iptables,iproute2,conntrack,nftables,procps,curl,dnsutils,jq,ca-certificates"

say() { printf 'testbed: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# `docker compose` (v2) where it exists, else `docker-compose` (v1).
compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose "$@"
  else
    die "neither 'docker compose' nor 'docker-compose' is installed"
  fi
}

# The Debian mirror this machine's own apt sources name (deb822 .sources
# files first, then sources.list), so nothing is hard-coded.
apt_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  die "no Debian mirror found in /etc/apt sources; set SWITCHYARD_BASE_IMAGE to a base image you can pull"
}

# A Debian base image made with debootstrap and `docker import`: no image
# registry is needed.
build_base() {
  if docker image inspect "$base" >/dev/null 2>&1; then
    return
  fi
  if [ -n "${SWITCHYARD_BASE_IMAGE:-}" ]; then
    say "pulling $base"
    docker pull "$base" || die "cannot pull $base"
    return
  fi
  [ "$(id -u)" = 0 ] || die "building the base image needs root (debootstrap); or set SWITCHYARD_BASE_IMAGE"
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; }
  fi
  local mirror dir
  mirror=$(apt_mirror)
  dir=$(mktemp -d /tmp/switchyard-base.XXXXXX)
  # No RETURN trap: it would stay set and fire on every later return.
  say "building $base: debootstrap $codename from $mirror (about a minute)"
  debootstrap --variant=minbase --include="$packages" "$codename" "$dir" "$mirror" >"$dir.log" 2>&1 ||
    { tail -20 "$dir.log" >&2; rm -rf "$dir"; die "debootstrap failed (log: $dir.log)"; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  if ! tar -C "$dir" -c . | docker import -c 'CMD ["/bin/bash"]' - "$base" >/dev/null; then
    rm -rf "$dir"
    die "docker import of $base failed"
  fi
  rm -rf "$dir" "$dir.log"
  say "built $base"
}

build_binaries() {
  say "building the binaries ($profile)"
  cargo build --locked --profile "$profile" \
    -p switchyard-control-plane -p switchyard-agent -p switchyard-testbed-web
}

# The image: the base plus the host-built binaries (COPY only, unless the
# base lacks the node's tools, as debian:bookworm-slim does).
build_image() {
  local target dir out
  # Where cargo put the binaries: CARGO_TARGET_DIR and .cargo/config.toml are honoured.
  target=$(scripts/target-dir.sh)
  dir="$target/testbed-image"
  out="$target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
  rm -rf "$dir" && mkdir -p "$dir/bin"
  cp testbed/Dockerfile "$dir/"
  cp "$out/switchyard-control-plane" "$out/switchyard-agent" "$out/switchyard-testbed-web" \
    testbed/switchyard-node "$dir/bin/"
  say "building $SWITCHYARD_IMAGE on $base"
  docker build -q --build-arg BASE="$base" --build-arg PACKAGES="${packages//,/ }" \
    -t "$SWITCHYARD_IMAGE" "$dir" >/dev/null
}

build() {
  build_binaries
  build_base
  build_image
}

# Waits until every node's agent has ACKed the control plane's snapshot.
wait_ready() {
  local deadline=$((SECONDS + 120)) doc
  while [ $SECONDS -lt $deadline ]; do
    doc=$(compose exec -T control-plane curl -fsS localhost:9901/status 2>/dev/null || true)
    if [ -n "$doc" ] && echo "$doc" | compose exec -T control-plane jq -e '
        .ready and ([.agents[] | select(.connected and .acked_version == $v)] | length) >= 3
      ' --arg v "$(echo "$doc" | compose exec -T control-plane jq -r .version)" >/dev/null 2>&1; then
      say "ready: every node ACKed the snapshot"
      return
    fi
    sleep 1
  done
  compose ps >&2 || true
  die "the testbed did not become ready within 120 s (scripts/testbed.sh status, compose logs)"
}

status() {
  local tab doc
  tab=$(printf '\t')
  if doc=$(compose exec -T control-plane curl -fsS localhost:9901/status 2>/dev/null); then
    echo "$doc" | compose exec -T control-plane jq -r '"control plane: snapshot \(.version // "none"), ready \(.ready)"'
    echo
    echo "$doc" | compose exec -T control-plane jq -r '
      "AGENT\tCONNECTED\tACKED\tLAST ERROR",
      (.agents[] | "\(.node)\t\(.connected)\t\(.acked_version // "-")\t\(.last_error // "-")")' | column -t -s "$tab"
    echo
    echo "$doc" | compose exec -T control-plane jq -r '
      "SERVICE\tTYPE\tCLUSTER IP\tPORTS\tENDPOINTS (ready/all)",
      (.services[] | "\(.name)\t\(.type)\t\(.cluster_ips | join(",") | if . == "" then "None" else . end)\t\(.ports | join(","))\t\(.ready_endpoints)/\(.endpoints)")' | column -t -s "$tab"
    echo "$doc" | compose exec -T control-plane jq -r '
      if (.invalid_objects | length) > 0 then "", "SKIPPED", (.invalid_objects[] | "  \(.object) \(.field): \(.message)") else empty end,
      (.sources[] | select(.last_error) | "", "SOURCE \(.name): \(.last_error)")'
  else
    echo "control plane: not reachable (stopped or starting); the nodes keep serving their last state"
  fi
  echo
  # Each node's own view: what is in force there and where it came from.
  {
    echo "NODE${tab}VERSION IN FORCE${tab}ORIGIN${tab}CONNECTED${tab}LAST ERROR"
    local node
    for node in node1 node2 node3; do
      compose exec -T "$node" sh -c 'curl -fsS localhost:9902/status 2>/dev/null | jq -r "[.node, (.version // \"-\"), .origin, .connected, (.last_error // \"-\")] | @tsv"' 2>/dev/null ||
        echo "$node${tab}-${tab}down${tab}-${tab}-"
    done
  } | column -t -s "$tab"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    if [ "${SWITCHYARD_NO_BUILD:-}" = 1 ]; then
      docker image inspect "$SWITCHYARD_IMAGE" >/dev/null 2>&1 ||
        die "image $SWITCHYARD_IMAGE is missing: run scripts/testbed.sh build"
    else
      build
    fi
    compose up -d "$@"
    wait_ready
    status
    ;;
  down) compose down -v --remove-orphans "$@" ;;
  status) status ;;
  build) build ;;
  base) build_base ;;
  compose) compose "$@" ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
