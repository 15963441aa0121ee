package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	loadbal "github.com/onebox-project/onebox/proc/balance"
	"github.com/onebox-project/onebox/proc/criu"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/testbed"
)

// balCordoned reports whether observer's agent sees node cordoned
// (gossip), from 'onebox nodes -o json'.
func balCordoned(t *testing.T, observer *testbed.Node, node string) (bool, error) {
	r := cli(t, nil, "nodes", "-o", "json", "--agent", observer.Agent())
	if r.code != 0 {
		return false, fmt.Errorf("nodes via %s: exit %d: %s", observer.Name, r.code, r.stderr)
	}
	var nr api.NodesResponse
	if err := json.Unmarshal([]byte(r.stdout), &nr); err != nil {
		return false, err
	}
	for _, n := range nr.Nodes {
		if n.Name == node {
			return n.Cordoned, nil
		}
	}
	return false, fmt.Errorf("%s does not list %s", observer.Name, node)
}

// balWaitCordon waits until every node of c sees node's mark as want.
func balWaitCordon(t *testing.T, c *testbed.Cluster, node string, want bool) {
	t.Helper()
	for _, o := range c.Nodes {
		err := testbed.WaitFor(ctxT(t, 30*time.Second), 20*time.Second, fmt.Sprintf("%s sees %s cordoned=%v", o.Name, node, want),
			func(context.Context) (bool, error) {
				got, err := balCordoned(t, o, node)
				return err == nil && got == want, err
			})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// balRunDetached starts argv with 'onebox run --detach' via n and
// returns the global id it prints.
func balRunDetached(t *testing.T, n *testbed.Node, flags []string, argv ...string) string {
	t.Helper()
	args := append(append([]string{"run", "--detach", "--agent", n.Agent()}, flags...), "--")
	r := cli(t, nil, append(args, argv...)...)
	if r.code != 0 {
		t.Fatalf("run %v: exit %d: %s", flags, r.code, r.stderr)
	}
	gid := strings.TrimSpace(r.stdout)
	if f := strings.Fields(gid); len(f) > 0 {
		gid = f[0]
	}
	if !manager.ValidGID(gid) {
		t.Fatalf("run --detach printed %q, not a global id", r.stdout)
	}
	t.Cleanup(func() { cli(t, nil, "kill", "-KILL", "--agent", n.Agent(), gid) })
	return gid
}

// Cordon, uncordon and drain on a 3-node cluster: the mark is seen from
// every node and survives a restart of the node's agent; run --best never
// picks a cordoned node and run --node is refused there; a drain that
// cannot move a process says which and why, exits 1, and the process
// keeps running.
func TestBalanceCordonDrain(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]

	// Cordon from another node: forwarded to the node, seen everywhere.
	r := cli(t, nil, "cordon", "--agent", n1.Agent(), n2.Name)
	if r.code != 0 || !strings.Contains(r.stdout, "n2 is cordoned") {
		t.Fatalf("cordon n2: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	r = cli(t, nil, "cordon", "--agent", n2.Agent(), n3.Name)
	if r.code != 0 {
		t.Fatalf("cordon n3: exit %d: %s", r.code, r.stderr)
	}
	balWaitCordon(t, c, n2.Name, true)
	balWaitCordon(t, c, n3.Name, true)
	if r := cli(t, nil, "nodes", "--agent", n3.Agent()); !strings.Contains(r.stdout, "alive,cordoned") {
		t.Errorf("nodes table does not show the mark:\n%s", r.stdout)
	}

	// Only n1 is schedulable: --best from any node lands there.
	for _, via := range []*testbed.Node{n1, n2, n3} {
		gid := balRunDetached(t, via, []string{"--best"}, "sleep", "300")
		p := waitProc(t, n1, "the --best process listed", func(i manager.Info) bool { return i.GID == gid })
		if p.Node != n1.Name {
			t.Errorf("run --best via %s ran on cordoned %s", via.Name, p.Node)
		}
		if !p.Balance {
			t.Errorf("a --best process is not balanced: %+v", p)
		}
	}
	// --node on a cordoned node is refused, saying what to do.
	r = cli(t, nil, "run", "--agent", n1.Agent(), "--node", n2.Name, "--", "true")
	if r.code == 0 || !strings.Contains(r.stderr, "onebox uncordon n2") {
		t.Errorf("run --node n2 (cordoned): exit %d, stderr %q; want a refusal naming 'onebox uncordon n2'", r.code, r.stderr)
	}

	// The mark is the node's own: it survives a restart of its agent.
	if err := c.Stop(n2); err != nil {
		t.Fatal(err)
	}
	if err := c.StartNode(ctxT(t, 60*time.Second), n2); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitAlive(ctxT(t, 60*time.Second), n1, 3); err != nil {
		t.Fatal(err)
	}
	balWaitCordon(t, c, n2.Name, true)

	// Uncordon: schedulable again everywhere; run --node works.
	r = cli(t, nil, "uncordon", "--agent", n3.Agent(), n2.Name)
	if r.code != 0 || !strings.Contains(r.stdout, "n2 is schedulable") {
		t.Fatalf("uncordon n2: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	balWaitCordon(t, c, n2.Name, false)
	victim := balRunDetached(t, n1, []string{"--node", n2.Name}, "sleep", "300")

	// The balancer's view lists every node with its mark.
	r = cli(t, nil, "balance", "-o", "json", "--agent", n1.Agent())
	var cr loadbal.ClusterReport
	if err := json.Unmarshal([]byte(r.stdout), &cr); err != nil || r.code != 0 {
		t.Fatalf("balance -o json: exit %d, %v: %s%s", r.code, err, r.stdout, r.stderr)
	}
	marks := map[string]bool{}
	for _, rep := range cr.Nodes {
		marks[rep.Node] = rep.Cordoned
		if rep.CPUs < 1 || !rep.Balancing {
			t.Errorf("report %+v", rep)
		}
	}
	if len(marks) != 3 || marks["n1"] || marks["n2"] || !marks["n3"] {
		t.Errorf("balance view marks %v, want only n3 cordoned", marks)
	}

	// A drain with nowhere to go (n1 cordoned too, n3 still is): exit 1,
	// the process named with the reason, still running on n2, and n2 stays
	// cordoned.
	if r := cli(t, nil, "cordon", "--agent", n1.Agent(), n1.Name); r.code != 0 {
		t.Fatalf("cordon n1: %s", r.stderr)
	}
	balWaitCordon(t, c, n1.Name, true)
	r = cli(t, nil, "drain", "--agent", n1.Agent(), n2.Name)
	if r.code != 1 || !strings.Contains(r.stderr, victim) || !strings.Contains(r.stderr, "no other node is alive, schedulable") {
		t.Errorf("drain with no target: exit %d, stderr %q; want 1 naming %s and why", r.code, r.stderr, victim)
	}
	if !strings.Contains(r.stdout, "remains") {
		t.Errorf("drain table does not list the remaining process:\n%s", r.stdout)
	}
	p := waitProc(t, n3, "the undrained process", func(i manager.Info) bool { return i.GID == victim })
	if p.Node != n2.Name || p.State != manager.StateRunning {
		t.Errorf("after a failed drain the process is %s on %s, want running on n2", p.State, p.Node)
	}
	balWaitCordon(t, c, n2.Name, true)

	// A drain to a schedulable node: with migration the process moves
	// (same id, another node); without it (no CRIU, not root), the drain
	// refuses clearly and the process stays.
	_, cerr := criu.Find()
	canMigrate := cerr == nil && os.Geteuid() == 0
	if r := cli(t, nil, "uncordon", "--agent", n2.Agent(), n1.Name); r.code != 0 {
		t.Fatalf("uncordon n1: %s", r.stderr)
	}
	balWaitCordon(t, c, n1.Name, false)
	r = cli(t, nil, "drain", "-o", "json", "--agent", n3.Agent(), n2.Name)
	var dr agent.DrainResult
	if err := json.Unmarshal([]byte(r.stdout), &dr); err != nil {
		t.Fatalf("drain -o json: exit %d, %v: %s%s", r.code, err, r.stdout, r.stderr)
	}
	switch {
	case r.code == 0:
		if len(dr.Moved) != 1 || dr.Moved[0].GID != victim || dr.Moved[0].To != n1.Name || len(dr.Remaining) != 0 {
			t.Errorf("drain succeeded with %+v, want %s moved to n1", dr, victim)
		}
		p := waitProc(t, n2, "the drained process on n1", func(i manager.Info) bool { return i.GID == victim && i.Node == n1.Name })
		if p.State != manager.StateRunning || !strings.Contains(p.Note, "drain") {
			t.Errorf("drained process %+v: want running on n1 with a note saying drain", p)
		}
		t.Logf("drain moved %s to n1: %q", victim, p.Note)
	case r.code == 1 && canMigrate:
		t.Errorf("drain failed where processes can migrate: %+v: %s", dr, r.stderr)
	case r.code == 1:
		if len(dr.Remaining) != 1 || dr.Remaining[0].GID != victim || dr.Remaining[0].Error == "" || !strings.Contains(r.stderr, victim) {
			t.Errorf("failed drain: %+v, stderr %q; want %s remaining with the reason", dr, r.stderr, victim)
		}
		p := waitProc(t, n1, "the undrained process", func(i manager.Info) bool { return i.GID == victim })
		if p.Node != n2.Name || p.State != manager.StateRunning {
			t.Errorf("after a failed migration the process is %s on %s, want running on n2", p.State, p.Node)
		}
		t.Logf("drain refused: %s", strings.TrimSpace(r.stderr))
	default:
		t.Errorf("drain: exit %d: %s", r.code, r.stderr)
	}

	// Bad input: unknown node (1), bad name and missing argument (2).
	if r := cli(t, nil, "drain", "--agent", n1.Agent(), "nosuchnode"); r.code != 1 || !strings.Contains(r.stderr, "no node") {
		t.Errorf("drain of an unknown node: exit %d, %q", r.code, r.stderr)
	}
	if r := cli(t, nil, "uncordon", "--agent", n1.Agent(), "bad/name"); r.code != 2 {
		t.Errorf("uncordon bad/name: exit %d, %q", r.code, r.stderr)
	}
	if r := cli(t, nil, "drain", "--agent", n1.Agent()); r.code != 2 {
		t.Errorf("drain without a node: exit %d, %q", r.code, r.stderr)
	}
	if r := cli(t, nil, "drain", "--timeout", "1ms", "--agent", n1.Agent(), n2.Name); r.code != 2 || !strings.Contains(r.stderr, "between 1s and 24h") {
		t.Errorf("drain --timeout 1ms: exit %d, %q", r.code, r.stderr)
	}
}
