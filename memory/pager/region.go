package pager

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/memory/pool"
	"github.com/onebox-project/onebox/memory/uffd"
)

// Page states (region.state).
const (
	stResident = 1 << iota // in the memfd, mapped by the program
	stDirty                // resident and written since its pool copy (write-enabled)
	stInPool               // the pool holds its data at srcs[where]
	stQueued               // in the client's fifo
	stRef                  // written since it was queued: a second chance
	stVictim               // chosen by the eviction running now
)

const (
	noSrc   = 0xffff // where[i] of a page with no pool copy
	maxSrcs = noSrc - 1
	// maxPendingForks bounds a process's fork snapshots no child has
	// adopted yet: past it fork fails with ENOMEM.
	maxPendingForks = 1024
	maxWindow       = 256  // pages: largest prefetch and eviction batch (1 MiB)
	raPages         = 4096 // pages: how far readahead runs past a sequential fault (16 MiB)
	minLimit        = 64   // pages: the smallest local limit honoured

	// streamGuard: pages just behind a stream's last fault that eviction
	// leaves alone (a program may still be reading them).
	streamGuard = 16
	// streamMisses: non-sequential faults in a row after which a block is
	// no longer treated as streamed.
	streamMisses = 16
)

// src is one pool region holding pages of blocks. A block's own src takes
// its evictions; at fork it is frozen and shared (reference counted) by the
// parent and the child, and the parent gets a new own src.
type src struct {
	r    pool.Region
	n    uint64 // bytes, for Drop
	refs atomic.Int32
}

func (p *Pager) newSrc(n uint64) *src {
	s := &src{r: pool.Region{Owner: p.cfg.Owner, ID: p.nextID.Add(1)}, n: n}
	s.refs.Store(1)
	return s
}

func (s *src) unref(p *Pager) {
	if s.refs.Add(-1) != 0 {
		return
	}
	ctx, cancel := p.ctx()
	defer cancel()
	if err := p.cfg.Pool.Drop(ctx, s.r, 0, s.n); err != nil {
		p.cfg.Logf("pager: drop pool region %v: %v", s.r, err)
	}
}

// region is one block of a process, as registered by the shim.
type region struct {
	start, len uint64
	memfd      int
	srcs       []*src
	own        int      // index in srcs of the src evictions go to
	state      []uint8  // per page
	where      []uint16 // per page: index in srcs of its pool copy, or noSrc
	next       int      // page after the last fill: sequential detection
	window     int      // prefetch window, pages
	dead       bool     // released: fifo entries are stale
}

func newRegion(p *Pager, start, n uint64, memfd int, from *snapBlock) *region {
	np := int(n / uint64(PageSize))
	r := &region{start: start, len: n, memfd: memfd, state: make([]uint8, np), window: 1}
	if from == nil {
		r.srcs = []*src{p.newSrc(n)}
		r.where = make([]uint16, np)
		for i := range r.where {
			r.where[i] = noSrc
		}
		return r
	}
	r.srcs = append(from.srcs, p.newSrc(n))
	r.own = len(r.srcs) - 1
	r.where = from.where
	pooled := 0
	for i, w := range r.where {
		if w != noSrc {
			r.state[i] = stInPool
			pooled++
		}
	}
	p.pooled.Add(int64(pooled))
	return r
}

// release forgets a freed block: its pool pages, its memfd.
func (c *client) release(r *region) {
	res, pooled := 0, 0
	for _, s := range r.state {
		if s&stResident != 0 {
			res++
		}
		if s&stInPool != 0 {
			pooled++
		}
	}
	c.addResident(-res)
	c.p.pooled.Add(-int64(pooled))
	r.dead = true
	unix.Close(r.memfd)
	c.p.memfds.Add(-1)
	for _, s := range r.srcs {
		s.unref(c.p)
	}
	r.srcs = nil
}

// copyIn fills [pg, pg+n) of r in the program with buf, write-protected
// unless writable. It returns how many pages it filled (the run stops at a
// page already present), or errGone.
func (c *client) copyIn(r *region, pg, n int, buf []byte, writable bool) (int, error) {
	ps := uint64(PageSize)
	var mode uint64 = uffd.CopyModeWP
	if writable {
		mode = 0
	}
	addr := r.start + uint64(pg)*ps
	t0 := time.Now()
	defer func() { c.p.copyNs.Add(uint64(time.Since(t0))) }()
	for tries := 0; ; tries++ {
		done, err := uffd.CopyMode(c.uffd, addr, buf[:n*PageSize], mode)
		switch err {
		case nil:
			return n, nil
		case unix.EEXIST:
			return done / PageSize, unix.EEXIST
		case unix.EAGAIN: // the mm is changing: try again, not for ever
			if done >= PageSize {
				return done / PageSize, nil
			}
			if tries < 1000 {
				runtime.Gosched()
				continue
			}
			return 0, fmt.Errorf("fill page %#x: %w after %d tries", addr, err, tries)
		case unix.ESRCH: // the program's mm is gone: it exited
			return 0, errGone
		case unix.ENOENT:
			// The range is no longer registered (freed while a thread
			// touched it: a use after free). Wake the thread: its retry
			// faults as it would without onebox.
			uffd.Wake(c.uffd, addr, ps)
			return 0, unix.ENOENT
		default:
			return 0, fmt.Errorf("fill page %#x: %w", addr, err)
		}
	}
}

// fill serves a MISSING fault on page pg of r, with the pages after it when
// the faults run sequentially.
func (c *client) fill(r *region, pg int, write bool) error {
	ps := uint64(PageSize)
	c.p.faults.Add(1)
	if r.state[pg]&stResident != 0 { // a second fault on a page just filled
		uffd.Wake(c.uffd, r.start+uint64(pg)*ps, ps)
		return nil
	}
	if c.sr == r {
		c.srPos = pg // the program is here: what lies behind is read
	}
	if j := c.raJob; j != nil && j.r == r && pg >= j.pg && pg < j.pg+j.n {
		// The program caught up with the readahead: its chunk is on the
		// way, take it rather than load the page twice.
		c.raJob = nil
		if err := c.finishJob(j); err != nil {
			return err
		}
		if r.state[pg]&stResident != 0 {
			c.startReadahead()
			return nil
		}
	}
	seq := pg == r.next && pg > 0
	if seq {
		r.window = min(2*r.window, maxWindow)
	} else {
		r.window = 1
	}
	switch {
	case seq && r.window >= 16:
		c.sr, c.srPos, c.srMiss = r, pg, 0
	case c.sr == r && seq:
		c.srMiss = 0
	case c.sr == r:
		if c.srMiss++; c.srMiss > streamMisses {
			c.sr = nil // random access now: fill order decides
		}
	}
	done, loaded, err := c.fillRun(r, pg, r.window, write)
	if err != nil {
		return err
	}
	if loaded > 0 {
		c.p.remote.Add(1)
	}
	c.p.prefetch.Add(uint64(max(done-1, 0)))
	if seq && r.window >= 16 {
		// A stream: read further ahead while the program is busy.
		dist := raPages
		if sh := c.share(); sh > 0 {
			dist = min(dist, sh/2)
		}
		next := pg + done
		if j := c.raJob; j != nil && j.r == r && next >= j.pg && next < j.pg+j.n {
			next = j.pg + j.n // already loading
		}
		c.raRegion, c.raNext, c.raEnd, c.raWrite = r, next, min(pg+done+dist, len(r.state)), write
	} else if c.raRegion == r {
		c.raRegion = nil
	}
	return c.limitResident()
}

// raJob is a readahead chunk loading from the pool in the background while
// the client goroutine copies the previous one in: the two overlap.
type raJob struct {
	r     *region
	pg, n int
	write bool
	where []uint16 // r.where[pg:pg+n] when the load started: changed means stale
	buf   []byte
	segs  []raSeg

	// Set by the loading goroutine before done is closed.
	loaded int
	err    error
	done   chan struct{}
}

// raSeg is a run of a job's pages with the same source.
type raSeg struct {
	reg  pool.Region
	off  uint64
	b    []byte
	zero bool
}

// readahead moves the sequential stream being read forward, one chunk at a
// time: it starts the load of the next chunk, and copies a loaded one in.
// It never waits for a load (the caller keeps reading faults meanwhile); it
// reports whether it did anything.
func (c *client) readahead() (bool, error) {
	if j := c.raJob; j != nil {
		select {
		case <-j.done:
		default:
			return false, nil
		}
		c.raJob = nil
		c.startReadahead() // the next load overlaps this copy
		return true, c.finishJob(j)
	}
	c.startReadahead()
	if c.raJob == nil {
		c.raRegion = nil
		return false, nil
	}
	return true, nil
}

// startReadahead starts loading the next chunk of the stream, if any.
func (c *client) startReadahead() {
	r := c.raRegion
	if r == nil || c.raJob != nil {
		return
	}
	for !r.dead && c.raNext < c.raEnd && r.state[c.raNext]&stResident != 0 {
		c.raNext++
	}
	if r.dead || c.raNext >= c.raEnd {
		c.raRegion = nil
		return
	}
	pg := c.raNext
	n := min(maxWindow, c.raEnd-pg)
	if sh := c.share(); sh > 0 {
		n = min(n, max(1, sh/4))
	}
	for k := 1; k < n; k++ {
		if r.state[pg+k]&stResident != 0 {
			n = k
			break
		}
	}
	c.raFlip ^= 1
	if c.raBufs[c.raFlip] == nil {
		c.raBufs[c.raFlip] = make([]byte, maxWindow*PageSize)
	}
	j := &raJob{r: r, pg: pg, n: n, write: c.raWrite, where: append([]uint16(nil), r.where[pg:pg+n]...),
		buf: c.raBufs[c.raFlip][:n*PageSize], done: make(chan struct{})}
	remote := false
	for k := 0; k < n; {
		w := j.where[k]
		e := k + 1
		for e < n && j.where[e] == w {
			e++
		}
		sg := raSeg{off: uint64(pg+k) * uint64(PageSize), b: j.buf[k*PageSize : e*PageSize], zero: w == noSrc}
		if !sg.zero {
			sg.reg, remote = r.srcs[w].r, true
			j.loaded += e - k
		}
		j.segs = append(j.segs, sg)
		k = e
	}
	c.raNext = pg + n
	c.raJob = j
	if !remote {
		for _, sg := range j.segs {
			clear(sg.b)
		}
		close(j.done)
		return
	}
	// The goroutine touches only j's buffer and the pool: never the
	// program's memory, never the client's state.
	raDone := c.raDone
	go func() {
		defer func() {
			// Poke the client first: it closes raDone only once done is
			// closed.
			if raDone >= 0 {
				var one [8]byte
				binary.NativeEndian.PutUint64(one[:], 1)
				unix.Write(raDone, one[:])
			}
			close(j.done)
		}()
		ctx, cancel := c.p.ctx()
		defer cancel()
		t0 := time.Now()
		defer func() { c.p.aheadNs.Add(uint64(time.Since(t0))) }()
		for _, sg := range j.segs {
			if sg.zero {
				clear(sg.b)
			} else if err := c.p.cfg.Pool.Load(ctx, sg.reg, sg.off, sg.b); err != nil {
				j.err = fmt.Errorf("%w: load %d pages: %w", errPool, len(sg.b)/PageSize, err)
				return
			}
		}
	}()
}

// finishJob copies a loaded chunk in, up to the first page that changed
// since its load started (filled by a fault, discarded, its block freed).
func (c *client) finishJob(j *raJob) error {
	<-j.done
	if j.err != nil {
		return j.err
	}
	r := j.r
	if r.dead {
		return nil
	}
	m := 0
	for m < j.n && r.state[j.pg+m]&stResident == 0 && r.where[j.pg+m] == j.where[m] {
		m++
	}
	if m == 0 {
		return nil
	}
	done, err := c.copyIn(r, j.pg, m, j.buf, j.write)
	switch {
	case err == unix.ENOENT:
		return nil
	case err != nil && err != unix.EEXIST:
		return err
	}
	c.markFilled(r, j.pg, done, j.write || err == unix.EEXIST)
	c.p.loaded.Add(uint64(min(j.loaded, done)))
	c.p.prefetch.Add(uint64(done))
	if c.raRegion == r && r.next < j.pg+done {
		r.next = j.pg + done // the fault past it is still the same stream
	}
	return c.limitResident()
}

// markFilled records pages [pg, pg+n) of r as resident.
func (c *client) markFilled(r *region, pg, n int, dirty bool) {
	st := uint8(stResident)
	if dirty {
		st |= stDirty
	}
	for k := pg; k < pg+n; k++ {
		r.state[k] = r.state[k]&(stInPool|stQueued) | st
		if r.state[k]&stQueued == 0 {
			r.state[k] |= stQueued
			c.fifo = append(c.fifo, pageRef{r, int32(k)})
		}
	}
	c.addResident(n)
	c.p.copies.Add(uint64(n))
}

// fillRun fills up to n pages from pg of r that are not resident (it stops
// at the first resident one), write-enabled and dirty if write. It returns
// the pages filled and how many came from the pool.
func (c *client) fillRun(r *region, pg, n int, write bool) (int, int, error) {
	ps := uint64(PageSize)
	n = min(n, len(r.state)-pg)
	if sh := c.share(); sh > 0 {
		n = min(n, max(1, sh/4))
	}
	for k := 1; k < n; k++ {
		if r.state[pg+k]&stResident != 0 {
			n = k
			break
		}
	}
	if c.fillBuf == nil {
		c.fillBuf = make([]byte, maxWindow*PageSize)
	}
	buf := c.fillBuf[:n*PageSize]
	loaded, err := c.load(r, pg, n, buf)
	if err != nil {
		return 0, 0, err
	}
	done, err := c.copyIn(r, pg, n, buf, write)
	if done == 0 && err == unix.EEXIST {
		// Present but not known to us: treat it as written.
		uffd.Wake(c.uffd, r.start+uint64(pg)*ps, ps)
		done = 1
	}
	switch {
	case err == unix.ENOENT:
		return 0, 0, nil
	case err != nil && err != unix.EEXIST:
		return 0, 0, err
	}
	c.markFilled(r, pg, done, write || err == unix.EEXIST)
	r.next = pg + done
	c.p.loaded.Add(uint64(min(loaded, done)))
	return done, loaded, nil
}

// load fills buf with pages [pg, pg+n) of r: pool copies where there are,
// zeros elsewhere. It returns how many came from the pool.
func (c *client) load(r *region, pg, n int, buf []byte) (int, error) {
	loaded := 0
	for k := pg; k < pg+n; {
		w := r.where[k]
		e := k + 1
		for e < pg+n && r.where[e] == w {
			e++
		}
		b := buf[(k-pg)*PageSize : (e-pg)*PageSize]
		if w == noSrc {
			clear(b)
		} else {
			ctx, cancel := c.p.ctx()
			t0 := time.Now()
			err := c.p.cfg.Pool.Load(ctx, r.srcs[w].r, uint64(k)*uint64(PageSize), b)
			c.p.loadNs.Add(uint64(time.Since(t0)))
			cancel()
			if err != nil {
				return 0, fmt.Errorf("%w: load %d pages: %w", errPool, e-k, err)
			}
			loaded += e - k
		}
		k = e
	}
	return loaded, nil
}

// wpFault: a write to a clean (write-protected) page. It becomes dirty.
func (c *client) wpFault(r *region, pg int) error {
	c.p.wpFaults.Add(1)
	ps := uint64(PageSize)
	addr := r.start + uint64(pg)*ps
	if r.state[pg]&stResident == 0 {
		// Evicted since the write trapped: its retry is a MISSING fault.
		uffd.Wake(c.uffd, addr, ps)
		return nil
	}
	r.state[pg] |= stDirty | stRef
	switch err := uffd.WriteProtect(c.uffd, addr, ps, false); err {
	case nil:
		return nil
	case unix.ESRCH:
		return errGone
	case unix.ENOENT:
		uffd.Wake(c.uffd, addr, ps)
		return nil
	default:
		return fmt.Errorf("unprotect %#x: %w", addr, err)
	}
}

// protect write-protects [pg, pg+n) of r so a copy-out sees its last write.
// ENOENT (the block is being freed) reports false: skip it.
func (c *client) protect(r *region, pg, n int) (bool, error) {
	ps := uint64(PageSize)
	switch err := uffd.WriteProtect(c.uffd, r.start+uint64(pg)*ps, uint64(n)*ps, true); err {
	case nil:
		return true, nil
	case unix.ESRCH:
		return false, errGone
	case unix.ENOENT:
		return false, nil
	default:
		return false, fmt.Errorf("write-protect %#x: %w", r.start+uint64(pg)*ps, err)
	}
}

// pageRun is a range of pages of one region.
type pageRun struct {
	r      *region
	pg, n  int
	data   []byte
	stored bool
}

// storeParallel is how many pool stores the pager keeps in flight: scattered
// dirty victims (random access) are single pages, and one at a time each
// would cost a full round trip to two nodes.
const storeParallel = 16

// storeBatch bounds the pages storeRuns copies out at once (16 MiB).
const storeBatch = 4096

// storeRuns write-protects the dirty runs, copies them out of their memfds
// and stores them in their regions' own pool srcs (several at once); the
// pages become clean. Runs of a block being freed (ENOENT) are skipped.
func (c *client) storeRuns(runs []pageRun) error {
	for len(runs) > 0 {
		k, n := 0, 0
		for k < len(runs) && (k == 0 || n+runs[k].n <= storeBatch) {
			n += runs[k].n
			k++
		}
		if err := c.storeBatch(runs[:k]); err != nil {
			return err
		}
		runs = runs[k:]
	}
	return nil
}

func (c *client) storeBatch(runs []pageRun) error {
	t0 := time.Now()
	defer func() { c.p.storeNs.Add(uint64(time.Since(t0))) }()
	total := 0
	for i := range runs {
		ok, err := c.protect(runs[i].r, runs[i].pg, runs[i].n)
		if err != nil {
			return err
		}
		runs[i].stored = ok
		if ok {
			total += runs[i].n
		}
	}
	if total == 0 {
		return nil
	}
	if cap(c.outBuf) < total*PageSize {
		c.outBuf = make([]byte, total*PageSize)
	}
	buf := c.outBuf[:total*PageSize]
	ps := uint64(PageSize)
	for i := range runs {
		if !runs[i].stored {
			continue
		}
		r := &runs[i]
		r.data, buf = buf[:r.n*PageSize], buf[r.n*PageSize:]
		if err := preadFull(r.r.memfd, r.data, int64(uint64(r.pg)*ps)); err != nil {
			return fmt.Errorf("copy out of block %#x: %w", r.r.start, err)
		}
	}
	ctx, cancel := c.p.ctx()
	defer cancel()
	sem := make(chan struct{}, storeParallel)
	errs := make(chan error, len(runs))
	var wg sync.WaitGroup
	for i := range runs {
		r := &runs[i]
		if !r.stored {
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(reg pool.Region) {
			defer func() { <-sem; wg.Done() }()
			if err := c.p.cfg.Pool.Store(ctx, reg, uint64(r.pg)*ps, r.data); err != nil {
				errs <- fmt.Errorf("%w: store %d pages: %w", errPool, r.n, err)
			}
		}(r.r.srcs[r.r.own].r)
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	for i := range runs {
		r := &runs[i]
		if !r.stored {
			continue
		}
		for j := r.pg; j < r.pg+r.n; j++ {
			if r.r.state[j]&stInPool == 0 {
				c.p.pooled.Add(1)
			}
			r.r.state[j] = r.r.state[j]&^(stDirty|stRef) | stInPool
			r.r.where[j] = uint16(r.r.own)
		}
		c.p.stored.Add(uint64(r.n))
		r.data = nil
	}
	if cap(c.outBuf) > 4*maxWindow*PageSize {
		c.outBuf = nil // a fork's burst: do not keep it
	}
	return nil
}

// dirtyRuns appends the runs of dirty pages in [pg, pg+n) of r, at most
// maxWindow pages each.
func dirtyRuns(runs []pageRun, r *region, pg, n int) []pageRun {
	for k := pg; k < pg+n; {
		if r.state[k]&stDirty == 0 {
			k++
			continue
		}
		d := k + 1
		for d < pg+n && d-k < maxWindow && r.state[d]&stDirty != 0 {
			d++
		}
		runs = append(runs, pageRun{r: r, pg: k, n: d - k})
		k = d
	}
	return runs
}

func preadFull(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pread(fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("short read")
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func punch(fd int, off, n uint64) error {
	return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// evict takes n resident pages out of memory. While a block is read or
// written as a stream, the victims are the pages the stream passed most
// recently (behind its last fault, then from the block's end down to what
// lies ahead of it): for a program scanning a block larger than its limit
// over and over, the page just passed is the one needed last, so the rest
// stays resident across passes (evicting in fill order would evict each
// page just before the next pass needs it: every pass would fault on
// everything). Otherwise, and for what the stream cannot supply, victims
// are taken in fill order, with a second chance for pages written since
// they were queued.
func (c *client) evict(n int) error {
	t0 := time.Now()
	defer func() { c.p.evictNs.Add(uint64(time.Since(t0))) }()
	v := c.streamVictims(c.victims[:0], n)
	for len(v) < n && c.fifoHead < len(c.fifo) {
		ref := c.fifo[c.fifoHead]
		c.fifo[c.fifoHead] = pageRef{}
		c.fifoHead++
		r, i := ref.r, int(ref.i)
		switch {
		case r.dead:
		case r.state[i]&stResident == 0 || r.state[i]&stVictim != 0:
			r.state[i] &^= stQueued
		case r.state[i]&stRef != 0:
			r.state[i] &^= stRef
			c.fifo = append(c.fifo, ref)
		default:
			r.state[i] &^= stQueued
			v = append(v, ref)
		}
	}
	if c.fifoHead > 1024 && c.fifoHead > len(c.fifo)/2 {
		c.fifo = append(c.fifo[:0], c.fifo[c.fifoHead:]...)
		c.fifoHead = 0
	}
	sort.Slice(v, func(a, b int) bool {
		if v[a].r != v[b].r {
			return v[a].r.start < v[b].r.start
		}
		return v[a].i < v[b].i
	})
	ps := uint64(PageSize)
	// Victims in runs of consecutive pages; dirty ones go to the pool
	// first, all at once, then every pageRun is punched.
	type vrun struct {
		r     *region
		pg, n int
	}
	var vruns []vrun
	var runs []pageRun
	for a := 0; a < len(v); {
		r := v[a].r
		e := a + 1
		for e < len(v) && v[e].r == r && v[e].i == v[e-1].i+1 {
			e++
		}
		vruns = append(vruns, vrun{r, int(v[a].i), e - a})
		runs = dirtyRuns(runs, r, int(v[a].i), e-a)
		a = e
	}
	if err := c.storeRuns(runs); err != nil {
		return err
	}
	for _, x := range vruns {
		r, pg, cnt := x.r, x.pg, x.n
		if err := punch(r.memfd, uint64(pg)*ps, uint64(cnt)*ps); err != nil {
			return fmt.Errorf("punch block %#x: %w", r.start, err)
		}
		for k := pg; k < pg+cnt; k++ {
			r.state[k] &^= stResident | stDirty | stRef | stVictim
		}
		c.addResident(-cnt)
		c.p.evicted.Add(uint64(cnt))
	}
	c.victims = v[:0]
	return nil
}

// streamVictims appends up to n victims behind the stream of c.sr (marked
// stVictim; they keep their fifo entries, which go stale).
func (c *client) streamVictims(v []pageRef, n int) []pageRef {
	r := c.sr
	if r == nil || r.dead {
		c.sr = nil
		return v
	}
	np := len(r.state)
	ahead := c.srPos + maxWindow // the fill window and the readahead
	if c.raRegion == r {
		ahead = max(ahead, c.raEnd)
	}
	if j := c.raJob; j != nil && j.r == r {
		ahead = max(ahead, j.pg+j.n)
	}
	budget := max(4*n, 8192) // then fill order: bounded work per eviction
	k, wrapped := c.srPos-streamGuard-1, false
	for len(v) < n && budget > 0 {
		if k < 0 {
			if wrapped {
				break
			}
			k, wrapped = np-1, true
		}
		if wrapped && k < ahead {
			break
		}
		if r.state[k]&(stResident|stVictim) == stResident {
			r.state[k] |= stVictim
			v = append(v, pageRef{r, int32(k)})
		}
		k--
		budget--
	}
	return v
}

// discard: madvise(DONTNEED) of [start, start+n): the pages read back as
// zeros; their pool copies are forgotten.
func (c *client) discard(start, n uint64) error {
	ps := uint64(PageSize)
	if start%ps != 0 || start+n < start {
		return fmt.Errorf("bad discard %#x+%#x", start, n)
	}
	end := start + (n+ps-1)&^(ps-1)
	for _, r := range c.regs {
		a, b := max(start, r.start), min(end, r.start+r.len)
		if a >= b {
			continue
		}
		if err := punch(r.memfd, a-r.start, b-a); err != nil {
			return fmt.Errorf("punch block %#x: %w", r.start, err)
		}
		res, pooled := 0, 0
		for k := int((a - r.start) / ps); k < int((b-r.start)/ps); k++ {
			if r.state[k]&stResident != 0 {
				res++
			}
			if r.state[k]&stInPool != 0 {
				pooled++
			}
			r.state[k] &= stQueued
			r.where[k] = noSrc
		}
		c.addResident(-res)
		c.p.pooled.Add(-int64(pooled))
		c.p.discarded.Add((b - a) / ps)
		ctx, cancel := c.p.ctx()
		err := c.p.cfg.Pool.Drop(ctx, r.srcs[r.own].r, a-r.start, b-a)
		cancel()
		if err != nil {
			return fmt.Errorf("%w: drop: %w", errPool, err)
		}
	}
	return nil
}

// compact forgets the srcs no page of r uses any more (each fork adds one
// to the parent's blocks): a program forking for ever keeps a bounded list.
func (c *client) compact(r *region) {
	used := make([]bool, len(r.srcs))
	used[r.own] = true
	for _, w := range r.where {
		if w != noSrc {
			used[w] = true
		}
	}
	remap := make([]uint16, len(r.srcs))
	kept := r.srcs[:0]
	for i, s := range r.srcs {
		if !used[i] {
			s.unref(c.p)
			continue
		}
		remap[i] = uint16(len(kept))
		kept = append(kept, s)
	}
	for i := len(kept); i < len(r.srcs); i++ {
		r.srcs[i] = nil
	}
	r.srcs = kept
	r.own = int(remap[r.own])
	for i, w := range r.where {
		if w != noSrc {
			r.where[i] = remap[w]
		}
	}
}

// snapshot is the memory a forked child starts from: each block's pool
// pages, frozen at the fork.
type snapshot struct {
	parent   uint64 // client id of the parent
	owner    string // the child's pool owner
	reserved uint64 // bytes reserved under owner
	blocks   []*snapBlock
}

type snapBlock struct {
	start, len uint64
	srcs       []*src   // one reference each, given to the child's region
	where      []uint16 // per page
	taken      bool
}

// take hands the child the block registered at start, once.
func (s *snapshot) take(start, n uint64) *snapBlock {
	for _, b := range s.blocks {
		if !b.taken && b.start == start && b.len == n {
			b.taken = true
			return b
		}
	}
	return nil
}

// releaseBlocks drops the references of blocks never taken.
func (s *snapshot) releaseBlocks(p *Pager) {
	for _, b := range s.blocks {
		if !b.taken {
			b.taken = true
			for _, x := range b.srcs {
				x.unref(p)
			}
		}
	}
}

// release undoes a snapshot no child adopted.
func (s *snapshot) release(p *Pager) {
	s.releaseBlocks(p)
	p.cfg.Pool.Release(s.owner, s.reserved)
}

// fork snapshots the blocks before the program forks: dirty resident pages
// are stored (and become clean, write-protected), every block's pool pages
// are frozen for the child, and the parent's later evictions go to new pool
// regions. The reply carries the token the child says hello with.
func (c *client) fork() (unix.Errno, uint64, error) {
	c.p.mu.Lock()
	live := c.snaps[:0] // forget the tokens children adopted
	for _, t := range c.snaps {
		if c.p.snaps[t] != nil {
			live = append(live, t)
		}
	}
	c.snaps = live
	c.p.mu.Unlock()
	if len(c.snaps) >= maxPendingForks {
		// Each holds pager memory (and, with blocks, pool pages)
		// until a child adopts it or this process exits.
		c.p.denied.Add(1)
		c.p.cfg.Logf("pager: pid %d: fork refused: %d forked children have not connected yet", c.pid, len(c.snaps))
		return unix.ENOMEM, 0, nil
	}
	var total uint64
	for _, r := range c.regs {
		if len(r.srcs) >= 256 {
			c.compact(r)
		}
		if len(r.srcs) >= maxSrcs {
			return unix.ENOMEM, 0, nil
		}
		total += r.len
	}
	id := c.p.nextID.Add(1)
	s := &snapshot{parent: c.id, owner: fmt.Sprintf("%s/p%d", c.p.cfg.Owner, id), reserved: total}
	if total > 0 {
		ctx, cancel := c.p.ctx()
		err := c.p.cfg.Pool.Reserve(ctx, s.owner, total)
		cancel()
		if err != nil {
			c.p.denied.Add(1)
			return unix.ENOMEM, 0, nil
		}
	}
	var runs []pageRun
	for _, r := range c.regs {
		runs = dirtyRuns(runs, r, 0, len(r.state))
	}
	if err := c.storeRuns(runs); err != nil {
		s.release(c.p)
		return 0, 0, err
	}
	for _, r := range c.regs {
		b := &snapBlock{start: r.start, len: r.len, srcs: append([]*src(nil), r.srcs...),
			where: append([]uint16(nil), r.where...)}
		for _, x := range b.srcs {
			x.refs.Add(1)
		}
		s.blocks = append(s.blocks, b)
		r.srcs = append(r.srcs, c.p.newSrc(r.len))
		r.own = len(r.srcs) - 1
	}
	c.p.mu.Lock()
	c.p.snaps[id] = s
	c.snaps = append(c.snaps, id)
	c.p.mu.Unlock()
	c.p.forks.Add(1)
	return 0, id, nil
}
