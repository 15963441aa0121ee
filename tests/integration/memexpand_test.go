package integration

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/testbed"
)

// needMemExpand skips unless userfaultfd and a C compiler are usable.
func needMemExpand(t *testing.T) {
	t.Helper()
	testenv.NeedUserfaultfd(t)
	testenv.NeedCC(t)
}

// ccProg builds memory/shim/testdata/name.c.
func ccProg(t *testing.T, name string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	out, err := exec.Command("cc", "-O2", "-o", bin, "../../memory/shim/testdata/"+name+".c").CombinedOutput()
	if err != nil {
		t.Fatalf("cc %s: %v\n%s", name, err, out)
	}
	return bin
}

// plainOutput runs argv without onebox and returns its stdout.
func plainOutput(t *testing.T, argv ...string) string {
	t.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	if err != nil {
		t.Fatalf("plain %v: %v", argv, err)
	}
	return string(out)
}

// TestMemExpand: unmodified programs under 'onebox run --memory-expand'
// with a local limit far below their footprint print what they print
// plainly; a pool too small gives ENOMEM at allocation.
func TestMemExpand(t *testing.T) {
	needMemExpand(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2, DonateMemory: "256MiB"})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	fill, fork := ccProg(t, "fill"), ccProg(t, "fork")
	run := func(t *testing.T, node *testbed.Node, local string, argv ...string) cliResult {
		t.Helper()
		args := append([]string{"run", "--agent", n1.Agent(), "--node", node.Name, "--memory-expand", "--local-memory", local, "--"}, argv...)
		return cli(t, nil, args...)
	}
	for _, tc := range []struct {
		name string
		argv []string
	}{
		{"C-fill", []string{fill, "96"}},
		{"C-fork", []string{fork, "48"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := plainOutput(t, tc.argv...)
			r := run(t, n2, "16MiB", tc.argv...)
			if r.code != 0 || r.stdout != want {
				t.Fatalf("exit %d, stdout:\n%s\nwant:\n%s\nstderr: %s", r.code, r.stdout, want, r.stderr)
			}
		})
	}
	t.Run("Python", func(t *testing.T) {
		py, err := exec.LookPath("python3")
		testenv.NeedNoError(t, err, "no python3")
		script := `
import hashlib
b = bytearray(64 << 20)
for i in range(0, len(b), 512):
    b[i] = (i >> 9) % 253
l = [i * 3 for i in range(1_500_000)]
h = hashlib.sha256(b)
h.update(str(sum(l)).encode())
print(h.hexdigest(), len(l), b.count(0))
`
		want := plainOutput(t, py, "-c", script)
		r := run(t, n1, "16MiB", py, "-c", script)
		if r.code != 0 || r.stdout != want {
			t.Fatalf("exit %d, stdout %q, want %q; stderr %s", r.code, r.stdout, want, r.stderr)
		}
	})
	t.Run("ENOMEM", func(t *testing.T) {
		// 4 GiB is more than the pool of this cluster can hold.
		r := run(t, n2, "16MiB", fill, "4096")
		if r.code != 1 || !strings.Contains(r.stdout, "malloc failed") {
			t.Fatalf("exit %d, stdout %q, stderr %q; want the program's malloc failure", r.code, r.stdout, r.stderr)
		}
	})
	t.Run("AgentKilled", func(t *testing.T) {
		// The program runs on n2 and waits; n2's agent (its pager) is
		// killed: the program must stop, and 'onebox run' must end with
		// an error, both within a bound.
		dir := t.TempDir()
		pidFile := filepath.Join(dir, "pid")
		cmd := exec.Command(binary, "run", "--agent", n1.Agent(), "--node", n2.Name, "--memory-expand", "--local-memory", "8MiB", "--",
			"sh", "-c", "echo $$ > "+pidFile+"; exec "+fill+" 32 wait")
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pw.Close()
		cmd.Stdin = pr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pr.Close()
		done := make(chan error, 1)
		lines := bufio.NewScanner(stdout)
		ready := false
		for lines.Scan() {
			if lines.Text() == "ready" {
				ready = true
				break
			}
		}
		if !ready {
			cmd.Process.Kill()
			t.Fatalf("program never ready: %s", stderr.String())
		}
		go func() {
			for lines.Scan() {
			}
			done <- cmd.Wait()
		}()
		b, _ := os.ReadFile(pidFile)
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatalf("pid file %q: %v", b, err)
		}
		if err := c.Kill(n2); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(60 * time.Second)
		for syscall.Kill(pid, 0) == nil && !isZombie(pid) {
			if time.Now().After(deadline) {
				syscall.Kill(pid, syscall.SIGKILL)
				t.Fatal("program still running 60 s after its agent was killed")
			}
			time.Sleep(50 * time.Millisecond)
		}
		select {
		case err = <-done:
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			t.Fatal("onebox run still running 60 s after the program's agent was killed")
		}
		if err == nil {
			t.Fatalf("onebox run exited 0 although the program's agent died; stderr %q", stderr.String())
		}
		t.Logf("onebox run: %v; stderr: %s", err, strings.TrimSpace(stderr.String()))
	})
}

func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && len(s) > i+2 && s[i+2] == 'Z'
}

// TestMemExpandPoolNodeLoss: a pool node dies while a program has most of
// its memory in the pool; the program goes on and reads its data intact
// from the other copies.
func TestMemExpandPoolNodeLoss(t *testing.T) {
	needMemExpand(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3, DonateMemory: "256MiB"})
	poolNodeLost(t, c, func() error { return c.Kill(c.Nodes[2]) })
}

// TestMemExpandLinkCut: the same with the pool node's link cut (netns
// testbed): its pages must come from the other copies after the timeout.
func TestMemExpandLinkCut(t *testing.T) {
	needMemExpand(t)
	needNetns(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3, NetNS: true, DonateMemory: "256MiB"})
	poolNodeLost(t, c, func() error { return c.Cut(ctxT(t, time.Minute), c.Nodes[2]) })
}

// poolNodeLost runs a program on n1 with most of its memory in the pool,
// calls lose once it has written it, and checks it reads it back intact.
func poolNodeLost(t *testing.T, c *testbed.Cluster, lose func() error) {
	py, err := exec.LookPath("python3")
	testenv.NeedNoError(t, err, "no python3")
	n1 := c.Nodes[0]
	script := `
import hashlib, sys
b = bytearray(range(256)) * (256 * 1024)
for i in range(0, len(b), 4096):
    b[i] = (i >> 12) % 251
print(hashlib.sha256(b).hexdigest())
print("ready", flush=True)
sys.stdin.readline()
print(hashlib.sha256(b).hexdigest(), flush=True)
`
	cmd := exec.Command(binary, "run", "--agent", n1.Agent(), "--node", n1.Name, "--memory-expand", "--local-memory", "8MiB", "--", py, "-c", script)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	lines := bufio.NewScanner(stdout)
	var got []string
	for lines.Scan() && lines.Text() != "ready" {
		got = append(got, lines.Text())
	}
	if len(got) != 1 {
		cmd.Process.Kill()
		t.Fatalf("before ready: %q; stderr %s", got, stderr.String())
	}
	if err := lose(); err != nil {
		t.Fatal(err)
	}
	stdin.Write([]byte("go\n"))
	go func() {
		for lines.Scan() {
			got = append(got, lines.Text())
		}
		done <- cmd.Wait()
	}()
	select {
	case err = <-done:
	case <-time.After(90 * time.Second):
		cmd.Process.Kill()
		t.Fatal("program did not finish within 90 s of the pool node's death")
	}
	if err != nil || len(got) != 2 || got[0] != got[1] {
		t.Fatalf("exit %v, output %q (the two hashes must match); stderr %s", err, got, stderr.String())
	}
	want := strings.Fields(plainOutput(t, "sh", "-c", "echo | "+py+" -c '"+script+"'"))
	if len(want) != 3 || want[0] != got[0] {
		t.Fatalf("hash %s, plain run %q", got[0], want)
	}
}
