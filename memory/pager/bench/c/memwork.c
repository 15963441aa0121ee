/*
 * memwork: the workloads of 'onebox bench mem'. Usage: memwork MODE MiB N
 *
 *   seq    fill a MiB buffer, then N passes of a byte-wise FNV-1a checksum
 *          over all of it (a program that does a little work per byte)
 *   scan   the same with a word-wise checksum (8x less work: memory bound)
 *   rand   fill, then N x (MiB/4 KiB) read-modify-writes of one word in a
 *          random page each
 *   fault  fill, then read one word of each page in a random order, timing
 *          each read: with most pages out of memory, each is a page fault
 *
 * The fill is not timed, nor is a first pass of seq and scan (the steady
 * state is measured, not the write-back of the fill). Prints the line
 * "timed" when the timed part starts (the benchmark reads the pager's
 * counters there), then "rate R unit U sum S" (seq, scan: MB/s; rand:
 * accesses/s) or "p50_ns A p99_ns B n N sum S mean_ns M" (fault). The sum
 * makes runs comparable: every configuration must print the same.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t xs(uint64_t *x)
{
	*x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
	return *x;
}

static void timed(void)
{
	printf("timed\n");
	fflush(stdout);
}

static int cmp(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: memwork seq|scan|rand|fault MiB N\n");
		return 2;
	}
	const char *mode = argv[1];
	size_t bytes = strtoull(argv[2], NULL, 10) << 20, n = strtoull(argv[3], NULL, 10);
	size_t pages = bytes / 4096, words = bytes / 8;
	uint64_t *a = malloc(bytes);
	if (!a) {
		printf("malloc failed\n");
		return 1;
	}
	for (size_t i = 0; i < words; i++)
		a[i] = i * 0x9e3779b97f4a7c15ULL;
	uint64_t x = 88172645463325252ULL, h = 0xcbf29ce484222325ULL;
	if (strcmp(mode, "seq") == 0) {
		const unsigned char *b = (const unsigned char *)a;
		for (size_t i = 0; i < bytes; i++)
			h = (h ^ b[i]) * 0x100000001b3ULL;
		timed();
		double t0 = now();
		for (size_t p = 0; p < n; p++)
			for (size_t i = 0; i < bytes; i++)
				h = (h ^ b[i]) * 0x100000001b3ULL;
		double dt = now() - t0;
		printf("rate %.1f unit MB/s sum %016llx\n", n * bytes / dt / 1e6, (unsigned long long)h);
	} else if (strcmp(mode, "scan") == 0) {
		for (size_t i = 0; i < words; i++)
			h = (h ^ a[i]) * 0x100000001b3ULL;
		timed();
		double t0 = now();
		for (size_t p = 0; p < n; p++)
			for (size_t i = 0; i < words; i++)
				h = (h ^ a[i]) * 0x100000001b3ULL;
		double dt = now() - t0;
		printf("rate %.1f unit MB/s sum %016llx\n", n * bytes / dt / 1e6, (unsigned long long)h);
	} else if (strcmp(mode, "rand") == 0) {
		size_t k = n * pages;
		timed();
		double t0 = now();
		for (size_t i = 0; i < k; i++) {
			uint64_t r = xs(&x);
			a[(r % pages) * 512 + (r >> 40) % 512] += r;
		}
		double dt = now() - t0;
		for (size_t i = 0; i < words; i++)
			h = (h ^ a[i]) * 0x100000001b3ULL;
		printf("rate %.0f unit accesses/s sum %016llx\n", k / dt, (unsigned long long)h);
	} else if (strcmp(mode, "fault") == 0) {
		size_t *order = calloc(pages, sizeof *order);
		long long *ns = calloc(pages, sizeof *ns);
		if (!order || !ns)
			return 1;
		for (size_t i = 0; i < pages; i++)
			order[i] = i;
		for (size_t i = pages - 1; i > 0; i--) {
			size_t j = xs(&x) % (i + 1), t = order[i];
			order[i] = order[j], order[j] = t;
		}
		long long total = 0;
		timed();
		for (size_t i = 0; i < pages; i++) {
			struct timespec t0, t1;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			h += ((volatile uint64_t *)a)[order[i] * 512];
			clock_gettime(CLOCK_MONOTONIC, &t1);
			ns[i] = (t1.tv_sec - t0.tv_sec) * 1000000000LL + t1.tv_nsec - t0.tv_nsec;
			total += ns[i];
		}
		qsort(ns, pages, sizeof *ns, cmp);
		printf("p50_ns %lld p99_ns %lld n %zu sum %016llx mean_ns %lld\n", ns[pages / 2], ns[pages * 99 / 100],
		       pages, (unsigned long long)h, total / (long long)pages);
	} else {
		fprintf(stderr, "memwork: unknown mode %s\n", mode);
		return 2;
	}
	free(a);
	return 0;
}
