package bench

import (
	"context"
	"strings"
	"testing"

	"github.com/onebox-project/onebox/internal/testenv"
	"github.com/onebox-project/onebox/memory/pool"
	"github.com/onebox-project/onebox/memory/shim"
)

// TestRun runs the benchmark small, without the swap baseline: every
// workload under the pager must compute what it computes plainly (Run
// checks the sums). No timing is asserted.
func TestRun(t *testing.T) {
	testenv.NeedUserfaultfd(t)
	testenv.NeedCC(t)
	if testing.Short() {
		t.Skip("runs real workloads")
	}
	var log strings.Builder
	r, err := Run(context.Background(), Options{SizeMiB: 24, NoSwap: true, Log: &log})
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	if len(r.Rows) != 9 || r.FaultP50us <= 0 || r.RTTP50us <= 0 {
		t.Fatalf("result %+v", r)
	}
	for _, row := range r.Rows {
		if row.LocalPct < 100 && row.Evicted == 0 {
			t.Errorf("%s at %d%%: nothing evicted", row.Workload, row.LocalPct)
		}
	}
	var b strings.Builder
	PrintTable(&b, r)
	t.Log("\n" + b.String())
}

func TestParse(t *testing.T) {
	for _, c := range []struct {
		out                 string
		rate, p50, p99, avg float64
		sum                 string
	}{
		{out: "rate 12.5 unit MB/s sum 00ff\n", rate: 12.5, sum: "00ff"},
		{out: "timed\nrate 12.5 unit MB/s sum 00ff\n", rate: 12.5, sum: "00ff"},
		{out: "p50_ns 100 p99_ns 900 n 5 sum ab\n", p50: 100, p99: 900, sum: "ab"},
		{out: "timed\np50_ns 100 p99_ns 900 n 5 sum ab mean_ns 300\n", p50: 100, p99: 900, avg: 300, sum: "ab"},
	} {
		m, err := parse(c.out)
		if err != nil || m.rate != c.rate || m.p50 != c.p50 || m.p99 != c.p99 || m.mean != c.avg || m.sum != c.sum {
			t.Errorf("parse(%q) = %+v, %v", c.out, m, err)
		}
	}
	for _, bad := range []string{"", "timed\n", "rate x unit MB/s sum 1", "hello", "p50_ns 1 p99_ns 2 n 3 sum 4 mean_ns x"} {
		if _, err := parse(bad); err == nil {
			t.Errorf("parse(%q) accepted", bad)
		}
	}
}

// TestScanKeepsLocalPart: a program scanning a block twice its local limit
// pass after pass gets back from the pool about the half that does not
// fit, not the whole block each pass (eviction in fill order would evict
// every page just before the next pass needs it). Counters only.
func TestScanKeepsLocalPart(t *testing.T) {
	testenv.NeedUserfaultfd(t)
	testenv.NeedCC(t)
	dir := t.TempDir()
	e := &env{dir: dir, pool: pool.NewLocal(0)}
	var err error
	if e.shim, err = shim.Build(dir); err != nil {
		t.Fatal(err)
	}
	if e.memwork, err = BuildMemwork(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	const mib, passes = 32, 3
	plain, err := e.run(context.Background(), "scan", mib, passes, 0, "plain")
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"scan", "seq"} {
		m, err := e.run(context.Background(), mode, mib, passes, mib<<20/2, "")
		if err != nil {
			t.Fatal(err)
		}
		if mode == "scan" && m.sum != plain.sum {
			t.Fatalf("scan computed %s, plainly %s", m.sum, plain.sum)
		}
		pages := uint64(mib << 20 / pool.PageSize)
		t.Logf("%s: timed part %+v", mode, m.timed)
		// Half must come back each pass; allow a quarter more.
		if m.timed.Loaded > passes*pages*3/4 || m.timed.Loaded < passes*pages/4 {
			t.Errorf("%s: %d pages loaded from the pool in %d passes over %d pages with half local: want about %d",
				mode, m.timed.Loaded, passes, pages, passes*pages/2)
		}
	}
}
