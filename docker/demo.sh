#!/usr/bin/env bash
# Three hospitals train FedLSC in containers, for real: docker/compose.yml (plain) or
# with docker/compose.tls.yml (--tls: TLS everywhere, SuperNode authentication).
#
#   docker/demo.sh [--tls] [--rounds N] [--keep] [--no-build] [--no-restart-check]
#
# 1. builds the images (docker/build_images.sh: local stand-ins of Flower's images where
#    no registry is reachable; the project image is rebuilt from Docker's cache),
# 2. exports the three hospitals' data folders (docker/sites/site_K, from conf/),
# 3. --tls: the coordinator makes its CA and SuperLink certificate (`fedlsc certs`, in
#    docker/certs/coordinator), each hospital its own key pair in its own folder (`fedlsc
#    keys`, docker/certs/hospital-K); the coordinator uses only the .pub files, to register
#    the hospitals,
# 4. starts the stack, registers the hospitals (--tls), runs `flwr run` for N rounds of a
#    tiny configuration (ResNet-10t-SA, 32 px, 2 batches per local epoch), waits for
#    `finished:completed`,
# 5. checks that every hospital wrote its personalized model and local weights into its
#    own volume and that the server wrote its results; copies the results to docker/out/,
# 6. restarts one hospital (docker compose restart) and checks that it comes back with its
#    own layers: its local weights survive in its volume and, in one more (resumed) round,
#    it restores them from there,
# 7. tears everything down, volumes included (--keep leaves the stack running).
# Exits non-zero if any step fails. Prints "TIMING <step> <seconds>" and per-round lines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
tls=0 rounds=2 keep=0 build=1 restart_check=1 run_timeout=1500
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) tls=1 ;;
    --rounds) rounds="$2"; shift ;;
    --keep) keep=1 ;;
    --no-build) build=0 ;;
    --no-restart-check) restart_check=0 ;;
    --timeout) run_timeout="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ------------------------------------------------------------------ tools
PYTHON="${FEDLSC_PYTHON:-$root/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
if ! "$PYTHON" -c "import fedlsc_tools, flwr" 2>/dev/null; then
  echo "demo.sh: $PYTHON cannot import the project and flwr; install it first" \
       "(python3 -m venv .venv && .venv/bin/pip install -e .) or set FEDLSC_PYTHON" >&2
  exit 1
fi
FLWR="$(dirname "$PYTHON")/flwr"
[ -x "$FLWR" ] || FLWR="$(command -v flwr)"
export FLWR_HOME="$here/.flwr" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
project="${FEDLSC_COMPOSE_PROJECT:-fedlsc}"
port="${FEDLSC_SUPERLINK_PORT:-8000}"
export FEDLSC_SUPERLINK_ADDRESS="127.0.0.1:$port"  # compose.yml publishes the SuperLink here

files=(-f "$here/compose.yml")
mode=plain federation=docker-local
if [ "$tls" = 1 ]; then files+=(-f "$here/compose.tls.yml"); mode=tls federation=docker-tls; fi
if docker compose version >/dev/null 2>&1; then dc=(docker compose); else dc=(docker-compose); fi
compose() { "${dc[@]}" -p "$project" "${files[@]}" "$@"; }
out="$here/out/$mode"

say() { echo; echo "demo [$mode] == $*"; }
timing() { echo "TIMING $mode-$1 $2"; }
in_container() {  # in_container SERVICE python-code: run Python in that running service
  local service="$1"; shift
  compose exec -T "$service" python -c "$@"
}

finished=0
on_exit() {
  local code=$?
  if [ "$code" != 0 ] && [ "$finished" = 0 ]; then
    echo "demo [$mode]: FAILED (exit code $code); the services' last log lines:" >&2
    compose logs --no-color --tail=25 >&2 2>/dev/null || true
  fi
  if [ "$keep" = 1 ]; then
    echo "demo [$mode]: --keep: the stack stays up; stop it with:" \
         "${dc[*]} -p $project ${files[*]} down -v"
  else
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
}
trap on_exit EXIT
trap 'exit 143' TERM INT  # so that the teardown runs when CI's timeout stops this script

# ------------------------------------------------------------------ 1. images
if [ "$build" = 1 ]; then
  say "images"
  bash "$here/build_images.sh"
fi

# ------------------------------------------------------------------ 2. site folders
say "each hospital's data folder (docker/sites/site_0..2)"
"$PYTHON" -m fedlsc_tools.site_folders export "$here/sites"

# ------------------------------------------------------------------ 3. credentials
if [ "$tls" = 1 ]; then
  say "credentials: the coordinator's CA and certificate; each hospital's own key pair"
  certs="$here/certs"
  if [ ! -f "$certs/coordinator/server.key" ]; then  # at the coordinator
    "$PYTHON" -m fedlsc_tools.cli certs "$certs/coordinator" \
      --name superlink --name localhost --ip 127.0.0.1
  fi
  for k in 1 2 3; do  # at hospital k, in its own folder; only hospital-k.pub leaves it
    if [ ! -f "$certs/hospital-$k/hospital-$k" ]; then
      "$PYTHON" -m fedlsc_tools.cli keys "$certs/hospital-$k" --name "hospital-$k"
    fi
  done
fi

# The flwr CLI's connection to the compose SuperLink (README: the federation entry).
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "docker-local"

[superlink.docker-local]
address = "127.0.0.1:$port"
insecure = true

[superlink.docker-tls]
address = "127.0.0.1:$port"
root-certificates = "$here/certs/coordinator/ca.crt"
EOF

# ------------------------------------------------------------------ 4. start, register
say "start the stack (project '$project'; a previous demo's containers and volumes are removed)"
compose down -v --remove-orphans >/dev/null 2>&1 || true
start=$SECONDS
if [ "$tls" = 1 ]; then
  # The SuperLink first: SuperNodes with keys it does not know yet are refused (HTTP 412).
  compose up -d superlink
else
  compose up -d
fi
superlink_answers() {  # `flwr ls` exits 0 also when it cannot connect: read its JSON
  "$FLWR" ls "$federation" --format json 2>/dev/null \
    | "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("success") else 1)' 2>/dev/null
}
for _ in $(seq 120); do superlink_answers && break; sleep 2; done
superlink_answers || { echo "the SuperLink does not answer on 127.0.0.1:$port" >&2; exit 1; }
echo "SuperLink answers after $((SECONDS - start)) s"
if [ "$tls" = 1 ]; then
  for k in 1 2 3; do
    "$FLWR" supernode register "$certs/hospital-$k/hospital-$k.pub" "$federation" --name "hospital-$k"
  done
  compose up -d
fi
timing up $((SECONDS - start))
compose ps

# ------------------------------------------------------------------ 5. run
run_config="results-dir='/results' partition.name='folder' dataset.image-size=32 \
training.max-batches-per-epoch=2 model.backbone='resnet10t_sa' model.pretrained='false' \
wait-for-sites-seconds=300"

submit_and_wait() {  # submit_and_wait EXTRA-RUN-CONFIG: sets run_id; fails unless completed
  local submitted status="" began=$SECONDS last=0
  submitted="$("$FLWR" run "$root" "$federation" --run-config "$run_config $1" --format json)"
  run_id="$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["run-id"])' <<<"$submitted" 2>/dev/null)" \
    || { echo "flwr run did not start a run: $submitted" >&2; return 1; }
  echo "run $run_id submitted ($1)"
  while [ $((SECONDS - began)) -lt "$run_timeout" ]; do
    status="$("$FLWR" ls "$federation" --run-id "$run_id" --format json 2>/dev/null \
      | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' 2>/dev/null || echo unknown)"
    case "$status" in finished*) break ;; esac
    if [ $((SECONDS - last)) -ge 60 ]; then echo "  run $run_id: $status after $((SECONDS - began)) s"; last=$SECONDS; fi
    sleep 10  # each `flwr ls` costs a second of CPU: poll gently
  done
  mkdir -p "$out"
  "$FLWR" log "$run_id" "$federation" --show >"$out/serverapp-run-$run_id.log" 2>&1 || true
  echo "run $run_id: $status in $((SECONDS - began)) s (ServerApp log: $out/serverapp-run-$run_id.log)"
  timing "run-$run_id" $((SECONDS - began))
  if [ "$status" != "finished:completed" ]; then
    tail -30 "$out/serverapp-run-$run_id.log" >&2
    echo "run $run_id ended '$status', not finished:completed" >&2
    return 1
  fi
}

say "flwr run: $rounds rounds, 3 hospitals"
submit_and_wait "num-server-rounds=$rounds"

# ------------------------------------------------------------------ checks
check_hospital() {  # check_hospital K ROUND: its own volume holds its model and weights
  in_container "superexec-clientapp-$1" "
import json, torch
from pathlib import Path
out = Path('/output')
state = torch.load(out / 'local_state.pt', map_location='cpu', weights_only=True)
model = torch.load(out / 'personalized_model.pt', map_location='cpu', weights_only=True)
layers = json.loads((out / 'personalized_layers.json').read_text())
assert state['round'] == $2, f'local_state.pt is of round {state[\"round\"]}, expected $2'
assert model['info']['site'] == 'hospital-$1', f'personalized_model.pt is {model["info"]}'
print(f'hospital-$1: /output (volume ${project}_hospital-$1-output): local_state.pt round '
      f'{state[\"round\"]}, personalized_model.pt '
      f'{(out / \"personalized_model.pt\").stat().st_size / 2**20:.1f} MiB, '
      f'{len(layers)} personalized layer(s) {layers[:3]}')
"
}

say "each hospital's own volume"
for k in 1 2 3; do check_hospital "$k" "$rounds"; done

say "the server's results (volume ${project}_results)"
in_container superexec-serverapp "
import json
from pathlib import Path
res = Path('/results')
for name in ('metrics.jsonl', 'summary.json', 'global_model.pt', 'checkpoint.pt'):
    assert (res / name).is_file(), f'/results/{name} is missing'
rows = [json.loads(line) for line in (res / 'metrics.jsonl').read_text().splitlines()]
assert [r['round'] for r in rows][-1] == $rounds, f'last round {rows[-1][\"round\"]}'
for r in rows:
    print(f'ROUND {r[\"round\"]} {r[\"seconds\"]} s (wall time of the round, measured in the ServerApp container)')
final = json.loads((res / 'summary.json').read_text())['final']
print(f'final balanced accuracy: global {final[\"global\"].get(\"balanced-accuracy\", float(\"nan\")):.4f}, '
      f'personalized {final[\"personalized\"].get(\"balanced-accuracy\", float(\"nan\")):.4f} (tiny demo settings)')
"
rm -rf "$out/results"
docker cp "$(compose ps -q superexec-serverapp):/results" "$out/results"
echo "results copied to $out/results: $(cd "$out/results" && ls | tr '\n' ' ')"

# ------------------------------------------------------------------ 6. restart a hospital
if [ "$restart_check" = 1 ]; then
  say "restart hospital-2 (its SuperNode and ClientApp executor)"
  digest() { compose exec -T superexec-clientapp-2 sha256sum /output/local_state.pt | cut -d' ' -f1; }
  before="$(digest)"
  since="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  compose restart supernode-2 superexec-clientapp-2
  after="$(digest)"
  [ "$before" = "$after" ] || { echo "hospital-2's local_state.pt changed across the restart" >&2; exit 1; }
  echo "hospital-2: local_state.pt unchanged across the restart (sha256 ${after:0:16}...)"
  say "one more round, resumed from the server's checkpoint: hospital-2 restores its own layers from its volume"
  submit_and_wait "num-server-rounds=$((rounds + 1)) resume-from='/results'"
  restored="$(docker logs --since "$since" "$(compose ps -q superexec-clientapp-2)" 2>&1 \
    | grep -m1 "hospital-2: restored local weights of round $rounds from /output/local_state.pt" || true)"
  [ -n "$restored" ] || { echo "hospital-2's log has no 'restored local weights of round $rounds' after the restart" >&2; exit 1; }
  echo "hospital-2 after the restart: $(sed -E 's/^.*INFO[^:]*:[[:space:]]*//' <<<"$restored")"
  check_hospital 2 $((rounds + 1))
fi

finished=1
say "done: results in $out/results (copied from volume ${project}_results); hospital K's files stay in volume ${project}_hospital-K-output$([ "$keep" = 1 ] || echo ' until the teardown below')"
