package proxy

import (
	"context"
	"net"
	"sync"
	"time"
)

// Spares keeps a few streams per key (a target node) opened in advance,
// while streams to that key are being taken: the TLS handshake is most of
// the time it takes to open a connection through a service address, and a
// spare leaves only the header's round trip. Spares are made only after a
// Take for the key, and all are dropped after MaxAge without one.
type Spares struct {
	// Dial opens a stream to key; it must return by the time ctx ends.
	Dial        func(ctx context.Context, key string) (net.Conn, error)
	Max         int           // spares per key; default 2
	MaxAge      time.Duration // a spare older than this is not handed out; default 3 s
	DialTimeout time.Duration // default DefaultDialTimeout

	once   sync.Once
	ctx    context.Context
	cancel context.CancelFunc

	mu   sync.Mutex
	sets map[string]*spareSet // guarded by mu
	wg   sync.WaitGroup
}

type spare struct {
	c  net.Conn
	at time.Time
}

type spareSet struct {
	conns []spare       // oldest first; guarded by Spares.mu
	kick  chan struct{} // a spare was taken: make another
}

func (s *Spares) init() {
	s.once.Do(func() {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.sets = map[string]*spareSet{}
		if s.Max <= 0 {
			s.Max = 2
		}
		if s.MaxAge <= 0 {
			s.MaxAge = 3 * time.Second
		}
		if s.DialTimeout <= 0 {
			s.DialTimeout = DefaultDialTimeout
		}
	})
}

// Take returns a spare stream to key younger than MaxAge, or nil, and has
// the key's spares replenished in the background.
func (s *Spares) Take(key string) net.Conn {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return nil
	}
	set := s.sets[key]
	if set == nil {
		set = &spareSet{kick: make(chan struct{}, 1)}
		s.sets[key] = set
		s.wg.Add(1)
		go s.loop(key, set)
		return nil
	}
	var got net.Conn
	for len(set.conns) > 0 && got == nil {
		sp := set.conns[0]
		set.conns = set.conns[1:]
		if time.Since(sp.at) < s.MaxAge {
			got = sp.c
		} else {
			sp.c.Close()
		}
	}
	select {
	case set.kick <- struct{}{}:
	default:
	}
	return got
}

// loop keeps up to Max spares to key while Take is called for it.
func (s *Spares) loop(key string, set *spareSet) {
	defer s.wg.Done()
	idle := time.NewTimer(s.MaxAge)
	defer idle.Stop()
	for {
		for {
			s.mu.Lock()
			n := len(set.conns)
			s.mu.Unlock()
			if n >= s.Max {
				break
			}
			ctx, cancel := context.WithTimeout(s.ctx, s.DialTimeout)
			c, err := s.Dial(ctx, key)
			cancel()
			if err != nil {
				break // the next connection dials for itself, and kicks again
			}
			s.mu.Lock()
			set.conns = append(set.conns, spare{c: c, at: time.Now()})
			s.mu.Unlock()
		}
		select {
		case <-set.kick:
			idle.Reset(s.MaxAge) // Go 1.23 timers: no stale tick to drain
			continue
		case <-idle.C:
		case <-s.ctx.Done():
		}
		s.mu.Lock()
		for _, sp := range set.conns {
			sp.c.Close()
		}
		set.conns = nil
		delete(s.sets, key)
		s.mu.Unlock()
		return
	}
}

// Close drops every spare and waits for the background dials.
func (s *Spares) Close() error {
	s.init()
	s.cancel()
	s.wg.Wait()
	return nil
}
