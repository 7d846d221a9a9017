#!/bin/busybox sh
# /init of the test guest's initramfs: load the virtio-net driver so that it negotiates features with QEMU (after
# qoh.delay seconds if the kernel command line has it), bring every NIC up, report on the serial console, then
# idle. Built into .cache/guest/initrd.gz by setup.sh.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# qoh.delay=N on the kernel command line: wait N seconds before loading the driver (a guest whose driver comes up
# late, e.g. while its RAM is being migrated).
for arg in $(cat /proc/cmdline); do
  case "$arg" in qoh.delay=*) delay=${arg#qoh.delay=} ;; esac
done
if [ -n "$delay" ]; then
  case "$delay" in
    *[!0-9]*) echo "QOH-GUEST-ERROR qoh.delay=$delay is not a whole number of seconds" ;;
    *) echo QOH-GUEST-WAITING; sleep "$delay" ;;
  esac
fi
for m in failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko || echo "QOH-GUEST-ERROR insmod $m"
done
for n in /sys/class/net/*; do
  ip link set "${n##*/}" up
done
for n in /sys/class/net/eth*; do
  [ -e "$n/device/features" ] && echo "QOH-GUEST-NIC ${n##*/} $(cat "$n/device/features")"
done
echo QOH-GUEST-READY
while :; do sleep 3600; done
