/* Short-connection load generator and request/reply server for bench/proxy.py (epoll, one thread each).
   Compiled by bench/proxy.py when a C compiler is present (a Python fallback is used otherwise), so that the load
   generator costs far less CPU than the proxies it measures.

   loadgen server PORT [ADDR]               : read a request, write the 32-byte reply, close (HTTP/1.0 style: the
                                              server closes first, so TIME_WAIT stays on the server side)
   loadgen client PORT SECONDS CONC WARMUP [ADDR [LIMIT]]
                                            : CONC connections at a time: connect, send 32 bytes, read the reply
                                              until EOF, close; counts completions between WARMUP and
                                              WARMUP + SECONDS and prints {"per_second": N, "errors": E, "ok": N,
                                              "started": N, "seconds": S, ...}; at most LIMIT connections
                                              (per_second is then over the shorter window the limit left)
   ADDR: 127.0.0.1 unless given (bench/packet.py and bench/dsr.py run it in test-bed namespaces). Bounded: the
   client stops SECONDS + WARMUP after it started (+10 s for stragglers), and after LIMIT connections. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 32
#define MAX_CONNECTIONS 5000000L /* per client run by default: the time limit comes first */
static char reqbuf[MSG], repbuf[MSG];
static const char *ADDR = "127.0.0.1";
static long LIMIT = MAX_CONNECTIONS;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (inet_pton(AF_INET, ADDR, &a.sin_addr) != 1) a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int server(int port) {
    struct sockaddr_in a = addr_of(port);
    int one = 1, ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    char buf[4096];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write(fd, repbuf, MSG) < 0) {}  /* one request per connection: reply, then close */
                close(fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd);  /* the client's EOF (or an error): done */
            }
        }
    }
}

struct conn { int got; };

static int client(int port, double seconds, int conc, double warmup) {
    struct sockaddr_in a = addr_of(port);
    int ep = epoll_create1(0), one = 1;
    long counted = 0, errors = 0;
    char last_error[128] = "";
    struct conn *conns = calloc(65536, sizeof *conns);
    double start = now() + warmup, end = start + seconds;
    int open = 0;
    long started = 0;
    char buf[4096];
    struct epoll_event evs[256];
    for (;;) {
        double t = now();
        while (open < conc && t < end && started < LIMIT) {
            int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (s < 0 || s >= 65536) { if (s >= 0) close(s); break; }
            setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(s, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) {
                errors++;
                snprintf(last_error, sizeof last_error, "connect: %s", strerror(errno));
                close(s);
                usleep(1000);
                break;
            }
            started++;
            conns[s].got = -1;  /* connecting */
            struct epoll_event ev = {.events = EPOLLOUT, .data.fd = s};
            epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
            open++;
        }
        if (open == 0 && (t >= end || started >= LIMIT)) break;
        if (t > end + 10) break;  /* hard bound: give up on stuck connections */
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            struct conn *c = &conns[fd];
            if (c->got < 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(fd, reqbuf, MSG) != MSG) {
                    errors++;
                    snprintf(last_error, sizeof last_error, "connect/send: %s", strerror(err ? err : errno));
                    close(fd);
                    open--;
                    usleep(1000);  /* do not spin on a refusing port */
                    continue;
                }
                c->got = 0;
                struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                c->got += r;
                continue;  /* the server closes after its reply: read until EOF */
            } else if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
                continue;
            } else if (r == 0 && c->got >= MSG) {
                double t2 = now();
                if (t2 >= start && t2 < end) counted++;
            } else {
                errors++;
                snprintf(last_error, sizeof last_error, "read: %s", r == 0 ? "EOF before the reply" : strerror(errno));
            }
            close(fd);
            open--;
        }
    }
    double window = (now() < end ? now() : end) - start; /* shorter than SECONDS when LIMIT ended the run */
    if (window < 1e-3) window = 1e-3;
    printf("{\"per_second\": %.1f, \"errors\": %ld, \"ok\": %ld, \"started\": %ld, \"seconds\": %.3f, "
           "\"last_error\": \"%s\"}\n", counted / window, errors, counted, started, window, last_error);
    return 0;
}

int main(int argc, char **argv) {
    memset(reqbuf, 'Q', MSG);
    memset(repbuf, 'R', MSG);
    if ((argc == 3 || argc == 4) && !strcmp(argv[1], "server")) {
        if (argc == 4) ADDR = argv[3];
        return server(atoi(argv[2]));
    }
    if (argc >= 6 && argc <= 8 && !strcmp(argv[1], "client")) {
        if (argc >= 7) ADDR = argv[6];
        if (argc == 8 && atol(argv[7]) > 0) LIMIT = atol(argv[7]);
        return client(atoi(argv[2]), atof(argv[3]), atoi(argv[4]), atof(argv[5]));
    }
    fprintf(stderr, "usage: loadgen server PORT [ADDR] | loadgen client PORT SECONDS CONCURRENCY WARMUP [ADDR [LIMIT]]\n");
    return 2;
}
