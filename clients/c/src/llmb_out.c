/* llmb_out: bounded output into a caller's buffer (llmb_internal.h). <string.h> for
   memcpy/strlen. */
#include <string.h>

#include "llmb_internal.h"

void llmb_out_init(llmb_out *o, char *p, size_t cap)
{
    o->p = p;
    o->cap = p ? cap : 0;
    o->len = 0;
    o->over = o->cap == 0;
}

void llmb_put(llmb_out *o, const char *s, size_t n)
{
    if (o->over) {
        return;
    }
    if (n > o->cap - 1 - o->len) {
        n = o->cap - 1 - o->len;
        o->over = 1;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

void llmb_puts(llmb_out *o, const char *s)
{
    llmb_put(o, s, strlen(s));
}

void llmb_put_uint(llmb_out *o, uint32_t v)
{
    char digits[10];
    size_t n = 0;
    do {
        digits[sizeof digits - 1 - n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    llmb_put(o, digits + sizeof digits - n, n);
}

void llmb_put_int(llmb_out *o, int32_t v)
{
    if (v < 0) {
        llmb_put(o, "-", 1);
        llmb_put_uint(o, (uint32_t)(-(v + 1)) + 1u);
    } else {
        llmb_put_uint(o, (uint32_t)v);
    }
}

void llmb_put_milli(llmb_out *o, int32_t milli)
{
    uint32_t a, frac;
    char f[4];
    size_t n = 3;
    if (milli < 0) {
        llmb_put(o, "-", 1);
        a = (uint32_t)(-(milli + 1)) + 1u;
    } else {
        a = (uint32_t)milli;
    }
    llmb_put_uint(o, a / 1000u);
    frac = a % 1000u;
    if (frac) {
        f[0] = '.';
        f[1] = (char)('0' + frac / 100u);
        f[2] = (char)('0' + frac / 10u % 10u);
        f[3] = (char)('0' + frac % 10u);
        while (f[n] == '0') {
            n--;
        }
        llmb_put(o, f, n + 1);
    }
}

void llmb_put_json_str(llmb_out *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t i, run = 0;
    llmb_put(o, "\"", 1);
    for (i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char esc[6];
        size_t elen = 2;
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            continue;
        }
        llmb_put(o, s + run, i - run);
        run = i + 1;
        esc[0] = '\\';
        switch (ch) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[ch >> 4];
            esc[5] = hex[ch & 15];
            elen = 6;
        }
        llmb_put(o, esc, elen);
    }
    llmb_put(o, s + run, n - run);
    llmb_put(o, "\"", 1);
}

long llmb_out_end(llmb_out *o)
{
    if (o->over) {
        if (o->cap) {
            o->p[0] = '\0';
        }
        return LLMB_ERR_SPACE;
    }
    o->p[o->len] = '\0';
    return (long)o->len;
}
