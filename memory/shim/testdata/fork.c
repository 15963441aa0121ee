/*
 * fork: parent and child must each see the block as of the fork and never
 * the other's later writes (copy-on-write), as without onebox. Usage: fork MiB
 * The parent fills a block, forks; the child overwrites half of it, the
 * parent overwrites the other half; each prints its checksum (the child
 * first), then the parent checks its first half is still its own.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t sum(const uint64_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
	size_t n = (mib << 20) / sizeof(uint64_t);
	uint64_t *a = malloc(n * sizeof *a);
	if (!a) {
		printf("malloc failed\n");
		return 1;
	}
	for (size_t i = 0; i < n; i++)
		a[i] = i * 0x9e3779b97f4a7c15ULL;
	printf("before fork %016llx\n", (unsigned long long)sum(a, n));
	fflush(stdout);
	int pfd[2];
	if (pipe(pfd) < 0)
		return 1;
	pid_t pid = fork();
	if (pid < 0) {
		printf("fork failed\n");
		return 1;
	}
	if (pid == 0) {
		for (size_t i = 0; i < n / 2; i++)
			a[i] = ~a[i];
		char c;
		/* Wait until the parent wrote its half: we must not see it. */
		if (read(pfd[0], &c, 1) != 1)
			_exit(3);
		printf("child %016llx\n", (unsigned long long)sum(a, n));
		uint64_t *b = malloc(n * sizeof *b); /* the child's own blocks work */
		for (size_t i = 0; b && i < n; i++)
			b[i] = a[i] + 1;
		printf("child new block %016llx\n", b ? (unsigned long long)sum(b, n) : 0ULL);
		fflush(stdout);
		_exit(0);
	}
	for (size_t i = n / 2; i < n; i++)
		a[i] = a[i] * 3 + 1;
	if (write(pfd[1], "x", 1) != 1)
		return 1;
	int st = 0;
	waitpid(pid, &st, 0);
	printf("parent %016llx\n", (unsigned long long)sum(a, n));
	free(a);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
