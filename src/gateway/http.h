/* http: the gateway's HTTP front end on libmicrohttpd: routing, body limits,
 * validation, and the suspend/resume hand-off of each request to the dispatcher.
 * Owns the MHD daemon and every per-request context (freed in the completed
 * callback, never earlier). */
#ifndef PGD_GATEWAY_HTTP_H
#define PGD_GATEWAY_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dispatcher.h"

typedef struct http_server http_server_t;

typedef struct {
    const char *listen;          /* "host:port", "[v6]:port" or ":port" */
    unsigned threads;            /* MHD polling threads (1: one epoll thread) */
    unsigned max_connections;
    unsigned max_keepalive;      /* most connections kept open after a response (0: none) */
    size_t max_body_bytes;
    int64_t request_timeout_ms;  /* default X-Request-Timeout */
    bool require_api_key;
    dispatcher_t *dispatcher;    /* borrowed; must outlive the server */
} http_options_t;

/* Bind and start serving. NULL with err filled (bad address, port in use). */
http_server_t *http_server_start(const http_options_t *opt, char *err, size_t errlen);

/* Stop accepting connections; requests on connections already open get 503. */
void http_server_quiesce(http_server_t *s);

/* Connections open now (waiting, sending or idle keep-alive). */
unsigned http_server_connections(http_server_t *s);

/* Stop the daemon and free the server. Every request handed to the dispatcher must
 * have been given back first (dispatcher_stop does that). */
void http_server_stop(http_server_t *s);

/* Parse "host:port" for --listen: host may be empty (all addresses), a name, an
 * IPv4 address or a bracketed IPv6 address. Returns false on a bad value. */
bool http_parse_listen(const char *listen, char *host, size_t hostlen, char *port, size_t portlen);

#endif
