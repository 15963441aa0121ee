package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/testbed"
	"github.com/onebox-project/onebox/testbed/netns"
)

func needNetns(t *testing.T) {
	t.Helper()
	testenv.NeedNoError(t, netns.Available(), "needs network namespaces (root)")
}

// A node whose link is cut is suspected and then declared failed by the
// others (and sees them failed); when the link heals the two sides merge
// back by themselves.
func TestPartitionAndHeal(t *testing.T) {
	needNetns(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3, NetNS: true})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	ctx := ctxT(t, 3*time.Minute)
	if n1.Host == nil || n1.Ready.FabricAddr != n1.Host.Addr.String()+":7947" {
		t.Fatalf("n1 should serve on its own host address with the default port, got %q", n1.Ready.FabricAddr)
	}

	if err := c.Cut(ctx, n3); err != nil {
		t.Fatal(err)
	}
	// First unreachable while gossip still lists it (suspect), then failed.
	if err := c.WaitStatus(ctx, 45*time.Second, n1, "n3", membership.StatusSuspect, membership.StatusFailed); err != nil {
		t.Fatal(err)
	}
	for _, obs := range []*testbed.Node{n1, n2} {
		if err := c.WaitStatus(ctx, 45*time.Second, obs, "n3", membership.StatusFailed); err != nil {
			t.Fatal(err)
		}
	}
	// n3 is alive but alone: it sees the majority as failed, and its API
	// still answers (the agent did not die with its link).
	if err := c.WaitStatus(ctx, 45*time.Second, n3, "n1", membership.StatusFailed); err != nil {
		t.Fatal(err)
	}

	if err := c.Heal(ctx, n3); err != nil {
		t.Fatal(err)
	}
	for _, obs := range []*testbed.Node{n1, n2, n3} {
		if err := c.WaitAlive(ctxT(t, 60*time.Second), obs, 3); err != nil {
			t.Fatal(err)
		}
	}
}

// A killed host (its agent killed and its link cut) is declared failed,
// and the survivors' one-machine view drops its resources.
func TestKilledHost(t *testing.T) {
	needNetns(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3, NetNS: true})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	ctx := ctxT(t, 2*time.Minute)
	before, err := c.Client(n1).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Kill(n2); err != nil {
		t.Fatal(err)
	}
	if err := c.Cut(ctx, n2); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitStatus(ctx, 30*time.Second, n1, "n2", membership.StatusFailed); err != nil {
		t.Fatal(err)
	}
	after, err := c.Client(n1).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after.Nodes != before.Nodes-1 || after.CPUs >= before.CPUs || after.PoolDonated >= before.PoolDonated {
		t.Errorf("after losing n2 the machine should shrink: before %+v after %+v", before.Totals, after.Totals)
	}
}

// A node started with only the token finds the cluster on the LAN by mDNS
// and joins by itself (openMosix's omdiscd, secured by the CA pin).
func TestAutoDiscoveryJoin(t *testing.T) {
	needNetns(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2, NetNS: true, Discover: true})
	ctx := ctxT(t, 2*time.Minute)
	n3, err := c.AddNodeByDiscovery(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, obs := range c.Nodes {
		if err := c.WaitAlive(ctx, obs, 3); err != nil {
			t.Fatal(err)
		}
	}
	log, _ := os.ReadFile(filepath.Join(n3.DataDir, "agent.log"))
	if !strings.Contains(string(log), "found cluster members on the LAN") {
		t.Errorf("n3 should have joined through discovery; its log:\n%s", log)
	}
}
