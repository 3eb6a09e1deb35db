#!/usr/bin/env bash
# An emulated aarch64 board for tests and demos: a Debian bookworm arm64 userland run under
# qemu-user (binfmt_misc) in a chroot, with Python 3.11, a venv holding executorch==1.4.1,
# its dependencies and edgectl (this checkout's wheel), and sshd on a loopback port.
# Emulated: it answers "does it install, import and run on aarch64", never "how fast".
#
#   bash scripts/arm64-board.sh build     build (or complete) the board; reuses what exists
#   bash scripts/arm64-board.sh start [--pid PID]   mount /proc and /dev in it, start sshd, print
#                                         the ssh command; counts PID (or "by hand") as a user
#   bash scripts/arm64-board.sh stop [--pid PID] [--force]   that user is done; when no other
#                                         is left (or with --force): kill its processes, unmount,
#                                         unregister the binfmt entry
#   bash scripts/arm64-board.sh status    built? running? in use by whom? the ssh command
#   bash scripts/arm64-board.sh wheel [DIR]   edgectl's linux_aarch64 wheel, its native shim
#                                         compiled in the board, into DIR (default: dist/);
#                                         what the board itself installs, and a Pi can too
#   bash scripts/arm64-board.sh shell     an interactive shell over ssh (starts the board if needed)
#   bash scripts/arm64-board.sh exec CMD...   run CMD in the board over ssh (starts it if needed)
#
# Needs root on a Debian/Ubuntu x86-64 host (debootstrap, chroot, mount, binfmt_misc).
# Lives in $EDGECTL_BOARDS (default ~/.cache/edgectl/boards)/bookworm-arm64: root/ (the
# board's filesystem), id_ed25519 (the client key), ssh_config, known_hosts, port, sshd.log.
# Every build step leaves a stamp in stamps/ when it is complete; the root filesystem is
# built in root.tmp/ and renamed, so an interrupted build resumes where it stopped.
#
# One board, shared by every session on the host (test runs in different clones, a shell):
# build, start and stop hold a lock (flock on lock in the board's directory), and every start
# counts a user in users/: `start --pid PID` a process (the tests' fixture: its pytest), which
# counts while it lives (a pid that ended, or now belongs to another process, no longer
# does); a plain `start` the user "by hand", which counts until a plain `stop`. shell and exec
# count themselves while they run, and a board they start stays up as if started by hand, as
# does a running board that nobody counts (an older script started it, or its users ended
# without stopping it). stop (with the same --pid, or none) ends that user and stops the
# board only when no other user is left; otherwise it says who is left. stop --force stops
# it whoever uses it. build refuses to change a running board: it passes only when there is
# nothing to change (same edgectl sources, same requirements), and otherwise says to stop it.
#
# Every process in the board runs on qemu's Cortex-A76 model (the Raspberry Pi 5's core): a
# binfmt_misc entry of its own (edgectl-aarch64, registered after Debian's qemu-aarch64, so
# it is the one the kernel picks) runs a small wrapper that calls qemu with -cpu cortex-a76,
# whatever the environment, also for processes sshd starts. qemu's default model ("max",
# with SVE/SME) computes wrong results in torch's kernels. oneDNN reads MIDR_EL1 from sysfs:
# the board's /sys is a few plain files saying "Cortex-A76, cpus 0-1" (no sysfs mount).
#
# Python packages are installed by the HOST's pip for the aarch64 platform (no emulation),
# the set edgectl's wheel requires, resolved once, without triton (torch.compile's) and
# coremltools (Core ML export only; no linux-aarch64 wheel). PyPI's aarch64 torch is the CUDA
# build and its nvidia-* packages stay: libtorch_cpu.so itself links libcudart.so.13 and
# libcupti.so.13, libtorch.so links libtorch_cuda.so (cuBLAS, cuDNN, NCCL...), and
# ExecuTorch's _portable_lib links libtorch.so. They take 2.9 GB of the board's 4.8 GB.
set -euo pipefail

NAME=bookworm-arm64
BOARDS=${EDGECTL_BOARDS:-$HOME/.cache/edgectl/boards}
DIR=$(realpath -m "$BOARDS/$NAME")     # canonical: compared with /proc/PID/root
ROOTFS=$DIR/root
STAMPS=$DIR/stamps
PORT_DEFAULT=${EDGECTL_BOARD_PORT:-2222}
VENV=/opt/edgectl                      # inside the board
QEMU_IN_BOARD=/usr/libexec/edgectl-board/qemu-aarch64-static
BINFMT=/proc/sys/fs/binfmt_misc
BINFMT_NAME=edgectl-aarch64
CPU=cortex-a76
MIDR=0x00000000414fd0b0                # Cortex-A76 r4p0
HOSTALIAS=edgectl-$NAME
SRC=$(cd "$(dirname "$0")/.." && pwd)  # the checkout whose wheel goes into the board

die() { echo "arm64-board: $*" >&2; exit 1; }
say() { echo "arm64-board: $*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

need_root() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount, binfmt_misc)"; }

built() { [ -f "$STAMPS/complete" ] && [ -d "$ROOTFS" ]; }

port() { if [ -f "$DIR/port" ]; then cat "$DIR/port"; else echo "$PORT_DEFAULT"; fi; }

ssh_cmd() { echo "ssh -F $DIR/ssh_config board"; }

# --------------------------------------------------------------------------------------
# sharing: one lock for build/start/stop, and the board's users

lock() {  # held until unlock or exit; a start waiting for sshd or a build holds it for a while
  mkdir -p "$DIR"
  exec 9>>"$DIR/lock"
  if ! flock -n 9; then
    say "waiting for another build/start/stop of the board to finish ($DIR/lock)"
    flock -w 3600 9 || die "the board's lock ($DIR/lock) was held for an hour"
  fi
}

unlock() { exec 9>&-; }

USERS=$DIR/users
USER_PID=  # start/stop --pid PID; none: the user "by hand" (users/hand)

proc_start() {  # $1: a pid: its start time (clock ticks after boot), nothing if it is gone
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo "${20}"
}

user_add() {  # $1: the pid of a session using the board (with its start time: pids are reused), or hand
  local t
  mkdir -p "$USERS"
  if [ "$1" = hand ]; then echo "- by hand (until a stop without --pid)" >"$USERS/hand"; return 0; fi
  t=$(proc_start "$1")
  [ -n "$t" ] || die "no process $1 to count as a user of the board"
  echo "$t $(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | cut -c1-100)" >"$USERS/$1"
}

user_del() { rm -f "$USERS/$1"; }

users_live() {  # the live users (pids, hand), one a line; with "prune": forget the others
  local f pid t
  [ -d "$USERS" ] || return 0
  for f in "$USERS"/*; do
    [ -f "$f" ] || continue
    pid=${f##*/}
    if [ "$pid" = hand ]; then echo hand; continue; fi
    t=$(proc_start "$pid")
    if [ -n "$t" ] && [ "$t" = "$(cut -d' ' -f1 "$f" 2>/dev/null)" ]; then
      echo "$pid"
    elif [ "${1:-}" = prune ]; then
      rm -f "$f"
    fi
  done
}

users_line() {  # "N user(s): pid P (command), ..." for the given users
  local n=0 pid out=
  for pid in "$@"; do
    n=$((n + 1))
    if [ "$pid" = hand ]; then out+="${out:+, }$(cut -d' ' -f2- "$USERS/hand" 2>/dev/null)"; continue; fi
    out+="${out:+, }pid $pid ($(cut -d' ' -f2- "$USERS/$pid" 2>/dev/null | sed 's/ *$//'))"
  done
  if [ "$n" = 0 ]; then echo "nobody"; else echo "$n user(s): $out"; fi
}

# --------------------------------------------------------------------------------------
# host side: packages, binfmt_misc and the qemu wrapper

host_tools() {
  local missing=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  command -v ssh >/dev/null || missing+=(openssh-client)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} on the host"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

binfmt_mount() {
  [ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT" \
    || die "cannot mount binfmt_misc on $BINFMT"
}

wrapper() {  # the binfmt interpreter: qemu-aarch64 with the Cortex-A76 model, always
  local bin=$DIR/qemu-aarch64-a76
  [ -x "$bin" ] && [ "$bin" -nt "$0" ] && return 0
  mkdir -p "$DIR"
  cat >"$DIR/qemu-aarch64-a76.c" <<EOF
/* binfmt_misc interpreter (flags PF): argv = {self, binary, its argv[0], args...} */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
  const char *qemu[] = {"$QEMU_IN_BOARD", "/usr/bin/qemu-aarch64-static", NULL};
  char **a = calloc(argc + 8, sizeof *a);
  int n = 0, i;
  if (argc < 3 || !a) { fputs("qemu-aarch64-a76: for binfmt_misc only\n", stderr); return 127; }
  a[n++] = "qemu-aarch64-static"; a[n++] = "-cpu"; a[n++] = "$CPU";
  a[n++] = "-0"; a[n++] = argv[2]; a[n++] = argv[1];
  for (i = 3; i < argc; i++) a[n++] = argv[i];
  for (i = 0; qemu[i]; i++) execv(qemu[i], a);
  perror("qemu-aarch64-a76: qemu-aarch64-static");
  return 127;
}
EOF
  cc -O2 -static -o "$bin.tmp" "$DIR/qemu-aarch64-a76.c" || die "cannot compile the qemu wrapper"
  mv "$bin.tmp" "$bin"
}

binfmt_register() {  # (re)register last, so that the kernel picks it before Debian's entry
  binfmt_mount
  wrapper
  [ -e "$BINFMT/$BINFMT_NAME" ] && echo -1 >"$BINFMT/$BINFMT_NAME"
  local magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
  local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
  printf ':%s:M::%s:%s:%s:PF' "$BINFMT_NAME" "$magic" "$mask" "$DIR/qemu-aarch64-a76" >"$BINFMT/register" \
    || die "cannot register the $BINFMT_NAME binfmt_misc entry"
}

binfmt_unregister() {
  if [ -e "$BINFMT/$BINFMT_NAME" ]; then echo -1 >"$BINFMT/$BINFMT_NAME"; fi
}

# --------------------------------------------------------------------------------------
# mounts inside the board

mounts_under() {  # mount points under $1, deepest first
  awk -v p="$1/" 'index($2 "/", p) == 1 { print $2 }' /proc/self/mounts | sort -r
}

unmount_all() {  # $1: a root filesystem
  local m
  for m in $(mounts_under "$1"); do
    umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount $m"
  done
}

mount_runtime() {  # $1: a root filesystem: /proc, /dev, /dev/pts for chroot work and sshd
  local r=$1
  mountpoint -q "$r/proc" || mount -t proc proc "$r/proc"
  mountpoint -q "$r/dev" || mount --bind /dev "$r/dev"
  mountpoint -q "$r/dev/pts" || mount --bind /dev/pts "$r/dev/pts"
}

in_board() {  # run a command in the board's chroot (for build steps; /proc and /dev mounted)
  chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

fake_sys() {  # $1: a root filesystem. What oneDNN and glibc read from sysfs, for a 2-core A76
  local cpu=$1/sys/devices/system/cpu i
  mkdir -p "$cpu"
  for i in 0 1; do
    mkdir -p "$cpu/cpu$i/regs/identification"
    echo "$MIDR" >"$cpu/cpu$i/regs/identification/midr_el1"
    echo 0x0000000000000000 >"$cpu/cpu$i/regs/identification/revidr_el1"
  done
  for i in online possible present; do echo 0-1 >"$cpu/$i"; done
}

# --------------------------------------------------------------------------------------
# build steps, each stamped

step() {  # step NAME FUNCTION: run FUNCTION unless NAME is stamped
  local t0=$SECONDS
  [ -f "$STAMPS/$1" ] && return 0
  say "build: $1"
  "$2"
  touch "$STAMPS/$1"
  say "build: $1 done ($((SECONDS - t0)) s)"
}

mirror() {  # the Debian mirror apt already uses on the host
  local m
  m=$(grep -rhsE '^(URIs:|deb) ' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
      | grep -oE 'https?://[^ ]*/debian/?' | grep -v security | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

build_rootfs() {
  local tmp=$DIR/root.tmp
  if [ -d "$tmp" ]; then unmount_all "$tmp"; rm -rf "$tmp"; fi
  mkdir -p "$tmp"
  debootstrap --arch=arm64 --variant=minbase --foreign --include=python3,python3-venv \
    bookworm "$tmp" "$(mirror)" >"$DIR/debootstrap.log" 2>&1 \
    || die "debootstrap (first stage) failed: see $DIR/debootstrap.log"
  mkdir -p "$tmp$(dirname "$QEMU_IN_BOARD")"
  cp "$(command -v qemu-aarch64-static)" "$tmp$QEMU_IN_BOARD"
  chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$DIR/debootstrap.log" 2>&1 \
    || { unmount_all "$tmp"; die "debootstrap (second stage) failed: see $DIR/debootstrap.log"; }
  unmount_all "$tmp"
  fake_sys "$tmp"
  mv "$tmp" "$ROOTFS"
}

build_base() {  # name resolution and CAs for apt/pip in the board; services never auto-start
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  mkdir -p "$ROOTFS/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
  chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
}

build_sshd() {
  mount_runtime "$ROOTFS"
  # libatomic1: ExecuTorch's LLM runner library (_llm_runner, what the stand-in llama_main calls) links libatomic.so.1;
  # g++: edgectl compiles its native shim on first use (about 35 s emulated), so runs there need no torch
  in_board apt-get install -y -qq --no-install-recommends openssh-server libatomic1 g++ >"$DIR/apt.log" 2>&1 \
    || { unmount_all "$ROOTFS"; die "apt-get install openssh-server libatomic1 g++ in the board failed: see $DIR/apt.log"; }
  unmount_all "$ROOTFS"
  rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*_Packages
}

build_keys() {  # host keys, the client key, ssh_config and known_hosts, sshd settings
  ssh-keygen -A -f "$ROOTFS" >/dev/null   # any host key the package did not make
  rm -f "$DIR/id_ed25519" "$DIR/id_ed25519.pub"
  ssh-keygen -q -t ed25519 -N '' -C "edgectl-board" -f "$DIR/id_ed25519"
  install -d -m 700 "$ROOTFS/root/.ssh"
  install -m 600 "$DIR/id_ed25519.pub" "$ROOTFS/root/.ssh/authorized_keys"
  echo "$HOSTALIAS $(cut -d' ' -f1,2 "$ROOTFS/etc/ssh/ssh_host_ed25519_key.pub")" >"$DIR/known_hosts"
  mkdir -p "$ROOTFS/run/sshd" "$ROOTFS/etc/ssh/sshd_config.d"
  cat >"$ROOTFS/etc/ssh/sshd_config.d/edgectl.conf" <<'EOF'
# edgectl's emulated board: root with a key, no passwords, no PAM (no logind in a chroot)
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
EOF
  cat >"$ROOTFS/etc/profile.d/edgectl.sh" <<EOF
# edgectl's venv first on PATH for login shells
PATH=$VENV/bin:\$PATH
EOF
}

build_venv() {
  mount_runtime "$ROOTFS"
  in_board python3 -m venv "$VENV" >"$DIR/venv.log" 2>&1 \
    || { unmount_all "$ROOTFS"; die "python3 -m venv in the board failed: see $DIR/venv.log"; }
  unmount_all "$ROOTFS"
  ln -sf "$VENV/bin/edgectl" "$ROOTFS/usr/local/bin/edgectl"
}

HOST_PY=
host_python() {  # a host Python with pip, to install the board's packages without emulation
  local p
  for p in "${PYTHON:-}" "$SRC/.venv/bin/python" python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null && "$p" -m pip --version >/dev/null 2>&1 && { HOST_PY=$p; return 0; }
  done
  die "no host Python with pip (set PYTHON=...)"
}

pip_aarch64() {  # host pip, for CPython 3.11 on manylinux aarch64 (bookworm: glibc 2.36)
  local plats=() v
  for v in $(seq 36 -1 17); do plats+=(--platform "manylinux_2_${v}_aarch64"); done
  plats+=(--platform manylinux2014_aarch64)
  "$HOST_PY" -m pip install -q --disable-pip-version-check "${plats[@]}" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none "$@"
}

edgectl_wheel() {  # this checkout's wheel, from the files a clone holds; prints its path
  local w=$DIR/wheel.tmp
  rm -rf "$w"; mkdir -p "$w/src"
  if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard) \
      | while IFS= read -r -d '' f; do if [ -e "$SRC/$f" ]; then printf '%s\0' "$f"; fi; done \
      | (cd "$SRC" && tar --null -T - -cf -) | tar -C "$w/src" -xf -
  else
    cp -a "$SRC/." "$w/src/"
  fi
  "$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$w" "$w/src" >"$DIR/wheel.log" 2>&1 \
    || "$HOST_PY" -m pip wheel -q --no-deps -w "$w" "$w/src" >>"$DIR/wheel.log" 2>&1 \
    || die "building edgectl's wheel failed: see $DIR/wheel.log"
  ls "$w"/edgectl-*.whl
}

site_packages() { echo "$ROOTFS$VENV/lib/python3.11/site-packages"; }

move_into_venv() {  # $1: a pip --target dir: its packages into the venv, its scripts into bin/
  local t=$1 sp e
  sp=$(site_packages)
  if [ -d "$t/bin" ]; then
    for e in "$t/bin/"*; do
      sed -i "1s|^#!.*python.*|#!$VENV/bin/python|" "$e"
      mv -f "$e" "$ROOTFS$VENV/bin/"
    done
    rmdir "$t/bin"
  fi
  for e in "$t/"* "$t/".[!.]*; do
    [ -e "$e" ] || continue
    rm -rf "${sp:?}/$(basename "$e")"
    mv "$e" "$sp/"
  done
}

SKIP_RE='^(triton|coremltools)$'
WHEEL=
build_deps() {  # everything edgectl's wheel ($WHEEL) needs, resolved for aarch64, minus $SKIP_RE
  local work=$DIR/deps.tmp wheel=$WHEEL
  rm -rf "$work"; mkdir -p "$work/links"
  # antlr4-python3-runtime (hydra-core's) is an sdist only: a pure-Python wheel built here
  "$HOST_PY" -m pip wheel -q --no-deps -w "$work/links" antlr4-python3-runtime==4.9.3 >"$DIR/deps.log" 2>&1 \
    || die "building antlr4-python3-runtime's wheel failed: see $DIR/deps.log"
  # coremltools has no linux-aarch64 wheel: an empty stand-in lets the resolver pass, then it is left out
  "$HOST_PY" - "$work/links" <<'EOF'
import sys, zipfile
n, v = "coremltools", "9.0"
d = f"{n}-{v}.dist-info"
with zipfile.ZipFile(f"{sys.argv[1]}/{n}-{v}-py3-none-any.whl", "w") as z:
    z.writestr(f"{d}/METADATA", f"Metadata-Version: 2.1\nName: {n}\nVersion: {v}\n")
    z.writestr(f"{d}/WHEEL", "Wheel-Version: 1.0\nGenerator: edgectl\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{d}/RECORD", "")
EOF
  # edgectl's requirements (its wheel may be the host's platform wheel: not installable here)
  "$HOST_PY" - "$wheel" >"$work/requires.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
z = zipfile.ZipFile(sys.argv[1])
meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
print("\n".join(r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r))
EOF
  pip_aarch64 --dry-run --ignore-installed --report "$work/report.json" --find-links "$work/links" \
    --target "$work/t" -r "$work/requires.txt" >>"$DIR/deps.log" 2>&1 \
    || die "resolving the board's packages failed: see $DIR/deps.log"
  "$HOST_PY" - "$work/report.json" "$SKIP_RE" >"$work/pins.txt" <<'EOF'
import json, re, sys
skip = re.compile(sys.argv[2])
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.lower() != "edgectl" and not skip.match(name.lower()):
        print(f"{name}=={version}")
EOF
  say "build: $(wc -l <"$work/pins.txt") packages, leaving out: $(
    "$HOST_PY" -c 'import json,re,sys; print(" ".join(sorted(i["metadata"]["name"] for i in json.load(open(sys.argv[1]))["install"] if re.match(sys.argv[2], i["metadata"]["name"].lower()))))' \
      "$work/report.json" "$SKIP_RE")"
  pip_aarch64 --no-deps --find-links "$work/links" --target "$work/t" -r "$work/pins.txt" >>"$DIR/deps.log" 2>&1 \
    || die "installing the board's packages failed: see $DIR/deps.log"
  cp "$work/pins.txt" "$DIR/packages.txt"
  move_into_venv "$work/t"
  rm -rf "$work"
}

deps_key() {  # what the board's packages were resolved for: $WHEEL's requirements, $SKIP_RE
  "$HOST_PY" -c 'import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); m = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
req = [l for l in z.read(m).decode().splitlines() if l.startswith("Requires-Dist:")]
print(hashlib.sha256("\n".join(req + sys.argv[2:]).encode()).hexdigest())' "$WHEEL" "$SKIP_RE"
}

wheel_sum() {  # $WHEEL's sources: a rebuilt wheel differs in timestamps and compiled files
  "$HOST_PY" -c 'import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); h = hashlib.sha256()
for n in sorted(z.namelist()):
    b = z.read(n)
    if not (b[:4] == b"\x7fELF" or n.endswith(".dist-info/RECORD")):
        h.update(n.encode() + b"\0" + b)
print(h.hexdigest())' "$WHEEL"
}

WHEELS=$DIR/wheels  # edgectl's aarch64 wheel, built in the board, under the sum of its sources
aarch64_wheel() {  # this checkout's platform wheel for aarch64, built IN the board: the board's
  # g++ compiles the native shim into it, against the board's executorch (setup.py, as on a
  # Pi); kept under the sources' sum, so it is built once per change; prints its path.
  # Needs the board's packages (build_deps) and $DIR/wheel.tmp/src (edgectl_wheel).
  local sum out w=$ROOTFS/tmp/edgectl-wheel log=$DIR/wheel-aarch64.log mounted=
  sum=$(wheel_sum)
  out=$WHEELS/$sum
  if ls "$out"/edgectl-*-linux_aarch64.whl >/dev/null 2>&1; then ls "$out"/edgectl-*-linux_aarch64.whl; return 0; fi
  say "build: edgectl's aarch64 wheel (its native shim compiled in the board, emulated: under a minute)"
  rm -rf "$w"; mkdir -p "$w/site" "$w/out"
  cp -a "$DIR/wheel.tmp/src" "$w/src"
  # pyproject's build backend (setuptools >= 77); bookworm's venv has 66: a pure wheel beside it
  "$HOST_PY" -m pip install -q --disable-pip-version-check --no-deps --target "$w/site" 'setuptools>=77' >"$log" 2>&1 \
    || die "fetching setuptools for the board's wheel build failed: see $log"
  running || { mount_runtime "$ROOTFS"; mounted=1; }
  if ! in_board env PYTHONPATH=/tmp/edgectl-wheel/site EDGECTL_REQUIRE_SHIM=1 "$VENV/bin/python" -m pip wheel -q \
      --disable-pip-version-check --no-deps --no-build-isolation --no-index -w /tmp/edgectl-wheel/out \
      /tmp/edgectl-wheel/src >>"$log" 2>&1; then
    [ -z "$mounted" ] || unmount_all "$ROOTFS"
    die "building edgectl's aarch64 wheel in the board failed: see $log"
  fi
  [ -z "$mounted" ] || unmount_all "$ROOTFS"
  ls "$w"/out/edgectl-*-linux_aarch64.whl >/dev/null 2>&1 || die "the board's wheel build made no linux_aarch64 wheel: see $log"
  rm -rf "$WHEELS"; mkdir -p "$out"
  mv "$w"/out/edgectl-*-linux_aarch64.whl "$out"/
  rm -rf "$w"
  ls "$out"/edgectl-*-linux_aarch64.whl
}

edgectl_key() { echo "aarch64-wheel $(wheel_sum)"; }  # the stamp of the edgectl the board holds

build_edgectl() {  # this checkout's edgectl, as its aarch64 wheel, reinstalled whenever its sources change
  local sum work=$DIR/edgectl.tmp sp whl
  sum=$(edgectl_key)
  if [ -f "$STAMPS/edgectl" ] && [ "$(cat "$STAMPS/edgectl")" = "$sum" ]; then
    return 0
  fi
  say "build: edgectl (from $SRC)"
  whl=$(aarch64_wheel)
  rm -rf "$work"
  # the host's pip unpacks the aarch64 wheel (no emulation); its native shim is prebuilt
  "$HOST_PY" -m pip install -q --disable-pip-version-check --no-deps --target "$work" --only-binary=:all: \
    --platform linux_aarch64 --python-version 3.11 --implementation cp --abi cp311 "$whl" \
    >"$DIR/edgectl.log" 2>&1 || die "installing edgectl's aarch64 wheel failed: see $DIR/edgectl.log"
  sp=$(site_packages)
  rm -rf "$sp"/edgectl "$sp"/edgectl-*.dist-info
  move_into_venv "$work"
  rm -rf "$work"
  echo "$sum" >"$STAMPS/edgectl"
  rm -f "$STAMPS/check"
}

CHECK_PY='
import ctypes, glob, os, platform, executorch, torch
lib = glob.glob(os.path.join(list(executorch.__path__)[0], "extension/pybindings/_portable_lib*.so"))[0]
ctypes.CDLL(lib)
from executorch.extension.pybindings import portable_lib
import edgectl
import importlib
build = importlib.import_module("edgectl.runtime._native.build")
so, why = build.prebuilt()
assert so, f"the prebuilt native shim of edgectl: {why}"
print(platform.machine(), "torch", torch.__version__, "prebuilt shim", so.name, "ok")
'
build_check() {  # the board imports torch and ExecuTorch, loads _portable_lib and edgectl's prebuilt shim
  mount_runtime "$ROOTFS"
  in_board "$VENV/bin/python" -c "$CHECK_PY" >"$DIR/check.log" 2>&1 \
    || { unmount_all "$ROOTFS"; die "the board's Python cannot load ExecuTorch: see $DIR/check.log"; }
  unmount_all "$ROOTFS"
}

cmd_build() {
  need_root
  local t0=$SECONDS
  mkdir -p "$DIR" "$STAMPS"
  lock  # no start, stop or other build meanwhile
  if running; then build_while_running; return 0; fi
  host_tools
  host_python
  binfmt_register
  [ -d "$ROOTFS" ] || { rm -f "$STAMPS"/*; step rootfs build_rootfs; }
  fake_sys "$ROOTFS"
  step base build_base
  step sshd build_sshd
  step keys build_keys
  step venv build_venv
  WHEEL=$(edgectl_wheel)
  # the packages again when edgectl's requirements (or what is left out) change
  local key
  key=$(deps_key)
  if [ "$(cat "$STAMPS/deps" 2>/dev/null)" != "$key" ]; then
    local t1=$SECONDS
    say "build: deps"
    build_deps
    echo "$key" >"$STAMPS/deps"
    rm -f "$STAMPS/check"
    say "build: deps done ($((SECONDS - t1)) s)"
  fi
  build_edgectl
  rm -rf "$DIR/wheel.tmp"
  step check build_check
  touch "$STAMPS/complete"
  say "built in $((SECONDS - t0)) s: $DIR ($(du -sh "$DIR" | cut -f1)); start it with: bash $0 start"
}

cmd_wheel() {  # $1: a directory (default: the checkout's dist/): edgectl's aarch64 wheel into it
  need_root
  local dest=${1:-$SRC/dist} whl
  built || die "not built: run bash $0 build first (the wheel is built in the board)"
  lock
  host_python
  WHEEL=$(edgectl_wheel)
  whl=$(aarch64_wheel)
  rm -rf "$DIR/wheel.tmp"
  mkdir -p "$dest"
  cp "$whl" "$dest/"
  echo "$dest/$(basename "$whl")"
}

build_while_running() {  # its users run what is in it: passes only if there is nothing to change
  local users
  users=$(users_live)
  # shellcheck disable=SC2086
  users=$(users_line $users)
  built || die "the board is running but not completely built: stop it first (bash $0 stop; in use by $users)"
  host_python
  WHEEL=$(edgectl_wheel)
  if [ "$(cat "$STAMPS/deps" 2>/dev/null)" = "$(deps_key)" ] && [ "$(cat "$STAMPS/edgectl" 2>/dev/null)" = "$(edgectl_key)" ] \
     && [ -f "$STAMPS/check" ]; then
    rm -rf "$DIR/wheel.tmp"
    say "up to date (edgectl from $SRC); running, left as it is"
    return 0
  fi
  rm -rf "$DIR/wheel.tmp"
  die "the board is running and its edgectl (or its packages) differ from $SRC's: building would change them under its users (in use by $users). Stop it first: bash $0 stop (--force stops it for every user)"
}

# --------------------------------------------------------------------------------------
# running

sshd_pid() {  # the pid of the board's sshd, if it runs
  local pid
  [ -f "$DIR/sshd.pid" ] || return 1
  pid=$(cat "$DIR/sshd.pid")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(readlink "/proc/$pid/root")" = "$ROOTFS" ] || return 1
  echo "$pid"
}

running() { sshd_pid >/dev/null; }

board_pids() {  # every process whose root is the board's
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOTFS" ] && echo "${p#/proc/}"
  done
  return 0
}

write_ssh_config() {
  cat >"$DIR/ssh_config" <<EOF
Host board
  HostName 127.0.0.1
  Port $1
  User root
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  HostKeyAlias $HOSTALIAS
  UserKnownHostsFile $DIR/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
EOF
}

cmd_start() {  # with the lock held until this script exits (or unlock)
  need_root
  built || die "not built: run bash $0 build first"
  lock
  if running; then
    # nobody counted: started by an older script, or by users that ended without stopping it
    [ -n "$(users_live prune)" ] || user_add hand
    user_add "${USER_PID:-hand}"
    # shellcheck disable=SC2046
    [ -n "$QUIET" ] || say "running, in use by $(users_line $(users_live))"
    ssh_cmd
    return 0
  fi
  rm -rf "$USERS"  # left by a board that stopped without this script
  user_add "${USER_PID:-hand}"
  local p=$PORT_DEFAULT i
  binfmt_register
  fake_sys "$ROOTFS"
  mount_runtime "$ROOTFS"
  mkdir -p "$ROOTFS/run/sshd"
  echo "$p" >"$DIR/port"
  write_ssh_config "$p"
  setsid chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 /usr/sbin/sshd -D -e -p "$p" -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no \
    </dev/null >"$DIR/sshd.log" 2>&1 9>&- &  # 9: the lock, not kept by sshd
  echo $! >"$DIR/sshd.pid"
  for i in $(seq 1 120); do
    if ssh -F "$DIR/ssh_config" -o ConnectTimeout=5 board true 2>/dev/null; then
      say "running: sshd on 127.0.0.1:$p (pid $(cat "$DIR/sshd.pid")); connect with:"
      ssh_cmd
      return 0
    fi
    if ! kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; then
      board_down >/dev/null 2>&1 || true
      die "sshd exited: $(tail -n1 "$DIR/sshd.log")"
    fi
    sleep 1
  done
  board_down >/dev/null 2>&1 || true
  die "sshd did not answer on port $p within 120 s: see $DIR/sshd.log"
}

FORCE=
cmd_stop() {
  need_root
  lock
  user_del "${USER_PID:-hand}"
  local others
  others=$(users_live prune)
  if [ -n "$others" ] && running; then
    # shellcheck disable=SC2086
    if [ -z "$FORCE" ]; then say "left running: in use by $(users_line $others) (stop --force stops it anyway)"; return 0; fi
    # shellcheck disable=SC2086
    say "--force: stopping it under $(users_line $others)"
  fi
  board_down
}

board_down() {  # kill its processes, unmount, unregister the binfmt entry; forget its users
  local pids i
  pids=$(board_pids)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    for i in $(seq 1 20); do
      pids=$(board_pids); [ -z "$pids" ] && break; sleep 0.5
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  fi
  rm -f "$DIR/sshd.pid"
  rm -rf "$USERS"
  [ -d "$ROOTFS" ] && unmount_all "$ROOTFS"
  binfmt_unregister
  say "stopped"
}

cmd_status() {
  if built; then echo "built: $DIR"; else echo "not built: $DIR"; fi
  if running; then
    echo "running: sshd pid $(sshd_pid) on 127.0.0.1:$(port)"
    # shellcheck disable=SC2046
    echo "in use by $(users_line $(users_live))"
    ssh_cmd
  else
    echo "stopped"
  fi
  local m
  m=$(mounts_under "$ROOTFS")
  [ -z "$m" ] || echo "mounts: $(echo "$m" | tr '\n' ' ')"
  running || built
}

QUIET=
ensure_running() {  # for shell and exec: this process (ssh, after exec) is a user meanwhile
  running || { cmd_start >/dev/null; unlock; }  # as if by hand
  USER_PID=$$ QUIET=1
  cmd_start >/dev/null
  unlock
}

options() {  # start/stop options
  while [ $# -gt 0 ]; do
    case "$1" in
      --pid) [ $# -gt 1 ] || die "--pid: a process id"; USER_PID=$2; shift ;;
      --pid=*) USER_PID=${1#--pid=} ;;
      --force) [ "$cmd" = stop ] || die "$cmd: unknown option --force"; FORCE=1 ;;
      *) die "$cmd: unknown option $1 (try --help)" ;;
    esac
    shift
  done
  case "$USER_PID" in *[!0-9]*) die "--pid: a process id, not '$USER_PID'" ;; esac
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case "$cmd" in
    build) cmd_build ;;
    start) options "$@"; cmd_start ;;
    stop) options "$@"; cmd_stop ;;
    status) cmd_status ;;
    wheel) [ $# -le 1 ] || die "wheel: at most one directory"; cmd_wheel "$@" ;;
    shell) ensure_running; exec ssh -F "$DIR/ssh_config" -t -o BatchMode=yes board ;;
    exec) [ $# -gt 0 ] || die "exec: a command to run"; ensure_running
          exec ssh -F "$DIR/ssh_config" board "$@" ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command: $cmd (try --help)" ;;
  esac
}

main "$@"; exit
