/*
 * llmb_json: a tiny pull scanner for the bridge's reply JSON (docs/protocol.md,
 * "Reply messages"). Portable C99, no allocation, no stdio, no recursion.
 *
 * It reads a buffer of known length that need not be NUL-terminated and never reads
 * past that length, whatever the bytes. It validates what it scans (strings with all
 * escapes, numbers, true/false/null, objects and arrays nested up to
 * LLMB_JSON_MAX_DEPTH levels) and lets its caller pick the object members it knows
 * and skip the rest. Raw bytes of 0x80 and above inside strings are passed through
 * unchecked (the bridge sends UTF-8; checking it is the consumer's choice).
 *
 * Strings are not copied when scanned: llmb_json_string() gives the raw bytes
 * between the quotes (already checked), and llmb_json_next_char() decodes them one
 * character at a time to UTF-8 ("\uXXXX" and surrogate pairs included; a lone or
 * broken surrogate becomes U+FFFD), so text can be passed on in pieces of any size.
 */
#ifndef LLMB_JSON_H
#define LLMB_JSON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Deepest nesting of objects and arrays accepted (the bridge's own request limit). */
#define LLMB_JSON_MAX_DEPTH 64

/* Returned by the scanning functions when the input is not what was asked for. */
#define LLMB_JSON_ERR (-1)

typedef struct llmb_json {
    const unsigned char *p; /* the text (not NUL-terminated) */
    size_t len;             /* its length: nothing at or after p[len] is ever read */
    size_t pos;             /* where scanning continues */
} llmb_json;

/* A checked JSON string: the raw bytes between its quotes, escapes not yet decoded. */
typedef struct llmb_json_str {
    const unsigned char *p;
    size_t len;
} llmb_json_str;

/* A number, reduced to what the reply messages need. */
typedef struct llmb_json_num {
    int32_t value;  /* truncated toward zero, saturated to INT32_MIN..INT32_MAX */
    int is_int;     /* 1: written without fraction or exponent and within int32 */
} llmb_json_num;

/* Start scanning text[0..len). */
void llmb_json_init(llmb_json *j, const void *text, size_t len);

/* The next character that is not JSON whitespace (not consumed), or -1 at the end. */
int llmb_json_peek(llmb_json *j);

/* Consume '{'. Returns 0, or LLMB_JSON_ERR when the next value is not an object. */
int llmb_json_object_begin(llmb_json *j);

/*
 * The next member of the object begun with llmb_json_object_begin(): reads its key
 * and the ':' and leaves the scanner at the value, which the caller must then scan or
 * skip. *count must be 0 before the first call and is kept by this function.
 * Returns 1 (a member: *key set), 0 (the object's '}' was consumed) or LLMB_JSON_ERR.
 */
int llmb_json_object_next(llmb_json *j, size_t *count, llmb_json_str *key);

/* Scan one string value. Returns 0 or LLMB_JSON_ERR. */
int llmb_json_string(llmb_json *j, llmb_json_str *out);

/* Scan one number. Returns 0 or LLMB_JSON_ERR (not a number by JSON's grammar). */
int llmb_json_number(llmb_json *j, llmb_json_num *out);

/* Scan true or false (*out = 1 or 0). Returns 0 or LLMB_JSON_ERR. */
int llmb_json_bool(llmb_json *j, int *out);

/* Scan null. Returns 0 or LLMB_JSON_ERR. */
int llmb_json_null(llmb_json *j);

/* Scan and check any one value (nested objects and arrays too). 0 or LLMB_JSON_ERR. */
int llmb_json_skip(llmb_json *j);

/* 0 when nothing but whitespace is left, else LLMB_JSON_ERR. */
int llmb_json_end(llmb_json *j);

/* The value of the 4 hex digits at p[at..at+4) of a buffer of len bytes, or -1: the
   scanner checks "\uXXXX" with it, and the decoder decodes it. */
long llmb_json_hex4(const unsigned char *p, size_t len, size_t at);

/* Decoding a scanned string (llmb_json_str.c). */

/*
 * Decode the character of s at *pos to UTF-8 in out[0..n) and advance *pos.
 * Returns n (1 to 4), or 0 when *pos is at the end. A raw byte is passed on as is
 * (n = 1). Works on any bytes, checked or not, without reading past s->len.
 */
size_t llmb_json_next_char(const llmb_json_str *s, size_t *pos, unsigned char out[4]);

/* 1 if s decodes to exactly the NUL-terminated lit, else 0. */
int llmb_json_str_equals(const llmb_json_str *s, const char *lit);

/*
 * Decode s into out[0..cap) and NUL-terminate it (cap >= 1), never cutting a
 * character in two. Returns the bytes written (without the NUL); *truncated (if not
 * NULL) is set to 1 when s did not fit, else 0.
 */
size_t llmb_json_str_copy(const llmb_json_str *s, char *out, size_t cap, int *truncated);

#ifdef __cplusplus
}
#endif

#endif /* LLMB_JSON_H */
