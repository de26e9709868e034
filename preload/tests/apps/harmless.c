/* Socket, pipe and file calls whose results (values, errno, data) are printed one per line,
 * so that runs with and without the preload library can be compared byte for byte. The
 * TCP part connects to its own listener, so a library that is active publishes it. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define SHOW(name, expr)                                                             \
    do {                                                                             \
        errno = 0;                                                                   \
        long r_ = (long)(expr);                                                      \
        int e_ = errno;                                                              \
        printf("%s = %ld errno=%d\n", name, r_, r_ < 0 ? e_ : 0);                    \
    } while (0)

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

int main(int argc, char **argv) {
    char buf[64];
    int p[2];
    SHOW("pipe", pipe(p));
    SHOW("write pipe", write(p[1], "hello", 5));
    memset(buf, 0, sizeof buf);
    SHOW("read pipe", read(p[0], buf, sizeof buf));
    printf("data %s\n", buf);
    struct iovec iov[2] = {{"ab", 2}, {"cd", 2}};
    SHOW("writev pipe", writev(p[1], iov, 2));
    char x[2], y[2];
    struct iovec riov[2] = {{x, 2}, {y, 2}};
    SHOW("readv pipe", readv(p[0], riov, 2));
    printf("data %.2s%.2s\n", x, y);
    SHOW("close pipe", close(p[0]) + close(p[1]));

    const char *path = argc > 1 ? argv[1] : "/tmp/tracecar-harmless";
    int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    SHOW("write file", write(f, "file data", 9));
    SHOW("lseek", lseek(f, 0, SEEK_SET));
    memset(buf, 0, sizeof buf);
    SHOW("read file", read(f, buf, sizeof buf));
    printf("data %s\n", buf);
    int g = dup(f);
    SHOW("dup2 same", dup2(g, g) == g);
    SHOW("close file", close(f) + close(g));
    unlink(path);

    SHOW("read bad fd", read(-1, buf, 1));
    SHOW("read closed fd", read(f, buf, 1));
    SHOW("write bad fd", write(9999, buf, 1));
    SHOW("recv not a socket", recv(0 > 1 ? 0 : open("/dev/null", O_RDONLY), buf, 1, 0));
    SHOW("close bad fd", close(-1));
    SHOW("dup bad fd", dup(-1));
    SHOW("dup2 bad fd", dup2(-1, 50));
    SHOW("dup3 same fd", dup3(1, 1, 0));

    /* A closed port: ECONNREFUSED, exactly. */
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = loopback(0);
    socklen_t alen = sizeof a;
    bind(l, (struct sockaddr *)&a, sizeof a);
    getsockname(l, (struct sockaddr *)&a, &alen);
    close(l);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    SHOW("connect closed port", connect(c, (struct sockaddr *)&a, sizeof a));
    close(c);

    /* A real TCP exchange on loopback, both ways, every call family. */
    l = socket(AF_INET, SOCK_STREAM, 0);
    a = loopback(0);
    bind(l, (struct sockaddr *)&a, sizeof a);
    listen(l, 4);
    getsockname(l, (struct sockaddr *)&a, &alen);
    c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    SHOW("connect nonblocking", connect(c, (struct sockaddr *)&a, sizeof a));
    /* No address buffer: the kernel never reads the length, so a bad pointer there is legal
       and must not be read by a wrapper either. */
    int s = accept(l, NULL, (socklen_t *)8);
    printf("accepted %d\n", s >= 0);
    fcntl(c, F_SETFL, 0);
    SHOW("send", send(c, "GET / HTTP/1.1\r\n\r\n", 18, 0));
    memset(buf, 0, sizeof buf);
    SHOW("recv", recv(s, buf, sizeof buf, 0));
    printf("data %s", buf);
    SHOW("sendto", sendto(s, "pong", 4, 0, NULL, 0));
    memset(buf, 0, sizeof buf);
    SHOW("recvfrom", recvfrom(c, buf, sizeof buf, 0, NULL, NULL));
    printf("data %s\n", buf);
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = iov;
    m.msg_iovlen = 2;
    SHOW("sendmsg", sendmsg(c, &m, 0));
    m.msg_iov = riov;
    SHOW("recvmsg", recvmsg(s, &m, 0));
    printf("data %.2s%.2s\n", x, y);
    SHOW("recv nonblocking empty", recv(s, buf, 1, MSG_DONTWAIT));
    int d = dup(c);
    SHOW("write dup", write(d, "x", 1));
    SHOW("read", read(s, buf, 1));
    SHOW("close dup", close(d));
    SHOW("shutdown", shutdown(s, SHUT_RDWR));
    SHOW("send after shutdown", send(c, "y", 1, MSG_NOSIGNAL) >= 0 ? 0 : -1);
    SHOW("close", close(c) + close(s) + close(l));

    int q = socket(AF_INET, SOCK_STREAM, 0);
    l = socket(AF_INET, SOCK_STREAM, 0);
    a = loopback(0);
    bind(l, (struct sockaddr *)&a, sizeof a);
    listen(l, 4);
    getsockname(l, (struct sockaddr *)&a, &alen);
    connect(q, (struct sockaddr *)&a, sizeof a);
    errno = 4321;
    int acc = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    printf("errno kept across a tracked accept4: %d\n", errno);
    errno = 4321;
    ssize_t w = write(q, "z", 1);
    printf("errno kept across a tracked write: %d %zd\n", errno, w);
    errno = 4321;
    ssize_t rd = read(acc, buf, 1);
    printf("errno kept across a tracked read: %d %zd\n", errno, rd);
    close(q);
    close(acc);
    close(l);
    /* accept with an address buffer too small for the peer's (IPv6) address: the kernel
     * truncates the address and reports its full length; nothing may read past the buffer. */
    int l6 = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a6;
    memset(&a6, 0, sizeof a6);
    a6.sin6_family = AF_INET6;
    a6.sin6_addr = in6addr_loopback;
    socklen_t a6len = sizeof a6;
    if (l6 >= 0 && bind(l6, (struct sockaddr *)&a6, sizeof a6) == 0 && listen(l6, 1) == 0) {
        getsockname(l6, (struct sockaddr *)&a6, &a6len);
        int c6 = socket(AF_INET6, SOCK_STREAM, 0);
        connect(c6, (struct sockaddr *)&a6, sizeof a6);
        struct {
            char small[8];
            char guard[40];
        } b;
        memset(&b, 0x5a, sizeof b);
        socklen_t small = sizeof b.small;
        int s6 = accept(l6, (struct sockaddr *)b.small, &small);
        int intact = 1;
        for (size_t i = 0; i < sizeof b.guard; i++) intact &= b.guard[i] == 0x5a;
        printf("ipv6 accept small buffer: ok=%d len=%u guard intact=%d\n", s6 >= 0, small, intact);
        SHOW("ipv6 send", send(c6, "v6", 2, 0));
        SHOW("ipv6 recv", recv(s6, buf, sizeof buf, 0));
        close(c6);
        close(s6);
    } else {
        printf("ipv6: unavailable\n");
    }
    if (l6 >= 0) close(l6);
    printf("done\n");
    return 0;
}
