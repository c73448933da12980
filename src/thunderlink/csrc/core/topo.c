/*
 * Topology: which ranks share a link, over which cables, who listens for it,
 * and the ring order. Pure functions of the endpoint table, which every rank
 * declares identically, so every rank (and every tool: the hostfile checks,
 * thunderlink doctor) derives the same answers from one implementation.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Endpoints of `owner` that `from` should connect to: those facing `from`,
 * else those facing any rank. Returns how many (indices into out). */
static int targets(const tl_endpoint_t *eps, int neps, int owner, int from, int *out,
                   int cap) {
  int n = 0;
  for (int pass = 0; pass < 2 && n == 0; pass++)
    for (int i = 0; i < neps && n < cap; i++)
      if (eps[i].owner == owner && eps[i].facing == (pass == 0 ? from : -1))
        out[n++] = i;
  return n;
}

int tl__link_plan(const tl_endpoint_t *eps, int neps, int a, int b, int *tg, int *nt) {
  int lo = a < b ? a : b, hi = a < b ? b : a;
  if (a == b) return *nt = 0, -1;
  if ((*nt = targets(eps, neps, lo, hi, tg, TL_MAX_CONNS))) return lo;
  if ((*nt = targets(eps, neps, hi, lo, tg, TL_MAX_CONNS))) return hi;
  return -1;
}

int tl__source_ep(const tl_endpoint_t *eps, int neps, int rank, int peer, int which) {
  int n = 0;
  for (int i = 0; i < neps; i++)
    if (eps[i].owner == rank && eps[i].facing == peer && n++ == which) return i;
  return -1;
}

int tl__mesh_kind(const tl_endpoint_t *eps, int neps, int n) {
  int kind = TL_MESH_CABLED, tg[TL_MAX_CONNS], nt;
  for (int a = 0; a < n; a++)
    for (int b = a + 1; b < n; b++) {
      int acc = tl__link_plan(eps, neps, a, b, tg, &nt);
      if (acc < 0) return 0;
      /* An address facing the other rank is that pair's own cable. */
      for (int i = 0; i < nt; i++)
        if (eps[tg[i]].facing < 0) kind = 1;
    }
  return kind;
}

/* ---- the ring order -----------------------------------------------------------
 *
 * A ring whose neighbours share links is a Hamiltonian cycle of the link
 * graph, which no known algorithm finds in polynomial time in general. The
 * graphs people cable are easy (rings, meshes, rings with chords), so: rank
 * order when it works; a clear error when a rank has fewer than two links;
 * else a depth-first search that tries the neighbour with the fewest onward
 * links first (Warnsdorff's rule), prunes a partial path that leaves some
 * rank with fewer than two ways in and out, and gives up with a clear error
 * after a fixed number of steps. Each step costs O(n^2), so the whole search
 * is bounded by TL_RING_SEARCH_STEPS x n^2 whatever the graph.
 */

#define TL_RING_SEARCH_STEPS 200000
/* Beyond this many ranks the search's n x n tables grow large: order the
 * ring in the hostfile. */
#define TL_RING_SEARCH_MAX_RANKS 512

typedef struct search {
  int n;
  const uint8_t *adj; /* n x n */
  int32_t *path;
  uint8_t *used;
  int32_t *cand, *deg; /* n x n: row `len` holds the candidates at depth len */
  long steps;
} search_t;

/* Can the ranks not on the path still be threaded in? Each needs two links
 * to ranks not on the path or to the path's two ends (one each when n is 2). */
static int feasible(const search_t *S, int len) {
  int first = S->path[0], last = S->path[len - 1];
  for (int v = 0; v < S->n; v++) {
    if (S->used[v]) continue;
    int ways = 0;
    for (int w = 0; w < S->n && ways < 2; w++)
      if (S->adj[v * S->n + w] && (!S->used[w] || w == first || w == last)) ways++;
    if (ways < 2) return 0;
  }
  return 1;
}

/* 1 found, 0 not along this path, -1 out of steps. */
static int extend(search_t *S, int len) {
  int n = S->n, last = S->path[len - 1];
  if (len == n) return S->adj[last * n + S->path[0]];
  if (++S->steps > TL_RING_SEARCH_STEPS) return -1;
  if (!feasible(S, len)) return 0;
  /* Candidates by onward degree, fewest first. */
  int32_t *cand = S->cand + (size_t)len * (size_t)n, *deg = S->deg + (size_t)len * (size_t)n;
  int nc = 0;
  for (int v = 0; v < n; v++) {
    if (S->used[v] || !S->adj[last * n + v]) continue;
    int d = 0;
    for (int w = 0; w < n; w++) d += !S->used[w] && w != v && S->adj[v * n + w];
    int i = nc++;
    while (i > 0 && (deg[i - 1] > d || (deg[i - 1] == d && cand[i - 1] > v))) {
      cand[i] = cand[i - 1];
      deg[i] = deg[i - 1];
      i--;
    }
    cand[i] = v;
    deg[i] = d;
  }
  for (int i = 0; i < nc; i++) {
    S->path[len] = cand[i];
    S->used[cand[i]] = 1;
    int r = extend(S, len + 1);
    if (r) return r;
    S->used[cand[i]] = 0;
  }
  return 0;
}

int tl__find_ring(const tl_endpoint_t *eps, int neps, int n, int32_t *order, char *why,
                  size_t cap) {
  for (int i = 0; i < n; i++) order[i] = i;
  if (n <= 2) return TL_OK;
  /* Rank order first: n link plans, whatever n. The n x n table below (and
   * its n^2 link plans, each a scan of the endpoints) is built only for a
   * search, so a hostfile of many thousand ranks costs neither n^2 memory
   * nor n^3 time. */
  int tg[TL_MAX_CONNS], nt;
  int ok = 1;
  for (int i = 0; i < n && ok; i++) ok = tl__link_plan(eps, neps, i, (i + 1) % n, tg, &nt) >= 0;
  if (ok) return TL_OK;
  if (n > TL_RING_SEARCH_MAX_RANKS) {
    snprintf(why, cap, "ranks 0..%d in order do not form a ring along the links, and "
             "thunderlink searches for one only up to %d ranks: give the order "
             "explicitly (\"ring\" in a thunderlink hostfile)", n - 1,
             TL_RING_SEARCH_MAX_RANKS);
    return TL_ERR_CONFIG;
  }
  uint8_t *adj = calloc((size_t)n * (size_t)n + (size_t)n, 1);
  if (!adj) return snprintf(why, cap, "out of memory"), TL_ERR_NOMEM;
  for (int a = 0; a < n; a++)
    for (int b = a + 1; b < n; b++)
      adj[a * n + b] = adj[b * n + a] = tl__link_plan(eps, neps, a, b, tg, &nt) >= 0;
  int rc = TL_OK;
  for (int v = 0; v < n; v++) {
    int d = 0, only = -1;
    for (int w = 0; w < n; w++)
      if (adj[v * n + w]) d++, only = w;
    if (d < 2) {
      rc = TL_ERR_CONFIG;
      if (d == 0)
        snprintf(why, cap, "rank %d shares a link with no other rank, so no ring "
                 "can include it: give it an address the others can reach", v);
      else
        snprintf(why, cap, "rank %d shares a link with rank %d only, and a ring "
                 "needs two neighbours: add a cable or a common address to a "
                 "second rank", v, only);
      goto done;
    }
  }
  search_t S = {n, adj, order, adj + (size_t)n * (size_t)n, NULL, NULL, 0};
  S.cand = malloc(2 * (size_t)n * (size_t)n * sizeof *S.cand);
  if (!S.cand) {
    rc = TL_ERR_NOMEM;
    snprintf(why, cap, "out of memory");
    goto done;
  }
  S.deg = S.cand + (size_t)n * (size_t)n;
  order[0] = 0;
  S.used[0] = 1;
  int r = extend(&S, 1);
  free(S.cand);
  if (r == 0) {
    rc = TL_ERR_CONFIG;
    snprintf(why, cap, "no order of the %d ranks forms a ring in which neighbours "
             "share a link: add cables or common addresses", n);
  } else if (r < 0) {
    rc = TL_ERR_CONFIG;
    snprintf(why, cap, "no ring through the links of the %d ranks was found within "
             "%d search steps: give the order explicitly (\"ring\" in a thunderlink "
             "hostfile)", n, TL_RING_SEARCH_STEPS);
  }
done:
  if (rc)
    for (int i = 0; i < n; i++) order[i] = i;
  free(adj);
  return rc;
}
