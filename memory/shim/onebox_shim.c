/*
 * onebox_shim: LD_PRELOAD library that hands a program's large allocations to
 * the onebox memory pager (memory/pager).
 *
 * When ONEBOX_PAGER_SOCK names a unix SOCK_SEQPACKET socket, the shim creates
 * a userfaultfd, connects, and sends it (SCM_RIGHTS). Allocations of at least
 * ONEBOX_SHIM_THRESHOLD bytes (default 1 MiB) are then backed by a memfd mapped
 * MAP_SHARED and registered for MISSING faults: every first touch of a page is
 * served by the pager. Each block's memfd goes to the pager too, so it can map
 * the same pages (copy-out for eviction, next slice).
 *
 * The malloc family is interposed rather than mmap: glibc's malloc calls its
 * internal __mmap, which LD_PRELOAD cannot see (machine-facts.md).
 *
 * Safety: if the pager goes away, faults on registered pages would block for
 * ever (we keep our uffd open so the kernel never hands out zero pages behind
 * our back). A watchdog thread waits for the socket to hang up and stops the
 * program with a clear message instead.
 *
 * Build: cc -shared -fPIC -O2 -o onebox_shim.so onebox_shim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

/* Wire format shared with memory/pager (proto.go): 24 bytes, host order. */
enum { OP_HELLO = 1, OP_REGISTER = 2, OP_UNREGISTER = 3 };
struct obx_msg {
	uint32_t op;
	uint32_t pid;
	uint64_t start;
	uint64_t len;
};

#define GONE "onebox: memory pager gone; stopping to avoid reading wrong data\n"
#define MAX_BLOCKS 16384 /* live large blocks; beyond this, the real allocator */

struct block {
	uintptr_t start; /* 0: free slot */
	size_t len;
};

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static size_t (*real_usable)(void *);

/* dlsym may calloc before real_calloc is known: serve it from here. */
static char boot_buf[4096];
static size_t boot_used;
static int resolving;

static int active;  /* pager connected: large blocks go to it */
static int sock = -1, uffd = -1;
static size_t threshold = 1 << 20;
static long pagesz = 4096;

/* mu guards sock writes, blocks[] and nslots (slots ever used: the scan
 * bound). lo/hi bound every block ever made, and blocks are page aligned
 * (glibc's chunks almost never are), so free() of a small pointer skips mu. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct block blocks[MAX_BLOCKS];
static int nslots;
static uintptr_t lo = UINTPTR_MAX, hi;

/* boot_alloc serves allocations made while dlsym resolves us; never freed. */
static void *boot_alloc(size_t len)
{
	len = (len + 15) & ~(size_t)15;
	if (len > sizeof boot_buf - boot_used)
		return NULL;
	void *p = boot_buf + boot_used;
	boot_used += len;
	return p; /* static storage: already zero */
}

static void die(const char *msg)
{
	ssize_t r = write(2, msg, strlen(msg));
	(void)r;
	abort();
}

static void resolve(void)
{
	if (real_malloc || resolving)
		return;
	resolving = 1;
	real_calloc = dlsym(RTLD_NEXT, "calloc");
	real_malloc = dlsym(RTLD_NEXT, "malloc");
	real_realloc = dlsym(RTLD_NEXT, "realloc");
	real_free = dlsym(RTLD_NEXT, "free");
	real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
	real_memalign = dlsym(RTLD_NEXT, "memalign");
	real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
	real_usable = dlsym(RTLD_NEXT, "malloc_usable_size");
	resolving = 0;
}

/* send_msg sends m (and fd when >= 0). Precondition: mu held. */
static int send_msg(uint32_t op, uintptr_t start, size_t len, int fd)
{
	struct obx_msg m = { op, (uint32_t)getpid(), start, len };
	struct iovec iov = { &m, sizeof m };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (fd >= 0) {
		memset(cbuf, 0, sizeof cbuf);
		h.msg_control = cbuf;
		h.msg_controllen = sizeof cbuf;
		struct cmsghdr *c = CMSG_FIRSTHDR(&h);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof fd);
	}
	/* MSG_NOSIGNAL: a dead pager must give our clear message, not SIGPIPE. */
	return sendmsg(sock, &h, MSG_NOSIGNAL) == (ssize_t)sizeof m ? 0 : -1;
}

/* big_alloc returns a pager-backed block of len bytes, or NULL to let the
 * caller use the real allocator. The block is zero (a fresh memfd). */
static void *big_alloc(size_t len)
{
	len = (len + pagesz - 1) & ~(size_t)(pagesz - 1);
	int fd = memfd_create("onebox", MFD_CLOEXEC);
	if (fd < 0)
		return NULL;
	if (ftruncate(fd, len) < 0) {
		close(fd);
		return NULL;
	}
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		close(fd);
		return NULL;
	}
	struct uffdio_register reg = {
		.range = { (uintptr_t)p, len }, .mode = UFFDIO_REGISTER_MODE_MISSING
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
		munmap(p, len);
		close(fd);
		return NULL;
	}
	pthread_mutex_lock(&mu);
	int slot = -1;
	for (int i = 0; i < MAX_BLOCKS; i++)
		if (blocks[i].start == 0) {
			slot = i;
			nslots = i + 1 > nslots ? i + 1 : nslots;
			break;
		}
	/* The pager learns of the block before anyone can touch it. */
	if (slot < 0 || send_msg(OP_REGISTER, (uintptr_t)p, len, fd) < 0) {
		pthread_mutex_unlock(&mu);
		if (slot >= 0) /* the socket failed: the pager is gone */
			die(GONE);
		ioctl(uffd, UFFDIO_UNREGISTER, &reg.range);
		munmap(p, len);
		close(fd);
		return NULL;
	}
	blocks[slot] = (struct block){ (uintptr_t)p, len };
	if ((uintptr_t)p < lo)
		__atomic_store_n(&lo, (uintptr_t)p, __ATOMIC_RELEASE);
	if ((uintptr_t)p + len > hi)
		__atomic_store_n(&hi, (uintptr_t)p + len, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&mu);
	/* The mapping keeps the file alive and the pager has its own copy:
	 * holding the fd would cost one descriptor per block. */
	close(fd);
	return p;
}

/* find returns the slot of the block starting at p, or -1. Precondition: mu held. */
static int find(void *p)
{
	uintptr_t a = (uintptr_t)p;
	if (a < lo || a >= hi || (a & (pagesz - 1)))
		return -1;
	for (int i = 0; i < nslots; i++)
		if (blocks[i].start == a)
			return i;
	return -1;
}

/* big_free releases p if it is a pager block; it returns 0 if p is not one. */
static int big_free(void *p)
{
	/* Lock-free fast path: lo/hi only widen, so a block is always inside. */
	uintptr_t a = (uintptr_t)p;
	if (!p || (a & (pagesz - 1)) || a < __atomic_load_n(&lo, __ATOMIC_ACQUIRE) ||
	    a >= __atomic_load_n(&hi, __ATOMIC_ACQUIRE))
		return 0;
	pthread_mutex_lock(&mu);
	int i = find(p);
	if (i < 0) {
		pthread_mutex_unlock(&mu);
		return 0;
	}
	struct block b = blocks[i];
	blocks[i].start = 0;
	if (active) {
		/* Tell the pager first so it drops its alias before the range can be reused. */
		send_msg(OP_UNREGISTER, b.start, b.len, -1);
		struct uffdio_range r = { b.start, b.len };
		ioctl(uffd, UFFDIO_UNREGISTER, &r);
	}
	pthread_mutex_unlock(&mu);
	munmap(p, b.len);
	return 1;
}

static size_t big_len(void *p)
{
	pthread_mutex_lock(&mu);
	int i = find(p);
	size_t n = i < 0 ? 0 : blocks[i].len;
	pthread_mutex_unlock(&mu);
	return n;
}

static void *watchdog(void *arg)
{
	(void)arg;
	/* Only hang-up wakes us (POLLHUP/POLLERR are always reported): the pager
	 * never writes to us in this protocol. */
	struct pollfd p = { .fd = sock, .events = POLLRDHUP };
	for (;;) {
		if (poll(&p, 1, -1) < 0 && errno == EINTR)
			continue;
		if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))
			die(GONE);
	}
	return NULL;
}

/* fork must not copy mu while another thread holds it. */
static void before_fork(void) { pthread_mutex_lock(&mu); }
static void after_fork_parent(void) { pthread_mutex_unlock(&mu); }

/* after_fork_child: the child shares no uffd context with us (no
 * UFFD_FEATURE_EVENT_FORK, so the kernel drops its registrations) and our uffd
 * still refers to the parent's mm. The child runs on the real allocator. */
static void after_fork_child(void)
{
	pthread_mutex_unlock(&mu);
	active = 0;
	close(uffd);
	close(sock);
	uffd = sock = -1;
}

__attribute__((constructor)) static void shim_init(void)
{
	resolve();
	pagesz = sysconf(_SC_PAGESIZE);
	const char *t = getenv("ONEBOX_SHIM_THRESHOLD");
	if (t && atol(t) > 0)
		threshold = (size_t)atol(t);
	const char *path = getenv("ONEBOX_PAGER_SOCK");
	if (!path || !*path)
		return;
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof a.sun_path)
		die("onebox: ONEBOX_PAGER_SOCK too long\n");
	strcpy(a.sun_path, path);
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("onebox: userfaultfd unavailable; cannot run with memory expansion\n");
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM };
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("onebox: UFFDIO_API failed\n");
	sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&a, sizeof a) < 0)
		die("onebox: cannot reach the memory pager (ONEBOX_PAGER_SOCK)\n");
	if (send_msg(OP_HELLO, 0, 0, uffd) < 0)
		die("onebox: memory pager refused the connection\n");
	pthread_t th;
	if (pthread_create(&th, NULL, watchdog, NULL) != 0)
		die("onebox: cannot start the pager watchdog\n");
	pthread_atfork(before_fork, after_fork_parent, after_fork_child);
	active = 1;
}

/* ---- the interposed malloc family ---- */

void *malloc(size_t n)
{
	resolve();
	if (active && n >= threshold) {
		void *p = big_alloc(n);
		if (p)
			return p;
	}
	return real_malloc ? real_malloc(n) : boot_alloc(n);
}

void *calloc(size_t n, size_t sz)
{
	if (!real_calloc) /* dlsym bootstrap */
		return (n && sz > SIZE_MAX / n) ? NULL : boot_alloc(n * sz);
	if (active && n && sz <= SIZE_MAX / n && n * sz >= threshold) {
		void *p = big_alloc(n * sz);
		if (p)
			return p;
	}
	return real_calloc(n, sz);
}

void free(void *p)
{
	if ((char *)p >= boot_buf && (char *)p < boot_buf + sizeof boot_buf)
		return;
	if (big_free(p))
		return;
	resolve();
	real_free(p);
}

void *realloc(void *p, size_t n)
{
	resolve();
	size_t old = p ? big_len(p) : 0;
	if (!old && !(active && n >= threshold))
		return real_realloc(p, n); /* neither side is ours */
	if (old && n <= old && n >= threshold)
		return p; /* shrinking a block in place */
	if (!p)
		return malloc(n);
	if (n == 0) {
		free(p);
		return NULL;
	}
	void *q = malloc(n);
	if (!q)
		return NULL;
	if (!old)
		old = real_usable(p);
	memcpy(q, p, old < n ? old : n);
	free(p);
	return q;
}

/* Pager blocks are page aligned: larger alignments use the real allocator. */
static void *big_aligned(size_t align, size_t n)
{
	resolve();
	return active && n >= threshold && align <= (size_t)pagesz ? big_alloc(n) : NULL;
}

int posix_memalign(void **out, size_t align, size_t n)
{
	void *p = big_aligned(align, n);
	if (!p)
		return real_posix_memalign(out, align, n);
	*out = p;
	return 0;
}

void *memalign(size_t align, size_t n)
{
	void *p = big_aligned(align, n);
	return p ? p : real_memalign(align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
	void *p = big_aligned(align, n);
	return p ? p : real_aligned_alloc(align, n);
}

size_t malloc_usable_size(void *p)
{
	resolve();
	size_t n = p ? big_len(p) : 0;
	return n ? n : real_usable(p);
}
