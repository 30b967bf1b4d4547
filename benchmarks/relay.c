/* The bench's relay-c target: a TCP relay in C, the floor of any hop through CPU 1 without an
 * interpreter. ``relay-c PORT UPSTREAM_PORT`` listens on 127.0.0.1:PORT; each connection gets
 * one to 127.0.0.1:UPSTREAM_PORT, and what arrives on either side is written to the other at
 * once (TCP_NODELAY, nothing parsed or buffered). One thread, epoll; writes block, which a
 * loopback reader of the bench's small events never makes noticeable.
 * Built by benchmarks/targets.py with ``cc -O2``. */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536
static int peer[MAX_FD];

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return address;
}

static void watch(int epoll, int fd) {
    struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
}

static void close_pair(int fd) {  /* closing a descriptor removes it from the epoll set */
    int other = peer[fd];
    close(fd);
    peer[fd] = -1;
    if (other >= 0) {
        close(other);
        peer[other] = -1;
    }
}

static void accept_one(int listener, int epoll, int upstream_port) {
    int client = accept(listener, NULL, NULL);
    if (client < 0)
        return;
    int upstream = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = loopback(upstream_port);
    if (client >= MAX_FD || upstream < 0 || upstream >= MAX_FD ||
        connect(upstream, (struct sockaddr *)&address, sizeof address) != 0) {
        close(client);
        if (upstream >= 0)
            close(upstream);
        return;
    }
    int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    peer[client] = upstream;
    peer[upstream] = client;
    watch(epoll, client);
    watch(epoll, upstream);
}

static void pass_on(int fd) {
    static char buffer[1 << 16];
    ssize_t got = read(fd, buffer, sizeof buffer);
    ssize_t sent = 0;
    while (got > 0 && sent < got) {
        ssize_t wrote = write(peer[fd], buffer + sent, (size_t)(got - sent));
        if (wrote <= 0)
            break;
        sent += wrote;
    }
    if (got <= 0 || sent < got)
        close_pair(fd);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: relay-c PORT UPSTREAM_PORT\n");
        return 2;
    }
    int upstream_port = atoi(argv[2]), one = 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = loopback(atoi(argv[1]));
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 ||
        listen(listener, 4096) != 0) {
        perror("relay-c: listen");
        return 1;
    }
    for (int fd = 0; fd < MAX_FD; fd++)
        peer[fd] = -1;
    int epoll = epoll_create1(0);
    watch(epoll, listener);
    struct epoll_event events[256];
    for (;;) {
        int ready = epoll_wait(epoll, events, 256, -1);
        for (int i = 0; i < ready; i++) {
            int fd = events[i].data.fd;
            if (fd == listener)
                accept_one(listener, epoll, upstream_port);
            else if (peer[fd] >= 0)
                pass_on(fd);
        }
    }
}
