package discovery

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/testbed/netns"
)

// The multicast test runs announcers and browsers as copies of this test
// binary inside network namespaces (mDNS needs a multicast-capable interface,
// and the root namespace must not be touched). DISCOVERY_HELPER selects the
// role of such a copy.
const helperEnv = "DISCOVERY_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "announce":
		os.Exit(helperAnnounce())
	case "browse":
		os.Exit(helperBrowse())
	default:
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", helperEnv, os.Getenv(helperEnv))
		os.Exit(2)
	}
}

func helperLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// helperAnnounce announces the peer described by the environment, prints
// "ready" and answers until its standard input closes.
func helperAnnounce() int {
	a, err := Announce(AnnounceConfig{
		Peer: Peer{
			Node:       os.Getenv("DISCOVERY_NODE"),
			ClusterID:  os.Getenv("DISCOVERY_CLUSTER"),
			FabricAddr: os.Getenv("DISCOVERY_FABRIC"),
			GossipAddr: os.Getenv("DISCOVERY_GOSSIP"),
		},
		Logger: helperLogger(),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	a.Close()
	return 0
}

// helperBrowse browses for DISCOVERY_CLUSTER and prints the peers as JSON.
func helperBrowse() int {
	peers, err := Browse(context.Background(), BrowseConfig{
		ClusterID: os.Getenv("DISCOVERY_CLUSTER"),
		Logger:    helperLogger(),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(peers); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// lockedBuffer collects a helper's stderr.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func helperCmd(ctx context.Context, t *testing.T, lan *netns.LAN, h *netns.Host, role string, env ...string) *exec.Cmd {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := lan.Command(ctx, h, exe, "-test.run=^$")
	// A race-enabled helper would otherwise sleep a second at exit.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + role, "GORACE=" + gorace}, env...)...)
	return cmd
}

// checkStderr fails the test if a helper's race detector spoke.
func checkStderr(t *testing.T, who, stderr string) {
	t.Helper()
	if strings.Contains(stderr, "DATA RACE") || strings.Contains(stderr, "panic:") {
		t.Errorf("%s:\n%s", who, stderr)
	}
}

// startAnnouncer runs an announcer for p on h and waits until it listens.
func startAnnouncer(ctx context.Context, t *testing.T, lan *netns.LAN, h *netns.Host, p Peer) {
	t.Helper()
	cmd := helperCmd(ctx, t, lan, h, "announce",
		"DISCOVERY_NODE="+p.Node, "DISCOVERY_CLUSTER="+p.ClusterID,
		"DISCOVERY_FABRIC="+p.FabricAddr, "DISCOVERY_GOSSIP="+p.GossipAddr)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close() // the helper closes its announcer and exits
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("announcer %s: %v\n%s", p.Node, err, stderr)
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("announcer %s did not exit when its stdin closed", p.Node)
		}
		checkStderr(t, "announcer "+p.Node, stderr.String())
	})

	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("unexpected output %q", line)
		}
		ready <- err
		io.Copy(io.Discard, stdout)
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("announcer %s on %s did not start: %v\n%s", p.Node, h.Name, err, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("announcer %s on %s: no ready line\n%s", p.Node, h.Name, stderr)
	}
}

// browse runs Browse for cluster on h and returns the peers it printed.
func browse(ctx context.Context, t *testing.T, lan *netns.LAN, h *netns.Host, cluster string) []Peer {
	t.Helper()
	cmd := helperCmd(ctx, t, lan, h, "browse", "DISCOVERY_CLUSTER="+cluster)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	checkStderr(t, "browser on "+h.Name, stderr.String())
	if err != nil {
		t.Fatalf("browse on %s: %v\n%s", h.Name, err, stderr.String())
	}
	var peers []Peer
	if err := json.Unmarshal(stdout.Bytes(), &peers); err != nil {
		t.Fatalf("browse output %q: %v", stdout.String(), err)
	}
	if peers == nil {
		t.Errorf("browse printed %q; want a JSON array even when empty", stdout.String())
	}
	t.Logf("browse for %s on %s took %v: %+v", cluster, h.Name, time.Since(start).Round(time.Millisecond), peers)
	return peers
}

func TestMulticastDiscovery(t *testing.T) {
	testenv.NeedNoError(t, netns.Available(), "network namespaces")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel) // not defer: the parallel subtests run after this function returns
	lan, err := netns.New(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		start := time.Now()
		defer func() { t.Logf("LAN closed in %v", time.Since(start).Round(time.Millisecond)) }()
		if err := lan.Close(); err != nil {
			t.Errorf("closing the LAN: %v", err)
		}
	})
	var hosts []*netns.Host
	for _, name := range []string{"h1", "h2", "h3"} {
		h, err := lan.AddHost(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	h1, h2, h3 := hosts[0], hosts[1], hosts[2]
	addr := func(h *netns.Host, port string) string { return net.JoinHostPort(h.Addr.String(), port) }

	const cluster, otherCluster = "0a1b2c3d4e5f6789", "fedcba9876543210"
	node1 := Peer{Node: "node1", ClusterID: cluster, FabricAddr: addr(h1, "7443"), GossipAddr: addr(h1, "7946")}
	// A dotted name checks that the instance label escaping survives the wire.
	node2 := Peer{Node: "node2.lab", ClusterID: cluster, FabricAddr: addr(h2, "7443"), GossipAddr: addr(h2, "7946")}
	// Another cluster's agent on the same host as node2: two instances on
	// one host, and the one Browse must filter out.
	stranger := Peer{Node: "stranger", ClusterID: otherCluster, FabricAddr: addr(h2, "8443"), GossipAddr: addr(h2, "8946")}
	startAnnouncer(ctx, t, lan, h1, node1)
	startAnnouncer(ctx, t, lan, h2, node2)
	startAnnouncer(ctx, t, lan, h2, stranger)

	tests := []struct {
		name    string
		from    *netns.Host
		cluster string
		want    []Peer
	}{
		{"same cluster from a new host", h3, cluster, []Peer{node1, node2}},
		{"other cluster from a new host", h3, otherCluster, []Peer{stranger}},
		{"same cluster from a member host", h1, cluster, []Peer{node1, node2}},
		{"unknown cluster", h3, "c0ffee", []Peer{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := browse(ctx, t, lan, tt.from, tt.cluster)
			if !slices.Equal(got, tt.want) {
				t.Errorf("Browse(%s) on %s = %+v, want %+v", tt.cluster, tt.from.Name, got, tt.want)
			}
		})
	}
}
