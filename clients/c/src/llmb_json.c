/* llmb_json: see llmb_json.h. The scanner; decoding its strings is llmb_json_str.c.
   Every read of j->p[i] is preceded by a check i < j->len. */
#include "llmb_json.h"

void llmb_json_init(llmb_json *j, const void *text, size_t len)
{
    j->p = (const unsigned char *)text;
    j->len = text ? len : 0;
    j->pos = 0;
}

static void skip_ws(llmb_json *j)
{
    while (j->pos < j->len) {
        unsigned char c = j->p[j->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            return;
        }
        j->pos++;
    }
}

int llmb_json_peek(llmb_json *j)
{
    skip_ws(j);
    return j->pos < j->len ? (int)j->p[j->pos] : -1;
}

static int hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

long llmb_json_hex4(const unsigned char *p, size_t len, size_t at)
{
    long v = 0;
    size_t i;
    if (at > len || len - at < 4) {
        return -1;
    }
    for (i = 0; i < 4; i++) {
        int d = hex_digit(p[at + i]);
        if (d < 0) {
            return -1;
        }
        v = v * 16 + d;
    }
    return v;
}

int llmb_json_string(llmb_json *j, llmb_json_str *out)
{
    size_t start;
    if (llmb_json_peek(j) != '"') {
        return LLMB_JSON_ERR;
    }
    start = ++j->pos;
    while (j->pos < j->len) {
        unsigned char c = j->p[j->pos];
        if (c == '"') {
            out->p = j->p + start;
            out->len = j->pos - start;
            j->pos++;
            return 0;
        }
        if (c < 0x20) {
            return LLMB_JSON_ERR; /* control characters must be escaped */
        }
        if (c != '\\') {
            j->pos++;
            continue;
        }
        if (j->pos + 1 >= j->len) {
            return LLMB_JSON_ERR;
        }
        switch (j->p[j->pos + 1]) {
        case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            j->pos += 2;
            break;
        case 'u':
            if (llmb_json_hex4(j->p, j->len, j->pos + 2) < 0) {
                return LLMB_JSON_ERR;
            }
            j->pos += 6;
            break;
        default:
            return LLMB_JSON_ERR;
        }
    }
    return LLMB_JSON_ERR; /* no closing quote */
}

static int is_digit(const llmb_json *j)
{
    return j->pos < j->len && j->p[j->pos] >= '0' && j->p[j->pos] <= '9';
}

int llmb_json_number(llmb_json *j, llmb_json_num *out)
{
    /* value = mantissa * 10^exp10, mantissa holding the first 18 significant digits */
    uint64_t mantissa = 0;
    long exp10 = 0;
    long e = 0;
    int digits = 0;
    int neg = 0, eneg = 0, is_int = 1;
    int64_t v;

    if (llmb_json_peek(j) < 0) {
        return LLMB_JSON_ERR;
    }
    if (j->p[j->pos] == '-') {
        neg = 1;
        j->pos++;
    }
    if (!is_digit(j)) {
        return LLMB_JSON_ERR;
    }
    if (j->p[j->pos] == '0') {
        j->pos++; /* a leading zero stands alone: "01" ends after "0" and fails later */
    } else {
        while (is_digit(j)) {
            if (digits < 18) {
                mantissa = mantissa * 10u + (uint64_t)(j->p[j->pos] - '0');
                if (mantissa) {
                    digits++;
                }
            } else if (exp10 < 100) {
                exp10++;
            }
            j->pos++;
        }
    }
    if (j->pos < j->len && j->p[j->pos] == '.') {
        is_int = 0;
        j->pos++;
        if (!is_digit(j)) {
            return LLMB_JSON_ERR;
        }
        while (is_digit(j)) {
            if (digits < 18) {
                mantissa = mantissa * 10u + (uint64_t)(j->p[j->pos] - '0');
                if (mantissa) {
                    digits++;
                }
                exp10--;
            }
            j->pos++;
        }
    }
    if (j->pos < j->len && (j->p[j->pos] == 'e' || j->p[j->pos] == 'E')) {
        is_int = 0;
        j->pos++;
        if (j->pos < j->len && (j->p[j->pos] == '+' || j->p[j->pos] == '-')) {
            eneg = j->p[j->pos] == '-';
            j->pos++;
        }
        if (!is_digit(j)) {
            return LLMB_JSON_ERR;
        }
        while (is_digit(j)) {
            if (e < 100000) {
                e = e * 10 + (j->p[j->pos] - '0');
            }
            j->pos++;
        }
        exp10 += eneg ? -e : e;
    }
    v = (int64_t)mantissa; /* < 10^18 */
    while (exp10 > 0 && v != 0 && v <= INT32_MAX) {
        v *= 10;
        exp10--;
    }
    while (exp10 < 0 && v != 0) {
        v /= 10;
        exp10++;
    }
    if (v > INT32_MAX) {
        v = (int64_t)INT32_MAX + 1; /* saturated: one past, so that -v fits INT32_MIN */
        is_int = 0;
    }
    if (neg) {
        v = -v;
    } else if (v > INT32_MAX) {
        v = INT32_MAX;
    }
    out->value = (int32_t)v;
    out->is_int = is_int;
    return 0;
}

static int literal(llmb_json *j, const char *word)
{
    size_t i;
    if (llmb_json_peek(j) < 0) {
        return LLMB_JSON_ERR;
    }
    for (i = 0; word[i]; i++) {
        if (j->pos + i >= j->len || j->p[j->pos + i] != (unsigned char)word[i]) {
            return LLMB_JSON_ERR;
        }
    }
    j->pos += i;
    return 0;
}

int llmb_json_bool(llmb_json *j, int *out)
{
    int c = llmb_json_peek(j);
    if (c == 't' && literal(j, "true") == 0) {
        *out = 1;
        return 0;
    }
    if (c == 'f' && literal(j, "false") == 0) {
        *out = 0;
        return 0;
    }
    return LLMB_JSON_ERR;
}

int llmb_json_null(llmb_json *j)
{
    return literal(j, "null");
}

int llmb_json_object_begin(llmb_json *j)
{
    if (llmb_json_peek(j) != '{') {
        return LLMB_JSON_ERR;
    }
    j->pos++;
    return 0;
}

/* A member's key and its ':'. */
static int member_key(llmb_json *j, llmb_json_str *key)
{
    if (llmb_json_string(j, key) != 0 || llmb_json_peek(j) != ':') {
        return LLMB_JSON_ERR;
    }
    j->pos++;
    return 0;
}

int llmb_json_object_next(llmb_json *j, size_t *count, llmb_json_str *key)
{
    int c = llmb_json_peek(j);
    if (c == '}') {
        j->pos++;
        return 0;
    }
    if (*count > 0) {
        if (c != ',') {
            return LLMB_JSON_ERR;
        }
        j->pos++;
    }
    if (member_key(j, key) != 0) {
        return LLMB_JSON_ERR;
    }
    (*count)++;
    return 1;
}

/* A scalar value: string, number, true, false or null. */
static int scalar(llmb_json *j)
{
    llmb_json_str s;
    llmb_json_num n;
    int b;
    switch (llmb_json_peek(j)) {
    case '"':
        return llmb_json_string(j, &s);
    case 't': case 'f':
        return llmb_json_bool(j, &b);
    case 'n':
        return llmb_json_null(j);
    default:
        return llmb_json_number(j, &n);
    }
}

int llmb_json_skip(llmb_json *j)
{
    /* Iterative: bit d of `objects` says whether level d is an object (1) or array. */
    uint64_t objects = 0;
    int depth = 0;
    llmb_json_str key;
    int c;

    for (;;) {
        /* here a value is expected */
        c = llmb_json_peek(j);
        if (c == '{' || c == '[') {
            int is_obj = c == '{';
            if (depth >= LLMB_JSON_MAX_DEPTH) {
                return LLMB_JSON_ERR;
            }
            if (is_obj) {
                objects |= (uint64_t)1 << depth;
            } else {
                objects &= ~((uint64_t)1 << depth);
            }
            depth++;
            j->pos++;
            if (llmb_json_peek(j) == (is_obj ? '}' : ']')) {
                j->pos++;
                depth--;
            } else {
                if (is_obj && member_key(j, &key) != 0) {
                    return LLMB_JSON_ERR;
                }
                continue; /* the first value inside */
            }
        } else if (scalar(j) != 0) {
            return LLMB_JSON_ERR;
        }
        /* a value ended: close containers or move to the next element */
        for (;;) {
            int is_obj;
            if (depth == 0) {
                return 0;
            }
            is_obj = (int)((objects >> (depth - 1)) & 1u);
            c = llmb_json_peek(j);
            if (c == ',') {
                j->pos++;
                if (is_obj && member_key(j, &key) != 0) {
                    return LLMB_JSON_ERR;
                }
                break; /* the next value */
            }
            if (c != (is_obj ? '}' : ']')) {
                return LLMB_JSON_ERR;
            }
            j->pos++;
            depth--;
        }
    }
}

int llmb_json_end(llmb_json *j)
{
    return llmb_json_peek(j) < 0 ? 0 : LLMB_JSON_ERR;
}
