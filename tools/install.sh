#!/bin/bash
# `make install`: Ferry on a real host (or into a staging tree for packaging).
#
#   /opt/ferry                          a virtual environment with Ferry and its
#                                       dependencies (non-editable, compiled ferry_native)
#   $PREFIX/bin/ferry-source            symlinks to the console scripts in /opt/ferry/bin
#   $PREFIX/bin/ferry-destination
#   $PREFIX/bin/ferryctl
#   /etc/systemd/system/ferry-*.service, ferry-destination.socket
#                                       (ExecStart= rewritten when PREFIX is not /usr/local)
#   /usr/lib/tmpfiles.d/ferry.conf      /run/ferry, /var/lib/ferry
#   /usr/lib/sysusers.d/ferry.conf      group "ferry"
#   /etc/ferry/agent.toml               a starting config with a fresh host UUID,
#                                       written only when there is none: an
#                                       operator's config is never overwritten
#   /etc/ferry/pki/                     (0700) where the host's CA, certificate and key go
#
# Every path above is under $DESTDIR when it is set (staging for a package).
# The venv is built at its staging path and then relocated: script shebangs,
# activate scripts and pyvenv.cfg name /opt/ferry, and byte code is compiled
# with /opt/ferry paths, so the tree works once copied to /.
#
# Only with an empty DESTDIR, i.e. on the host itself: systemd-sysusers and
# systemd-tmpfiles create the group and directories, and `systemctl
# daemon-reload` runs when systemd is the init system (/run/systemd/system).
# Nothing is enabled or started; the closing message says how.
#
# Environment: DESTDIR (default empty), PREFIX (default /usr/local),
# INSTALL_PYTHON (default /usr/bin/python3: the venv must not depend on an
# interpreter under /root or /home, which the units hide with ProtectHome=).

set -euo pipefail
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
VENV=/opt/ferry
ROOT_VENV=$DESTDIR$VENV
SCRIPTS=(ferry-source ferry-destination ferryctl)

if [[ -z ${INSTALL_PYTHON:-} ]]; then
    INSTALL_PYTHON=/usr/bin/python3
    [[ -x $INSTALL_PYTHON ]] || INSTALL_PYTHON=$(command -v python3)
fi

say() { printf 'install: %s\n' "$*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-install.XXXXXX")
trap 'rm -rf "$work"' EXIT

# -- 1. a clean copy of the source tree ---------------------------------------
# pip builds in the tree it is given (build/, *.egg-info, Cython's .c files);
# building from a copy leaves the checkout (and a concurrent `make build`)
# alone. Build products of the editable install are left out.
mkdir "$work/src"
tar -C "$REPO" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./tmp \
    --exclude=./tests --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude='*.so' --exclude='native/ferry_native/*.c' \
    --exclude=.hypothesis --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache \
    . | tar -C "$work/src" -xf -

# -- 2. the virtual environment -------------------------------------------------
if [[ ! -x $ROOT_VENV/bin/python ]]; then
    say "creating the virtual environment $ROOT_VENV ($INSTALL_PYTHON)"
    "$INSTALL_PYTHON" -m venv "$ROOT_VENV"
fi
pip=("$ROOT_VENV/bin/python" -m pip --disable-pip-version-check -q)
compile_flag=()
# Staged: compile byte code ourselves below, with the final paths.
[[ -n $DESTDIR ]] && compile_flag=(--no-compile)

say "building Ferry (Cython extension included)"
"${pip[@]}" wheel --no-deps --wheel-dir "$work/wheel" "$work/src"
wheel=$(echo "$work"/wheel/ferry-*.whl)
[[ -f $wheel ]] || { echo "install: no wheel was built" >&2; exit 1; }
# Same version number as an installed Ferry still has to replace it.
if "${pip[@]}" show ferry >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y ferry
fi
say "installing into $ROOT_VENV"
"${pip[@]}" install "${compile_flag[@]}" "$wheel"
"$ROOT_VENV/bin/python" -c 'import ferry_native, sys; sys.exit(ferry_native.BACKEND != "native")' \
    || { echo "install: the installed ferry_native is not the compiled one" >&2; exit 1; }

if [[ -n $DESTDIR ]]; then
    # Relocate: nothing in the tree may name the staging directory.
    { grep -rlIF --null -- "$ROOT_VENV" "$ROOT_VENV/bin" "$ROOT_VENV/pyvenv.cfg" || true; } \
        | xargs -0 -r sed -i "s|$ROOT_VENV|$VENV|g"
    # Byte code names its source file: recompile everything (pip's and the
    # venv's own setuptools/pip alike) under the final path.
    find "$ROOT_VENV/lib" -name __pycache__ -type d -prune -exec rm -rf {} +
    "$ROOT_VENV/bin/python" -m compileall -q -j 0 -s "$DESTDIR" -p / "$ROOT_VENV/lib" >/dev/null
fi

# -- 3. commands -------------------------------------------------------------------
install -d -m 0755 "$DESTDIR$PREFIX/bin"
for script in "${SCRIPTS[@]}"; do
    [[ -x $ROOT_VENV/bin/$script ]] || { echo "install: $script missing in the venv" >&2; exit 1; }
    ln -sfn "$VENV/bin/$script" "$DESTDIR$PREFIX/bin/$script"
done

# -- 4. systemd units, tmpfiles.d, sysusers.d ---------------------------------------
install -d -m 0755 "$DESTDIR/etc/systemd/system" \
    "$DESTDIR/usr/lib/tmpfiles.d" "$DESTDIR/usr/lib/sysusers.d"
for unit in "$REPO"/systemd/*.service "$REPO"/systemd/*.socket; do
    # The shipped units run /usr/local/bin/ferry-*; follow PREFIX.
    sed -e "/^ExecStart=/s|/usr/local/bin/|$PREFIX/bin/|g" "$unit" >"$work/unit"
    install -m 0644 "$work/unit" "$DESTDIR/etc/systemd/system/$(basename "$unit")"
done
install -m 0644 "$REPO/systemd/tmpfiles.d/ferry.conf" "$DESTDIR/usr/lib/tmpfiles.d/ferry.conf"
install -m 0644 "$REPO/systemd/sysusers.d/ferry.conf" "$DESTDIR/usr/lib/sysusers.d/ferry.conf"

# -- 5. configuration (never overwritten) ------------------------------------------------
install -d -m 0755 "$DESTDIR/etc/ferry"
install -d -m 0700 "$DESTDIR/etc/ferry/pki"
config=$DESTDIR/etc/ferry/agent.toml
if [[ -e $config ]]; then
    say "keeping the existing $config"
else
    host_uuid=$(cat /proc/sys/kernel/random/uuid)
    host_name=$(hostname -s 2>/dev/null || uname -n)
    # The address peers send migration data to: the one this host uses to
    # reach the outside (192.0.2.1 is TEST-NET-1; no packet is sent).
    address=$(ip -o route get 192.0.2.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' || true)
    if [[ -n $address ]]; then
        migration_line="migration_address = \"$address\""
    else
        migration_line="# migration_address = \"192.0.2.10\"   # SET THIS"
    fi
    cat >"$work/agent.toml" <<EOF
# Ferry agent configuration (ferry-source and ferry-destination of this host).
# Written by \`make install\` on $(date -u +%Y-%m-%d); edit freely: installing
# again never overwrites this file. The keys are documented in
# packages/ferry/config.py; unknown keys are an error.

[host]
# This host's identity in migrations: unique per host, never copied.
uuid = "$host_uuid"
# Label in logs and the journal; also the certificate's name below.
name = "$host_name"

[paths]
state_dir = "/var/lib/ferry"
run_dir = "/run/ferry"
# Ideally an NFS mount shared by all hosts (disk leases).
lockspace_dir = "/var/lib/ferry/lockspace"

[admin]
# Members may use ferryctl (the admin sockets).
group = "ferry"

[destination]
# Peer port; ferry-destination.socket holds it (change both together).
listen = "0.0.0.0:49160"
# Where qemu receives incoming migration data: an address of this host that
# the other hosts reach. Detected at install time; check it.
$migration_line
migration_ports = [49200, 49299]

# From \`ferryctl pki host $host_name ...\` on the admin machine (README.md).
[tls]
ca = "/etc/ferry/pki/ca.pem"
cert = "/etc/ferry/pki/$host_name.pem"
key = "/etc/ferry/pki/$host_name-key.pem"

[qemu]
# Where qemu runs, so that restarting an agent never stops a VM: "auto" = a
# transient scope in machine.slice (systemd-run --scope) when systemd is the
# init system, else detached; or force "scope" / "detached".
cgroup = "auto"

# Root may always; members of group "ferry" may do everything.
[[acl]]
groups = ["ferry"]
ops = ["*"]
domains = ["*"]
EOF
    chmod 0644 "$work/agent.toml"
    # -n: should one appear meanwhile, it wins.
    mv -n "$work/agent.toml" "$config"
    say "wrote $config (host UUID $host_uuid)"
fi

# -- 6. activate on this host ----------------------------------------------------------
if [[ -z $DESTDIR ]]; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers ferry.conf
    fi
    if command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles --create ferry.conf
    fi
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
    fi
fi

say "done. Next: certificates in /etc/ferry/pki, check /etc/ferry/agent.toml, then"
say "  systemctl enable --now ferry-source.service ferry-destination.socket ferry-destination.service"
