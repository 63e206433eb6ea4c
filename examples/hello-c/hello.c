/*
 * Flotilla example: the C twin of examples/hello, built with Debian's clang
 * and wasi-libc for wasm32-wasi (WASI preview 1).
 *
 * A long-running service that prints "<GREETING> #<n> from <argv[0]>" to
 * stdout every --interval-ms milliseconds, flushing each line so the agent
 * sees it at once.
 *
 * Build: make -C examples/hello-c     (output: examples/hello-c/build/hello.wasm)
 *
 * Options (each as "--flag value" or "--flag=value"):
 *   --interval-ms N       pause between lines (default 1000)
 *   --count N             exit after N lines (default: run forever)
 *   --exit-code C         exit status after the count (default 0)
 *   --fail-to-stderr MSG  print MSG to stderr before starting
 *
 * Environment: GREETING (default "hello from flotilla").
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_GREETING "hello from flotilla"
#define USAGE "usage: hello-c [--interval-ms N] [--count N] [--exit-code C] [--fail-to-stderr MSG]"

struct options {
    uint64_t interval_ms;
    bool has_count;
    uint64_t count;
    int exit_code;
    const char *fail_to_stderr;
};

/* Parses a non-negative decimal integer no larger than max; no sign, no spaces. */
static bool parse_u64(const char *s, uint64_t max, uint64_t *out) {
    if (s == NULL || *s < '0' || *s > '9') {
        return false;
    }
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v > max) {
        return false;
    }
    *out = (uint64_t)v;
    return true;
}

/* Parses argv[1..argc). On error writes a message to err and returns false. */
static bool parse_args(int argc, char **argv, struct options *o, char *err, size_t errlen) {
    *o = (struct options){.interval_ms = 1000, .has_count = false, .count = 0, .exit_code = 0, .fail_to_stderr = NULL};
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        char flag[32];
        const char *value = NULL;
        const char *eq = strchr(arg, '=');
        if (strncmp(arg, "--", 2) == 0 && eq != NULL && (size_t)(eq - arg) < sizeof flag) {
            memcpy(flag, arg, (size_t)(eq - arg));
            flag[eq - arg] = '\0';
            value = eq + 1;
        } else if (strlen(arg) < sizeof flag) {
            strcpy(flag, arg);
        } else {
            snprintf(err, errlen, "unknown argument: \"%s\"", arg);
            return false;
        }

        bool known = strcmp(flag, "--interval-ms") == 0 || strcmp(flag, "--count") == 0 ||
                     strcmp(flag, "--exit-code") == 0 || strcmp(flag, "--fail-to-stderr") == 0;
        if (!known) {
            snprintf(err, errlen, "unknown argument: \"%s\"", arg);
            return false;
        }
        if (value == NULL) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "%s needs a value", flag);
                return false;
            }
            value = argv[++i];
        }

        uint64_t n;
        if (strcmp(flag, "--interval-ms") == 0) {
            if (!parse_u64(value, UINT64_MAX, &n)) {
                snprintf(err, errlen, "--interval-ms: not a non-negative integer: \"%s\"", value);
                return false;
            }
            o->interval_ms = n;
        } else if (strcmp(flag, "--count") == 0) {
            if (!parse_u64(value, UINT64_MAX, &n)) {
                snprintf(err, errlen, "--count: not a non-negative integer: \"%s\"", value);
                return false;
            }
            o->has_count = true;
            o->count = n;
        } else if (strcmp(flag, "--exit-code") == 0) {
            if (!parse_u64(value, 255, &n)) {
                snprintf(err, errlen, "--exit-code: not an integer 0-255: \"%s\"", value);
                return false;
            }
            o->exit_code = (int)n;
        } else {
            o->fail_to_stderr = value;
        }
    }
    return true;
}

static void sleep_ms(uint64_t ms) {
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int main(int argc, char **argv) {
    const char *name = argc > 0 && argv[0] != NULL ? argv[0] : "hello-c";
    struct options opts;
    char err[256];
    if (!parse_args(argc, argv, &opts, err, sizeof err)) {
        fprintf(stderr, "hello-c: %s\n%s\n", err, USAGE);
        return 2;
    }
    const char *greeting = getenv("GREETING");
    if (greeting == NULL) {
        greeting = DEFAULT_GREETING;
    }

    if (opts.fail_to_stderr != NULL) {
        fprintf(stderr, "%s\n", opts.fail_to_stderr);
        fflush(stderr);
    }

    uint64_t n = 0;
    for (;;) {
        if (opts.has_count && n >= opts.count) {
            break;
        }
        n++;
        /* Stdout gone (e.g. the host closed it): nothing useful left to do. */
        if (printf("%s #%" PRIu64 " from %s\n", greeting, n, name) < 0 || fflush(stdout) != 0) {
            return 1;
        }
        if (opts.has_count && n >= opts.count) {
            break;
        }
        sleep_ms(opts.interval_ms);
    }
    return opts.exit_code;
}
