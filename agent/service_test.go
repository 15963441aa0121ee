package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/service"
)

// newTestSvcState is the services of an agent named n1 that is not
// started: enough for changes whose targets are on n1 itself.
func newTestSvcState(t *testing.T) *svcState {
	a := &Agent{id: &identity.Identity{Node: "n1"}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	a.cfg.AdvertiseAddr = "127.0.0.1"
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return &svcState{a: a, path: filepath.Join(t.TempDir(), servicesFile), bind: "127.0.0.1", ctx: ctx, cancel: cancel,
		svcs: map[string]*exposed{}, gids: map[string]gidLoc{}, gidLookup: map[string]*gidLookup{},
		runsHere:  func(string) bool { return false },
		listProcs: func(context.Context) manager.ClusterList { return manager.ClusterList{} },
		conns:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "c"}, []string{"service", "target", "result"}),
		bytes:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "b"}, []string{"service", "direction"}),
	}
}

// Adding targets to a service while its status is read (onebox services,
// a metrics scrape) is safe: run with -race.
func TestServiceStatusWhileTargetsChange(t *testing.T) {
	s := newTestSvcState(t)
	e := s.newExposed(service.Spec{Name: "web", Node: "n1", Port: 1, Policy: "round-robin", Targets: []service.Target{{Node: "n1", Port: 1000}}})
	s.svcs["web"] = e
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 50 {
			if _, err := s.expose(context.Background(), service.ExposeRequest{Name: "web", Targets: []string{fmt.Sprintf("n1:%d", 2000+i)}}); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for range 50 {
		l := s.localList()
		if len(l.Services) != 1 {
			t.Fatalf("services = %+v", l.Services)
		}
		st := l.Services[0]
		if len(st.State) != len(st.Targets) {
			t.Fatalf("%d target states for %d targets", len(st.State), len(st.Targets))
		}
		for i, ts := range st.State {
			if ts.Key != st.Targets[i].String() || ts.Node != "n1" {
				t.Fatalf("state %d: %+v for target %v", i, ts, st.Targets[i])
			}
		}
	}
	wg.Wait()
	if got := len(s.localList().Services[0].Targets); got != 51 {
		t.Errorf("%d targets, want 51", got)
	}
}

// A burst of connections to a GID target whose node is not known asks
// the members once, not once per connection; a fresh lookup (after the
// node said the process is not there) asks again.
func TestServiceResolveSharesLookups(t *testing.T) {
	s := newTestSvcState(t)
	const gid = "g0123456789ab"
	var calls atomic.Int32
	release := make(chan struct{})
	s.listProcs = func(context.Context) manager.ClusterList {
		calls.Add(1)
		<-release
		return manager.ClusterList{Procs: []manager.Info{{GID: gid, Node: "n2", State: "running"}}}
	}
	const n = 50
	errs := make(chan error, n)
	var started sync.WaitGroup
	started.Add(n)
	for range n {
		go func() {
			started.Done()
			node, err := s.resolve(context.Background(), gid, false)
			if err == nil && node != "n2" {
				err = fmt.Errorf("resolved to %q, want n2", node)
			}
			errs <- err
		}()
	}
	// Let the callers queue behind the first lookup. One that reaches
	// resolve only after the answer is more than a second old (a very
	// loaded machine) asks again, hence the margin below; without
	// sharing, every caller that came before the release asks.
	started.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for calls.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	close(release)
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	got := calls.Load()
	if got > 5 {
		t.Errorf("%d callers made %d cluster lookups, want 1", n, got)
	}
	if _, err := s.resolve(context.Background(), gid, true); err != nil {
		t.Fatal(err)
	}
	if calls.Load() != got+1 {
		t.Errorf("a fresh lookup was not made (%d lookups)", got)
	}
}
