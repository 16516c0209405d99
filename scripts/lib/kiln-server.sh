# Sourced by scripts that need a running `kiln serve`: start_kiln MODEL [FLAGS...] starts it on
# free loopback ports, sets KILN_URL, KILN_GRPC (host:port of gRPC) and KILN_PID and waits until
# /health is 200 (start_kiln_args FLAGS... the same with the models in FLAGS, e.g.
# --model-repository DIR);
# stop_kiln sends SIGTERM and fails unless kiln exits 0.
#
# The binary is $KILN_BIN, else the debug build that `cargo test --workspace` (scripts/test.sh)
# already made: the same command (and features) is run with --no-run, so after the tests it
# builds nothing.

kiln_bin() {
  if [[ -n "${KILN_BIN:-}" ]]; then
    echo "$KILN_BIN"
    return
  fi
  . scripts/lib/test-features.sh
  cargo test --workspace "${test_features[@]}" --no-run -q >&2
  echo "${CARGO_TARGET_DIR:-target}/debug/kiln"
}

start_kiln() {
  local model=$1
  shift
  start_kiln_args --model "$model" "$@"
}

start_kiln_args() {
  local bin
  bin=$(kiln_bin)
  KILN_LOG_FILE=$(mktemp)
  NO_COLOR=1 "$bin" serve --host 127.0.0.1 --port 0 --grpc-port 0 "$@" 2>"$KILN_LOG_FILE" &
  KILN_PID=$!
  local addr="" i
  for i in $(seq 1 600); do
    addr=$(grep -o 'address=[0-9.:]*' "$KILN_LOG_FILE" | head -1 | cut -d= -f2 || true)
    [[ -n "$addr" ]] && break
    kill -0 "$KILN_PID" 2>/dev/null || { cat "$KILN_LOG_FILE" >&2; echo "kiln exited" >&2; return 1; }
    sleep 0.1
  done
  [[ -n "$addr" ]] || { cat "$KILN_LOG_FILE" >&2; echo "kiln never reported its address" >&2; return 1; }
  KILN_URL="http://$addr"
  KILN_GRPC=$(grep -o 'grpc=[0-9.:]*' "$KILN_LOG_FILE" | head -1 | cut -d= -f2 || true)
  for i in $(seq 1 1200); do
    if [[ $(curl -s -o /dev/null -w '%{http_code}' "$KILN_URL/health") == 200 ]]; then
      echo "kiln ready at $KILN_URL (pid $KILN_PID)"
      return 0
    fi
    kill -0 "$KILN_PID" 2>/dev/null || { cat "$KILN_LOG_FILE" >&2; echo "kiln exited" >&2; return 1; }
    sleep 0.1
  done
  cat "$KILN_LOG_FILE" >&2
  echo "kiln never became healthy" >&2
  return 1
}

stop_kiln() {
  [[ -n "${KILN_PID:-}" ]] || return 0
  kill -TERM "$KILN_PID" 2>/dev/null || true
  local code=0
  wait "$KILN_PID" || code=$?
  KILN_PID=""
  if [[ $code != 0 ]]; then
    cat "$KILN_LOG_FILE" >&2
    echo "kiln exited with $code after SIGTERM" >&2
    return 1
  fi
}
