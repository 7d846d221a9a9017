/*
 * LD_PRELOAD shim that makes tap devices look like an older host kernel: without USO (Linux < 6.2) or without
 * UDP tunnel GSO (Linux < 6.17).
 *
 * QEMU probes USO on a tap with ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) and treats a
 * failure as "no USO" (QEMU net/tap-linux.c, tap_probe_has_uso); it then clears HOST_USO, GUEST_USO4 and
 * GUEST_USO6 from what virtio-net offers (hw/net/virtio-net.c, virtio_net_get_features). Every
 * TUNSETOFFLOAD that asks for USO fails with EINVAL here, as on such a kernel; other offloads keep working.
 *
 * QOH_NOUSO_TAPS, when set, is a comma-separated list of tap names: only those taps lose USO (so one QEMU can
 * have one NIC without USO beside others with it). Unset or empty: every tap loses USO.
 *
 * QOH_NOTUNNEL_TAPS, when set and not empty, lists taps that lose UDP tunnel GSO instead: QEMU 10.2+ probes it with
 * ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO) (net/tap-linux.c,
 * tap_probe_has_tunnel; TUN_F_UDP_TUNNEL_GSO is 0x80 in Linux's include/uapi/linux/if_tun.h and QEMU's
 * net/tap-linux.h), and every TUNSETOFFLOAD with that flag fails for them. When only QOH_NOTUNNEL_TAPS is set,
 * USO is left alone.
 *
 * Built by scripts/setup.sh into .cache/nouso.so.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/if_tun.h>

/* Not in the kernel headers of Debian 12's libc (they predate Linux 6.2); values from linux/if_tun.h. */
#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#endif
#ifndef TUN_F_USO6
#define TUN_F_USO6 0x40
#endif
#ifndef TUN_F_UDP_TUNNEL_GSO
#define TUN_F_UDP_TUNNEL_GSO 0x80
#endif

typedef int (*ioctl_fn)(int, unsigned long, ...);

static ioctl_fn real_ioctl(void)
{
    static ioctl_fn fn;
    if (!fn) {
        fn = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    }
    return fn;
}

static int tap_is_listed(int fd, const char *list)
{
    struct ifreq ifr;
    size_t len;
    const char *p;

    if (!list || !*list) {
        return 1;
    }
    memset(&ifr, 0, sizeof(ifr));
    if (real_ioctl()(fd, TUNGETIFF, &ifr) < 0) {
        return 1;
    }
    len = strlen(ifr.ifr_name);
    for (p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == len && strncmp(p, ifr.ifr_name, n) == 0) {
            return 1;
        }
        if (!end) {
            break;
        }
        p = end + 1;
    }
    return 0;
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (request == TUNSETOFFLOAD) {
        const char *nouso = getenv("QOH_NOUSO_TAPS");
        const char *notunnel = getenv("QOH_NOTUNNEL_TAPS");
        int uso_off = nouso || !notunnel || !*notunnel;
        if (uso_off && ((unsigned long)arg & (TUN_F_USO4 | TUN_F_USO6)) && tap_is_listed(fd, nouso)) {
            errno = EINVAL;
            return -1;
        }
        if (notunnel && *notunnel && ((unsigned long)arg & TUN_F_UDP_TUNNEL_GSO) && tap_is_listed(fd, notunnel)) {
            errno = EINVAL;
            return -1;
        }
    }
    return real_ioctl()(fd, request, arg);
}
