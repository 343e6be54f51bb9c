/*
 * nubis-run-init: PID 1 of a `nubis run` guest (kernel argument
 * rdinit=/sbin/nubis-run-init).
 *
 * It prepares the guest, tells the host it is ready, waits for one command,
 * runs it with its stdout and stderr on their own virtio-console ports, and
 * reports how it ended. Written in C and run as PID 1 (no shell) because
 * every fork and exec costs a lot under KVM's instruction emulator on
 * kvm_pvm hosts: the path from "ready" to the command is one fork.
 *
 * Ports (virtio-console, one per device, in the VMM's order):
 *   /dev/hvc0  control, both ways (below)
 *   /dev/hvc1  the command's stdout
 *   /dev/hvc2  the command's stderr
 *
 * Kernel arguments it reads (the kernel hands `name=value` to PID 1 as its
 * environment):
 *   nubis_root=/dev/vdX  the image's root disk: mounted read-only under a
 *                        tmpfs overlay, and the command runs chrooted there.
 *
 * Control protocol, guest to host, one line each:
 *   ready                waiting for the command (a warm snapshot is taken here)
 *   started              the command was executed
 *   exec-failed ERRNO TEXT   it could not be (not found, not executable)
 *   error TEXT           the guest could not set up the run (nothing ran)
 *   exit CODE | signal N how the command ended
 * Host to guest, records `KEY LEN\n` followed by LEN bytes, ending with
 * `run 0\n`: `arg` (repeated, argv in order), `env` (KEY=VALUE, repeated),
 * `cwd`, `share` ("DEVICE ro" or "DEVICE rw": the shared directory's
 * disk, mounted at /share) and `net` ("ADDRESS PREFIX GATEWAY": eth0's
 * address and default route; given per run, as a warm guest's NIC is on
 * another tap each time).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define MAX_ARGS 4096
#define MAX_ENVS 1024
#define MAX_RECORD (1 << 20)
/* <linux/fs.h>'s, which musl's headers do not carry. */
#ifndef BLKFLSBUF
#define BLKFLSBUF _IO(0x12, 97)
#endif
/* The VMM's boot-timer page: writing 123 logs the guest's boot time. */
#define BOOT_TIMER_ADDR 0xc0000000UL

static int control = -1;
static const char *root_dir = "";

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t done = write(fd, buf, len);
		if (done < 0 && errno == EINTR)
			continue;
		if (done <= 0)
			return;
		buf += done;
		len -= (size_t)done;
	}
}

/* One line to the host on the control port. */
static void say(const char *fmt, ...)
{
	char line[512];
	va_list args;
	va_start(args, fmt);
	int len = vsnprintf(line, sizeof(line) - 1, fmt, args);
	va_end(args);
	if (len < 0)
		return;
	if ((size_t)len > sizeof(line) - 2)
		len = sizeof(line) - 2;
	line[len++] = '\n';
	if (control >= 0)
		write_all(control, line, (size_t)len);
	/* The kernel console (a file on the host) keeps a trace too. */
	write_all(2, "nubis-run-init: ", 16);
	write_all(2, line, (size_t)len);
}

/* Nothing can run: tell the host why and power off. */
static void give_up(const char *fmt, ...)
{
	char text[400];
	va_list args;
	va_start(args, fmt);
	vsnprintf(text, sizeof(text), fmt, args);
	va_end(args);
	say("error %s", text);
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static void mount_or_give_up(const char *source, const char *target, const char *type,
			     unsigned long flags, const char *options)
{
	mkdir(target, 0755);
	if (mount(source, target, type, flags, options) != 0 && errno != EBUSY)
		give_up("cannot mount %s (%s) on %s: %s", source, type, target, strerror(errno));
}

static int open_port(const char *path)
{
	int fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		give_up("cannot open %s: %s", path, strerror(errno));
	struct termios raw;
	if (tcgetattr(fd, &raw) == 0) {
		cfmakeraw(&raw);
		tcsetattr(fd, TCSANOW, &raw);
	}
	return fd;
}

static void boot_timer_marker(void)
{
	int fd = open("/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC);
	if (fd < 0)
		return;
	volatile unsigned char *page =
		mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, BOOT_TIMER_ADDR);
	if (page != MAP_FAILED) {
		*page = 123;
		munmap((void *)page, 4096);
	}
	close(fd);
}

/* The image's root: read-only ext4 under a tmpfs overlay at /mnt/root. */
static void mount_image_root(const char *device)
{
	mount_or_give_up(device, "/mnt/lower", "ext4", MS_RDONLY, NULL);
	mount_or_give_up("tmpfs", "/mnt/upper", "tmpfs", 0, "mode=0755");
	mkdir("/mnt/upper/data", 0755);
	mkdir("/mnt/upper/work", 0755);
	mount_or_give_up("overlay", "/mnt/root", "overlay", 0,
			 "lowerdir=/mnt/lower,upperdir=/mnt/upper/data,workdir=/mnt/upper/work");
	mount_or_give_up("proc", "/mnt/root/proc", "proc", 0, NULL);
	mount_or_give_up("sysfs", "/mnt/root/sys", "sysfs", 0, NULL);
	mount_or_give_up("devtmpfs", "/mnt/root/dev", "devtmpfs", 0, NULL);
	mount_or_give_up("tmpfs", "/mnt/root/tmp", "tmpfs", 0, "mode=1777");
	mount_or_give_up("tmpfs", "/mnt/root/run", "tmpfs", 0, "mode=0755");
	root_dir = "/mnt/root";
}

/* Reads exactly `len` bytes from the control port. */
static int read_exact(char *buf, size_t len)
{
	while (len > 0) {
		ssize_t got = read(control, buf, len);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return -1;
		buf += got;
		len -= (size_t)got;
	}
	return 0;
}

/* One record header `KEY LEN\n`; returns the length or -1. */
static long read_header(char *key, size_t key_size)
{
	char line[64];
	size_t used = 0;
	for (;;) {
		if (used == sizeof(line) - 1 || read_exact(line + used, 1) != 0)
			return -1;
		if (line[used] == '\n')
			break;
		used++;
	}
	line[used] = '\0';
	char *space = strchr(line, ' ');
	if (!space || (size_t)(space - line) >= key_size)
		return -1;
	*space = '\0';
	strcpy(key, line);
	char *end;
	long len = strtol(space + 1, &end, 10);
	if (*end != '\0' || len < 0 || len > MAX_RECORD)
		return -1;
	return len;
}

struct request {
	char *argv[MAX_ARGS + 1];
	int argc;
	char *envp[MAX_ENVS + 1];
	int envc;
	char *cwd;
	char *share;
	char *net;
};

static void read_request(struct request *req)
{
	memset(req, 0, sizeof(*req));
	for (;;) {
		char key[16];
		long len = read_header(key, sizeof(key));
		if (len < 0)
			give_up("malformed request from the host");
		if (strcmp(key, "run") == 0)
			break;
		char *value = malloc((size_t)len + 1);
		if (!value || read_exact(value, (size_t)len) != 0)
			give_up("request from the host cut short");
		value[len] = '\0';
		if (strcmp(key, "arg") == 0 && req->argc < MAX_ARGS)
			req->argv[req->argc++] = value;
		else if (strcmp(key, "env") == 0 && req->envc < MAX_ENVS)
			req->envp[req->envc++] = value;
		else if (strcmp(key, "cwd") == 0)
			req->cwd = value;
		else if (strcmp(key, "share") == 0)
			req->share = value;
		else if (strcmp(key, "net") == 0)
			req->net = value;
		else
			give_up("unknown request record '%s'", key);
	}
	if (req->argc == 0)
		give_up("the request has no command");
}

/* Mounts the shared directory's disk at /share; returns its path. */
static char *mount_share(const char *spec, int *writable)
{
	static char target[256];
	char device[128], mode[8];
	if (sscanf(spec, "%127s %7s", device, mode) != 2)
		give_up("bad share record '%s'", spec);
	*writable = strcmp(mode, "rw") == 0;
	/* The disk behind this device may have changed since the guest last
	 * read it (a warm run restores a snapshot taken with another file):
	 * drop whatever the guest cached of it. */
	int fd = open(device, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		give_up("cannot open the share's disk %s: %s", device, strerror(errno));
	ioctl(fd, BLKFLSBUF, 0);
	close(fd);
	snprintf(target, sizeof(target), "%s/share", root_dir);
	mkdir(target, 0755);
	if (mount(device, target, "ext4", *writable ? 0 : MS_RDONLY, NULL) != 0)
		give_up("cannot mount the share (%s) on /share: %s", device, strerror(errno));
	return target;
}

static void set_address(int sock, const char *name, unsigned long request, in_addr_t address)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = address;
	if (ioctl(sock, request, &ifr) != 0)
		give_up("cannot set an address of %s: %s", name, strerror(errno));
}

static void link_up(int sock, const char *name)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
		give_up("no network interface %s: %s", name, strerror(errno));
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0)
		give_up("cannot bring %s up: %s", name, strerror(errno));
}

/* eth0's address and default route, and lo: "ADDRESS PREFIX GATEWAY". */
static void configure_network(const char *spec)
{
	char address[32], gateway[32];
	int prefix;
	struct in_addr addr, gw;
	if (sscanf(spec, "%31s %d %31s", address, &prefix, gateway) != 3 || prefix < 1 ||
	    prefix > 32 || inet_pton(AF_INET, address, &addr) != 1 ||
	    inet_pton(AF_INET, gateway, &gw) != 1)
		give_up("bad net record '%s'", spec);
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		give_up("socket: %s", strerror(errno));
	set_address(sock, "lo", SIOCSIFADDR, htonl(INADDR_LOOPBACK));
	link_up(sock, "lo");
	set_address(sock, "eth0", SIOCSIFADDR, addr.s_addr);
	set_address(sock, "eth0", SIOCSIFNETMASK, htonl(0xffffffffu << (32 - prefix)));
	link_up(sock, "eth0");
	struct rtentry route;
	memset(&route, 0, sizeof(route));
	((struct sockaddr_in *)&route.rt_dst)->sin_family = AF_INET;
	((struct sockaddr_in *)&route.rt_genmask)->sin_family = AF_INET;
	struct sockaddr_in *via = (struct sockaddr_in *)&route.rt_gateway;
	via->sin_family = AF_INET;
	via->sin_addr = gw;
	route.rt_flags = RTF_UP | RTF_GATEWAY;
	if (ioctl(sock, SIOCADDRT, &route) != 0 && errno != EEXIST)
		give_up("cannot add the default route via %s: %s", gateway, strerror(errno));
	close(sock);
}

int main(void)
{
	mount_or_give_up("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	int console = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (console >= 0) {
		dup2(console, 1);
		dup2(console, 2);
		if (console > 2)
			close(console);
	}
	mount_or_give_up("proc", "/proc", "proc", 0, NULL);
	mount_or_give_up("sysfs", "/sys", "sysfs", 0, NULL);
	mount_or_give_up("tmpfs", "/tmp", "tmpfs", 0, "mode=1777");
	mount_or_give_up("tmpfs", "/run", "tmpfs", 0, "mode=0755");
	control = open_port("/dev/hvc0");
	int out = open_port("/dev/hvc1");
	int err = open_port("/dev/hvc2");
	const char *root = getenv("nubis_root");
	if (root && *root)
		mount_image_root(root);
	setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
	setenv("HOME", "/root", 1);
	unsetenv("nubis_root");
	boot_timer_marker();

	say("ready");
	struct request req;
	read_request(&req);
	for (int i = 0; i < req.envc; i++)
		putenv(req.envp[i]);
	if (req.net)
		configure_network(req.net);
	int share_writable = 0;
	char *share = req.share ? mount_share(req.share, &share_writable) : NULL;
	const char *cwd = req.cwd ? req.cwd : "/";

	int report[2];
	if (pipe2(report, O_CLOEXEC) != 0)
		give_up("pipe: %s", strerror(errno));
	pid_t child = fork();
	if (child < 0)
		give_up("fork: %s", strerror(errno));
	if (child == 0) {
		int null = open("/dev/null", O_RDONLY);
		setsid();
		dup2(null >= 0 ? null : out, 0);
		dup2(out, 1);
		dup2(err, 2);
		int failure = 0;
		if (*root_dir && chroot(root_dir) != 0)
			failure = errno;
		if (!failure && chdir(cwd) != 0)
			failure = errno;
		if (!failure) {
			execvp(req.argv[0], req.argv);
			failure = errno;
		}
		write_all(report[1], (const char *)&failure, sizeof(failure));
		_exit(127);
	}
	close(report[1]);
	int failure = 0;
	ssize_t got;
	do {
		got = read(report[0], &failure, sizeof(failure));
	} while (got < 0 && errno == EINTR);
	close(report[0]);
	if (got == (ssize_t)sizeof(failure))
		say("exec-failed %d cannot execute '%s' (working directory %s): %s", failure,
		    req.argv[0], cwd, strerror(failure));
	else
		say("started");

	int status = 0;
	for (;;) {
		pid_t done = waitpid(-1, &status, 0);
		if (done == child)
			break;
		if (done < 0 && errno != EINTR)
			break;
	}
	/* Everything the command wrote has reached the host before its exit
	 * code does. */
	tcdrain(out);
	tcdrain(err);
	sync();
	if (share && share_writable && umount(share) != 0)
		say("warning /share is still busy (%s): files written by processes still running may be missing",
		    strerror(errno));
	if (got != (ssize_t)sizeof(failure)) {
		if (WIFSIGNALED(status))
			say("signal %d", WTERMSIG(status));
		else
			say("exit %d", WEXITSTATUS(status));
	}
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}
