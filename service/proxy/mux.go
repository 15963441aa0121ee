package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/onebox-project/onebox/service/mux"
	"github.com/onebox-project/onebox/service/wire"
)

// Session bounds. A session is one fabric connection between two agents
// carrying every proxied connection between them as a stream (package
// mux): opening a connection through a service address costs the stream
// header's round trip, not a TLS handshake.
const (
	// SessionKeepAlive: a session that received nothing for this long is
	// pinged, and closed after three times this long; a frame not written
	// within SessionWriteTimeout ends it too.
	SessionKeepAlive    = 5 * time.Second
	SessionWriteTimeout = 5 * time.Second
	// probeTimeout bounds the ping that checks a session after a stream on
	// it went unanswered.
	probeTimeout = 2 * time.Second
)

// ErrSessionLost is the failure of a stream whose session ended under it.
var ErrSessionLost = mux.ErrSessionClosed

var muxConfig = mux.Config{KeepAlive: SessionKeepAlive, WriteTimeout: SessionWriteTimeout}

// Sessions opens streams to the agents of target nodes over one
// long-lived session per node (the client side of wire version 2). A
// session is dialed when a stream to its node is first wanted, one dial
// at a time per node (callers meanwhile wait for it, each within its own
// context), and again after it ended; a session whose stream went
// unanswered is pinged, and closed if the ping fails too, so the next
// stream redials instead of waiting on a dead connection.
type Sessions struct {
	// Dial opens a fabric connection to key's agent that negotiated the
	// service protocol (and proved it is key). It must return by the time
	// ctx ends.
	Dial        func(ctx context.Context, key string) (net.Conn, error)
	DialTimeout time.Duration // a session dial with its request; default DefaultDialTimeout
	Log         *slog.Logger

	once   sync.Once
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	sess   map[string]*session // guarded by mu
	dials  atomic.Int64
}

// session is one node's session, or the dial that is making it.
type session struct {
	ready   chan struct{} // closed when the dial ended
	s       *mux.Session
	err     error
	probing atomic.Bool
}

func (s *Sessions) init() {
	s.once.Do(func() {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.sess = map[string]*session{}
		if s.DialTimeout <= 0 {
			s.DialTimeout = DefaultDialTimeout
		}
		if s.Log == nil {
			s.Log = slog.Default()
		}
	})
}

// Dials reports how many sessions were dialed (successfully or not).
func (s *Sessions) Dials() int64 { return s.dials.Load() }

// get returns key's live session, dialing it if there is none.
func (s *Sessions) get(ctx context.Context, key string) (*session, error) {
	s.init()
	for {
		s.mu.Lock()
		if s.ctx.Err() != nil {
			s.mu.Unlock()
			return nil, net.ErrClosed
		}
		m := s.sess[key]
		if m == nil {
			m = &session{ready: make(chan struct{})}
			s.sess[key] = m
			go s.connect(key, m)
		}
		s.mu.Unlock()
		select {
		case <-m.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if m.err != nil {
			return nil, m.err
		}
		if !m.s.IsClosed() {
			return m, nil
		}
		s.forget(key, m)
	}
}

// connect dials key's session for every caller waiting on m.
func (s *Sessions) connect(key string, m *session) {
	defer close(m.ready)
	s.dials.Add(1)
	ctx, cancel := context.WithTimeout(s.ctx, s.DialTimeout)
	defer cancel()
	m.s, m.err = s.dial(ctx, key)
	if m.err != nil {
		s.forget(key, m)
		return
	}
	s.mu.Lock()
	closed := s.ctx.Err() != nil
	s.mu.Unlock()
	if closed {
		m.s.Close()
		m.err = net.ErrClosed
		return
	}
	go func() {
		<-m.s.CloseChan()
		if s.ctx.Err() == nil {
			s.Log.Info("service session ended", "node", key, "err", m.s.Err())
		}
		s.forget(key, m)
	}()
}

func (s *Sessions) dial(ctx context.Context, key string) (*mux.Session, error) {
	c, err := s.Dial(ctx, key)
	if err != nil {
		return nil, err
	}
	if err := Open(ctx, c, wire.Request{Kind: wire.KindSession}); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s's agent: opening a service session: %w", key, err)
	}
	return mux.Client(c, muxConfig), nil
}

// forget removes m as key's session (if it still is) and closes it.
func (s *Sessions) forget(key string, m *session) {
	s.mu.Lock()
	if s.sess[key] == m {
		delete(s.sess, key)
	}
	s.mu.Unlock()
	if m.s != nil {
		m.s.Close()
	}
}

// Open opens a stream to key's agent and sends req on it, all before ctx
// ends. On nil error the stream carries the port's bytes (KindConnect) or
// may be closed (KindCheck). A session found dead as the stream is opened,
// or that ends before the request is answered, is replaced once.
func (s *Sessions) Open(ctx context.Context, key string, req wire.Request) (net.Conn, error) {
	for attempt := 0; ; attempt++ {
		m, err := s.get(ctx, key)
		if err != nil {
			return nil, err
		}
		st, err := m.s.OpenStream()
		if err != nil {
			if m.s.IsClosed() && attempt == 0 && ctx.Err() == nil {
				s.forget(key, m)
				continue
			}
			return nil, fmt.Errorf("%s's agent: %w", key, err)
		}
		if err := Open(ctx, st, req); err != nil {
			st.Reset()
			var re *wire.ReplyError
			if !errors.As(err, &re) {
				lost := m.s.IsClosed() || errors.Is(err, mux.ErrSessionClosed)
				if lost && attempt == 0 && ctx.Err() == nil {
					// The session ended under the request (its peer
					// restarted, or it was cut, and this side had not
					// read that yet): no byte of the connection was
					// sent, so it goes on a new session, and the
					// target is not marked down for a dead session.
					s.forget(key, m)
					continue
				}
				if lost {
					err = ErrSessionLost
				} else if ctx.Err() != nil {
					s.probe(key, m)
				}
				err = fmt.Errorf("%s's agent: %w", key, err)
			}
			return nil, err
		}
		return st, nil
	}
}

// probe pings m in the background (one ping at a time) and drops it if
// the ping is not answered.
func (s *Sessions) probe(key string, m *session) {
	if !m.probing.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer m.probing.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
		err := m.s.Ping(ctx)
		cancel()
		if err != nil {
			s.Log.Info("service session unanswered; closing it", "node", key, "err", err)
			s.forget(key, m)
		}
	}()
}

// Keys lists the nodes with a session (or a session dial in flight).
func (s *Sessions) Keys() []string {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.sess))
	for k := range s.sess {
		keys = append(keys, k)
	}
	return keys
}

// Drop closes key's session: its streams fail, the next Open redials.
func (s *Sessions) Drop(key string) {
	s.init()
	s.mu.Lock()
	m := s.sess[key]
	delete(s.sess, key)
	s.mu.Unlock()
	if m != nil {
		go func() {
			<-m.ready
			if m.s != nil {
				m.s.Close()
			}
		}()
	}
}

// Close closes every session (their streams fail) and refuses new ones.
func (s *Sessions) Close() error {
	s.init()
	s.mu.Lock()
	s.cancel()
	all := s.sess
	s.sess = map[string]*session{}
	s.mu.Unlock()
	for _, m := range all {
		<-m.ready // bounded by DialTimeout; cancelled by s.cancel
		if m.s != nil {
			m.s.Close()
		}
	}
	return nil
}

// serveSession serves the streams of one session on c (after its
// request was answered) until the session ends.
func (b *Backend) serveSession(c net.Conn, peer string) {
	ys := mux.Server(c, muxConfig)
	if !b.trackSession(ys, peer) {
		ys.Close()
		return
	}
	defer b.untrackSession(ys)
	for {
		st, err := ys.AcceptStream()
		if err != nil {
			if errors.Is(err, mux.ErrProtocol) && b.Log != nil {
				b.Log.Warn("service session from a peer broke the protocol", "peer", peer, "err", err)
			}
			return
		}
		b.wg.Add(1) // the caller holds one: Close's Wait cannot have passed zero
		go func() {
			defer b.wg.Done()
			b.serveStream(st)
		}()
	}
}
