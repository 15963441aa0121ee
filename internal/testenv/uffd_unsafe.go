package testenv

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// NeedUserfaultfd skips (fails in CI) unless this process can make a
// userfaultfd: root here, where vm.unprivileged_userfaultfd is 0.
func NeedUserfaultfd(t testing.TB) {
	t.Helper()
	Need(t, os.Geteuid() == 0, "userfaultfd needs root here (vm.unprivileged_userfaultfd=0)")
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	Need(t, e == 0, "userfaultfd unusable: %v", e)
	unix.Close(int(fd))
}

// NeedCC skips (fails in CI) unless a C compiler (cc) is on PATH, for
// tests that build the shim or a C workload.
func NeedCC(t testing.TB) {
	t.Helper()
	_, err := exec.LookPath("cc")
	NeedNoError(t, err, "no C compiler (cc)")
}
