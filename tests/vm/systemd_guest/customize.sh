#!/bin/sh
# mmdebstrap customize hook for the systemd guest of tests/vm/systemd_harness.py: run on the
# host with the new root as $1 and the guest kernel's release in $DYNOAGENT_VM_KERNEL_RELEASE.
# Its hash is part of the image's cache key: any change here rebuilds the image.
set -eu
root="$1"
release="$DYNOAGENT_VM_KERNEL_RELEASE"

# Nothing of the building machine: mmdebstrap copies its resolv.conf and hostname.
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
: > "$root/etc/resolv.conf"
echo dynoagent-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 dynoagent-vm\n' > "$root/etc/hosts"
# The root is /dev/vda, mounted rw by the kernel command line; nothing else is in fstab
# (the payload disk is mounted by the runner, so no .device unit and no udev are needed).
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
: > "$root/etc/machine-id"

# The guest kernel's modules, from the host's copy of Debian's package (the guest boots the
# host's /boot/vmlinuz-RELEASE and initrd): netfilter, bridge, veth, filesystems. Drivers
# for real hardware and sound are left out (≈ 300 MB).
src="/lib/modules/$release"
dst="$root/lib/modules/$release"
mkdir -p "$dst/kernel/drivers"
cp -a "$src"/modules.order "$src"/modules.builtin "$src"/modules.builtin.modinfo "$dst/"
for part in arch block crypto fs lib mm net virt; do
  cp -a "$src/kernel/$part" "$dst/kernel/"
done
for part in virtio block char net/veth.ko net/dummy.ko net/vxlan net/macvlan.ko \
            net/ipvlan net/tun.ko net/virtio_net.ko net/net_failover.ko md; do
  if [ -e "$src/kernel/drivers/$part" ]; then
    mkdir -p "$(dirname "$dst/kernel/drivers/$part")"
    cp -a "$src/kernel/drivers/$part" "$dst/kernel/drivers/$part"
  fi
done
depmod -b "$root" "$release"

# A quiet, quick boot: no login prompts, no timers, no network management.
for unit in getty@tty1.service serial-getty@ttyS0.service getty.target \
            apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer \
            e2scrub_reap.service systemd-timesyncd.service systemd-networkd.service \
            systemd-resolved.service man-db.timer dpkg-db-backup.timer \
            systemd-networkd-wait-online.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
mkdir -p "$root/etc/systemd/journald.conf.d"
# Kept on disk: the reboot scenario reads the first boot's journal too.
mkdir -p "$root/var/log/journal"
printf '[Journal]\nStorage=persistent\nRateLimitBurst=0\n' \
  > "$root/etc/systemd/journald.conf.d/dynoagent-test.conf"

# The test runner: mounts the payload disk (/dev/vdb, label dtpayload) and runs its
# scenarios.py once the system is up; then powers off (or reboots, when asked to).
install -m 0755 /dev/stdin "$root/usr/local/sbin/dynoagent-test-run" <<'RUN'
#!/bin/sh
mkdir -p /payload
mount -t ext4 -o rw /dev/vdb /payload || { echo "dynoagent-test: no payload disk" >&2; exit 1; }
exec /usr/bin/python3 /payload/scenarios.py --payload /payload
RUN
install -m 0755 /dev/stdin "$root/usr/local/sbin/dynoagent-test-finish" <<'FIN'
#!/bin/sh
# Whatever happened, the VM must end: the host waits for qemu to exit (-no-reboot makes a
# reboot end qemu too; the host boots the same overlay again when the runner asked for it).
sync
umount /payload 2>/dev/null
if [ -e /run/dynoagent-test.reboot ]; then systemctl --no-block reboot
else systemctl --no-block poweroff; fi
FIN
cat > "$root/etc/systemd/system/dynoagent-test.service" <<'UNIT'
[Unit]
Description=dynoagent systemd-host scenarios (tests/vm/test_systemd_host.py)
After=multi-user.target
ConditionPathExists=/dev/vdb

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dynoagent-test-run
ExecStopPost=/usr/local/sbin/dynoagent-test-finish
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/dynoagent-test.service \
  "$root/etc/systemd/system/multi-user.target.wants/dynoagent-test.service"
chmod 0755 "$root"
