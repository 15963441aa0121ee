package cluster

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
)

// Copies a node may still hold though this pool no longer maps them
// there: a holder declared failed, or that missed a store or a drop,
// keeps its (older) copy. The pool remembers such chunks per node, and
// when the node is a live member that answers again (a healed partition,
// a stopped agent continued), the repair loop drops each of them there,
// unless the node holds the chunk again by then. Only this node's pages
// are touched: a server files pages under the name in the caller's
// certificate.
const (
	// maxOrphans bounds the chunks remembered per node (256 GiB of
	// chunks); beyond it, copies are left until the owner leaves.
	maxOrphans = 1 << 20
	// reclaimBatch bounds the drops per node and repair pass.
	reclaimBatch = 1024
)

// orphan remembers that node may hold a copy of ref that is not mapped.
func (p *Pool) orphan(node string, ref chunkRef) {
	p.omu.Lock()
	defer p.omu.Unlock()
	m := p.orphans[node]
	if m == nil {
		m = map[chunkRef]struct{}{}
		p.orphans[node] = m
	}
	if len(m) >= maxOrphans {
		if !p.orphansFull {
			p.orphansFull = true
			p.log.Warn("memory pool: too many stale copies to track; the rest stay until their owner leaves", "node", node, "chunks", len(m))
		}
		return
	}
	m[ref] = struct{}{}
}

// forgetOrphans drops what is remembered for node (it restarted: the
// copies are gone with its old instance).
func (p *Pool) forgetOrphans(node string) {
	p.omu.Lock()
	defer p.omu.Unlock()
	delete(p.orphans, node)
}

// Orphans counts the chunks remembered as stale copies on other nodes.
func (p *Pool) Orphans() int {
	p.omu.Lock()
	defer p.omu.Unlock()
	n := 0
	for _, m := range p.orphans {
		n += len(m)
	}
	return n
}

// reclaim drops stale copies on the live nodes that answer, a batch per
// node, the nodes in parallel.
func (p *Pool) reclaim(alive map[string]bool) {
	listed := map[string]bool{}
	for _, m := range p.opts.Members() {
		listed[m.Name] = true
	}
	batches := map[string][]chunkRef{}
	p.omu.Lock()
	for node, m := range p.orphans {
		if !listed[node] {
			delete(p.orphans, node) // it left the cluster: what it held went with it
			continue
		}
		if !alive[node] || len(m) == 0 {
			continue
		}
		for ref := range m {
			batches[node] = append(batches[node], ref)
			if len(batches[node]) == reclaimBatch {
				break
			}
		}
	}
	p.omu.Unlock()
	var wg sync.WaitGroup
	for node, refs := range batches {
		if p.failedRecently(node) {
			continue // not before it answers again
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
			defer cancel()
			for _, ref := range refs {
				if ctx.Err() != nil {
					return
				}
				select {
				case <-p.stop:
					return
				default:
				}
				if err := p.reclaimChunk(ctx, node, ref); err != nil {
					p.noteFailure(node, err)
					p.log.Debug("memory pool: reclaim", "node", node, "err", err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// reclaimHolderTimeout bounds the drops on a node that holds the chunk
// again: they run with the chunk locked (a store must not write a page
// while a run around it is dropped), which holds up its loads.
const reclaimHolderTimeout = 200 * time.Millisecond

// reclaimChunk drops ref's pages on node unless node holds the chunk now.
// While the drop is under way node is no target for the chunk (placement
// and repair pass it over), so no store lands there during it; a chunk
// looked up only for this is removed again.
func (p *Pool) reclaimChunk(ctx context.Context, node string, ref chunkRef) error {
	ch := p.chunk(ref.r, ref.idx, true)
	ch.mu.Lock()
	if slices.ContainsFunc(ch.holders, func(h holder) bool { return h.node == node }) {
		// It holds the chunk: it keeps the pages, the ones dropped since
		// (a drop it missed) go.
		defer ch.mu.Unlock()
		hctx, cancel := context.WithTimeout(ctx, reclaimHolderTimeout)
		defer cancel()
		for _, run := range clearRuns(ch.pages.Load()) {
			if err := p.dropRun(hctx, node, ref, run[0], run[1]); err != nil {
				return err
			}
		}
		p.forgetOrphan(node, ref)
		return nil
	}
	ch.reclaiming = append(ch.reclaiming, node)
	ch.mu.Unlock()
	err := p.dropRun(ctx, node, ref, 0, ChunkPages)
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if i := slices.Index(ch.reclaiming, node); i >= 0 {
		ch.reclaiming = slices.Delete(ch.reclaiming, i, i+1)
	}
	if err != nil {
		return err
	}
	p.reclaimed.Add(1)
	p.forgetOrphan(node, ref)
	if len(ch.holders) == 0 && ch.pages.Load() == 0 && len(ch.reclaiming) == 0 {
		// Stores that found this chunk look it up again (dead).
		ch.dead.Store(true)
		p.mu.Lock()
		if m := p.regions[ref.r]; m[ref.idx] == ch {
			delete(m, ref.idx)
			if len(m) == 0 {
				delete(p.regions, ref.r)
			}
		}
		p.mu.Unlock()
	}
	return nil
}

// dropRun drops pages [lo, hi) of ref's chunk on node.
func (p *Pool) dropRun(ctx context.Context, node string, ref chunkRef, lo, hi int) error {
	_, _, err := p.do(ctx, node, 0, pageproto.Header{Op: pageproto.OpDrop, Region: ref.r.ID,
		Offset: ref.idx*ChunkSize + uint64(lo)*pageproto.PageSize, Arg: uint64(hi-lo) * pageproto.PageSize}, ref.r.Owner, nil, nil)
	return err
}

func (p *Pool) forgetOrphan(node string, ref chunkRef) {
	p.omu.Lock()
	defer p.omu.Unlock()
	delete(p.orphans[node], ref)
	if len(p.orphans[node]) == 0 {
		delete(p.orphans, node)
	}
}

// clearRuns returns the runs [lo, hi) of pages whose bit in mask is clear.
func clearRuns(mask uint64) [][2]int {
	var out [][2]int
	for i := 0; i < ChunkPages; {
		if mask&(1<<i) != 0 {
			i++
			continue
		}
		j := i
		for j < ChunkPages && mask&(1<<j) == 0 {
			j++
		}
		out = append(out, [2]int{i, j})
		i = j
	}
	return out
}
