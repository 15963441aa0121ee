package integration

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/testbed"
)

// startLoneAgent runs 'init' and one agent in dir under a shell so that a
// resource limit can be set; it returns the ready file's content.
func startLoneAgent(t *testing.T, dir, shellPrefix string) agent.Ready {
	t.Helper()
	if r := cli(t, nil, "init", "--data-dir", dir, "--name", "solo", "--advertise", "127.0.0.1"); r.code != 0 {
		t.Fatalf("init: %s", r.stderr)
	}
	logf, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	script := shellPrefix + " exec " + binary + " agent --data-dir " + dir + " --bind 127.0.0.1 --gossip-port -1 --fabric-port -1 --no-discover --mount none"
	cmd := exec.Command("sh", "-c", script)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	var ready agent.Ready
	err = testbed.WaitFor(context.Background(), 30*time.Second, "the agent to be ready", func(context.Context) (bool, error) {
		select {
		case <-exited:
			b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
			t.Fatalf("agent exited during start-up:\n%s", b)
		default:
		}
		b, err := os.ReadFile(filepath.Join(dir, agent.ReadyFile))
		if err != nil {
			return false, nil
		}
		return json.Unmarshal(b, &ready) == nil, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ready
}

// Anyone can open connections to the fabric port. Holding more of them
// than the agent has file descriptors must not end the agent: it refuses,
// backs off, and serves members again once the flood is gone.
func TestConnectionFloodDoesNotKillAgent(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "d")
	ready := startLoneAgent(t, dir, "ulimit -n 28;")
	tok, err := pki.ParseToken(mustRead(t, filepath.Join(dir, "token")))
	if err != nil {
		t.Fatal(err)
	}
	// Open them all at once: while the agent is saturated, handshakes
	// wait, and each dial is bounded.
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	for i := 0; i < 150; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Half idle TCP, half completed join handshakes that then say nothing.
			var c net.Conn
			var err error
			if i%2 == 0 {
				c, err = net.DialTimeout("tcp", ready.FabricAddr, 2*time.Second)
			} else {
				d := &net.Dialer{Timeout: 2 * time.Second, Deadline: time.Now().Add(3 * time.Second)}
				c, err = tls.DialWithDialer(d, "tcp", ready.FabricAddr, pki.JoinTLS(tok))
			}
			if err == nil {
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	time.Sleep(500 * time.Millisecond)
	for _, c := range conns {
		c.Close()
	}
	agentSock := "unix://" + filepath.Join(dir, "agent.sock")
	err = testbed.WaitFor(context.Background(), 30*time.Second, "the agent to serve again", func(context.Context) (bool, error) {
		r := cli(t, nil, "nodes", "--agent", agentSock)
		return r.code == 0 && strings.Contains(r.stdout, "solo"), nil
	})
	if err != nil {
		b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
		t.Fatalf("%v\nagent log:\n%s", err, lastBytes(b, 3<<10))
	}
	// The flood must really have exhausted the descriptors, or this test
	// proves nothing.
	if !strings.Contains(mustRead(t, filepath.Join(dir, "agent.log")), "fabric accept failed; retrying") {
		t.Errorf("the flood did not exhaust the agent's file descriptors; raise the connection count")
	}
}

// A second agent on the same data directory is refused and harms nothing
// of the first: not its ready file, not its socket; an --api-socket that
// names an ordinary file is refused and the file is kept.
func TestDataDirHasOneAgent(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "d")
	startLoneAgent(t, dir, "")
	r := cli(t, nil, "agent", "--data-dir", dir, "--bind", "127.0.0.1", "--gossip-port", "-1", "--fabric-port", "-1",
		"--no-discover", "--api-socket", filepath.Join(t.TempDir(), "other.sock"))
	if r.code != 1 || !strings.Contains(r.stderr, "another agent is using data dir") {
		t.Errorf("second agent: exit %d, %q", r.code, r.stderr)
	}
	for _, f := range []string{agent.ReadyFile, "agent.sock"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("the refused second agent removed the first one's %s", f)
		}
	}

	other := filepath.Join(t.TempDir(), "o")
	if r := cli(t, nil, "init", "--data-dir", other, "--name", "o1", "--advertise", "127.0.0.1"); r.code != 0 {
		t.Fatal(r.stderr)
	}
	precious := filepath.Join(t.TempDir(), "precious.txt")
	os.WriteFile(precious, []byte("keep me"), 0o600)
	r = cli(t, nil, "agent", "--data-dir", other, "--bind", "127.0.0.1", "--gossip-port", "-1", "--fabric-port", "-1",
		"--no-discover", "--api-socket", precious)
	if r.code != 1 || !strings.Contains(r.stderr, "is not a socket") {
		t.Errorf("--api-socket on a file: exit %d, %q", r.code, r.stderr)
	}
	if b, err := os.ReadFile(precious); err != nil || string(b) != "keep me" {
		t.Errorf("the file named by --api-socket was harmed: %v %q", err, b)
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
