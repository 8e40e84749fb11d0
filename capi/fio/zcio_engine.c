/*
 * fio external ioengine for zcio, through libzcio (zcio.h).
 *
 *   ioengine=external:/path/to/zcio_engine.so
 *   zcio_server=HOST:PORT     server address (default: the config's client.connect)
 *   zcio_config=FILE          zcio TOML configuration file
 *   zcio_set=K=V[,K=V...]     configuration overrides, as `zcio --set` (comma separated)
 *   zero_copy=1|0             1 (default): fio's I/O buffers are zcio pool buffers
 *                             (zcio_get_buffer); writes go out with zcio_zero_writev_async,
 *                             reads come back in pool buffers filled by the transport
 *                             (zcio_zero_readv_async) that become the io_u's buffer.
 *                             0: zcio_preadv_async / zcio_pwritev_async on fio's memory.
 *
 * Asynchronous: queue() puts each request on the wire and returns FIO_Q_QUEUED, so
 * `iodepth` requests are really in flight; commit() has nothing left to do; getevents()
 * reaps completions with zcio_reap (no callbacks, no extra thread); event() returns them.
 * One zcio instance (one connection) per fio job thread.
 *
 * Built against the configured source of the installed fio (ci/setup), see capi/fio/build.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fio.h"
#include "optgroup.h"

#include "zcio.h"

struct zcio_fio_options {
	void *pad; /* fio: an option's offset must not be 0 */
	char *server;
	char *config;
	char *set;
	unsigned int zero_copy;
};

/* Per io_u: where a zero-copy read's buffers land. */
struct zcio_iou {
	struct iovec iov[4];
	int iovcnt;
};

struct zcio_data {
	zcio_t *z;
	zcio_event *events;
	struct io_u **done;
	unsigned long long max_bs;
	unsigned long long read_copies; /* zero-copy reads that had to be copied */
};

static struct fio_option options[] = {
	{
		.name = "zcio_server",
		.lname = "zcio server address",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct zcio_fio_options, server),
		.help = "zcio server HOST:PORT",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "zcio_config",
		.lname = "zcio configuration file",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct zcio_fio_options, config),
		.help = "zcio TOML configuration file",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "zcio_set",
		.lname = "zcio configuration overrides",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct zcio_fio_options, set),
		.help = "KEY=VALUE[,KEY=VALUE...] as zcio --set",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "zero_copy",
		.lname = "zcio zero-copy buffers",
		.type = FIO_OPT_BOOL,
		.off1 = offsetof(struct zcio_fio_options, zero_copy),
		.help = "1: I/O buffers are zcio pool buffers and I/O uses the zero-copy calls",
		.def = "1",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = NULL,
	},
};

static int zcio_fail(struct thread_data *td, const char *what) {
	int e = errno ? errno : EIO;
	log_err("zcio engine: %s: %s\n", what, zcio_last_error());
	td_verror(td, e, what);
	return 1;
}

static int apply_sets(struct thread_data *td, zcio_t *z, const char *sets) {
	char *copy = strdup(sets), *save = NULL;
	int ret = 0;
	for (char *kv = strtok_r(copy, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(kv, '=');
		if (!eq) {
			log_err("zcio engine: zcio_set entry '%s' is not KEY=VALUE\n", kv);
			td_verror(td, EINVAL, "zcio_set");
			ret = 1;
			break;
		}
		*eq = '\0';
		if (zcio_set(z, kv, eq + 1) != 0) {
			ret = zcio_fail(td, "zcio_set");
			break;
		}
	}
	free(copy);
	return ret;
}

/* A connected instance with the job's options (limits.max_in_flight raised to iodepth). */
static zcio_t *zcio_fio_connect(struct thread_data *td) {
	struct zcio_fio_options *o = td->eo;
	char depth[32];
	zcio_t *z = zcio_new(o->config);
	if (!z) {
		zcio_fail(td, "zcio_new");
		return NULL;
	}
	snprintf(depth, sizeof depth, "%u", td->o.iodepth + 8 > 64 ? td->o.iodepth + 8 : 64);
	if (zcio_set(z, "limits.max_in_flight", depth) != 0) {
		zcio_fail(td, "zcio_set limits.max_in_flight");
		goto fail;
	}
	if (o->set && apply_sets(td, z, o->set))
		goto fail;
	if (zcio_connect(z, o->server) != 0) {
		zcio_fail(td, "zcio_connect");
		goto fail;
	}
	return z;
fail:
	zcio_fini(z);
	return NULL;
}

/* In the job's own process or thread (the connection's threads do not survive fork). */
static int zcio_fio_init(struct thread_data *td) {
	struct zcio_data *d = calloc(1, sizeof *d);
	if (!d)
		return 1;
	td->io_ops_data = d;
	d->events = calloc(td->o.iodepth, sizeof *d->events);
	d->done = calloc(td->o.iodepth, sizeof *d->done);
	d->max_bs = td_max_bs(td);
	if (!d->events || !d->done)
		return 1;
	d->z = zcio_fio_connect(td);
	return d->z ? 0 : 1;
}

/* zero_copy=1: after fio has set up its buffers, each io_u's buffer becomes a pool buffer
 * (fio's initial contents copied once, here; never per I/O). */
static int zcio_fio_post_init(struct thread_data *td) {
	struct zcio_fio_options *o = td->eo;
	struct zcio_data *d = td->io_ops_data;
	struct io_u *io_u;
	int i;
	if (!o->zero_copy)
		return 0;
	io_u_qiter(&td->io_u_all, io_u, i) {
		void *p = zcio_get_buffer(d->z, d->max_bs);
		if (!p)
			return zcio_fail(td, "zcio_get_buffer");
		if (io_u->buf)
			memcpy(p, io_u->buf, d->max_bs);
		io_u->buf = p;
	}
	return 0;
}

static int zcio_fio_io_u_init(struct thread_data *td, struct io_u *io_u) {
	(void)td;
	io_u->engine_data = calloc(1, sizeof(struct zcio_iou));
	return io_u->engine_data ? 0 : 1;
}

static void zcio_fio_io_u_free(struct thread_data *td, struct io_u *io_u) {
	(void)td;
	free(io_u->engine_data);
	io_u->engine_data = NULL;
}

static enum fio_q_status zcio_fio_queue(struct thread_data *td, struct io_u *io_u) {
	struct zcio_fio_options *o = td->eo;
	struct zcio_iou *iou = io_u->engine_data;
	zcio_fd_t *fd = FILE_ENG_DATA(io_u->file);
	/* A pool buffer, used whole from its start (fio moves xfer_buf on a requeued
	 * remainder: that part goes the plain way). */
	int zc = o->zero_copy && io_u->xfer_buf == io_u->buf;
	struct iovec v = {io_u->xfer_buf, io_u->xfer_buflen};
	int r;

	fio_ro_check(td, io_u);
	switch (io_u->ddir) {
	case DDIR_READ:
		if (zc) {
			iou->iovcnt = 4;
			r = zcio_zero_readv_async(fd, io_u->xfer_buflen, io_u->offset, iou->iov,
						  &iou->iovcnt, NULL, io_u);
		} else {
			iou->iovcnt = 0;
			r = zcio_preadv_async(fd, &v, 1, io_u->offset, 0, NULL, io_u);
		}
		break;
	case DDIR_WRITE:
		iou->iovcnt = 0;
		r = zc ? zcio_zero_writev_async(fd, &v, 1, io_u->offset, NULL, io_u)
		       : zcio_pwritev_async(fd, &v, 1, io_u->offset, 0, NULL, io_u);
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
		r = zcio_fsync(fd);
		io_u->error = r ? errno : 0;
		return FIO_Q_COMPLETED;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (r != 0) {
		io_u->error = errno ? errno : EIO;
		log_err("zcio engine: submit: %s\n", zcio_last_error());
		return FIO_Q_COMPLETED;
	}
	return FIO_Q_QUEUED;
}

/* Requests are on the wire as soon as queue() returns. */
static int zcio_fio_commit(struct thread_data *td) {
	(void)td;
	return 0;
}

/* A zero-copy read finished: its pool buffer becomes the io_u's buffer (the previous one
 * goes back to the pool), so fio verifies the bytes the transport put there. */
static void take_read(struct zcio_data *d, struct io_u *io_u, ssize_t ret) {
	struct zcio_iou *iou = io_u->engine_data;
	if (iou->iovcnt == 0)
		return;
	if (ret > 0 && iou->iovcnt == 1 && iou->iov[0].iov_base &&
	    zcio_buffer_size(d->z, iou->iov[0].iov_base) >= (ssize_t)d->max_bs) {
		zcio_free_buffer(d->z, io_u->buf);
		io_u->buf = iou->iov[0].iov_base;
		io_u->xfer_buf = io_u->buf;
	} else {
		size_t pos = 0;
		for (int k = 0; k < iou->iovcnt; k++) {
			memcpy((char *)io_u->xfer_buf + pos, iou->iov[k].iov_base, iou->iov[k].iov_len);
			pos += iou->iov[k].iov_len;
			zcio_free_buffer(d->z, iou->iov[k].iov_base);
		}
		if (ret > 0)
			d->read_copies++;
	}
	iou->iovcnt = 0;
}

static int zcio_fio_getevents(struct thread_data *td, unsigned int min, unsigned int max,
			      const struct timespec *t) {
	struct zcio_data *d = td->io_ops_data;
	int timeout = t ? (int)(t->tv_sec * 1000 + t->tv_nsec / 1000000) : -1;
	int n = zcio_reap(d->z, d->events, (int)min, (int)max, timeout);
	if (n < 0) {
		zcio_fail(td, "zcio_reap");
		return -errno;
	}
	for (int i = 0; i < n; i++) {
		struct io_u *io_u = d->events[i].data;
		ssize_t ret = d->events[i].ret;
		if (ret < 0) {
			io_u->error = d->events[i].error;
		} else {
			io_u->error = 0;
			io_u->resid = io_u->xfer_buflen - (unsigned long long)ret;
		}
		if (io_u->ddir == DDIR_READ)
			take_read(d, io_u, ret);
		d->done[i] = io_u;
	}
	return n;
}

static struct io_u *zcio_fio_event(struct thread_data *td, int event) {
	struct zcio_data *d = td->io_ops_data;
	return d->done[event];
}

static int zcio_fio_open_file(struct thread_data *td, struct fio_file *f) {
	struct zcio_data *d = td->io_ops_data;
	int flags = td_write(td) ? O_RDWR : O_RDONLY;
	zcio_fd_t *fd;
	if (td->o.odirect)
		flags |= O_DIRECT;
	fd = td_write(td) ? zcio_creat(d->z, f->file_name, flags, 0644)
			  : zcio_open(d->z, f->file_name, flags);
	if (!fd)
		return zcio_fail(td, "zcio_open");
	FILE_SET_ENG_DATA(f, fd);
	return 0;
}

static int zcio_fio_close_file(struct thread_data *td, struct fio_file *f) {
	zcio_fd_t *fd = FILE_ENG_DATA(f);
	FILE_SET_ENG_DATA(f, NULL);
	if (fd && zcio_close(fd) != 0)
		return zcio_fail(td, "zcio_close");
	return 0;
}

/* Called by fio's setup in the parent, before init: a short-lived connection of its own. */
static int zcio_fio_get_file_size(struct thread_data *td, struct fio_file *f) {
	struct zcio_data *d = td->io_ops_data;
	struct stat st;
	zcio_fd_t *fd;
	zcio_t *z;
	int ret = 0;
	if (fio_file_size_known(f))
		return 0;
	z = d && d->z ? d->z : zcio_fio_connect(td);
	if (!z)
		return 1;
	fd = zcio_open(z, f->file_name, O_RDONLY);
	if (!fd) {
		/* Not there yet: fio takes the job's size (a write job creates the file). */
		f->real_file_size = -1ULL;
	} else if (zcio_fstat(fd, &st) != 0) {
		ret = zcio_fail(td, "zcio_fstat");
	} else {
		f->real_file_size = st.st_size;
		/* A write job may grow it to the job's size. */
		if (td_write(td) && td->o.size / td->o.nr_files > f->real_file_size)
			f->real_file_size = td->o.size / td->o.nr_files;
		fio_file_set_size_known(f);
	}
	if (fd)
		zcio_close(fd);
	if (z != (d ? d->z : NULL))
		zcio_fini(z);
	return ret;
}

static int zcio_fio_unlink_file(struct thread_data *td, struct fio_file *f) {
	struct zcio_data *d = td->io_ops_data;
	zcio_t *z = d && d->z ? d->z : zcio_fio_connect(td);
	int ret = 0;
	if (!z)
		return 1;
	if (zcio_unlink(z, f->file_name) != 0 && errno != ENOENT)
		ret = zcio_fail(td, "zcio_unlink");
	if (z != (d ? d->z : NULL))
		zcio_fini(z);
	return ret;
}

static void zcio_fio_cleanup(struct thread_data *td) {
	struct zcio_data *d = td->io_ops_data;
	if (!d)
		return;
	if (d->read_copies)
		log_info("zcio engine: %llu zero-copy reads were copied into fio's buffer\n",
			 d->read_copies);
	/* Frees every pool buffer, including the io_u buffers post_init installed. */
	if (d->z)
		zcio_fini(d->z);
	free(d->events);
	free(d->done);
	free(d);
	td->io_ops_data = NULL;
}

struct ioengine_ops ioengine = {
	.name = "zcio",
	.version = FIO_IOOPS_VERSION,
	.flags = FIO_DISKLESSIO | FIO_NODISKUTIL,
	.init = zcio_fio_init,
	.post_init = zcio_fio_post_init,
	.queue = zcio_fio_queue,
	.commit = zcio_fio_commit,
	.getevents = zcio_fio_getevents,
	.event = zcio_fio_event,
	.cleanup = zcio_fio_cleanup,
	.open_file = zcio_fio_open_file,
	.close_file = zcio_fio_close_file,
	.get_file_size = zcio_fio_get_file_size,
	.unlink_file = zcio_fio_unlink_file,
	.io_u_init = zcio_fio_io_u_init,
	.io_u_free = zcio_fio_io_u_free,
	.options = options,
	.option_struct_size = sizeof(struct zcio_fio_options),
};
