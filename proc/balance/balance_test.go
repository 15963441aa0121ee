package balance

import (
	"fmt"
	"math"
	"testing"
	"time"
)

func procs(n int, demand float64, rss uint64, age time.Duration) []Proc {
	out := make([]Proc, n)
	for i := range out {
		out[i] = Proc{GID: gid(i), Demand: demand, RSS: rss, Age: age, Movable: true}
	}
	return out
}

func gid(i int) string { return fmt.Sprintf("g%012x", i) }

func sum(ps []Proc) float64 {
	var s float64
	for _, p := range ps {
		s += p.Demand
	}
	return s
}

func TestDecide(t *testing.T) {
	const MiB = 1 << 20
	cfg := Config{}
	four := procs(4, 1, 10*MiB, 10*time.Second)
	three := procs(3, 1, 10*MiB, 10*time.Second)
	two := procs(2, 1, 10*MiB, 10*time.Second)
	big := []Proc{{GID: "gbig00000000a", Demand: 1, RSS: 4 << 30, Age: 10 * time.Second, Movable: true}}
	tests := []struct {
		name   string
		self   NodeLoad
		peers  []NodeLoad
		procs  []Proc
		wantTo string // "" = no move
		reason string
	}{
		{"4 on 2 CPUs, idle peer: move", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 2, 0}}, four, "n2", "balance: n1 load 2.0/cpu > n2 0.0/cpu"},
		{"3 vs 1: move (1.5/cpu vs 0.5)", NodeLoad{"n1", 2, 3}, []NodeLoad{{"n2", 2, 1}}, three, "n2", "balance: n1 load 1.5/cpu > n2 0.5/cpu"},
		{"2 vs 2: balanced, stay", NodeLoad{"n1", 2, 2}, []NodeLoad{{"n2", 2, 2}}, two, "", ""},
		{"3 vs 2 on 2 CPUs: no faster there", NodeLoad{"n1", 2, 3}, []NodeLoad{{"n2", 2, 2}}, three, "", ""},
		{"2 on 2 CPUs, idle peer: not overloaded, stay", NodeLoad{"n1", 2, 2}, []NodeLoad{{"n2", 2, 0}}, two, "", ""},
		{"2 vs 1 on 1 CPU each: moving only swaps, stay", NodeLoad{"n1", 1, 2}, []NodeLoad{{"n2", 1, 1}}, two, "", ""},
		{"2 vs 0 on 1 CPU each: move", NodeLoad{"n1", 1, 2}, []NodeLoad{{"n2", 1, 0}}, two, "n2", "balance: n1 load 2.0/cpu > n2 0.0/cpu"},
		{"below threshold", NodeLoad{"n1", 4, 5}, []NodeLoad{{"n2", 4, 3.5}}, procs(5, 1, MiB, time.Minute), "", ""},
		{"least loaded peer wins", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 2, 1}, {"n3", 2, 0}, {"n4", 2, 0.5}}, four, "n3", "balance: n1 load 2.0/cpu > n3 0.0/cpu"},
		{"bigger peer by CPUs", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 1, 0.9}, {"n3", 8, 4}}, four, "n3", "balance: n1 load 2.0/cpu > n3 0.5/cpu"},
		{"self not in peers", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n1", 2, 0}}, four, "", ""},
		{"no peers", NodeLoad{"n1", 2, 4}, nil, four, "", ""},
		{"peer without CPUs ignored", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 0, 0}}, four, "", ""},
		{"peer with NaN load ignored", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 2, math.NaN()}}, four, "", ""},
		{"nothing movable", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 2, 0}}, func() []Proc {
			p := procs(4, 1, MiB, time.Minute)
			for i := range p {
				p[i].Movable = false
			}
			return p
		}(), "", ""},
		{"young process: cost above gain, stay", NodeLoad{"n1", 2, 4}, []NodeLoad{{"n2", 2, 0}}, procs(4, 1, 10*MiB, 500*time.Millisecond), "", ""},
		{"4 GiB process, 10 s old: cost (16.5 s) above gain (5 s), stay", NodeLoad{"n1", 1, 2}, []NodeLoad{{"n2", 1, 0}}, append(big, Proc{GID: "gother0000000", Demand: 1, Movable: false}), "", ""},
		{"4 GiB process, 1 min old: moves", NodeLoad{"n1", 1, 2}, []NodeLoad{{"n2", 1, 0}}, []Proc{{GID: "gbig00000000a", Demand: 1, RSS: 4 << 30, Age: time.Minute, Movable: true}, {GID: "gother0000000", Demand: 1}}, "n2", "balance: n1 load 2.0/cpu > n2 0.0/cpu"},
		{"self without CPUs", NodeLoad{"n1", 0, 4}, []NodeLoad{{"n2", 2, 0}}, four, "", ""},
		{"mostly idle processes, not overloaded: stay", NodeLoad{"n1", 1, 0.9}, []NodeLoad{{"n2", 1, 0}}, procs(9, 0.1, MiB, time.Minute), "", ""},
		{"a mostly idle process gains too little for its cost", NodeLoad{"n1", 1, 1.2}, []NodeLoad{{"n2", 1, 0}}, procs(12, 0.1, MiB, 10*time.Second), "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, ok := Decide(cfg, tt.self, tt.peers, tt.procs)
			if tt.wantTo == "" {
				if ok {
					t.Fatalf("moved %s to %s (%s; gain %.3f, benefit %.2f s, cost %.2f s), want no move", m.GID, m.To, m.Reason, m.Gain, m.Benefit, m.Cost)
				}
				return
			}
			if !ok {
				t.Fatalf("no move, want one to %s", tt.wantTo)
			}
			if m.To != tt.wantTo || m.From != tt.self.Name || m.Reason != tt.reason {
				t.Fatalf("move %+v, want to %s with reason %q", m, tt.wantTo, tt.reason)
			}
			if m.Benefit < m.Cost || m.Gain <= 0 {
				t.Fatalf("move %+v has benefit below cost or no gain", m)
			}
		})
	}
}

// The cost of a move grows with the process's memory: of two processes
// alike but for their size, the smaller moves.
func TestDecidePrefersSmallerProcess(t *testing.T) {
	ps := []Proc{
		{GID: "g000000000001", Demand: 1, RSS: 1 << 30, Age: time.Minute, Movable: true},
		{GID: "g000000000002", Demand: 1, RSS: 1 << 20, Age: time.Minute, Movable: true},
		{GID: "g000000000003", Demand: 1, RSS: 512 << 20, Age: time.Minute, Movable: true},
	}
	m, ok := Decide(Config{}, NodeLoad{"n1", 1, 3}, []NodeLoad{{"n2", 1, 0}}, ps)
	if !ok || m.GID != "g000000000002" {
		t.Fatalf("moved %+v (ok %v), want the 1 MiB process", m, ok)
	}
	// Order does not matter.
	ps[0], ps[1] = ps[1], ps[0]
	if m2, _ := Decide(Config{}, NodeLoad{"n1", 1, 3}, []NodeLoad{{"n2", 1, 0}}, ps); m2 != m {
		t.Fatalf("different decision after reordering: %+v vs %+v", m2, m)
	}
}

// Moving a process and deciding again on the other side never moves it
// back while the loads stand still (the pair's max must strictly drop).
func TestDecideNoPingPong(t *testing.T) {
	for _, c := range []struct{ cpus1, cpus2, n int }{{1, 1, 2}, {1, 1, 3}, {2, 2, 4}, {2, 2, 5}, {2, 4, 9}, {4, 2, 7}, {8, 8, 20}} {
		nodes := []*NodeLoad{{"n1", c.cpus1, float64(c.n)}, {"n2", c.cpus2, 0}}
		on := map[string]int{"n1": c.n, "n2": 0}
		moves := 0
		for step := 0; step < 100; step++ {
			moved := false
			for i, self := range nodes {
				peer := nodes[1-i]
				m, ok := Decide(Config{}, *self, []NodeLoad{*peer}, procs(on[self.Name], 1, 1<<20, time.Hour))
				if !ok {
					continue
				}
				self.Load--
				peer.Load++
				on[self.Name]--
				on[peer.Name]++
				moves++
				moved = true
				_ = m
			}
			if !moved {
				break
			}
		}
		// The end state: neither node can gain, and the moves were few.
		if moves > c.n {
			t.Errorf("%+v: %d moves for %d processes: ping-pong", c, moves, c.n)
		}
		l1, l2 := nodes[0].PerCPU(), nodes[1].PerCPU()
		if math.Abs(l1-l2) > 1 {
			t.Errorf("%+v: ends at %.2f vs %.2f per CPU", c, l1, l2)
		}
	}
}

func TestDecideThreshold(t *testing.T) {
	ps := procs(5, 1, 1<<20, time.Hour)
	// 5 on 2 CPUs (2.5/cpu) vs 3 on 2 (1.5/cpu): difference 1.0.
	for _, c := range []struct {
		threshold float64
		want      bool
	}{{0.5, true}, {1.0, true}, {1.01, false}, {3, false}} {
		_, ok := Decide(Config{Threshold: c.threshold}, NodeLoad{"n1", 2, 5}, []NodeLoad{{"n2", 2, 3}}, ps)
		if ok != c.want {
			t.Errorf("threshold %v: moved %v, want %v", c.threshold, ok, c.want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	good := Config{}.WithDefaults()
	if err := good.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for name, c := range map[string]Config{
		"negative threshold": {Threshold: -1},
		"NaN threshold":      {Threshold: math.NaN()},
		"huge threshold":     {Threshold: 1000},
		"negative hold":      {Hold: -1},
		"tiny interval":      {Interval: time.Microsecond},
		"negative cooldown":  {Cooldown: -time.Second},
		"negative bandwidth": {Bandwidth: -1},
	} {
		if err := c.WithDefaults().Validate(); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
