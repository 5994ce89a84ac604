# Sourced by scripts/test: best effort, install Debian's PostgreSQL server binaries when they are
# missing, so that tests/test_sync.py runs its PostgreSQL sink test (CI runs ./scripts/test on a
# machine where it may be missing). Never starts a system service: the test starts its own
# cluster on a free loopback port. Any failure only warns: the test then skips and says how.
ensure_postgres_binaries() {
  if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then return 0; fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if ! sudo -n true 2>/dev/null; then
      echo "note: PostgreSQL is not installed and sudo needs a password; run scripts/install-peers for the PostgreSQL sync test" >&2
      return 0
    fi
    sudo="sudo -n"
  fi
  echo "installing PostgreSQL (Debian's postgresql package) for the sync test ..." >&2
  local policy=/usr/sbin/policy-rc.d created_policy=""
  if [ ! -e "$policy" ]; then
    # exit 101: the package must not start its system service.
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && created_policy=1
  fi
  if ! { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends postgresql; } >&2; then
    echo "warning: installing postgresql failed; the PostgreSQL sync test will skip" >&2
  fi
  if [ -n "$created_policy" ]; then $sudo rm -f "$policy"; fi
  return 0
}
