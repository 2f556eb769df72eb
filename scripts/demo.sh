#!/usr/bin/env bash
# Runs Switchyard locally with built-in defaults: a control plane serving the
# manifests in examples/ and one agent (data plane "none": it records what it
# would program; DNS on 127.0.0.1:5353). Every listener is on loopback
# (gRPC 127.0.0.1:18000, admin 127.0.0.1:9901 and :9902), so nothing on the
# host changes and nothing is reachable from other machines.
# State goes under ./.switchyard/. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p switchyard-control-plane -p switchyard-agent
# Where cargo put them: CARGO_TARGET_DIR and .cargo/config.toml are honoured.
bin="$(scripts/target-dir.sh)/release"
state=.switchyard
mkdir -p "$state"

"$bin/switchyard-control-plane" --source file:examples --state-dir "$state/control-plane" \
  --grpc-listen 127.0.0.1:18000 --admin-listen 127.0.0.1:9901 &
cp_pid=$!
"$bin/switchyard-agent" --node-name demo-node --dataplane none --state-dir "$state/agent" \
  --control-plane http://127.0.0.1:18000 --admin-listen 127.0.0.1:9902 \
  --dns-listen 127.0.0.1:5353 &
agent_pid=$!
trap 'kill $cp_pid $agent_pid 2>/dev/null; wait' EXIT INT TERM

cat <<TXT

Switchyard is running.
  control plane status:  curl -s localhost:9901/status
  one Service:           curl -s 'localhost:9901/status?service=shop/web'
  control plane metrics: curl -s localhost:9901/metrics
  agent status:          curl -s localhost:9902/status
  what the agent holds:  curl -s 'localhost:9902/status?service=shop/web'
  every admin endpoint:  curl -s localhost:9902/
  DNS from the agent:    dig @127.0.0.1 -p 5353 web.shop.svc.cluster.local
Edit a file in examples/ and watch the version move on both.
TXT
wait
