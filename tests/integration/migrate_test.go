package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/proc/criu"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/proc/migrate"
	"github.com/onebox-project/onebox/testbed"
)

// counterC is the migrated program: it fills N MiB with a pattern, then
// counts ("c 1", "c 2", ...) with some CPU work between lines, and answers
// stdin: "sum" prints a checksum of the whole memory, "echo X" prints
// "echo X", "exit N" exits N.
const counterC = `
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
	size_t n = (size_t)atol(argc > 1 ? argv[1] : "0") << 20;
	unsigned char *p = n ? malloc(n) : 0;
	unsigned long x = 88172645463325252UL;
	for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[i] = (unsigned char)x; }
	setvbuf(stdout, 0, _IOLBF, 0);
	char line[256]; size_t have = 0;
	for (long c = 1;; c++) {
		volatile long w = 0;
		for (long k = 0; k < 300000; k++) w += k;
		printf("c %ld\n", c);
		struct pollfd pf = {0, POLLIN, 0};
		while (poll(&pf, 1, 0) == 1 && (pf.revents & POLLIN)) {
			ssize_t r = read(0, line + have, sizeof line - 1 - have);
			if (r <= 0) break;
			have += r; line[have] = 0;
			char *nl;
			while ((nl = strchr(line, '\n'))) {
				*nl = 0;
				if (!strcmp(line, "sum")) {
					unsigned long h = 1469598103934665603UL;
					for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211UL;
					printf("sum %lx\n", h);
				} else if (!strncmp(line, "echo ", 5)) printf("%s\n", line);
				else if (!strncmp(line, "exit ", 5)) return atoi(line + 5);
				memmove(line, nl + 1, strlen(nl + 1) + 1);
				have = strlen(line);
			}
		}
		usleep(2000);
	}
}
`

// needMigration skips (or fails under CI) without root, CRIU and cc, and
// builds the counter program.
func needMigration(t *testing.T) string {
	t.Helper()
	testenv.Need(t, os.Geteuid() == 0, "migration needs root (CRIU)")
	_, err := criu.Find()
	testenv.NeedNoError(t, err, "no usable CRIU (run scripts/install-criu.sh)")
	cc, err := exec.LookPath("cc")
	testenv.NeedNoError(t, err, "no C compiler")
	dir := t.TempDir()
	src := filepath.Join(dir, "counter.c")
	if err := os.WriteFile(src, []byte(counterC), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "counter")
	if out, err := exec.Command(cc, "-O1", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	return bin
}

// attached is a program run with 'onebox run', its output read line by line.
type attached struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser

	mu    sync.Mutex
	lines []string // guarded by mu
	done  chan struct{}
}

func runAttached(t *testing.T, n *testbed.Node, node string, args ...string) *attached {
	t.Helper()
	a := &attached{t: t, done: make(chan struct{})}
	a.cmd = exec.Command(binary, append([]string{"run", "--agent", n.Agent(), "--node", node, "--"}, args...)...)
	var err error
	if a.stdin, err = a.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := a.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	a.cmd.Stderr = os.Stderr
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(a.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			a.mu.Lock()
			a.lines = append(a.lines, sc.Text())
			a.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = a.cmd.Process.Kill()
		<-a.done
		_ = a.cmd.Wait()
	})
	return a
}

// waitLine waits for a line that satisfies pred after the first from
// lines, and returns it with its index.
func (a *attached) waitLine(from int, what string, pred func(string) bool) (string, int) {
	a.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		a.mu.Lock()
		for i := from; i < len(a.lines); i++ {
			if pred(a.lines[i]) {
				l := a.lines[i]
				a.mu.Unlock()
				return l, i
			}
		}
		n := len(a.lines)
		a.mu.Unlock()
		select {
		case <-a.done:
			a.t.Fatalf("output ended (after %d lines) while waiting for %s", n, what)
		case <-time.After(20 * time.Millisecond):
		}
	}
	a.t.Fatalf("no %s within 60s", what)
	return "", 0
}

func (a *attached) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.lines)
}

// advance waits for k more lines of output.
func (a *attached) advance(k int) {
	a.t.Helper()
	a.waitLine(a.count()+k-1, fmt.Sprintf("%d more lines", k), func(string) bool { return true })
}

func (a *attached) sum() string {
	a.t.Helper()
	from := a.count()
	if _, err := io.WriteString(a.stdin, "sum\n"); err != nil {
		a.t.Fatal(err)
	}
	l, _ := a.waitLine(from, "a checksum", func(l string) bool { return strings.HasPrefix(l, "sum ") })
	return l
}

// checkContinuous checks the "c N" lines count 1, 2, 3... without a gap
// or a repeat.
func (a *attached) checkContinuous() int {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	want := 1
	for _, l := range a.lines {
		v, ok := strings.CutPrefix(l, "c ")
		if !ok {
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil || n != want {
			a.t.Fatalf("counter went from %d to %q: output not continuous", want-1, l)
		}
		want++
	}
	return want - 1
}

func migrateCLI(t *testing.T, n *testbed.Node, gid, to string) (migrate.Result, cliResult) {
	t.Helper()
	r := cli(t, nil, "migrate", "-o", "json", "--agent", n.Agent(), gid, to)
	var res migrate.Result
	if r.code == 0 {
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
			t.Fatalf("migrate -o json: %v\n%s", err, r.stdout)
		}
	}
	return res, r
}

func procByArg(t *testing.T, n *testbed.Node, arg string) manager.Info {
	t.Helper()
	return waitProc(t, n, "the program in ps", func(i manager.Info) bool {
		return i.State == manager.StateRunning && len(i.Command) > 1 && i.Command[len(i.Command)-1] == arg
	})
}

// A CPU-bound counter holding 256 MiB migrates to another node and back
// while its caller watches: the count never skips or repeats, the memory's
// checksum stays, stdin still reaches it, ps shows where it is and why,
// and its exit status reaches the caller.
func TestMigrateThereAndBack(t *testing.T) {
	t.Parallel()
	prog := needMigration(t)
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	const mib = "256"
	a := runAttached(t, n1, n1.Name, prog, mib)
	a.advance(20)
	pi := procByArg(t, n1, mib)
	before := a.sum()

	res, r := migrateCLI(t, n1, pi.GID, n2.Name)
	if r.code != 0 {
		t.Fatalf("migrate to %s: exit %d: %s", n2.Name, r.code, r.stderr)
	}
	t.Logf("to %s: downtime %.0f ms (freeze %.0f, images %.0f, restore %.0f), total %.0f ms, pidns %v, %d page bytes",
		n2.Name, res.DowntimeMS, res.FreezeMS, res.ImagesMS, res.RestoreMS, res.TotalMS, res.PIDNS, res.PageBytes)
	if res.PageBytes < 256<<20 {
		t.Errorf("only %d page bytes moved for a 256 MiB program", res.PageBytes)
	}
	there := waitProc(t, n1, "the program on "+n2.Name, func(i manager.Info) bool { return i.GID == pi.GID && i.Node == n2.Name })
	if there.State != manager.StateRunning || !strings.Contains(there.Note, "migrated from "+n1.Name) {
		t.Errorf("ps after the migration: %+v", there)
	}
	a.advance(20)
	if s := a.sum(); s != before {
		t.Errorf("checksum on %s %q, before %q", n2.Name, s, before)
	}

	// Back home, asked through the other node's agent.
	res, r = migrateCLI(t, n2, pi.GID, "home")
	if r.code != 0 {
		t.Fatalf("migrate home: exit %d: %s", r.code, r.stderr)
	}
	t.Logf("home: downtime %.0f ms, total %.0f ms, pidns %v", res.DowntimeMS, res.TotalMS, res.PIDNS)
	back := waitProc(t, n2, "the program back on "+n1.Name, func(i manager.Info) bool { return i.GID == pi.GID && i.Node == n1.Name })
	if back.State != manager.StateRunning {
		t.Errorf("ps after coming home: %+v", back)
	}
	a.advance(20)
	if s := a.sum(); s != before {
		t.Errorf("checksum back home %q, before %q", s, before)
	}
	from := a.count()
	io.WriteString(a.stdin, "echo still here\n")
	a.waitLine(from, "the echo", func(l string) bool { return l == "echo still here" })
	io.WriteString(a.stdin, "exit 7\n")
	<-a.done
	err := a.cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Errorf("onebox run ended with %v, want exit status 7", err)
	}
	n := a.checkContinuous()
	t.Logf("%d counts, continuous", n)
}

// Failures before the restore leave the program running where it was,
// with a clear error: a node that is down, a target whose image
// directory is full, a target agent that dies before restoring.
func TestMigrateFailures(t *testing.T) {
	prog := needMigration(t)
	t.Setenv("ONEBOX_FAILPOINT", "migrate-in-crash@n3")
	c := startCluster(t, testbed.Options{Nodes: 4})
	n1, n2, n3, n4 := c.Nodes[0], c.Nodes[1], c.Nodes[2], c.Nodes[3]
	a := runAttached(t, n1, n1.Name, prog, "32")
	a.advance(10)
	pi := procByArg(t, n1, "32")
	sum := a.sum()

	stillHere := func(what string) {
		t.Helper()
		a.advance(10)
		if s := a.sum(); s != sum {
			t.Errorf("after %s: checksum %q, before %q", what, s, sum)
		}
		l, _ := psJSON(t, n1)
		if i, ok := findProc(l, func(i manager.Info) bool { return i.GID == pi.GID }); !ok || i.Node != n1.Name || i.State != manager.StateRunning {
			t.Errorf("after %s: ps shows %+v", what, i)
		}
	}

	t.Run("FullDisk", func(t *testing.T) {
		// A tmpfs on DATA_DIR/proc/migrate is the agent's in-memory image
		// directory (rather than /dev/shm): the images land in these 16 KiB.
		dir := filepath.Join(n2.DataDir, "proc", "migrate")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=16k"); err != nil {
			testenv.NeedNoError(t, err, "mount a small tmpfs")
		}
		defer syscall.Unmount(dir, syscall.MNT_DETACH)
		_, r := migrateCLI(t, n1, pi.GID, n2.Name)
		t.Logf("full disk: %s", r.stderr)
		if r.code == 0 || !strings.Contains(r.stderr, "no space left") || !strings.Contains(r.stderr, "goes on running on "+n1.Name) {
			t.Errorf("migrate to a full disk: exit %d, %q", r.code, r.stderr)
		}
		stillHere("a full disk")
	})

	t.Run("TargetDiesBeforeRestore", func(t *testing.T) {
		_, r := migrateCLI(t, n1, pi.GID, n3.Name)
		t.Logf("target dies: %s", r.stderr)
		if r.code == 0 || !strings.Contains(r.stderr, "goes on running on "+n1.Name) {
			t.Errorf("migrate to a dying node: exit %d, %q", r.code, r.stderr)
		}
		stillHere("the target's death")
		// The images it received (in memory: /dev/shm, as DATA_DIR is no
		// tmpfs here) go when it starts again.
		left := func() []string {
			m, _ := filepath.Glob("/dev/shm/onebox-migrate-*-" + pi.GID + ".in")
			if _, err := os.Stat(filepath.Join(n3.DataDir, "proc", "migrate", pi.GID+".in")); err == nil {
				m = append(m, "DATA_DIR/proc/migrate/"+pi.GID+".in")
			}
			return m
		}
		t.Logf("images left by the crash: %q", left())
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := c.StartNode(ctx, n3); err != nil {
			t.Fatal(err)
		}
		if ents, err := os.ReadDir(filepath.Join(n3.DataDir, "proc", "migrate")); len(ents) > 0 || (err != nil && !os.IsNotExist(err)) {
			t.Errorf("after a restart %s still holds migration images: %v %v", n3.Name, ents, err)
		}
		if l := left(); len(l) > 0 {
			t.Errorf("after a restart %s still holds migration images: %q", n3.Name, l)
		}
	})

	t.Run("NodeDown", func(t *testing.T) {
		if err := c.Kill(n4); err != nil {
			t.Fatal(err)
		}
		_, r := migrateCLI(t, n1, pi.GID, n4.Name)
		t.Logf("node down: %s", r.stderr)
		if r.code == 0 || !strings.Contains(r.stderr, n4.Name) {
			t.Errorf("migrate to a killed node: exit %d, %q", r.code, r.stderr)
		}
		stillHere("a killed node")
	})

	t.Run("Refused", func(t *testing.T) {
		_, r := migrateCLI(t, n1, pi.GID, "nosuchnode")
		if r.code == 0 || !strings.Contains(r.stderr, "no node") {
			t.Errorf("migrate to nosuchnode: exit %d, %q", r.code, r.stderr)
		}
		_, r = migrateCLI(t, n1, "g000000000000", n2.Name)
		if r.code == 0 || !strings.Contains(r.stderr, "no running process") {
			t.Errorf("migrate an unknown id: exit %d, %q", r.code, r.stderr)
		}
	})
	io.WriteString(a.stdin, "exit 0\n")
	<-a.done
	a.checkContinuous()
}

// Programs that cannot migrate say why in ps, and migrate refuses them
// with that reason: an established TCP connection, a device.
func TestMigrateCannot(t *testing.T) {
	t.Parallel()
	needMigration(t)
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	for _, tc := range []struct{ name, script, why string }{
		{"tcp", fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d; exec sleep 1001", port), "established TCP connection"},
		{"device", "exec 3<>/dev/fuse; exec sleep 1002", "uses device /dev/fuse"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := cli(t, nil, "run", "--detach", "--agent", n1.Agent(), "--", "bash", "-c", tc.script)
			if r.code != 0 {
				t.Fatalf("run: %d %s", r.code, r.stderr)
			}
			pi := waitProc(t, n1, "the note", func(i manager.Info) bool {
				return strings.Contains(strings.Join(i.Command, " "), tc.script) && strings.Contains(i.Note, "cannot migrate")
			})
			if !strings.Contains(pi.Note, tc.why) {
				t.Errorf("note %q, want it to say %q", pi.Note, tc.why)
			}
			_, mr := migrateCLI(t, n1, pi.GID, n2.Name)
			if mr.code == 0 || !strings.Contains(mr.stderr, tc.why) {
				t.Errorf("migrate: exit %d, %q; want a refusal saying %q", mr.code, mr.stderr, tc.why)
			}
			cli(t, nil, "kill", "-KILL", "--agent", n1.Agent(), pi.GID)
		})
	}
}

// onebox checkpoint saves a detached counter (and stops it), onebox
// restore starts it again on another node under a new id: its count goes
// on from where it was saved.
func TestCheckpointRestore(t *testing.T) {
	t.Parallel()
	prog := needMigration(t)
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	r := cli(t, nil, "run", "--detach", "--agent", n1.Agent(), "--node", n1.Name, "--", prog, "8")
	if r.code != 0 {
		t.Fatalf("run: %d %s", r.code, r.stderr)
	}
	gid := strings.TrimSpace(r.stdout)
	testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, "counts in the log", func(context.Context) (bool, error) {
		return len(loggedCounts(n1, gid)) >= 20, nil
	})
	// An empty directory anyone may read: the images (the program's
	// memory) must not be readable by other users all the same.
	dir := filepath.Join(t.TempDir(), "ck")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r = cli(t, nil, "checkpoint", "--stop", "--agent", n2.Agent(), gid, dir)
	if r.code != 0 {
		t.Fatalf("checkpoint: %d %s", r.code, r.stderr)
	}
	t.Log(strings.TrimSpace(r.stdout))
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("checkpoint directory: %v, %v; want no access for group and others", fi.Mode(), err)
	}
	// A restore reads a directory of the node it is asked of: only that
	// node's operator (its control socket) may ask, not another member.
	member, err := identity.Load(n2.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: member.ClientTLS()}}
	resp, err := hc.Post("https://"+n1.Ready.FabricAddr+"/v1/procs/restore?"+url.Values{"dir": {dir}, "node": {n2.Name}}.Encode(), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("restore asked by a member over the fabric: HTTP %d, want 404", resp.StatusCode)
	}
	saved := loggedCounts(n1, gid)
	last := saved[len(saved)-1]
	r = cli(t, nil, "restore", "--agent", n1.Agent(), "--node", n2.Name, dir)
	if r.code != 0 {
		t.Fatalf("restore: %d %s", r.code, r.stderr)
	}
	ngid := strings.TrimSpace(r.stdout)
	if ngid == gid || !manager.ValidGID(ngid) {
		t.Fatalf("restore printed %q", r.stdout)
	}
	pi := waitProc(t, n1, "the restored program", func(i manager.Info) bool { return i.GID == ngid && i.State == manager.StateRunning })
	if pi.Node != n2.Name || !strings.Contains(pi.Note, "checkpoint") {
		t.Errorf("restored: %+v", pi)
	}
	var got []int
	testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, "counts after the restore", func(context.Context) (bool, error) {
		got = loggedCounts(n2, ngid)
		return len(got) >= 10, nil
	})
	if len(got) == 0 || got[0] != last+1 {
		t.Errorf("saved at %d, the restored program counted from %v", last, got[:min(3, len(got))])
	}
	cli(t, nil, "kill", "-KILL", "--agent", n1.Agent(), ngid)
}

// threadsC counts on its main thread while three more threads spin.
const threadsC = `
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile unsigned long spins[3];
static void *spin(void *a) { volatile unsigned long *s = a; for (;;) { (*s)++; if ((*s & 0xfffff) == 0) usleep(1000); } return 0; }
int main(void) {
	pthread_t t[3];
	for (int i = 0; i < 3; i++) pthread_create(&t[i], 0, spin, (void *)&spins[i]);
	setvbuf(stdout, 0, _IOLBF, 0);
	for (long c = 1;; c++) { printf("c %ld\n", c); usleep(20000); }
}
`

// A program with four threads migrates: CRIU restores every thread.
func TestMigrateThreads(t *testing.T) {
	t.Parallel()
	needMigration(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "threads.c")
	if err := os.WriteFile(src, []byte(threadsC), 0o644); err != nil {
		t.Fatal(err)
	}
	prog := filepath.Join(dir, "threads")
	if out, err := exec.Command("cc", "-O1", "-pthread", "-o", prog, src).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	a := runAttached(t, n1, n1.Name, prog)
	a.advance(10)
	pi := waitProc(t, n1, "the program", func(i manager.Info) bool { return i.State == manager.StateRunning })
	if pi.Note != "" {
		t.Errorf("note of a threaded program: %q", pi.Note)
	}
	if _, r := migrateCLI(t, n1, pi.GID, n2.Name); r.code != 0 {
		t.Fatalf("migrate a threaded program: %d %s", r.code, r.stderr)
	}
	waitProc(t, n1, "the program on "+n2.Name, func(i manager.Info) bool { return i.GID == pi.GID && i.Node == n2.Name })
	a.advance(10)
	b, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", waitProc(t, n2, "pid", func(i manager.Info) bool { return i.GID == pi.GID }).PID))
	if err != nil || len(b) != 4 {
		t.Errorf("threads after the migration: %d (%v), want 4", len(b), err)
	}
	a.checkContinuous()
}

// The source node dies once every page has left, before it could tell the
// caller's agent (on a third node) where the program went: that agent finds
// the program on the target and follows it; nothing is lost.
func TestMigrateSourceDiesAfterPages(t *testing.T) {
	prog := needMigration(t)
	t.Setenv("ONEBOX_FAILPOINT", "migrate-out-crash@n1")
	c := startCluster(t, testbed.Options{Nodes: 3})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	a := runAttached(t, n3, n1.Name, prog, "16")
	a.advance(10)
	pi := procByArg(t, n3, "16")
	sum := a.sum()
	_, r := migrateCLI(t, n3, pi.GID, n2.Name)
	t.Logf("migrate while the source dies: exit %d %s", r.code, strings.TrimSpace(r.stderr))
	// ps lists what the live nodes say (and exits 1 for the dead one).
	l, _ := psJSON(t, n3)
	if i, ok := findProc(l, func(i manager.Info) bool { return i.GID == pi.GID }); !ok || i.Node != n2.Name || i.State != manager.StateRunning {
		t.Errorf("after the source died, ps shows %+v (unreachable: %v)", i, l.Unreachable)
	}
	a.advance(10)
	if s := a.sum(); s != sum {
		t.Errorf("checksum after the source died: %q, before %q", s, sum)
	}
	io.WriteString(a.stdin, "exit 5\n")
	<-a.done
	var ee *exec.ExitError
	if err := a.cmd.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 5 {
		t.Errorf("onebox run ended with %v, want exit status 5", err)
	}
	a.checkContinuous()
}

// A detached program migrates too: its output goes on in a new log file
// on the target, the count continuing where the source's log stopped.
func TestMigrateDetached(t *testing.T) {
	t.Parallel()
	prog := needMigration(t)
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	r := cli(t, nil, "run", "--detach", "--agent", n1.Agent(), "--node", n1.Name, "--", prog, "4")
	if r.code != 0 {
		t.Fatalf("run: %d %s", r.code, r.stderr)
	}
	gid := strings.TrimSpace(r.stdout)
	testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, "counts in the log", func(context.Context) (bool, error) {
		return len(loggedCounts(n1, gid)) >= 10, nil
	})
	if _, mr := migrateCLI(t, n1, gid, n2.Name); mr.code != 0 {
		t.Fatalf("migrate: %d %s", mr.code, mr.stderr)
	}
	var after []int
	testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, "counts on "+n2.Name, func(context.Context) (bool, error) {
		after = loggedCounts(n2, gid)
		return len(after) >= 10, nil
	})
	all := append(loggedCounts(n1, gid), after...)
	for i, k := range all {
		if k != i+1 {
			t.Fatalf("count %d is %d: the logs of %s and %s do not continue each other", i+1, k, n1.Name, n2.Name)
		}
	}
	pi := waitProc(t, n1, "the program on "+n2.Name, func(i manager.Info) bool { return i.GID == gid && i.Node == n2.Name })
	if !pi.Detached || !strings.HasSuffix(pi.Log, gid+".log") {
		t.Errorf("after the migration: %+v", pi)
	}
	cli(t, nil, "kill", "-KILL", "--agent", n1.Agent(), gid)
}

// loggedCounts reads the "c N" lines a detached counter wrote to its log
// on node n (the log of process gid).
func loggedCounts(n *testbed.Node, gid string) []int {
	b, _ := os.ReadFile(filepath.Join(n.DataDir, "proc", "logs", gid+".log"))
	var out []int
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "c "); ok {
			if k, err := strconv.Atoi(v); err == nil {
				out = append(out, k)
			}
		}
	}
	return out
}
