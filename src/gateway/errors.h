/* errors: what the client sees when something is refused or a job ends badly:
 * SQLSTATE and job outcome to HTTP status, and the OpenAI error body
 * {"error": {"message", "type", "code"}}. Pure functions; no state. */
#ifndef PGD_GATEWAY_ERRORS_H
#define PGD_GATEWAY_ERRORS_H

#include <stdbool.h>
#include <stdint.h>

#include "call.h"

/* The OpenAI error body as a malloc'd NUL-terminated string (NULL only when out of
 * memory). type and code may be NULL (code is then JSON null). */
char *errors_body(const char *message, const char *type, const char *code);

/* The OpenAI error type for an HTTP status: invalid_request_error,
 * authentication_error, rate_limit_error, timeout_error or server_error. */
const char *errors_type_for_status(int status);

/* Fill r (replacing any body it held) with status and an OpenAI error body whose
 * message is printf-formatted. code names the condition ("model_not_found"). */
void errors_reply(gw_reply_t *r, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The HTTP status for a SQLSTATE from the control plane: 22023 -> 400, PD001 -> 404,
 * PD002 -> 503, PD003 -> 429, PD007 -> 404, PD008 -> 409, "" (connection lost) -> 503,
 * anything else -> 500. */
int errors_status_for_sqlstate(const char *sqlstate);

/* Fill r from a refused submit element or a failed statement: status from the
 * SQLSTATE, the database's message, Retry-After: 1 for a full queue. */
void errors_reply_sqlstate(gw_reply_t *r, const char *sqlstate, const char *message);

/* True for succeeded, failed, cancelled and expired. */
bool errors_state_is_final(const char *state);

/* Fill r with the answer to a synchronous request whose job reached a final state:
 * succeeded -> 200 and the stored result as the body; failed with a provider 4xx
 * (error.status) -> that status and the provider's body (error.body) as it came;
 * other failures -> 502 naming what went wrong; expired -> 504; cancelled -> 409.
 * result and error are the JSON texts from dispatch.results (either may be NULL).
 * Returns false (r untouched) when state is not final. */
bool errors_reply_outcome(gw_reply_t *r, int64_t job_id, const char *state, const char *result,
                          const char *error);

/* Release the body r holds and clear it. */
void errors_reply_clear(gw_reply_t *r);

#endif
