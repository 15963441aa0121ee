package pager

import (
	"encoding/binary"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// group is the processes of one program (the connections of one Serve):
// they share its local limit. Each evicts its own pages (it alone owns its
// userfaultfd and page state); a process over the limit that cannot get the
// group back under by itself pokes the members holding more than their
// share, and they evict down to it.
type group struct {
	limit    int          // pages; 0: no limit
	resident atomic.Int64 // pages resident, all members
	share    atomic.Int64 // limit / members

	mu      sync.Mutex
	members map[*client]bool // guarded by mu
}

func newGroup(limit int) *group {
	g := &group{limit: limit, members: map[*client]bool{}}
	g.share.Store(int64(limit))
	return g
}

func (g *group) join(c *client) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.members[c] = true
	g.share.Store(int64(g.limit / len(g.members)))
}

func (g *group) leave(c *client) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.members, c)
	g.share.Store(int64(g.limit / max(1, len(g.members))))
}

// poke asks every member but c that holds more than share to evict.
func (g *group) poke(c *client, share int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	for m := range g.members {
		if m != c && int(m.res.Load()) > share && m.wake >= 0 {
			unix.Write(m.wake, one[:]) // an eventfd: pokes coalesce
		}
	}
}

// addResident accounts d more resident pages of c.
func (c *client) addResident(d int) {
	c.resident += d
	c.res.Store(int64(c.resident))
	c.g.resident.Add(int64(d))
	c.p.resident.Add(int64(d))
}

// share is this process's part of the program's limit (0: no limit).
func (c *client) share() int {
	if c.g.limit == 0 {
		return 0
	}
	return max(minLimit, int(c.g.share.Load()))
}

// limitResident evicts this process's pages while the program is over its
// limit (with some slack, so eviction runs in batches), down to its share;
// if that is not enough, it pokes the others.
func (c *client) limitResident() error {
	return c.relieve(true)
}

func (c *client) relieve(pokeOthers bool) error {
	g := c.g
	if g.limit == 0 {
		return nil
	}
	total := int(g.resident.Load())
	if total <= g.limit {
		return nil
	}
	share := c.share()
	slack := max(1, min(share/16, maxWindow))
	n := min(total-g.limit+slack, c.resident-share+slack)
	if n > 0 {
		if err := c.evict(n); err != nil {
			return err
		}
	}
	if pokeOthers && int(g.resident.Load()) > g.limit {
		g.poke(c, share)
	}
	return nil
}
