package membership_test

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/membership"
)

const testCluster = "00112233aabbccdd"

type event struct {
	kind string
	name string
}

// node is one in-process gossip member with its event log.
type node struct {
	*membership.Membership
	name string

	mu     sync.Mutex
	events []event
}

func (n *node) sawEvent(kind, name string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Contains(n.events, event{kind, name})
}

func startNode(t *testing.T, name string, key []byte) *node {
	t.Helper()
	n := &node{name: name}
	m, err := membership.New(membership.Config{
		NodeName:   name,
		BindAddr:   "127.0.0.1",
		BindPort:   0,
		GossipKey:  key,
		FabricAddr: "127.0.0.1:7947",
		ClusterID:  testCluster,
		Version:    "test-" + name,
		Reconnect:  time.Second,
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnEvent: func(kind string, m membership.Member) {
			n.mu.Lock()
			defer n.mu.Unlock()
			n.events = append(n.events, event{kind, m.Name})
		},
	})
	if err != nil {
		t.Fatalf("New(%s): %v", name, err)
	}
	n.Membership = m
	t.Cleanup(func() { _ = m.Shutdown() })
	return n
}

// statuses is what n sees: member name -> status.
func statuses(n *node) map[string]membership.Status {
	out := map[string]membership.Status{}
	for _, m := range n.Members() {
		out[m.Name] = m.Status
	}
	return out
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool, state func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: not %s; state: %s", timeout, what, state())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func views(nodes ...*node) string {
	var s string
	for _, n := range nodes {
		st := statuses(n)
		keys := make([]string, 0, len(st))
		for k := range st {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		s += n.name + " sees {"
		for _, k := range keys {
			s += fmt.Sprintf(" %s:%s", k, st[k])
		}
		s += " } "
	}
	return s
}

func TestNewRefusesBadKey(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33} {
		if m, err := membership.New(membership.Config{NodeName: "n", BindAddr: "127.0.0.1", GossipKey: make([]byte, n)}); err == nil {
			m.Shutdown()
			t.Errorf("New accepted a %d-byte gossip key", n)
		}
	}
}

func TestGossipCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("gossip failure detection takes seconds")
	}
	key := bytes.Repeat([]byte{0x42}, 32)
	n1 := startNode(t, "n1", key)
	n2 := startNode(t, "n2", key)
	n3 := startNode(t, "n3", key)
	all := []*node{n1, n2, n3}

	if n, err := n1.Join(nil); n != 0 || err != nil {
		t.Errorf("Join(nil) = %d, %v; want 0, nil", n, err)
	}
	for _, n := range []*node{n2, n3} {
		if got, err := n.Join([]string{n1.LocalAddr()}); err != nil || got != 1 {
			t.Fatalf("%s Join = %d, %v", n.name, got, err)
		}
	}

	allAlive := func() bool {
		for _, n := range all {
			st := statuses(n)
			if len(st) != 3 {
				return false
			}
			for _, s := range st {
				if s != membership.StatusAlive {
					return false
				}
			}
		}
		return true
	}
	waitUntil(t, 10*time.Second, "3 alive members everywhere", allAlive, func() string { return views(all...) })

	t.Run("member details", func(t *testing.T) {
		addrs := map[string]string{}
		for _, n := range all {
			addrs[n.name] = n.LocalAddr()
		}
		for _, m := range n1.Members() {
			if m.GossipAddr != addrs[m.Name] {
				t.Errorf("%s: gossip addr %q, want %q", m.Name, m.GossipAddr, addrs[m.Name])
			}
			if m.FabricAddr != "127.0.0.1:7947" || m.ClusterID != testCluster || m.Version != "test-"+m.Name {
				t.Errorf("%s: tags not gossiped: %+v", m.Name, m)
			}
		}
		if live := n1.LiveGossipAddrs(); len(live) != 3 {
			t.Errorf("LiveGossipAddrs = %v, want 3", live)
		}
		names := []string{}
		for _, m := range n2.Members() {
			names = append(names, m.Name)
		}
		if !slices.Equal(names, []string{"n1", "n2", "n3"}) {
			t.Errorf("Members not sorted by name: %v", names)
		}
		waitUntil(t, 5*time.Second, "join events for n2 and n3 on n1", func() bool {
			return n1.sawEvent("join", "n2") && n1.sawEvent("join", "n3")
		}, func() string { n1.mu.Lock(); defer n1.mu.Unlock(); return fmt.Sprint(n1.events) })
	})

	t.Run("another gossip key cannot join", func(t *testing.T) {
		intruder := startNode(t, "x4", bytes.Repeat([]byte{0x17}, 32))
		n, err := intruder.Join([]string{n1.LocalAddr(), n2.LocalAddr()})
		if err == nil || n != 0 {
			t.Errorf("intruder Join = %d, %v; want an error", n, err)
		}
		// Whatever Join said, nobody may list the intruder for a while.
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline) {
			for _, n := range all {
				if _, ok := statuses(n)[intruder.name]; ok {
					t.Fatalf("%s lists the intruder: %s", n.name, views(n))
				}
			}
			if len(intruder.Members()) != 1 {
				t.Fatalf("the intruder sees the cluster: %s", views(intruder))
			}
			time.Sleep(100 * time.Millisecond)
		}
		_ = intruder.Shutdown()
	})

	t.Run("crashed member is failed", func(t *testing.T) {
		if err := n3.Shutdown(); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 20*time.Second, "n3 failed on n1 and n2", func() bool {
			return statuses(n1)["n3"] == membership.StatusFailed && statuses(n2)["n3"] == membership.StatusFailed
		}, func() string { return views(n1, n2) })
		if !n1.sawEvent("failed", "n3") {
			t.Error("n1 got no failed event for n3")
		}
		if live := n1.LiveGossipAddrs(); slices.Contains(live, n3.LocalAddr()) || len(live) != 2 {
			t.Errorf("LiveGossipAddrs = %v, still lists the failed n3", live)
		}
	})

	t.Run("member that leaves is left", func(t *testing.T) {
		if err := n2.Leave(); err != nil {
			t.Fatal(err)
		}
		if err := n2.Shutdown(); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 10*time.Second, "n2 left on n1", func() bool {
			return statuses(n1)["n2"] == membership.StatusLeft
		}, func() string { return views(n1) })
		if !n1.sawEvent("leave", "n2") {
			t.Error("n1 got no leave event for n2")
		}
		if st := statuses(n1)["n1"]; st != membership.StatusAlive {
			t.Errorf("n1 sees itself %s", st)
		}
	})
}
