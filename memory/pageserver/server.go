// Package pageserver holds the pages other nodes put in this node's
// donated RAM and serves them over the page protocol (memory/pageproto).
// Pages are kept per calling node (the name in its client certificate), so
// a member can only reach what it stored; capacity is enforced per store
// and per reservation, and a store beyond it fails whole with StatusFull.
package pageserver

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
)

// PayloadTimeout bounds how long a frame's payload may take to arrive once
// its header has: a peer that stalls mid-frame is dropped.
const PayloadTimeout = 10 * time.Second

// WriteTimeout bounds each response write.
const WriteTimeout = 10 * time.Second

// MaxOwners bounds how many owners may hold a reservation at once (all
// members together): the map of reservations is fed from the network, and
// reservations of a few bytes each would otherwise grow it without a
// bound that capacity sets.
const MaxOwners = 1 << 16

type page = [pageproto.PageSize]byte

// ownerKey names an owner's pages: the node that stored them and the
// owner name it gave.
type ownerKey struct{ peer, owner string }

type regionKey struct {
	ownerKey
	region uint64
}

// Server is one node's share of the pool. Safe for concurrent use.
type Server struct {
	capacity uint64
	instance uint64
	log      *slog.Logger

	// Observe, if set, is called after every request with its op and
	// status (metrics). Set it before serving.
	Observe func(op pageproto.Op, st pageproto.Status)
	// PeerName returns the node name of a connection; by default the
	// common name of its TLS client certificate (the fabric mux has
	// verified it). Tests on plain connections set it.
	PeerName func(c net.Conn) string

	mu       sync.Mutex
	used     uint64                         // bytes of pages; guarded by mu
	reserved uint64                         // guarded by mu
	regions  map[regionKey]map[uint64]*page // guarded by mu
	owners   map[ownerKey]uint64            // reserved bytes by owner; guarded by mu
	peers    map[string]uint64              // client instance by node; guarded by mu
	conns    map[net.Conn]struct{}          // guarded by mu
	closed   bool                           // guarded by mu
	wg       sync.WaitGroup
}

// New returns a Server holding at most capacity bytes of pages.
func New(capacity uint64, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		capacity: capacity, instance: rand.Uint64() | 1, log: log,
		regions: map[regionKey]map[uint64]*page{}, owners: map[ownerKey]uint64{},
		peers: map[string]uint64{}, conns: map[net.Conn]struct{}{},
	}
}

// Stat returns the server's account.
func (s *Server) Stat() pageproto.Stat {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.statLocked()
}

func (s *Server) statLocked() pageproto.Stat {
	return pageproto.Stat{Instance: s.instance, Capacity: s.capacity, Used: s.used, Reserved: s.reserved}
}

// Close closes every connection and waits for their goroutines.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// Peers lists the nodes that said hello since they were last dropped.
func (s *Server) Peers() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.peers))
	for n := range s.peers {
		out = append(out, n)
	}
	return out
}

// DropPeer forgets everything node stored (it left the cluster for good).
func (s *Server) DropPeer(node string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropPeerLocked(node)
	delete(s.peers, node)
}

func (s *Server) dropPeerLocked(node string) {
	for k, m := range s.regions {
		if k.peer == node {
			s.used -= uint64(len(m)) * pageproto.PageSize
			delete(s.regions, k)
		}
	}
	for k, n := range s.owners {
		if k.peer == node {
			s.reserved -= n
			delete(s.owners, k)
		}
	}
}

func (s *Server) peerName(c net.Conn) string {
	if s.PeerName != nil {
		return s.PeerName(c)
	}
	if tc, ok := c.(*tls.Conn); ok {
		if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
			return cs.PeerCertificates[0].Subject.CommonName
		}
	}
	return ""
}

// conn is one connection's state; only its ServeConn goroutine uses it.
type conn struct {
	s    *Server
	c    net.Conn
	peer string
	bw   *bufio.Writer
	buf  []byte // request payloads
	out  []byte // load responses
}

// ServeConn serves one member's connection until it closes or breaks the
// protocol; it owns c.
func (s *Server) ServeConn(c net.Conn) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.wg.Done()
	}()
	cn := &conn{s: s, c: c, peer: s.peerName(c), bw: bufio.NewWriterSize(c, 64<<10)}
	if cn.peer == "" {
		s.log.Warn("page protocol: connection without a peer name", "remote", c.RemoteAddr().String())
		return
	}
	br := bufio.NewReaderSize(c, 256<<10)
	hello := false
	for {
		// An idle connection waits for its next request without limit;
		// once a frame has begun, the rest of it must arrive within
		// PayloadTimeout (armed only when it is not already buffered).
		if _, err := br.Peek(1); err != nil {
			return
		}
		need := pageproto.HeaderSize
		if br.Buffered() >= pageproto.HeaderSize {
			hb, _ := br.Peek(pageproto.HeaderSize)
			need += int(min(binary.BigEndian.Uint32(hb[4:]), pageproto.MaxPayload))
		}
		armed := br.Buffered() < need
		if armed {
			_ = c.SetReadDeadline(time.Now().Add(PayloadTimeout))
		}
		h, p, err := pageproto.ReadFrame(br, cn.buf)
		cn.buf = p[:0]
		if armed && err == nil {
			_ = c.SetReadDeadline(time.Time{})
		}
		if err == nil && !hello && h.Op != pageproto.OpHello {
			err = fmt.Errorf("%w: %v before hello", pageproto.ErrBadFrame, h.Op)
		}
		if err != nil {
			if err != io.EOF && !errors.Is(err, net.ErrClosed) {
				if !errors.Is(err, pageproto.ErrBadFrame) {
					err = fmt.Errorf("%w: truncated or stalled frame: %w", pageproto.ErrBadFrame, err)
				}
				s.log.Debug("page protocol: rejected frame, closing", "peer", cn.peer, "err", err)
				op := h.Op | pageproto.RespBit
				if !h.Op.Request() {
					op = pageproto.RespBit
				}
				cn.reply(pageproto.Header{Op: op, ID: h.ID, Arg: uint64(pageproto.StatusBadFrame)}, []byte(err.Error()))
				cn.bw.Flush()
				s.observe(0, pageproto.StatusBadFrame)
			}
			return
		}
		hello = true
		st, payload := cn.handle(h, p)
		cn.reply(pageproto.Header{Op: h.Op | pageproto.RespBit, ID: h.ID, Arg: uint64(st)}, payload)
		s.observe(h.Op, st)
		// Flush when no further request is waiting: pipelined requests
		// get their responses in as few writes as possible.
		if br.Buffered() == 0 {
			if err := cn.flush(); err != nil {
				return
			}
		}
		if st == pageproto.StatusClosing {
			return
		}
	}
}

func (s *Server) observe(op pageproto.Op, st pageproto.Status) {
	if s.Observe != nil {
		s.Observe(op, st)
	}
}

func (cn *conn) reply(h pageproto.Header, payload []byte) {
	h.Length = uint32(len(payload))
	var hb [pageproto.HeaderSize]byte
	h.Put(hb[:])
	cn.bw.Write(hb[:])
	cn.bw.Write(payload)
}

func (cn *conn) flush() error {
	_ = cn.c.SetWriteDeadline(time.Now().Add(WriteTimeout))
	return cn.bw.Flush()
}

func (cn *conn) handle(h pageproto.Header, p []byte) (pageproto.Status, []byte) {
	s := cn.s
	owner := string(p[:h.OwnerLen])
	data := p[h.OwnerLen:]
	ok := ownerKey{cn.peer, owner}
	rk := regionKey{ok, h.Region}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return pageproto.StatusClosing, nil
	}
	switch h.Op {
	case pageproto.OpHello:
		if old, seen := s.peers[cn.peer]; seen && old != h.Arg {
			// The node restarted: what its old incarnation stored belongs
			// to programs that are gone.
			s.log.Info("page protocol: node restarted, dropping its pages", "peer", cn.peer)
			s.dropPeerLocked(cn.peer)
		}
		s.peers[cn.peer] = h.Arg
		return pageproto.StatusOK, s.statLocked().Append(nil)
	case pageproto.OpStat:
		return pageproto.StatusOK, s.statLocked().Append(nil)
	case pageproto.OpStore:
		m := s.regions[rk]
		n := uint64(len(data) / pageproto.PageSize)
		var fresh uint64
		for i := range n {
			if m[h.Offset+i*pageproto.PageSize] == nil {
				fresh++
			}
		}
		if s.used+fresh*pageproto.PageSize > s.capacity {
			return pageproto.StatusFull, fmt.Appendf(nil, "node holds %d of %d bytes, %d more asked", s.used, s.capacity, fresh*pageproto.PageSize)
		}
		if m == nil {
			m = map[uint64]*page{}
			s.regions[rk] = m
		}
		for i := range n {
			off := h.Offset + i*pageproto.PageSize
			pg := m[off]
			if pg == nil {
				pg = new(page)
				m[off] = pg
			}
			copy(pg[:], data[i*pageproto.PageSize:])
		}
		s.used += fresh * pageproto.PageSize
		return pageproto.StatusOK, nil
	case pageproto.OpLoad:
		if cap(cn.out) < int(h.Arg) {
			cn.out = make([]byte, h.Arg)
		}
		out := cn.out[:h.Arg]
		m := s.regions[rk]
		for i := 0; i < len(out); i += pageproto.PageSize {
			if pg := m[h.Offset+uint64(i)]; pg != nil {
				copy(out[i:], pg[:])
			} else {
				clear(out[i : i+pageproto.PageSize])
			}
		}
		return pageproto.StatusOK, out
	case pageproto.OpDrop:
		m := s.regions[rk]
		if pages := h.Arg / pageproto.PageSize; pages < uint64(len(m)) {
			for off := h.Offset; off < h.Offset+h.Arg; off += pageproto.PageSize {
				if m[off] != nil {
					delete(m, off)
					s.used -= pageproto.PageSize
				}
			}
		} else {
			for off := range m {
				if off >= h.Offset && off-h.Offset < h.Arg {
					delete(m, off)
					s.used -= pageproto.PageSize
				}
			}
		}
		if len(m) == 0 {
			delete(s.regions, rk)
		}
		return pageproto.StatusOK, nil
	case pageproto.OpDropOwner:
		for k, m := range s.regions {
			if k.ownerKey == ok {
				s.used -= uint64(len(m)) * pageproto.PageSize
				delete(s.regions, k)
			}
		}
		s.reserved -= s.owners[ok]
		delete(s.owners, ok)
		return pageproto.StatusOK, nil
	case pageproto.OpReserve:
		if s.reserved+h.Arg > s.capacity || s.reserved+h.Arg < s.reserved {
			return pageproto.StatusFull, fmt.Appendf(nil, "node has %d of %d bytes reserved, %d more asked", s.reserved, s.capacity, h.Arg)
		}
		if h.Arg == 0 {
			return pageproto.StatusOK, nil // nothing to account: no entry
		}
		if _, held := s.owners[ok]; !held && len(s.owners) >= MaxOwners {
			return pageproto.StatusFull, fmt.Appendf(nil, "node holds reservations of %d owners, the most it keeps", len(s.owners))
		}
		s.reserved += h.Arg
		s.owners[ok] += h.Arg
		return pageproto.StatusOK, nil
	case pageproto.OpRelease:
		n := min(h.Arg, s.owners[ok])
		s.reserved -= n
		if s.owners[ok] -= n; s.owners[ok] == 0 {
			delete(s.owners, ok)
		}
		return pageproto.StatusOK, nil
	}
	return pageproto.StatusBadFrame, []byte("unknown op")
}
