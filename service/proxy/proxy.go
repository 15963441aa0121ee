// Package proxy carries the connections of an exposed service. Frontend
// accepts clients on the exposing node's port and, for each, asks a
// balance.Pool for a target and dials it (trying the next target when a
// dial fails, every dial bounded); Sessions opens those dials as streams
// of one long-lived session (package mux) per target node; Backend, on the
// target's node, serves a session's streams: reads each stream's wire
// header, connects to the local port and splices the two. None knows
// about TLS or membership: the agent supplies the fabric dialer and the
// local connector.
package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/onebox-project/onebox/service/balance"
	"github.com/onebox-project/onebox/service/mux"
	"github.com/onebox-project/onebox/service/wire"
)

// Defaults of the bounds.
const (
	DefaultDialTimeout   = 3 * time.Second // one target: connect, handshake, header and reply
	DefaultHeaderTimeout = 5 * time.Second // backend: a client's header must arrive within this
	DefaultLocalTimeout  = 2 * time.Second // backend: connect to the local port
	// DefaultHedgeAfter: a dial to a target on a LAN answers in
	// milliseconds; one silent for this long is probably not coming.
	DefaultHedgeAfter = 500 * time.Millisecond
	// DefaultMaxConns bounds one service address's connections (each
	// holds two descriptors on the exposing node and two on the target's).
	DefaultMaxConns = 4096
)

// Busy is the key OnDone reports for a client refused because the
// frontend already handles MaxConns connections.
const Busy = "(busy)"

// ErrNoTarget is the failure of a client connection for which every
// target was tried and none answered.
var ErrNoTarget = errors.New("proxy: no target accepted the connection")

// Splice copies a→b and b→a until both directions end, then closes both.
// When one direction ends cleanly its destination's write side is shut
// (half-close), so request/response protocols that signal the end of a
// request by closing work; when it ends with an error both connections are
// aborted at once (a TCP connection with a reset, a stream with its RST),
// so the other direction cannot block forever and neither end mistakes
// the failure for a clean end of data.
func Splice(a, b net.Conn) (ab, ba int64) {
	var wg sync.WaitGroup
	var once sync.Once
	closeBoth := func() { once.Do(func() { a.Close(); b.Close() }) }
	abortBoth := func() { once.Do(func() { abort(a); abort(b) }) }
	half := func(dst, src net.Conn, n *int64) {
		defer wg.Done()
		var err error
		*n, err = io.Copy(dst, src)
		if d, ok := src.(deliverer); ok {
			*n += d.Delivered()
		}
		if err != nil {
			abortBoth()
			return
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			if cw.CloseWrite() != nil {
				// The end of data could not be passed on (the stream was
				// reset, its session ended, the socket broke): a failure,
				// which must not reach the other side as a clean close.
				abortBoth()
			}
			return
		}
		closeBoth()
	}
	if d, ok := a.(deliverer); ok {
		d.DeliverTo(b)
	}
	if d, ok := b.(deliverer); ok {
		d.DeliverTo(a)
	}
	wg.Add(2)
	go half(b, a, &ab)
	half(a, b, &ba)
	wg.Wait()
	closeBoth()
	return ab, ba
}

// deliverer is a connection (mux.Stream) that can write what it receives
// straight to the connection it is spliced to, from the goroutine that
// receives it, instead of handing it to the copying goroutine.
type deliverer interface {
	DeliverTo(net.Conn)
	Delivered() int64
}

// abort closes c so that its peer sees a failure, not an end of data.
func abort(c net.Conn) {
	switch c := c.(type) {
	case *net.TCPConn:
		c.SetLinger(0)
		c.Close()
	case interface{ Reset() error }:
		c.Reset()
	default:
		c.Close()
	}
}

// Dialer connects to a target by its pool key; the returned connection
// carries the target port's bytes. It must return by the time ctx ends.
type Dialer func(ctx context.Context, key string) (net.Conn, error)

// Frontend serves one service address.
type Frontend struct {
	Pool        *balance.Pool
	Dial        Dialer
	DialTimeout time.Duration // per target tried; default DefaultDialTimeout
	// HedgeAfter is how long a dial may go unanswered before the next
	// target is dialed as well; default DefaultHedgeAfter.
	HedgeAfter time.Duration
	// MaxConns bounds the client connections handled at once; one more is
	// closed at once (and reported to OnDone with key "busy"). Default
	// DefaultMaxConns.
	MaxConns int
	Log      *slog.Logger
	// OnDial, if set, hears of every dial (err nil: the connection is
	// carried to key).
	OnDial func(key string, err error)
	// OnDone, if set, hears of every client connection that ended, with
	// the target that carried it ("" if none could, Busy if it was refused
	// for MaxConns) and the bytes client→target and target→client.
	OnDone func(key string, in, out int64)

	once   sync.Once
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	ln      net.Listener          // guarded by mu
	conns   map[net.Conn]struct{} // client and target connections; guarded by mu
	clients int                   // client connections handled; guarded by mu
	closed  bool                  // guarded by mu
	wg      sync.WaitGroup
}

func (f *Frontend) init() {
	f.once.Do(func() {
		f.ctx, f.cancel = context.WithCancel(context.Background())
		f.conns = map[net.Conn]struct{}{}
		if f.DialTimeout <= 0 {
			f.DialTimeout = DefaultDialTimeout
		}
		if f.HedgeAfter <= 0 {
			f.HedgeAfter = DefaultHedgeAfter
		}
		if f.MaxConns <= 0 {
			f.MaxConns = DefaultMaxConns
		}
		if f.Log == nil {
			f.Log = slog.Default()
		}
	})
}

// Serve accepts clients on ln until ln is closed or Close is called.
func (f *Frontend) Serve(ln net.Listener) error {
	f.init()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	f.ln = ln
	f.mu.Unlock()
	backoff := 5 * time.Millisecond
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || f.ctx.Err() != nil {
				return nil
			}
			// Out of descriptors and the like: wait, never spin or quit.
			f.Log.Warn("service accept failed; retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-f.ctx.Done():
				return nil
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		switch f.track(c) {
		case trackClosed:
			return nil
		case trackBusy:
			continue
		}
		go f.handle(c)
	}
}

const (
	trackOK     = iota
	trackBusy   // refused: MaxConns reached (accepting goes on: connections end and make room)
	trackClosed // the frontend is closed
)

// track registers a client connection, or closes it.
func (f *Frontend) track(c net.Conn) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		c.Close()
		return trackClosed
	}
	if f.clients >= f.MaxConns {
		c.Close()
		if f.OnDone != nil {
			go f.OnDone(Busy, 0, 0)
		}
		return trackBusy
	}
	f.clients++
	f.conns[c] = struct{}{}
	f.wg.Add(1)
	return trackOK
}

func (f *Frontend) untrack(c net.Conn) {
	c.Close()
	f.mu.Lock()
	delete(f.conns, c)
	f.clients--
	f.mu.Unlock()
	f.wg.Done()
}

// handle finds a target for client c and carries the connection.
func (f *Frontend) handle(c net.Conn) {
	defer f.untrack(c)
	key, up, err := f.connect()
	if err != nil {
		if f.ctx.Err() == nil {
			f.Log.Debug("service connection dropped", "client", c.RemoteAddr().String(), "err", err)
		}
		if f.OnDone != nil {
			f.OnDone("", 0, 0)
		}
		return
	}
	f.mu.Lock()
	closed := f.closed
	if !closed {
		f.conns[up] = struct{}{}
	}
	f.mu.Unlock()
	if closed {
		up.Close()
		f.Pool.Release(key)
		return
	}
	in, out := Splice(c, up)
	f.mu.Lock()
	delete(f.conns, up)
	f.mu.Unlock()
	f.Pool.Release(key)
	if f.OnDone != nil {
		f.OnDone(key, in, out)
	}
}

// connect tries targets until one accepts, each at most once. A dial
// that has not finished after HedgeAfter gets company: the next target is
// dialed too and the first to connect carries the connection (the other,
// if it connects, is closed). So a target whose node stopped answering
// (packets dropped, not refused) delays a client by HedgeAfter, not by
// the whole DialTimeout.
func (f *Frontend) connect() (string, net.Conn, error) {
	type result struct {
		key string
		c   net.Conn
		err error
	}
	tried := map[string]bool{}
	results := make(chan result, 8)
	pending := 0
	start := func() bool {
		key, ok := f.Pool.Pick(func(k string) bool { return tried[k] })
		if !ok {
			return false
		}
		tried[key] = true
		pending++
		go func() {
			ctx, cancel := context.WithTimeout(f.ctx, f.DialTimeout)
			c, err := f.Dial(ctx, key)
			cancel()
			results <- result{key, c, err}
		}()
		return true
	}
	// discard handles the results still to come once the connection is
	// settled: dials that failed count against their target, those that
	// connected are closed unused.
	discard := func(n int) {
		for range n {
			r := <-results
			if r.err == nil {
				r.c.Close()
				f.Pool.Release(r.key)
			} else if f.ctx.Err() == nil {
				f.Pool.Dialed(r.key, r.err)
				if f.OnDial != nil {
					f.OnDial(r.key, r.err)
				}
			} else {
				f.Pool.Release(r.key)
			}
		}
	}
	var errs []error
	if !start() {
		return "", nil, ErrNoTarget
	}
	hedge := time.NewTimer(f.HedgeAfter)
	defer hedge.Stop()
	for {
		select {
		case r := <-results:
			pending--
			if f.ctx.Err() != nil {
				// Shutting down: not the target's fault.
				if r.c != nil {
					r.c.Close()
				}
				f.Pool.Release(r.key)
				go discard(pending)
				return "", nil, net.ErrClosed
			}
			f.Pool.Dialed(r.key, r.err)
			if f.OnDial != nil {
				f.OnDial(r.key, r.err)
			}
			if r.err == nil {
				go discard(pending)
				return r.key, r.c, nil
			}
			f.Log.Info("service target failed; trying another", "target", r.key, "err", r.err)
			errs = append(errs, r.err)
			if !start() && pending == 0 {
				return "", nil, errors.Join(append([]error{ErrNoTarget}, errs...)...)
			}
			hedge.Reset(f.HedgeAfter)
		case <-hedge.C:
			start()
			hedge.Reset(f.HedgeAfter)
		}
	}
}

// Close stops accepting, closes every connection and waits for the
// handlers to end (they end promptly once their sockets are closed).
func (f *Frontend) Close() error {
	f.init()
	f.mu.Lock()
	f.closed = true
	f.cancel()
	if f.ln != nil {
		f.ln.Close()
	}
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
	return nil
}

// Open sends req on c, a connection that negotiated the service protocol
// with a target's agent, and reads the reply, all before ctx's deadline.
// On nil error c carries the port's bytes (KindConnect) or may be closed
// (KindCheck).
func Open(ctx context.Context, c net.Conn, req wire.Request) error {
	b, err := wire.AppendRequest(nil, req)
	if err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.Write(b); err != nil {
		return err
	}
	rep, err := wire.ReadReply(c)
	if err != nil {
		return err
	}
	if !stop() {
		return ctx.Err()
	}
	c.SetDeadline(time.Time{})
	return rep.Err()
}

// Backend serves the target side of the service protocol.
type Backend struct {
	// Local connects to the port a request names, on this node only; a
	// non-OK reply says why it did not.
	Local         func(ctx context.Context, req wire.Request) (net.Conn, wire.Reply)
	HeaderTimeout time.Duration // default DefaultHeaderTimeout
	LocalTimeout  time.Duration // default DefaultLocalTimeout
	Log           *slog.Logger
	// OnServe, if set, hears of every request served and its status.
	OnServe func(kind wire.Kind, st wire.Status)
	// OnDone, if set, hears of every carried connection that ended, with
	// the bytes fabric→port and port→fabric.
	OnDone func(in, out int64)

	mu       sync.Mutex
	conns    map[net.Conn]struct{}   // streams and local connections; guarded by mu
	sessions map[*mux.Session]string // session → peer node; guarded by mu
	closed   bool                    // guarded by mu
	wg       sync.WaitGroup
}

func (b *Backend) track(c net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	if b.conns == nil {
		b.conns = map[net.Conn]struct{}{}
	}
	b.conns[c] = struct{}{}
	return true
}

func (b *Backend) untrack(c net.Conn) {
	c.Close()
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
}

// ServeConn serves one fabric connection (it owns and closes c): its
// first request must open a session (wire version 2), whose streams are
// then served until it ends. peer names the node at the other end (from
// its certificate); DropPeer closes its sessions.
func (b *Backend) ServeConn(c net.Conn, peer string) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Write(wire.AppendReply(nil, wire.Reply{Status: wire.StatusUnavail, Message: "the agent is shutting down"}))
		c.Close()
		return
	}
	b.wg.Add(1)
	b.mu.Unlock()
	defer b.wg.Done()
	c.SetDeadline(time.Now().Add(b.headerTimeout()))
	req, err := wire.ReadRequest(c)
	if err != nil {
		b.reply(c, 0, wire.Reply{Status: wire.StatusBad, Message: err.Error()})
		c.Close()
		return
	}
	if req.Kind != wire.KindSession {
		b.reply(c, req.Kind, wire.Reply{Status: wire.StatusBad, Message: "a service connection starts with a session request"})
		c.Close()
		return
	}
	if !b.reply(c, req.Kind, wire.Reply{}) {
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	b.serveSession(c, peer)
}

func (b *Backend) headerTimeout() time.Duration {
	if b.HeaderTimeout > 0 {
		return b.HeaderTimeout
	}
	return DefaultHeaderTimeout
}

// serveStream serves one stream of a session: a request, and for a
// connect the port's bytes.
func (b *Backend) serveStream(c net.Conn) {
	if !b.track(c) {
		c.Close()
		return
	}
	defer b.untrack(c)
	lt := b.LocalTimeout
	if lt <= 0 {
		lt = DefaultLocalTimeout
	}
	c.SetDeadline(time.Now().Add(b.headerTimeout()))
	req, err := wire.ReadRequest(c)
	if err != nil {
		b.reply(c, 0, wire.Reply{Status: wire.StatusBad, Message: err.Error()})
		return
	}
	if req.Kind == wire.KindSession {
		b.reply(c, req.Kind, wire.Reply{Status: wire.StatusBad, Message: "a session inside a session"})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), lt)
	local, rep := b.Local(ctx, req)
	cancel()
	if rep.Status != wire.StatusOK {
		if local != nil {
			local.Close()
		}
		b.reply(c, req.Kind, rep)
		return
	}
	if req.Kind == wire.KindCheck {
		local.Close()
		b.reply(c, req.Kind, rep)
		return
	}
	if !b.track(local) {
		local.Close()
		return
	}
	defer b.untrack(local)
	if !b.reply(c, req.Kind, rep) {
		return
	}
	c.SetDeadline(time.Time{})
	in, out := Splice(c, local)
	if b.OnDone != nil {
		b.OnDone(in, out)
	}
}

func (b *Backend) trackSession(s *mux.Session, peer string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	if b.sessions == nil {
		b.sessions = map[*mux.Session]string{}
	}
	b.sessions[s] = peer
	return true
}

func (b *Backend) untrackSession(s *mux.Session) {
	s.Close()
	b.mu.Lock()
	delete(b.sessions, s)
	b.mu.Unlock()
}

// Peers lists the nodes with a session to this backend.
func (b *Backend) Peers() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, p := range b.sessions {
		out = append(out, p)
	}
	return out
}

// DropPeer closes the sessions of node peer (a member that left): their
// streams end.
func (b *Backend) DropPeer(peer string) {
	b.mu.Lock()
	var drop []*mux.Session
	for s, p := range b.sessions {
		if p == peer {
			drop = append(drop, s)
		}
	}
	b.mu.Unlock()
	for _, s := range drop {
		s.Close()
	}
}

func (b *Backend) reply(c net.Conn, kind wire.Kind, rep wire.Reply) bool {
	if b.OnServe != nil {
		b.OnServe(kind, rep.Status)
	}
	_, err := c.Write(wire.AppendReply(nil, rep))
	return err == nil
}

// Close ends every session and connection being served and waits for
// the handlers.
func (b *Backend) Close() error {
	b.mu.Lock()
	b.closed = true
	for c := range b.conns {
		c.Close()
	}
	sessions := b.sessions
	b.sessions = nil
	b.mu.Unlock()
	for s := range sessions {
		s.Close()
	}
	b.wg.Wait()
	return nil
}
