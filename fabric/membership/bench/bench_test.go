package bench

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

func TestRunSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("forms and breaks a real gossip cluster; takes ~10 s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var progress bytes.Buffer
	rs, err := Run(ctx, []int{3}, &progress)
	t.Log(progress.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].N != 3 {
		t.Fatalf("results = %+v, want one for N=3", rs)
	}
	r := rs[0]
	if len(r.Timeouts) > 0 {
		t.Fatalf("phases timed out: %v", r.Timeouts)
	}
	for name, d := range map[string]time.Duration{"form": r.Form, "join": r.Join, "fail-first": r.FailFirst, "fail-all": r.FailAll, "leave": r.Leave} {
		if d <= 0 {
			t.Errorf("%s = %v, want > 0", name, d)
		}
	}
	if r.FailAll < r.FailFirst {
		t.Errorf("fail-all %v < fail-first %v", r.FailAll, r.FailFirst)
	}
	if r.ClusterAtFailure != 4 || r.SuspicionMin != 4*time.Second || r.SuspicionMax != 24*time.Second {
		t.Errorf("suspicion bounds for n=%d: %v..%v, want n=4: 4s..24s", r.ClusterAtFailure, r.SuspicionMin, r.SuspicionMax)
	}
	var out bytes.Buffer
	PrintTable(&out, rs)
	t.Log("\n" + out.String())
	if !strings.Contains(out.String(), "\n3 ") {
		t.Errorf("table has no row for N=3:\n%s", out.String())
	}
}

func TestSuspicionTimeout(t *testing.T) {
	for _, c := range []struct {
		n      int
		lo, hi time.Duration
	}{
		{1, 4 * time.Second, 24 * time.Second},
		{10, 4 * time.Second, 24 * time.Second},
		{100, 8 * time.Second, 48 * time.Second},
		{50, 6792 * time.Millisecond, 6 * 6792 * time.Millisecond},
	} {
		lo, hi := SuspicionTimeout(c.n)
		if lo != c.lo || hi != c.hi {
			t.Errorf("SuspicionTimeout(%d) = %v..%v, want %v..%v", c.n, lo, hi, c.lo, c.hi)
		}
	}
}

func TestRunRejectsTinySizes(t *testing.T) {
	if _, err := Run(context.Background(), []int{1}, nil); err == nil {
		t.Fatal("Run with N=1: no error")
	}
}
