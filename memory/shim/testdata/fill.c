/*
 * fill: a workload whose stdout must be identical with and without the onebox
 * shim. Usage: fill MiB [wait]
 *
 * It mallocs MiB, fills it with three patterns and prints a checksum of each;
 * checks calloc gives zeros and realloc keeps contents. The time of the first
 * fill (every page's first touch) goes to stderr, never to stdout.
 * With "wait", it mallocs a second buffer, prints "ready", waits for a line on
 * stdin, then fills the second buffer: the test stops the pager meanwhile.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t fill_sum(uint64_t *p, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (i + seed) * 0x9e3779b97f4a7c15ULL;
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	int wait = argc > 2 && strcmp(argv[2], "wait") == 0;
	size_t bytes = mib << 20, n = bytes / sizeof(uint64_t);

	uint64_t *a = malloc(bytes), *b = wait ? malloc(bytes) : NULL;
	if (!a || (wait && !b)) {
		printf("malloc failed\n");
		return 1;
	}
	long long t0 = now_ns();
	for (size_t i = 0; i < bytes; i += 4096) /* first touch only */
		((volatile char *)a)[i] = 1;
	long long t1 = now_ns();
	fprintf(stderr, "first_touch_ns %lld pages %zu\n", t1 - t0, bytes / 4096);
	for (uint64_t seed = 0; seed < 3; seed++)
		printf("pass %llu sum %016llx\n", (unsigned long long)seed,
		       (unsigned long long)fill_sum(a, n, seed));
	/* Random order: every page once, read-modify-write, then a sum. */
	size_t pages = bytes / 4096, w = 4096 / sizeof(uint64_t);
	uint64_t x = 88172645463325252ULL;
	for (size_t k = 0; k < pages; k++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		size_t pg = x % pages;
		a[pg * w + (x >> 32) % w] += x;
	}
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ a[i]) * 0x100000001b3ULL;
	printf("random sum %016llx\n", (unsigned long long)h);

	unsigned char *c = calloc(16, 1 << 20);
	size_t nz = 0;
	for (size_t i = 0; c && i < (16u << 20); i++)
		nz += c[i] != 0;
	printf("calloc nonzero %zu\n", c ? nz : (size_t)-1);
	free(c);

	unsigned char *r = malloc(2 << 20);
	for (size_t i = 0; r && i < (2u << 20); i++)
		r[i] = (unsigned char)(i * 7);
	r = realloc(r, 8 << 20);
	size_t bad = 0;
	for (size_t i = 0; r && i < (2u << 20); i++)
		bad += r[i] != (unsigned char)(i * 7);
	printf("realloc mismatches %zu\n", r ? bad : (size_t)-1);
	free(r);

	if (wait) {
		printf("ready\n");
		fflush(stdout);
		char line[16];
		if (!fgets(line, sizeof line, stdin))
			return 1;
		printf("second sum %016llx\n", (unsigned long long)fill_sum(b, n, 7));
	}
	free(a);
	free(b);
	return 0;
}
