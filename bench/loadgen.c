/* loadgen: a closed-loop load generator for the tinyserve wire protocol (docs/protocol.md 1-4).
 *
 *   cc -O2 -o loadgen bench/loadgen.c
 *   ./loadgen --port P --model mlp [--host 127.0.0.1] [--conns N] [--inflight K] [--warmup W]
 *             [--count C] [--token T] [--hello] [--cols 64] [--timeout S] [--server-pid PID]
 *
 * N connections, each keeping K requests in flight: every reply (success or error) is answered by
 * the next request on its connection until C requests have been sent (after W warm-up requests
 * on the same connections, whose replies are awaited before the measured phase starts).  Every
 * request is one infer frame built once: {"id", "op": "infer", "model", "inputs": [x float32
 * [1, cols]]} and a fixed payload; the id (msgpack uint64, 8 bytes) is patched per send.  Ids are
 * (sequence << 16) | slot, unique per connection, so a reply finds its send time in O(1) whatever
 * order replies come in.  Latency = the read that completed the reply - the write of its request
 * (CLOCK_MONOTONIC).  Replies are parsed just enough to read "id", "ok" and "error"."code".
 *
 * driver_busy / driver_runq_wait: this process's CPU time / its wait for a core, over wall time (near
 * 100% busy: the generator set the pace; a large wait: something else had its core).
 * With --server-pid the server's CPU over the measured phase is read from /proc: every thread of
 * the process and of its descendants (task/<tid>/schedstat: on-CPU ns, run-queue ns, slices).
 *
 * Output: one JSON object on stdout ("ended": "done", "timeout" or "closed").  Exit status 0 done,
 * 2 usage, 3 timed out, 4 could not connect, 5 the server closed every connection before the end
 * (the replies it did send, error codes included, are still counted).  C99 + POSIX (epoll: Linux).  No dependencies beyond libc.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (64u << 20)
#define RBUF (1u << 20)
#define MAX_CODES 32
#define MAX_SLOTS 65535

typedef struct {
    int fd;
    int open;
    unsigned char *rbuf;
    size_t rstart, rend;
    unsigned char *wbuf;
    size_t wlen, wcap, woff;
    uint64_t seq;
    uint64_t *slot_id;   /* id in flight in each slot, 0 = free */
    uint64_t *slot_t;    /* its send time, ns */
    int *free_slots;
    int nfree;
    int inflight;
    int hello_pending;
} conn_t;

typedef struct {
    char code[48];
    uint64_t n;
} code_count_t;

static struct {
    unsigned char *tpl;
    size_t tpl_len, id_off;
    int conns, inflight, cols, hello;
    uint64_t warmup, count;
    const char *host, *port, *model, *token;
    double timeout_s;
    int server_pid;
    /* phase state */
    uint64_t target, sent, done;
    int measuring;
    uint64_t *lat;
    uint64_t nlat, ok;
    code_count_t codes[MAX_CODES];
    int ncodes;
    uint64_t unknown_id, bad_frames, closed, lost;
    uint64_t digest;
    int have_digest;
} G;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(int rc, const char *msg) {
    fprintf(stderr, "loadgen: %s\n", msg);
    exit(rc);
}

/* ---------------------------------------------------------------- msgpack (just what is needed) */

typedef struct {
    unsigned char *p;
    size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) die(1, "out of memory");
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put1(buf_t *b, unsigned v) { unsigned char c = (unsigned char)v; put(b, &c, 1); }
static void put_be(buf_t *b, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--) put1(b, (unsigned)(v >> (8 * i)) & 0xff);
}
static void put_str(buf_t *b, const char *s) {
    size_t n = strlen(s);
    if (n < 32) put1(b, 0xa0 | (unsigned)n);
    else if (n < 256) { put1(b, 0xd9); put1(b, (unsigned)n); }
    else { put1(b, 0xda); put_be(b, n, 2); }
    put(b, s, n);
}
static void put_uint(buf_t *b, uint64_t v) {
    if (v < 128) put1(b, (unsigned)v);
    else if (v < 65536) { put1(b, 0xcd); put_be(b, v, 2); }
    else if (v < 4294967296ull) { put1(b, 0xce); put_be(b, v, 4); }
    else { put1(b, 0xcf); put_be(b, v, 8); }
}

static uint64_t rd_be(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v = (v << 8) | p[i];
    return v;
}
static uint32_t rd_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Skip one msgpack value at *p (< end); 0 ok, -1 malformed / truncated. */
static int mp_skip(const unsigned char **pp, const unsigned char *end, int depth) {
    const unsigned char *p = *pp;
    if (p >= end || depth > 64) return -1;
    unsigned c = *p++;
    uint64_t n = 0, items = 0;
    if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) { *pp = p; return 0; }
    if ((c & 0xe0) == 0xa0) n = c & 0x1f;
    else if ((c & 0xf0) == 0x90) items = c & 0x0f;
    else if ((c & 0xf0) == 0x80) items = 2 * (uint64_t)(c & 0x0f);
    else {
        switch (c) {
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: case 0xca: n = 4; break;
        case 0xcf: case 0xd3: case 0xcb: n = 8; break;
        case 0xd4: n = 2; break; case 0xd5: n = 3; break; case 0xd6: n = 5; break;
        case 0xd7: n = 9; break; case 0xd8: n = 17; break;
        case 0xc4: case 0xd9: case 0xc7:
            if (end - p < 1) return -1;
            n = p[0] + (c == 0xc7); p += 1; break;
        case 0xc5: case 0xda: case 0xc8:
            if (end - p < 2) return -1;
            n = rd_be(p, 2) + (c == 0xc8); p += 2; break;
        case 0xc6: case 0xdb: case 0xc9:
            if (end - p < 4) return -1;
            n = rd_be(p, 4) + (c == 0xc9); p += 4; break;
        case 0xdc: if (end - p < 2) return -1; items = rd_be(p, 2); p += 2; break;
        case 0xdd: if (end - p < 4) return -1; items = rd_be(p, 4); p += 4; break;
        case 0xde: if (end - p < 2) return -1; items = 2 * rd_be(p, 2); p += 2; break;
        case 0xdf: if (end - p < 4) return -1; items = 2 * rd_be(p, 4); p += 4; break;
        default: return -1; /* 0xc1 */
        }
    }
    if ((uint64_t)(end - p) < n) return -1;
    p += n;
    for (uint64_t i = 0; i < items; i++)
        if (mp_skip(&p, end, depth + 1)) return -1;
    *pp = p;
    return 0;
}

/* A msgpack str at *p: sets *s, *len; 0 ok, -1 not a str. */
static int mp_str(const unsigned char **pp, const unsigned char *end, const unsigned char **s, size_t *len) {
    const unsigned char *p = *pp;
    if (p >= end) return -1;
    unsigned c = *p++;
    size_t n;
    if ((c & 0xe0) == 0xa0) n = c & 0x1f;
    else if (c == 0xd9) { if (end - p < 1) return -1; n = p[0]; p += 1; }
    else if (c == 0xda) { if (end - p < 2) return -1; n = rd_be(p, 2); p += 2; }
    else if (c == 0xdb) { if (end - p < 4) return -1; n = rd_be(p, 4); p += 4; }
    else return -1;
    if ((size_t)(end - p) < n) return -1;
    *s = p; *len = n; *pp = p + n;
    return 0;
}

static int mp_map_len(const unsigned char **pp, const unsigned char *end, uint64_t *items) {
    const unsigned char *p = *pp;
    if (p >= end) return -1;
    unsigned c = *p++;
    if ((c & 0xf0) == 0x80) *items = c & 0x0f;
    else if (c == 0xde) { if (end - p < 2) return -1; *items = rd_be(p, 2); p += 2; }
    else if (c == 0xdf) { if (end - p < 4) return -1; *items = rd_be(p, 4); p += 4; }
    else return -1;
    *pp = p;
    return 0;
}

static int key_is(const unsigned char *s, size_t n, const char *k) {
    return strlen(k) == n && memcmp(s, k, n) == 0;
}

/* Reply header: id, ok, error.code.  0 ok, -1 malformed. */
static int parse_reply(const unsigned char *p, const unsigned char *end, uint64_t *id, int *ok,
                       char *code, size_t code_cap) {
    uint64_t items;
    *id = 0; *ok = -1; code[0] = 0;
    if (mp_map_len(&p, end, &items)) return -1;
    for (uint64_t i = 0; i < items; i++) {
        const unsigned char *k; size_t kn;
        if (mp_str(&p, end, &k, &kn)) return -1;
        if (key_is(k, kn, "id") && p < end && (*p <= 0x7f || (*p >= 0xcc && *p <= 0xcf))) {
            unsigned c = *p++;
            int w = c <= 0x7f ? 0 : 1 << (c - 0xcc);
            if (end - p < w) return -1;
            *id = w ? rd_be(p, w) : c;
            p += w;
        } else if (key_is(k, kn, "ok") && p < end && (*p == 0xc2 || *p == 0xc3)) {
            *ok = *p++ == 0xc3;
        } else if (key_is(k, kn, "error") && p < end && ((*p & 0xf0) == 0x80 || *p == 0xde || *p == 0xdf)) {
            uint64_t e;
            if (mp_map_len(&p, end, &e)) return -1;
            for (uint64_t j = 0; j < e; j++) {
                const unsigned char *ek; size_t ekn;
                if (mp_str(&p, end, &ek, &ekn)) return -1;
                const unsigned char *v; size_t vn;
                const unsigned char *q = p;
                if (key_is(ek, ekn, "code") && mp_str(&q, end, &v, &vn) == 0) {
                    size_t m = vn < code_cap - 1 ? vn : code_cap - 1;
                    memcpy(code, v, m); code[m] = 0;
                    p = q;
                } else if (mp_skip(&p, end, 1)) return -1;
            }
        } else if (mp_skip(&p, end, 1)) return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- frames */

static void frame_finish(buf_t *hdr, const unsigned char *payload, size_t plen, buf_t *out) {
    size_t poff = (8 + hdr->n + 7) & ~(size_t)7;
    size_t total = poff + ((plen + 7) & ~(size_t)7);
    unsigned char z[8] = {0};
    uint32_t body = (uint32_t)(total - 4), hl = (uint32_t)hdr->n;
    unsigned char pre[8] = {body & 0xff, body >> 8 & 0xff, body >> 16 & 0xff, body >> 24,
                            hl & 0xff, hl >> 8 & 0xff, hl >> 16 & 0xff, hl >> 24};
    put(out, pre, 8);
    put(out, hdr->p, hdr->n);
    put(out, z, poff - 8 - hdr->n);
    if (plen) put(out, payload, plen);
    put(out, z, total - poff - plen);
}

static void build_template(void) {
    buf_t h = {0}, f = {0};
    size_t nbytes = (size_t)G.cols * 4;
    put1(&h, 0x84);
    put_str(&h, "id");
    put1(&h, 0xcf);
    size_t id_at = h.n;
    put_be(&h, 0, 8);
    put_str(&h, "op"); put_str(&h, "infer");
    put_str(&h, "model"); put_str(&h, G.model);
    put_str(&h, "inputs");
    put1(&h, 0x91);
    put1(&h, 0x84);
    put_str(&h, "name"); put_str(&h, "x");
    put_str(&h, "dtype"); put_str(&h, "float32");
    put_str(&h, "shape"); put1(&h, 0x92); put_uint(&h, 1); put_uint(&h, (uint64_t)G.cols);
    put_str(&h, "nbytes"); put_uint(&h, nbytes);
    unsigned char *payload = malloc(nbytes);
    for (int i = 0; i < G.cols; i++) { /* fixed values: (i % 17 - 8) / 8, little-endian float32 */
        float v = (float)(i % 17 - 8) / 8.0f;
        uint32_t u; memcpy(&u, &v, 4);
        unsigned char le[4] = {u & 0xff, u >> 8 & 0xff, u >> 16 & 0xff, u >> 24};
        memcpy(payload + 4 * i, le, 4);
    }
    frame_finish(&h, payload, nbytes, &f);
    G.tpl = f.p; G.tpl_len = f.n; G.id_off = 8 + id_at;
    free(payload); free(h.p);
}

static void conn_queue(conn_t *c, const unsigned char *p, size_t n) {
    if (c->wlen + n > c->wcap) {
        c->wcap = (c->wlen + n) * 2;
        c->wbuf = realloc(c->wbuf, c->wcap);
        if (!c->wbuf) die(1, "out of memory");
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
}

static void conn_flush(conn_t *c, int ep) {
    while (c->woff < c->wlen) {
        ssize_t w = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                return;
            }
            c->open = 0;
            return;
        }
        c->woff += (size_t)w;
    }
    c->wlen = c->woff = 0;
}

/* Queue up to k infer requests on c (bounded by free slots and the phase's target). */
static void conn_send(conn_t *c, int k) {
    uint64_t t = now_ns();
    while (k-- > 0 && c->nfree > 0 && G.sent < G.target) {
        int slot = c->free_slots[--c->nfree];
        uint64_t id = (++c->seq << 16) | (uint64_t)slot;
        c->slot_id[slot] = id;
        c->slot_t[slot] = t;
        c->inflight++;
        G.sent++;
        size_t at = c->wlen;
        conn_queue(c, G.tpl, G.tpl_len);
        for (int i = 0; i < 8; i++) c->wbuf[at + G.id_off + i] = (unsigned char)(id >> (56 - 8 * i));
    }
}

static void count_code(const char *code) {
    for (int i = 0; i < G.ncodes; i++)
        if (strcmp(G.codes[i].code, code) == 0) { G.codes[i].n++; return; }
    if (G.ncodes < MAX_CODES) {
        snprintf(G.codes[G.ncodes].code, sizeof G.codes[0].code, "%s", code);
        G.codes[G.ncodes++].n = 1;
    }
}

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ull; }
    return h;
}

/* Parse the complete frames in c's buffer; returns how many replies freed a slot. */
static int conn_parse(conn_t *c, uint64_t t_read) {
    int freed = 0;
    while (c->rend - c->rstart >= 8) {
        unsigned char *f = c->rbuf + c->rstart;
        uint32_t body = rd_le32(f), hl = rd_le32(f + 4);
        uint64_t total = 4ull + body;
        if (total % 8 || body < 4ull + hl || total > MAX_FRAME) { G.bad_frames++; c->open = 0; return freed; }
        if (c->rend - c->rstart < total) {
            if (total > RBUF) { G.bad_frames++; c->open = 0; return freed; }
            break;
        }
        uint64_t id; int ok; char code[48];
        if (parse_reply(f + 8, f + 8 + hl, &id, &ok, code, sizeof code)) {
            G.bad_frames++; c->open = 0; return freed;
        }
        c->rstart += total;
        if (c->hello_pending && id == 1) {
            c->hello_pending = 0;
            if (ok != 1) { count_code(code[0] ? code : "HELLO_FAILED"); c->open = 0; return freed; }
            continue;
        }
        unsigned slot = (unsigned)(id & 0xffff);
        if (id == 0 || slot >= (unsigned)G.inflight || c->slot_id[slot] != id) {
            G.unknown_id++;
            if (!ok && code[0] && G.measuring) count_code(code);
            continue;
        }
        c->slot_id[slot] = 0;
        c->free_slots[c->nfree++] = (int)slot;
        c->inflight--;
        G.done++;
        freed++;
        if (G.measuring) {
            if (ok == 1) {
                G.ok++;
                G.lat[G.nlat++] = t_read - c->slot_t[slot];
                if (!G.have_digest) {
                    size_t poff = (8 + hl + 7) & ~7u;
                    G.digest = fnv1a(f + poff, total - poff);
                    G.have_digest = 1;
                }
            } else {
                count_code(code[0] ? code : "NO_CODE");
            }
        }
    }
    if (c->rstart == c->rend) c->rstart = c->rend = 0;
    else if (RBUF - c->rend < (64u << 10)) {
        memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
        c->rend -= c->rstart; c->rstart = 0;
    }
    return freed;
}

/* ---------------------------------------------------------------- server CPU (/proc) */

typedef struct { uint64_t run, wait, slices, main_run; int threads; } sched_t;

static void sched_pid(int pid, int top, sched_t *s, int depth) {
    char path[96];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        int tid = atoi(e->d_name);
        char p2[128];
        snprintf(p2, sizeof p2, "/proc/%d/task/%d/schedstat", pid, tid);
        FILE *f = fopen(p2, "r");
        if (f) {
            unsigned long long a, b, c;
            if (fscanf(f, "%llu %llu %llu", &a, &b, &c) == 3) {
                s->run += a; s->wait += b; s->slices += c; s->threads++;
                if (tid == top) s->main_run += a;
            }
            fclose(f);
        }
        if (depth < 8) {
            snprintf(p2, sizeof p2, "/proc/%d/task/%d/children", pid, tid);
            f = fopen(p2, "r");
            if (f) {
                int child;
                while (fscanf(f, "%d", &child) == 1) sched_pid(child, -1, s, depth + 1);
                fclose(f);
            }
        }
    }
    closedir(d);
}

static sched_t sched_tree(int pid) {
    sched_t s = {0};
    if (pid > 0) sched_pid(pid, pid, &s, 0);
    return s;
}

/* ---------------------------------------------------------------- main loop */

static int connect_one(void) {
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(G.host, G.port, &hints, &res)) return -1;
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        close(fd); fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* A connection the server closed (or that broke): its requests in flight are lost, not awaited. */
static void conn_close(conn_t *c, int ep) {
    if (c->fd < 0) return;
    c->open = 0;
    G.closed++;
    if (G.measuring) G.lost += (uint64_t)c->inflight;
    G.done += (uint64_t)c->inflight;
    c->inflight = 0;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

/* Run one phase: `n` requests in all; returns 0, 3 on timeout, 5 when no open connection has work
 * left (the server closed them) before `n` were answered. */
static int run_phase(conn_t *cs, int ep, uint64_t n, uint64_t deadline) {
    G.target = G.sent + n;
    for (int i = 0; i < G.conns; i++) {
        if (!cs[i].open) continue;
        conn_send(&cs[i], G.inflight);
        conn_flush(&cs[i], ep);
        if (!cs[i].open) conn_close(&cs[i], ep);
    }
    struct epoll_event evs[256];
    while (G.done < G.target) {
        int open = 0, busy = 0;
        for (int i = 0; i < G.conns; i++) {
            open += cs[i].open;
            busy += cs[i].open && (cs[i].inflight > 0 || cs[i].hello_pending);
        }
        if (!open || !busy) return 5;
        uint64_t t = now_ns();
        if (t >= deadline) return 3;
        int ms = (int)((deadline - t) / 1000000u) + 1;
        int k = epoll_wait(ep, evs, 256, ms > 1000 ? 1000 : ms);
        if (k < 0 && errno != EINTR) die(1, "epoll_wait failed");
        for (int j = 0; j < k; j++) {
            conn_t *c = evs[j].data.ptr;
            if (!c->open) continue;
            if (evs[j].events & EPOLLOUT) {
                conn_flush(c, ep);
                if (!c->open) { conn_close(c, ep); continue; }
                if (c->wlen == 0) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            if (!(evs[j].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            ssize_t r = recv(c->fd, c->rbuf + c->rend, RBUF - c->rend, 0);
            uint64_t tr = now_ns();
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                conn_close(c, ep);
                continue;
            }
            c->rend += (size_t)r;
            int freed = conn_parse(c, tr);
            if (!c->open) { conn_close(c, ep); continue; }
            if (freed) { conn_send(c, freed); conn_flush(c, ep); }
            if (!c->open) conn_close(c, ep);
        }
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* numpy's default (linear) percentile of sorted xs, in us */
static double pct(const uint64_t *xs, uint64_t n, double q) {
    if (!n) return 0.0;
    double pos = q / 100.0 * (double)(n - 1);
    uint64_t lo = (uint64_t)pos;
    uint64_t hi = lo + 1 < n ? lo + 1 : lo;
    return ((double)xs[lo] + (pos - (double)lo) * ((double)xs[hi] - (double)xs[lo])) / 1e3;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --port P --model M [--host H] [--conns N] [--inflight K] [--warmup W] "
                    "[--count C] [--token T] [--hello] [--cols N] [--timeout S] [--server-pid PID]\n");
    exit(2);
}

int main(int argc, char **argv) {
    G.host = "127.0.0.1"; G.conns = 1; G.inflight = 1; G.cols = 64; G.count = 1000; G.timeout_s = 60;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && ++i)
        if (OPT("--host")) G.host = v;
        else if (OPT("--port")) G.port = v;
        else if (OPT("--model")) G.model = v;
        else if (OPT("--conns")) G.conns = atoi(v);
        else if (OPT("--inflight")) G.inflight = atoi(v);
        else if (OPT("--warmup")) G.warmup = strtoull(v, NULL, 10);
        else if (OPT("--count")) G.count = strtoull(v, NULL, 10);
        else if (OPT("--token")) { G.token = v; G.hello = 1; }
        else if (OPT("--cols")) G.cols = atoi(v);
        else if (OPT("--timeout")) G.timeout_s = atof(v);
        else if (OPT("--server-pid")) G.server_pid = atoi(v);
        else if (strcmp(a, "--hello") == 0) G.hello = 1;
        else usage();
#undef OPT
    }
    if (!G.port || !G.model || G.conns < 1 || G.conns > 4096 || G.inflight < 1 || G.inflight > MAX_SLOTS ||
        G.cols < 1 || G.cols > (1 << 20) || G.count < 1 || G.timeout_s <= 0)
        usage();
    build_template();
    G.lat = malloc(sizeof(uint64_t) * G.count);
    conn_t *cs = calloc((size_t)G.conns, sizeof *cs);
    int ep = epoll_create1(0);
    if (!G.lat || !cs || ep < 0) die(1, "out of memory");
    uint64_t deadline = now_ns() + (uint64_t)(G.timeout_s * 1e9);
    for (int i = 0; i < G.conns; i++) {
        conn_t *c = &cs[i];
        c->fd = connect_one();
        if (c->fd < 0) die(4, "could not connect");
        c->open = 1;
        c->rbuf = malloc(RBUF);
        c->slot_id = calloc((size_t)G.inflight, sizeof(uint64_t));
        c->slot_t = calloc((size_t)G.inflight, sizeof(uint64_t));
        c->free_slots = malloc(sizeof(int) * (size_t)G.inflight);
        for (int s = 0; s < G.inflight; s++) c->free_slots[s] = G.inflight - 1 - s;
        c->nfree = G.inflight;
        c->seq = 1; /* id 1 << 16 | slot and up; id 1 is the hello */
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        if (G.hello) {
            buf_t h = {0}, f = {0};
            put1(&h, G.token ? 0x84 : 0x83);
            put_str(&h, "id"); put_uint(&h, 1);
            put_str(&h, "op"); put_str(&h, "hello");
            put_str(&h, "protocol"); put_uint(&h, 1);
            if (G.token) { put_str(&h, "token"); put_str(&h, G.token); }
            frame_finish(&h, NULL, 0, &f);
            conn_queue(c, f.p, f.n);
            c->hello_pending = 1;
            free(h.p); free(f.p);
        }
    }
    int rc = 0;
    if (G.warmup) rc = run_phase(cs, ep, G.warmup, deadline);
    struct rusage ru0, ru1;
    sched_t d0 = sched_tree((int)getpid()), s0 = sched_tree(G.server_pid);
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t0 = now_ns();
    G.measuring = 1;
    if (!rc) rc = run_phase(cs, ep, G.count, deadline);
    uint64_t t1 = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    sched_t s1 = sched_tree(G.server_pid), d1 = sched_tree((int)getpid());
    for (int i = 0; i < G.conns; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);

    qsort(G.lat, G.nlat, sizeof(uint64_t), cmp_u64);
    double el = (double)(t1 - t0) / 1e9, sum = 0;
    for (uint64_t i = 0; i < G.nlat; i++) sum += (double)G.lat[i];
    double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    uint64_t answered = G.ok;
    for (int i = 0; i < G.ncodes; i++) answered += G.codes[i].n;
    printf("{\"conns\": %d, \"inflight\": %d, \"requests\": %llu, \"answered\": %llu, \"ok\": %llu, "
           "\"errors\": {", G.conns, G.inflight, (unsigned long long)G.count, (unsigned long long)answered,
           (unsigned long long)G.ok);
    for (int i = 0; i < G.ncodes; i++)
        printf("%s\"%s\": %llu", i ? ", " : "", G.codes[i].code, (unsigned long long)G.codes[i].n);
    printf("}, \"unknown_id\": %llu, \"bad_frames\": %llu, \"closed\": %llu, \"lost\": %llu, \"ended\": \"%s\", "
           "\"elapsed_s\": %.6f, \"throughput_rps\": %.1f, "
           "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, \"max_us\": %.2f, "
           "\"min_us\": %.2f, \"mean_us\": %.2f, \"driver_busy\": %.4f, \"driver_runq_wait\": %.4f, \"digest\": \"%016llx\"",
           (unsigned long long)G.unknown_id, (unsigned long long)G.bad_frames, (unsigned long long)G.closed,
           (unsigned long long)G.lost, rc == 0 ? "done" : rc == 3 ? "timeout" : "closed", el, el > 0 ? (double)answered / el : 0.0,
           pct(G.lat, G.nlat, 50), pct(G.lat, G.nlat, 90), pct(G.lat, G.nlat, 99), pct(G.lat, G.nlat, 99.9),
           G.nlat ? (double)G.lat[G.nlat - 1] / 1e3 : 0.0, G.nlat ? (double)G.lat[0] / 1e3 : 0.0,
           G.nlat ? sum / (double)G.nlat / 1e3 : 0.0, el > 0 ? cpu / el : 0.0,
           el > 0 ? (double)(d1.wait - d0.wait) / 1e9 / el : 0.0,
           (unsigned long long)G.digest);
    if (G.server_pid > 0 && answered) {
        double n = (double)answered;
        printf(", \"server_threads\": %d, \"server_cpu_us_per_req\": %.3f, \"server_main_cpu_us_per_req\": %.3f, "
               "\"server_other_cpu_us_per_req\": %.3f, \"server_runq_wait_us_per_req\": %.3f, "
               "\"server_switches_per_req\": %.3f",
               s1.threads, (double)(s1.run - s0.run) / 1e3 / n, (double)(s1.main_run - s0.main_run) / 1e3 / n,
               (double)((s1.run - s1.main_run) - (s0.run - s0.main_run)) / 1e3 / n,
               (double)(s1.wait - s0.wait) / 1e3 / n, (double)(s1.slices - s0.slices) / n);
    }
    printf("}\n");
    return rc;
}
