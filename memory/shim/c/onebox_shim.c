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
 * Registration is synchronous: the pager answers each REGISTER (it reserves
 * the block in the cluster pool) and an allocation the pool cannot hold fails
 * with ENOMEM. Blocks are registered for MISSING and write-protect faults: the
 * pager evicts pages (write-protect, copy out, hole punch) and tracks which
 * resident pages are dirty.
 *
 * Semantics kept for programs: madvise(DONTNEED/REMOVE/FREE) of a block asks
 * the pager to discard the pages (they read back as zeros); fork() asks the
 * pager to snapshot the blocks first, and the child replaces each block with
 * a fresh memfd registered with its own userfaultfd on its own connection,
 * whose pages the pager fills from the snapshot: copy-on-write semantics
 * (neither sees the other's later writes). A fork the shim cannot see (glibc
 * internal ones, e.g. daemon()) leaves the child's blocks inaccessible rather
 * than shared.
 *
 * Safety: if the pager goes away, faults on registered pages would block for
 * ever (we keep our uffd open so the kernel never hands out zero pages behind
 * our back). A watchdog thread waits for the socket to hang up and stops the
 * program with a clear message instead; a request that finds the pager gone
 * does the same.
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
#include <time.h>
#include <unistd.h>

/* Wire format shared with memory/pager (proto.go), host order. Requests are
 * 24 bytes; HELLO, REGISTER, DISCARD and FORK get a 16-byte reply. */
enum {
	OP_HELLO = 1,      /* fd: the uffd; start: fork token (0: none) */
	OP_REGISTER = 2,   /* fd: the block's memfd */
	OP_UNREGISTER = 3, /* no reply */
	OP_DISCARD = 4,    /* madvise(DONTNEED) of [start, start+len) */
	OP_FORK = 5,       /* snapshot before fork; reply val: the token */
	OP_FORK_ABORT = 6, /* start: token of a fork that failed; no reply */
};
struct obx_msg {
	uint32_t op;
	uint32_t pid;
	uint64_t start;
	uint64_t len;
};
struct obx_reply {
	int32_t err; /* 0 or an errno value (ENOMEM: the pool is full) */
	uint32_t pad; /* OBX_BYE: a goodbye before the pager drops us; val: why */
	uint64_t val;
};
#define OBX_BYE 0xb1eb1e
_Static_assert(sizeof(struct obx_msg) == 24, "obx_msg is 24 bytes (proto.go)");
_Static_assert(sizeof(struct obx_reply) == 16, "obx_reply is 16 bytes (proto.go)");

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
static int (*real_madvise)(void *, size_t, int);
static pid_t (*real_fork)(void);

/* dlsym may calloc before real_calloc is known: serve it from here. */
static char boot_buf[4096];
static size_t boot_used;
static int resolving;

static int active;  /* pager connected: large blocks go to it */
static int sock = -1, uffd = -1;
static struct sockaddr_un pager_addr;
static __thread int in_fork; /* this thread is in our fork(): atfork handlers stand aside */
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

__attribute__((noreturn)) static void die(const char *msg)
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
	real_madvise = dlsym(RTLD_NEXT, "madvise");
	real_fork = dlsym(RTLD_NEXT, "fork");
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

__attribute__((noreturn)) static void bye(const struct obx_reply *r);

/* gone stops the program: the pager hung up. Its goodbye, if it sent one,
 * says why. */
static void gone(void)
{
	static int dying;
	if (__atomic_exchange_n(&dying, 1, __ATOMIC_ACQ_REL))
		for (;;)
			pause(); /* another thread is printing the reason and aborting */
	/* A pager that closes with a message of ours unread makes our first
	 * recv fail with ECONNRESET; its goodbye is queued behind that. */
	struct obx_reply r;
	for (int i = 0; i < 4; i++) {
		ssize_t n = recv(sock, &r, sizeof r, MSG_DONTWAIT);
		if (n == (ssize_t)sizeof r && r.pad == OBX_BYE)
			bye(&r);
		if (n >= 0 || (errno != ECONNRESET && errno != EINTR))
			break;
	}
	die(GONE);
}

static void bye(const struct obx_reply *r)
{
	switch (r->val) {
	case 1:
		die("onebox: the cluster memory pool could not fetch or store this program's pages "
		    "(see the agent's log); stopping to avoid reading wrong data\n");
	case 3:
		die("onebox: memory pager stopped (the agent is shutting down); stopping to avoid reading wrong data\n");
	default:
		die("onebox: memory pager dropped this program (protocol error, see the agent's log); "
		    "stopping to avoid reading wrong data\n");
	}
}

/* request sends a message that gets a reply and waits for it; a pager that
 * is gone stops the program. Returns the reply's err. Precondition: mu held. */
static int request(uint32_t op, uintptr_t start, size_t len, int fd, uint64_t *val)
{
	if (send_msg(op, start, len, fd) < 0)
		gone();
	struct obx_reply r;
	ssize_t n;
	do
		n = recv(sock, &r, sizeof r, 0);
	while (n < 0 && errno == EINTR);
	if (n != (ssize_t)sizeof r)
		gone();
	if (r.pad == OBX_BYE)
		bye(&r);
	if (val)
		*val = r.val;
	return r.err;
}

/* map_block maps a fresh memfd of len bytes at want (0: anywhere), registers
 * it with uffd and the pager. It returns the address, or NULL with errno set
 * (ENOMEM when the pool is full). Precondition: mu held. */
static void *map_block(void *want, size_t len)
{
	int fd = memfd_create("onebox", MFD_CLOEXEC);
	if (fd < 0)
		return NULL;
	if (ftruncate(fd, len) < 0) {
		close(fd);
		return NULL;
	}
	void *p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_SHARED | (want ? MAP_FIXED : 0), fd, 0);
	if (p == MAP_FAILED) {
		close(fd);
		return NULL;
	}
	struct uffdio_register reg = {
		.range = { (uintptr_t)p, len },
		.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
		int e = errno;
		if (!want)
			munmap(p, len);
		close(fd);
		errno = e;
		return NULL;
	}
	/* The pager learns of the block before anyone can touch it. */
	int err = request(OP_REGISTER, (uintptr_t)p, len, fd, NULL);
	/* The mapping keeps the file alive and the pager has its own copy:
	 * holding the fd would cost one descriptor per block. */
	close(fd);
	if (err) {
		ioctl(uffd, UFFDIO_UNREGISTER, &reg.range);
		if (!want)
			munmap(p, len);
		errno = err;
		return NULL;
	}
	return p;
}

/* big_alloc returns a pager-backed block of len bytes (zero: a fresh memfd),
 * or NULL: with *full set when the pool cannot hold it (the caller fails with
 * ENOMEM), else the caller uses the real allocator. */
static void *big_alloc(size_t len, int *full)
{
	*full = 0;
	len = (len + pagesz - 1) & ~(size_t)(pagesz - 1);
	pthread_mutex_lock(&mu);
	int slot = -1;
	for (int i = 0; i < MAX_BLOCKS; i++)
		if (blocks[i].start == 0) {
			slot = i;
			break;
		}
	void *p = slot < 0 ? NULL : map_block(NULL, len);
	if (!p) {
		*full = slot >= 0 && errno == ENOMEM;
		pthread_mutex_unlock(&mu);
		return NULL;
	}
	nslots = slot + 1 > nslots ? slot + 1 : nslots;
	blocks[slot] = (struct block){ (uintptr_t)p, len };
	if ((uintptr_t)p < lo)
		__atomic_store_n(&lo, (uintptr_t)p, __ATOMIC_RELEASE);
	if ((uintptr_t)p + len > hi)
		__atomic_store_n(&hi, (uintptr_t)p + len, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&mu);
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
	/* Only hang-up wakes us (POLLHUP/POLLERR are always reported): replies
	 * (POLLIN) are for the thread that made the request. */
	struct pollfd p = { .fd = sock, .events = POLLRDHUP };
	for (;;) {
		if (poll(&p, 1, -1) < 0 && errno == EINTR)
			continue;
		if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) {
			/* A thread in request() holds mu and may be reading the
			 * pager's goodbye right now: let it print the reason.
			 * Bounded, since a thread could hold mu while blocked on
			 * a page the gone pager will never fill. */
			struct timespec t;
			clock_gettime(CLOCK_REALTIME, &t);
			t.tv_sec += 2;
			pthread_mutex_timedlock(&mu, &t);
			gone();
		}
	}
	return NULL;
}

/* connect_pager makes a userfaultfd and a connection to the pager, and says
 * hello (token: the fork snapshot this process inherits, 0 for none). */
static void connect_pager(uint64_t token)
{
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("onebox: userfaultfd unavailable; cannot run with memory expansion\n");
	struct uffdio_api api = {
		.api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
	};
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("onebox: this kernel lacks userfaultfd write-protect on shared memory\n");
	sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&pager_addr, sizeof pager_addr) < 0)
		die("onebox: cannot reach the memory pager (ONEBOX_PAGER_SOCK)\n");
	if (request(OP_HELLO, token, 0, uffd, NULL) != 0)
		die("onebox: memory pager refused the connection\n");
	pthread_t th;
	if (pthread_create(&th, NULL, watchdog, NULL) != 0)
		die("onebox: cannot start the pager watchdog\n");
}

/* Forks we do not see (glibc's internal ones): mu must not be copied while
 * another thread holds it, and the child must not share the parent's blocks
 * (MAP_SHARED) nor read holes of evicted pages as zeros: its blocks become
 * inaccessible. Our fork() below does it properly and sets in_fork. */
static void before_fork(void)
{
	if (!in_fork)
		pthread_mutex_lock(&mu);
}
static void after_fork_parent(void)
{
	if (!in_fork)
		pthread_mutex_unlock(&mu);
}
static void after_fork_child(void)
{
	if (in_fork)
		return;
	for (int i = 0; active && i < nslots; i++)
		if (blocks[i].start)
			mmap((void *)blocks[i].start, blocks[i].len, PROT_NONE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
	pthread_mutex_unlock(&mu);
	active = 0;
	close(uffd);
	close(sock);
	uffd = sock = -1;
}

#define FORKFAIL "onebox: cannot give the forked child its own copy of its memory\n"

pid_t fork(void)
{
	resolve();
	if (!active)
		return real_fork();
	pthread_mutex_lock(&mu);
	uint64_t token = 0;
	int err = request(OP_FORK, 0, 0, -1, &token);
	if (err) {
		pthread_mutex_unlock(&mu);
		errno = err;
		return -1;
	}
	in_fork = 1;
	pid_t pid = real_fork();
	int e = errno;
	in_fork = 0;
	if (pid < 0)
		send_msg(OP_FORK_ABORT, token, 0, -1);
	if (pid != 0) {
		pthread_mutex_unlock(&mu);
		errno = e;
		return pid;
	}
	/* The child: our copies of the parent's uffd and socket stay theirs. */
	close(uffd);
	close(sock);
	connect_pager(token);
	for (int i = 0; i < nslots; i++)
		if (blocks[i].start && map_block((void *)blocks[i].start, blocks[i].len) == NULL)
			die(FORKFAIL);
	pthread_mutex_unlock(&mu);
	return 0;
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
	pager_addr.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof pager_addr.sun_path)
		die("onebox: ONEBOX_PAGER_SOCK too long\n");
	strcpy(pager_addr.sun_path, path);
	pthread_mutex_lock(&mu);
	connect_pager(0);
	pthread_mutex_unlock(&mu);
	pthread_atfork(before_fork, after_fork_parent, after_fork_child);
	active = 1;
}

/* ---- the interposed malloc family ---- */

/* The pool is full: the allocation fails as it would without memory. */
static void *enomem(void)
{
	errno = ENOMEM;
	return NULL;
}

void *malloc(size_t n)
{
	resolve();
	if (active && n >= threshold) {
		int full;
		void *p = big_alloc(n, &full);
		if (p)
			return p;
		if (full)
			return enomem();
	}
	return real_malloc ? real_malloc(n) : boot_alloc(n);
}

void *calloc(size_t n, size_t sz)
{
	if (!real_calloc) /* dlsym bootstrap */
		return (n && sz > SIZE_MAX / n) ? NULL : boot_alloc(n * sz);
	if (active && n && sz <= SIZE_MAX / n && n * sz >= threshold) {
		int full;
		void *p = big_alloc(n * sz, &full);
		if (p)
			return p;
		if (full)
			return enomem();
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
static void *big_aligned(size_t align, size_t n, int *full)
{
	resolve();
	*full = 0;
	return active && n >= threshold && align <= (size_t)pagesz ? big_alloc(n, full) : NULL;
}

int posix_memalign(void **out, size_t align, size_t n)
{
	int full;
	void *p = big_aligned(align, n, &full);
	if (full)
		return ENOMEM;
	if (!p)
		return real_posix_memalign(out, align, n);
	*out = p;
	return 0;
}

void *memalign(size_t align, size_t n)
{
	int full;
	void *p = big_aligned(align, n, &full);
	if (full)
		return enomem();
	return p ? p : real_memalign(align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
	int full;
	void *p = big_aligned(align, n, &full);
	if (full)
		return enomem();
	return p ? p : real_aligned_alloc(align, n);
}

size_t malloc_usable_size(void *p)
{
	resolve();
	size_t n = p ? big_len(p) : 0;
	return n ? n : real_usable(p);
}

/* madvise: a shared memfd keeps its pages through MADV_DONTNEED, and the pool
 * keeps evicted ones: the pager discards both, so the range reads as zeros,
 * as anonymous memory does. */
int madvise(void *addr, size_t len, int advice)
{
	resolve();
	int r = real_madvise(addr, len, advice);
	if (!active || len == 0 || (advice != MADV_DONTNEED && advice != MADV_REMOVE && advice != MADV_FREE))
		return r;
	uintptr_t a = (uintptr_t)addr, e = a + ((len + pagesz - 1) & ~(size_t)(pagesz - 1));
	if (e <= __atomic_load_n(&lo, __ATOMIC_ACQUIRE) || a >= __atomic_load_n(&hi, __ATOMIC_ACQUIRE))
		return r;
	/* MADV_FREE is for private memory only: on our shared blocks the kernel
	 * refuses it, where anonymous memory would take it. */
	if (r < 0 && !(advice == MADV_FREE && errno == EINVAL && !(a & (pagesz - 1))))
		return r;
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nslots; i++) {
		uintptr_t s = blocks[i].start, t = s + blocks[i].len;
		if (!s || t <= a || s >= e)
			continue;
		s = s > a ? s : a;
		t = t < e ? t : e;
		int err = request(OP_DISCARD, s, t - s, -1, NULL);
		if (err) {
			pthread_mutex_unlock(&mu);
			errno = err;
			return -1;
		}
	}
	pthread_mutex_unlock(&mu);
	return 0;
}
