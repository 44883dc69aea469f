#!/usr/bin/env bash
# Records one framework team's chat traffic through the recording proxy:
#
#   bash benchmarks/chat/record.sh autogen|langgraph SERVER_URL [team arguments...]
#   e.g. bash benchmarks/chat/record.sh langgraph http://127.0.0.1:8100 --stream --rounds 2
#
# SERVER_URL: a running OpenAI-compatible server (kvcomm serve with a tool call parser, for the
# tool task: docs/chat-frameworks.md). Writes tests/fixtures/chat/FRAMEWORK.jsonl (or $OUT),
# replacing it, or adding to it with APPEND=1; the team prints one line per conversation on
# stdout. The proxy listens on $PROXY_PORT (default 8200) and stops when the team is done.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: record.sh autogen|langgraph SERVER_URL [team arguments...]"
fw=${1:?$usage}
server=${2:?$usage}
shift 2
case "$fw" in autogen|langgraph) ;; *) echo "record.sh: unknown framework $fw; $usage" >&2; exit 2 ;; esac
venv=build/venv-$fw
[ -x "$venv/bin/python" ] || { echo "record.sh: $venv is missing: bash .ci/chat_clients.sh $fw" >&2; exit 1; }
out=${OUT:-tests/fixtures/chat/$fw.jsonl}
port=${PROXY_PORT:-8200}
[ "${APPEND:-0}" = 1 ] || : >"$out"
python3 benchmarks/chat/record_proxy.py --upstream "$server" --port "$port" --out "$out" &
proxy=$!
trap 'kill "$proxy" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
  sleep 0.2
done
start=$(date +%s)
"$venv/bin/python" "benchmarks/chat/${fw}_team.py" --base-url "http://127.0.0.1:$port/v1" \
  --record "http://127.0.0.1:$port" "$@"
echo "record.sh: $fw: $(wc -l <"$out") calls in $out ($(( $(date +%s) - start )) s for this run)" >&2
