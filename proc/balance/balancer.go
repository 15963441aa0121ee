package balance

import (
	"context"
	"log/slog"
	"math"
	"sort"
	"sync"
	"time"
)

// Sample is one look at a running process of this node.
type Sample struct {
	GID string
	// Runnable is how many of its threads (in its whole process group)
	// are in state R: running or waiting for a CPU.
	Runnable int
	RSS      uint64
	Started  time.Time // when it started, on whatever node
	Balance  bool      // started with --best, without --no-balance
	Arrived  bool      // it came here by migration
}

// PeerLoad is another node's load, with the processes it counts.
type PeerLoad struct {
	NodeLoad
	GIDs []string
}

// Tracker is the balancer's memory between rounds: each process's
// smoothed demand, when it may move, the moves on their way to peers and
// the hysteresis counter. It is not safe for concurrent use.
type Tracker struct {
	cfg    Config
	procs  map[string]*tracked
	holds  map[string]time.Time // GID → stays until (failed moves; outlives the process's stay)
	sent   map[string]sentMove  // GID → moved to a peer, not yet in its report
	rounds int                  // consecutive rounds that found a move
	seen   bool                 // Observe was called before
}

type tracked struct {
	demand    float64
	at        time.Time
	stays     time.Time // not movable before
	rss       uint64
	started   time.Time
	balance   bool
	firstSeen time.Time
}

type sentMove struct {
	to     string
	demand float64
	at     time.Time
}

// NewTracker returns an empty tracker.
func NewTracker(cfg Config) *Tracker {
	return &Tracker{cfg: cfg.WithDefaults(), procs: map[string]*tracked{}, holds: map[string]time.Time{}, sent: map[string]sentMove{}}
}

// arrivalAge: a process first seen older than this did not start here (it
// came by migration), even if nothing said so.
func (t *Tracker) arrivalAge() time.Duration { return max(2*t.cfg.SampleInterval, 2*time.Second) }

// Observe takes a sample of every running process of this node: a
// process's demand is smoothed exponentially (time constant Tau), starting
// at its first sample so a new CPU-bound process counts at once; processes
// missing from samples are forgotten.
func (t *Tracker) Observe(now time.Time, samples []Sample) {
	alive := make(map[string]bool, len(samples))
	for _, s := range samples {
		alive[s.GID] = true
		p := t.procs[s.GID]
		if p == nil {
			stay := t.cfg.Settle
			if s.Arrived || (t.seen && now.Sub(s.Started) > t.arrivalAge()) {
				stay = t.cfg.Cooldown
			}
			p = &tracked{demand: float64(s.Runnable), at: now, stays: now.Add(stay), firstSeen: now}
			t.procs[s.GID] = p
		} else if dt := now.Sub(p.at); dt > 0 {
			alpha := 1 - math.Exp(-dt.Seconds()/t.cfg.Tau.Seconds())
			p.demand += alpha * (float64(s.Runnable) - p.demand)
			p.at = now
		}
		if h, ok := t.holds[s.GID]; ok && h.After(p.stays) {
			p.stays = h
		}
		p.rss, p.started, p.balance = s.RSS, s.Started, s.Balance
	}
	for gid := range t.procs {
		if !alive[gid] {
			delete(t.procs, gid)
		}
	}
	for gid, h := range t.holds {
		if now.After(h) {
			delete(t.holds, gid)
		}
	}
	t.seen = true
}

// Load is this node's demand: the sum of its processes' demands.
func (t *Tracker) Load() float64 {
	var l float64
	for _, p := range t.procs {
		l += p.demand
	}
	return l
}

// Demand is the smoothed demand of one process (0 if unknown).
func (t *Tracker) Demand(gid string) float64 {
	if p := t.procs[gid]; p != nil {
		return p.demand
	}
	return 0
}

// Procs lists this node's processes for Decide, sorted by id.
func (t *Tracker) Procs(now time.Time) []Proc {
	out := make([]Proc, 0, len(t.procs))
	for gid, p := range t.procs {
		out = append(out, Proc{GID: gid, Demand: p.demand, RSS: p.rss, Age: now.Sub(p.started),
			Movable: p.balance && !now.Before(p.stays)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GID < out[j].GID })
	return out
}

// Report lists this node's processes for a Report, sorted by id.
func (t *Tracker) Report(now time.Time) []ProcReport {
	out := make([]ProcReport, 0, len(t.procs))
	for gid, p := range t.procs {
		r := ProcReport{GID: gid, Demand: math.Round(p.demand*1000) / 1000, RSSBytes: p.rss, Balance: p.balance}
		if now.Before(p.stays) {
			s := p.stays
			r.StaysUntil = &s
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GID < out[j].GID })
	return out
}

// Wants reports whether a round could find a move at all: this node is
// overloaded and has a process that may move. When it is false, asking
// the peers for their loads is wasted.
func (t *Tracker) Wants(cpus int, now time.Time) bool {
	if cpus <= 0 || t.Load() <= float64(cpus) {
		return false
	}
	for _, p := range t.procs {
		if p.balance && !now.Before(p.stays) && p.demand > 0 {
			return true
		}
	}
	return false
}

// sentTTL bounds how long a move counts in its target's load without the
// target's report showing the process.
func (t *Tracker) sentTTL() time.Duration { return max(3*t.cfg.Interval, 10*time.Second) }

// Adjust adds to each peer's reported load the processes moved to it that
// its report does not count yet, so a round right after a move does not
// see the target as idle and send it a second process.
func (t *Tracker) Adjust(peers []PeerLoad, now time.Time) []NodeLoad {
	for gid, s := range t.sent {
		if now.Sub(s.at) > t.sentTTL() {
			delete(t.sent, gid)
		}
	}
	out := make([]NodeLoad, 0, len(peers))
	for _, p := range peers {
		has := make(map[string]bool, len(p.GIDs))
		for _, g := range p.GIDs {
			has[g] = true
		}
		n := p.NodeLoad
		for gid, s := range t.sent {
			if s.to != p.Name {
				continue
			}
			if has[gid] {
				delete(t.sent, gid) // its report counts it now
				continue
			}
			n.Load += s.demand
		}
		out = append(out, n)
	}
	return out
}

// Round is one decision round: the move Decide finds, once a move has
// been found Hold rounds in a row.
func (t *Tracker) Round(self NodeLoad, peers []NodeLoad, now time.Time) (Move, bool) {
	m, ok := Decide(t.cfg, self, peers, t.Procs(now))
	if !ok {
		t.rounds = 0
		return Move{}, false
	}
	t.rounds++
	if t.rounds < t.cfg.Hold {
		return Move{}, false
	}
	t.rounds = 0
	return m, true
}

// Idle resets the hysteresis counter (a round that found nothing to do).
func (t *Tracker) Idle() { t.rounds = 0 }

// Moved records that gid left for node to: its demand leaves this node's
// load at once and counts in the target's until the target reports it.
func (t *Tracker) Moved(gid, to string, now time.Time) {
	d := t.Demand(gid)
	delete(t.procs, gid)
	t.sent[gid] = sentMove{to: to, demand: d, at: now}
	t.rounds = 0
}

// Failed records a failed move of gid: it stays for Cooldown.
func (t *Tracker) Failed(gid string, now time.Time) {
	h := now.Add(t.cfg.Cooldown)
	t.holds[gid] = h
	if p := t.procs[gid]; p != nil && h.After(p.stays) {
		p.stays = h
	}
	t.rounds = 0
}

// Env is what the balancer needs from its agent.
type Env struct {
	// Node is this node's name.
	Node string
	// Sample looks at this node: its CPUs and its running processes.
	Sample func() (cpus int, samples []Sample, err error)
	// Peers returns the loads of (some of) the other alive, schedulable
	// nodes. It must be bounded in time.
	Peers func(ctx context.Context) []PeerLoad
	// Migrate moves process gid to node to; reason is shown in 'onebox ps'.
	Migrate func(ctx context.Context, gid, to, reason string) error
	// Enabled reports whether the balancer moves processes by itself
	// (when false it only measures, for reports and drains).
	Enabled func() bool
	Logger  *slog.Logger
}

// MigrateTimeout bounds one migration started by the balancer or a drain.
const MigrateTimeout = 5 * time.Minute

// maxRecentMoves is how many moves a Balancer remembers for its report.
const maxRecentMoves = 20

// Balancer runs the rounds of one node: it samples the node's processes
// every SampleInterval and decides every Interval, one migration at a
// time (drains share that one slot).
type Balancer struct {
	cfg Config
	env Env

	moveMu sync.Mutex // held for the length of a migration

	mu        sync.Mutex
	tracker   *Tracker     // guarded by mu
	cpus      int          // guarded by mu
	sampled   time.Time    // guarded by mu
	migrating string       // guarded by mu
	recent    []MoveRecord // guarded by mu
}

// New returns a balancer; Run starts it.
func New(cfg Config, env Env) *Balancer {
	cfg = cfg.WithDefaults()
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Enabled == nil {
		env.Enabled = func() bool { return true }
	}
	return &Balancer{cfg: cfg, env: env, tracker: NewTracker(cfg)}
}

// Run samples and decides until ctx ends. A migration in progress is
// given ctx, so it ends with it.
func (b *Balancer) Run(ctx context.Context) {
	st := time.NewTicker(b.cfg.SampleInterval)
	defer st.Stop()
	dt := time.NewTicker(b.cfg.Interval)
	defer dt.Stop()
	b.Sample()
	for {
		select {
		case <-ctx.Done():
			return
		case <-st.C:
			b.Sample()
		case <-dt.C:
			b.round(ctx)
		}
	}
}

// Sample takes one sample of this node's processes now.
func (b *Balancer) Sample() {
	cpus, samples, err := b.env.Sample()
	if err != nil {
		b.env.Logger.Warn("balance: cannot sample the processes", "err", err)
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.tracker.Observe(now, samples)
	b.cpus, b.sampled = cpus, now
}

// Self is this node's load now.
func (b *Balancer) Self() NodeLoad {
	b.mu.Lock()
	defer b.mu.Unlock()
	return NodeLoad{Name: b.env.Node, CPUs: b.cpus, Load: b.tracker.Load()}
}

// Demand is the smoothed demand of one of this node's processes.
func (b *Balancer) Demand(gid string) float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.tracker.Demand(gid)
}

func (b *Balancer) round(ctx context.Context) {
	if !b.env.Enabled() {
		b.mu.Lock()
		b.tracker.Idle()
		b.mu.Unlock()
		return
	}
	b.mu.Lock()
	now := time.Now()
	wants := b.tracker.Wants(b.cpus, now)
	if !wants {
		b.tracker.Idle()
	}
	b.mu.Unlock()
	if !wants {
		return
	}
	peers := b.env.Peers(ctx)
	if ctx.Err() != nil {
		return
	}
	b.mu.Lock()
	now = time.Now()
	self := NodeLoad{Name: b.env.Node, CPUs: b.cpus, Load: b.tracker.Load()}
	m, ok := b.tracker.Round(self, b.tracker.Adjust(peers, now), now)
	b.mu.Unlock()
	if !ok {
		return
	}
	if !b.moveMu.TryLock() {
		return // a drain is moving processes: it decides for now
	}
	defer b.moveMu.Unlock()
	b.env.Logger.Info("balance: moving a process", "gid", m.GID, "to", m.To, "reason", m.Reason,
		"gain", round3(m.Gain), "benefit_s", round3(m.Benefit), "cost_s", round3(m.Cost))
	_ = b.migrateLocked(ctx, m.GID, m.To, m.Reason)
}

// Migrate moves gid to node to, waiting for any migration in progress
// first (drains use it, so the node moves one process at a time).
func (b *Balancer) Migrate(ctx context.Context, gid, to, reason string) error {
	b.moveMu.Lock()
	defer b.moveMu.Unlock()
	return b.migrateLocked(ctx, gid, to, reason)
}

// Preconditions: b.moveMu held.
func (b *Balancer) migrateLocked(ctx context.Context, gid, to, reason string) error {
	b.mu.Lock()
	b.migrating = gid
	b.mu.Unlock()
	start := time.Now()
	mctx, cancel := context.WithTimeout(ctx, MigrateTimeout)
	err := b.env.Migrate(mctx, gid, to, reason)
	cancel()
	rec := MoveRecord{GID: gid, From: b.env.Node, To: to, Reason: reason, At: start, Seconds: round3(time.Since(start).Seconds())}
	b.mu.Lock()
	b.migrating = ""
	now := time.Now()
	if err != nil {
		rec.Error = err.Error()
		b.tracker.Failed(gid, now)
	} else {
		b.tracker.Moved(gid, to, now)
	}
	b.recent = append(b.recent, rec)
	if len(b.recent) > maxRecentMoves {
		b.recent = append([]MoveRecord(nil), b.recent[len(b.recent)-maxRecentMoves:]...)
	}
	b.mu.Unlock()
	if err != nil {
		b.env.Logger.Warn("balance: move failed; the process stays", "gid", gid, "to", to, "err", err)
	} else {
		b.env.Logger.Info("balance: process moved", "gid", gid, "to", to, "seconds", rec.Seconds)
	}
	return err
}

// Report is this node's balancer state (Cordoned and Balancing are the
// agent's to fill in).
func (b *Balancer) Report() Report {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	return Report{Node: b.env.Node, CPUs: b.cpus, Load: round3(b.tracker.Load()), Migrating: b.migrating,
		Procs: b.tracker.Report(now), Recent: append([]MoveRecord{}, b.recent...), Sampled: b.sampled}
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }
