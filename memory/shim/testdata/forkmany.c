/*
 * forkmany: a program that forks many times while it keeps a large block:
 * each child sums the block as of its fork; the parent changes one word
 * between forks. Usage: forkmany MiB N. Prints one line: the sum of the
 * children's sums and the parent's final sum.
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
	size_t n = (strtoul(argv[1], NULL, 10) << 20) / 8, forks = strtoul(argv[2], NULL, 10);
	uint64_t *a = malloc(n * 8);
	if (!a)
		return 1;
	for (size_t i = 0; i < n; i++)
		a[i] = i * 0x9e3779b97f4a7c15ULL;
	uint64_t total = 0;
	for (size_t f = 0; f < forks; f++) {
		int pfd[2];
		if (pipe(pfd) < 0)
			return 1;
		pid_t pid = fork();
		if (pid < 0) {
			printf("fork %zu failed\n", f);
			return 1;
		}
		if (pid == 0) {
			uint64_t s = sum(a, n);
			a[f % n] = 0; /* the child's writes stay its own */
			if (write(pfd[1], &s, sizeof s) != sizeof s)
				_exit(1);
			_exit(0);
		}
		a[(f * 4099) % n] ^= f; /* races with the child: it must not see this */
		uint64_t s;
		if (read(pfd[0], &s, sizeof s) != sizeof s)
			return 1;
		total += s;
		close(pfd[0]);
		close(pfd[1]);
		waitpid(pid, NULL, 0);
	}
	printf("children %016llx parent %016llx\n", (unsigned long long)total, (unsigned long long)sum(a, n));
	return 0;
}
