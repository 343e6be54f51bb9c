/*
 * nubis-guest-agent: the host's way into a running guest, over vsock port
 * 52 (no network, no credentials in the image: only the VM's own host can
 * reach its vsock device). Started by init; one child per connection.
 *
 * Protocol: records `KEY LEN\n` followed by LEN bytes, both ways. The
 * host's first record is the request:
 *   ping 0                the guest answers `pong` with its hostname
 *   exec LEN <command>    runs `/bin/sh -c <command>` (stdin /dev/null);
 *                         its output comes back as `stdout`/`stderr`
 *                         records as it is written, then `exit <code>` or
 *                         `signal <number>`; `error <text>` if it could
 *                         not be run
 *   identity LEN <lines>  a new identity, after a restore as a clone (see
 *                         below); answered with one record, `ok <summary>`
 *                         or `error <what failed, and the value>`
 * Anything else is answered with `error`. Keys are at most 15 bytes, a
 * request at most 64 KiB.
 *
 * The identity request: lines `key=value\n` (any order, each key at most
 * once, no other keys, at most 1 KiB in all; the last newline may be left
 * out):
 *   hostname=NAME             [a-z0-9-]{1,63} (required)
 *   seed=HEX                  64 hex digits: 32 random bytes (required)
 *   mac=02:4e:42:01:02:03     eth0's new unicast MAC (optional; with it,
 *   address=10.88.1.5/24      eth0's IPv4 address and prefix (1 to 30) and
 *   gateway=10.88.1.1         the default gateway, in that subnet, are
 *                             required; without it, neither is allowed)
 * Everything is checked before anything changes; then, without running any
 * program (a fork costs ~1 s on kvm_pvm hosts), in this order:
 *   1. the seed goes into the kernel's pool, credited as 256 bits
 *      (RNDADDENTROPY on /dev/urandom), then the CRNG is reseeded
 *      (RNDRESEEDCRNG; kernels without it, ENOTTY/EINVAL, only seed)
 *   2. sethostname(), and /etc/hostname (a read-only or missing /etc is
 *      left alone)
 *   3. with `mac`: eth0 down, the MAC set, eth0 up (which also drops eth0's
 *      routes, neighbours and IPv6 addresses: the link-local one comes back
 *      from the new MAC); every IPv4 address of eth0 removed (aliases
 *      eth0:N too), the new one and its netmask set, and the default route
 *      via the gateway added (all with ioctls on an AF_INET socket)
 * The first step that fails ends the request: `error` names it, the value,
 * and what was applied before it (a failure after eth0 went down brings it
 * back up, with its old or new MAC). The agent also prints
 * `nubis-identity: <summary>` (or `nubis-identity: error: ...`) on the
 * console. Example summary: `hostname web-3, eth0 02:4e:42:01:02:03
 * 10.88.1.5/24 via 10.88.1.1, rng reseeded`.
 *   nubis-guest-agent identity-parse   checks a payload on stdin: prints
 *                                      the values, or the error (exit 1)
 *   nubis-guest-agent identity-apply   applies a payload on stdin, as the
 *                                      request does, and writes the answer
 *                                      record on stdout (a test aid: run it
 *                                      in throwaway namespaces, e.g.
 *                                      `unshare --uts --mount` in a netns)
 *
 * Checks of the vsock path itself (the tests run them):
 *   nubis-guest-agent echo PORT        listen on vsock PORT; echo every
 *                                      connection back (a child each)
 *   nubis-guest-agent send CID PORT N  connect to CID:PORT, send N bytes of
 *                                      a fixed pattern while reading them
 *                                      back, then half-close; prints
 *                                      VSOCK_SEND=<N>,<bytes back>,OK (or
 *                                      BAD) and exits 0 only when every byte
 *                                      came back as sent
 *
 * First boot ("metadata" step): in its serving mode the agent also forks a
 * child that fetches the VM's instance metadata from the host (EC2 IMDSv2
 * layout, http://169.254.169.254:80, reached through the default route)
 * and exits; the parent serves vsock meanwhile (it ignores SIGCHLD, so the
 * child is reaped by the kernel; exec's own waitpid is in another process).
 * The step retries for ~60 s, gets a token (PUT /latest/api/token), then:
 *   hostname      sethostname() and /etc/hostname
 *   public-keys   all keys to /root/.ssh/authorized_keys (temp file, then
 *                 rename); a 404 (no keys) leaves that file alone
 *   user-data     saved to /var/lib/nubis/user-data; if it starts with `#!`
 *                 it is run once: the marker /var/lib/nubis/user-data.done
 *                 is created first, output goes to /var/log/nubis-user-data.log
 * and prints `nubis-metadata: hostname H, K ssh keys, user-data
 * none|saved|ran` on the console (`failed` or `?` where a part failed).
 *   nubis-guest-agent metadata         runs the step in the foreground,
 *                                      telling what it does; exits 0 when
 *                                      every part of it worked
 * Test aids (environment, for running the step on a development host):
 *   NUBIS_METADATA_ADDR=127.0.0.1:PORT the service's IPv4 address and port
 *   NUBIS_METADATA_ROOT=/tmp/dir       prefix of every file written (and no
 *                                      sethostname())
 *   NUBIS_METADATA_TRIES=N             connection tries (one a second)
 *
 * Written in C and linked statically with musl, like nubis-run-init: small
 * (the initramfs is unpacked under KVM's instruction emulator on kvm_pvm
 * hosts, ~20 s per MiB) and one fork per request.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* musl's include directory has no kernel headers: the two ioctls are
 * defined here when <linux/random.h> is not there. */
#if defined(__has_include)
#if __has_include(<linux/random.h>)
#include <linux/random.h>
#endif
#endif
#ifndef RNDADDENTROPY
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

#define AGENT_PORT 52
#define MAX_KEY 15
#define MAX_REQUEST (64 * 1024)

struct vsock_address {
    sa_family_t family;
    unsigned short reserved;
    unsigned int port;
    unsigned int cid;
    unsigned char zero[4];
};

static unsigned char pattern(unsigned long offset) {
    return (unsigned char)(offset % 251);
}

static struct vsock_address address(unsigned long cid, unsigned long port) {
    struct vsock_address a;
    memset(&a, 0, sizeof a);
    a.family = AF_VSOCK;
    a.cid = (unsigned int)cid;
    a.port = (unsigned int)port;
    return a;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int send_record(int fd, const char *key, const char *data, size_t len) {
    char header[48];
    int n = snprintf(header, sizeof header, "%s %zu\n", key, len);
    if (write_all(fd, header, (size_t)n) < 0)
        return -1;
    return write_all(fd, data, len);
}

static int send_text(int fd, const char *key, const char *text) {
    return send_record(fd, key, text, strlen(text));
}

static int read_exact(int fd, char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads `KEY LEN\n`; returns LEN, or -1 on a malformed or too long header. */
static long read_header(int fd, char *key) {
    char line[MAX_KEY + 24];
    size_t used = 0;
    for (;;) {
        if (used == sizeof line - 1 || read_exact(fd, line + used, 1) < 0)
            return -1;
        if (line[used] == '\n')
            break;
        used++;
    }
    line[used] = 0;
    char *space = strchr(line, ' ');
    if (!space || space == line || (size_t)(space - line) > MAX_KEY)
        return -1;
    *space = 0;
    char *end;
    errno = 0;
    unsigned long len = strtoul(space + 1, &end, 10);
    if (errno || *end || end == space + 1 || len > MAX_REQUEST)
        return -1;
    strcpy(key, line);
    return (long)len;
}

static void ping(int fd) {
    char name[256] = "";
    gethostname(name, sizeof name - 1);
    send_text(fd, "pong", name);
}

/* Forwards the command's output as it comes; returns when both pipes end. */
static void forward_output(int fd, int out, int err) {
    struct pollfd p[2] = {{.fd = out, .events = POLLIN}, {.fd = err, .events = POLLIN}};
    const char *keys[2] = {"stdout", "stderr"};
    int open_pipes = 2;
    char buf[16384];
    while (open_pipes > 0) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        for (int i = 0; i < 2; i++) {
            if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t n = read(p[i].fd, buf, sizeof buf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                close(p[i].fd);
                p[i].fd = -1;
                open_pipes--;
                continue;
            }
            if (send_record(fd, keys[i], buf, (size_t)n) < 0)
                return;
        }
    }
}

static void exec_command(int fd, const char *command) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        send_text(fd, "error", strerror(errno));
        return;
    }
    pid_t child = fork();
    if (child < 0) {
        send_text(fd, "error", strerror(errno));
        return;
    }
    if (child == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        execl("/bin/sh", "sh", "-c", command, (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    close(err[1]);
    forward_output(fd, out[0], err[0]);
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR)
        ;
    char number[16];
    if (WIFSIGNALED(status)) {
        snprintf(number, sizeof number, "%d", WTERMSIG(status));
        send_text(fd, "signal", number);
    } else {
        snprintf(number, sizeof number, "%d", WEXITSTATUS(status));
        send_text(fd, "exit", number);
    }
}

static int identity_request(int fd, const char *data, size_t length);

static void serve(int fd) {
    char key[MAX_KEY + 1];
    long len = read_header(fd, key);
    if (len < 0) {
        send_text(fd, "error", "a request is a record: KEY LEN\\n then LEN bytes");
        return;
    }
    char *data = malloc((size_t)len + 1);
    if (!data || read_exact(fd, data, (size_t)len) < 0) {
        send_text(fd, "error", "the request ended early");
        return;
    }
    data[len] = 0;
    if (strcmp(key, "ping") == 0)
        ping(fd);
    else if (strcmp(key, "exec") == 0 && strlen(data) == (size_t)len && len > 0)
        exec_command(fd, data);
    else if (strcmp(key, "identity") == 0)
        identity_request(fd, data, (size_t)len);
    else
        send_text(fd, "error", "unknown request");
    free(data);
}

static void echo_connection(int fd) {
    unsigned char buf[16384];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (write_all(fd, (const char *)buf, (size_t)n) < 0)
            break;
    }
    shutdown(fd, SHUT_WR);
    close(fd);
}

static int echo(unsigned long port) {
    int listener = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct vsock_address a = address(0xffffffffUL, port);
    if (listener < 0 || bind(listener, (struct sockaddr *)&a, sizeof a) < 0 ||
        listen(listener, 64) < 0) {
        perror("nubis-guest-agent: listen");
        return 1;
    }
    signal(SIGCHLD, SIG_IGN);
    printf("VSOCK_ECHO_READY=%lu\n", port);
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            perror("nubis-guest-agent: accept");
            return 1;
        }
        pid_t child = fork();
        if (child == 0) {
            close(listener);
            echo_connection(fd);
            _exit(0);
        }
        close(fd);
    }
}

static int send_and_check(unsigned long cid, unsigned long port, unsigned long total) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct vsock_address a = address(cid, port);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("nubis-guest-agent: connect");
        printf("VSOCK_SEND=%lu,0,BAD\n", total);
        return 1;
    }
    unsigned long sent = 0, received = 0;
    int good = 1, write_done = 0;
    unsigned char buf[16384];
    while (received < total || !write_done) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (!write_done)
            p.events |= POLLOUT;
        if (poll(&p, 1, 30000) <= 0) {
            fprintf(stderr, "nubis-guest-agent: no progress in 30 s\n");
            good = 0;
            break;
        }
        if (p.revents & POLLIN) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n <= 0)
                break;
            for (ssize_t i = 0; i < n; i++)
                if (buf[i] != pattern(received + (unsigned long)i))
                    good = 0;
            received += (unsigned long)n;
        }
        if (!write_done && (p.revents & POLLOUT)) {
            size_t chunk = total - sent < sizeof buf ? total - sent : sizeof buf;
            for (size_t i = 0; i < chunk; i++)
                buf[i] = pattern(sent + i);
            ssize_t n = chunk ? write(fd, buf, chunk) : 0;
            if (n < 0 && errno != EAGAIN && errno != EINTR)
                break;
            if (n > 0)
                sent += (unsigned long)n;
            if (sent == total) {
                shutdown(fd, SHUT_WR);
                write_done = 1;
            }
        }
        if (p.revents & (POLLERR | POLLHUP) && !(p.revents & POLLIN))
            break;
    }
    good = good && received == total;
    printf("VSOCK_SEND=%lu,%lu,%s\n", total, received, good ? "OK" : "BAD");
    close(fd);
    return good ? 0 : 1;
}

/* ---- First boot: the instance metadata step ---------------------------- */

#define META_ADDR "169.254.169.254:80"
#define META_MAX_BODY (64 * 1024)
#define META_MAX_HEAD (8 * 1024)
#define META_IO_SECONDS 5         /* connect, SO_RCVTIMEO, SO_SNDTIMEO */
#define META_REQUEST_MS 15000     /* a whole request, however slow */
#define META_RETRY_SECONDS 60     /* until the service first answers */
#define META_MAX_TOKEN 1024
#define META_MAX_KEYS 100
#define META_MAX_KEY 16384

static struct {
    struct sockaddr_in addr;
    char host[32];        /* the Host header: a.b.c.d[:port] */
    const char *root;     /* "" or NUBIS_METADATA_ROOT */
    int verbose;          /* the `metadata` mode tells what it does */
    int failed;           /* a part of the step failed: exit 1 */
    char token[META_MAX_TOKEN + 1];
    char error[320];      /* why the last request failed */
} meta;

static int console_fd = 2;

/* One line `PREFIX...` on stderr (the console, from init), or on
 * /dev/console when stderr is not usable. */
__attribute__((format(printf, 2, 0))) static void console_line(const char *prefix, const char *format,
                                                               va_list ap) {
    char line[512];
    size_t used = strlen(prefix);
    if (used > 64)
        return;
    memcpy(line, prefix, used);
    int n = vsnprintf(line + used, sizeof line - used - 1, format, ap);
    if (n < 0)
        return;
    used += (size_t)n < sizeof line - used - 1 ? (size_t)n : sizeof line - used - 2;
    line[used++] = '\n';
    if (console_fd >= 0 && write_all(console_fd, line, used) == 0)
        return;
    if (console_fd == 2) {
        console_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
        if (console_fd >= 0)
            write_all(console_fd, line, used);
    }
}

/* One line `nubis-metadata: ...` on the console. */
__attribute__((format(printf, 1, 2))) static void console(const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    console_line("nubis-metadata: ", format, ap);
    va_end(ap);
}

/* What the `metadata` mode prints about each thing it does. */
__attribute__((format(printf, 1, 2))) static void note(const char *format, ...) {
    if (!meta.verbose)
        return;
    va_list ap;
    va_start(ap, format);
    fputs("  ", stdout);
    vprintf(format, ap);
    putchar('\n');
    va_end(ap);
}

/* Records why a request failed (meta.error); returns -1. */
__attribute__((format(printf, 1, 2))) static int fail(const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    vsnprintf(meta.error, sizeof meta.error, format, ap);
    va_end(ap);
    return -1;
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* poll() for one fd until `deadline` (now_ms() time): 1 ready, 0 timed out,
 * -1 error. */
static int wait_fd(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, (int)left);
        if (n < 0 && errno == EINTR)
            continue;
        return n;
    }
}

static int meta_connect(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return fail("socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&meta.addr, sizeof meta.addr) < 0 &&
        errno != EINPROGRESS && errno != EINTR) {
        fail("connect to %s: %s", meta.host, strerror(errno));
        close(fd);
        return -1;
    }
    int ready = wait_fd(fd, POLLOUT, now_ms() + META_IO_SECONDS * 1000);
    int error = 0;
    socklen_t length = sizeof error;
    if (ready < 0)
        error = errno;
    else if (ready == 0)
        error = ETIMEDOUT;
    else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) < 0)
        error = errno;
    struct timeval timeout = {.tv_sec = META_IO_SECONDS};
    int flags = error ? -1 : fcntl(fd, F_GETFL);
    if (!error && (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0 ||
                   setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0 ||
                   setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) < 0))
        error = errno;
    if (error) {
        fail("connect to %s: %s", meta.host, strerror(error));
        close(fd);
        return -1;
    }
    return fd;
}

static char lower(char c) {
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static int same_text(const char *a, size_t a_length, const char *b) {
    size_t i = 0;
    for (; i < a_length && b[i]; i++)
        if (lower(a[i]) != lower(b[i]))
            return 0;
    return i == a_length && !b[i];
}

/* The offset just past the blank line that ends the head, or 0. */
static size_t head_end(const char *buf, size_t used) {
    for (size_t i = 0; i + 1 < used; i++) {
        if (buf[i] != '\n')
            continue;
        if (buf[i + 1] == '\n')
            return i + 2;
        if (i + 2 < used && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

/* Parses the status line and the headers in buf[0..end). Returns the status;
 * *content_length is -1 without a Content-Length. */
static int parse_head(const char *buf, size_t end, long *content_length, int *chunked) {
    int status = -1;
    *content_length = -1;
    *chunked = 0;
    size_t at = 0;
    while (at < end) {
        const char *line = buf + at;
        const char *newline = memchr(line, '\n', end - at);
        size_t length = (size_t)(newline - line);
        at += length + 1;
        if (length > 0 && line[length - 1] == '\r')
            length--;
        if (memchr(line, 0, length))
            return fail("a NUL byte in the response head");
        if (status < 0) {
            /* HTTP/1.x NNN[ reason] */
            if (length < 12 || memcmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') ||
                line[8] != ' ' || (length > 12 && line[12] != ' '))
                return fail("malformed status line");
            status = 0;
            for (int i = 9; i < 12; i++) {
                if (line[i] < '0' || line[i] > '9')
                    return fail("malformed status line");
                status = status * 10 + (line[i] - '0');
            }
            if (status < 100 || status > 599)
                return fail("malformed status line");
            continue;
        }
        if (length == 0)
            break;
        const char *colon = memchr(line, ':', length);
        if (!colon || colon == line || line[0] == ' ' || line[0] == '\t' || colon[-1] == ' ' ||
            colon[-1] == '\t')
            return fail("malformed response header");
        size_t name_length = (size_t)(colon - line);
        const char *value = colon + 1;
        size_t value_length = length - name_length - 1;
        while (value_length > 0 && (*value == ' ' || *value == '\t'))
            value++, value_length--;
        while (value_length > 0 && (value[value_length - 1] == ' ' || value[value_length - 1] == '\t'))
            value_length--;
        if (same_text(line, name_length, "content-length")) {
            long n = 0;
            if (value_length == 0)
                return fail("malformed Content-Length");
            for (size_t i = 0; i < value_length; i++) {
                if (value[i] < '0' || value[i] > '9')
                    return fail("malformed Content-Length");
                n = n * 10 + (value[i] - '0');
                if (n > META_MAX_BODY)
                    return fail("response body over %d bytes", META_MAX_BODY);
            }
            if (*content_length >= 0 && *content_length != n)
                return fail("conflicting Content-Length headers");
            *content_length = n;
        } else if (same_text(line, name_length, "transfer-encoding")) {
            if (same_text(value, value_length, "chunked"))
                *chunked = 1;
            else if (!same_text(value, value_length, "identity"))
                return fail("unsupported Transfer-Encoding");
        }
    }
    return status;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    c = lower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Decodes a chunked body in place; *length becomes the decoded length. */
static int dechunk(char *body, size_t *length) {
    size_t in = 0, out = 0, end = *length;
    for (;;) {
        size_t size = 0, digits = 0;
        for (; in < end && hex_digit(body[in]) >= 0; in++, digits++) {
            size = size * 16 + (size_t)hex_digit(body[in]);
            if (size > META_MAX_BODY)
                return fail("response body over %d bytes", META_MAX_BODY);
        }
        if (digits == 0)
            return fail("malformed chunked body");
        while (in < end && body[in] != '\n') /* chunk extensions, CR */
            in++;
        if (in == end)
            return fail("chunked body ended early");
        in++;
        if (size == 0)
            break; /* trailers, if any, are ignored */
        if (size > end - in)
            return fail("chunked body ended early");
        if (out + size > META_MAX_BODY)
            return fail("response body over %d bytes", META_MAX_BODY);
        memmove(body + out, body + in, size);
        out += size;
        in += size;
        if (in < end && body[in] == '\r')
            in++;
        if (in == end || body[in] != '\n')
            return fail("malformed chunked body");
        in++;
    }
    *length = out;
    return 0;
}

struct response {
    char *buf;     /* free() it */
    char *body;    /* NUL-terminated (bodies may hold NULs: use length) */
    size_t length;
};

/* One request on its own connection. Returns the HTTP status, or -1 (and
 * meta.error) when there was no well-formed response. */
static int meta_request(const char *method, const char *path, struct response *r) {
    char request[META_MAX_TOKEN + 512];
    int n;
    if (strcmp(method, "PUT") == 0)
        n = snprintf(request, sizeof request,
                     "PUT %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: nubis-guest-agent\r\n"
                     "Connection: close\r\nX-aws-ec2-metadata-token-ttl-seconds: 300\r\n"
                     "Content-Length: 0\r\n\r\n",
                     path, meta.host);
    else
        n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: nubis-guest-agent\r\n"
                     "Connection: close\r\nX-aws-ec2-metadata-token: %s\r\n\r\n",
                     path, meta.host, meta.token);
    r->buf = NULL;
    if (n < 0 || (size_t)n >= sizeof request)
        return fail("%s %s: request too long", method, path);
    int fd = meta_connect();
    if (fd < 0)
        return -1;
    int status = -1;
    size_t capacity = META_MAX_HEAD + META_MAX_BODY, used = 0, end = 0;
    long content_length = -1;
    int chunked = 0;
    char *buf = malloc(capacity + 1);
    if (!buf) {
        fail("out of memory");
        goto out;
    }
    if (write_all(fd, request, (size_t)n) < 0) {
        fail("%s %s: sending: %s", method, path, errno ? strerror(errno) : "closed");
        goto out;
    }
    long long deadline = now_ms() + META_REQUEST_MS;
    for (;;) {
        if (end && !chunked && content_length >= 0 && used - end >= (size_t)content_length)
            break;
        if (used == capacity) {
            fail("%s %s: response over %zu bytes", method, path, capacity);
            goto out;
        }
        /* At most META_IO_SECONDS without data, META_REQUEST_MS in all. */
        long long quiet = now_ms() + META_IO_SECONDS * 1000;
        int ready = wait_fd(fd, POLLIN, quiet < deadline ? quiet : deadline);
        if (ready <= 0) {
            fail("%s %s: %s", method, path, ready ? strerror(errno) : "no response (timed out)");
            goto out;
        }
        ssize_t got = read(fd, buf + used, capacity - used);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got < 0) {
            fail("%s %s: reading: %s", method, path, strerror(errno));
            goto out;
        }
        if (got == 0)
            break;
        used += (size_t)got;
        if (!end) {
            end = head_end(buf, used);
            if (end) {
                status = parse_head(buf, end, &content_length, &chunked);
                if (status < 0) {
                    char why[sizeof meta.error];
                    memcpy(why, meta.error, sizeof why);
                    fail("%s %s: %s", method, path, why);
                    goto out;
                }
            } else if (used > META_MAX_HEAD) {
                fail("%s %s: response head over %d bytes", method, path, META_MAX_HEAD);
                goto out;
            }
        }
    }
    if (!end) {
        fail("%s %s: %s", method, path, used ? "response ended in its head" : "connection closed without a response");
        status = -1;
        goto out;
    }
    size_t length = used - end;
    if (chunked) {
        if (dechunk(buf + end, &length) < 0) {
            char why[sizeof meta.error];
            memcpy(why, meta.error, sizeof why);
            fail("%s %s: %s", method, path, why);
            status = -1;
            goto out;
        }
    } else if (content_length >= 0) {
        if (length < (size_t)content_length) {
            fail("%s %s: response body ended early (%zu of %ld bytes)", method, path, length,
                 content_length);
            status = -1;
            goto out;
        }
        length = (size_t)content_length;
    }
    if (length > META_MAX_BODY) {
        fail("%s %s: response body over %d bytes", method, path, META_MAX_BODY);
        status = -1;
        goto out;
    }
    buf[end + length] = 0;
    r->buf = buf;
    r->body = buf + end;
    r->length = length;
    buf = NULL;
out:
    free(buf);
    close(fd);
    return r->buf ? status : -1;
}

/* A GET with the token; a failed connection or a 5xx is tried 3 times. */
static int meta_get(const char *path, struct response *r) {
    for (int attempt = 1;; attempt++) {
        int status = meta_request("GET", path, r);
        if ((status >= 0 && status < 500) || attempt == 3)
            return status;
        if (status >= 0)
            free(r->buf);
        sleep(1);
    }
}

static void trim_end(struct response *r) {
    while (r->length > 0 && (r->body[r->length - 1] == '\n' || r->body[r->length - 1] == '\r' ||
                             r->body[r->length - 1] == ' ' || r->body[r->length - 1] == '\t'))
        r->body[--r->length] = 0;
}

/* Waits for the service and gets a token: 0, or -1 with meta.error. */
static int get_token(unsigned long tries) {
    long long give_up = now_ms() + META_RETRY_SECONDS * 1000;
    for (unsigned long attempt = 1;; attempt++) {
        struct response r;
        int status = meta_request("PUT", "/latest/api/token", &r);
        if (status == 200) {
            trim_end(&r);
            int good = r.length > 0 && r.length <= META_MAX_TOKEN;
            for (size_t i = 0; good && i < r.length; i++)
                good = r.body[i] > ' ' && r.body[i] < 0x7f;
            if (good)
                memcpy(meta.token, r.body, r.length + 1);
            free(r.buf);
            if (!good)
                return fail("PUT /latest/api/token: the token is not one printable word");
            note("token from %s after %lu tr%s", meta.host, attempt, attempt == 1 ? "y" : "ies");
            return 0;
        }
        if (status >= 0) {
            free(r.buf);
            fail("PUT /latest/api/token: HTTP %d", status);
            if (status < 500)
                return -1; /* an answer, not a service still starting */
        }
        if (attempt >= tries || now_ms() >= give_up)
            return -1;
        note("try %lu: %s", attempt, meta.error);
        sleep(1);
    }
}

/* root + suffix, into `out` (PATH_MAX bytes); no root outside the
 * metadata step (the identity request). */
static int root_path(char *out, const char *suffix) {
    int n = snprintf(out, PATH_MAX, "%s%s", meta.root ? meta.root : "", suffix);
    if (n < 0 || n >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

/* mkdir -p; every directory it creates gets `mode`. */
static int make_dirs(const char *path, mode_t mode) {
    char buf[PATH_MAX];
    size_t length = strlen(path);
    if (length >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, length + 1);
    for (size_t i = 1; i <= length; i++) {
        if (buf[i] != '/' && buf[i] != 0)
            continue;
        char c = buf[i];
        buf[i] = 0;
        int made = mkdir(buf, mode);
        buf[i] = c;
        if (made < 0 && errno != EEXIST)
            return -1;
    }
    return 0;
}

/* Writes path.nubis-tmp, fsyncs it and renames it over path. */
static int write_file(const char *path, const char *data, size_t length, mode_t mode) {
    char temporary[PATH_MAX];
    int n = snprintf(temporary, sizeof temporary, "%s.nubis-tmp", path);
    if (n < 0 || (size_t)n >= sizeof temporary) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    errno = EIO;
    if (fchmod(fd, mode) < 0 || write_all(fd, data, length) < 0 || fsync(fd) < 0) {
        int error = errno;
        close(fd);
        unlink(temporary);
        errno = error;
        return -1;
    }
    if (close(fd) < 0 || rename(temporary, path) < 0) {
        int error = errno;
        unlink(temporary);
        errno = error;
        return -1;
    }
    return 0;
}

/* 1 to 63 of [a-z0-9-]. */
static int valid_hostname(const char *name, size_t length) {
    int good = length > 0 && length <= 63;
    for (size_t i = 0; good && i < length; i++)
        good = (name[i] >= 'a' && name[i] <= 'z') || (name[i] >= '0' && name[i] <= '9') || name[i] == '-';
    return good;
}

/* Writes /etc/hostname (under the root); -1 with errno, and `path`
 * (PATH_MAX bytes) naming the file or directory that failed. */
static int save_hostname(const char *name, char *path) {
    char line[65];
    int n = snprintf(line, sizeof line, "%s\n", name);
    if (n < 0 || (size_t)n >= sizeof line) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if (root_path(path, "/etc") < 0 || make_dirs(path, 0755) < 0 ||
        root_path(path, "/etc/hostname") < 0 || write_file(path, line, (size_t)n, 0644) < 0)
        return -1;
    return 0;
}

/* Fills `name` (64 bytes): the hostname, or "?". */
static void step_hostname(char *name) {
    strcpy(name, "?");
    struct response r;
    int status = meta_get("/latest/meta-data/hostname", &r);
    if (status != 200) {
        if (status >= 0) {
            free(r.buf);
            fail("GET /latest/meta-data/hostname: HTTP %d", status);
        }
        console("hostname: %s", meta.error);
        meta.failed = 1;
        return;
    }
    trim_end(&r);
    int good = valid_hostname(r.body, r.length);
    if (good)
        memcpy(name, r.body, r.length + 1);
    free(r.buf);
    if (!good) {
        console("hostname: not 1 to 63 of [a-z0-9-]; left as it is");
        meta.failed = 1;
        return;
    }
    if (*meta.root) {
        note("hostname %s (no sethostname(): NUBIS_METADATA_ROOT is set)", name);
    } else if (sethostname(name, strlen(name)) < 0) {
        console("sethostname(%s): %s", name, strerror(errno));
        meta.failed = 1;
    } else {
        note("hostname %s (sethostname)", name);
    }
    char path[PATH_MAX] = "";
    /* A read-only root is fine: the error is only reported. */
    if (save_hostname(name, path) < 0)
        console("%s: %s (hostname not saved)", path, strerror(errno));
    else
        note("wrote %s", path);
}

/* Returns the number of keys written, or 0. */
static int step_keys(void) {
    static char keys[META_MAX_BODY]; /* the new authorized_keys */
    size_t keys_length = 0;
    int count = 0, entries = 0;
    char path[PATH_MAX] = "";
    struct response list;
    int status = meta_get("/latest/meta-data/public-keys/", &list);
    if (status == 404) {
        free(list.buf);
        note("no ssh keys (404): authorized_keys left as it is");
        return 0;
    }
    if (status != 200) {
        if (status >= 0) {
            free(list.buf);
            fail("GET /latest/meta-data/public-keys/: HTTP %d", status);
        }
        console("ssh keys: %s", meta.error);
        meta.failed = 1;
        return 0;
    }
    for (size_t at = 0; at < list.length;) {
        char *line = list.body + at;
        char *newline = memchr(line, '\n', list.length - at);
        size_t length = newline ? (size_t)(newline - line) : list.length - at;
        at += length + 1;
        if (length > 0 && line[length - 1] == '\r')
            length--;
        if (length == 0)
            continue;
        line[length] = 0;
        if (++entries > META_MAX_KEYS) {
            console("ssh keys: more than %d; the others are left out", META_MAX_KEYS);
            meta.failed = 1;
            break;
        }
        /* N=name */
        size_t digits = 0;
        unsigned long index = 0;
        while (digits < length && digits < 6 && line[digits] >= '0' && line[digits] <= '9')
            index = index * 10 + (unsigned long)(line[digits++] - '0');
        if (digits == 0 || line[digits] != '=' || strlen(line) != length) {
            console("ssh keys: malformed public-keys line left out");
            meta.failed = 1;
            continue;
        }
        char key_path[64];
        snprintf(key_path, sizeof key_path, "/latest/meta-data/public-keys/%lu/openssh-key", index);
        struct response key;
        status = meta_get(key_path, &key);
        if (status != 200) {
            /* Without every key, the old file stays. */
            if (status >= 0) {
                free(key.buf);
                fail("GET %s: HTTP %d", key_path, status);
            }
            console("ssh keys: %s; authorized_keys left as it is", meta.error);
            meta.failed = 1;
            free(list.buf);
            return 0;
        }
        while (key.length > 0 && (key.body[key.length - 1] == '\n' || key.body[key.length - 1] == '\r'))
            key.body[--key.length] = 0;
        int good = key.length > 0 && key.length <= META_MAX_KEY && !memchr(key.body, '\n', key.length) &&
                   !memchr(key.body, '\r', key.length) && !memchr(key.body, 0, key.length);
        if (!good) {
            console("ssh key %lu (%.64s): empty, too long, or more than one line; left out", index,
                    line + digits + 1);
            meta.failed = 1;
        } else if (key.length + 1 > sizeof keys - keys_length) {
            console("ssh key %lu (%.64s): over %zu bytes of keys in all; left out", index,
                    line + digits + 1, sizeof keys);
            meta.failed = 1;
        } else {
            memcpy(keys + keys_length, key.body, key.length);
            keys_length += key.length;
            keys[keys_length++] = '\n';
            count++;
            note("ssh key %lu (%.64s)", index, line + digits + 1);
        }
        free(key.buf);
    }
    free(list.buf);
    if (count == 0) {
        if (entries > 0)
            console("ssh keys: none usable; authorized_keys left as it is");
        else
            note("no ssh keys (empty list): authorized_keys left as it is");
        return 0;
    }
    if (root_path(path, "/root/.ssh") < 0 || make_dirs(path, 0700) < 0 || chmod(path, 0700) < 0 ||
        root_path(path, "/root/.ssh/authorized_keys") < 0 ||
        write_file(path, keys, keys_length, 0600) < 0) {
        console("%s: %s (ssh keys not written)", path, strerror(errno));
        meta.failed = 1;
        return 0;
    }
    note("wrote %s (%d key%s)", path, count, count == 1 ? "" : "s");
    return count;
}

/* Runs the saved user-data with its output appended to the log; waits. */
static int run_user_data(const char *program, const char *marker) {
    char log[PATH_MAX] = "", directory[PATH_MAX];
    int fd = -1;
    if (root_path(directory, "/var/log") < 0 || make_dirs(directory, 0755) < 0 ||
        root_path(log, "/var/log/nubis-user-data.log") < 0 ||
        (fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600)) < 0) {
        console("%s: %s (user-data not run)", log, strerror(errno));
        return -1;
    }
    /* The marker first: a crash while it runs does not run it again. */
    int done = open(marker, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (done < 0) {
        int already = errno == EEXIST;
        if (already)
            note("user-data already ran (%s)", marker);
        else
            console("%s: %s (user-data not run)", marker, strerror(errno));
        close(fd);
        return already ? 0 : -1;
    }
    int synced = fsync(done) == 0;
    int error = errno;
    close(done);
    int dir = -1;
    if (synced && (root_path(directory, "/var/lib/nubis") < 0 ||
                   (dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 || fsync(dir) < 0)) {
        synced = 0;
        error = errno;
    }
    if (dir >= 0)
        close(dir);
    if (!synced) {
        /* Not known to be on disk: no marker, no run; the next boot tries. */
        unlink(marker);
        console("%s: %s (user-data not run)", marker, strerror(error));
        close(fd);
        return -1;
    }
    note("running %s (output in %s)", program, log);
    pid_t child = fork();
    if (child < 0) {
        console("user-data: fork: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (child == 0) {
        signal(SIGPIPE, SIG_DFL);
        setsid();
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0 || chdir("/") < 0)
            _exit(127);
        if (null > 2)
            close(null);
        char *argv[] = {(char *)program, NULL};
        char *envp[] = {"PATH=/sbin:/bin:/usr/sbin:/usr/bin", "HOME=/root", NULL};
        execve(program, argv, envp);
        dprintf(2, "nubis-metadata: cannot run %s: %s\n", program, strerror(errno));
        _exit(127);
    }
    close(fd);
    int status = 0;
    pid_t waited;
    while ((waited = waitpid(child, &status, 0)) < 0 && errno == EINTR)
        ;
    if (waited < 0)
        console("user-data: waitpid: %s", strerror(errno));
    else if (WIFSIGNALED(status))
        console("user-data killed by signal %d", WTERMSIG(status));
    else
        console("user-data exited with %d", WEXITSTATUS(status));
    return 1;
}

/* Returns "none", "saved", "ran" or "failed". */
static const char *step_user_data(void) {
    char path[PATH_MAX] = "", marker[PATH_MAX];
    struct response r;
    int status = meta_get("/latest/user-data", &r);
    if (status == 404) {
        free(r.buf);
        note("no user-data (404)");
        return "none";
    }
    if (status != 200) {
        if (status >= 0) {
            free(r.buf);
            fail("GET /latest/user-data: HTTP %d", status);
        }
        console("user-data: %s", meta.error);
        meta.failed = 1;
        return "failed";
    }
    if (root_path(path, "/var/lib/nubis") < 0 || make_dirs(path, 0755) < 0 ||
        root_path(path, "/var/lib/nubis/user-data") < 0 || write_file(path, r.body, r.length, 0700) < 0) {
        console("%s: %s (user-data not saved)", path, strerror(errno));
        free(r.buf);
        meta.failed = 1;
        return "failed";
    }
    note("user-data: %zu bytes saved to %s", r.length, path);
    int script = r.length >= 2 && r.body[0] == '#' && r.body[1] == '!';
    free(r.buf);
    if (!script) {
        note("user-data does not start with #!: not run");
        return "saved";
    }
    if (root_path(marker, "/var/lib/nubis/user-data.done") < 0) {
        console("user-data: %s", strerror(errno));
        meta.failed = 1;
        return "failed";
    }
    int ran = run_user_data(path, marker);
    if (ran < 0) {
        meta.failed = 1;
        return "failed";
    }
    return ran ? "ran" : "saved";
}

/* The whole step; returns the exit status (0 when every part worked). */
static int metadata(int verbose) {
    memset(&meta, 0, sizeof meta);
    meta.verbose = verbose;
    signal(SIGCHLD, SIG_DFL); /* inherited as SIG_IGN from the server */
    signal(SIGPIPE, SIG_IGN);
    const char *address = getenv("NUBIS_METADATA_ADDR");
    if (!address || !*address)
        address = META_ADDR;
    const char *colon = strrchr(address, ':');
    char ip[INET_ADDRSTRLEN] = "";
    char *end = NULL;
    unsigned long port = colon ? strtoul(colon + 1, &end, 10) : 0;
    if (colon && (size_t)(colon - address) < sizeof ip)
        memcpy(ip, address, (size_t)(colon - address)), ip[colon - address] = 0;
    meta.addr.sin_family = AF_INET;
    meta.addr.sin_port = htons((unsigned short)port);
    if (!colon || !end || *end || end == colon + 1 || port == 0 || port > 65535 ||
        inet_pton(AF_INET, ip, &meta.addr.sin_addr) != 1) {
        console("NUBIS_METADATA_ADDR is not IPv4:PORT: %s", address);
        return 2;
    }
    if (port == 80)
        snprintf(meta.host, sizeof meta.host, "%s", ip);
    else
        snprintf(meta.host, sizeof meta.host, "%s:%lu", ip, port);
    meta.root = getenv("NUBIS_METADATA_ROOT");
    if (!meta.root)
        meta.root = "";
    if (strlen(meta.root) > PATH_MAX / 2) {
        console("NUBIS_METADATA_ROOT is too long");
        return 2;
    }
    unsigned long tries = META_RETRY_SECONDS;
    const char *tries_text = getenv("NUBIS_METADATA_TRIES");
    if (tries_text && *tries_text) {
        tries = strtoul(tries_text, &end, 10);
        if (*end || tries == 0 || tries > 1000) {
            console("NUBIS_METADATA_TRIES is not a number from 1 to 1000: %s", tries_text);
            return 2;
        }
    }
    if (verbose)
        printf("nubis-metadata: service %s, files under %s\n", meta.host, *meta.root ? meta.root : "/");
    if (get_token(tries) < 0) {
        console("no metadata service (%s)", meta.error);
        return 1;
    }
    char hostname[64];
    step_hostname(hostname);
    int keys = step_keys();
    const char *user_data = step_user_data();
    console("hostname %s, %d ssh keys, user-data %s", hostname, keys, user_data);
    return meta.failed;
}

/* ---- After a restore as a clone: the identity request ------------------ */

#define IDENTITY_MAX 1024         /* the request's payload */
#define IDENTITY_LINE 128         /* one key=value line */
#define IDENTITY_SEED 32          /* bytes of seed */
#define IDENTITY_DEVICE "eth0"
#define IDENTITY_MAX_ADDRESSES 64 /* IPv4 addresses removed from eth0, at most */

struct identity {
    char hostname[64];
    int has_mac, has_address, has_gateway;
    unsigned char mac[6];
    uint32_t address, gateway; /* host byte order */
    int prefix;
    unsigned char seed[IDENTITY_SEED];
};

/* The kernel's struct rand_pool_info (int entropy_count, int buf_size,
 * __u32 buf[]) with its flexible buffer sized for the seed. */
struct seed_pool {
    int entropy_count;
    int buf_size;
    unsigned char buf[IDENTITY_SEED];
};
_Static_assert(offsetof(struct seed_pool, buf) == 2 * sizeof(int), "rand_pool_info layout");

/* Strict a.b.c.d: four decimal numbers 0 to 255, no leading zeros. */
static int parse_ipv4(const char *text, uint32_t *out) {
    uint32_t value = 0;
    const char *p = text;
    for (int part = 0; part < 4; part++) {
        if (part > 0 && *p++ != '.')
            return -1;
        const char *start = p;
        unsigned int octet = 0;
        while (*p >= '0' && *p <= '9' && p - start < 3)
            octet = octet * 10 + (unsigned int)(*p++ - '0');
        if (p == start || octet > 255 || (p - start > 1 && *start == '0'))
            return -1;
        value = value << 8 | octet;
    }
    if (*p)
        return -1;
    *out = value;
    return 0;
}

/* Strict xx:xx:xx:xx:xx:xx (hex digits in either case). */
static int parse_mac(const char *text, unsigned char *mac) {
    if (strlen(text) != 17)
        return -1;
    for (int i = 0; i < 6; i++) {
        int high = hex_digit(text[3 * i]), low = hex_digit(text[3 * i + 1]);
        if (high < 0 || low < 0 || (i < 5 && text[3 * i + 2] != ':'))
            return -1;
        mac[i] = (unsigned char)(high << 4 | low);
    }
    return 0;
}

static uint32_t prefix_mask(int prefix) {
    return prefix <= 0 ? 0 : prefix >= 32 ? 0xffffffffu : 0xffffffffu << (32 - prefix);
}

static void format_ipv4(uint32_t a, char *out /* 16 bytes */) {
    snprintf(out, 16, "%u.%u.%u.%u", (unsigned int)(a >> 24), (unsigned int)(a >> 16 & 255),
             (unsigned int)(a >> 8 & 255), (unsigned int)(a & 255));
}

static void format_mac(const unsigned char *mac, char *out /* 18 bytes */) {
    snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
}

/* An address a host may have: not 0/8, 127/8, multicast or class E, and
 * neither the network nor the broadcast address of its subnet. */
static const char *host_address_problem(uint32_t a, int prefix) {
    uint32_t mask = prefix_mask(prefix);
    if (a >> 24 == 0 || a >> 24 == 127 || a >> 24 >= 224)
        return "not a unicast host address";
    if ((a & ~mask) == 0)
        return "the network address of its subnet";
    if ((a & ~mask) == ~mask)
        return "the broadcast address of its subnet";
    return NULL;
}

/* Parses and checks the whole payload; 0, or -1 with meta.error. Nothing
 * is changed here. */
static int identity_parse(const char *data, size_t length, struct identity *id) {
    static const char *const keys[] = {"hostname", "mac", "address", "gateway", "seed"};
    enum { HOSTNAME, MAC, ADDRESS, GATEWAY, SEED, KEYS };
    int seen[KEYS] = {0};
    char shown[16];
    memset(id, 0, sizeof *id);
    if (length > IDENTITY_MAX)
        return fail("the request is over %d bytes", IDENTITY_MAX);
    if (memchr(data, 0, length))
        return fail("a NUL byte in the request");
    for (size_t at = 0; at < length;) {
        const char *start = data + at;
        const char *newline = memchr(start, '\n', length - at);
        size_t n = newline ? (size_t)(newline - start) : length - at;
        at += n + 1;
        if (n == 0)
            return fail("an empty line");
        /* Bytes no value may hold become '?' (shown in errors, and refused). */
        char line[IDENTITY_LINE + 1];
        size_t kept = n < IDENTITY_LINE ? n : IDENTITY_LINE;
        memcpy(line, start, kept);
        line[kept] = 0;
        for (size_t i = 0; i < kept; i++)
            if ((unsigned char)line[i] < 0x20 || (unsigned char)line[i] >= 0x7f)
                line[i] = '?';
        if (n > IDENTITY_LINE)
            return fail("a line over %d bytes: %.40s...", IDENTITY_LINE, line);
        char *value = strchr(line, '=');
        if (!value)
            return fail("not key=value: %.64s", line);
        *value++ = 0;
        int key = 0;
        while (key < KEYS && strcmp(line, keys[key]) != 0)
            key++;
        if (key == KEYS)
            return fail("unknown key: %.32s", line);
        if (seen[key]++)
            return fail("%s given twice", keys[key]);
        switch (key) {
        case HOSTNAME:
            if (!valid_hostname(value, strlen(value)))
                return fail("hostname: not 1 to 63 of [a-z0-9-]: %.64s", value);
            memcpy(id->hostname, value, strlen(value) + 1);
            break;
        case MAC:
            if (parse_mac(value, id->mac) < 0)
                return fail("mac: not a MAC like 02:4e:42:01:02:03: %.64s", value);
            if (id->mac[0] & 1 || !(id->mac[0] | id->mac[1] | id->mac[2] | id->mac[3] | id->mac[4] | id->mac[5]))
                return fail("mac: %s is not a unicast MAC", value);
            id->has_mac = 1;
            break;
        case ADDRESS: {
            char *slash = strchr(value, '/');
            const char *p = slash ? slash + 1 : "";
            int prefix = 0, digits = 0;
            while (*p >= '0' && *p <= '9' && digits < 3)
                prefix = prefix * 10 + (*p++ - '0'), digits++;
            int good = slash && digits > 0 && !*p && !(digits > 1 && slash[1] == '0');
            if (good) {
                *slash = 0;
                good = parse_ipv4(value, &id->address) == 0;
                *slash = '/';
            }
            if (!good)
                return fail("address: not IPv4/PREFIX like 10.88.1.5/24: %.64s", value);
            if (prefix < 1 || prefix > 30)
                return fail("address: the prefix is not 1 to 30: %.64s", value);
            id->prefix = prefix;
            id->has_address = 1;
            break;
        }
        case GATEWAY:
            if (parse_ipv4(value, &id->gateway) < 0)
                return fail("gateway: not an IPv4 address like 10.88.1.1: %.64s", value);
            id->has_gateway = 1;
            break;
        case SEED: {
            /* Not echoed back: it is the guest's new randomness. */
            size_t digits = strlen(value);
            int good = digits == 2 * IDENTITY_SEED;
            for (size_t i = 0; good && i < IDENTITY_SEED; i++) {
                int high = hex_digit(value[2 * i]), low = hex_digit(value[2 * i + 1]);
                good = high >= 0 && low >= 0;
                id->seed[i] = (unsigned char)(high << 4 | low);
            }
            if (!good)
                return fail("seed: not %d hex digits (%zu characters)", 2 * IDENTITY_SEED, digits);
            break;
        }
        }
    }
    if (!seen[HOSTNAME])
        return fail("hostname is missing");
    if (!seen[SEED])
        return fail("seed is missing");
    if (id->has_mac && (!id->has_address || !id->has_gateway))
        return fail("mac needs address and gateway");
    if (!id->has_mac && (id->has_address || id->has_gateway))
        return fail("address and gateway need mac");
    if (id->has_address) {
        const char *problem = host_address_problem(id->address, id->prefix);
        format_ipv4(id->address, shown);
        if (problem)
            return fail("address: %s/%d: %s", shown, id->prefix, problem);
        uint32_t mask = prefix_mask(id->prefix);
        char gateway[16];
        format_ipv4(id->gateway, gateway);
        problem = host_address_problem(id->gateway, id->prefix);
        if (problem)
            return fail("gateway: %s: %s", gateway, problem);
        if ((id->gateway & mask) != (id->address & mask))
            return fail("gateway: %s is not in %s/%d", gateway, shown, id->prefix);
        if (id->gateway == id->address)
            return fail("gateway: %s is the address itself", gateway);
    }
    return 0;
}

/* Step 1: 1 reseeded, 0 seeded only (no RNDRESEEDCRNG), -1 (meta.error). */
static int identity_rng(const struct identity *id) {
    const char *device = "/dev/urandom";
    int fd = open(device, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        device = "/dev/random";
        fd = open(device, O_WRONLY | O_CLOEXEC);
    }
    if (fd < 0)
        return fail("rng: /dev/urandom, /dev/random: %s", strerror(errno));
    struct seed_pool pool = {.entropy_count = IDENTITY_SEED * 8, .buf_size = IDENTITY_SEED};
    memcpy(pool.buf, id->seed, sizeof pool.buf);
    if (ioctl(fd, RNDADDENTROPY, &pool) < 0) {
        int error = errno;
        close(fd);
        return fail("rng: RNDADDENTROPY on %s: %s", device, strerror(error));
    }
    int reseeded = ioctl(fd, RNDRESEEDCRNG) == 0;
    int error = errno;
    close(fd);
    if (!reseeded && error != ENOTTY && error != EINVAL)
        return fail("rng: RNDRESEEDCRNG on %s: %s", device, strerror(error));
    return reseeded;
}

/* Step 2: 0, or -1 (meta.error). */
static int identity_hostname(const struct identity *id) {
    if (sethostname(id->hostname, strlen(id->hostname)) < 0)
        return fail("hostname: sethostname(%s): %s", id->hostname, strerror(errno));
    char path[PATH_MAX] = "";
    /* Like the metadata step: a read-only or missing /etc is fine. */
    if (save_hostname(id->hostname, path) < 0 && errno != EROFS && errno != ENOENT)
        return fail("hostname: %s set, but %s: %s", id->hostname, path, strerror(errno));
    return 0;
}

static void interface_request(struct ifreq *ifr, const char *name) {
    memset(ifr, 0, sizeof *ifr);
    snprintf(ifr->ifr_name, sizeof ifr->ifr_name, "%s", name);
}

static struct sockaddr ipv4_sockaddr(uint32_t a) {
    struct sockaddr_in in;
    struct sockaddr out;
    memset(&in, 0, sizeof in);
    in.sin_family = AF_INET;
    in.sin_addr.s_addr = htonl(a);
    memcpy(&out, &in, sizeof out);
    return out;
}

/* An alias of eth0 (`eth0:N`, from SIOCGIFCONF) into `name`, or "". */
static int find_alias(int s, char *name /* IFNAMSIZ bytes */) {
    struct ifreq list[64];
    struct ifconf conf = {.ifc_len = sizeof list, .ifc_req = list};
    *name = 0;
    if (ioctl(s, SIOCGIFCONF, &conf) < 0)
        return fail("eth0: SIOCGIFCONF: %s", strerror(errno));
    for (size_t i = 0; i < (size_t)conf.ifc_len / sizeof list[0]; i++) {
        if (strncmp(list[i].ifr_name, IDENTITY_DEVICE ":", strlen(IDENTITY_DEVICE) + 1) == 0) {
            memcpy(name, list[i].ifr_name, IFNAMSIZ);
            name[IFNAMSIZ - 1] = 0;
            break;
        }
    }
    return 0;
}

/* Every IPv4 address of eth0 goes: SIOCSIFADDR 0.0.0.0 deletes the first
 * address labelled with the name given (with the secondaries of its subnet,
 * unless promote_secondaries is set: then one of them is next). */
static int remove_addresses(int s) {
    for (int removed = 0; removed < IDENTITY_MAX_ADDRESSES; removed++) {
        char name[IFNAMSIZ] = IDENTITY_DEVICE;
        struct ifreq ifr;
        interface_request(&ifr, name);
        if (ioctl(s, SIOCGIFADDR, &ifr) < 0) {
            if (errno != EADDRNOTAVAIL)
                return fail("eth0: SIOCGIFADDR: %s", strerror(errno));
            if (find_alias(s, name) < 0)
                return -1;
            if (!*name)
                return 0;
        }
        interface_request(&ifr, name);
        ifr.ifr_addr = ipv4_sockaddr(0);
        if (ioctl(s, SIOCSIFADDR, &ifr) < 0)
            return fail("eth0: removing an old address of %s (SIOCSIFADDR 0.0.0.0): %s", name,
                        strerror(errno));
    }
    return fail("eth0: more than %d IPv4 addresses", IDENTITY_MAX_ADDRESSES);
}

/* Step 3: 0, or -1 (meta.error). A failure after eth0 went down brings it
 * back up (its old flags). */
static int identity_network(const struct identity *id) {
    char mac[18], address[16], gateway[16];
    format_mac(id->mac, mac);
    format_ipv4(id->address, address);
    format_ipv4(id->gateway, gateway);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return fail("eth0: socket: %s", strerror(errno));
    int result = -1, down = 0;
    struct ifreq ifr;
    interface_request(&ifr, IDENTITY_DEVICE);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        fail("eth0: SIOCGIFFLAGS: %s", strerror(errno));
        goto out;
    }
    short flags = ifr.ifr_flags;
    ifr.ifr_flags = (short)(flags & ~IFF_UP);
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) {
        fail("eth0: down (SIOCSIFFLAGS): %s", strerror(errno));
        goto out;
    }
    down = 1;
    interface_request(&ifr, IDENTITY_DEVICE);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, id->mac, sizeof id->mac);
    if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0) {
        fail("eth0: SIOCSIFHWADDR %s: %s", mac, strerror(errno));
        goto out;
    }
    interface_request(&ifr, IDENTITY_DEVICE);
    ifr.ifr_flags = (short)(flags | IFF_UP);
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) {
        fail("eth0: up (SIOCSIFFLAGS) with MAC %s: %s", mac, strerror(errno));
        goto out;
    }
    down = 0;
    if (remove_addresses(s) < 0)
        goto out;
    interface_request(&ifr, IDENTITY_DEVICE);
    ifr.ifr_addr = ipv4_sockaddr(id->address);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) {
        fail("eth0: SIOCSIFADDR %s: %s", address, strerror(errno));
        goto out;
    }
    interface_request(&ifr, IDENTITY_DEVICE);
    ifr.ifr_netmask = ipv4_sockaddr(prefix_mask(id->prefix));
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) {
        fail("eth0: SIOCSIFNETMASK %s/%d: %s", address, id->prefix, strerror(errno));
        goto out;
    }
    struct rtentry route;
    char device[IFNAMSIZ] = IDENTITY_DEVICE;
    memset(&route, 0, sizeof route);
    route.rt_dst = ipv4_sockaddr(0);
    route.rt_genmask = ipv4_sockaddr(0);
    route.rt_gateway = ipv4_sockaddr(id->gateway);
    route.rt_flags = RTF_UP | RTF_GATEWAY;
    route.rt_dev = device;
    if (ioctl(s, SIOCADDRT, &route) < 0 && errno != EEXIST) {
        fail("eth0: default route via %s (SIOCADDRT): %s", gateway, strerror(errno));
        goto out;
    }
    result = 0;
out:
    if (down) {
        interface_request(&ifr, IDENTITY_DEVICE);
        ifr.ifr_flags = flags;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) {
            size_t used = strlen(meta.error);
            snprintf(meta.error + used, sizeof meta.error - used, "; eth0 left down: %s", strerror(errno));
        }
    }
    close(s);
    return result;
}

/* Adds what was applied before the step that failed to meta.error. */
static int failed_after(const char *applied) {
    size_t used = strlen(meta.error);
    snprintf(meta.error + used, sizeof meta.error - used, " (applied before it: %s)", applied);
    return -1;
}

/* The three steps in order; 0 with the summary, or -1 (meta.error). */
static int identity_apply(const struct identity *id, char *summary, size_t size) {
    int rng = identity_rng(id);
    if (rng < 0)
        return -1;
    const char *rng_text = rng ? "rng reseeded" : "rng seeded (no RNDRESEEDCRNG)";
    if (identity_hostname(id) < 0)
        return failed_after(rng_text);
    if (id->has_mac && identity_network(id) < 0) {
        char applied[128];
        snprintf(applied, sizeof applied, "%s, hostname %s", rng_text, id->hostname);
        return failed_after(applied);
    }
    if (id->has_mac) {
        char mac[18], address[16], gateway[16];
        format_mac(id->mac, mac);
        format_ipv4(id->address, address);
        format_ipv4(id->gateway, gateway);
        snprintf(summary, size, "hostname %s, eth0 %s %s/%d via %s, %s", id->hostname, mac, address,
                 id->prefix, gateway, rng_text);
    } else {
        snprintf(summary, size, "hostname %s, eth0 unchanged, %s", id->hostname, rng_text);
    }
    return 0;
}

/* One line `nubis-identity: ...` on the console. */
__attribute__((format(printf, 1, 2))) static void identity_console(const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    console_line("nubis-identity: ", format, ap);
    va_end(ap);
}

/* The request: one `ok` or `error` record back. Returns 0 when ok. */
static int identity_request(int fd, const char *data, size_t length) {
    struct identity id;
    char summary[256];
    memset(&meta, 0, sizeof meta);
    signal(SIGPIPE, SIG_IGN);
    int good = identity_parse(data, length, &id) == 0 && identity_apply(&id, summary, sizeof summary) == 0;
    if (!good) {
        identity_console("error: %s", meta.error);
        send_text(fd, "error", meta.error);
        return -1;
    }
    identity_console("%s", summary);
    send_text(fd, "ok", summary);
    return 0;
}

/* A payload from stdin (at most IDENTITY_MAX + 1 bytes: more is refused by
 * the parser); NULL on a read error. */
static char *read_payload(size_t *length) {
    char *data = malloc(IDENTITY_MAX + 2);
    size_t used = 0;
    if (!data)
        return NULL;
    while (used < IDENTITY_MAX + 1) {
        ssize_t n = read(0, data + used, IDENTITY_MAX + 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(data);
            return NULL;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    data[used] = 0;
    *length = used;
    return data;
}

/* `identity-parse` and `identity-apply`: a payload from stdin. */
static int identity_test(int apply) {
    size_t length = 0;
    char *data = read_payload(&length);
    if (!data) {
        perror("nubis-guest-agent: stdin");
        return 2;
    }
    if (apply) {
        int status = identity_request(1, data, length) == 0 ? 0 : 1;
        free(data);
        return status;
    }
    struct identity id;
    memset(&meta, 0, sizeof meta);
    int status = identity_parse(data, length, &id);
    free(data);
    if (status < 0) {
        printf("error: %s\n", meta.error);
        return 1;
    }
    printf("hostname=%s\n", id.hostname);
    if (id.has_mac) {
        char mac[18], address[16], gateway[16];
        format_mac(id.mac, mac);
        format_ipv4(id.address, address);
        format_ipv4(id.gateway, gateway);
        printf("mac=%s\naddress=%s/%d\nnetmask=%08x\ngateway=%s\n", mac, address, id.prefix,
               (unsigned int)prefix_mask(id.prefix), gateway);
    }
    printf("seed=");
    for (size_t i = 0; i < sizeof id.seed; i++)
        printf("%02x", id.seed[i]);
    putchar('\n');
    return 0;
}

/* Serving mode: the step in a child, so vsock is served meanwhile. The
 * server ignores SIGCHLD, so the kernel reaps this child; the exec feature
 * waits for its own command by pid, in a per-connection child. */
static void start_metadata(int listener) {
    pid_t child = fork();
    if (child == 0) {
        if (listener >= 0)
            close(listener);
        _exit(metadata(0));
    }
    if (child < 0)
        perror("nubis-guest-agent: fork for the metadata step");
}

static int serve_forever(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);
    int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct vsock_address a = address(0xffffffffUL, AGENT_PORT);
    int listening = listener >= 0 && bind(listener, (struct sockaddr *)&a, sizeof a) == 0 &&
                    listen(listener, 16) == 0;
    if (!listening)
        perror("nubis-guest-agent: vsock port 52");
    /* After listen(): vsock is served first; the metadata runs either way. */
    start_metadata(listener);
    if (!listening)
        return 1;
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("nubis-guest-agent: accept");
            sleep(1);
            continue;
        }
        pid_t child = fork();
        if (child == 0) {
            /* The command's own children are reaped by the agent's child. */
            signal(SIGCHLD, SIG_DFL);
            close(listener);
            serve(fd);
            shutdown(fd, SHUT_WR);
            close(fd);
            _exit(0);
        }
        close(fd);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 1)
        return serve_forever();
    if (argc == 3 && strcmp(argv[1], "echo") == 0)
        return echo(strtoul(argv[2], NULL, 10));
    if (argc == 5 && strcmp(argv[1], "send") == 0)
        return send_and_check(strtoul(argv[2], NULL, 10), strtoul(argv[3], NULL, 10),
                              strtoul(argv[4], NULL, 10));
    if (argc == 2 && strcmp(argv[1], "metadata") == 0)
        return metadata(1);
    if (argc == 2 && strcmp(argv[1], "identity-parse") == 0)
        return identity_test(0);
    if (argc == 2 && strcmp(argv[1], "identity-apply") == 0)
        return identity_test(1);
    fprintf(stderr, "usage: nubis-guest-agent [metadata | echo PORT | send CID PORT BYTES]\n");
    return 2;
}
