/*
 * dhcp-flood SECONDS: what a hostile guest does to its host's DHCP server.
 *
 * Broadcasts DHCPDISCOVERs from eth0 as fast as the guest can send them for
 * SECONDS seconds, each with a made-up client MAC (chaddr; the Ethernet
 * source stays the NIC's own, since the host drops frames from any other),
 * then prints `DHCP_FLOOD_SENT N`. The tests run it in a guest while they
 * call the agent's API, which must keep answering. A shell loop of busybox
 * tools could send a few requests a second here (each exec costs the guest
 * seconds under the instruction emulator); this sends thousands.
 */
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BOOTP_SIZE 236

static uint64_t state;

/* xorshift64: made-up MACs need no entropy, only variety. */
static uint64_t next_random(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 2 || atoi(argv[1]) <= 0) {
        fprintf(stderr, "usage: dhcp-flood SECONDS\n");
        return 2;
    }
    int seconds = atoi(argv[1]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int on = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &on, sizeof on) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, "eth0", 5) != 0) {
        perror("dhcp-flood: socket");
        return 1;
    }
    struct sockaddr_in client = { .sin_family = AF_INET, .sin_port = htons(68) };
    if (bind(fd, (struct sockaddr *)&client, sizeof client) != 0) {
        perror("dhcp-flood: bind to port 68");
        return 1;
    }
    struct sockaddr_in server = {
        .sin_family = AF_INET,
        .sin_port = htons(67),
        .sin_addr.s_addr = htonl(INADDR_BROADCAST),
    };
    unsigned char packet[BOOTP_SIZE + 8];
    state = (uint64_t)time(NULL) * 2654435761u + (uint64_t)getpid();
    if (state == 0)
        state = 1;
    unsigned long sent = 0;
    double end = now() + seconds;
    while (now() < end) {
        memset(packet, 0, sizeof packet);
        packet[0] = 1; /* BOOTREQUEST */
        packet[1] = 1; /* Ethernet */
        packet[2] = 6; /* hardware address length */
        uint32_t xid = (uint32_t)sent;
        memcpy(packet + 4, &xid, 4);
        packet[10] = 0x80; /* broadcast flag */
        uint64_t mac = next_random();
        memcpy(packet + 28, &mac, 6);
        packet[28] &= 0xfe; /* unicast */
        static const unsigned char options[8] = { 99, 130, 83, 99, 53, 1, 1, 255 };
        memcpy(packet + BOOTP_SIZE, options, sizeof options);
        if (sendto(fd, packet, sizeof packet, 0, (struct sockaddr *)&server, sizeof server) ==
            (ssize_t)sizeof packet)
            sent++;
    }
    printf("DHCP_FLOOD_SENT %lu\n", sent);
    return 0;
}
