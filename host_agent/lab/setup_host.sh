#!/bin/sh
# Prepare a Debian 12 host (root, no systemd needed) for hyperback's real-VM tests.
#
# Idempotent: safe to run again; it installs what is missing, rewrites the
# qemu.conf settings it owns, and starts virtlogd + libvirtd only if they are
# not already answering.  No reboot is needed: the kernel installed under /boot
# by linux-image-amd64 is only used as the *guest's* kernel.
#
# Usage:  sudo sh host_agent/lab/setup_host.sh            # install + start daemons
#         sudo sh host_agent/lab/setup_host.sh --no-start # install + configure only
#         sudo sh host_agent/lab/setup_host.sh --stop     # stop the daemons it started
set -eu

START=1
case "${1:-}" in
    --no-start) START=0 ;;
    --stop)
        # Destroy leftover vmlab guests (their <description> marks them), then stop the daemons.
        if virsh -c qemu:///system version >/dev/null 2>&1; then
            for d in $(virsh -c qemu:///system list --all --name); do
                if virsh -c qemu:///system desc "$d" 2>/dev/null | grep -q '^hyperback vmlab test guest'; then
                    virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
                    virsh -c qemu:///system undefine "$d" >/dev/null 2>&1 || true
                    echo "setup_host.sh: removed vmlab guest $d"
                fi
            done
        fi
        for p in /var/run/libvirtd.pid /var/run/virtlogd.pid; do
            if [ -s "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null; then
                pid=$(cat "$p"); kill "$pid"
                i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
            fi
        done
        exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--no-start|--stop]" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "setup_host.sh: must run as root" >&2; exit 1; }

PKGS="qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
libvirt-dev pkg-config linux-image-amd64 busybox-static e2fsprogs iproute2 kmod cpio libnbd-bin"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup_host.sh: installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # --no-install-recommends keeps out dnsmasq/firewall/etc. that a test host does not use.
    # linux-image-amd64's postinst must not try to configure a boot loader: none is needed.
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

# The guest kernel must carry 9p; linux-image-amd64 does, -cloud-amd64 does not.
if ! ls /lib/modules/*/kernel/fs/9p/9p.ko* >/dev/null 2>&1; then
    echo "setup_host.sh: no 9p.ko under /lib/modules (need linux-image-amd64)" >&2; exit 1
fi

# libvirt's qemu driver refuses to start without this user/group.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || \
    useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu /etc/libvirt

# Settings in qemu.conf: drop earlier copies of our keys, then append ours once.
CONF=/etc/libvirt/qemu.conf
touch "$CONF"
MARK="# --- hyperback vmlab settings ---"
tmp=$(mktemp)
sed -e "/^$MARK\$/d" \
    -e '/^[[:space:]]*\(user\|group\|dynamic_ownership\|remember_owner\|security_driver\|cgroup_controllers\)[[:space:]]*=/d' \
    "$CONF" > "$tmp"
cat >> "$tmp" <<CONFEOF
$MARK
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
CONFEOF
if ! cmp -s "$tmp" "$CONF"; then
    cat "$tmp" > "$CONF"
    CONF_CHANGED=1
else
    CONF_CHANGED=0
fi
rm -f "$tmp"

[ "$START" = 1 ] || exit 0

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
answers() { virsh -c qemu:///system version >/dev/null 2>&1; }

if ! alive /var/run/virtlogd.pid; then
    virtlogd -d -p /var/run/virtlogd.pid
fi

if answers && [ "$CONF_CHANGED" = 1 ]; then
    if alive /var/run/libvirtd.pid; then
        echo "setup_host.sh: qemu.conf changed, restarting libvirtd"
        pid=$(cat /var/run/libvirtd.pid); kill "$pid"
        i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    else
        echo "setup_host.sh: qemu.conf changed but libvirtd was not started by this script; restart it yourself" >&2
    fi
fi
if ! answers; then
    libvirtd -d -p /var/run/libvirtd.pid
fi

i=0
until answers; do
    i=$((i+1))
    [ $i -lt 100 ] || { echo "setup_host.sh: libvirtd does not answer" >&2; exit 1; }
    sleep 0.2
done
echo "setup_host.sh: ready: $(virsh -c qemu:///system version | grep -i 'running hypervisor')"
