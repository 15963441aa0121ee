package balance

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

var errDown = errors.New("connection refused")

// pickN picks n connections, each dialed successfully (and kept open when
// keep), and returns the keys in order.
func pickN(p *Pool, n int, keep bool) []string {
	var out []string
	for range n {
		k, ok := p.Pick(nil)
		if !ok {
			out = append(out, "-")
			continue
		}
		p.Dialed(k, nil)
		if !keep {
			p.Release(k)
		}
		out = append(out, k)
	}
	return out
}

func TestPick(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy Policy
		setup  func(p *Pool)
		n      int
		keep   bool
		want   []string
	}{
		{name: "round robin", policy: RoundRobin, n: 6, want: []string{"a", "b", "c", "a", "b", "c"}},
		{name: "least conn spreads open connections", policy: LeastConn, n: 6, keep: true, want: []string{"a", "b", "c", "a", "b", "c"}},
		{name: "least conn takes turns among idle", policy: LeastConn, n: 4, want: []string{"a", "b", "c", "a"}},
		{name: "least conn prefers the emptiest", policy: LeastConn, n: 3, keep: true,
			setup: func(p *Pool) {
				for range 2 { // two long connections on a, one on b
					p.Pick(func(k string) bool { return k != "a" })
				}
				p.Pick(func(k string) bool { return k != "b" })
			},
			want: []string{"c", "b", "c"}},
		{name: "unhealthy skipped", policy: RoundRobin, n: 4,
			setup: func(p *Pool) { k, _ := p.Pick(func(k string) bool { return k != "b" }); p.Dialed(k, errDown) },
			want:  []string{"c", "a", "c", "a"}},
		{name: "all unhealthy: last resort", policy: RoundRobin, n: 3,
			setup: func(p *Pool) {
				for _, k := range []string{"a", "b", "c"} {
					p.Pick(func(x string) bool { return x != k })
					p.Dialed(k, errDown)
				}
			},
			want: []string{"a", "b", "c"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := NewPool(tc.policy, Thresholds{}, "a", "b", "c")
			if tc.setup != nil {
				tc.setup(p)
			}
			if got := pickN(p, tc.n, tc.keep); !slices.Equal(got, tc.want) {
				t.Errorf("picks %v, want %v", got, tc.want)
			}
		})
	}
}

// A connection retried after a failed dial never gets the same target
// twice, and runs out after every target was tried.
func TestPickTried(t *testing.T) {
	p := NewPool(RoundRobin, Thresholds{}, "a", "b")
	tried := map[string]bool{}
	has := func(k string) bool { return tried[k] }
	for range 2 {
		k, ok := p.Pick(has)
		if !ok || tried[k] {
			t.Fatalf("pick %q %v after %v", k, ok, tried)
		}
		tried[k] = true
		p.Dialed(k, errDown)
	}
	if k, ok := p.Pick(has); ok {
		t.Fatalf("picked %q with every target tried", k)
	}
	for _, s := range p.States() {
		if s.Healthy || s.Active != 0 || s.Failed != 1 || s.LastError != errDown.Error() {
			t.Errorf("state after failed dials: %+v", s)
		}
	}
}

func TestThresholds(t *testing.T) {
	type step struct {
		ok          bool
		wantHealthy bool
		wantChange  bool
	}
	F, T := false, true
	for _, tc := range []struct {
		name  string
		th    Thresholds
		steps []step
	}{
		{"falls after 3", Thresholds{}, []step{{F, T, F}, {F, T, F}, {F, F, T}, {F, F, F}}},
		{"a good check resets the count", Thresholds{}, []step{{F, T, F}, {F, T, F}, {T, T, F}, {F, T, F}, {F, T, F}, {F, F, T}}},
		{"rises after 2", Thresholds{Fall: 1}, []step{{F, F, T}, {T, F, F}, {T, T, T}, {T, T, F}}},
		{"a failure resets the rise", Thresholds{Fall: 1, Rise: 2}, []step{{F, F, T}, {T, F, F}, {F, F, F}, {T, F, F}, {T, T, T}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := NewPool(RoundRobin, tc.th, "a")
			for i, s := range tc.steps {
				var err error
				if !s.ok {
					err = errDown
				}
				changed := p.Checked("a", err)
				st := p.States()[0]
				if st.Healthy != s.wantHealthy || changed != s.wantChange {
					t.Fatalf("step %d (ok=%v): healthy %v changed %v, want %v %v", i, s.ok, st.Healthy, changed, s.wantHealthy, s.wantChange)
				}
			}
		})
	}
}

func TestSetTargetsKeepsState(t *testing.T) {
	p := NewPool(RoundRobin, Thresholds{}, "a", "b")
	k, _ := p.Pick(func(k string) bool { return k != "a" })
	p.Dialed(k, errDown)
	p.SetTargets([]string{"c", "a"})
	st := p.States()
	if len(st) != 2 || st[0].Key != "c" || !st[0].Healthy || st[1].Key != "a" || st[1].Healthy {
		t.Fatalf("states %+v", st)
	}
	p.Checked("gone", errDown) // a removed target's late check is ignored
	p.Release("gone")
}

func TestConcurrentPicks(t *testing.T) {
	p := NewPool(LeastConn, Thresholds{}, "a", "b", "c", "d")
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 500 {
				k, _ := p.Pick(nil)
				var err error
				if (i+j)%7 == 0 {
					err = errDown
				}
				p.Dialed(k, err)
				if err == nil {
					p.Release(k)
				}
				p.Checked(k, nil)
			}
		}()
	}
	wg.Wait()
	for _, s := range p.States() {
		if s.Active != 0 {
			t.Errorf("%s: %d active after all connections ended", s.Key, s.Active)
		}
	}
}

// RunChecks with fake time: a target that stops answering is out after
// Fall intervals, and back Rise intervals after it answers again; a check
// that hangs is cut at the timeout and counts as a failure.
func TestRunChecks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := NewPool(RoundRobin, Thresholds{Fall: 3, Rise: 2}, "up", "flaky", "hang")
		var mu sync.Mutex
		flakyDown := false
		probe := func(ctx context.Context, key string) error {
			switch key {
			case "hang":
				<-ctx.Done() // never answers
				return ctx.Err()
			case "flaky":
				mu.Lock()
				defer mu.Unlock()
				if flakyDown {
					return errDown
				}
			}
			return nil
		}
		var events []string
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			RunChecks(ctx, p, time.Second, 500*time.Millisecond, probe, func(k string, healthy bool, _ error) {
				mu.Lock()
				events = append(events, fmt.Sprintf("%s=%v", k, healthy))
				mu.Unlock()
			})
			close(done)
		}()
		healthy := func() map[string]bool {
			m := map[string]bool{}
			for _, s := range p.States() {
				m[s.Key] = s.Healthy
			}
			return m
		}
		// 3 rounds (at 1 s, 2 s, 3 s; each hang check cut at +0.5 s).
		time.Sleep(3*time.Second + 600*time.Millisecond)
		synctest.Wait()
		if h := healthy(); !h["up"] || !h["flaky"] || h["hang"] {
			t.Fatalf("after 3 rounds: %v", h)
		}
		mu.Lock()
		flakyDown = true
		mu.Unlock()
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if h := healthy(); h["flaky"] {
			t.Fatalf("flaky still healthy after 3 failed checks: %v", h)
		}
		mu.Lock()
		flakyDown = false
		mu.Unlock()
		time.Sleep(time.Second)
		synctest.Wait()
		if h := healthy(); h["flaky"] {
			t.Fatal("flaky back after 1 good check (rise is 2)")
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if h := healthy(); !h["flaky"] {
			t.Fatal("flaky not back after 2 good checks")
		}
		cancel()
		<-done
		want := []string{"hang=false", "flaky=false", "flaky=true"}
		if !slices.Equal(events, want) {
			t.Errorf("events %v, want %v", events, want)
		}
	})
}
