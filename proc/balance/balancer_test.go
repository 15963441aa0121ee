package balance

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// world is a fake cluster for the balancer loop: which node runs which
// CPU-bound process, and every migration made.
type world struct {
	mu       sync.Mutex
	cpus     map[string]int
	on       map[string]string // GID → node
	started  map[string]time.Time
	arrived  map[string]bool
	fail     bool          // every migration fails
	duration time.Duration // of a migration
	moves    []worldMove
	inflight map[string]int // node → migrations in progress
	overlap  bool           // a node ran two at once
	bal      map[string]*Balancer
	wg       sync.WaitGroup // Run goroutines
}

type worldMove struct {
	at            time.Duration
	gid, from, to string
	reason        string
	err           bool
}

func newWorld(cpus map[string]int) *world {
	return &world{cpus: cpus, on: map[string]string{}, started: map[string]time.Time{}, arrived: map[string]bool{},
		duration: time.Second, inflight: map[string]int{}, bal: map[string]*Balancer{}}
}

func (w *world) start(node string, n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for range n {
		g := fmt.Sprintf("g%012x", len(w.on))
		w.on[g], w.started[g] = node, time.Now()
	}
}

func (w *world) count() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := map[string]int{}
	for _, n := range w.on {
		c[n]++
	}
	return c
}

func (w *world) balancer(node string, cfg Config, t0 time.Time) *Balancer {
	b := New(cfg, Env{
		Node: node,
		Sample: func() (int, []Sample, error) {
			w.mu.Lock()
			defer w.mu.Unlock()
			var out []Sample
			for g, n := range w.on {
				if n == node {
					out = append(out, Sample{GID: g, Runnable: 1, RSS: 8 << 20, Started: w.started[g], Balance: true, Arrived: w.arrived[g]})
				}
			}
			return w.cpus[node], out, nil
		},
		Peers: func(context.Context) []PeerLoad {
			w.mu.Lock()
			var others []*Balancer
			for n, b := range w.bal {
				if n != node {
					others = append(others, b)
				}
			}
			w.mu.Unlock()
			var out []PeerLoad
			for _, o := range others {
				r := o.Report()
				pl := PeerLoad{NodeLoad: NodeLoad{Name: r.Node, CPUs: r.CPUs, Load: r.Load}}
				for _, p := range r.Procs {
					pl.GIDs = append(pl.GIDs, p.GID)
				}
				out = append(out, pl)
			}
			return out
		},
		Migrate: func(ctx context.Context, gid, to, reason string) error {
			w.mu.Lock()
			w.inflight[node]++
			if w.inflight[node] > 1 {
				w.overlap = true
			}
			w.mu.Unlock()
			select {
			case <-time.After(w.duration):
			case <-ctx.Done():
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			w.inflight[node]--
			mv := worldMove{at: time.Since(t0), gid: gid, from: node, to: to, reason: reason}
			if w.on[gid] != node {
				panic("migrating a process that is not here")
			}
			if w.fail {
				mv.err = true
				w.moves = append(w.moves, mv)
				return errors.New("criu says no")
			}
			w.on[gid], w.arrived[gid] = to, true
			w.moves = append(w.moves, mv)
			return nil
		},
	})
	w.mu.Lock()
	w.bal[node] = b
	w.mu.Unlock()
	return b
}

func (w *world) run(ctx context.Context, cfg Config, t0 time.Time, nodes ...string) {
	for _, n := range nodes {
		w.spawn(ctx, w.balancer(n, cfg, t0))
	}
}

func (w *world) spawn(ctx context.Context, b *Balancer) {
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		b.Run(ctx)
	}()
}

// stop ends the balancers and waits for them (a synctest bubble must not
// end with goroutines left).
func (w *world) stop(cancel context.CancelFunc) {
	cancel()
	w.wg.Wait()
}

// The scenario in fake time: 4 CPU-bound processes on one node of
// a 2-node cluster (2 CPUs each) end up 2 and 2, with the timing the
// rules give (settle, hold, one migration at a time), and stay.
func TestLoopFourProcessesSpread(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		t0 := time.Now()
		w := newWorld(map[string]int{"n1": 2, "n2": 2})
		defer w.stop(cancel)
		w.start("n1", 4)
		w.run(ctx, Config{}, t0, "n1", "n2")

		time.Sleep(20 * time.Second)
		if c := w.count(); c["n1"] != 2 || c["n2"] != 2 {
			t.Fatalf("after 20 s: %v, want 2 and 2; moves %+v", c, w.moves)
		}
		w.mu.Lock()
		first := w.moves[0]
		w.mu.Unlock()
		// Not before the processes settled (3 s) and the imbalance held
		// two rounds; the migration itself takes 1 s.
		if first.at < DefaultSettle+DefaultInterval {
			t.Errorf("first move done at %v: before settle + hold", first.at)
		}
		if first.reason != "balance: n1 load 2.0/cpu > n2 0.0/cpu" {
			t.Errorf("reason %q", first.reason)
		}
		time.Sleep(5 * time.Minute)
		w.mu.Lock()
		defer w.mu.Unlock()
		if len(w.moves) != 2 {
			t.Errorf("%d moves, want exactly 2: %+v", len(w.moves), w.moves)
		}
		if w.overlap {
			t.Error("a node ran two migrations at once")
		}
	})
}

// Balanced nodes stay balanced; a node with --no-balance never moves
// anything.
func TestLoopQuiet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		t0 := time.Now()
		w := newWorld(map[string]int{"n1": 2, "n2": 2, "n3": 1})
		defer w.stop(cancel)
		w.start("n1", 3)
		w.start("n2", 3)
		w.start("n3", 1)
		w.run(ctx, Config{}, t0, "n1", "n2", "n3")
		time.Sleep(10 * time.Minute)
		w.mu.Lock()
		if len(w.moves) != 0 {
			t.Errorf("balanced cluster: moves %+v", w.moves)
		}
		w.mu.Unlock()

		w2 := newWorld(map[string]int{"a": 1, "b": 1})
		defer w2.stop(cancel)
		w2.start("a", 3)
		off := w2.balancer("a", Config{}, t0)
		off.env.Enabled = func() bool { return false }
		w2.spawn(ctx, off)
		w2.spawn(ctx, w2.balancer("b", Config{}, t0))
		time.Sleep(5 * time.Minute)
		w2.mu.Lock()
		if len(w2.moves) != 0 {
			t.Errorf("disabled balancer moved: %+v", w2.moves)
		}
		w2.mu.Unlock()
	})
}

// A move that fails leaves the process where it is for Cooldown: it is not
// retried every round.
func TestLoopFailedMoveCoolsDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		t0 := time.Now()
		w := newWorld(map[string]int{"n1": 1, "n2": 1})
		defer w.stop(cancel)
		w.fail = true
		w.start("n1", 2)
		w.run(ctx, Config{}, t0, "n1", "n2")
		time.Sleep(3 * time.Minute)
		w.mu.Lock()
		defer w.mu.Unlock()
		last := map[string]time.Duration{}
		if len(w.moves) < 2 {
			t.Fatalf("only %d attempts in 3 minutes", len(w.moves))
		}
		for _, m := range w.moves {
			if !m.err {
				t.Fatalf("move %+v succeeded", m)
			}
			if at, ok := last[m.gid]; ok && m.at-at < DefaultCooldown {
				t.Errorf("%s retried after %v, want at least %v", m.gid, m.at-at, DefaultCooldown)
			}
			last[m.gid] = m.at
		}
		// 2 processes, each tried at most once per cooldown (+ a migration
		// second and a hold of rounds): a bound, not a busy loop.
		if max := 2 * (3*time.Minute/DefaultCooldown + 1); len(w.moves) > int(max) {
			t.Errorf("%d attempts in 3 minutes, want at most %d", len(w.moves), max)
		}
	})
}

// Three busy nodes and an idle one: the idle one is filled without the
// busy ones flooding it (each counts what it sent until the target
// reports it), and the cluster ends balanced.
func TestLoopThreeSendersOneTarget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		t0 := time.Now()
		w := newWorld(map[string]int{"n1": 1, "n2": 1, "n3": 1, "n4": 4})
		defer w.stop(cancel)
		w.start("n1", 2)
		w.start("n2", 2)
		w.start("n3", 2)
		w.run(ctx, Config{}, t0, "n1", "n2", "n3", "n4")
		time.Sleep(10 * time.Minute)
		c := w.count()
		w.mu.Lock()
		defer w.mu.Unlock()
		if c["n1"] != 1 || c["n2"] != 1 || c["n3"] != 1 || c["n4"] != 3 {
			t.Errorf("ends %v, want 1 1 1 3; moves %+v", c, w.moves)
		}
		if len(w.moves) != 3 {
			t.Errorf("%d moves, want 3: %+v", len(w.moves), w.moves)
		}
	})
}

func TestTrackerObserve(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tr := NewTracker(Config{})
	s := func(gid string, r int, started time.Time, arrived bool) Sample {
		return Sample{GID: gid, Runnable: r, Started: started, Balance: true, Arrived: arrived}
	}
	tr.Observe(t0, []Sample{s("g000000000001", 1, t0, false)})
	if d := tr.Demand("g000000000001"); d != 1 {
		t.Fatalf("first sample: demand %v, want 1 at once", d)
	}
	// A process that is runnable half the time converges to about 0.5.
	now := t0
	for i := range 60 {
		now = now.Add(time.Second)
		tr.Observe(now, []Sample{s("g000000000001", i%2, t0, false)})
	}
	if d := tr.Demand("g000000000001"); math.Abs(d-0.5) > 0.15 {
		t.Errorf("half-busy process: demand %v, want about 0.5", d)
	}
	// Settle for a new process, Cooldown for one that arrived (said so,
	// or first seen long after it started).
	now = now.Add(time.Second)
	tr.Observe(now, []Sample{
		s("g000000000001", 1, t0, false),
		s("g000000000002", 1, now, false),
		s("g000000000003", 1, now, true),
		s("g000000000004", 1, now.Add(-time.Minute), false),
	})
	stays := map[string]bool{}
	for _, p := range tr.Procs(now.Add(DefaultSettle)) {
		stays[p.GID] = !p.Movable
	}
	want := map[string]bool{"g000000000001": false, "g000000000002": false, "g000000000003": true, "g000000000004": true}
	for g, w := range want {
		if stays[g] != w {
			t.Errorf("%s held at settle time: %v, want %v", g, stays[g], w)
		}
	}
	for _, p := range tr.Procs(now.Add(DefaultCooldown)) {
		if !p.Movable {
			t.Errorf("%s still held after the cooldown", p.GID)
		}
	}
	// Gone processes are forgotten.
	tr.Observe(now.Add(time.Second), nil)
	if l := tr.Load(); l != 0 {
		t.Errorf("load %v with no processes", l)
	}
}

func TestTrackerAdjust(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tr := NewTracker(Config{})
	tr.Observe(t0, []Sample{{GID: "g000000000001", Runnable: 1, Started: t0}, {GID: "g000000000002", Runnable: 1, Started: t0}})
	tr.Moved("g000000000001", "n2", t0)
	if l := tr.Load(); l != 1 {
		t.Errorf("load after a move %v, want 1", l)
	}
	peers := []PeerLoad{{NodeLoad: NodeLoad{"n2", 2, 0}}, {NodeLoad: NodeLoad{"n3", 2, 0}}}
	got := tr.Adjust(peers, t0.Add(time.Second))
	sort.Slice(got, func(i, j int) bool { return got[i].Name < got[j].Name })
	if got[0].Load != 1 || got[1].Load != 0 {
		t.Errorf("pending move not counted in its target: %+v", got)
	}
	// Once the target reports it, it is not counted twice.
	peers[0].Load, peers[0].GIDs = 1, []string{"g000000000001"}
	if got := tr.Adjust(peers, t0.Add(2*time.Second)); got[0].Load != 1 {
		t.Errorf("reported move counted twice: %+v", got)
	}
	// A move the target never reports stops counting.
	tr.Moved("g000000000002", "n3", t0)
	if got := tr.Adjust(peers[1:], t0.Add(time.Hour)); got[0].Load != 0 {
		t.Errorf("stale pending move still counted: %+v", got)
	}
}
