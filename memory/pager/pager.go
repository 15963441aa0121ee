// Package pager serves the page faults of programs running under the onebox
// LD_PRELOAD shim (memory/shim): the local pager of memory expansion.
//
// A program started with ONEBOX_PAGER_SOCK set connects to the pager's unix
// socket and hands over its userfaultfd; every large block it allocates is a
// memfd registered for MISSING and write-protect faults, and the pager gets
// that memfd too. Each block is reserved in the cluster memory pool
// (pool.Pages) when it is registered: a full pool fails the allocation with
// ENOMEM.
//
// Paging: the pager keeps at most a local limit of each program's block
// pages resident (a program: the processes connected through one socket). A
// fault on a page fills it with UFFDIO_COPY from the pool (or
// zeros for a page never written), write-protected unless the access is a
// write, so the first write raises a WP fault that marks the page dirty.
// Sequential faults grow a prefetch window: one pool Load and one UFFDIO_COPY
// fill up to 1 MiB of following pages. Over the limit, a block read as a
// stream gives up the pages its stream passed most recently (a cyclic scan
// keeps the part that fits resident); otherwise victims are taken in
// fault order with a second chance for pages written since (clock-like);
// dirty ones are write-protected, copied out of the memfd with pread and
// stored in the pool in batches, then every victim's page is punched out of
// the memfd (fallocate PUNCH_HOLE): the next access is a MISSING fault again.
// Clean pages whose copy is in the pool are just punched.
//
// Copy-out reads the memfd with pread rather than through a mapping: a read
// of a hole through a mapping would allocate a zero page in the file, which
// the program would then see in place of its pooled data; pread of a hole
// allocates nothing. The agent process itself never maps or touches a
// program's registered memory, so no goroutine can fault on memory this pager
// must fill (machine-facts.md: that deadlocks the Go runtime).
//
// fork: before the program forks, the shim asks for a snapshot. The pager
// stores the dirty resident pages, write-protects them, and freezes each
// block's pool pages: the parent's later evictions go to a new pool region,
// the child inherits the frozen ones (reference counted) and fills its own
// fresh blocks from them. Neither sees the other's later writes.
// madvise(DONTNEED/REMOVE/FREE): the shim asks the pager to punch the range
// and forget its pool pages, so it reads back as zeros.
//
// If the pager goes away, the shim notices its socket hang up and stops the
// program ("onebox: memory pager gone; stopping to avoid reading wrong data")
// rather than letting it hang or read zero pages. When the pager itself drops
// a program (the pool lost or refused its pages, a protocol error, the agent
// stopping), it first sends a goodbye with the reason, which the shim prints. The program keeps its own
// uffd open, so the kernel never zero-fills behind the pager's back.
package pager

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/memory/pool"
)

// PageSize is the unit of faults and of pool pages.
var PageSize = os.Getpagesize()

// Config configures a Pager.
type Config struct {
	// Pool keeps evicted pages and accounts block reservations. Nil: an
	// unbounded pool.Local in this process.
	Pool pool.Pages
	// Owner prefixes the pool owners of this pager's programs; unique in the
	// cluster (the node's name). Default "local".
	Owner string
	// Timeout bounds each pool operation; a program whose page cannot be
	// fetched or stored in time is stopped. Default 30 s.
	Timeout time.Duration
	// Logf receives one line per dropped program; nil discards.
	Logf func(format string, args ...any)
}

// Stats are the pager's counters since New.
type Stats struct {
	Clients   uint64 // connections that sent their userfaultfd
	Live      uint64 // ... still connected
	Regions   uint64 // blocks registered
	Faults    uint64 // MISSING faults served
	Copies    uint64 // pages filled with UFFDIO_COPY (faults and prefetch)
	Loaded    uint64 // ... of which came from the pool
	Prefetch  uint64 // ... of which were prefetched, not faulted
	Remote    uint64 // faults that loaded from the pool
	WPFaults  uint64 // write-protect faults (a clean page written)
	Evicted   uint64 // pages punched out of memory
	Stored    uint64 // ... of which were dirty and stored in the pool first
	Discarded uint64 // pages discarded by madvise
	Forks     uint64 // fork snapshots
	Denied    uint64 // registrations refused: pool full
	Dropped   uint64 // clients dropped on an error
	Resident  uint64 // pages of blocks resident now
	Pooled    uint64 // pages with a copy in the pool now

	// Where the time goes (nanoseconds, summed over all clients; the
	// benchmark divides them by the counts above).
	FaultLoadNanos uint64 // pool Loads made while a fault waited
	AheadLoadNanos uint64 // pool Loads of readahead chunks (in the background)
	CopyNanos      uint64 // UFFDIO_COPY calls
	EvictNanos     uint64 // evictions, stores included
	StoreNanos     uint64 // ... of which copying dirty victims out and storing them
}

// ErrClosed is returned by Serve after Close or once its listener is closed.
var ErrClosed = errors.New("pager: closed")

// Pager serves page faults for the programs connected to it.
type Pager struct {
	cfg Config

	stopR, stopW *os.File // Close closes stopW: every client's poll wakes
	wg           sync.WaitGroup
	nextID       atomic.Uint64

	clients, live, regions, faults, copies, loaded, prefetch, remote atomic.Uint64
	wpFaults, evicted, stored, discarded, forks, denied, dropped     atomic.Uint64
	resident, pooled                                                 atomic.Int64
	loadNs, aheadNs, copyNs, evictNs, storeNs                        atomic.Uint64

	// memfds is how many block memfds the pager holds open, memfdCap how
	// many it may (half the descriptor limit): programs registering blocks
	// past it get ENOMEM rather than leave the agent without descriptors.
	memfds, memfdCap atomic.Int64
	blockCap         atomic.Int64 // blocks per process: maxBlocks (tests lower it)

	// testStall, when set, is called before each fault is filled (tests).
	testStall func()

	mu        sync.Mutex
	closed    bool                      // guarded by mu
	listeners map[*net.UnixListener]int // guarded by mu
	snaps     map[uint64]*snapshot      // fork snapshots not yet adopted; guarded by mu
}

// New returns a pager.
func New(cfg Config) (*Pager, error) {
	if cfg.Pool == nil {
		cfg.Pool = pool.NewLocal(0)
	}
	if cfg.Owner == "" {
		cfg.Owner = "local"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("pager: stop pipe: %w", err)
	}
	p := &Pager{cfg: cfg, stopR: r, stopW: w, listeners: map[*net.UnixListener]int{},
		snaps: map[uint64]*snapshot{}}
	var rl unix.Rlimit
	fds := int64(1024)
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur < 1<<40 {
		fds = int64(rl.Cur)
	}
	p.memfdCap.Store(max(fds/2, 64))
	p.blockCap.Store(maxBlocks)
	return p, nil
}

// Listen creates the pager socket at path (SOCK_SEQPACKET), mode 0600. Put
// it in a directory only the agent's user can enter (the data directory):
// the mode is set after bind. Serve also refuses peers of another user.
func Listen(path string) (*net.UnixListener, error) {
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("pager: listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("pager: listen %s: %w", path, err)
	}
	return l, nil
}

// Serve accepts programs on l until Close or until l is closed; it returns
// ErrClosed then. The processes connected through l (a program, its forked
// children, the programs it execs) keep at most localMemory bytes of their
// blocks resident together (0: no limit, nothing evicted).
// Processes already connected go on after l is closed, until they exit.
func (p *Pager) Serve(l *net.UnixListener, localMemory uint64) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	p.listeners[l]++
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.listeners, l)
		p.mu.Unlock()
	}()
	limit := int(localMemory / uint64(PageSize))
	if localMemory > 0 && limit < minLimit {
		limit = minLimit
	}
	g := newGroup(limit)
	backoff := 5 * time.Millisecond
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			p.mu.Lock()
			closed := p.closed
			p.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return ErrClosed
			}
			// Running out of descriptors must not end the pager: retry.
			p.cfg.Logf("pager: accept: %v; retrying in %v", err, backoff)
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		// The client loop polls raw descriptors, outside the netpoller.
		f, err := c.File()
		c.Close()
		if err != nil {
			p.cfg.Logf("pager: client descriptor: %v", err)
			continue
		}
		if cred, err := unix.GetsockoptUcred(int(f.Fd()), unix.SOL_SOCKET, unix.SO_PEERCRED); err != nil || int(cred.Uid) != os.Geteuid() {
			p.cfg.Logf("pager: refused a peer of another user (%+v, %v)", cred, err)
			f.Close()
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			f.Close()
			return ErrClosed
		}
		p.wg.Add(1)
		p.mu.Unlock()
		id := p.nextID.Add(1)
		cl := &client{p: p, id: id, owner: fmt.Sprintf("%s/p%d", p.cfg.Owner, id), g: g,
			sockf: f, sock: int(f.Fd()), uffd: -1, wake: -1}
		go func() {
			defer p.wg.Done()
			cl.run()
		}()
	}
}

// Close stops the pager: it closes the listeners, wakes every client loop,
// waits for them to release their userfaultfd, memfds, sockets and pool
// pages, and returns. Programs still running see their socket hang up and
// stop.
func (p *Pager) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	for l := range p.listeners {
		l.Close()
	}
	p.mu.Unlock()
	p.stopW.Close()
	p.wg.Wait()
	p.mu.Lock()
	for tok, s := range p.snaps {
		delete(p.snaps, tok)
		s.release(p)
	}
	p.mu.Unlock()
	return p.stopR.Close()
}

// Stats returns the counters.
func (p *Pager) Stats() Stats {
	return Stats{
		Clients: p.clients.Load(), Live: p.live.Load(), Regions: p.regions.Load(),
		Faults: p.faults.Load(), Copies: p.copies.Load(), Loaded: p.loaded.Load(),
		Prefetch: p.prefetch.Load(), Remote: p.remote.Load(), WPFaults: p.wpFaults.Load(),
		Evicted: p.evicted.Load(), Stored: p.stored.Load(), Discarded: p.discarded.Load(),
		Forks: p.forks.Load(), Denied: p.denied.Load(), Dropped: p.dropped.Load(),
		Resident: uint64(max(p.resident.Load(), 0)), Pooled: uint64(max(p.pooled.Load(), 0)),
		FaultLoadNanos: p.loadNs.Load(), AheadLoadNanos: p.aheadNs.Load(), CopyNanos: p.copyNs.Load(),
		EvictNanos: p.evictNs.Load(), StoreNanos: p.storeNs.Load(),
	}
}

// ctx bounds one pool operation.
func (p *Pager) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), p.cfg.Timeout)
}
