#!/usr/bin/env bash
# Unpacks QEMU 11.1.3 (Debian 13 trixie-backports) and its whole dependency closure from Debian 13, libc6 included,
# into one folder beside the system's QEMU. Called by scripts/setup.sh when the folder is not complete yet.
#   scripts/setup-qemu111.sh CACHE MIRROR_URI
# apt runs with a private configuration under CACHE/apt-q111 (own sources, lists, cache, empty dpkg status), so the
# machine's own apt sources, lists and dpkg database are untouched. The .debs stay in CACHE/debs/q111 for re-runs.
# The result runs through its own dynamic loader (NOTES.md):
#   QEMU_MODULE_DIR=$Q/usr/lib/x86_64-linux-gnu/qemu $Q/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
#     --library-path $Q/usr/lib/x86_64-linux-gnu:$Q/lib/x86_64-linux-gnu $Q/usr/bin/qemu-system-x86_64
#     -L $Q/usr/share/qemu -L $Q/usr/share/seabios ...
# Both -L are needed (seen with strace): this build's firmware path is /usr/share/qemu:/usr/share/seabios (absolute), so
# without them it silently takes the HOST's bios-256k.bin and kvmvapic.bin, and fails on -device virtio-net-pci with
# 'failed to find romfile "efi-virtio.rom"' (Debian 13's ipxe-qemu installs its ROMs in /usr/share/qemu, there is no
# usr/lib/ipxe/qemu in the closure; a -L to it is harmless but useless).
set -euo pipefail
CACHE=${1:?usage: setup-qemu111.sh CACHE MIRROR_URI}
MIRROR=${2:?usage: setup-qemu111.sh CACHE MIRROR_URI}
VERSION='1:11.1.3+ds-1~bpo13+1'
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-opengl)
Q=$CACHE/qemu-11.1
PRIV=$CACHE/apt-q111
DEBS=$CACHE/debs/q111
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ -e "$Q/.complete" ] && exit 0
mkdir -p "$CACHE"
exec 9>"$CACHE/qemu-11.1.lock"
flock 9   # two setups at once (several shells in one tree) must not unpack into the same folder
[ -e "$Q/.complete" ] && exit 0
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing"
[ "$(dpkg --print-architecture)" = amd64 ] || die "QEMU 11.1 is unpacked for amd64 only"
gpg_ok() { grep -aq 'trixie' "$KEYRING" 2>/dev/null; }
gpg_ok || die "$KEYRING lacks the Debian 13 (trixie) keys: upgrade debian-archive-keyring"

# --- private apt configuration --------------------------------------------------------------------------
mkdir -p "$PRIV/etc/sources.list.d" "$PRIV/etc/preferences.d" "$PRIV/lists/partial" "$PRIV/cache" "$PRIV/log" \
         "$DEBS/partial"
: > "$PRIV/status"
printf 'Types: deb\nURIs: %s\nSuites: trixie trixie-backports\nComponents: main\nSigned-By: %s\n' \
  "$MIRROR" "$KEYRING" > "$PRIV/etc/sources.list.d/debian.sources.new"
if ! cmp -s "$PRIV/etc/sources.list.d/debian.sources.new" "$PRIV/etc/sources.list.d/debian.sources"; then
  mv "$PRIV/etc/sources.list.d/debian.sources.new" "$PRIV/etc/sources.list.d/debian.sources"
  rm -rf "$PRIV/lists"; mkdir -p "$PRIV/lists/partial"   # other mirror: its lists are not ours
else
  rm -f "$PRIV/etc/sources.list.d/debian.sources.new"
fi
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$PRIV/etc/sources.list.d"
     -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$PRIV/etc/preferences.d"
     -o "Dir::State::Lists=$PRIV/lists" -o "Dir::State::status=$PRIV/status"
     -o "Dir::State::extended_states=$PRIV/extended_states" -o "Dir::Cache=$PRIV/cache"
     -o "Dir::Cache::archives=$DEBS" -o "Dir::Log=$PRIV/log" -o APT::Sandbox::User=root
     -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o APT::Install-Recommends=false
     -o APT::Install-Suggests=false -o Debug::NoLocking=true)

# Lists are refreshed when missing or older than a day (a re-run after a failure does not fetch them again).
if [ -z "$(find "$PRIV/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n 1)" ]; then
  log "apt-get update (private: Debian 13 trixie + trixie-backports, for QEMU 11.1)"
  apt-get "${APT[@]}" update -qq 2>"$PRIV/update.log" || { cat "$PRIV/update.log" >&2; die "private apt-get update failed"; }
fi

# --- resolve the closure: the pinned QEMU packages from backports, the rest from trixie ------------------
# apt takes its candidate (trixie) for every dependency; where the QEMU packages need more (e.g. seabios > 1.17),
# that dependency is taken from trixie-backports instead, one round per unmet dependency.
want=()
for p in "${PACKAGES[@]}"; do want+=("$p=$VERSION"); done
for round in $(seq 1 20); do
  if apt-get "${APT[@]}" install -s -q "${want[@]}" > "$PRIV/resolve.log" 2>&1; then break; fi
  unmet=$(sed -n 's/.*Depends: \([^ ]*\) .* but .* is to be installed$/\1/p' "$PRIV/resolve.log" | sort -u)
  added=0
  for p in $unmet; do
    case " ${want[*]} " in *" $p/trixie-backports "*) continue ;; esac
    case "$(apt-cache "${APT[@]}" madison "$p")" in *trixie-backports*) ;; *) continue ;; esac
    log "QEMU 11.1 needs $p from trixie-backports"
    want+=("$p/trixie-backports"); added=1
  done
  [ "$added" = 1 ] || { cat "$PRIV/resolve.log" >&2; die "cannot resolve QEMU $VERSION in Debian 13 (apt output above)"; }
  [ "$round" -lt 20 ] || die "cannot resolve QEMU $VERSION in Debian 13: too many rounds"
done
# The exact set of .debs (name_version_arch.deb, ':' in versions written as %3a as apt does).
mapfile -t files < <(awk '/^Inst / {v=$3; gsub(/[()]/, "", v); sub(/:/, "%3a", v);
                               match($0, / \[[a-z0-9-]+\]/); a=substr($0, RSTART + 2, RLENGTH - 3);
                               print $2 "_" v "_" a ".deb"}' "$PRIV/resolve.log")
[ "${#files[@]}" -gt 0 ] || die "apt resolved no packages for QEMU 11.1"

# --- download (apt skips what is already in $DEBS) and unpack ------------------------------------------
missing=0
for f in "${files[@]}"; do [ -e "$DEBS/$f" ] || missing=$((missing + 1)); done
if [ "$missing" -gt 0 ]; then
  log "downloading $missing of ${#files[@]} packages for QEMU 11.1"
  apt-get "${APT[@]}" install -q -y --download-only "${want[@]}" > "$PRIV/download.log" 2>&1 \
    || { tail -n 20 "$PRIV/download.log" >&2; die "downloading QEMU 11.1 packages failed"; }
fi
for f in "${files[@]}"; do [ -e "$DEBS/$f" ] || die "apt did not download $f"; done
# Drop .debs of other versions (an older closure) so the folder holds exactly one closure.
for d in "$DEBS"/*.deb; do
  case " ${files[*]} " in *" $(basename "$d") "*) ;; *) rm -f "$d" ;; esac
done

log "unpacking ${#files[@]} packages into $Q"
rm -rf "$Q" "$Q.tmp"; mkdir -p "$Q.tmp"
for f in "${files[@]}"; do dpkg-deb -x "$DEBS/$f" "$Q.tmp" || die "cannot unpack $f"; done
printf '%s\n' "${files[@]}" > "$Q.tmp/.packages"
# libstdc++6 brings gdb pretty-printers (*.py): QEMU never runs them, and linters walking a copy of the project
# without .git (so without .gitignore) would check them.
find "$Q.tmp" -name '*.py' -type f -delete

# --- verify: every library resolves, the version, TCG with QMP, the virtio-net option ROM ---------------
T=$Q.tmp
LIB=$T/usr/lib/x86_64-linux-gnu
LDSO=$LIB/ld-linux-x86-64.so.2
BIN=$T/usr/bin/qemu-system-x86_64
[ -x "$LDSO" ] || die "no dynamic loader at $LDSO (libc6 not unpacked?)"
[ -x "$BIN" ] || die "no $BIN after unpacking"
libpath=$LIB:$T/lib/x86_64-linux-gnu
for obj in "$BIN" "$LIB"/qemu/*.so; do
  [ -e "$obj" ] || continue
  notfound=$("$LDSO" --library-path "$libpath" --list "$obj" 2>&1 | grep -E 'not found|error' || true)
  [ -z "$notfound" ] || die "QEMU 11.1: $(basename "$obj") misses libraries: $notfound"
done
for fw in usr/share/seabios/bios-256k.bin usr/share/qemu/efi-virtio.rom usr/share/qemu/kvmvapic.bin; do
  [ -e "$T/$fw" ] || die "QEMU 11.1: firmware /$fw is not in the unpacked closure"
done
qemu() {
  QEMU_MODULE_DIR=$LIB/qemu timeout 60 "$LDSO" --library-path "$libpath" "$BIN" \
    -L "$T/usr/share/qemu" -L "$T/usr/share/seabios" "$@"
}
ver=$(qemu --version 2>&1 | head -n 1)
case "$ver" in *"version 11.1.3"*) ;; *) die "QEMU 11.1 --version printed: $ver" ;; esac
qmp_check() { # args...: start paused with TCG, QMP on stdio, then quit
  local out
  out=$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"quit"}' \
        | qemu -machine q35 -accel tcg -nodefaults -display none -S -qmp stdio "$@" 2>&1) \
    || die "QEMU 11.1 with TCG failed ($*): $out"
  [ "$(grep -c '"return"' <<<"$out")" -ge 2 ] || die "QEMU 11.1 QMP did not answer ($*): $out"
}
qmp_check
# virtio-net-pci loads its option ROM (efi-virtio.rom) when realized: a guest with a NIC needs it.
qmp_check -netdev user,id=n0 -device virtio-net-pci,netdev=n0
mv "$T" "$Q"
printf '%s\n' "$ver" > "$Q/.complete"
log "QEMU 11.1 ready in $Q ($ver; ${#files[@]} packages, $(du -sh "$Q" | cut -f1))"
