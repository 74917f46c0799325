#!/bin/sh
# The container's entrypoint (deploy/Containerfile); runs as well on a plain host with tuneloop on PATH.
#   entrypoint.sh [serve] [FLAG ...]   check the config, set up an empty home, then exec `tuneloop serve`
#   entrypoint.sh retrain [FLAG ...]   the same, then exec `tuneloop retrain --json` (the nightly job)
#   entrypoint.sh COMMAND ...          any other tuneloop command as it is (apikey create web, backup DIR, restore DIR)
# TUNELOOP_INIT_PACK names the pack a new home is set up with (default peach_state_bank, the demo
# pack); set it empty to start from an empty home and import your own data (`data import`).
set -eu

: "${TUNELOOP_HOME:?set TUNELOOP_HOME to the data folder (the container's volume)}"
mode="${1:-serve}"
if [ "$#" -gt 0 ]; then shift; fi

case "$mode" in
  serve|retrain) ;;
  # Other commands run untouched: restore needs an empty home, so nothing is set up for them.
  *) exec tuneloop "$mode" "$@" ;;
esac

# A bad config.toml or TUNELOOP_* value stops here, before anything is written to the home
# (tuneloop exits 2 on a configuration error; any other failure passes through as it is).
status=0
tuneloop config show >/dev/null || status=$?
if [ "$status" -eq 2 ]; then
  echo "tuneloop entrypoint: refusing to start: fix the setting named above in $TUNELOOP_HOME/config.toml or the TUNELOOP_* environment" >&2
fi
if [ "$status" -ne 0 ]; then
  exit "$status"
fi

# feedback.db is the home's first and lasting file: without it nothing was ever set up or restored here.
if [ ! -e "$TUNELOOP_HOME/feedback.db" ]; then
  pack="${TUNELOOP_INIT_PACK-peach_state_bank}"
  if [ -n "$pack" ]; then
    echo "tuneloop entrypoint: new home $TUNELOOP_HOME, setting it up with the $pack pack" >&2
    tuneloop init --pack "$pack"
  else
    echo "tuneloop entrypoint: new home $TUNELOOP_HOME left empty (TUNELOOP_INIT_PACK is empty); import your data with 'tuneloop data import'" >&2
  fi
fi

# exec: tuneloop becomes this process, so the SIGTERM of `podman stop` or systemd reaches it and it drains.
if [ "$mode" = retrain ]; then
  exec tuneloop retrain --json "$@"
fi
exec tuneloop serve --host "${TUNELOOP_SERVE_HOST:-0.0.0.0}" "$@"
