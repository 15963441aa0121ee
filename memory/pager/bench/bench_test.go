package bench

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/onebox-project/onebox/internal/testenv"
)

// TestRun runs the benchmark small, without the swap baseline: every
// workload under the pager must compute what it computes plainly (Run
// checks the sums). No timing is asserted.
func TestRun(t *testing.T) {
	testenv.Need(t, os.Geteuid() == 0, "userfaultfd needs root here")
	_, err := exec.LookPath("cc")
	testenv.NeedNoError(t, err, "no C compiler (cc)")
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
	m, err := parse("rate 12.5 unit MB/s sum 00ff\n")
	if err != nil || m.rate != 12.5 || m.unit != "MB/s" || m.sum != "00ff" {
		t.Fatalf("parse = %+v, %v", m, err)
	}
	m, err = parse("p50_ns 100 p99_ns 900 n 5 sum ab\n")
	if err != nil || m.p50 != 100 || m.p99 != 900 || m.sum != "ab" {
		t.Fatalf("parse = %+v, %v", m, err)
	}
	for _, bad := range []string{"", "rate x unit MB/s sum 1", "hello"} {
		if _, err := parse(bad); err == nil {
			t.Errorf("parse(%q) accepted", bad)
		}
	}
}
