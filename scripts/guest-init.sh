#!/bin/busybox sh
# /init of the test guest's initramfs: load the virtio-net driver so that it negotiates features with QEMU,
# bring every NIC up, report on the serial console, then idle. Built into .cache/guest/initrd.gz by setup.sh.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
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
