#!/bin/sh
# /init of the vmlab guest initramfs (busybox sh).  Installed by tests/vmlab/guest.py.
#
# 1. mounts proc, sys, devtmpfs; insmods the modules listed in /etc/hb/modules (dependency order)
# 2. mounts the host's root (9p tag "hostroot") read-only at /mnt, and proc, sys, dev (devtmpfs),
#    dev/shm, tmp and run (tmpfs) under it
# 3. prints "HB-READY uptime=<s>", then runs the guest command chrooted in /mnt with /bin/sh -c.
#    The command is /hb/cmd if the initramfs carries one, else base64 of the hb.cmd= kernel argument.
# 4. prints "HB-EXIT <status>" and powers off.  A failure before step 3 prints "HB-INIT-FAILED ..."
#    and "HB-EXIT 255".
# Everything goes to /dev/console (ttyS0, a file on the host).
export PATH=/bin
set -f

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

finish() {
    echo "HB-EXIT $1"
    sync
    poweroff -f
    sleep 10
    echo o > /proc/sysrq-trigger
}

fail() {
    echo "HB-INIT-FAILED $*"
    finish 255
}

for m in $(cat /etc/hb/modules); do
    insmod "/lib/modules/$m.ko" || echo "hb-init: insmod $m failed"
done

opts=trans=virtio,version=9p2000.L,ro,msize=262144
i=0
until mount -t 9p -o "$opts" hostroot /mnt; do
    i=$((i + 1))
    [ "$i" -lt 50 ] || fail "cannot mount the 9p tag hostroot"
    sleep 0.1
done
mount -t proc proc /mnt/proc || fail "mount /mnt/proc"
mount -t sysfs sysfs /mnt/sys || fail "mount /mnt/sys"
mount -t devtmpfs devtmpfs /mnt/dev || fail "mount /mnt/dev"
mkdir -p /mnt/dev/shm /mnt/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /mnt/dev/shm
mount -t devpts devpts /mnt/dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /mnt/tmp || fail "mount /mnt/tmp"
[ -d /mnt/run ] && mount -t tmpfs -o mode=755 tmpfs /mnt/run
hostname hb-guest

if [ -f /hb/cmd ]; then
    cmd=$(cat /hb/cmd)
else
    b64=
    for w in $(cat /proc/cmdline); do
        case "$w" in hb.cmd=*) b64=${w#hb.cmd=} ;; esac
    done
    [ -n "$b64" ] || fail "no hb.cmd= on the kernel command line and no /hb/cmd"
    cmd=$(echo "$b64" | base64 -d) || fail "hb.cmd is not base64"
fi

read -r up _ < /proc/uptime
echo "HB-READY uptime=$up"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 \
    chroot /mnt /bin/sh -c "$cmd" < /dev/null
finish $?
