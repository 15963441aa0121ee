/*
 * peek: prints the first bytes of a fresh large block without writing it, so
 * the test sees what the pager put there; then forks, and parent and child
 * both read the block and allocate a new one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned sum(const unsigned char *p, size_t n)
{
	unsigned s = 0;
	for (size_t i = 0; i < n; i++)
		s = s * 31 + p[i];
	return s;
}

int main(void)
{
	size_t n = 4 << 20;
	unsigned char *a = malloc(n);
	if (!a)
		return 1;
	printf("first %02x%02x%02x%02x\n", a[0], a[1], a[2], a[3]);
	memset(a, 0x5a, n);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		return 1;
	unsigned char *b = malloc(n); /* the child's goes to the real allocator */
	if (!b)
		return 1;
	memset(b, pid == 0 ? 1 : 2, n);
	int st = 0;
	if (pid == 0) {
		printf("child a %08x b %08x\n", sum(a, n), sum(b, n));
		fflush(stdout);
		_exit(0);
	}
	waitpid(pid, &st, 0); /* the child prints first */
	printf("parent a %08x b %08x\n", sum(a, n), sum(b, n));
	free(b);
	free(a);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
