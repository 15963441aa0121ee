// Package pool defines the cluster memory pool as the pager sees it: pages
// of programs' large blocks kept in other nodes' donated RAM, in several
// copies. The fabric implementation (replicated, over the page protocol)
// and the pager's eviction both work against Pages; Local is an in-process
// implementation for tests and for a one-node cluster.
package pool

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// PageSize is the unit of the pool.
const PageSize = 4096

// ErrFull is returned by Reserve when the pool cannot hold an allocation:
// the program's allocation fails with ENOMEM.
var ErrFull = errors.New("pool: the cluster memory pool is full")

// Region names one block of one program. Owner is unique in the cluster
// (the program's node and id); ID tells the owner's blocks apart.
type Region struct {
	Owner string
	ID    uint64
}

// Pages is the pool.
type Pages interface {
	// Reserve accounts n more bytes of pool capacity to owner, or fails
	// with ErrFull (wrapped) when the pool cannot hold them.
	Reserve(ctx context.Context, owner string, n uint64) error
	// Release gives back n bytes reserved by owner.
	Release(owner string, n uint64)
	// Store keeps data (a whole number of pages) at offset off of r. It
	// returns once the pages are held in as many copies as configured, or
	// in fewer (at least one) when fewer live nodes can take them: the
	// pool then restores the others in the background.
	Store(ctx context.Context, r Region, off uint64, data []byte) error
	// Load fills data (a whole number of pages) from offset off of r;
	// pages never stored read as zeros.
	Load(ctx context.Context, r Region, off uint64, data []byte) error
	// Drop forgets n bytes of r from off (munmap, MADV_DONTNEED): they
	// read as zeros afterwards.
	Drop(ctx context.Context, r Region, off, n uint64) error
	// DropOwner forgets every page and reservation of owner.
	DropOwner(ctx context.Context, owner string) error
}

// Local is Pages in this process's memory, with a capacity in bytes
// (0: unbounded). Safe for concurrent use.
type Local struct {
	mu       sync.Mutex
	capacity uint64
	reserved map[string]uint64            // guarded by mu
	pages    map[Region]map[uint64][]byte // guarded by mu
}

// NewLocal returns an empty Local pool of the given capacity.
func NewLocal(capacity uint64) *Local {
	return &Local{capacity: capacity, reserved: map[string]uint64{}, pages: map[Region]map[uint64][]byte{}}
}

func checkPages(off uint64, n int) error {
	if off%PageSize != 0 || n%PageSize != 0 {
		return fmt.Errorf("pool: offset %d or length %d is not a whole number of pages", off, n)
	}
	return nil
}

// Reserve implements Pages.
func (l *Local) Reserve(_ context.Context, owner string, n uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var total uint64
	for _, v := range l.reserved {
		total += v
	}
	if l.capacity > 0 && total+n > l.capacity {
		return fmt.Errorf("%w: %d bytes asked, %d of %d free", ErrFull, n, l.capacity-total, l.capacity)
	}
	l.reserved[owner] += n
	return nil
}

// Release implements Pages.
func (l *Local) Release(owner string, n uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.reserved[owner] <= n {
		delete(l.reserved, owner)
		return
	}
	l.reserved[owner] -= n
}

// Store implements Pages.
func (l *Local) Store(_ context.Context, r Region, off uint64, data []byte) error {
	if err := checkPages(off, len(data)); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.pages[r]
	if m == nil {
		m = map[uint64][]byte{}
		l.pages[r] = m
	}
	for i := 0; i < len(data); i += PageSize {
		m[off+uint64(i)] = append([]byte(nil), data[i:i+PageSize]...)
	}
	return nil
}

// Load implements Pages.
func (l *Local) Load(_ context.Context, r Region, off uint64, data []byte) error {
	if err := checkPages(off, len(data)); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.pages[r]
	for i := 0; i < len(data); i += PageSize {
		if p, ok := m[off+uint64(i)]; ok {
			copy(data[i:i+PageSize], p)
		} else {
			clear(data[i : i+PageSize])
		}
	}
	return nil
}

// Drop implements Pages.
func (l *Local) Drop(_ context.Context, r Region, off, n uint64) error {
	if err := checkPages(off, int(n)); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.pages[r]
	for p := off; p < off+n; p += PageSize {
		delete(m, p)
	}
	return nil
}

// DropOwner implements Pages.
func (l *Local) DropOwner(_ context.Context, owner string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.reserved, owner)
	for r := range l.pages {
		if r.Owner == owner {
			delete(l.pages, r)
		}
	}
	return nil
}

// Stored returns how many pages the pool holds (tests, metrics).
func (l *Local) Stored() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, m := range l.pages {
		n += len(m)
	}
	return n
}
