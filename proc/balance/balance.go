// Package balance is the openMosix-style load balancer's decision logic:
// given this node's load, its processes and the loads of a few other
// nodes, which one process (if any) should move to which node. It is pure:
// no I/O and no clock of its own; the agent measures, asks its peers,
// carries the moves out (by migration) and feeds the results back.
//
// Load is demand, not use: the smoothed number of runnable threads of the
// onebox-managed processes of a node (a CPU-bound program counts 1 whether
// it gets a whole CPU or a third of one), divided by the node's CPUs. A
// node moves a process only when
//
//   - it is busier than the target by at least Threshold (load per CPU),
//     for Hold consecutive rounds (hysteresis against noise);
//   - it is overloaded (more demand than CPUs): otherwise the process would
//     not run faster anywhere else;
//   - the move lowers the higher load per CPU of the pair by at least
//     MinGain: the pair is strictly better balanced afterwards, so moving the
//     process back cannot also be an improvement (no ping-pong while loads
//     stand still);
//   - the process gains more than the move costs: it runs faster by the
//     difference of the CPU share it gets there and here, for about as long
//     again as it has run (process lifetimes are heavy-tailed: a process
//     that has run for T tends to run for about T more; Harchol-Balter and
//     Downey, 1997), while the move costs a fixed part plus its resident
//     memory over the migration bandwidth, so bigger processes must be older
//     (or gain more) to move;
//   - it has been on this node long enough: Settle for a new process (its
//     load is measured first), Cooldown for one that arrived by migration
//     or whose move failed.
//
// Each node decides only for its own processes, one migration at a time;
// there is no leader.
package balance

import (
	"cmp"
	"fmt"
	"math"
	"time"
)

// Config tunes the balancer. Zero fields take the defaults (WithDefaults).
type Config struct {
	// Threshold is the least difference of load per CPU between this node
	// and a target for a move. Default 0.5.
	Threshold float64
	// MinGain is the least drop of the pair's higher load per CPU a move
	// must bring. Default 0.01.
	MinGain float64
	// Hold is how many consecutive decision rounds must find a move before
	// one is made. Default 2.
	Hold int
	// Interval is the time between decision rounds. Default 2 s.
	Interval time.Duration
	// SampleInterval is the time between load samples. Default 1 s.
	SampleInterval time.Duration
	// Tau is the time constant of the load smoothing. Default 5 s.
	Tau time.Duration
	// Settle: a process started here stays at least this long. Default 3 s.
	Settle time.Duration
	// Cooldown: a process that arrived by migration, or whose move failed,
	// stays at least this long. Default 30 s.
	Cooldown time.Duration
	// CostBase is the fixed cost of a migration (freeze, dump, restore).
	// Default 500 ms.
	CostBase time.Duration
	// Bandwidth is the rate, in bytes per second, at which a migration
	// moves resident memory. Default 256 MiB/s.
	Bandwidth float64
	// MaxHorizon caps how long a process is expected to keep running.
	// Default 10 min.
	MaxHorizon time.Duration
}

// Defaults.
const (
	DefaultThreshold      = 0.5
	DefaultMinGain        = 0.01
	DefaultHold           = 2
	DefaultInterval       = 2 * time.Second
	DefaultSampleInterval = time.Second
	DefaultTau            = 5 * time.Second
	DefaultSettle         = 3 * time.Second
	DefaultCooldown       = 30 * time.Second
	DefaultCostBase       = 500 * time.Millisecond
	DefaultBandwidth      = 256 << 20
	DefaultMaxHorizon     = 10 * time.Minute
)

// WithDefaults returns c with zero fields set to the defaults.
func (c Config) WithDefaults() Config {
	set := func(p *time.Duration, d time.Duration) {
		if *p == 0 {
			*p = d
		}
	}
	if c.Threshold == 0 {
		c.Threshold = DefaultThreshold
	}
	if c.MinGain == 0 {
		c.MinGain = DefaultMinGain
	}
	if c.Hold == 0 {
		c.Hold = DefaultHold
	}
	if c.Bandwidth == 0 {
		c.Bandwidth = DefaultBandwidth
	}
	set(&c.Interval, DefaultInterval)
	set(&c.SampleInterval, DefaultSampleInterval)
	set(&c.Tau, DefaultTau)
	set(&c.Settle, DefaultSettle)
	set(&c.Cooldown, DefaultCooldown)
	set(&c.CostBase, DefaultCostBase)
	set(&c.MaxHorizon, DefaultMaxHorizon)
	return c
}

// Validate checks a configuration (after WithDefaults).
func (c Config) Validate() error {
	switch {
	case !finite(c.Threshold) || c.Threshold < 0 || c.Threshold > 100:
		return fmt.Errorf("balance threshold %v: want a load per CPU between 0 and 100, e.g. 0.5", c.Threshold)
	case !finite(c.MinGain) || c.MinGain < 0:
		return fmt.Errorf("balance minimum gain %v: want 0 or more", c.MinGain)
	case c.Hold < 1:
		return fmt.Errorf("balance hold %d: want 1 or more rounds", c.Hold)
	case c.Interval < 10*time.Millisecond || c.SampleInterval < 10*time.Millisecond:
		return fmt.Errorf("balance interval %v / sample interval %v: want at least 10ms", c.Interval, c.SampleInterval)
	case c.Tau <= 0 || c.Settle < 0 || c.Cooldown < 0 || c.CostBase < 0 || c.MaxHorizon <= 0:
		return fmt.Errorf("balance durations must not be negative")
	case !finite(c.Bandwidth) || c.Bandwidth <= 0:
		return fmt.Errorf("balance bandwidth %v: want more than 0 bytes/s", c.Bandwidth)
	}
	return nil
}

func finite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// NodeLoad is a node's demand for CPU.
type NodeLoad struct {
	Name string
	CPUs int
	// Load is the smoothed number of runnable threads of the node's
	// onebox-managed processes.
	Load float64
}

// PerCPU is the load per CPU (+Inf for a node without CPUs).
func (n NodeLoad) PerCPU() float64 {
	if n.CPUs <= 0 {
		return math.Inf(1)
	}
	return n.Load / float64(n.CPUs)
}

func (n NodeLoad) usable() bool {
	return n.Name != "" && n.CPUs > 0 && finite(n.Load) && n.Load >= 0
}

// share is the CPU share each runnable thread gets on a node with load
// runnable threads: 1 while there are CPUs to spare.
func share(load float64, cpus int) float64 {
	if load <= float64(cpus) {
		return 1
	}
	return float64(cpus) / load
}

// Proc is a process of this node, as the balancer sees it.
type Proc struct {
	GID string
	// Demand is its smoothed number of runnable threads.
	Demand float64
	RSS    uint64
	// Age is how long it has run (since it started, on whatever node).
	Age time.Duration
	// Movable: the balancer may move it now (it was started with --best
	// and without --no-balance, and is not settling or cooling down).
	Movable bool
}

// Move is a decision: move GID from this node to To.
type Move struct {
	GID, From, To string
	// Reason is what 'onebox ps' shows, e.g.
	// "balance: n1 load 2.0/cpu > n2 0.0/cpu".
	Reason string
	// Gain is the drop of the pair's higher load per CPU.
	Gain float64
	// Benefit and Cost are in seconds of CPU time gained by the process
	// and of migration spent on it.
	Benefit, Cost float64

	after float64 // the target's load per CPU after the move
}

// Cost is the estimated cost, in seconds, of migrating a process of rss
// resident bytes.
func (c Config) Cost(rss uint64) float64 {
	return c.CostBase.Seconds() + float64(rss)/c.Bandwidth
}

// Decide returns the best move of one of self's processes to one of the
// peers, or false if no move passes every rule of the package doc. procs
// are self's processes (their demands make up self.Load); peers must be
// alive and schedulable. The result does not depend on the order of
// procs or peers.
func Decide(cfg Config, self NodeLoad, peers []NodeLoad, procs []Proc) (Move, bool) {
	cfg = cfg.WithDefaults()
	if !self.usable() {
		return Move{}, false
	}
	here := share(self.Load, self.CPUs)
	if here >= 1 {
		return Move{}, false // not overloaded: nothing runs faster elsewhere
	}
	var best Move
	var bestRSS uint64
	found := false
	for _, peer := range peers {
		if !peer.usable() || peer.Name == self.Name {
			continue
		}
		if self.PerCPU()-peer.PerCPU() < cfg.Threshold {
			continue
		}
		for _, p := range procs {
			if !p.Movable || !finite(p.Demand) || p.Demand <= 0 || p.Demand > self.Load+1e-9 {
				continue
			}
			selfAfter := (self.Load - p.Demand) / float64(self.CPUs)
			peerAfter := (peer.Load + p.Demand) / float64(peer.CPUs)
			gain := self.PerCPU() - max(selfAfter, peerAfter)
			if gain < cfg.MinGain || gain <= 1e-9 {
				continue
			}
			there := share(peer.Load+p.Demand, peer.CPUs)
			horizon := min(max(p.Age, 0), cfg.MaxHorizon).Seconds()
			benefit := p.Demand * (there - here) * horizon
			cost := cfg.Cost(p.RSS)
			if benefit < cost {
				continue
			}
			m := Move{GID: p.GID, From: self.Name, To: peer.Name, Gain: gain, Benefit: benefit, Cost: cost, after: peerAfter,
				Reason: fmt.Sprintf("balance: %s load %.1f/cpu > %s %.1f/cpu", self.Name, self.PerCPU(), peer.Name, peer.PerCPU())}
			if !found || better(m, p.RSS, best, bestRSS) {
				best, bestRSS, found = m, p.RSS, true
			}
		}
	}
	return best, found
}

// better orders candidate moves: the largest net benefit, then the
// largest gain, then the least loaded target afterwards, then the smallest
// process, then by id and target (deterministic).
func better(a Move, aRSS uint64, b Move, bRSS uint64) bool {
	an, bn := a.Benefit-a.Cost, b.Benefit-b.Cost
	if math.Abs(an-bn) > 1e-9 {
		return an > bn
	}
	if math.Abs(a.Gain-b.Gain) > 1e-9 {
		return a.Gain > b.Gain
	}
	if math.Abs(a.after-b.after) > 1e-9 {
		return a.after < b.after
	}
	if c := cmp.Compare(aRSS, bRSS); c != 0 {
		return c < 0
	}
	if a.GID != b.GID {
		return a.GID < b.GID
	}
	return a.To < b.To
}
