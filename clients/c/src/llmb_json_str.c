/* llmb_json_str: decoding a scanned string (llmb_json.h): escapes, "\uXXXX" and surrogate
   pairs to UTF-8, one character at a time. Every read of s->p[i] is preceded by a check
   i < s->len. */
#include "llmb_json.h"

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
    cp = llmb_json_hex4(s->p, s->len, at + 2);
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
            lo = llmb_json_hex4(s->p, s->len, at + 8);
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
