/*
 * softverbs as an rdma-core provider plugin (lib<name>-rdmav<PABI>.so), so
 * that the real libibverbs.so.1 loads it like any hardware driver and
 * unmodified verbs programs (ibv_rc_pingpong, ibv_uc_pingpong, perftest) run
 * over softverbs. This is a conformance harness, not part of the package:
 * it is built by bench/rdma_conformance/conformance.py against the private
 * headers of an rdma-core build tree (infiniband/driver.h, config.h), never
 * by setup.py, and the provider ABI it speaks is the one of that tree only.
 *
 * How the two halves fit
 *   softverbs.c is compiled unchanged into the same library, with each of
 *   its exported ibv_* functions renamed to svp_* on the compiler's command
 *   line (the build script derives the list from softverbs.c), so it does
 *   not collide with libibverbs' own symbols; a version script keeps
 *   everything but the provider's registration symbol local.
 *   libibverbs enumerates the devices from sysfs (SYSFS_PATH), opens
 *   /dev/infiniband/uverbsN as the command descriptor and calls
 *   alloc_context below. That context (the library's verbs_context) wraps a
 *   softverbs context of the device with the same name; the op table
 *   forwards the control path to softverbs and installs softverbs' own
 *   data-path functions (post_send, post_recv, poll_cq, req_notify_cq), so
 *   the inline ibv_post_send() of the program calls straight into softverbs
 *   as it would call into a hardware provider.
 *
 * Objects: PDs, CQs and QPs are softverbs' objects; libibverbs then sets
 * their context member to its own context (ibv_alloc_pd, verbs_init_cq) and
 * so do we for QPs (softverbs points them at its own context), which is
 * what the inline data path and get_ops() dispatch on. softverbs does not
 * read those members back. MRs are wrapped in a struct verbs_mr, because
 * ibv_dereg_mr reads verbs_mr's mr_type and access behind the ibv_mr.
 *
 * Not covered: anything libibverbs implements as a kernel command rather
 * than a provider op (completion channels, async events, ibv_cmd_*): the
 * harness gives the library /dev/full as the command device, so those fail
 * with ENOSPC instead of silently "succeeding" as they would on /dev/null.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <infiniband/driver.h>
#include <infiniband/verbs.h>

/* softverbs.c, renamed (see the build script). The types are rdma-core's;
 * softverbs' own ibv_abi.h declares the same layouts (tests/test_ibv_abi.py
 * checks them against the system's rdma-core header). */
struct ibv_device **svp_get_device_list(int *num_devices);
void svp_free_device_list(struct ibv_device **list);
struct ibv_context *svp_open_device(struct ibv_device *device);
int svp_close_device(struct ibv_context *context);
int svp_query_device(struct ibv_context *context, struct ibv_device_attr *attr);
int svp_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *attr);
struct ibv_pd *svp_alloc_pd(struct ibv_context *context);
int svp_dealloc_pd(struct ibv_pd *pd);
struct ibv_mr *svp_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t length, uint64_t iova, unsigned int access);
int svp_dereg_mr(struct ibv_mr *mr);
struct ibv_cq *svp_create_cq(struct ibv_context *context, int cqe, void *cq_context,
                             struct ibv_comp_channel *channel, int comp_vector);
int svp_destroy_cq(struct ibv_cq *cq);
struct ibv_qp *svp_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr);
int svp_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int mask);
int svp_query_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int mask, struct ibv_qp_init_attr *init);
int svp_destroy_qp(struct ibv_qp *qp);

struct prov_device {
    struct verbs_device vdev; /* first */
};

struct prov_context {
    struct verbs_context vctx; /* the library's */
    struct ibv_context *sv;    /* softverbs' context of the same device */
};

struct prov_mr {
    struct verbs_mr vmr; /* what the program holds */
    struct ibv_mr *sv;
};

static struct ibv_context *sv_of(struct ibv_context *ctx)
{
    return container_of(verbs_get_ctx(ctx), struct prov_context, vctx)->sv;
}

/* softverbs' device named like the sysfs device, or NULL. */
static struct ibv_device *sv_device(const char *name)
{
    struct ibv_device **list = svp_get_device_list(NULL);
    struct ibv_device *found = NULL;
    for (int i = 0; list && list[i]; i++)
        if (!strcmp(list[i]->name, name))
            found = list[i];
    svp_free_device_list(list); /* the devices outlive the list */
    return found;
}

static bool prov_match_device(struct verbs_sysfs_dev *sysfs_dev)
{
    return sv_device(sysfs_dev->ibdev_name) != NULL;
}

static struct verbs_device *prov_alloc_device(struct verbs_sysfs_dev *sysfs_dev)
{
    struct prov_device *d = calloc(1, sizeof *d);
    return d ? &d->vdev : NULL;
}

static void prov_uninit_device(struct verbs_device *vdev)
{
    free(container_of(vdev, struct prov_device, vdev));
}

static int prov_query_device_ex(struct ibv_context *ctx, const struct ibv_query_device_ex_input *input,
                               struct ibv_device_attr_ex *attr, size_t attr_size)
{
    if (input && input->comp_mask)
        return EINVAL;
    struct ibv_device_attr_ex ex = {0};
    int rc = svp_query_device(sv_of(ctx), &ex.orig_attr);
    if (rc)
        return rc;
    memcpy(attr, &ex, attr_size < sizeof ex ? attr_size : sizeof ex);
    return 0;
}

static int prov_query_port(struct ibv_context *ctx, uint8_t port_num, struct ibv_port_attr *attr)
{
    return svp_query_port(sv_of(ctx), port_num, attr);
}

static struct ibv_pd *prov_alloc_pd(struct ibv_context *ctx)
{
    return svp_alloc_pd(sv_of(ctx)); /* libibverbs sets pd->context */
}

static struct ibv_mr *prov_reg_mr(struct ibv_pd *pd, void *addr, size_t length, uint64_t iova, int access)
{
    struct prov_mr *m = calloc(1, sizeof *m);
    if (!m) {
        errno = ENOMEM;
        return NULL;
    }
    m->sv = svp_reg_mr_iova2(pd, addr, length, iova, (unsigned int)access);
    if (!m->sv) {
        int e = errno;
        free(m);
        errno = e;
        return NULL;
    }
    m->vmr.mr_type = IBV_MR_TYPE_MR;
    m->vmr.access = access;
    m->vmr.ibv_mr.handle = m->sv->handle;
    m->vmr.ibv_mr.lkey = m->sv->lkey;
    m->vmr.ibv_mr.rkey = m->sv->rkey;
    return &m->vmr.ibv_mr; /* libibverbs sets context, pd, addr, length */
}

static int prov_dereg_mr(struct verbs_mr *vmr)
{
    struct prov_mr *m = container_of(vmr, struct prov_mr, vmr);
    int rc = svp_dereg_mr(m->sv);
    if (!rc)
        free(m);
    return rc;
}

static struct ibv_cq *prov_create_cq(struct ibv_context *ctx, int cqe, struct ibv_comp_channel *channel,
                                       int comp_vector)
{
    if (channel) { /* a library channel is a kernel object: there is none */
        errno = EOPNOTSUPP;
        return NULL;
    }
    return svp_create_cq(sv_of(ctx), cqe, NULL, NULL, comp_vector); /* verbs_init_cq follows */
}

static struct ibv_qp *prov_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr)
{
    struct ibv_qp *qp = svp_create_qp(pd, attr);
    if (qp)
        qp->context = pd->context; /* the library's: get_ops() and the inline data path */
    return qp;
}

static void prov_free_context(struct ibv_context *ctx)
{
    struct prov_context *c = container_of(verbs_get_ctx(ctx), struct prov_context, vctx);
    /* EBUSY (objects still open) leaves softverbs' context alive, as the
     * kernel would clean up after a real provider. */
    svp_close_device(c->sv);
    verbs_uninit_context(&c->vctx);
    free(c);
}

static const struct verbs_context_ops prov_ctx_ops = {
    .query_device_ex = prov_query_device_ex,
    .query_port = prov_query_port,
    .alloc_pd = prov_alloc_pd,
    .dealloc_pd = svp_dealloc_pd,
    .reg_mr = prov_reg_mr,
    .dereg_mr = prov_dereg_mr,
    .create_cq = prov_create_cq,
    .destroy_cq = svp_destroy_cq,
    .create_qp = prov_create_qp,
    .modify_qp = svp_modify_qp,
    .query_qp = svp_query_qp,
    .destroy_qp = svp_destroy_qp,
    .free_context = prov_free_context,
};

static struct verbs_context *prov_alloc_context(struct ibv_device *ibdev, int cmd_fd, void *private_data)
{
    struct ibv_device *d = sv_device(ibdev->name);
    if (!d) {
        close(cmd_fd);
        errno = ENODEV;
        return NULL;
    }
    struct prov_context *c = verbs_init_and_alloc_context(ibdev, cmd_fd, c, vctx, RDMA_DRIVER_UNKNOWN);
    if (!c)
        return NULL;
    c->sv = svp_open_device(d);
    if (!c->sv)
        goto fail;
    /* The library would allocate the async event descriptor from the
     * kernel; softverbs has its own (a pipe that never reports events). The
     * library closes what it is given. */
    c->vctx.context.async_fd = fcntl(c->sv->async_fd, F_DUPFD_CLOEXEC, 0);
    if (c->vctx.context.async_fd < 0)
        goto fail;
    c->vctx.context.num_comp_vectors = c->sv->num_comp_vectors;

    struct verbs_context_ops ops = prov_ctx_ops;
    ops.post_send = c->sv->ops.post_send;
    ops.post_recv = c->sv->ops.post_recv;
    ops.poll_cq = c->sv->ops.poll_cq;
    ops.req_notify_cq = c->sv->ops.req_notify_cq;
    verbs_set_ops(&c->vctx, &ops);
    return &c->vctx;

fail:;
    int e = errno;
    if (c->sv)
        svp_close_device(c->sv);
    verbs_uninit_context(&c->vctx);
    free(c);
    errno = e;
    return NULL;
}

static const struct verbs_device_ops prov_dev_ops = {
    .name = "softverbs",
    .match_min_abi_version = 1,
    .match_max_abi_version = 1,
    .match_device = prov_match_device,
    .alloc_device = prov_alloc_device,
    .uninit_device = prov_uninit_device,
    .alloc_context = prov_alloc_context,
};
PROVIDER_DRIVER(softverbs, prov_dev_ops);
