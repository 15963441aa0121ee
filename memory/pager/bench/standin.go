package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/onebox-project/onebox/memory/pool"
)

// The loopback stand-in for a remote pool node: a page server on
// 127.0.0.1 keeping pages in a pool.Local, and a pool.Pages client with one
// connection. Frames: a 32-byte request (op, region id, offset, length)
// followed by the data of a store; a 8-byte status followed by the data of a
// load or an echo. Plain TCP: the cluster pool's own protocol adds mutual
// TLS, measured by its own benchmark ('onebox bench pool').
const (
	opStore = 1 + iota
	opLoad
	opDrop
	opEcho // answers n bytes of zeros: the raw round trip
	hdrLen = 32
	maxLen = 16 << 20
)

type standin struct {
	ln    net.Listener
	store *pool.Local
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startStandin() (*standin, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &standin{ln: ln, store: pool.NewLocal(0), conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[c] = true
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
		}
	}()
	return s, nil
}

func (s *standin) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *standin) serve(c net.Conn) {
	r, w := bufio.NewReaderSize(c, 1<<20), bufio.NewWriterSize(c, 1<<20)
	hdr := make([]byte, hdrLen)
	var data []byte
	ctx := context.Background()
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			return
		}
		op, id := hdr[0], binary.LittleEndian.Uint64(hdr[8:16])
		off, n := binary.LittleEndian.Uint64(hdr[16:24]), int(binary.LittleEndian.Uint32(hdr[24:28]))
		if n > maxLen || n%pool.PageSize != 0 {
			return
		}
		if cap(data) < n {
			data = make([]byte, n)
		}
		data = data[:n]
		reg := pool.Region{Owner: "bench", ID: id}
		var err error
		out := false
		switch op {
		case opStore:
			if _, err = io.ReadFull(r, data); err != nil {
				return
			}
			err = s.store.Store(ctx, reg, off, data)
		case opLoad:
			err, out = s.store.Load(ctx, reg, off, data), true
		case opDrop:
			err = s.store.Drop(ctx, reg, off, uint64(n))
		case opEcho:
			clear(data)
			out = true
		default:
			return
		}
		status := make([]byte, 8)
		if err != nil {
			status[0] = 1
			out = false
		}
		w.Write(status)
		if out {
			w.Write(data)
		}
		if w.Flush() != nil {
			return
		}
	}
}

// remote is pool.Pages over one connection to a standin.
type remote struct {
	mu  sync.Mutex
	c   net.Conn
	r   *bufio.Reader
	w   *bufio.Writer
	hdr []byte
}

func dialStandin(addr string) (*remote, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	return &remote{c: c, r: bufio.NewReaderSize(c, 1<<20), w: bufio.NewWriterSize(c, 1<<20), hdr: make([]byte, hdrLen)}, nil
}

func (p *remote) Close() error { return p.c.Close() }

// call sends one request and reads its answer into in (load, echo).
func (p *remote) call(op byte, id, off uint64, n int, out, in []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.hdr)
	p.hdr[0] = op
	binary.LittleEndian.PutUint64(p.hdr[8:16], id)
	binary.LittleEndian.PutUint64(p.hdr[16:24], off)
	binary.LittleEndian.PutUint32(p.hdr[24:28], uint32(n))
	p.w.Write(p.hdr)
	if out != nil {
		p.w.Write(out)
	}
	if err := p.w.Flush(); err != nil {
		return err
	}
	var st [8]byte
	if _, err := io.ReadFull(p.r, st[:]); err != nil {
		return err
	}
	if st[0] != 0 {
		return errors.New("bench: stand-in pool refused the request")
	}
	if in != nil {
		_, err := io.ReadFull(p.r, in)
		return err
	}
	return nil
}

func (p *remote) Reserve(context.Context, string, uint64) error { return nil }
func (p *remote) Release(string, uint64)                        {}
func (p *remote) Store(_ context.Context, r pool.Region, off uint64, data []byte) error {
	return p.call(opStore, r.ID, off, len(data), data, nil)
}
func (p *remote) Load(_ context.Context, r pool.Region, off uint64, data []byte) error {
	return p.call(opLoad, r.ID, off, len(data), nil, data)
}
func (p *remote) Drop(_ context.Context, r pool.Region, off, n uint64) error {
	if n > maxLen { // whole regions: one request per 16 MiB
		for o := uint64(0); o < n; o += maxLen {
			if err := p.call(opDrop, r.ID, off+o, int(min(n-o, maxLen)), nil, nil); err != nil {
				return err
			}
		}
		return nil
	}
	return p.call(opDrop, r.ID, off, int(n), nil, nil)
}
func (p *remote) DropOwner(context.Context, string) error { return nil }

// echo is one raw 4 KiB round trip.
func (p *remote) echo(buf []byte) error { return p.call(opEcho, 0, 0, len(buf), nil, buf) }

var _ pool.Pages = (*remote)(nil)

func errorf(format string, args ...any) error { return fmt.Errorf("bench mem: "+format, args...) }
