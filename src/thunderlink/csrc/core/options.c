/*
 * Options: defaults, checks, the handshake digest and the description Python
 * reads, all from the one table in options.h.
 */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

typedef struct row {
  tl_option_info_t info;
  size_t offset; /* of the field in tl_options_t */
  size_t size;   /* of the field: 4 or 8 (signed) */
} row_t;

#define TL_OPTION(field, name, env, kind, unit, def, min, max, shared, choices, help) \
  {{#field, name, env, kind, unit, def, min, max, shared, choices, help},            \
   offsetof(tl_options_t, field), sizeof(((tl_options_t *)0)->field)},
static const row_t ROWS[] = {
#include "options.h"
};
#undef TL_OPTION

/* Every limit fits its field: a value in range survives a round trip. */
#define TL_OPTION(field, name, env, kind, unit, def, min, max, shared, choices, help) \
  _Static_assert(sizeof(((tl_options_t *)0)->field) == 8 ||                        \
                     ((min) >= INT32_MIN && (max) <= INT32_MAX &&                  \
                      (def) >= (min) && (def) <= (max)),                           \
                 "option " #field ": range or default does not fit the field");
#include "options.h"
#undef TL_OPTION

#define NROWS ((int)(sizeof ROWS / sizeof ROWS[0]))

static int64_t get(const tl_options_t *o, const row_t *r) {
  const char *p = (const char *)o + r->offset;
  if (r->size == 8) {
    int64_t v;
    memcpy(&v, p, sizeof v);
    return v;
  }
  int32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

static void set(tl_options_t *o, const row_t *r, int64_t v) {
  char *p = (char *)o + r->offset;
  if (r->size == 8) {
    memcpy(p, &v, sizeof v);
  } else {
    int32_t w = (int32_t)v;
    memcpy(p, &w, sizeof w);
  }
}

int tl_option_count(void) { return NROWS; }

int tl_option_info(int i, tl_option_info_t *out) {
  if (i < 0 || i >= NROWS || !out) return TL_ERR_INVALID;
  *out = ROWS[i].info;
  if (!out->choices) out->choices = "";
  return TL_OK;
}

void tl_options_default(tl_options_t *o) {
  memset(o, 0, sizeof *o);
  for (int i = 0; i < NROWS; i++) set(o, &ROWS[i], ROWS[i].info.def);
}

/* Name `index` of a comma-separated list into buf, or "" past its end. */
static const char *choice_name(const char *list, int64_t index, char *buf, size_t cap) {
  buf[0] = 0;
  if (!list) return buf;
  for (int64_t k = 0; *list && index >= 0; k++) {
    const char *end = strchr(list, ',');
    size_t n = end ? (size_t)(end - list) : strlen(list);
    if (k == index) {
      snprintf(buf, cap, "%.*s", (int)n, list);
      break;
    }
    if (!end) break;
    list = end + 1;
  }
  return buf;
}

static void describe_range(const tl_option_info_t *f, char *buf, size_t cap) {
  if (f->kind == TL_OPT_CHOICE) {
    size_t used = 0;
    buf[0] = 0;
    for (int64_t k = f->min; k <= f->max && used < cap; k++) {
      char name[64];
      used += (size_t)snprintf(buf + used, cap - used, "%s%s", k > f->min ? ", " : "",
                               choice_name(f->choices, k, name, sizeof name));
    }
  } else {
    snprintf(buf, cap, "%lld..%lld%s%s", (long long)f->min, (long long)f->max,
             *f->unit ? " " : "", f->unit);
  }
}

/* 0, or 1 with the first bad option described in why. */
static int check(const tl_options_t *o, char *why, size_t cap) {
  for (int i = 0; i < NROWS; i++) {
    const tl_option_info_t *f = &ROWS[i].info;
    int64_t v = get(o, &ROWS[i]);
    if (v >= f->min && v <= f->max) continue;
    char range[160], name[64];
    describe_range(f, range, sizeof range);
    if (f->kind == TL_OPT_CHOICE && *choice_name(f->choices, v, name, sizeof name))
      snprintf(why, cap, "%s (%s) %s is not available in this build (%s are)", f->field,
               f->env, name, range);
    else
      snprintf(why, cap, "%s (%s) must be %s%s, not %lld", f->field, f->env,
               f->kind == TL_OPT_CHOICE ? "one of " : "", range, (long long)v);
    return 1;
  }
  return 0;
}

/* 0, or 1 with the first bad row of the tuning profile described in why. */
static int check_tune(const tl_options_t *o, char *why, size_t cap) {
  if (o->ntune < 0 || o->ntune > TL_MAX_TUNE_ROWS) {
    snprintf(why, cap, "a tuning profile has at most %d rows, not %d", TL_MAX_TUNE_ROWS,
             (int)o->ntune);
    return 1;
  }
  for (int i = 0; i < o->ntune; i++) {
    const tl_tune_row_t *r = &o->tune[i];
    const char *bad = NULL;
    if (r->op < 1 || r->op >= TL_NUM_OPS) bad = "op is not a collective";
    else if (r->nranks < 0) bad = "nranks is negative";
    else if (r->transport < 0 || r->transport >= TL_NUM_TRANSPORTS) bad = "unknown transport";
    else if (r->how != -1 && r->how != TL_HOW_ONE_ROUND && r->how != TL_HOW_RING &&
             r->how != TL_HOW_MESH)
      bad = "how must be one round, ring or mesh";
    else if (r->max_bytes && r->max_bytes <= r->min_bytes) bad = "empty size band";
    else if (r->depth < 0 || r->depth > 64) bad = "depth must be 0..64";
    else if (r->lanes < 0 || r->lanes > 2) bad = "lanes must be 0..2";
    else if (r->chunk_bytes && (r->chunk_bytes < 4096 || r->chunk_bytes > (int64_t)TL_MAX_FRAME))
      bad = "chunk_bytes must be 0 or 4096..1 GiB";
    if (bad) {
      snprintf(why, cap, "tuning profile row %d: %s", i, bad);
      return 1;
    }
  }
  return 0;
}

int tl_options_check(const tl_options_t *o, char *why, size_t cap) {
  char scratch[8];
  if (!why || cap == 0) {
    why = scratch;
    cap = sizeof scratch;
  }
  why[0] = 0;
  if (!o) return snprintf(why, cap, "no options"), TL_ERR_INVALID;
  return check(o, why, cap) || check_tune(o, why, cap) ? TL_ERR_CONFIG : TL_OK;
}

/* The refusal of a rank whose shared options differ names them all. */
#define TL_SHARED_0(env)
#define TL_SHARED_1(env) " " env
#define TL_OPTION(field, name, env, kind, unit, def, min, max, shared, choices, help) \
  TL_SHARED_##shared(env)
const char tl__options_differ[] =
    "tuning options differ (set these the same on every rank:"
#include "options.h"
    ", and the same tuning profile, THUNDERLINK_TUNING_FILE)";
#undef TL_OPTION

static uint64_t fnv(uint64_t h, int64_t v) {
  const unsigned char *b = (const unsigned char *)&v;
  for (size_t k = 0; k < sizeof v; k++) h = (h ^ b[k]) * 1099511628211ull;
  return h;
}

/* FNV-1a over the shared options, each as 8 little-endian bytes, in table
 * order (the same digest as protocol version 2's hand-written list), then
 * over the tuning profile's rows, field by field, when there are any. */
uint64_t tl__options_digest(const tl_options_t *o) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < NROWS; i++)
    if (ROWS[i].info.shared) h = fnv(h, get(o, &ROWS[i]));
  if (o->ntune > 0) h = fnv(h, o->ntune);
  for (int i = 0; i < o->ntune && i < TL_MAX_TUNE_ROWS; i++) {
    const tl_tune_row_t *r = &o->tune[i];
    int64_t f[] = {r->op, r->nranks, r->transport, r->how, (int64_t)r->min_bytes,
                   (int64_t)r->max_bytes, r->depth, r->lanes, r->chunk_bytes};
    for (size_t k = 0; k < sizeof f / sizeof f[0]; k++) h = fnv(h, f[k]);
  }
  return h;
}
