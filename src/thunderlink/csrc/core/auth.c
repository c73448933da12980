/*
 * What the handshake's token proof is made of: SHA-256 (FIPS 180-4), HMAC
 * (RFC 2104), fresh nonces from the kernel and a constant-time comparison.
 * Written here so that the core keeps depending on libc only; checked
 * against the RFC 4231 test vectors (tests/test_auth.py).
 *
 * bootstrap.c says what is proved and how (the challenge-response).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#include "internal.h"

/* ---- SHA-256 ---------------------------------------------------------------- */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(tl_sha256_t *s, const uint8_t *p) {
  uint32_t w[64];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
           (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
  uint32_t e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
  for (int i = 0; i < 64; i++) {
    uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
    uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g; g = f; f = e; e = d + t1;
    d = c; c = b; b = a; a = t1 + t2;
  }
  s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
  s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

void tl__sha256_init(tl_sha256_t *s) {
  static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  memcpy(s->h, iv, sizeof iv);
  s->len = 0;
  s->nbuf = 0;
}

void tl__sha256_update(tl_sha256_t *s, const void *data, size_t n) {
  const uint8_t *p = data;
  s->len += n;
  if (s->nbuf) {
    size_t take = 64 - s->nbuf < n ? 64 - s->nbuf : n;
    memcpy(s->buf + s->nbuf, p, take);
    s->nbuf += take;
    p += take;
    n -= take;
    if (s->nbuf < 64) return;
    sha256_block(s, s->buf);
    s->nbuf = 0;
  }
  for (; n >= 64; p += 64, n -= 64) sha256_block(s, p);
  memcpy(s->buf, p, n);
  s->nbuf = n;
}

void tl__sha256_final(tl_sha256_t *s, uint8_t out[32]) {
  uint64_t bits = s->len * 8;
  uint8_t pad = 0x80;
  tl__sha256_update(s, &pad, 1);
  pad = 0;
  while (s->nbuf != 56) tl__sha256_update(s, &pad, 1);
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
  tl__sha256_update(s, len, 8);
  for (int i = 0; i < 8; i++) {
    out[4 * i] = (uint8_t)(s->h[i] >> 24);
    out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
    out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
    out[4 * i + 3] = (uint8_t)s->h[i];
  }
  tl__wipe(s, sizeof *s);
}

/* ---- HMAC-SHA256 (RFC 2104) ---------------------------------------------------- */

void tl__hmac_init(tl_hmac_t *m, const void *key, size_t klen) {
  uint8_t k[64] = {0}, pad[64];
  if (klen > 64) {
    tl_sha256_t s;
    tl__sha256_init(&s);
    tl__sha256_update(&s, key, klen);
    tl__sha256_final(&s, k);
  } else if (klen) {
    memcpy(k, key, klen);
  }
  for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
  tl__sha256_init(&m->inner);
  tl__sha256_update(&m->inner, pad, 64);
  for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
  tl__sha256_init(&m->outer);
  tl__sha256_update(&m->outer, pad, 64);
  tl__wipe(k, sizeof k);
  tl__wipe(pad, sizeof pad);
}

void tl__hmac_update(tl_hmac_t *m, const void *data, size_t n) {
  tl__sha256_update(&m->inner, data, n);
}

void tl__hmac_final(tl_hmac_t *m, uint8_t out[32]) {
  uint8_t ih[32];
  tl__sha256_final(&m->inner, ih);
  tl__sha256_update(&m->outer, ih, sizeof ih);
  tl__sha256_final(&m->outer, out);
  tl__wipe(ih, sizeof ih);
}

int tl_sha256(const void *data, size_t n, uint8_t out[32]) {
  if ((!data && n) || !out) return TL_ERR_INVALID;
  tl_sha256_t s;
  tl__sha256_init(&s);
  tl__sha256_update(&s, data, n);
  tl__sha256_final(&s, out);
  return TL_OK;
}

int tl_hmac_sha256(const void *key, size_t klen, const void *data, size_t n, uint8_t out[32]) {
  if ((!key && klen) || (!data && n) || !out) return TL_ERR_INVALID;
  tl_hmac_t m;
  tl__hmac_init(&m, key, klen);
  tl__hmac_update(&m, data, n);
  tl__hmac_final(&m, out);
  return TL_OK;
}

/* ---- comparison, wiping, nonces ----------------------------------------------- */

int tl__ct_equal(const void *a, const void *b, size_t n) {
  const volatile uint8_t *x = a, *y = b;
  uint8_t d = 0;
  for (size_t i = 0; i < n; i++) d |= (uint8_t)(x[i] ^ y[i]);
  return d == 0;
}

void tl__wipe(void *p, size_t n) {
  volatile uint8_t *b = p;
  while (n--) *b++ = 0;
}

int tl__random(void *buf, size_t n) {
#if defined(__APPLE__)
  arc4random_buf(buf, n);
  return 0;
#else
  uint8_t *p = buf;
  size_t done = 0;
#if defined(__linux__) && defined(SYS_getrandom)
  while (done < n) {
    long r = syscall(SYS_getrandom, p + done, n - done, 0);
    if (r > 0) { done += (size_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    break; /* ENOSYS (an old kernel): /dev/urandom below */
  }
  if (done == n) return 0;
#endif
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  while (done < n) {
    ssize_t r = read(fd, p + done, n - done);
    if (r > 0) { done += (size_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    close(fd);
    if (r == 0) errno = EIO;
    return -1;
  }
  close(fd);
  return 0;
#endif
}
