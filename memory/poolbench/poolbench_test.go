package poolbench

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// A short run measures every figure and prints the tables (no timing is
// checked: figures depend on the machine).
func TestRunShort(t *testing.T) {
	if testing.Short() {
		t.Skip("starts page servers and measures for several seconds")
	}
	r, err := Run(context.Background(), Options{Rounds: 200, RepairBytes: 4 << 20, TPRounds: 1, TPTime: 50 * time.Millisecond, Conns: 1, CutEpisodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Latencies) != 6 || r.CutLoads != 64 || r.TPLoadPieces == 0 || len(r.Throughputs) != 2*(2+4) || r.RepairBytes == 0 {
		t.Fatalf("result %+v", r)
	}
	for _, l := range r.Latencies {
		if l.P50us <= 0 || l.VsTLS <= 0 {
			t.Fatalf("latency %+v", l)
		}
	}
	var b bytes.Buffer
	r.Print(&b)
	if !strings.Contains(b.String(), "pool load 4KiB (tls)") || !strings.Contains(b.String(), "REPAIR") {
		t.Fatalf("table:\n%s", b.String())
	}
}
