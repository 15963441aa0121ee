package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
)

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		out          string
		v            string
		major, minor int
		ok           bool
	}{
		{"Version: 4.1.1\n", "4.1.1", 4, 1, true},
		{"Version: 4.1\nGitID: v4.1-12-gabcdef\n", "4.1", 4, 1, true},
		{"Version: 3.17.1\n", "3.17.1", 3, 17, true},
		{"Version: 10.0.2\n", "10.0.2", 10, 0, true},
		{"Warn (criu/kerndat.c:1285): Can't keep kdat cache\nVersion: 4.2\n", "4.2", 4, 2, true},
		{"Version:4.1.1", "4.1.1", 4, 1, true},
		{"criu: command not found\n", "", 0, 0, false},
		{"Version: four\n", "", 0, 0, false},
		{"", "", 0, 0, false},
	} {
		v, major, minor, ok := parseVersion(tc.out)
		if v != tc.v || major != tc.major || minor != tc.minor || ok != tc.ok {
			t.Errorf("parseVersion(%q) = %q, %d, %d, %v; want %q, %d, %d, %v",
				tc.out, v, major, minor, ok, tc.v, tc.major, tc.minor, tc.ok)
		}
	}
}

func TestFindRejectsOldVersion(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "criu")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'Version: 3.17.1'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvVar, fake)
	_, err := Find()
	if err == nil || !strings.Contains(err.Error(), "need >= 4.1") {
		t.Fatalf("Find with CRIU 3.17.1 = %v; want an error saying 4.1 is needed", err)
	}
}

// readCounter returns the number in file, or -1 before the shell created it or while it is between
// truncating and writing it.
func readCounter(t *testing.T, file string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return -1
	}
	if err != nil {
		t.Fatalf("read counter: %v", err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return n
}

// waitCounter polls file until cond holds for a readable counter value, and returns that value.
func waitCounter(t *testing.T, file string, timeout time.Duration, what string, cond func(int) bool) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := -1
	for time.Now().Before(deadline) {
		if n := readCounter(t, file); n >= 0 {
			last = n
			if cond(n) {
				return n
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("timed out after %v waiting for %s (last counter %d)", timeout, what, last)
	return 0
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses.
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// ours reports whether pid is still the counter shell writing to file (guards against PID reuse).
func ours(pid int, file string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), file)
}

// reapAll reaps children until none is left; the dumped tree was SIGKILLed, so they all exit.
func reapAll(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		var ws syscall.WaitStatus
		wpid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if errors.Is(err, syscall.ECHILD) {
			return
		}
		if wpid <= 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Fatalf("children still running %v after dump", timeout)
}

func logTail(dir, name string) string {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return fmt.Sprintf("(no %s: %v)", name, err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return name + ":\n" + strings.Join(lines, "\n")
}

// TestDumpRestore checkpoints a running shell loop, checks it is gone, restores it detached, and
// checks that its counter continues from where it stopped instead of starting again at 1.
func TestDumpRestore(t *testing.T) {
	testenv.Need(t, os.Geteuid() == 0, "CRIU dump/restore needs root")
	b, err := Find()
	testenv.NeedNoError(t, err, "no usable CRIU (run scripts/install-criu.sh)")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := b.Check(ctx); err != nil {
		t.Fatalf("found %s (%s) but: %v", b.Path, b.Version, err)
	}
	t.Logf("using %s (CRIU %s)", b.Path, b.Version)

	// The restored process is reparented when the detached `criu restore` exits: become a child
	// subreaper so that it is reparented to this test, which can then reap it.
	const prSetChildSubreaper = 36
	if _, _, e := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); e != 0 {
		t.Fatalf("prctl(PR_SET_CHILD_SUBREAPER): %v", e)
	}
	defer syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 0, 0)

	dir := t.TempDir()
	images := filepath.Join(dir, "images")
	if err := os.Mkdir(images, 0o700); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "counter")
	// Each value is written to a temporary file and renamed over the
	// counter: a dump that kills the shell between the truncation and the
	// write of a plain `echo > file` would leave the counter empty.
	script := fmt.Sprintf("i=0; while :; do i=$((i+1)); echo $i > %[1]s.tmp; mv %[1]s.tmp %[1]s; sleep 0.05; done", file)
	// A session leader with stdin/stdout/stderr on /dev/null (exec.Cmd's default) and no
	// controlling terminal: CRIU dumps and restores it without --shell-job.
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	waited := false
	defer func() {
		// Kill whatever is left of the process group (the shell and its sleep), then reap.
		if ours(pid, file) {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if !waited {
			_ = cmd.Wait()
		}
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			var ws syscall.WaitStatus
			if wpid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); wpid <= 0 || err != nil {
				if !alive(pid) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}()

	waitCounter(t, file, 10*time.Second, "the counter to reach 5", func(n int) bool { return n >= 5 })

	start := time.Now()
	dump := b.Command(ctx, "dump", "-t", strconv.Itoa(pid), "-D", images, "-v1", "-o", "dump.log")
	if out, err := dump.CombinedOutput(); err != nil {
		t.Fatalf("criu dump: %v\n%s\n%s", err, out, logTail(images, "dump.log"))
	}
	t.Logf("dump took %v", time.Since(start))

	// CRIU kills the dumped tree. Reap the shell (our child) and its sleep (reparented to us, the
	// subreaper): restore needs their PIDs free, and a zombie still holds its PID.
	werr := cmd.Wait()
	waited = true
	var exitErr *exec.ExitError
	if !errors.As(werr, &exitErr) {
		t.Fatalf("after dump, Wait = %v; want the shell killed", werr)
	}
	reapAll(t, 5*time.Second)
	if alive(pid) {
		t.Fatalf("process %d still running after dump", pid)
	}
	dumped := readCounter(t, file)
	time.Sleep(200 * time.Millisecond)
	if n := readCounter(t, file); n != dumped || dumped < 5 {
		t.Fatalf("counter after dump = %d, then %d; want it frozen at a value >= 5", dumped, n)
	}

	start = time.Now()
	restore := b.Command(ctx, "restore", "-D", images, "-d", "-v1", "-o", "restore.log")
	if out, err := restore.CombinedOutput(); err != nil {
		t.Fatalf("criu restore: %v\n%s\n%s", err, out, logTail(images, "restore.log"))
	}
	t.Logf("restore took %v", time.Since(start))
	if !alive(pid) || !ours(pid, file) {
		t.Fatalf("process %d not running after restore", pid)
	}

	// The first value written after restore must follow the dumped one (a fresh start writes 1).
	next := waitCounter(t, file, 10*time.Second, "the restored process to write", func(n int) bool { return n != dumped })
	if next <= dumped {
		t.Fatalf("after restore the counter went from %d to %d; want it to continue", dumped, next)
	}
	later := waitCounter(t, file, 10*time.Second, "the counter to keep increasing", func(n int) bool { return n >= next+3 })
	t.Logf("counter: %d at dump, %d then %d after restore", dumped, next, later)

	if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill restored process group: %v", err)
	}
}

// TestKillEndsWrappedCommand: Kill and WaitFor end what the command
// started too (as nsenter forks CRIU and does not pass SIGKILL on), so a
// hung CRIU under a wrapper does not keep running.
func TestKillEndsWrappedCommand(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "criu")
	pidFile := filepath.Join(dir, "child.pid")
	script := "#!/bin/sh\nsleep 300 &\necho $! > " + pidFile + "\nwait\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, how := range []string{"kill", "waitfor"} {
		os.Remove(pidFile)
		c, err := Binary{Path: fake}.Start(context.Background(), dir, "x.log", nil, []string{"dump"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		child := 0
		for deadline := time.Now().Add(30 * time.Second); child == 0; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the fake criu did not start its child")
			}
			if b, err := os.ReadFile(pidFile); err == nil {
				child, _ = strconv.Atoi(strings.TrimSpace(string(b)))
			}
		}
		if how == "kill" {
			c.Kill()
			<-c.Done()
		} else if err := c.WaitFor(100 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "did not end") {
			t.Fatalf("WaitFor of a hung command: %v", err)
		}
		// The child is gone (or a zombie waiting for init) within a
		// generous bound.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child))
			if err != nil || strings.Contains(string(b), ") Z") {
				break
			}
			if time.Now().After(deadline) {
				syscall.Kill(child, syscall.SIGKILL)
				t.Fatalf("%s: the command's child %d still runs", how, child)
			}
		}
	}
}
