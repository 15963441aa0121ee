package cluster

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
	"github.com/onebox-project/onebox/memory/pool"
)

// errNoTarget: no node can take another copy now.
var errNoTarget = errors.New("no node to copy to")

// repairWorkers is how many chunks are re-replicated at once.
const repairWorkers = 8

// Under returns the pages with fewer copies than Replicas, as of the last
// repair pass, less what was repaired since.
func (p *Pool) Under() uint64 { return p.under.Load() }

// Passes counts repair passes (tests wait for one after a change).
func (p *Pool) Passes() uint64 { return p.passes.Load() }

func (p *Pool) repairLoop() {
	defer close(p.closed2)
	t := time.NewTicker(p.opts.RepairInterval)
	defer t.Stop()
	// Failures kick a pass at once, but passes are at least this far
	// apart: a node that fails every request must not make the loop spin.
	gap := min(p.opts.RepairInterval, 100*time.Millisecond)
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		case <-p.kick:
		}
		p.repairPass()
		select {
		case <-p.stop:
			return
		case <-time.After(gap):
		}
	}
}

type repairJob struct {
	key   chunkRef
	ch    *chunk
	pages uint64
}

type chunkRef struct {
	r   pool.Region
	idx uint64
}

// repairPass drops copies on nodes that are gone (failed, left, or
// restarted since they took the chunk), counts the pages left with fewer
// copies than Replicas, and copies those chunks to new nodes.
func (p *Pool) repairPass() {
	alive := p.aliveSet()
	p.pingHolders(alive)
	instances := map[string]uint64{}
	p.mu.Lock()
	var refs []repairJob
	for r, m := range p.regions {
		for idx, ch := range m {
			refs = append(refs, repairJob{key: chunkRef{r, idx}, ch: ch})
		}
	}
	for name, nc := range p.nodes {
		nc.mu.Lock()
		instances[name] = nc.instance
		nc.mu.Unlock()
	}
	p.mu.Unlock()
	gone := func(h holder) bool {
		inst := instances[h.node]
		return !alive[h.node] || (inst != 0 && inst != h.instance)
	}
	// A holder that cannot be reached now (a cut link not yet declared
	// failed, a restart not yet seen) does not count as a copy: its chunks
	// get another one, and the extra copy is dropped once it answers again.
	shaky := map[string]bool{}
	for n := range alive {
		shaky[n] = p.shaky(n)
	}
	var under, lost uint64
	var jobs []repairJob
	for _, j := range refs {
		ch := j.ch
		np := uint64(bits.OnesCount64(ch.pages.Load()))
		ch.mu.RLock()
		stale := slices.ContainsFunc(ch.holders, gone)
		ch.mu.RUnlock()
		if stale {
			ch.mu.Lock()
			before := len(ch.holders)
			for _, h := range ch.holders {
				if !alive[h.node] {
					// Declared failed, left: if it comes back as the same
					// instance, its copy is reclaimed.
					p.orphan(h.node, j.key)
				}
			}
			ch.holders = slices.DeleteFunc(ch.holders, gone)
			if before > 0 && len(ch.holders) == 0 {
				p.log.Error("memory pool: every copy of a chunk is gone", "owner", j.key.r.Owner, "region", j.key.r.ID, "offset", j.key.idx*ChunkSize)
			}
			ch.mu.Unlock()
		}
		ch.mu.RLock()
		n, reachable := len(ch.holders), 0
		for _, h := range ch.holders {
			if !shaky[h.node] {
				reachable++
			}
		}
		ch.mu.RUnlock()
		if reachable == n && n > p.opts.Replicas {
			p.trim(j)
		}
		switch {
		case np == 0:
		case n == 0:
			lost += np
		case reachable < p.opts.Replicas:
			under += np
			j.pages = np
			jobs = append(jobs, j)
		}
	}
	p.under.Store(under)
	p.lost.Store(lost)
	p.reclaim(alive)
	p.passes.Add(1)
	if len(jobs) == 0 {
		return
	}
	cands := p.candidates()
	var full sync.Map // nodes that answered StatusFull this pass
	work := make(chan repairJob)
	var wg sync.WaitGroup
	for range min(repairWorkers, len(jobs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				if err := p.repairChunk(j, cands, &full); err != nil && !errors.Is(err, errNoTarget) {
					p.log.Debug("memory pool: repair", "owner", j.key.r.Owner, "region", j.key.r.ID, "chunk", j.key.idx, "err", err)
				}
			}
		}()
	}
	for _, j := range jobs {
		select {
		case work <- j:
		case <-p.stop:
		}
	}
	close(work)
	wg.Wait()
}

// trim drops the copies of a chunk beyond Replicas (made while a holder
// was unreachable, which answers again), newest first.
func (p *Pool) trim(j repairJob) {
	ch := j.ch
	ch.mu.Lock()
	var extra []holder
	if len(ch.holders) > p.opts.Replicas {
		extra = slices.Clone(ch.holders[p.opts.Replicas:])
		ch.holders = ch.holders[:p.opts.Replicas]
	}
	ch.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
	defer cancel()
	for _, h := range extra {
		if _, _, err := p.do(ctx, h.node, h.instance, pageproto.Header{Op: pageproto.OpDrop, Region: j.key.r.ID, Offset: j.key.idx * ChunkSize, Arg: ChunkSize}, j.key.r.Owner, nil, nil); err != nil {
			p.orphan(h.node, j.key)
		}
	}
}

// pingHolders asks every live node this pool has placed copies on for its
// account, redialing broken connections: a node that restarted (its copies
// gone) answers with a new instance even if no load has gone its way.
func (p *Pool) pingHolders(alive map[string]bool) {
	nodes := map[string]bool{}
	for _, ch := range p.allChunks() {
		ch.mu.RLock()
		for _, h := range ch.holders {
			if alive[h.node] {
				nodes[h.node] = true
			}
		}
		ch.mu.RUnlock()
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
	defer cancel()
	var wg sync.WaitGroup
	for n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.Stat(ctx, n); err != nil {
				p.noteFailure(n, err)
			}
		}()
	}
	wg.Wait()
}

// repairChunk copies one chunk's pages from a holder to new nodes until
// it has Replicas copies.
func (p *Pool) repairChunk(j repairJob, cands []string, full *sync.Map) error {
	ctx, cancel := context.WithTimeout(context.Background(), 4*p.opts.Timeout)
	defer cancel()
	go func() {
		select {
		case <-p.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	ch := j.ch
	ch.mu.Lock()
	defer ch.mu.Unlock()
	// Read from reachable holders first; count only those as copies.
	slices.SortStableFunc(ch.holders, func(a, b holder) int {
		sa, sb := p.shaky(a.node), p.shaky(b.node)
		switch {
		case sa == sb:
			return 0
		case sb:
			return -1
		}
		return 1
	})
	reachable := 0
	for _, h := range ch.holders {
		if !p.shaky(h.node) {
			reachable++
		}
	}
	need := p.opts.Replicas - reachable
	mask := ch.pages.Load()
	if need <= 0 || mask == 0 || len(ch.holders) == 0 {
		return nil
	}
	// Where to copy to, before reading anything: nodes that are alive,
	// answer, do not hold the chunk, and were not found full this pass.
	var targets []string
	for _, n := range rendezvous(j.key.r, j.key.idx, cands) {
		if slices.ContainsFunc(ch.holders, func(h holder) bool { return h.node == n }) || slices.Contains(ch.reclaiming, n) || p.failedRecently(n) {
			continue
		}
		if _, isFull := full.Load(n); !isFull {
			targets = append(targets, n)
		}
	}
	if len(targets) == 0 {
		return errNoTarget
	}
	buf := make([]byte, ChunkSize)
	off := j.key.idx * ChunkSize
	var errs []error
	read := false
	for _, h := range ch.holders {
		_, _, err := p.do(ctx, h.node, h.instance, pageproto.Header{Op: pageproto.OpLoad, Region: j.key.r.ID, Offset: off, Arg: ChunkSize}, j.key.r.Owner, nil, buf)
		if err == nil {
			read = true
			break
		}
		p.noteFailure(h.node, err)
		errs = append(errs, err)
	}
	if !read {
		return fmt.Errorf("no holder answered: %w", errors.Join(errs...))
	}
	for _, n := range targets {
		if need == 0 {
			break
		}
		// Only the pages that exist: runs of set bits, all to the same
		// server instance.
		var inst uint64
		ok := true
		for m := mask; m != 0; {
			lo := bits.TrailingZeros64(m)
			hi := lo + bits.TrailingZeros64(^(m >> lo))
			if hi > 64 {
				hi = 64
			}
			var err error
			_, inst, err = p.do(ctx, n, inst, pageproto.Header{Op: pageproto.OpStore, Region: j.key.r.ID, Offset: off + uint64(lo)*pool.PageSize},
				j.key.r.Owner, buf[lo*pool.PageSize:hi*pool.PageSize], nil)
			if err != nil {
				var se *StatusError
				if errors.As(err, &se) && se.Status == pageproto.StatusFull {
					full.Store(n, true)
				}
				p.noteFailure(n, err)
				ok = false
				break
			}
			if hi == 64 {
				m = 0
			} else {
				m &^= (uint64(1)<<(hi-lo) - 1) << lo
			}
		}
		if !ok {
			// Forget partial copies on that node.
			if _, _, err := p.do(ctx, n, 0, pageproto.Header{Op: pageproto.OpDrop, Region: j.key.r.ID, Offset: off, Arg: ChunkSize}, j.key.r.Owner, nil, nil); err != nil {
				p.orphan(n, j.key)
			}
			continue
		}
		ch.holders = append(ch.holders, holder{n, inst})
		need--
		p.repaired.Add(j.pages * pool.PageSize)
	}
	if need == 0 {
		subClamp(&p.under, j.pages)
		return nil
	}
	return fmt.Errorf("%d more copies needed, no node could take them", need)
}

// subClamp subtracts n from a, stopping at zero.
func subClamp(a *atomic.Uint64, n uint64) {
	for {
		v := a.Load()
		if a.CompareAndSwap(v, v-min(v, n)) {
			return
		}
	}
}
