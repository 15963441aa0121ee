/*
 * madv: madvise(MADV_DONTNEED) of part of a large block must read back as
 * zeros, as it does for anonymous memory, also for pages that were evicted.
 * Usage: madv MiB. Prints counts and checksums.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
	size_t bytes = mib << 20;
	unsigned char *a = NULL;
	if (posix_memalign((void **)&a, 4096, bytes) != 0) {
		printf("malloc failed\n");
		return 1;
	}
	for (size_t i = 0; i < bytes; i++)
		a[i] = (unsigned char)(i * 7 + 1);
	/* Forget the middle half. */
	if (madvise(a + bytes / 4, bytes / 2, MADV_DONTNEED) != 0) {
		printf("madvise failed\n");
		return 1;
	}
	size_t nz = 0, bad = 0;
	for (size_t i = 0; i < bytes; i++) {
		if (i >= bytes / 4 && i < bytes / 4 + bytes / 2)
			nz += a[i] != 0;
		else
			bad += a[i] != (unsigned char)(i * 7 + 1);
	}
	printf("nonzero after dontneed %zu, changed elsewhere %zu\n", nz, bad);
	/* MADV_FREE: either old data or zeros may read back, so only its
	 * result is printed, and the range is written again. */
	printf("madvise free %d\n", madvise(a, bytes / 4, MADV_FREE));
	for (size_t i = 0; i < bytes / 4; i++)
		a[i] = (unsigned char)(i * 5);
	for (size_t i = 0; i < bytes; i += 3)
		a[i] ^= 0x5a;
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < bytes; i++)
		h = (h ^ a[i]) * 0x100000001b3ULL;
	printf("sum %016llx\n", (unsigned long long)h);
	free(a);
	return 0;
}
