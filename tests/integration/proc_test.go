package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/testbed"
)

// psJSON runs 'onebox ps -o json' against node's agent.
func psJSON(t *testing.T, n *testbed.Node) (manager.ClusterList, cliResult) {
	t.Helper()
	r := cli(t, nil, "ps", "-o", "json", "--agent", n.Agent())
	var l manager.ClusterList
	if err := json.Unmarshal([]byte(r.stdout), &l); err != nil {
		t.Fatalf("ps -o json via %s (exit %d, %s): not JSON: %v\n%s", n.Name, r.code, r.stderr, err, r.stdout)
	}
	return l, r
}

func findProc(l manager.ClusterList, pred func(manager.Info) bool) (manager.Info, bool) {
	for _, p := range l.Procs {
		if pred(p) {
			return p, true
		}
	}
	return manager.Info{}, false
}

// waitProc waits until ps via n shows the process gid in a state that
// satisfies ok.
func waitProc(t *testing.T, n *testbed.Node, what string, pred func(manager.Info) bool) manager.Info {
	t.Helper()
	var got manager.Info
	err := testbed.WaitFor(ctxT(t, 60*time.Second), 30*time.Second, what, func(context.Context) (bool, error) {
		l, r := psJSON(t, n)
		if r.code != 0 {
			return false, fmt.Errorf("ps exit %d: %s", r.code, r.stderr)
		}
		var ok bool
		got, ok = findProc(l, pred)
		return ok, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// The one process space on a 3-node cluster: the same workload run plainly
// and through 'onebox run' on another node gives the same bytes and exit
// status; stdin streams; signals are forwarded; detached processes are
// seen and killed from any node; errors are clear.
func TestProcRunPsKill(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]

	t.Run("RunSameOutputAndExitCode", func(t *testing.T) {
		script := "seq 1 20000; echo err >&2; exit 3"
		plain := exec.Command("sh", "-c", script)
		var pout, perr bytes.Buffer
		plain.Stdout, plain.Stderr = &pout, &perr
		err := plain.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 3 {
			t.Fatalf("plain run: %v", err)
		}
		r := cli(t, nil, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "sh", "-c", script)
		if r.code != 3 {
			t.Errorf("exit %d, want 3 (stderr %q)", r.code, lastBytes([]byte(r.stderr), 500))
		}
		if r.stdout != pout.String() {
			t.Errorf("stdout differs from a plain run: %d bytes vs %d", len(r.stdout), pout.Len())
		}
		if r.stderr != perr.String() {
			t.Errorf("stderr %q, want %q", r.stderr, perr.String())
		}
		// Killed by a signal: 128+N, as a shell reports.
		r = cli(t, nil, "run", "--agent", n1.Agent(), "--node", n3.Name, "--", "sh", "-c", "kill -TERM $$")
		if r.code != 128+int(syscall.SIGTERM) {
			t.Errorf("program killed by SIGTERM: exit %d, want %d (%s)", r.code, 128+int(syscall.SIGTERM), r.stderr)
		}
		// Environment and working directory travel with the call.
		cmd := exec.CommandContext(ctxT(t, 60*time.Second), binary, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "sh", "-c", `echo "$ONEBOX_TEST_VAR $PWD"`)
		cmd.Env = append(os.Environ(), "ONEBOX_TEST_VAR=carried")
		cmd.Dir = n1.DataDir
		out, err := cmd.Output()
		if err != nil || string(out) != "carried "+n1.DataDir+"\n" {
			t.Errorf("env and cwd: %q, %v", out, err)
		}
	})

	t.Run("RunStdin", func(t *testing.T) {
		data := randomBytes(5 << 20)
		sum := sha256.Sum256(data)
		want := hex.EncodeToString(sum[:]) + "  -\n"
		cmd := exec.CommandContext(ctxT(t, 60*time.Second), binary, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "sha256sum")
		cmd.Stdin = bytes.NewReader(data)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("run sha256sum: %v: %s", err, stderr.String())
		}
		if string(out) != want {
			t.Errorf("remote sha256sum %q, want %q", out, want)
		}
	})

	t.Run("RunForwardsSignal", func(t *testing.T) {
		cmd := exec.CommandContext(ctxT(t, 60*time.Second), binary, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "sleep", "1001")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		isOurs := func(p manager.Info) bool { return slices.Equal(p.Command, []string{"sleep", "1001"}) }
		p := waitProc(t, n3, "sleep 1001 running on n2", func(p manager.Info) bool { return isOurs(p) && p.State == manager.StateRunning })
		if p.Node != n2.Name || p.Home != n1.Name {
			t.Errorf("node %s home %s, want n2 and n1", p.Node, p.Home)
		}
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		err := cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 130 {
			t.Fatalf("onebox run after SIGINT: %v (stderr %q), want exit 130", err, stderr.String())
		}
		p = waitProc(t, n1, "sleep 1001 killed", func(p manager.Info) bool { return isOurs(p) && p.State != manager.StateRunning })
		if p.StateText() != "killed SIGINT" {
			t.Errorf("state %q, want killed SIGINT", p.StateText())
		}
		if err := syscall.Kill(p.PID, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("remote sleep (pid %d) still exists: %v", p.PID, err)
		}
	})

	t.Run("RunCallerGoneHangsUp", func(t *testing.T) {
		cmd := exec.CommandContext(ctxT(t, 60*time.Second), binary, "run", "--agent", n1.Agent(), "--node", n3.Name, "--", "sleep", "1005")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		isOurs := func(p manager.Info) bool { return slices.Equal(p.Command, []string{"sleep", "1005"}) }
		waitProc(t, n1, "sleep 1005 running", func(p manager.Info) bool { return isOurs(p) && p.State == manager.StateRunning })
		_ = cmd.Process.Kill() // the caller vanishes without a word
		_ = cmd.Wait()
		p := waitProc(t, n2, "sleep 1005 hung up", func(p manager.Info) bool { return isOurs(p) && p.State != manager.StateRunning })
		if p.StateText() != "killed SIGHUP" {
			t.Errorf("state %q, want killed SIGHUP", p.StateText())
		}
	})

	t.Run("PsAndKillFromAnyNode", func(t *testing.T) {
		r := cli(t, nil, "run", "--agent", n1.Agent(), "--node", n2.Name, "--detach", "--", "sleep", "1002")
		if r.code != 0 {
			t.Fatalf("run --detach: exit %d: %s", r.code, r.stderr)
		}
		gid := strings.TrimSpace(r.stdout)
		p := waitProc(t, n3, "detached process listed from n3", func(p manager.Info) bool { return p.GID == gid })
		if p.Node != n2.Name || p.Home != n1.Name || p.State != manager.StateRunning || !p.Detached || p.Log == "" || p.PID <= 0 {
			t.Errorf("ps from n3: %+v", p)
		}
		if !strings.HasPrefix(p.Log, n2.DataDir+"/") {
			t.Errorf("log %q is not in n2's data dir", p.Log)
		}
		table := cli(t, nil, "ps", "--agent", n3.Agent())
		if table.code != 0 || !strings.Contains(table.stdout, gid) || !strings.Contains(table.stdout, "sleep 1002") {
			t.Errorf("ps table: exit %d\n%s", table.code, table.stdout)
		}
		if r := cli(t, nil, "kill", "--agent", n3.Agent(), gid); r.code != 0 {
			t.Fatalf("kill from n3: exit %d: %s", r.code, r.stderr)
		}
		p = waitProc(t, n3, "killed process", func(p manager.Info) bool { return p.GID == gid && p.State != manager.StateRunning })
		if p.StateText() != "killed SIGTERM" {
			t.Errorf("state %q, want killed SIGTERM", p.StateText())
		}
		// -SIGNAL form, on a process of n1 from n2.
		r = cli(t, nil, "run", "--agent", n1.Agent(), "--detach", "--", "sleep", "1003")
		gid = strings.TrimSpace(r.stdout)
		if r := cli(t, nil, "kill", "-KILL", "--agent", n2.Agent(), gid); r.code != 0 {
			t.Fatalf("kill -KILL: exit %d: %s", r.code, r.stderr)
		}
		p = waitProc(t, n2, "killed by SIGKILL", func(p manager.Info) bool { return p.GID == gid && p.State != manager.StateRunning })
		if p.StateText() != "killed SIGKILL" || p.Node != n1.Name {
			t.Errorf("state %q on %s", p.StateText(), p.Node)
		}
	})

	t.Run("KillUnknownGID", func(t *testing.T) {
		r := cli(t, nil, "kill", "--agent", n1.Agent(), "g0123456789ab")
		if r.code != 1 || !strings.Contains(r.stderr, "onebox ps") {
			t.Errorf("unknown gid: exit %d, stderr %q", r.code, r.stderr)
		}
		r = cli(t, nil, "kill", "--agent", n1.Agent(), "-s", "NOSUCHSIG", "g0123456789ab")
		if r.code != 2 {
			t.Errorf("bad signal: exit %d, want 2 (%s)", r.code, r.stderr)
		}
		r = cli(t, nil, "kill", "--agent", n1.Agent())
		if r.code != 2 {
			t.Errorf("no gid: exit %d, want 2", r.code)
		}
	})

	// Processes a program leaves behind in its group are still its own:
	// kill reaches them after the program itself ended.
	t.Run("KillReachesLeftoverChildren", func(t *testing.T) {
		marker := fmt.Sprintf("%d", 31000+os.Getpid()%1000)
		r := cli(t, nil, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "sh", "-c", "sleep "+marker+" & echo started; exit 3")
		if r.code != 3 {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
		if !sleepRunning(marker) {
			t.Fatalf("the background sleep should still run after its parent exited")
		}
		p := waitProc(t, n1, "the exited program", func(p manager.Info) bool { return strings.Contains(strings.Join(p.Command, " "), marker) })
		if r := cli(t, nil, "kill", "-KILL", "--agent", n3.Agent(), p.GID); r.code != 0 {
			t.Fatalf("kill of a program with leftover children: exit %d: %s", r.code, r.stderr)
		}
		err := testbed.WaitFor(context.Background(), 10*time.Second, "the leftover sleep to die", func(context.Context) (bool, error) {
			return !sleepRunning(marker), nil
		})
		if err != nil {
			t.Error(err)
		}
		if r := cli(t, nil, "kill", "--agent", n3.Agent(), p.GID); r.code != 1 || !strings.Contains(r.stderr, "already ended") {
			t.Errorf("kill once the group is empty: exit %d %q", r.code, r.stderr)
		}
	})

	// As a shell: a program that is not there exits 127; onebox's own
	// token and agent address are not passed to the program.
	t.Run("NotFoundAndEnvironment", func(t *testing.T) {
		r := cli(t, nil, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "no-such-program-here")
		if r.code != 127 || !strings.Contains(r.stderr, "not found") {
			t.Errorf("missing program: exit %d %q", r.code, r.stderr)
		}
		// Found but not executable: 126, as a shell says.
		plain := filepath.Join(t.TempDir(), "data.txt")
		if err := os.WriteFile(plain, []byte("not a program\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		r = cli(t, nil, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", plain)
		if r.code != 126 || !strings.Contains(r.stderr, "not an executable") {
			t.Errorf("not executable: exit %d %q", r.code, r.stderr)
		}
		r = cli(t, []string{"ONEBOX_TOKEN=secret-token", "ONEBOX_AGENT=" + n1.Agent(), "VISIBLE=yes"},
			"run", "--node", n2.Name, "--", "sh", "-c", `echo "token=$ONEBOX_TOKEN agent=$ONEBOX_AGENT visible=$VISIBLE"`)
		if r.code != 0 || strings.TrimSpace(r.stdout) != "token= agent= visible=yes" {
			t.Errorf("environment: exit %d, %q %q", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("RunBest", func(t *testing.T) {
		r := cli(t, nil, "run", "--agent", n1.Agent(), "--best", "--detach", "--", "true")
		if r.code != 0 {
			t.Fatalf("run --best: exit %d: %s", r.code, r.stderr)
		}
		gid := strings.TrimSpace(r.stdout)
		p := waitProc(t, n1, "the --best process", func(p manager.Info) bool { return p.GID == gid })
		if c.Node(p.Node) == nil {
			t.Errorf("--best ran on %q", p.Node)
		}
		if r := cli(t, nil, "run", "--agent", n1.Agent(), "--best", "--node", "n2", "--", "true"); r.code != 2 {
			t.Errorf("--best with --node: exit %d, want 2", r.code)
		}
		if r := cli(t, nil, "run", "--agent", n1.Agent(), "--node", "nosuchnode", "--", "true"); r.code != 1 || !strings.Contains(r.stderr, "nosuchnode") {
			t.Errorf("unknown node: exit %d: %s", r.code, r.stderr)
		}
	})

	t.Run("RunAndKillOnDownNode", func(t *testing.T) {
		r := cli(t, nil, "run", "--agent", n1.Agent(), "--node", n3.Name, "--detach", "--", "sleep", "1004")
		if r.code != 0 {
			t.Fatalf("run --detach on n3: exit %d: %s", r.code, r.stderr)
		}
		gid := strings.TrimSpace(r.stdout)
		victim := waitProc(t, n1, "sleep 1004 on n3", func(p manager.Info) bool { return p.GID == gid })
		if err := c.Kill(n3); err != nil {
			t.Fatal(err)
		}
		// A crashed agent takes its programs with it (Pdeathsig): nothing
		// would manage them.
		err := testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, "n3's program to end with its agent", func(context.Context) (bool, error) {
			return errors.Is(syscall.Kill(victim.PID, 0), syscall.ESRCH), nil
		})
		if err != nil {
			t.Error(err)
		}
		r = cli(t, nil, "run", "--agent", n1.Agent(), "--node", n3.Name, "--", "true")
		if r.code != 1 || !strings.Contains(r.stderr, "n3") {
			t.Errorf("run on a down node: exit %d, stderr %q", r.code, r.stderr)
		}
		r = cli(t, nil, "kill", "--agent", n1.Agent(), gid)
		if r.code != 1 || !strings.Contains(r.stderr, "n3") {
			t.Errorf("kill of a process on a down node: exit %d, stderr %q", r.code, r.stderr)
		}
		l, pr := psJSON(t, n1)
		if pr.code != 1 || len(l.Unreachable) != 1 || l.Unreachable[0].Node != n3.Name {
			t.Errorf("ps with n3 down: exit %d, unreachable %+v", pr.code, l.Unreachable)
		}
	})
}

// sleepRunning reports whether a "sleep ARG" process exists.
func sleepRunning(arg string) bool {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err == nil && string(b) == "sleep\x00"+arg+"\x00" {
			st, _ := os.ReadFile("/proc/" + e.Name() + "/stat")
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && len(st) > i+2 && st[i+2] == 'Z' {
				continue
			}
			return true
		}
	}
	return false
}
