/*
 * Unit tests of llmb_json (the scanner and its string decoder).
 */
#include "test_harness.h"

static int scan_string(const char *json, char *out, size_t cap)
{
    llmb_json j;
    llmb_json_str s;
    size_t n = strlen(json);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, json, n);
    llmb_json_init(&j, p, n);
    r = llmb_json_string(&j, &s);
    if (r == 0) {
        llmb_json_str_copy(&s, out, cap, NULL);
        r = llmb_json_end(&j);
    }
    free(p);
    return r;
}

static int skips(const char *json)
{
    llmb_json j;
    size_t n = strlen(json);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, json, n);
    llmb_json_init(&j, p, n);
    r = llmb_json_skip(&j);
    if (r == 0) {
        r = llmb_json_end(&j);
    }
    free(p);
    return r == 0;
}

static int number(const char *json, int32_t *v, int *is_int)
{
    llmb_json j;
    llmb_json_num num;
    size_t n = strlen(json);
    char *p = (char *)malloc(n ? n : 1);
    int r;
    memcpy(p, json, n);
    llmb_json_init(&j, p, n);
    r = llmb_json_number(&j, &num);
    if (r == 0) {
        r = llmb_json_end(&j);
        *v = num.value;
        *is_int = num.is_int;
    }
    free(p);
    return r;
}

TEST(json_string_escapes)
{
    char out[64];
    CHECK(scan_string("\"plain\"", out, sizeof out) == 0);
    CHECK_STR(out, "plain");
    CHECK(scan_string("\"a\\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti\"", out, sizeof out) == 0);
    CHECK_STR(out, "a\"b\\c/d\be\ff\ng\rh\ti");
    CHECK(scan_string("\"\\u00e9\\u20AC\\u0041\"", out, sizeof out) == 0);
    CHECK_STR(out, "\xc3\xa9\xe2\x82\xac" "A");
    CHECK(scan_string("\"caf\xc3\xa9\"", out, sizeof out) == 0); /* raw UTF-8 passes */
    CHECK_STR(out, "caf\xc3\xa9");
}

TEST(json_surrogates)
{
    char out[64];
    CHECK(scan_string("\"\\ud83d\\ude00\"", out, sizeof out) == 0);
    CHECK_STR(out, "\xf0\x9f\x98\x80");
    CHECK(scan_string("\"\\uD83D\\uDE00x\"", out, sizeof out) == 0);
    CHECK_STR(out, "\xf0\x9f\x98\x80x");
    CHECK(scan_string("\"\\ud83dx\"", out, sizeof out) == 0); /* lone high */
    CHECK_STR(out, "\xef\xbf\xbdx");
    CHECK(scan_string("\"\\ude00\"", out, sizeof out) == 0); /* lone low */
    CHECK_STR(out, "\xef\xbf\xbd");
    CHECK(scan_string("\"\\ud83d\\u0041\"", out, sizeof out) == 0); /* high + non-low */
    CHECK_STR(out, "\xef\xbf\xbd" "A");
    CHECK(scan_string("\"\\ud83d\\ud83d\\ude00\"", out, sizeof out) == 0); /* high high low */
    CHECK_STR(out, "\xef\xbf\xbd\xf0\x9f\x98\x80");
    CHECK(scan_string("\"\\ud83d\"", out, sizeof out) == 0); /* high at the end */
    CHECK_STR(out, "\xef\xbf\xbd");
    CHECK(scan_string("\"\\u0000\"", out, sizeof out) == 0);
    CHECK(out[0] == '\0');
}

TEST(json_bad_strings)
{
    char out[16];
    CHECK(scan_string("\"abc", out, sizeof out) != 0);          /* unterminated */
    CHECK(scan_string("\"ab\\", out, sizeof out) != 0);         /* backslash at the end */
    CHECK(scan_string("\"\\x\"", out, sizeof out) != 0);        /* unknown escape */
    CHECK(scan_string("\"\\u12\"", out, sizeof out) != 0);      /* short \u */
    CHECK(scan_string("\"\\u12g4\"", out, sizeof out) != 0);    /* not hex */
    CHECK(scan_string("\"\\u123", out, sizeof out) != 0);       /* cut inside \u */
    CHECK(scan_string("\"a\nb\"", out, sizeof out) != 0);       /* raw control char */
    CHECK(scan_string("\"\"x", out, sizeof out) != 0);          /* trailing garbage */
    CHECK(scan_string("", out, sizeof out) != 0);
    CHECK(scan_string("'a'", out, sizeof out) != 0);
}

TEST(json_copy_truncates_on_character_boundary)
{
    llmb_json_str s;
    char out[6];
    int cut = 0;
    size_t n;
    s.p = (const unsigned char *)"ab\xe2\x82\xac" "cd"; /* "ab€cd" raw */
    s.len = 7;
    n = llmb_json_str_copy(&s, out, 5, &cut); /* room for 4 bytes: "ab" + 2 of 3 */
    CHECK(cut == 1);
    CHECK(n == 2);
    CHECK_STR(out, "ab");
    s.p = (const unsigned char *)"ab\\u20accd";
    s.len = 10;
    n = llmb_json_str_copy(&s, out, 5, &cut);
    CHECK(cut == 1 && n == 2);
    n = llmb_json_str_copy(&s, out, 6, &cut);
    CHECK(cut == 1 && n == 5);
    CHECK_STR(out, "ab\xe2\x82\xac");
    CHECK(llmb_json_str_copy(&s, out, 0, &cut) == 0 && cut == 1);
}

TEST(json_numbers)
{
    int32_t v = 0;
    int is_int = 0;
    CHECK(number("0", &v, &is_int) == 0 && v == 0 && is_int);
    CHECK(number("42", &v, &is_int) == 0 && v == 42 && is_int);
    CHECK(number("-7", &v, &is_int) == 0 && v == -7 && is_int);
    CHECK(number("12.9", &v, &is_int) == 0 && v == 12 && !is_int);
    CHECK(number("-12.9", &v, &is_int) == 0 && v == -12 && !is_int);
    CHECK(number("1e3", &v, &is_int) == 0 && v == 1000 && !is_int);
    CHECK(number("1.5E+2", &v, &is_int) == 0 && v == 150);
    CHECK(number("2.5e-1", &v, &is_int) == 0 && v == 0);
    CHECK(number("0.001", &v, &is_int) == 0 && v == 0);
    CHECK(number("1e999999999", &v, &is_int) == 0 && v == INT32_MAX && !is_int);
    CHECK(number("1e-999999999", &v, &is_int) == 0 && v == 0);
    CHECK(number("2147483647", &v, &is_int) == 0 && v == INT32_MAX && is_int);
    CHECK(number("2147483648", &v, &is_int) == 0 && v == INT32_MAX && !is_int);
    CHECK(number("-2147483648", &v, &is_int) == 0 && v == INT32_MIN);
    CHECK(number("99999999999999999999", &v, &is_int) == 0 && v == INT32_MAX && !is_int);
    CHECK(number("123456789.123456789", &v, &is_int) == 0 && v == 123456789);
    CHECK(number("01", &v, &is_int) != 0);
    CHECK(number("-", &v, &is_int) != 0);
    CHECK(number("1.", &v, &is_int) != 0);
    CHECK(number(".5", &v, &is_int) != 0);
    CHECK(number("1e", &v, &is_int) != 0);
    CHECK(number("1e+", &v, &is_int) != 0);
    CHECK(number("+1", &v, &is_int) != 0);
    CHECK(number("0x10", &v, &is_int) != 0);
}

TEST(json_skip_values)
{
    char deep[200];
    int i;
    CHECK(skips("{}"));
    CHECK(skips("[]"));
    CHECK(skips(" { \"a\" : [1, 2.5, -3e2, true, false, null, \"x\", {\"b\":{}}] } "));
    CHECK(skips("\"s\""));
    CHECK(skips("null"));
    CHECK(!skips("{\"a\":1,}"));
    CHECK(!skips("[1,]"));
    CHECK(!skips("{\"a\" 1}"));
    CHECK(!skips("{1:2}"));
    CHECK(!skips("[1 2]"));
    CHECK(!skips("{\"a\":1]"));
    CHECK(!skips("[1}"));
    CHECK(!skips("[1"));
    CHECK(!skips("{"));
    CHECK(!skips("tru"));
    CHECK(!skips("nul"));
    CHECK(!skips("[] []"));
    CHECK(!skips(""));
    CHECK(!skips("   "));
    /* 64 levels pass, 65 do not */
    for (i = 0; i < 64; i++) {
        deep[i] = '[';
        deep[64 + i] = ']';
    }
    deep[128] = '\0';
    CHECK(skips(deep));
    for (i = 0; i < 65; i++) {
        deep[i] = '[';
        deep[65 + i] = ']';
    }
    deep[130] = '\0';
    CHECK(!skips(deep));
}

TEST(json_object_members)
{
    llmb_json j;
    llmb_json_str key, val;
    size_t count = 0;
    const char *text = "{\"a\":\"x\", \"b\" : \"y\"}";
    llmb_json_init(&j, text, strlen(text));
    CHECK(llmb_json_object_begin(&j) == 0);
    CHECK(llmb_json_object_next(&j, &count, &key) == 1 && llmb_json_str_equals(&key, "a"));
    CHECK(llmb_json_string(&j, &val) == 0 && llmb_json_str_equals(&val, "x"));
    CHECK(llmb_json_object_next(&j, &count, &key) == 1 && llmb_json_str_equals(&key, "b"));
    CHECK(llmb_json_string(&j, &val) == 0 && !llmb_json_str_equals(&val, "yy"));
    CHECK(llmb_json_object_next(&j, &count, &key) == 0);
    CHECK(llmb_json_end(&j) == 0);
}

void run_json_tests(void)
{
    RUN(json_string_escapes);
    RUN(json_surrogates);
    RUN(json_bad_strings);
    RUN(json_copy_truncates_on_character_boundary);
    RUN(json_numbers);
    RUN(json_skip_values);
    RUN(json_object_members);
}
