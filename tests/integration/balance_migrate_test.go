package integration

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/proc/criu"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/testbed"
)

// The balancer test: 4 CPU-bound processes started on one node of
// a 2-node cluster end up 2 and 2 within a bounded time, and stay. The
// processes start while n2 is cordoned (so --best, which picks by load
// average and cannot tell two nodes of one machine apart, puts them all
// on n1), then n2 is uncordoned and the balancers take over.
func TestBalanceFourProcesses(t *testing.T) {
	testenv.Need(t, os.Geteuid() == 0, "the balancer moves processes by migration, which needs root (CRIU)")
	_, cerr := criu.Find()
	testenv.NeedNoError(t, cerr, "no usable CRIU (run scripts/install-criu.sh)")
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]

	if r := cli(t, nil, "cordon", "--agent", n1.Agent(), n2.Name); r.code != 0 {
		t.Fatalf("cordon n2: %s", r.stderr)
	}
	balWaitCordon(t, c, n2.Name, true)
	var gids []string
	for range 4 {
		// nice: the machine is shared; the balancer counts runnable
		// threads, which niceness does not change.
		gids = append(gids, balRunDetached(t, n1, []string{"--best"}, "nice", "-n", "19", "sh", "-c", "while :; do :; done"))
	}
	placement := func(node *testbed.Node) (map[string]string, map[string]manager.Info, error) {
		l, r := psJSON(t, node)
		if r.code != 0 {
			return nil, nil, fmt.Errorf("ps: exit %d: %s", r.code, r.stderr)
		}
		where, infos := map[string]string{}, map[string]manager.Info{}
		for _, g := range gids {
			// While it moves a process may be listed by both nodes:
			// the running entry is where it is.
			p, ok := findProc(l, func(i manager.Info) bool { return i.GID == g && i.State == manager.StateRunning })
			if !ok {
				return nil, nil, fmt.Errorf("process %s is not running anywhere (%+v)", g, l.Procs)
			}
			where[g], infos[g] = p.Node, p
		}
		return where, infos, nil
	}
	where, _, err := placement(n1)
	if err != nil {
		t.Fatal(err)
	}
	for g, n := range where {
		if n != n1.Name {
			t.Fatalf("%s started on %s, want n1 (n2 was cordoned)", g, n)
		}
	}

	start := time.Now()
	if r := cli(t, nil, "uncordon", "--agent", n1.Agent(), n2.Name); r.code != 0 {
		t.Fatalf("uncordon n2: %s", r.stderr)
	}
	const bound = 90 * time.Second
	var final map[string]string
	var infos map[string]manager.Info
	err = testbed.WaitFor(ctxT(t, bound+10*time.Second), bound, "2 and 2", func(context.Context) (bool, error) {
		w, in, err := placement(n2)
		if err != nil {
			return false, err
		}
		count := map[string]int{}
		for _, n := range w {
			count[n]++
		}
		final, infos = w, in
		return count[n1.Name] == 2 && count[n2.Name] == 2, nil
	})
	if err != nil {
		r := cli(t, nil, "balance", "--agent", n1.Agent())
		t.Fatalf("%v\n%s%s", err, r.stdout, r.stderr)
	}
	t.Logf("4 processes on n1 became 2 and 2 in %.1f s after n2 was uncordoned", time.Since(start).Seconds())
	// ps says where they went and why.
	for g, n := range final {
		if n == n2.Name && !strings.Contains(infos[g].Note, "balance") {
			t.Errorf("moved process %s: note %q, want the balancer's reason", g, infos[g].Note)
		}
	}

	// And they stay: no move for 20 s (several decision rounds, past the
	// hold, while the loads settle).
	// A ps that fails (a node slow to answer on the loaded machine) is
	// not a move: it is skipped, as long as most looks succeed.
	stable := time.Now()
	looks, failed := 0, 0
	for time.Since(stable) < 20*time.Second {
		time.Sleep(2 * time.Second)
		w, _, err := placement(n1)
		if err != nil {
			failed++
			t.Logf("look %d: %v", looks+failed, err)
			continue
		}
		looks++
		for g, n := range w {
			if final[g] != n {
				t.Fatalf("%s moved again (%s -> %s) %.1f s after the cluster was balanced: ping-pong", g, final[g], n, time.Since(stable).Seconds())
			}
		}
	}
	if looks < 5 {
		t.Errorf("only %d of %d looks at the placement succeeded", looks, looks+failed)
	}
	r := cli(t, nil, "balance", "--agent", n2.Agent())
	t.Logf("onebox balance:\n%s", r.stdout)
}
