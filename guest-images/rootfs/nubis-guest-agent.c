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
 * Anything else is answered with `error`. Keys are at most 15 bytes, a
 * request at most 64 KiB.
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
 * Written in C and linked statically with musl, like nubis-run-init: small
 * (the initramfs is unpacked under KVM's instruction emulator on kvm_pvm
 * hosts, ~20 s per MiB) and one fork per request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

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

static int serve_forever(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);
    int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct vsock_address a = address(0xffffffffUL, AGENT_PORT);
    if (listener < 0 || bind(listener, (struct sockaddr *)&a, sizeof a) < 0 ||
        listen(listener, 16) < 0) {
        perror("nubis-guest-agent: vsock port 52");
        return 1;
    }
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
    fprintf(stderr, "usage: nubis-guest-agent [echo PORT | send CID PORT BYTES]\n");
    return 2;
}
