package cluster

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/onebox-project/onebox/memory/pool"
)

// Hedged loads: a load whose first holder has not answered after a delay
// derived from the loads seen lately is asked of the second holder too,
// and the first good answer wins. A holder behind a cut link, or whose
// agent is stopped, then costs that delay instead of the request timeout.
const (
	// hedgeFactor times the recent p99 of loads of the same size class
	// is the delay.
	hedgeFactor = 4
	// hedgeFloor: below it, a wake-up on a loaded machine would hedge
	// loads that are merely scheduled late.
	hedgeFloor = 5 * time.Millisecond
	// hedgeCeiling, and at most an eighth of Timeout.
	hedgeCeiling = 250 * time.Millisecond
	// latencySamples are kept per class; the delay is recomputed every
	// latencyEvery samples.
	latencySamples = 128
	latencyEvery   = 16
)

// Hedges are at most a tenth of loads, plus a burst (the loads in flight
// when a holder goes silent): on an overloaded node or machine, hedges
// would add load where it hurts most.
const (
	hedgeRatio = 10 // loads per hedge, in the long run
	hedgeBurst = 32
)

// budget counts the hedges allowed, in tenths of a hedge.
type budget struct{ tokens atomic.Int64 }

func (b *budget) earn() {
	if b.tokens.Load() < hedgeBurst*hedgeRatio {
		b.tokens.Add(1)
	}
}

func (b *budget) spend() bool {
	if b.tokens.Add(-hedgeRatio) >= 0 {
		return true
	}
	b.tokens.Add(hedgeRatio)
	return false
}

// hedgeDelay is the delay for a p99 of loads (0: none seen yet).
func hedgeDelay(p99, timeout time.Duration) time.Duration {
	ceil := min(hedgeCeiling, timeout/8)
	return max(min(hedgeFactor*p99, ceil), min(hedgeFloor, ceil))
}

// sizeClass groups loads of similar cost: one page or a few, up to a
// chunk, more (pieces started together).
func sizeClass(n int) int {
	switch {
	case n <= 16<<10:
		return 0
	case n <= ChunkSize:
		return 1
	}
	return 2
}

// latencies are the recent latencies of one class of loads and the hedge
// delay derived from them.
type latencies struct {
	delay atomic.Int64 // ns; 0 until the first computation

	mu   sync.Mutex
	ring [latencySamples]time.Duration // guarded by mu
	n    int                           // samples taken; guarded by mu
}

func (l *latencies) add(d, timeout time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ring[l.n%latencySamples] = d
	l.n++
	if l.n%latencyEvery != 0 {
		return
	}
	s := slices.Clone(l.ring[:min(l.n, latencySamples)])
	slices.Sort(s)
	l.delay.Store(int64(hedgeDelay(s[(len(s)*99)/100], timeout)))
}

func (l *latencies) get(timeout time.Duration) time.Duration {
	if d := l.delay.Load(); d > 0 {
		return time.Duration(d)
	}
	return hedgeDelay(0, timeout)
}

// pendingLoad is a piece of a load sent to its first holder.
type pendingLoad struct {
	pc   piece
	hs   []holder
	c    *conn
	cl   *call
	errs []error
}

// finishLoad waits for pd's answer from its first holder, hedging on the
// second one once the class's delay has passed. It reports whether a copy
// answered; if not, the holders still to try (pd.errs says what failed).
func (p *Pool) finishLoad(ctx context.Context, r pool.Region, class int, pd *pendingLoad) (bool, []holder) {
	lat := &p.lat[class]
	p.pieces.Add(1)
	p.hedges.earn()
	hedgeAt := time.Time{}
	if len(pd.hs) > 1 {
		hedgeAt = pd.cl.sent.Add(lat.get(p.opts.Timeout))
	}
	if pd.c.waitUntil(pd.cl, ctx.Done(), hedgeAt) {
		_, _, err := pd.c.result(pd.cl)
		if err == nil {
			lat.add(time.Since(pd.cl.sent), p.opts.Timeout)
			return true, nil
		}
		return false, p.firstFailed(pd, err)
	}
	if ctx.Err() != nil {
		if !pd.c.abandon(pd.cl) {
			pd.c.waitUntil(pd.cl, nil, time.Time{})
			if _, _, err := pd.c.result(pd.cl); err == nil {
				return true, nil
			}
		}
		pd.errs = append(pd.errs, ctx.Err())
		return false, nil
	}
	if !p.hedges.spend() {
		// Out of hedges: wait as if there were one copy.
		if err := pd.c.wait(ctx, pd.cl); err != nil {
			pd.errs = append(pd.errs, err)
			return false, nil
		}
		if _, _, err := pd.c.result(pd.cl); err != nil {
			return false, p.firstFailed(pd, err)
		}
		return true, nil
	}
	// The first holder is slow: ask the second too, into a buffer of its
	// own (the first answer may still land in pd.pc.data).
	p.hedged.Add(1)
	h2 := pd.hs[1]
	hctx, cancel := context.WithCancel(ctx)
	defer cancel() // a hedge still waiting gives up; buf is dropped
	buf := make([]byte, len(pd.pc.data))
	hdone := make(chan struct{})
	var herr error
	go func() {
		defer close(hdone)
		_, _, herr = p.do(hctx, h2.node, h2.instance, loadHeader(r, pd.pc), r.Owner, nil, buf)
		if herr != nil {
			p.noteFailure(h2.node, herr)
		}
	}()
	if pd.c.waitUntil(pd.cl, hdone, time.Time{}) {
		_, _, err := pd.c.result(pd.cl)
		if err == nil {
			lat.add(time.Since(pd.cl.sent), p.opts.Timeout)
			return true, nil
		}
		<-hdone
		if herr == nil {
			p.noteFailure(pd.hs[0].node, err)
			copy(pd.pc.data, buf)
			return true, nil
		}
		pd.errs = append(pd.errs, herr)
		return false, slices.DeleteFunc(p.firstFailed(pd, err), func(h holder) bool { return h == h2 })
	}
	if herr != nil {
		// The hedge failed first: the first holder is still the best bet.
		pd.errs = append(pd.errs, herr)
		if err := pd.c.wait(ctx, pd.cl); err != nil {
			pd.errs = append(pd.errs, err)
			return false, pd.hs[2:]
		}
		_, _, err := pd.c.result(pd.cl)
		if err == nil {
			return true, nil
		}
		p.noteFailure(pd.hs[0].node, err)
		pd.errs = append(pd.errs, err)
		return false, pd.hs[2:]
	}
	// The hedge answered first.
	p.hedgeWins.Add(1)
	if pd.c.heard.Load() < pd.cl.sent.UnixNano() {
		// Silent since the request (cut off, stopped), not merely busy:
		// the next loads read the other copies first.
		p.node(pd.hs[0].node).slowAt.Store(time.Now().UnixNano())
	}
	if pd.c.abandon(pd.cl) {
		copy(pd.pc.data, buf)
		return true, nil
	}
	// The first answer is being read into pd.pc.data: it has to land
	// before pd.pc.data is returned (a server stopped in the middle of
	// it costs the connection's timeout).
	pd.c.waitUntil(pd.cl, nil, time.Time{})
	if _, _, err := pd.c.result(pd.cl); err != nil {
		copy(pd.pc.data, buf)
	}
	return true, nil
}

// firstFailed notes that pd's first holder answered with err, and returns
// the holders to try next.
func (p *Pool) firstFailed(pd *pendingLoad, err error) []holder {
	p.failovers.Add(1)
	if stale(pd.c, err) {
		return pd.hs // loadFrom retries it on a new connection
	}
	p.noteFailure(pd.hs[0].node, err)
	pd.errs = append(pd.errs, err)
	return pd.hs[1:]
}
