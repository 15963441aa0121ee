// Package clustertest runs page servers in this process, each behind its
// own fabric mux on a loopback port with real mutual TLS (a throwaway
// cluster CA and node certificates), so tests and 'onebox bench pool' can
// exercise memory/cluster over the same path agents use, and kill nodes.
package clustertest

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/fabric/transport"
	"github.com/onebox-project/onebox/memory/cluster"
	"github.com/onebox-project/onebox/memory/pageserver"
)

// Node is one page server.
type Node struct {
	Name   string
	Addr   string
	Server *pageserver.Server

	cert   tls.Certificate
	mux    *transport.Mux
	cancel context.CancelFunc
	stop   sync.Once
	plain  net.Listener
}

// Cluster is a set of page servers and the identities to reach them.
type Cluster struct {
	CA    *pki.CA
	Nodes []*Node
	plain bool

	mu     sync.Mutex
	alive  map[string]bool            // guarded by mu
	cut    map[string]bool            // guarded by mu
	certs  map[string]tls.Certificate // client identities; guarded by mu
	byName map[string]*Node           // guarded by mu
}

// NodeCert makes a certificate for node signed by ca.
func NodeCert(ca *pki.CA, node string) (tls.Certificate, error) {
	key, err := pki.NewNodeKey()
	if err != nil {
		return tls.Certificate{}, err
	}
	csr, err := pki.NewCSR(key, node)
	if err != nil {
		return tls.Certificate{}, err
	}
	der, err := ca.SignNode(csr, node, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key}, nil
}

// Start starts one page server of capacity bytes per name, on 127.0.0.1.
func Start(names []string, capacity uint64) (*Cluster, error) { return start(names, capacity, false) }

// StartPlain is Start without TLS: plain TCP, the peer named by 64 bytes
// the dialer sends first. For measuring what TLS costs only; agents never
// serve pages without mutual TLS.
func StartPlain(names []string, capacity uint64) (*Cluster, error) {
	return start(names, capacity, true)
}

func start(names []string, capacity uint64, plain bool) (*Cluster, error) {
	ca, err := pki.NewCA()
	if err != nil {
		return nil, err
	}
	c := &Cluster{CA: ca, plain: plain, alive: map[string]bool{}, certs: map[string]tls.Certificate{}, byName: map[string]*Node{}}
	for _, name := range names {
		cert, err := NodeCert(ca, name)
		if err != nil {
			c.Close()
			return nil, err
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			c.Close()
			return nil, err
		}
		log := slog.New(slog.DiscardHandler)
		n := &Node{Name: name, Addr: ln.Addr().String(), Server: pageserver.New(capacity, log), cert: cert}
		ctx, cancel := context.WithCancel(context.Background())
		n.cancel = cancel
		if plain {
			n.plain = ln
			n.Server.PeerName = func(c net.Conn) string { return plainPeer(c) }
			go servePlain(ln, n.Server)
		} else {
			n.mux = transport.NewMux(ln, pki.ServerTLS(cert, ca.Cert), log, nil)
			n.mux.Handle(pki.ProtoPage, n.Server.ServeConn)
			go n.mux.Serve(ctx)
		}
		c.Nodes = append(c.Nodes, n)
		c.byName[name] = n
		c.alive[name] = true
		c.certs[name] = cert
	}
	return c, nil
}

// Node returns the named node, or nil.
func (c *Cluster) Node(name string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byName[name]
}

// Members is the membership view: every node, alive until Kill.
func (c *Cluster) Members() []cluster.Member {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]cluster.Member, 0, len(c.Nodes))
	for _, n := range c.Nodes {
		out = append(out, cluster.Member{Name: n.Name, Alive: c.alive[n.Name]})
	}
	return out
}

// SetAlive changes what Members says of node (a membership verdict
// without touching the server).
func (c *Cluster) SetAlive(node string, alive bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.alive[node] = alive
}

// Kill stops node's server and mux (its pages are gone) and marks it
// failed.
func (c *Cluster) Kill(node string) {
	n := c.Node(node)
	c.SetAlive(node, false)
	n.stop.Do(func() {
		n.cancel()
		if n.mux != nil {
			n.mux.Close()
		} else {
			n.plain.Close()
		}
		n.Server.Close()
	})
}

// Restart replaces node's server by a new one (a new instance, empty) on
// the same address, as an agent restarted by its supervisor would be; the
// node stays alive in Members throughout.
func (c *Cluster) Restart(node string) error {
	old := c.Node(node)
	capacity := old.Server.Stat().Capacity
	old.stop.Do(func() {
		old.cancel()
		if old.mux != nil {
			old.mux.Close()
		} else {
			old.plain.Close()
		}
		old.Server.Close()
	})
	ln, err := net.Listen("tcp", old.Addr)
	if err != nil {
		return err
	}
	log := slog.New(slog.DiscardHandler)
	n := &Node{Name: node, Addr: old.Addr, Server: pageserver.New(capacity, log), cert: old.cert}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	n.mux = transport.NewMux(ln, pki.ServerTLS(n.cert, c.CA.Cert), log, nil)
	n.mux.Handle(pki.ProtoPage, n.Server.ServeConn)
	go n.mux.Serve(ctx)
	c.mu.Lock()
	for i, x := range c.Nodes {
		if x == old {
			c.Nodes[i] = n
		}
	}
	c.byName[node] = n
	c.alive[node] = true
	c.mu.Unlock()
	return nil
}

// Cut makes node unreachable from the pools of this cluster without
// stopping it, like a cut link: dials hang until their deadline, and reads
// on connections already open wait for their deadline. Heal undoes it.
func (c *Cluster) Cut(node string) { c.setCut(node, true) }

// Heal reconnects a cut node.
func (c *Cluster) Heal(node string) { c.setCut(node, false) }

func (c *Cluster) setCut(node string, cut bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut == nil {
		c.cut = map[string]bool{}
	}
	c.cut[node] = cut
}

func (c *Cluster) isCut(node string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cut[node]
}

// cutConn blackholes a connection while its node is cut.
type cutConn struct {
	net.Conn
	c    *Cluster
	node string

	mu       sync.Mutex
	deadline time.Time // read deadline; guarded by mu
}

func (cc *cutConn) SetReadDeadline(t time.Time) error {
	cc.mu.Lock()
	cc.deadline = t
	cc.mu.Unlock()
	return cc.Conn.SetReadDeadline(t)
}

func (cc *cutConn) SetDeadline(t time.Time) error {
	cc.mu.Lock()
	cc.deadline = t
	cc.mu.Unlock()
	return cc.Conn.SetDeadline(t)
}

func (cc *cutConn) Read(b []byte) (int, error) {
	for cc.c.isCut(cc.node) {
		cc.mu.Lock()
		d := cc.deadline
		cc.mu.Unlock()
		if !d.IsZero() && time.Now().After(d) {
			return 0, os.ErrDeadlineExceeded
		}
		time.Sleep(5 * time.Millisecond)
	}
	return cc.Conn.Read(b)
}

func (cc *cutConn) Write(b []byte) (int, error) {
	if cc.c.isCut(cc.node) {
		return len(b), nil // lost on the way
	}
	return cc.Conn.Write(b)
}

// ClientTLS is the TLS configuration of a member named self dialing a
// page server.
func (c *Cluster) ClientTLS(self string) (*tls.Config, error) {
	c.mu.Lock()
	cert, ok := c.certs[self]
	c.mu.Unlock()
	if !ok {
		var err error
		if cert, err = NodeCert(c.CA, self); err != nil {
			return nil, err
		}
		c.mu.Lock()
		c.certs[self] = cert
		c.mu.Unlock()
	}
	cfg := pki.ClientTLS(cert, c.CA.Cert)
	cfg.NextProtos = []string{pki.ProtoPage}
	return cfg, nil
}

// Dialer returns a cluster.Options.Dial for a member named self.
func (c *Cluster) Dialer(self string) (func(ctx context.Context, node string) (net.Conn, error), error) {
	cfg, err := c.ClientTLS(self)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, node string) (net.Conn, error) {
		n := c.Node(node)
		if n == nil {
			return nil, fmt.Errorf("clustertest: no node %s", node)
		}
		if c.isCut(node) {
			<-ctx.Done()
			return nil, fmt.Errorf("clustertest: dial %s: %w", node, ctx.Err())
		}
		if c.plain {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "tcp", n.Addr)
			if err != nil {
				return nil, err
			}
			// The name, padded to a fixed size: the server's stand-in for
			// a certificate.
			var b [64]byte
			copy(b[:], self)
			if _, err := conn.Write(b[:]); err != nil {
				conn.Close()
				return nil, err
			}
			return conn, nil
		}
		var d net.Dialer
		raw, err := d.DialContext(ctx, "tcp", n.Addr)
		if err != nil {
			return nil, err
		}
		conn := tls.Client(&cutConn{Conn: raw, c: c, node: node}, cfg)
		if err := conn.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, err
		}
		if got := pki.PeerName(conn.ConnectionState()); got != node {
			conn.Close()
			return nil, fmt.Errorf("clustertest: %s presented %q", n.Addr, got)
		}
		return conn, nil
	}, nil
}

// NewPool returns a cluster.Pool for a member named opts.Self (default
// "client", which serves nothing), with Dial and Members filled in.
func (c *Cluster) NewPool(opts cluster.Options) (*cluster.Pool, error) {
	if opts.Self == "" {
		opts.Self = "client"
	}
	d, err := c.Dialer(opts.Self)
	if err != nil {
		return nil, err
	}
	opts.Dial = d
	opts.Members = c.Members
	return cluster.New(opts)
}

// Close stops every server.
func (c *Cluster) Close() {
	c.mu.Lock()
	nodes := slices.Clone(c.Nodes)
	c.mu.Unlock()
	for _, n := range nodes {
		c.Kill(n.Name)
	}
}

// plainConn carries the peer name a plain dialer announced.
type plainConn struct {
	net.Conn
	peer string
}

func plainPeer(c net.Conn) string {
	if pc, ok := c.(*plainConn); ok {
		return pc.peer
	}
	return ""
}

func servePlain(ln net.Listener, s *pageserver.Server) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			var b [64]byte
			if _, err := io.ReadFull(c, b[:]); err != nil {
				c.Close()
				return
			}
			s.ServeConn(&plainConn{Conn: c, peer: strings.TrimRight(string(b[:]), "\x00")})
		}()
	}
}
