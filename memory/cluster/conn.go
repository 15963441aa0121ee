package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
)

// ErrConnClosed is returned for requests on a connection that broke.
var ErrConnClosed = errors.New("cluster: page connection closed")

// StatusError is a server's refusal.
type StatusError struct {
	Node   string
	Op     pageproto.Op
	Status pageproto.Status
	Msg    string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("cluster: node %s: %v: %v: %s", e.Node, e.Op, e.Status, e.Msg)
}

// conn is one pipelined page protocol connection. Requests are written
// under wmu; responses are read by whichever waiting caller holds the
// read token (leader/follower): it reads frames and hands each to its
// caller until its own arrives, so a lone request is answered without a
// hand-off between goroutines (a wake-up on the other vCPU costs ~50 us
// here, more than the round trip itself).
type conn struct {
	node    string
	c       net.Conn
	stat    pageproto.Stat // from the hello
	timeout time.Duration

	wmu  sync.Mutex
	wbuf []byte // guarded by wmu

	readTok chan struct{} // holding a value = reading
	br      *bufio.Reader // used by the read token holder only

	// used: an answer other than the hello's came back. A used
	// connection that breaks at the next request may just have gone
	// stale (the server restarted or dropped it while idle): worth one
	// retry on a new connection.
	used atomic.Bool

	mu      sync.Mutex
	nextID  uint64           // guarded by mu
	pending map[uint64]*call // guarded by mu
	err     error            // guarded by mu; set once, when the connection breaks
}

type call struct {
	id   uint64
	op   pageproto.Op
	dst  []byte // load: the response's pages go here
	done chan struct{}
	h    pageproto.Header
	msg  []byte
	err  error
}

// dialConn runs the hello exchange on c.
func dialConn(ctx context.Context, node string, c net.Conn, instance uint64, timeout time.Duration) (*conn, error) {
	cn := &conn{node: node, c: c, timeout: timeout, readTok: make(chan struct{}, 1),
		br: bufio.NewReaderSize(c, 64<<10), pending: map[uint64]*call{}}
	_, msg, err := cn.do(ctx, pageproto.Header{Op: pageproto.OpHello, Arg: instance}, "", nil, nil)
	if err == nil {
		cn.stat, err = pageproto.ParseStat(msg)
	}
	if err != nil {
		cn.close(err)
		return nil, fmt.Errorf("cluster: hello to %s: %w", node, err)
	}
	return cn, nil
}

func (cn *conn) broken() error {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	return cn.err
}

// close fails every pending call with err and closes the connection.
func (cn *conn) close(err error) {
	cn.mu.Lock()
	if cn.err != nil {
		cn.mu.Unlock()
		return
	}
	cn.err = fmt.Errorf("%w: %s: %w", ErrConnClosed, cn.node, err)
	pend := cn.pending
	cn.pending = map[uint64]*call{}
	cn.mu.Unlock()
	cn.c.Close()
	for _, cl := range pend {
		cl.err = cn.err
		close(cl.done)
	}
}

// do sends one request and waits for its response. For a load, dst
// receives the pages. It returns the response header and its payload
// (other than pages), or an error: *StatusError for a refusal, an
// ErrConnClosed error when the connection broke (it is then closed).
func (cn *conn) do(ctx context.Context, h pageproto.Header, owner string, data, dst []byte) (pageproto.Header, []byte, error) {
	return cn.finish(ctx, cn.start(h, owner, data, dst))
}

// start sends a request without waiting for its answer (finish waits), so
// one goroutine can have requests in flight to several nodes at once
// without a goroutine each.
func (cn *conn) start(h pageproto.Header, owner string, data, dst []byte) *call {
	cl := &call{dst: dst, op: h.Op, done: make(chan struct{})}
	cn.mu.Lock()
	if cn.err != nil {
		cl.err = cn.err
		cn.mu.Unlock()
		close(cl.done)
		return cl
	}
	cn.nextID++
	cl.id = cn.nextID
	cn.pending[cl.id] = cl
	cn.mu.Unlock()
	h.ID = cl.id
	if err := cn.write(h, owner, data); err != nil {
		cn.close(err)
		<-cl.done
	}
	return cl
}

// finish waits for the answer to cl.
func (cn *conn) finish(ctx context.Context, cl *call) (pageproto.Header, []byte, error) {
	if err := cn.wait(ctx, cl); err != nil {
		return cl.h, nil, err
	}
	if cl.err != nil {
		return cl.h, nil, cl.err
	}
	if cl.op != pageproto.OpHello {
		cn.used.Store(true)
	}
	if st := pageproto.Status(cl.h.Arg); st != pageproto.StatusOK {
		return cl.h, nil, &StatusError{Node: cn.node, Op: cl.op, Status: st, Msg: string(cl.msg)}
	}
	return cl.h, cl.msg, nil
}

func (cn *conn) write(h pageproto.Header, owner string, data []byte) error {
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	_ = cn.c.SetWriteDeadline(time.Now().Add(cn.timeout))
	// Small frames go in one write (one TLS record); big ones without a
	// copy of the data.
	if len(data) <= 64<<10 {
		cn.wbuf = pageproto.AppendFrame(cn.wbuf[:0], h, owner, data)
		_, err := cn.c.Write(cn.wbuf)
		return err
	}
	h.OwnerLen, h.Length = uint8(len(owner)), uint32(len(owner)+len(data))
	cn.wbuf = append(cn.wbuf[:0], make([]byte, pageproto.HeaderSize)...)
	h.Put(cn.wbuf)
	cn.wbuf = append(cn.wbuf, owner...)
	if _, err := cn.c.Write(cn.wbuf); err != nil {
		return err
	}
	_, err := cn.c.Write(data)
	return err
}

// wait returns when cl is done, reading responses itself while it holds
// the read token. A context that ends first abandons cl (its response,
// if it comes, is discarded).
func (cn *conn) wait(ctx context.Context, cl *call) error {
	for {
		select {
		case <-cl.done:
			return nil
		case cn.readTok <- struct{}{}:
			// Our response may have been delivered while we waited.
			select {
			case <-cl.done:
				<-cn.readTok
				return nil
			default:
			}
			cn.readUntil(cl)
			<-cn.readTok
			// readUntil returns when cl is answered or the connection
			// broke; a close running on another goroutine may still be
			// failing the pending calls, cl among them.
			<-cl.done
			return nil
		case <-ctx.Done():
			cn.mu.Lock()
			_, still := cn.pending[cl.id]
			if still {
				delete(cn.pending, cl.id)
				cl.dst = nil
			}
			cn.mu.Unlock()
			if !still {
				// Delivered (or being delivered) meanwhile.
				<-cl.done
				return nil
			}
			return ctx.Err()
		}
	}
}

// readUntil reads responses, handing each to its call, until mine is done
// or the connection breaks.
func (cn *conn) readUntil(mine *call) {
	var hb [pageproto.HeaderSize]byte
	for {
		select {
		case <-mine.done:
			return
		default:
		}
		_ = cn.c.SetReadDeadline(time.Now().Add(cn.timeout))
		if _, err := io.ReadFull(cn.br, hb[:]); err != nil {
			cn.close(err)
			return
		}
		h, err := pageproto.Parse(hb[:])
		if err == nil && h.Op&pageproto.RespBit == 0 {
			err = fmt.Errorf("%w: %v from the server", pageproto.ErrBadFrame, h.Op)
		}
		if err != nil {
			cn.close(err)
			return
		}
		cn.mu.Lock()
		cl := cn.pending[h.ID]
		delete(cn.pending, h.ID)
		cn.mu.Unlock()
		fail := func(err error) {
			cn.close(err)
			if cl != nil {
				cl.err = cn.broken()
				close(cl.done)
			}
		}
		var buf []byte
		if cl != nil && cl.dst != nil && pageproto.Status(h.Arg) == pageproto.StatusOK {
			if int(h.Length) != len(cl.dst) {
				fail(fmt.Errorf("%w: load answered with %d bytes, %d asked", pageproto.ErrBadFrame, h.Length, len(cl.dst)))
				return
			}
			buf = cl.dst
		} else {
			buf = make([]byte, h.Length) // bounded by Parse
		}
		if _, err := io.ReadFull(cn.br, buf); err != nil {
			fail(err)
			return
		}
		if cl == nil {
			continue // abandoned by a cancelled caller
		}
		cl.h = h
		if cl.dst == nil {
			cl.msg = buf
		}
		close(cl.done)
	}
}
