/* llmb_json: see llmb_json.h. Every read of j->p[i] is preceded by a check i < j->len. */
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

/* The 4 hex digits at p[at..at+4) of a buffer of len bytes, or -1. */
static long hex4(const unsigned char *p, size_t len, size_t at)
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
            if (hex4(j->p, j->len, j->pos + 2) < 0) {
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

static size_t utf8(unsigned long cp, unsigned char out[4])
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

#define REPLACEMENT 0xFFFDul

size_t llmb_json_next_char(const llmb_json_str *s, size_t *pos, unsigned char out[4])
{
    size_t at = *pos;
    unsigned char c;
    long cp, lo;

    if (at >= s->len) {
        return 0;
    }
    c = s->p[at];
    if (c != '\\') {
        out[0] = c;
        *pos = at + 1;
        return 1;
    }
    if (at + 1 >= s->len) { /* a lone backslash at the end (only in unchecked input) */
        *pos = s->len;
        return utf8(REPLACEMENT, out);
    }
    *pos = at + 2;
    switch (s->p[at + 1]) {
    case '"': out[0] = '"'; return 1;
    case '\\': out[0] = '\\'; return 1;
    case '/': out[0] = '/'; return 1;
    case 'b': out[0] = '\b'; return 1;
    case 'f': out[0] = '\f'; return 1;
    case 'n': out[0] = '\n'; return 1;
    case 'r': out[0] = '\r'; return 1;
    case 't': out[0] = '\t'; return 1;
    case 'u':
        break;
    default:
        return utf8(REPLACEMENT, out);
    }
    cp = hex4(s->p, s->len, at + 2);
    if (cp < 0) {
        *pos = s->len;
        return utf8(REPLACEMENT, out);
    }
    *pos = at + 6;
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
        return utf8(REPLACEMENT, out); /* a low surrogate without its high one */
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        /* a high surrogate: only a "\uDC00".."\uDFFF" right after completes it; anything
           else leaves it lone (U+FFFD) and is decoded on its own by the next call */
        if (at + 7 < s->len && s->p[at + 6] == '\\' && s->p[at + 7] == 'u') {
            lo = hex4(s->p, s->len, at + 8);
            if (lo >= 0xDC00 && lo <= 0xDFFF) {
                *pos = at + 12;
                return utf8(0x10000ul + (((unsigned long)cp - 0xD800ul) << 10)
                            + ((unsigned long)lo - 0xDC00ul), out);
            }
        }
        return utf8(REPLACEMENT, out);
    }
    return utf8((unsigned long)cp, out);
}

int llmb_json_str_equals(const llmb_json_str *s, const char *lit)
{
    size_t pos = 0, n, i, k = 0;
    unsigned char ch[4];
    while ((n = llmb_json_next_char(s, &pos, ch)) > 0) {
        for (i = 0; i < n; i++, k++) {
            if (lit[k] == '\0' || (unsigned char)lit[k] != ch[i]) {
                return 0;
            }
        }
    }
    return lit[k] == '\0';
}

/* Length of the UTF-8 sequence that lead byte c begins (1 for anything else). */
static size_t seq_len(unsigned char c)
{
    return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
}

size_t llmb_json_str_copy(const llmb_json_str *s, char *out, size_t cap, int *truncated)
{
    size_t pos = 0, n, i, len = 0, k;
    unsigned char ch[4];
    int cut = 0;
    if (cap == 0) {
        if (truncated) {
            *truncated = s->len > 0;
        }
        return 0;
    }
    while ((n = llmb_json_next_char(s, &pos, ch)) > 0) {
        if (n > cap - 1 - len) {
            cut = 1;
            break;
        }
        for (i = 0; i < n; i++) {
            out[len++] = (char)ch[i];
        }
    }
    if (cut) {
        /* raw UTF-8 arrives byte by byte: drop a sequence the cut left incomplete */
        k = len;
        while (k > 0 && len - k < 3 && ((unsigned char)out[k - 1] & 0xC0) == 0x80) {
            k--;
        }
        if (k > 0 && (unsigned char)out[k - 1] >= 0xC0
            && len - (k - 1) < seq_len((unsigned char)out[k - 1])) {
            len = k - 1;
        }
    }
    if (truncated) {
        *truncated = cut;
    }
    out[len] = '\0';
    return len;
}
