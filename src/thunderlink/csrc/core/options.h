/*
 * The options table: every knob of tl_options_t, declared once.
 *
 * An X-macro file, without include guard: define TL_OPTION, include this
 * file, undefine it. core/options.c derives from it the defaults
 * (tl_options_default), the range checks (tl_options_check), the handshake
 * digest (tl__options_digest) and the description Python reads
 * (tl_option_info), from which thunderlink.config reads the environment and
 * bindings.Options, --help texts and the README's rows are made.
 *
 *   TL_OPTION(field, name, env, kind, unit, default, min, max, shared,
 *             choices, help)
 *
 * field    member of tl_options_t (tl.h), an integer type that holds max
 * name     Python's keyword (bindings.Options)
 * env      the environment variable that sets it
 * kind     TL_OPT_INT, TL_OPT_BYTES (sizes: 64K, 1M), TL_OPT_MS (stored in
 *          milliseconds, given in seconds) or TL_OPT_CHOICE (an index into
 *          choices)
 * unit     of the stored value, for --help ("" for plain counts)
 * min, max the range, inclusive; also the range from_env accepts
 * shared   1 (literally: it is pasted into a macro name; else 0) when
 *          every rank must use the same value: it goes into the
 *          handshake's digest, and a rank that differs is refused. The
 *          digest covers shared options in this file's order, so keep them
 *          in order (new ones at the end) or bump TL_PROTOCOL_VERSION.
 * choices  TL_OPT_CHOICE: the names of values 0, 1, ... separated by
 *          commas; names past max are understood but not available in this
 *          build. NULL otherwise.
 * help     one line for the README and --help, Markdown; "(same on every
 *          rank)" is added to shared options unless the text says so.
 *
 * Adding an option: a line here and its field in tl_options_t (tl.h, and
 * the copy in bindings/_cdef.h, which tests/test_cdef.py checks).
 * job_id is not a knob but the job's identity: it stays outside the table.
 */

TL_OPTION(connect_timeout_ms, "connect_timeout", "THUNDERLINK_CONNECT_TIMEOUT", TL_OPT_MS, "ms",
          60 * 1000, 1, 2000000000, 0, NULL,
          "seconds to connect to every peer at start-up")
TL_OPTION(timeout_ms, "timeout", "THUNDERLINK_TIMEOUT", TL_OPT_MS, "ms",
          600 * 1000, 1, 2000000000, 0, NULL,
          "seconds a collective may wait before it fails")
TL_OPTION(conns_per_peer, "conns_per_peer", "THUNDERLINK_CONNS", TL_OPT_INT, "",
          2, 1, TL_MAX_CONNS, 1, NULL,
          "TCP connections per cable between two ranks (per address dialled), striped; with 2 or "
          "more, the ring runs in both directions at once")
TL_OPTION(chunk_bytes, "chunk_bytes", "THUNDERLINK_CHUNK_BYTES", TL_OPT_BYTES, "B",
          512 << 10, 4096, TL_MAX_FRAME, 1, NULL,
          "largest pipelined chunk of the ring")
TL_OPTION(algo_threshold, "algo_threshold", "THUNDERLINK_ALGO_THRESHOLD", TL_OPT_BYTES, "B",
          512 << 10, 0, (int64_t)1 << 62, 1, NULL,
          "with `auto`, one round of messages while each rank sends at most this much (for "
          "all_reduce, its buffer times ranks \u2212 1); the ring above")
TL_OPTION(algo, "algo", "THUNDERLINK_ALGO", TL_OPT_CHOICE, "",
          TL_ALGO_AUTO, TL_ALGO_AUTO, TL_ALGO_MESH, 1, "auto,ring,oneshot,mesh",
          "`auto`, `ring`, `oneshot` or `mesh` (direct exchange with every peer at once, each over "
          "its own cable; needs a link between every pair): the algorithm of all_reduce, "
          "all_gather and reduce_scatter")
TL_OPTION(spin_us, "spin_us", "THUNDERLINK_SPIN_US", TL_OPT_INT, "us",
          50, 0, 1000000, 0, NULL,
          "microseconds to poll before sleeping, for small operations; over shared memory every "
          "wait polls 4 times as long past the last byte that moved (`0`: never poll)")
TL_OPTION(stripe_min_bytes, "stripe_min_bytes", "THUNDERLINK_STRIPE_MIN_BYTES", TL_OPT_BYTES, "B",
          256 << 10, 0, (int64_t)1 << 62, 1, NULL,
          "messages below this travel on one connection")
TL_OPTION(pipeline_depth, "pipeline_depth", "THUNDERLINK_PIPELINE_DEPTH", TL_OPT_INT, "",
          2, 1, 64, 1, NULL,
          "chunks in flight per ring direction")
TL_OPTION(sockbuf_bytes, "sockbuf_bytes", "THUNDERLINK_SOCKBUF_BYTES", TL_OPT_BYTES, "B",
          4 << 20, 0, INT32_MAX, 0, NULL,
          "`SO_SNDBUF`/`SO_RCVBUF` of every connection, where the kernel grants that much (Linux "
          "caps it at `net.core.rmem_max`/`wmem_max`); otherwise, and with `0`, the kernel's "
          "autotuning")
TL_OPTION(log_level, "log_level", "THUNDERLINK_DEBUG", TL_OPT_CHOICE, "",
          TL_LOG_WARN, TL_LOG_NONE, TL_LOG_TRACE, 0, "none,warn,info,trace",
          "the core's log level on stderr: `none`, `warn`, `info` (also one line per link: its "
          "transport and channels) or `trace`")
TL_OPTION(transport, "transport", "THUNDERLINK_TRANSPORT", TL_OPT_CHOICE, "",
          TL_TRANSPORT_AUTO, TL_TRANSPORT_AUTO, TL_TRANSPORT_RDMA, 1, "auto,tcp,shm,rdma",
          "`auto`: shared memory between ranks of one host; between hosts RDMA where both ends "
          "have an ibverbs device, else TCP; `tcp`: TCP everywhere; `shm`: shared memory "
          "everywhere, an error if two linked ranks are on different hosts; `rdma`: RDMA "
          "everywhere (ibverbs: `THUNDERLINK_IBV_LIB`, `THUNDERLINK_IBV_DEVICE`), an error where "
          "no device is available. Same on every rank")
TL_OPTION(heartbeat_ms, "heartbeat", "THUNDERLINK_HEARTBEAT", TL_OPT_MS, "ms",
          10 * 1000, 0, 3600 * 1000, 1, NULL,
          "seconds of silence after which a peer that a collective waits on is declared lost "
          "(stopped, hung, or its cable pulled): every process sends each peer a heartbeat "
          "every fifth of this, even while its program computes elsewhere; `0`: off (a hung "
          "peer is then found only by `THUNDERLINK_TIMEOUT`)")
TL_OPTION(listen_all, "listen_all", "THUNDERLINK_LISTEN_ALL", TL_OPT_INT, "",
          0, 0, 1, 0, NULL,
          "`1`: listen on every interface of this host (at the hostfile's port), not only on "
          "this rank's hostfile addresses; for hosts whose hostfile address is not one of their "
          "own (NAT, a name that resolves elsewhere)")
TL_OPTION(ibv_zcopy_bytes, "ibv_zcopy", "THUNDERLINK_IBV_ZCOPY", TL_OPT_BYTES, "B",
          256 << 10, 0, 1 << 30, 0, NULL,
          "RDMA: messages of at least this many bytes go zero copy (an RDMA write straight from "
          "the sender's buffer into the receiver's, through a registration cache) instead of "
          "through the staging slots; `0`: off. The two ends of a link use the larger of their "
          "values, and off if either is off")
TL_OPTION(ibv_mr_cache, "ibv_mr_cache", "THUNDERLINK_IBV_MR_CACHE", TL_OPT_INT, "",
          8, 1, 1000, 0, NULL,
          "RDMA: memory regions each link may hold for zero copy at once (least recently used "
          "evicted; Apple's devices allow about 100 in all, 10 queue pairs, 2 per link)")
TL_OPTION(tcp_threads, "tcp_threads", "THUNDERLINK_TCP_THREADS", TL_OPT_CHOICE, "",
          TL_TCP_THREADS_AUTO, TL_TCP_THREADS_AUTO, TL_TCP_THREADS_ON, 0, "auto,off,on",
          "`on`: the large frames of each TCP connection move on two threads of its own, one per "
          "direction, which sleep in the kernel while they wait, so that the copies into and out "
          "of the kernel run on other cores than the reductions; `off`: the calling thread drives "
          "every connection; `auto`: `on` where the CPUs this process may use are at least four "
          "times the ranks on this host")
TL_OPTION(tcp_threads_min_bytes, "tcp_threads_min_bytes", "THUNDERLINK_TCP_THREADS_MIN_BYTES",
          TL_OPT_BYTES, "B", 2 << 20, 0, (int64_t)1 << 62, 0, NULL,
          "operations (all_sum: the buffer) below this size move their TCP bytes on the calling "
          "thread even where `THUNDERLINK_TCP_THREADS` is on: their hand-overs to the threads "
          "would cost more than the threads save")
