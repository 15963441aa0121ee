package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/testbed"
)

// onebox dev as a user runs it: it prints ONEBOX_AGENT=..., the CLI then
// sees three alive nodes, a killed agent turns failed, and Ctrl-C removes
// everything dev created.
func TestDevCluster(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "dev")
	cmd := exec.Command(binary, "dev", "--nodes", "3", "--dir", dir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := os.Create(filepath.Join(t.TempDir(), "dev.stderr"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() { exited <- cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var agentAddr string
	select {
	case l := <-lines:
		agentAddr, _ = strings.CutPrefix(l, "ONEBOX_AGENT=")
		if agentAddr == l {
			t.Fatalf("first line of dev is %q, want ONEBOX_AGENT=...", l)
		}
	case <-time.After(90 * time.Second):
		b, _ := os.ReadFile(stderr.Name())
		t.Fatalf("dev printed no ONEBOX_AGENT line in 90 s; stderr:\n%s", b)
	}
	env := []string{"ONEBOX_AGENT=" + agentAddr}

	r := cli(t, env, "nodes", "-o", "json")
	var nr api.NodesResponse
	if err := json.Unmarshal([]byte(r.stdout), &nr); err != nil || r.code != 0 {
		t.Fatalf("nodes -o json: exit %d err %v\n%s%s", r.code, err, r.stdout, r.stderr)
	}
	if nr.Totals.Nodes != 3 || nr.Totals.PoolDonated == 0 {
		t.Fatalf("dev cluster: %d nodes counted, pool %d", nr.Totals.Nodes, nr.Totals.PoolDonated)
	}
	for _, n := range nr.Nodes {
		if n.Status != "alive" || n.Info == nil || len(n.Info.Exports) != 1 || n.Info.Exports[0].Name != "scratch" {
			t.Fatalf("node %s: status %s, info %v (dev agents donate memory and export scratch)", n.Name, n.Status, n.Info)
		}
	}

	// Kill n3's agent as a crash would.
	b, err := os.ReadFile(filepath.Join(dir, "n3", agent.ReadyFile))
	if err != nil {
		t.Fatal(err)
	}
	var ready agent.Ready
	if err := json.Unmarshal(b, &ready); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(ready.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	err = testbed.WaitFor(context.Background(), 30*time.Second, "n3 failed", func(context.Context) (bool, error) {
		r := cli(t, env, "nodes", "-o", "json")
		var nr api.NodesResponse
		if err := json.Unmarshal([]byte(r.stdout), &nr); err != nil {
			return false, err
		}
		for _, n := range nr.Nodes {
			if n.Name == "n3" {
				return n.Status == "failed", nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("n3 declared failed %v after SIGKILL (issue target: within 10 s)", time.Since(killed).Round(100*time.Millisecond))

	// Ctrl-C: dev stops the agents and removes what it created.
	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-exited:
		if err != nil {
			b, _ := os.ReadFile(stderr.Name())
			t.Fatalf("dev exited with %v; stderr:\n%s", err, b)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("dev did not exit within 60 s of SIGINT")
	}
	for _, n := range []string{"n1", "n2"} {
		if _, err := os.Stat(filepath.Join(dir, n, "agent.sock")); err == nil {
			t.Errorf("%s's socket is still there after dev exited", n)
		}
		if pidAlive(t, filepath.Join(dir, n)) {
			t.Errorf("%s's agent still runs after dev exited", n)
		}
	}
	b, _ = os.ReadFile(stderr.Name())
	if !strings.Contains(string(b), "removed everything dev created") {
		t.Errorf("dev's goodbye is missing; stderr:\n%s", b)
	}
}

func pidAlive(t *testing.T, dataDir string) bool {
	t.Helper()
	// Look for any process whose command line names this data dir.
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cl, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if strings.Contains(string(cl), dataDir+"\x00") && strings.Contains(string(cl), "agent") {
			return true
		}
	}
	return false
}

// onebox demo runs start to finish and prints its summary.
func TestDemo(t *testing.T) {
	t.Parallel()
	r := cli(t, nil, "demo")
	if r.code != 0 {
		t.Fatalf("demo: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	wants := []string{"onebox nodes", "onebox status", "hello from", "exited with its status, 3", "declared failed", "alive again", "Summary", "all agents stopped"}
	if _, err := os.Stat("/dev/fuse"); err == nil && os.Geteuid() == 0 {
		wants = append(wants, "own disk now holds: written on n1")
	}
	if os.Geteuid() == 0 { // CI: CRIU, userfaultfd, cc and python3 are installed
		wants = append(wants, "the counter went on on n2 without a gap", "migrated from n1: user",
			"with memory expansion: checksum", "identical", "the page, carried n1 -> fabric")
	}
	for _, want := range wants {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("demo output lacks %q:\n%s", want, r.stdout)
		}
	}
}
