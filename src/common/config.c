/* config: fills a program's option table from defaults, the environment and argv (in
 * that order, so flags win), and prints --help and the README table from the same
 * table. Owns nothing: string targets point into argv, environ or the defaults. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Where a value came from, for error messages. */
typedef enum {
    CONFIG_SRC_DEFAULT,
    CONFIG_SRC_ENV,
    CONFIG_SRC_FLAG,
} config_source_t;

static void config_error(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void config_error(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* min == max == 0 means "no range" so a table may leave both out. */
static bool config_has_range(const config_option_t *o)
{
    return o->type == CONFIG_INT && !(o->min == 0 && o->max == 0);
}

static bool config_parse_bool(const char *text, bool *out)
{
    if (strcmp(text, "1") == 0 || strcasecmp(text, "true") == 0) {
        *out = true;
        return true;
    }
    if (strcmp(text, "0") == 0 || strcasecmp(text, "false") == 0) {
        *out = false;
        return true;
    }
    return false;
}

/* "--flag (ENV)", "--flag" or "ENV", whichever names exist, for messages. */
static void config_name(const config_option_t *o, char *buf, size_t len)
{
    if (o->flag && o->env)
        snprintf(buf, len, "--%s (%s)", o->flag, o->env);
    else if (o->flag)
        snprintf(buf, len, "--%s", o->flag);
    else
        snprintf(buf, len, "%s", o->env ? o->env : "?");
}

/* Converts text and stores it in the option's target. NULL text resets the target to
 * its zero value. Returns false with err naming the option and the source. */
static bool config_assign(const config_option_t *o, const char *text, config_source_t src,
                          char *err, size_t errlen)
{
    static const char *const from[] = {"default", "environment", "flag"};
    char name[160];
    char *end;

    config_name(o, name, sizeof name);
    switch (o->type) {
    case CONFIG_STRING:
        *(const char **)o->target = text;
        return true;

    case CONFIG_BOOL: {
        bool v = false;

        if (text && !config_parse_bool(text, &v)) {
            config_error(err, errlen, "%s: '%s' from %s is not a boolean (use 1, 0, true or false)",
                         name, text, from[src]);
            return false;
        }
        *(bool *)o->target = v;
        return true;
    }

    case CONFIG_INT: {
        long v = 0;

        if (text) {
            errno = 0;
            v = strtol(text, &end, 10);
            if (end == text || *end != '\0' || errno == ERANGE) {
                config_error(err, errlen, "%s: '%s' from %s is not an integer", name, text, from[src]);
                return false;
            }
            if (config_has_range(o) && (v < o->min || v > o->max)) {
                config_error(err, errlen, "%s: %ld from %s is out of range %ld..%ld", name, v,
                             from[src], o->min, o->max);
                return false;
            }
        }
        *(long *)o->target = v;
        return true;
    }

    case CONFIG_DOUBLE: {
        double v = 0.0;

        if (text) {
            errno = 0;
            v = strtod(text, &end);
            if (end == text || *end != '\0' || errno == ERANGE || !isfinite(v)) {
                config_error(err, errlen, "%s: '%s' from %s is not a number", name, text, from[src]);
                return false;
            }
        }
        *(double *)o->target = v;
        return true;
    }
    }
    config_error(err, errlen, "%s: unknown option type %d", name, (int)o->type);
    return false;
}

/* The option whose flag is the first len bytes of arg, or NULL. */
static const config_option_t *config_find(const config_option_t *options, size_t count,
                                          const char *arg, size_t len)
{
    for (size_t i = 0; i < count; i++) {
        const char *f = options[i].flag;

        if (f && strlen(f) == len && strncmp(f, arg, len) == 0)
            return &options[i];
    }
    return NULL;
}

static bool config_is_help(const char *arg)
{
    return strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0;
}

/* --help anywhere wins over everything else, even over a bad environment, so an
 * operator can always read the help. The environment is read with getenv; an empty
 * variable counts as unset (compose files often pass VAR= through). A bool flag takes
 * no separate value but accepts --flag=false to override the environment. */
config_result_t config_parse(const config_option_t *options, size_t count, int argc, char **argv,
                             const char *usage, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (config_is_help(argv[i])) {
            config_print_help(stdout, options, count, usage);
            return CONFIG_EXIT_HELP;
        }
    }

    for (size_t i = 0; i < count; i++) {
        if (!config_assign(&options[i], options[i].default_value, CONFIG_SRC_DEFAULT, err, errlen))
            return CONFIG_ERROR;
    }

    for (size_t i = 0; i < count; i++) {
        const char *v = options[i].env ? getenv(options[i].env) : NULL;

        if (v && *v && !config_assign(&options[i], v, CONFIG_SRC_ENV, err, errlen))
            return CONFIG_ERROR;
    }

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *name, *eq, *value;
        const config_option_t *o;
        char oname[160];
        size_t len;

        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            config_error(err, errlen, "unexpected argument '%s' (options are --name value; see --help)",
                         arg);
            return CONFIG_ERROR;
        }
        name = arg + 2;
        eq = strchr(name, '=');
        len = eq ? (size_t)(eq - name) : strlen(name);
        o = config_find(options, count, name, len);
        if (!o) {
            config_error(err, errlen, "unknown option --%.*s (see --help)", (int)len, name);
            return CONFIG_ERROR;
        }
        config_name(o, oname, sizeof oname);

        if (eq) {
            value = eq + 1;
        } else if (o->type == CONFIG_BOOL) {
            value = "true";
        } else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
            value = argv[++i];
        } else {
            config_error(err, errlen, "%s needs a value", oname);
            return CONFIG_ERROR;
        }
        if (!config_assign(o, value, CONFIG_SRC_FLAG, err, errlen))
            return CONFIG_ERROR;
    }
    return CONFIG_OK;
}

static const char *config_placeholder(config_type_t type)
{
    switch (type) {
    case CONFIG_STRING: return " TEXT";
    case CONFIG_INT: return " N";
    case CONFIG_DOUBLE: return " X";
    case CONFIG_BOOL: return "";
    }
    return "";
}

/* The default as shown to people: bools and ints have a value even when unset. */
static const char *config_default_text(const config_option_t *o)
{
    if (o->default_value)
        return o->default_value;
    switch (o->type) {
    case CONFIG_BOOL: return "false";
    case CONFIG_INT: return "0";
    case CONFIG_DOUBLE: return "0";
    case CONFIG_STRING: break;
    }
    return NULL;
}

void config_print_help(FILE *out, const config_option_t *options, size_t count, const char *usage)
{
    fprintf(out, "usage: %s\n\noptions:\n", usage ? usage : "[options]");
    for (size_t i = 0; i < count; i++) {
        const config_option_t *o = &options[i];
        const char *def = config_default_text(o);

        if (o->flag)
            fprintf(out, "  --%s%s\n", o->flag, config_placeholder(o->type));
        else
            fprintf(out, "  (no flag)\n");
        fprintf(out, "      %s\n", o->help ? o->help : "");
        fprintf(out, "      env %s, default %s%s%s", o->env ? o->env : "(none)",
                def ? "'" : "", def ? def : "unset", def ? "'" : "");
        if (config_has_range(o))
            fprintf(out, ", range %ld..%ld", o->min, o->max);
        fputc('\n', out);
    }
    fprintf(out, "  --help\n      print this help and exit\n");
}

/* Prints s with '|' escaped so it stays inside its Markdown cell. */
static void config_md_cell(FILE *out, const char *s)
{
    for (; s && *s; s++) {
        if (*s == '|')
            fputs("\\|", out);
        else if (*s == '\n')
            fputc(' ', out);
        else
            fputc(*s, out);
    }
}

void config_print_markdown(FILE *out, const config_option_t *options, size_t count)
{
    fprintf(out, "| flag | env | default | meaning |\n|---|---|---|---|\n");
    for (size_t i = 0; i < count; i++) {
        const config_option_t *o = &options[i];
        const char *def = config_default_text(o);

        fputs("| ", out);
        if (o->flag)
            fprintf(out, "`--%s`", o->flag);
        fputs(" | ", out);
        if (o->env)
            fprintf(out, "`%s`", o->env);
        fputs(" | ", out);
        if (def) {
            fputc('`', out);
            config_md_cell(out, def);
            fputc('`', out);
        } else {
            fputs("(unset)", out);
        }
        fputs(" | ", out);
        config_md_cell(out, o->help);
        if (config_has_range(o))
            fprintf(out, " (%ld..%ld)", o->min, o->max);
        fputs(" |\n", out);
    }
}
