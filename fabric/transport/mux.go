// Package transport serves the agent's fabric port: one TCP port, TLS 1.3
// only, on which each connection is routed by the protocol it negotiated
// with ALPN. The join protocol is served to clients without a certificate;
// every other protocol (the control API today, the page and process data
// paths later) is reached only after the client proved cluster membership
// with a CA-signed certificate during the handshake.
package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"
)

// HandshakeTimeout bounds how long a connection may take to finish the TLS
// handshake; a peer that sends nothing, or garbage, is dropped after it.
const HandshakeTimeout = 5 * time.Second

// MaxPending bounds connections in the handshake phase, so a flood of
// half-open connections cannot exhaust the agent.
const MaxPending = 256

// Mux routes TLS connections by negotiated protocol.
type Mux struct {
	ln     net.Listener
	cfg    *tls.Config
	log    *slog.Logger
	onFail func(reason string)

	mu       sync.Mutex
	handlers map[string]func(net.Conn) // guarded by mu
	closed   bool                      // guarded by mu
	lastWarn time.Time                 // guarded by mu
	pending  map[netip.Addr]int        // handshakes in progress by source; guarded by mu
	wg       sync.WaitGroup
}

// NewMux wraps ln. onFail, if not nil, is called for every connection
// dropped before reaching a handler, with a short reason ("handshake",
// "no_certificate", "bad_certificate", "no_protocol", "busy", "accept").
func NewMux(ln net.Listener, cfg *tls.Config, log *slog.Logger, onFail func(reason string)) *Mux {
	if onFail == nil {
		onFail = func(string) {}
	}
	return &Mux{ln: ln, cfg: cfg, log: log, onFail: onFail, handlers: map[string]func(net.Conn){}, pending: map[netip.Addr]int{}}
}

// Addr is the listening address.
func (m *Mux) Addr() net.Addr { return m.ln.Addr() }

// Handle routes connections that negotiated proto to fn, which owns the
// connection (and must close it).
func (m *Mux) Handle(proto string, fn func(net.Conn)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.handlers[proto] = fn
}

// Listener returns a net.Listener that yields the connections negotiated
// for proto, for servers that want one (net/http).
func (m *Mux) Listener(proto string) net.Listener {
	l := &chanListener{addr: m.ln.Addr(), c: make(chan net.Conn), done: make(chan struct{})}
	m.Handle(proto, func(c net.Conn) {
		select {
		case l.c <- c:
		case <-l.done:
			c.Close()
		}
	})
	return l
}

// Serve accepts until the listener is closed or ctx is done.
func (m *Mux) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { m.ln.Close() })
	defer stop()
	sem := make(chan struct{}, MaxPending)
	backoff := 5 * time.Millisecond
	for {
		c, err := m.ln.Accept()
		if err != nil {
			m.mu.Lock()
			closed := m.closed
			m.mu.Unlock()
			if closed || ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors, aborted connections, timeouts:
			// wait and go on. A peer must never be able to end the agent
			// by exhausting a resource.
			var ne net.Error
			if (errors.As(err, &ne) && ne.Timeout()) || errors.Is(err, syscall.EMFILE) ||
				errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) {
				m.log.Warn("fabric accept failed; retrying", "err", err, "backoff", backoff)
				m.onFail("accept")
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
					return nil
				}
				backoff = min(2*backoff, time.Second)
				continue
			}
			return err
		}
		backoff = 5 * time.Millisecond
		src := remoteIP(c)
		if !m.admit(src, sem) {
			m.onFail("busy")
			c.Close()
			continue
		}
		// Add under mu, after checking closed: Close's Wait must not race
		// with an Add for a connection accepted as the listener closed.
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			m.release(src, sem)
			c.Close()
			return nil
		}
		m.wg.Add(1)
		m.mu.Unlock()
		go func() {
			fn, tc := m.handshake(c, func() { m.release(src, sem) })
			m.wg.Done()
			if fn != nil {
				fn(tc) // outside wg: a handler owns its connection and its time
			}
		}()
	}
}

// MaxPendingPerSource bounds handshakes in progress from one IP address, so
// one host holding idle connections cannot lock members out.
const MaxPendingPerSource = 16

// admit takes a handshake slot for a connection from src, or reports that
// the global or per-source limit is reached.
func (m *Mux) admit(src netip.Addr, sem chan struct{}) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pending[src] >= MaxPendingPerSource {
		return false
	}
	select {
	case sem <- struct{}{}:
	default:
		return false
	}
	m.pending[src]++
	return true
}

func (m *Mux) release(src netip.Addr, sem chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	<-sem
	if m.pending[src]--; m.pending[src] <= 0 {
		delete(m.pending, src)
	}
}

func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// handshake runs the TLS handshake and returns the handler for the
// negotiated protocol, or nil after closing the connection.
func (m *Mux) handshake(raw net.Conn, done func()) (func(net.Conn), net.Conn) {
	tc := tls.Server(raw, m.cfg)
	_ = tc.SetDeadline(time.Now().Add(HandshakeTimeout))
	err := tc.Handshake()
	done()
	if err != nil {
		reason := classify(err)
		if reason == "handshake" {
			// Garbage and port scans: counted, not shouted.
			m.log.Debug("fabric handshake failed", "remote", raw.RemoteAddr().String(), "err", err)
		} else if m.warnAllowed() {
			m.log.Warn("refused fabric connection: the peer did not prove cluster membership",
				"remote", raw.RemoteAddr().String(), "reason", reason, "err", err)
		}
		m.onFail(reason)
		tc.Close()
		return nil, nil
	}
	_ = tc.SetDeadline(time.Time{})
	proto := tc.ConnectionState().NegotiatedProtocol
	m.mu.Lock()
	fn := m.handlers[proto]
	m.mu.Unlock()
	if fn == nil {
		m.log.Debug("fabric connection without a known protocol", "remote", raw.RemoteAddr().String(), "proto", proto)
		m.onFail("no_protocol")
		tc.Close()
		return nil, nil
	}
	return fn, tc
}

// classify names why a handshake failed: "no_certificate" (a client that
// did not offer the join protocol and had no certificate), "bad_certificate"
// (a certificate not signed by the cluster CA, or a dialer that refused
// ours for the same reason), or "handshake" (anything
// else: garbage, truncation, timeouts).
func classify(err error) string {
	var cv *tls.CertificateVerificationError
	msg := err.Error()
	switch {
	case errors.As(err, &cv):
		return "bad_certificate"
	// The dialer checked our certificate first and aborted: it holds
	// another cluster's CA (TLS 1.3 clients verify the server before they
	// send their own certificate).
	case strings.Contains(msg, "remote error: tls: bad certificate"),
		strings.Contains(msg, "remote error: tls: unknown certificate authority"):
		return "bad_certificate"
	case strings.Contains(msg, "didn't provide a certificate"):
		return "no_certificate"
	}
	return "handshake"
}

// warnAllowed rate-limits membership-refusal warnings to one per 10 s, so a
// misconfigured peer retrying in a loop cannot flood the log (the metric
// still counts every one).
func (m *Mux) warnAllowed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	if now.Sub(m.lastWarn) < 10*time.Second {
		return false
	}
	m.lastWarn = now
	return true
}

// Close stops accepting and waits for in-flight handshakes (at most
// HandshakeTimeout). Handlers already running own their connections and are
// not waited for: each protocol bounds its own exchanges.
func (m *Mux) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	err := m.ln.Close()
	m.wg.Wait()
	return err
}

type chanListener struct {
	addr net.Addr
	c    chan net.Conn
	once sync.Once
	done chan struct{}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }
