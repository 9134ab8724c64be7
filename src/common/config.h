/* config: one table of options per program (flag, environment variable, default,
 * help). Parsing fills the caller's variables; --help and the README reference are
 * generated from the same table. Owns nothing after parsing returns. */
#ifndef PGD_CONFIG_H
#define PGD_CONFIG_H

#include <stddef.h>
#include <stdio.h>

typedef enum {
    CONFIG_STRING,   /* target: const char ** (points into argv/environ or the default) */
    CONFIG_INT,      /* target: long * */
    CONFIG_DOUBLE,   /* target: double * */
    CONFIG_BOOL,     /* target: bool *; flag takes no value; env accepts 1/0/true/false */
} config_type_t;

typedef struct {
    const char *flag;          /* long flag without dashes: "max-concurrency" */
    const char *env;           /* environment variable: "PGDISPATCH_MAX_CONCURRENCY" */
    config_type_t type;
    void *target;
    const char *default_value; /* as text; NULL for "unset" (string NULL, int 0) */
    long min, max;             /* CONFIG_INT only: inclusive range, checked; 0, 0 = no range */
    const char *help;
} config_option_t;

typedef enum {
    CONFIG_OK = 0,
    CONFIG_EXIT_HELP,   /* --help printed: exit 0 */
    CONFIG_ERROR,       /* message in err: exit 2 */
} config_result_t;

/* Precedence: flag > environment > default. Accepts --flag value and --flag=value.
 * Unknown flags, missing values, bad numbers and out-of-range ints are errors whose
 * message names the flag and its environment variable. An empty environment variable
 * counts as unset. A bool flag takes no separate value; --flag=false is accepted.
 * --help (or -h) anywhere prints help to stdout and returns CONFIG_EXIT_HELP. */
config_result_t config_parse(const config_option_t *options, size_t count, int argc, char **argv,
                             const char *usage, char *err, size_t errlen);

/* --help text: usage line, then one entry per option with env var and default. */
void config_print_help(FILE *out, const config_option_t *options, size_t count, const char *usage);

/* A Markdown table (flag | env | default | meaning) for the README reference. */
void config_print_markdown(FILE *out, const config_option_t *options, size_t count);

#endif
