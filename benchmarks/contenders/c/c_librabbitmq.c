/*
 * The C ceiling: the benchmark's workloads on librabbitmq (rabbitmq-c), single-threaded.
 *
 * Built by benchmarks/run.py (cc -O2 ... -lrabbitmq) into a cache directory; speaks the
 * contender protocol of benchmarks/README.md exactly:
 *
 *   c_librabbitmq --describe
 *   c_librabbitmq <scenario> --n N --queue Q --queue-type classic|quorum [--mode M] ...
 *       one JSON line on stdout; exit 1 and a message on stderr on failure
 *   c_librabbitmq produce --queue Q --n N --rate R     (the latency scenario's paced producer)
 *
 * consume: prefetch 256, the "handler" finds the body's "id" field, then one basic.ack per
 *     message (no multiple=True).
 * mixed: as consume, but a message with id % 500 == 0 "sleeps" 100 ms: its delivery stays
 *     unacked on a FIFO timer list (all delays are equal, so FIFO order is due order) while
 *     the loop goes on consuming; it is acked when its 100 ms are up.
 * publish: persistent ~256-byte JSON, publisher confirms, windows of 256 in flight.
 * retry: the delayed retry by hand as aiormq_raw does it: a failed first attempt is copied
 *     persistent and mandatory (x-attempt: 2) to {queue}.retry (TTL 50 ms, dead-lettering back)
 *     on a confirm channel and acked only after its confirm; up to 256 copies in flight.
 * rss: consume, VmRSS sampled every 50 ms.
 * latency: consume; at handler start, CLOCK_REALTIME now minus the body's "sent_ns" (stamped by
 *     the producer with CLOCK_REALTIME, comparable with Python's time.time_ns()).
 *
 * Timing: CLOCK_MONOTONIC (Python's time.perf_counter on Linux) and CLOCK_PROCESS_CPUTIME_ID
 * (time.process_time), the same clocks benchlib uses.  The password in --url never reaches
 * stderr or stdout.
 */
#define _GNU_SOURCE
#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define SLOW_EVERY 500
#define SLOW_SECONDS 0.1
#define RETRY_TTL_MS 50
#define CH 1     /* consume (and plain publish) channel */
#define PUB_CH 2 /* retry copies: confirm channel */

static const char *NAME = "c_librabbitmq";

/* ------------------------------------------------------------------ options */

struct opts {
    const char *scenario, *phase, *queue, *queue_type, *mode, *url;
    long n, prefetch, window;
    double rate;
};

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", NAME);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void check_reply(amqp_rpc_reply_t r, const char *what) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return;
    case AMQP_RESPONSE_NONE:
        die("%s: missing RPC reply", what);
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        die("%s: %s", what, amqp_error_string2(r.library_error));
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            die("%s: channel closed by the broker: %u %.*s", what, m->reply_code,
                (int)m->reply_text.len, (char *)m->reply_text.bytes);
        }
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            die("%s: connection closed by the broker: %u %.*s", what, m->reply_code,
                (int)m->reply_text.len, (char *)m->reply_text.bytes);
        }
        die("%s: server exception, method 0x%08X", what, r.reply.id);
    }
}

static void check_status(int status, const char *what) {
    if (status != AMQP_STATUS_OK) die("%s: %s", what, amqp_error_string2(status));
}

/* ------------------------------------------------------------------ clocks */

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static double mono(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }
static int64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long rss_kb(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = 0;
    size_t len = strlen(field);
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, len) == 0) {
            v = strtol(line + len, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

/* ------------------------------------------------------------------ connection */

static amqp_connection_state_t connect_url(const char *url) {
    char *copy = strdup(url);
    struct amqp_connection_info ci;
    amqp_default_connection_info(&ci);
    if (amqp_parse_url(copy, &ci) != AMQP_STATUS_OK) die("cannot parse --url");
    if (ci.ssl) die("amqps:// is not supported");
    if (!ci.vhost || !*ci.vhost) ci.vhost = "/"; /* "amqp://host/" means "/", as aiormq reads it */
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) die("cannot create a socket");
    check_status(amqp_socket_open(sock, ci.host, ci.port), "connect");
    check_reply(amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password),
                "login");
    memset(copy, 0, strlen(url)); /* the password leaves memory with the URL copy */
    free(copy);
    amqp_channel_open(conn, CH);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");
    return conn;
}

static void disconnect(amqp_connection_state_t conn) {
    amqp_channel_close(conn, CH, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
}

/* ------------------------------------------------------------------ message body */

static const char PAD[] =
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"; /* 152, as benchlib._PAD */

/* benchlib.make_message(i) as orjson writes it (~256 bytes); sent_ns >= 0 adds the stamp. */
static size_t make_body(char *buf, size_t cap, long i, int64_t sent_ns) {
    int k;
    if (sent_ns >= 0)
        k = snprintf(buf, cap,
                     "{\"id\":%ld,\"sent_ns\":%lld,\"kind\":\"bench.event\",\"ts\":%.3f,"
                     "\"tags\":[\"alpha\",\"beta\",\"gamma\"],\"ok\":true,\"pad\":\"%.*s\"}",
                     i, (long long)sent_ns, 1700000000.0 + i / 1000.0, 128, PAD);
    else
        k = snprintf(buf, cap,
                     "{\"id\":%ld,\"kind\":\"bench.event\",\"ts\":%.3f,"
                     "\"tags\":[\"alpha\",\"beta\",\"gamma\"],\"ok\":true,\"pad\":\"%s\"}",
                     i, 1700000000.0 + i / 1000.0, PAD);
    return (size_t)k;
}

/* The handler's minimal JSON parse: the integer value of "key" in the body, or -1. */
static long long json_int(const amqp_bytes_t body, const char *key, size_t keylen) {
    const char *p = memmem(body.bytes, body.len, key, keylen);
    if (!p) return -1;
    const char *end = (const char *)body.bytes + body.len;
    p += keylen;
    while (p < end && (*p == ' ' || *p == ':')) p++;
    long long v = 0;
    int any = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0'), any = 1;
    return any ? v : -1;
}
#define BODY_ID(b) json_int((b), "\"id\"", 4)
#define BODY_SENT(b) json_int((b), "\"sent_ns\"", 9)

static amqp_basic_properties_t json_props(void) {
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.content_type = amqp_cstring_bytes("application/json");
    p.delivery_mode = 2;
    return p;
}

/* ------------------------------------------------------------------ results */

static double t0, cpu0;
static double t_first, cpu_first, t_end, cpu_end;
static long handled;

static void start_clock(void) {
    cpu0 = cpu();
    t0 = mono();
}

static void hit(long n) {
    handled++;
    if (handled == 1) {
        t_first = mono();
        cpu_first = cpu();
    }
    if (handled == n) {
        cpu_end = cpu();
        t_end = mono();
    }
}

static void print_result(const struct opts *o, int counted, const char *extra) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double total = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                   ru.ru_stime.tv_usec / 1e6;
    double seconds = t_end - t0;
    printf("{\"contender\":\"%s\",\"scenario\":\"%s\",\"n\":%ld,\"queue_type\":\"%s\",\"pid\":%d,"
           "\"seconds\":%.9f,\"rate\":%.3f,\"cpu_us_per_msg\":%.4f",
           NAME, o->scenario, o->n, o->queue_type, (int)getpid(), seconds, o->n / seconds,
           (cpu_end - cpu0) / o->n * 1e6);
    if (counted) {
        printf(",\"first_s\":%.9f,\"first_cpu_us_per_msg\":%.4f", t_first - t0,
               (cpu_first - cpu0) / o->n * 1e6);
        if (o->n > 1 && t_end > t_first) printf(",\"steady_rate\":%.3f", (o->n - 1) / (t_end - t_first));
        printf(",\"clock\":{\"start\":%.9f,\"first\":%.9f,\"end\":%.9f}", t0, t_first, t_end);
    }
    if (extra) printf(",%s", extra);
    printf(",\"cpu_total_s\":%.6f}\n", total);
    fflush(stdout);
}

/* ------------------------------------------------------------------ consume */

/* Deliveries held back by a "sleeping" handler, in due order (every delay is the same). */
struct held {
    uint64_t tag;
    double due;
};

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Percentile p (0..1) of sorted xs, nearest rank: the same rule as benchlib.percentile. */
static int64_t pct(const int64_t *xs, long n, double p) {
    long k = (long)(p * n + 0.999999999);
    if (k < 1) k = 1;
    if (k > n) k = n;
    return xs[k - 1];
}

static void consume(const struct opts *o, int mixed, int rss, int latency) {
    const long n = o->n;
    struct held *held = mixed ? calloc((size_t)n / SLOW_EVERY + 2, sizeof *held) : NULL;
    long held_head = 0, held_tail = 0;
    int64_t *lat = latency ? malloc((size_t)n * sizeof *lat) : NULL;
    long lat_n = 0;
    long rss_start = rss ? rss_kb("VmRSS:") : 0, rss_warm = 0, rss_peak = rss_start;
    double next_sample = 0;

    start_clock();
    amqp_connection_state_t conn = connect_url(o->url);
    amqp_basic_qos(conn, CH, 0, (uint16_t)o->prefetch, 0);
    check_reply(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume_ok_t *ok =
        amqp_basic_consume(conn, CH, amqp_cstring_bytes(o->queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume");
    amqp_bytes_t ctag = amqp_bytes_malloc_dup(ok->consumer_tag);

    while (handled < n) {
        struct timeval tv, *timeout = NULL;
        if (held_head < held_tail) {
            double now = mono();
            while (held_head < held_tail && held[held_head].due <= now) {
                check_status(amqp_basic_ack(conn, CH, held[held_head++].tag, 0), "basic.ack");
                hit(n);
            }
            if (handled >= n) break;
            if (held_head < held_tail) {
                double wait = held[held_head].due - now;
                tv.tv_sec = (time_t)wait;
                tv.tv_usec = (suseconds_t)((wait - (double)tv.tv_sec) * 1e6) + 1;
                timeout = &tv;
            }
        }
        amqp_envelope_t env;
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t r = amqp_consume_message(conn, &env, timeout, 0);
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT)
            continue;
        check_reply(r, "consume");

        /* the handler */
        int64_t start_ns = latency ? realtime_ns() : 0;
        long long id = BODY_ID(env.message.body);
        if (id < 0) die("delivery %llu has no id in its body", (unsigned long long)env.delivery_tag);
        if (latency) {
            long long sent = BODY_SENT(env.message.body);
            if (sent < 0) die("latency: delivery without sent_ns");
            lat[lat_n++] = start_ns - sent;
        }
        if (mixed && id % SLOW_EVERY == 0) {
            held[held_tail].tag = env.delivery_tag;
            held[held_tail++].due = mono() + SLOW_SECONDS;
        } else {
            check_status(amqp_basic_ack(conn, CH, env.delivery_tag, 0), "basic.ack");
            hit(n);
        }
        amqp_destroy_envelope(&env);

        if (rss) {
            if (handled == (n / 10 > 1 ? n / 10 : 1) && !rss_warm) rss_warm = rss_kb("VmRSS:");
            double now = mono();
            if (now >= next_sample) {
                long kb = rss_kb("VmRSS:");
                if (kb > rss_peak) rss_peak = kb;
                next_sample = now + 0.05;
            }
        }
    }

    amqp_basic_cancel(conn, CH, ctag);
    check_reply(amqp_get_rpc_reply(conn), "basic.cancel");
    amqp_bytes_free(ctag);
    disconnect(conn);

    char extra[512] = "";
    if (rss) {
        long end = rss_kb("VmRSS:"), hwm = rss_kb("VmHWM:");
        if (!rss_warm) rss_warm = rss_start;
        if (end > rss_peak) rss_peak = end;
        snprintf(extra, sizeof extra,
                 "\"rss_start_kb\":%ld,\"rss_warm_kb\":%ld,\"rss_end_kb\":%ld,\"rss_peak_sampled_kb\":%ld,"
                 "\"hwm_kb\":%ld,\"growth_kb\":%ld,\"rss_samples\":[]",
                 rss_start, rss_warm, end, rss_peak, hwm, end - rss_warm);
    }
    if (latency) {
        /* the first 10% are the start-up (connection, first window): left out */
        long skip = lat_n / 10;
        int64_t *xs = lat + skip;
        long m = lat_n - skip;
        qsort(xs, (size_t)m, sizeof *xs, cmp_i64);
        snprintf(extra, sizeof extra,
                 "\"lat_n\":%ld,\"p50_us\":%.3f,\"p99_us\":%.3f,\"p999_us\":%.3f,\"max_us\":%.3f", m,
                 pct(xs, m, 0.5) / 1e3, pct(xs, m, 0.99) / 1e3, pct(xs, m, 0.999) / 1e3, xs[m - 1] / 1e3);
    }
    print_result(o, 1, extra[0] ? extra : NULL);
    free(held);
    free(lat);
}

/* ------------------------------------------------------------------ publish */

/* Reads frames until every publish up to `upto` is confirmed; `*confirmed` is the highest tag. */
static void await_confirms(amqp_connection_state_t conn, amqp_channel_t ch, uint64_t upto, uint64_t *confirmed) {
    while (*confirmed < upto) {
        amqp_frame_t f;
        check_status(amqp_simple_wait_frame(conn, &f), "wait for confirms");
        if (f.frame_type != AMQP_FRAME_METHOD || f.channel != ch) continue;
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            if (!a->multiple && a->delivery_tag != *confirmed + 1)
                die("out-of-order confirm %llu", (unsigned long long)a->delivery_tag);
            *confirmed = a->delivery_tag;
            break;
        }
        case AMQP_BASIC_NACK_METHOD:
            die("publish nacked by the broker");
        case AMQP_BASIC_RETURN_METHOD:
            die("publish returned by the broker");
        case AMQP_CHANNEL_CLOSE_METHOD:
            die("channel closed by the broker while publishing");
        }
    }
}

static void publish(const struct opts *o) {
    amqp_connection_state_t conn = connect_url(o->url);
    amqp_confirm_select(conn, CH);
    check_reply(amqp_get_rpc_reply(conn), "confirm.select");
    amqp_basic_properties_t props = json_props();
    amqp_bytes_t rk = amqp_cstring_bytes(o->queue);
    char buf[512];
    uint64_t confirmed = 0;

    start_clock();
    for (long start = 0; start < o->n; start += o->window) {
        long end = start + o->window < o->n ? start + o->window : o->n;
        for (long i = start; i < end; i++) {
            amqp_bytes_t body = {make_body(buf, sizeof buf, i, -1), buf};
            check_status(amqp_basic_publish(conn, CH, amqp_empty_bytes, rk, 0, 0, &props, body), "publish");
        }
        await_confirms(conn, CH, (uint64_t)end, &confirmed);
    }
    cpu_end = cpu();
    t_end = mono();
    disconnect(conn);
    print_result(o, 0, NULL);
}

/* ------------------------------------------------------------------ retry */

static amqp_table_entry_t entry_str(const char *k, const char *v) {
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(k);
    e.value.kind = AMQP_FIELD_KIND_UTF8;
    e.value.value.bytes = amqp_cstring_bytes(v);
    return e;
}

static amqp_table_entry_t entry_int(const char *k, int64_t v) {
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(k);
    e.value.kind = AMQP_FIELD_KIND_I64;
    e.value.value.i64 = v;
    return e;
}

static int64_t attempt_of(const amqp_basic_properties_t *p) {
    if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG)) return 1;
    for (int i = 0; i < p->headers.num_entries; i++) {
        amqp_table_entry_t *e = &p->headers.entries[i];
        if (e->key.len == 9 && memcmp(e->key.bytes, "x-attempt", 9) == 0) {
            switch (e->value.kind) {
            case AMQP_FIELD_KIND_I8: return e->value.value.i8;
            case AMQP_FIELD_KIND_U8: return e->value.value.u8;
            case AMQP_FIELD_KIND_I16: return e->value.value.i16;
            case AMQP_FIELD_KIND_U16: return e->value.value.u16;
            case AMQP_FIELD_KIND_I32: return e->value.value.i32;
            case AMQP_FIELD_KIND_U32: return e->value.value.u32;
            case AMQP_FIELD_KIND_I64: return e->value.value.i64;
            case AMQP_FIELD_KIND_U64: return (int64_t)e->value.value.u64;
            default: return 1;
            }
        }
    }
    return 1;
}

static void retry(const struct opts *o) {
    int fail_once;
    if (strcmp(o->mode, "fail_once") == 0)
        fail_once = 1;
    else if (strcmp(o->mode, "all_ok") == 0)
        fail_once = 0;
    else
        die("retry needs --mode fail_once|all_ok, got '%s'", o->mode);
    const long n = o->n;
    char retry_queue[1024];
    snprintf(retry_queue, sizeof retry_queue, "%s.retry", o->queue);
    /* publish seq -> the delivery tag it copies (at most `prefetch` copies are in flight) */
    uint64_t ring = (uint64_t)o->prefetch * 2;
    uint64_t *copy_of = calloc(ring, sizeof *copy_of);
    uint64_t published = 0, confirmed = 0;

    start_clock();
    amqp_connection_state_t conn = connect_url(o->url);
    amqp_channel_open(conn, PUB_CH);
    check_reply(amqp_get_rpc_reply(conn), "channel.open");
    amqp_confirm_select(conn, PUB_CH);
    check_reply(amqp_get_rpc_reply(conn), "confirm.select");

    amqp_table_entry_t args[7];
    int na = 0;
    args[na++] = entry_str("x-queue-type", o->queue_type);
    if (strcmp(o->queue_type, "quorum") == 0) {
        args[na++] = entry_str("x-dead-letter-strategy", "at-least-once");
        args[na++] = entry_str("x-overflow", "reject-publish");
    }
    args[na++] = entry_int("x-message-ttl", RETRY_TTL_MS);
    args[na++] = entry_str("x-dead-letter-exchange", "");
    args[na++] = entry_str("x-dead-letter-routing-key", o->queue);
    amqp_table_t qargs = {na, args};
    amqp_queue_declare(conn, CH, amqp_cstring_bytes(retry_queue), 0, 1, 0, 0, qargs);
    check_reply(amqp_get_rpc_reply(conn), "queue.declare retry queue");
    amqp_basic_qos(conn, CH, 0, (uint16_t)o->prefetch, 0);
    check_reply(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume_ok_t *ok =
        amqp_basic_consume(conn, CH, amqp_cstring_bytes(o->queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "basic.consume");
    amqp_bytes_t ctag = amqp_bytes_malloc_dup(ok->consumer_tag);
    amqp_bytes_t rq = amqp_cstring_bytes(retry_queue);

    while (handled < n) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t r = amqp_consume_message(conn, &env, NULL, 0);
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
            /* not a delivery: the confirms (or a return) of the retry copies */
            amqp_frame_t f;
            check_status(amqp_simple_wait_frame(conn, &f), "wait frame");
            if (f.frame_type != AMQP_FRAME_METHOD) continue;
            if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
                amqp_basic_ack_t *a = f.payload.method.decoded;
                uint64_t upto = a->delivery_tag;
                if (!a->multiple && upto != confirmed + 1) die("out-of-order confirm");
                for (uint64_t s = confirmed + 1; s <= upto; s++)
                    check_status(amqp_basic_ack(conn, CH, copy_of[s % ring], 0), "basic.ack");
                confirmed = upto;
                continue;
            }
            if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) die("retry copy nacked");
            if (f.payload.method.id == AMQP_BASIC_RETURN_METHOD) die("retry copy returned (unroutable)");
            die("unexpected method 0x%08X on channel %u", f.payload.method.id, f.channel);
        }
        check_reply(r, "consume");
        amqp_basic_properties_t *p = &env.message.properties;
        if (BODY_ID(env.message.body) < 0) die("delivery without id");
        int64_t attempt = attempt_of(p);
        if (fail_once && attempt == 1) {
            amqp_table_entry_t h[1] = {entry_int("x-attempt", attempt + 1)};
            amqp_basic_properties_t copy = json_props();
            copy._flags |= AMQP_BASIC_HEADERS_FLAG;
            copy.headers.num_entries = 1;
            copy.headers.entries = h;
            if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) copy.content_type = p->content_type;
            if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
                copy._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
                copy.message_id = p->message_id;
            }
            if (published - confirmed >= ring) die("more copies in flight than the prefetch allows");
            check_status(amqp_basic_publish(conn, PUB_CH, amqp_empty_bytes, rq, 1, 0, &copy, env.message.body),
                         "publish retry copy");
            published++;
            copy_of[published % ring] = env.delivery_tag;
        } else {
            check_status(amqp_basic_ack(conn, CH, env.delivery_tag, 0), "basic.ack");
            hit(n);
        }
        amqp_destroy_envelope(&env);
    }

    amqp_basic_cancel(conn, CH, ctag);
    check_reply(amqp_get_rpc_reply(conn), "basic.cancel");
    amqp_bytes_free(ctag);
    amqp_queue_delete(conn, CH, rq, 0, 0);
    check_reply(amqp_get_rpc_reply(conn), "queue.delete");
    amqp_channel_close(conn, PUB_CH, AMQP_REPLY_SUCCESS);
    disconnect(conn);
    print_result(o, 1, NULL);
    free(copy_of);
}

/* ------------------------------------------------------------------ paced producer */

/*
 * Publishes n messages at `rate` per second: message i is due at start + i / rate; the producer
 * sleeps (clock_nanosleep, absolute) until the next one is due, then sends every message that is
 * due by then, each stamped with CLOCK_REALTIME just before its publish.  Persistent, no
 * confirms (the producer must never be what limits the rate); closing the channel waits until
 * the broker has taken every publish.
 */
static void produce(const struct opts *o) {
    if (o->rate <= 0) die("produce needs --rate > 0");
    amqp_connection_state_t conn = connect_url(o->url);
    amqp_basic_properties_t props = json_props();
    amqp_bytes_t rk = amqp_cstring_bytes(o->queue);
    char buf[512];
    double max_lag = 0, lag_sum = 0;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    double s0 = start.tv_sec + start.tv_nsec / 1e9;
    cpu0 = cpu();
    t0 = s0;

    for (long i = 0; i < o->n; i++) {
        double due = s0 + i / o->rate;
        double now = mono();
        if (now < due) {
            struct timespec ts;
            ts.tv_sec = (time_t)due;
            ts.tv_nsec = (long)((due - (double)ts.tv_sec) * 1e9);
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
            }
            now = mono();
        }
        double lag = now - due;
        if (lag > max_lag) max_lag = lag;
        lag_sum += lag;
        amqp_bytes_t body = {make_body(buf, sizeof buf, i, realtime_ns()), buf};
        check_status(amqp_basic_publish(conn, CH, amqp_empty_bytes, rk, 0, 0, &props, body), "publish");
    }
    cpu_end = cpu();
    t_end = mono();
    disconnect(conn);
    char extra[256];
    snprintf(extra, sizeof extra, "\"offered_rate\":%.3f,\"lag_mean_us\":%.3f,\"lag_max_us\":%.3f", o->rate,
             lag_sum / o->n * 1e6, max_lag * 1e6);
    print_result(o, 0, extra);
}

/* ------------------------------------------------------------------ main */

static void describe(void) {
    printf("{\"name\":\"%s\",\"scenarios\":[\"consume\",\"latency\",\"mixed\",\"publish\",\"retry\",\"rss\"],"
           "\"import_module\":null,\"declares_own_queue\":false,\"native\":true,"
           "\"notes\":\"C on librabbitmq %s, single-threaded, -O2: the ceiling. One basic.ack per message after "
           "the handler (finds the body's id); mixed: a sleeping delivery stays unacked on a timer list while "
           "the loop goes on; retry: the same delayed retry by hand as aiormq_raw (persistent mandatory copy "
           "to a %d ms TTL queue, ack after its confirm)\","
           "\"cleanup\":{\"queues\":[\"{queue}\",\"{queue}.retry\"]}}\n",
           NAME, amqp_version(), RETRY_TTL_MS);
}

int main(int argc, char **argv) {
    struct opts o = {NULL, "run", NULL, "classic", "", NULL, 10000, 256, 256, 0};
    const char *env_url = getenv("BENCH_AMQP_URL");
    o.url = env_url ? env_url : "amqp://guest:guest@127.0.0.1:5672/";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(flag) (strcmp(a, flag) == 0 && v && (i++, 1))
        if (strcmp(a, "--describe") == 0) {
            describe();
            return 0;
        } else if (OPT("--n"))
            o.n = atol(v);
        else if (OPT("--queue"))
            o.queue = v;
        else if (OPT("--queue-type"))
            o.queue_type = v;
        else if (OPT("--prefetch"))
            o.prefetch = atol(v);
        else if (OPT("--window"))
            o.window = atol(v);
        else if (OPT("--mode"))
            o.mode = v;
        else if (OPT("--phase"))
            o.phase = v;
        else if (OPT("--url"))
            o.url = v;
        else if (OPT("--rate"))
            o.rate = atof(v);
        else if (OPT("--app-name"))
            ;
        else if (a[0] != '-' && !o.scenario)
            o.scenario = a;
        else
            die("unknown argument %s", a);
#undef OPT
    }
    if (!o.scenario) die("scenario required");
    if (strcmp(o.phase, "run") != 0) die("%s has no %s phase", NAME, o.phase);
    if (!o.queue) die("--queue required");
    if (strcmp(o.queue_type, "classic") != 0 && strcmp(o.queue_type, "quorum") != 0)
        die("--queue-type: classic or quorum");
    if (o.n <= 0 || o.prefetch <= 0 || o.prefetch > 65535 || o.window <= 0) die("bad --n/--prefetch/--window");
    if (strcmp(o.scenario, "consume") == 0)
        consume(&o, 0, 0, 0);
    else if (strcmp(o.scenario, "mixed") == 0)
        consume(&o, 1, 0, 0);
    else if (strcmp(o.scenario, "rss") == 0)
        consume(&o, 0, 1, 0);
    else if (strcmp(o.scenario, "latency") == 0)
        consume(&o, 0, 0, 1);
    else if (strcmp(o.scenario, "publish") == 0)
        publish(&o);
    else if (strcmp(o.scenario, "retry") == 0)
        retry(&o);
    else if (strcmp(o.scenario, "produce") == 0)
        produce(&o);
    else {
        fprintf(stderr, "%s: scenario '%s' not supported\n", NAME, o.scenario);
        return 2;
    }
    return 0;
}
