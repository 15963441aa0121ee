// Package balance spreads the connections of one service address over its
// targets (round-robin or least-connections) and decides which targets are
// healthy: active checks take a target out after Fall consecutive failures
// and put it back after Rise consecutive successes; a failed dial (a
// passive check) takes it out at once, so the next connection goes
// elsewhere without waiting for the next check.
//
// It holds no sockets: the proxy asks it for a target, reports how the
// dial went, and tells it when the connection ends.
package balance

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// Policy chooses among healthy targets.
type Policy string

const (
	// RoundRobin takes the healthy targets in turn.
	RoundRobin Policy = "round-robin"
	// LeastConn takes the healthy target with the fewest open
	// connections, in turn among equals.
	LeastConn Policy = "least-conn"
)

// ParsePolicy accepts the policy names (and "" for RoundRobin).
func ParsePolicy(s string) (Policy, error) {
	switch Policy(s) {
	case "", RoundRobin:
		return RoundRobin, nil
	case LeastConn, "least-connections", "leastconn":
		return LeastConn, nil
	}
	return "", fmt.Errorf("unknown balancing policy %q: use %s or %s", s, RoundRobin, LeastConn)
}

// Thresholds of the active checks.
type Thresholds struct {
	Fall int // consecutive failed checks that take a healthy target out; default 3
	Rise int // consecutive good checks that put an unhealthy target back; default 2
}

func (t Thresholds) withDefaults() Thresholds {
	if t.Fall <= 0 {
		t.Fall = 3
	}
	if t.Rise <= 0 {
		t.Rise = 2
	}
	return t
}

// State is one target as seen by the balancer.
type State struct {
	Key       string    `json:"target"`
	Healthy   bool      `json:"healthy"`
	Active    int64     `json:"active"`           // connections open (or being dialed) now
	Total     int64     `json:"total"`            // connections carried since the target was added
	Failed    int64     `json:"failed"`           // dials that failed
	LastError string    `json:"last_error"`       // of the last failed dial or check; "" after a good check
	Since     time.Time `json:"since"`            // when Healthy last changed (or the target was added)
	Checks    int64     `json:"checks,omitempty"` // active checks done
}

type target struct {
	State
	fails, oks int // consecutive check results
}

// Pool is the balancer of one service address. Its methods are safe for
// concurrent use.
type Pool struct {
	policy Policy
	th     Thresholds
	now    func() time.Time

	mu      sync.Mutex
	targets []*target // in the order given; guarded by mu
	next    int       // where the next turn starts; guarded by mu
}

// NewPool returns a pool of keys, all healthy until checked.
func NewPool(policy Policy, th Thresholds, keys ...string) *Pool {
	p := &Pool{policy: policy, th: th.withDefaults(), now: time.Now}
	p.SetTargets(keys)
	return p
}

// Policy is the pool's policy.
func (p *Pool) Policy() Policy { return p.policy }

// SetTargets replaces the target list; targets kept keep their state,
// new ones start healthy.
func (p *Pool) SetTargets(keys []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := map[string]*target{}
	for _, t := range p.targets {
		old[t.Key] = t
	}
	p.targets = p.targets[:0:0]
	for _, k := range keys {
		t := old[k]
		if t == nil {
			t = &target{State: State{Key: k, Healthy: true, Since: p.now()}}
			old[k] = t
		}
		p.targets = append(p.targets, t)
	}
	if p.next >= len(p.targets) {
		p.next = 0
	}
}

// Pick chooses a target for a new connection among those tried does not
// reject (the targets already tried for it), counting it as active until
// Dialed reports a failure or Release is called. Healthy targets come
// first; when none is left, unhealthy ones are tried as a last resort (a
// target may have come back since its last check). ok is false when every
// target has been tried.
func (p *Pool) Pick(tried func(key string) bool) (key string, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.targets)
	for _, wantHealthy := range []bool{true, false} {
		best := -1
		for i := 0; i < n; i++ {
			idx := (p.next + i) % n
			t := p.targets[idx]
			if t.Healthy != wantHealthy || (tried != nil && tried(t.Key)) {
				continue
			}
			if best < 0 {
				best = idx
				if p.policy != LeastConn {
					break
				}
				continue
			}
			if t.Active < p.targets[best].Active {
				best = idx
			}
		}
		if best >= 0 {
			t := p.targets[best]
			t.Active++
			p.next = (best + 1) % n
			return t.Key, true
		}
	}
	return "", false
}

func (p *Pool) find(key string) *target {
	for _, t := range p.targets {
		if t.Key == key {
			return t
		}
	}
	return nil
}

// Dialed reports how the dial to a picked target went. A failure is a
// passive check: the target is taken out now, and the connection is no
// longer counted as active.
func (p *Pool) Dialed(key string, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.find(key)
	if t == nil {
		return
	}
	if err == nil {
		t.Total++
		return
	}
	t.Active--
	t.Failed++
	t.LastError = err.Error()
	t.oks = 0
	if t.Healthy {
		t.Healthy, t.Since = false, p.now()
	}
}

// Release ends a connection that Dialed reported as established.
func (p *Pool) Release(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := p.find(key); t != nil && t.Active > 0 {
		t.Active--
	}
}

// Checked records an active check's result and applies the thresholds.
// It reports whether the target's health changed.
func (p *Pool) Checked(key string, err error) (changed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.find(key)
	if t == nil {
		return false
	}
	t.Checks++
	if err != nil {
		t.LastError = err.Error()
		t.oks = 0
		t.fails++
		if t.Healthy && t.fails >= p.th.Fall {
			t.Healthy, t.Since = false, p.now()
			return true
		}
		return false
	}
	t.LastError = ""
	t.fails = 0
	t.oks++
	if !t.Healthy && t.oks >= p.th.Rise {
		t.Healthy, t.Since = true, p.now()
		return true
	}
	return false
}

// States returns every target's state, in the order given.
func (p *Pool) States() []State {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]State, len(p.targets))
	for i, t := range p.targets {
		out[i] = t.State
	}
	return out
}

// Keys returns the targets, in the order given.
func (p *Pool) Keys() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, len(p.targets))
	for i, t := range p.targets {
		out[i] = t.Key
	}
	return out
}

// Probe checks one target; it must return by the time ctx ends.
type Probe func(ctx context.Context, key string) error

// RunChecks checks every target of p every interval, each check bounded
// by timeout and all of one round run in parallel, until ctx ends. A
// round starts only after the previous one finished, so a slow target
// cannot pile up checks. onChange, if not nil, hears of health changes.
func RunChecks(ctx context.Context, p *Pool, interval, timeout time.Duration, probe Probe, onChange func(key string, healthy bool, err error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var wg sync.WaitGroup
		for _, k := range p.Keys() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, cancel := context.WithTimeout(ctx, timeout)
				err := probe(cctx, k)
				cancel()
				if ctx.Err() != nil {
					return // shutting down: not the target's fault
				}
				if p.Checked(k, err) && onChange != nil {
					onChange(k, err == nil, err)
				}
			}()
		}
		wg.Wait()
	}
}
