// Package pager serves the page faults of programs running under the onebox
// LD_PRELOAD shim (memory/shim): the local pager core of memory expansion.
//
// A program started with ONEBOX_PAGER_SOCK set connects to the pager's unix
// socket and hands over its userfaultfd; every large block it allocates is a
// memfd registered for MISSING faults, and the pager gets that memfd too (an
// alias mapping, for copy-out in a later slice). The pager fills each first
// touch of a page with UFFDIO_COPY from a Store, or UFFDIO_ZEROPAGE when the
// store has no such page.
//
// The pager must run in another process than the programs it serves (the
// agent): a Go process must never fault on memory its own goroutines have to
// fill (see machine-facts.md). There is no cluster pool yet: pages come from
// the Store given to New, and nothing is evicted.
//
// If the pager goes away, the shim notices its socket hang up and stops the
// program ("onebox: memory pager gone; stopping to avoid reading wrong data")
// rather than letting it hang or read zero pages. The program keeps its own
// uffd open, so the kernel never zero-fills behind the pager's back.
//
// Not handled yet, and needed before pages are evicted: fork (no
// UFFD_FEATURE_EVENT_FORK: the child's copy of a block is unregistered and
// shared with the parent, not copy-on-write), mremap and madvise(DONTNEED)
// of a block, a restarted agent taking a program back (it is stopped
// instead), and programs that close every descriptor (the watchdog sees its
// socket go and stops them).
package pager

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// RegionID names one registered block: the client connection and the block's
// start address in the program.
type RegionID struct {
	Client uint64
	Start  uint64
}

// Store holds pages that must be put back when a program touches them again.
// Get returns the page at offset (a multiple of the page size) of region, of
// exactly PageSize bytes, or false when the page was never stored: it is then
// zero-filled, which is what a fresh allocation holds.
type Store interface {
	Get(region RegionID, offset uint64) ([]byte, bool)
}

// Forgetter is implemented by stores that drop a region's pages when the
// program frees the block.
type Forgetter interface {
	Forget(region RegionID)
}

// PageSize is the unit of faults and of Store pages.
var PageSize = os.Getpagesize()

// Stats are the pager's counters since New.
type Stats struct {
	Clients uint64 // connections that sent their userfaultfd
	Regions uint64 // blocks registered
	Faults  uint64 // page faults served
	Copies  uint64 // ... of which from the Store (UFFDIO_COPY)
	Zeroed  uint64 // ... of which zero-filled (UFFDIO_ZEROPAGE)
	Dropped uint64 // clients dropped on an error
}

// ErrClosed is returned by Serve after Close.
var ErrClosed = errors.New("pager: closed")

// Pager serves page faults for the programs connected to it.
type Pager struct {
	store Store
	logf  func(format string, args ...any)

	stopR, stopW *os.File // Close closes stopW: every client's poll wakes
	wg           sync.WaitGroup
	nextID       atomic.Uint64

	clients, regions, faults, copies, zeroed, dropped atomic.Uint64

	mu       sync.Mutex
	closed   bool              // guarded by mu
	listener *net.UnixListener // guarded by mu
}

// New returns a pager that fills faults from store (nil: zero pages only).
// logf receives one line per dropped client; nil discards.
func New(store Store, logf func(format string, args ...any)) (*Pager, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("pager: stop pipe: %w", err)
	}
	return &Pager{store: store, logf: logf, stopR: r, stopW: w}, nil
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

// Serve accepts programs on l until Close; it returns ErrClosed then.
func (p *Pager) Serve(l *net.UnixListener) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	p.listener = l
	p.mu.Unlock()
	backoff := 5 * time.Millisecond
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			p.mu.Lock()
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return ErrClosed
			}
			// Running out of descriptors must not end the pager: retry.
			p.logf("pager: accept: %v; retrying in %v", err, backoff)
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		// The client loop polls raw descriptors, outside the netpoller.
		f, err := c.File()
		c.Close()
		if err != nil {
			p.logf("pager: client descriptor: %v", err)
			continue
		}
		if cred, err := unix.GetsockoptUcred(int(f.Fd()), unix.SOL_SOCKET, unix.SO_PEERCRED); err != nil || int(cred.Uid) != os.Geteuid() {
			p.logf("pager: refused a peer of another user (%+v, %v)", cred, err)
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
		cl := &client{p: p, id: p.nextID.Add(1), sockf: f, sock: int(f.Fd()), uffd: -1}
		go func() {
			defer p.wg.Done()
			cl.run()
		}()
	}
}

// Close stops the pager: it closes the listener, wakes every client loop,
// waits for them to release their userfaultfd, memfds and sockets, and
// returns. Programs still running see their socket hang up and stop.
func (p *Pager) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	l := p.listener
	p.mu.Unlock()
	if l != nil {
		l.Close()
	}
	p.stopW.Close()
	p.wg.Wait()
	return p.stopR.Close()
}

// Stats returns the counters.
func (p *Pager) Stats() Stats {
	return Stats{
		Clients: p.clients.Load(), Regions: p.regions.Load(), Faults: p.faults.Load(),
		Copies: p.copies.Load(), Zeroed: p.zeroed.Load(),
		Dropped: p.dropped.Load(),
	}
}
