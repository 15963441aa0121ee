/*
 * threads: four threads read the same fresh 16 MiB block at once, so several
 * faults on one page reach the pager (the second fill gets EEXIST), then
 * each writes its own quarter; prints a checksum.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define N (16u << 20)
static unsigned char *a;
static pthread_barrier_t bar;

static void *worker(void *arg)
{
	uintptr_t id = (uintptr_t)arg;
	unsigned nz = 0;
	pthread_barrier_wait(&bar);
	for (size_t i = 0; i < N; i += 4096)
		nz += ((volatile unsigned char *)a)[i] != 0;
	pthread_barrier_wait(&bar); /* nobody writes before all have read */
	for (size_t i = id * (N / 4); i < (id + 1) * (N / 4); i++)
		a[i] = (unsigned char)(i * 13 + id);
	return (void *)(uintptr_t)nz;
}

int main(void)
{
	pthread_t th[4];
	a = malloc(N);
	if (!a)
		return 1;
	pthread_barrier_init(&bar, NULL, 4);
	for (uintptr_t i = 0; i < 4; i++)
		pthread_create(&th[i], NULL, worker, (void *)i);
	uintptr_t nz = 0;
	for (int i = 0; i < 4; i++) {
		void *r;
		pthread_join(th[i], &r);
		nz += (uintptr_t)r;
	}
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < N; i++)
		h = (h ^ a[i]) * 0x100000001b3ULL;
	printf("nonzero %lu sum %016llx\n", (unsigned long)nz, (unsigned long long)h);
	free(a);
	return 0;
}
