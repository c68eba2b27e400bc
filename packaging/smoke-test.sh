#!/usr/bin/env bash
# Installs the packages of target/debian/ on this machine and checks them from the installed
# files only: the system users and their 0700 homes, `tunnel-device init` and `run --self-test`
# as the tunnel-device user, `tunnel-relay init`, the client, completions, man pages, and
# `systemd-analyze verify` of the installed units (where systemd-analyze exists).
# Needs root (or sudo). .ci/run calls it after packaging/build-debs.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
as_user() { local u=$1; shift; if [ -z "$SUDO" ]; then runuser -u "$u" -- "$@"; else sudo -u "$u" "$@"; fi; }
fail() { echo "smoke test FAILED: $*" >&2; exit 1; }

debs=()
for b in tunnel-device tunnel-client tunnel-relay; do
  debs+=("$(ls -t target/debian/"${b}"_*.deb | head -1)")
done
$SUDO dpkg -i "${debs[@]}" >/dev/null

for u in tunnel-device tunnel-relay; do
  getent passwd "$u" >/dev/null || fail "no system user $u"
  [ "$(stat -c '%a %U' /var/lib/$u)" = "700 $u" ] || fail "/var/lib/$u is not 0700 and owned by $u"
  [ -f /usr/lib/systemd/system/$u.service ] || fail "no unit for $u"
done
[ -f /usr/lib/systemd/user/tunnel-client.service ] || fail "no user unit for tunnel-client"

# A TCP service for the self-test, on a port the kernel picks.
port_file=$(mktemp)
python3 -c '
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
open(sys.argv[1], "w").write(str(s.getsockname()[1])); time.sleep(60)' "$port_file" &
probe=$!
trap 'kill $probe 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -s "$port_file" ] && break; sleep 0.1; done
port=$(cat "$port_file")

# A fresh home as the service's user (the real /var/lib/tunnel-device is left alone).
home=$(as_user tunnel-device mktemp -d)
as_user tunnel-device /usr/bin/tunnel-device --home "$home/dev" init --no-invite \
  --service "probe=127.0.0.1:$port" >/dev/null
out=$(as_user tunnel-device /usr/bin/tunnel-device --home "$home/dev" run --self-test) \
  || fail "run --self-test: $out"
grep -q "yes (127.0.0.1:$port)" <<<"$out" || fail "self-test output: $out"
echo "$out"

rhome=$(as_user tunnel-relay mktemp -d)
as_user tunnel-relay /usr/bin/tunnel-relay --home "$rhome/relay" init --listen 127.0.0.1:0 >/dev/null
as_user tunnel-relay /usr/bin/tunnel-relay --home "$rhome/relay" fingerprint | grep -Eq '^[0-9a-f]{64}$' \
  || fail "relay fingerprint"
chome=$(mktemp -d)
/usr/bin/tunnel-client --home "$chome/c" fingerprint | grep -Eq '^[0-9a-f]{64}$' || fail "client fingerprint"

grep -q stdio /usr/share/bash-completion/completions/tunnel-client || fail "bash completions"
[ -f /usr/share/zsh/vendor-completions/_tunnel-device ] || fail "zsh completions"
[ -f /usr/share/fish/vendor_completions.d/tunnel-relay.fish ] || fail "fish completions"
for page in tunnel-device tunnel-device-run tunnel-client-up tunnel-client-stdio tunnel-relay; do
  [ -f /usr/share/man/man1/$page.1.gz ] || fail "no man page $page"
done

# The sandbox the units promise (docs/SECURITY.md): each option is in the installed unit.
for opt in ProcSubset=pid PrivateMounts=yes RemoveIPC=yes SystemCallFilter=~@resources \
  NoNewPrivileges=yes ProtectSystem=strict; do
  for u in tunnel-device tunnel-relay; do
    grep -qx "$opt" /usr/lib/systemd/system/$u.service || fail "$u.service lacks $opt"
  done
done
grep -qx PrivateUsers=yes /usr/lib/systemd/system/tunnel-device.service \
  || fail "tunnel-device.service lacks PrivateUsers=yes"

if command -v systemd-analyze >/dev/null 2>&1; then
  man=no; command -v man >/dev/null 2>&1 && man=yes
  rt=$(mktemp -d); chmod 700 "$rt"
  # verify prints warnings (unknown keys, bad values) without failing: any output fails here.
  out=$(systemd-analyze verify --man=$man /usr/lib/systemd/system/tunnel-device.service \
    /usr/lib/systemd/system/tunnel-relay.service 2>&1) || fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify: $out"
  out=$(XDG_RUNTIME_DIR=$rt systemd-analyze --user verify --man=$man \
    /usr/lib/systemd/user/tunnel-client.service 2>&1) || fail "systemd-analyze --user verify: $out"
  [ -z "$out" ] || fail "systemd-analyze --user verify: $out"
  echo "systemd-analyze verify: the three units are clean"
else
  echo "systemd-analyze not found: unit verification skipped"
fi
rm -rf "$chome"
echo "packages installed and working: ${debs[*]}"
