#!/usr/bin/env bash
# Installs everything the tool, its tests and its benchmarks need, on Debian 12 (bookworm) or 13 (trixie), as root.
# Idempotent: every step checks first, so a re-run on a ready machine takes seconds.
# Downloads are cached under .cache/ in the project root (ignored by git); QOH_CACHE overrides the folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${QOH_CACHE:-$ROOT/.cache}
export DEBIAN_FRONTEND=noninteractive
APT_DOWNLOAD=(apt-get download -q -o APT::Sandbox::User=root)  # into our cache folder, which _apt cannot write
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, tap devices)"
[ -r /etc/os-release ] || die "no /etc/os-release: not a Debian machine?"
. /etc/os-release
mkdir -p "$CACHE/debs"

APT_UPDATED=0
apt_update() { if [ "$APT_UPDATED" = 0 ]; then log "apt-get update"; apt-get update -qq; APT_UPDATED=1; fi; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
mirror_uri() { # the Debian mirror the machine already uses (deb822 or one-line format; not the security one)
  local uri
  uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) {
                           if ($i !~ /security/) {print $i; exit} else break}}' /etc/apt/sources.list 2>/dev/null || true)
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}
add_source() { # name suite pin(optional)
  local file=/etc/apt/sources.list.d/$1.sources
  [ -e "$file" ] && return 0
  # Already configured by the machine's owner (any file, either format)?
  grep -rqsE "^(Suites:.*[[:space:]]|deb .*[[:space:]])$2([[:space:]]|\$)" /etc/apt/sources.list /etc/apt/sources.list.d/ \
    && return 0
  log "adding apt source $2"
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$(mirror_uri)" "$2" > "$file"
  if [ -n "${3:-}" ]; then
    printf 'Package: *\nPin: release n=%s\nPin-Priority: %s\n' "$2" "$3" > "/etc/apt/preferences.d/$1"
  fi
  APT_UPDATED=0
}

# --- 1. apt sources: QEMU >= 10, the 6.12 cloud kernel, and QEMU 7.2 (bookworm's) -----------------------
case "${VERSION_CODENAME:-}" in
  bookworm) add_source qoh-backports bookworm-backports; QEMU_SUITE=bookworm-backports ;;
  trixie) add_source qoh-bookworm bookworm 1; QEMU_SUITE=trixie ;;
  *) die "unsupported system '${PRETTY_NAME:-unknown}': Debian 12 or 13 needed" ;;
esac

# --- 2. packages from the system ------------------------------------------------------------------------
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
if [ "$(qemu_major || true)" = "" ] || [ "$(qemu_major)" -lt 10 ]; then
  apt_update
  log "installing QEMU >= 10 from $QEMU_SUITE"
  apt-get install -y -q -t "$QEMU_SUITE" qemu-system-x86 >/dev/null
fi
[ "$(qemu_major)" -ge 10 ] || die "qemu-system-x86_64 is $(qemu_major), need >= 10"
missing=()
for p in busybox-static iproute2 xz-utils cpio gcc libc6-dev python3-venv ipxe-qemu seabios; do
  have_pkg "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update; log "installing ${missing[*]}"; apt-get install -y -q "${missing[@]}" >/dev/null
fi

# --- 2b. OpenSSH for the ssh transport tests (the lab runs its own sshd on loopback: lab/sshd.py) -----------
# Installed only: no ssh service is started now, nor at boot. A policy-rc.d that refuses every start guards the
# install (ours only if the machine has none, removed afterwards); when this install put openssh-server there, the
# boot-time service its package enables is disabled again and Debian's own switch /etc/ssh/sshd_not_to_be_run
# (honoured by ssh.service, ssh.socket and /etc/init.d/ssh) keeps the host-wide sshd off. A host-wide sshd that
# appears during the install is stopped.
host_sshds() { # pids of sshd processes that are not the lab's (their command line names no qoh-sshd- folder)
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/sbin/sshd ] || continue
    tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q 'qoh-sshd-' && continue
    printf '%s\n' "${p#/proc/}"
  done
}
missing=()
for p in openssh-server openssh-client; do
  have_pkg "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update
  before=$(host_sshds | sort)
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs packages\nexit 101\n' \
      > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  server_new=0
  have_pkg openssh-server || server_new=1
  if [ "$server_new" = 1 ] && [ ! -e /etc/ssh/sshd_not_to_be_run ]; then
    mkdir -p /etc/ssh
    echo "made by $ROOT/scripts/setup.sh: openssh-server is here for the tests' own sshd only" \
      > /etc/ssh/sshd_not_to_be_run
  fi
  log "installing ${missing[*]} (no ssh service is started or enabled)"
  apt-get install -y -q "${missing[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  if [ "$server_new" = 1 ]; then # the package enables ssh.service at boot: undo that (works without systemd running)
    if command -v systemctl >/dev/null; then systemctl disable --quiet ssh.service ssh.socket 2>/dev/null || true
    elif command -v update-rc.d >/dev/null; then update-rc.d ssh disable >/dev/null 2>&1 || true; fi
  fi
  for pid in $(comm -13 <(printf '%s\n' "$before") <(host_sshds | sort)); do
    log "stopping the host-wide sshd $pid the install started"
    kill "$pid" 2>/dev/null || true
  done
fi
[ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing after installing openssh-server"

# --- 2c. libvirt 11.3 for the libvirt tests (the lab runs its own daemons in namespaces: lab/libvirt.py) -----
# Debian 13's libvirt: bookworm-backports per package on Debian 12 (pkg/suite, not -t, which would raise every
# backports package, systemd with it), trixie itself on Debian 13. --no-install-recommends: no network, nwfilter or
# storage drivers, no dnsmasq. Installed only: a policy-rc.d that refuses every start guards the install (ours only if
# the machine has none, removed afterwards), the boot-time services the packages enable are disabled again when
# this install put them there, and a host-wide libvirtd/virtlogd that appears during the install is stopped.
LIBVIRT_PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev)
libvirt_ok() {
  local p
  for p in "${LIBVIRT_PKGS[@]}"; do
    have_pkg "$p" || return 1
    case "$(dpkg-query -W -f='${Version}' "$p")" in 11.3.*|11.[4-9].*|1[2-9].*) ;; *) return 1 ;; esac
  done
}
host_libvirtds() { # pids of libvirtd/virtlogd that are not the lab's (the lab's: -p <folder>/libvirtd.pid, in a netns)
  local p exe
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null || true)
    case "$exe" in /usr/sbin/libvirtd|/usr/sbin/virtlogd|/usr/sbin/virtlockd) ;; *) continue ;; esac
    tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q 'qoh-libvirt-' && continue
    [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$(readlink /proc/self/ns/net)" ] || continue
    printf '%s\n' "${p#/proc/}"
  done
}
if ! libvirt_ok; then
  apt_update
  case "${VERSION_CODENAME:-}" in
    bookworm) lv_args=(); for p in "${LIBVIRT_PKGS[@]}"; do lv_args+=("$p/bookworm-backports"); done ;;
    *) lv_args=("${LIBVIRT_PKGS[@]}") ;;
  esac
  before=$(host_libvirtds | sort)
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs packages\nexit 101\n' \
      > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  daemon_new=0
  have_pkg libvirt-daemon || daemon_new=1
  log "installing ${lv_args[*]} (no libvirt service is started or enabled)"
  apt-get install -y -q --no-install-recommends "${lv_args[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  if [ "$daemon_new" = 1 ]; then # the packages enable libvirtd/virtlogd at boot: undo that (no systemd needed)
    if command -v systemctl >/dev/null; then
      systemctl disable --quiet libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket \
        virtlogd.service virtlogd.socket virtlogd-admin.socket libvirt-guests.service 2>/dev/null || true
    elif command -v update-rc.d >/dev/null; then
      for s in libvirtd virtlogd libvirt-guests; do update-rc.d "$s" disable >/dev/null 2>&1 || true; done
    fi
  fi
  for pid in $(comm -13 <(printf '%s\n' "$before") <(host_libvirtds | sort)); do
    log "stopping the host-wide $(cat "/proc/$pid/comm" 2>/dev/null) $pid the install started"
    kill "$pid" 2>/dev/null || true
  done
  libvirt_ok || die "libvirt >= 11.3 is not installed after installing ${lv_args[*]}"
fi
[ -x /usr/sbin/libvirtd ] && [ -x /usr/bin/virsh ] || die "libvirtd or virsh is missing"
for p in pkg-config; do have_pkg "$p" || { apt_update; log "installing $p"; apt-get install -y -q "$p" >/dev/null; }; done

# --- 3. QEMU 7.2 unpacked beside the system's QEMU ------------------------------------------------------
Q72=$CACHE/qemu-7.2
if [ ! -x "$Q72/usr/bin/qemu-system-x86_64" ] || [ ! -e "$Q72/.complete" ]; then
  apt_update
  rm -rf "$Q72" "$CACHE/debs/q72"; mkdir -p "$CACHE/debs/q72"
  for p in qemu-system-x86 qemu-system-common qemu-system-data; do
    ver=$(apt-cache madison "$p" | awk -F'|' '{gsub(/ /,"",$2)} $2 ~ /^1:7\.2\+/ {print $2}' | sort -V | tail -n 1)
    [ -n "$ver" ] || die "no QEMU 7.2 package $p in the apt sources"
    log "downloading $p=$ver"
    (cd "$CACHE/debs/q72" && "${APT_DOWNLOAD[@]}" "$p=$ver" >/dev/null)
  done
  for d in "$CACHE"/debs/q72/*.deb; do dpkg-deb -x "$d" "$Q72"; done
  # Libraries QEMU 7.2 links against that the system lacks (e.g. on Debian 13) are unpacked beside it and
  # found through LD_LIBRARY_PATH by whoever starts it (see qemu_offload_handshake/lab.py).
  deps=$(for d in "$CACHE"/debs/q72/*.deb; do dpkg-deb -f "$d" Depends; done | tr ',' '\n' \
         | sed 's/|.*//; s/(.*)//; s/ //g; s/:any$//' | grep -v '^qemu-' | grep -v '^$' | sort -u)
  for p in $deps; do
    have_pkg "$p" && continue
    log "unpacking library $p for QEMU 7.2"
    (cd "$CACHE/debs/q72" && "${APT_DOWNLOAD[@]}" "$p" >/dev/null 2>&1) || log "warning: could not download $p"
  done
  for d in "$CACHE"/debs/q72/*.deb; do dpkg-deb -x "$d" "$Q72"; done
  notfound=$(LD_LIBRARY_PATH=$Q72/usr/lib/x86_64-linux-gnu:$Q72/lib/x86_64-linux-gnu \
             ldd "$Q72/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
  [ -z "$notfound" ] || die "QEMU 7.2 still misses libraries: $notfound"
  touch "$Q72/.complete"
fi

# --- 3b. QEMU 11.1.3 (Debian 13 backports) with its whole Debian 13 closure, run through its own loader -------
Q111=$CACHE/qemu-11.1
if [ ! -e "$Q111/.complete" ]; then
  bash "$ROOT/scripts/setup-qemu111.sh" "$CACHE" "$(mirror_uri)"
fi
[ -x "$Q111/usr/bin/qemu-system-x86_64" ] || die "QEMU 11.1 is not unpacked in $Q111"

# --- 4. guest kernel (Debian cloud 6.12) and a busybox initramfs that loads virtio_net --------------------
# The kernel package behind whichever metapackage resolves to 6.12 in the machine's suites: linux-image-6.12-cloud-amd64
# (bookworm-security), else linux-image-cloud-amd64 in any suite where it is 6.12 (bookworm-backports on a minimal
# Debian 12 with only bookworm main of its own, trixie main on Debian 13). Newest version first.
kernel_pkg() {
  local meta ver dep
  for meta in linux-image-6.12-cloud-amd64 linux-image-cloud-amd64; do
    for ver in $(apt-cache madison "$meta" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -uVr); do
      dep=$(apt-cache show "$meta=$ver" 2>/dev/null | sed -n 's/^Depends: //p' | tr ',' '\n' \
            | grep -oE '^ *linux-image-6\.12\.[^ ]*-cloud-amd64(-unsigned)?( |$)' | tr -d ' ' | head -n 1 || true)
      [ -n "$dep" ] || continue
      case "$(apt-cache policy "$dep" 2>/dev/null)" in *"Candidate: (none)"*|"") continue ;; esac
      printf '%s\n' "$dep"; return 0
    done
  done
}
GUEST=$CACHE/guest
if [ ! -e "$GUEST/.complete" ]; then
  apt_update
  kpkg=$(kernel_pkg)
  [ -n "$kpkg" ] || die "no 6.12 cloud kernel in the apt sources (linux-image-6.12-cloud-amd64 or linux-image-cloud-amd64)"
  rm -rf "$GUEST" "$CACHE/debs/kernel/root"; mkdir -p "$CACHE/debs/kernel" "$GUEST"
  if ! ls "$CACHE/debs/kernel/${kpkg}_"*.deb >/dev/null 2>&1; then
    log "downloading guest kernel $kpkg"
    rm -f "$CACHE"/debs/kernel/*.deb
    (cd "$CACHE/debs/kernel" && "${APT_DOWNLOAD[@]}" "$kpkg" >/dev/null)
  fi
  log "building the test guest from $kpkg"
  dpkg-deb -x "$CACHE"/debs/kernel/"${kpkg}"_*.deb "$CACHE/debs/kernel/root"
  kdir=$(ls -d "$CACHE"/debs/kernel/root/lib/modules/* 2>/dev/null | head -n 1)
  [ -n "$kdir" ] || kdir=$(ls -d "$CACHE"/debs/kernel/root/usr/lib/modules/* | head -n 1)
  kver=$(basename "$kdir")
  cp "$CACHE"/debs/kernel/root/boot/vmlinuz-"$kver" "$GUEST/vmlinuz"
  ird=$GUEST/initrd.d; mkdir -p "$ird"/{bin,proc,sys,dev,lib/modules}
  cp /bin/busybox "$ird/bin/busybox"
  for m in net/core/failover drivers/net/net_failover drivers/net/virtio_net; do
    xz -dc "$kdir/kernel/$m.ko.xz" > "$ird/lib/modules/$(basename "$m").ko"
  done
  cp "$ROOT/scripts/guest-init.sh" "$ird/init"; chmod 755 "$ird/init"
  (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1 > "$GUEST/initrd.gz")
  echo "$kver" > "$GUEST/kernel-version"
  rm -rf "$ird" "$CACHE/debs/kernel/root"
  touch "$GUEST/.complete"
fi
if [ "$ROOT/scripts/guest-init.sh" -nt "$GUEST/initrd.gz" ]; then
  rm -f "$GUEST/.complete"; exec "$0" "$@"   # the init script changed: rebuild the initramfs
fi

# --- 5. the no-USO shim (makes a tap look like a kernel older than 6.2) ---------------------------------
SHIM=$CACHE/nouso.so
if [ ! -e "$SHIM" ] || [ "$ROOT/shim/nouso.c" -nt "$SHIM" ]; then
  log "building $SHIM"
  gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o "$SHIM" "$ROOT/shim/nouso.c" -ldl
fi

# --- 6. tap devices -------------------------------------------------------------------------------------
[ -c /dev/net/tun ] || { modprobe tun 2>/dev/null || true; }
[ -c /dev/net/tun ] || die "/dev/net/tun is missing: tap devices cannot be made"

# --- 7. the virtualenv ----------------------------------------------------------------------------------
VENV=$ROOT/.venv
stamp=$VENV/.qoh-installed
installed_at() { (cd / && "$VENV/bin/python" -c 'import qemu_offload_handshake as q; print(q.__file__)' 2>/dev/null) || true; }
if [ ! -x "$VENV/bin/python" ] || [ ! -e "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] \
   || [ "$(installed_at)" != "$ROOT/qemu_offload_handshake/__init__.py" ] \
   || ! "$VENV/bin/python" -c 'import libvirt' 2>/dev/null; then
  log "creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # libvirt-python is pinned to the daemon's version (11.3, section 2c) and built from its sdist (~8 s)
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,libvirt]" "libvirt-python==11.3.0" > "$CACHE/pip.log" 2>&1 \
    || { cat "$CACHE/pip.log" >&2; die "pip install failed (log above)"; }
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import libvirt' 2>/dev/null || die "the venv cannot import libvirt (libvirt-python)"
log "ready: $(qemu-system-x86_64 --version | head -n 1); QEMU 7.2 in $Q72; $(head -n 1 "$Q111/.complete" | sed 's/emulator version //') in $Q111;" \
    "guest kernel $(cat "$GUEST/kernel-version")"
