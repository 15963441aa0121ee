package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"

	"net"
	"os"
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
	// The frame being read and when bytes last arrived; read token only.
	rs       rstate
	lastRead time.Time
	// heard is lastRead for anyone (Unix ns): a server that sent nothing
	// since a request is silent, not merely slow.
	heard atomic.Int64

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
	sent time.Time // when the request was handed to the connection
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
	cl := &call{dst: dst, op: h.Op, done: make(chan struct{}), sent: time.Now()}
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
	return cn.result(cl)
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
	if cn.waitUntil(cl, ctx.Done(), time.Time{}) {
		return nil
	}
	if !cn.abandon(cl) {
		// Its answer is being read: it goes to cl.dst, so wait for it
		// (within the connection's timeout).
		cn.waitUntil(cl, nil, time.Time{})
		return nil
	}
	return ctx.Err()
}

// waitUntil waits for cl, reading responses while it holds the read
// token, until cl is done (true) or until passes or stop closes (false:
// cl is still pending; wait again, or abandon it). A zero until and a nil
// stop wait for the answer or for the connection to break.
func (cn *conn) waitUntil(cl *call, stop <-chan struct{}, until time.Time) bool {
	var timer <-chan time.Time
	if !until.IsZero() {
		// Only a caller that cannot lead at once pays for a timer.
		select {
		case <-cl.done:
			return true
		case cn.readTok <- struct{}{}:
			return cn.lead(cl, stop, until)
		default:
		}
		t := time.NewTimer(time.Until(until))
		defer t.Stop()
		timer = t.C
	}
	select {
	case <-cl.done:
		return true
	case cn.readTok <- struct{}{}:
		return cn.lead(cl, stop, until)
	case <-stop:
		return false
	case <-timer:
		return false
	}
}

// lead reads responses for cl while holding the read token.
func (cn *conn) lead(cl *call, stop <-chan struct{}, until time.Time) bool {
	// Our response may have been delivered while we waited.
	select {
	case <-cl.done:
		<-cn.readTok
		return true
	default:
	}
	done := cn.readUntil(cl, stop, until)
	<-cn.readTok
	if done {
		// readUntil returns when cl is answered or the connection broke;
		// a close running on another goroutine may still be failing the
		// pending calls, cl among them.
		<-cl.done
	}
	return done
}

// abandon gives up on cl: true if it was still pending (its answer, if it
// comes, is read and dropped, and never written to cl.dst), false if its
// answer is done or being read (then wait for it: it goes to cl.dst).
func (cn *conn) abandon(cl *call) bool {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if _, still := cn.pending[cl.id]; still {
		delete(cn.pending, cl.id)
		cl.dst = nil
		return true
	}
	return false
}

// result is the outcome of a call that is done.
func (cn *conn) result(cl *call) (pageproto.Header, []byte, error) {
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

// pollSlice is how often a reader that may be told to stop looks up
// while no answer arrives.
const pollSlice = 2 * time.Millisecond

// rstate is the frame being read: a reader may give up in the middle of
// one (its caller hedges) and the next reader goes on from there.
type rstate struct {
	hb        [pageproto.HeaderSize]byte
	hn        int // header bytes read
	inPayload bool
	h         pageproto.Header
	cl        *call  // the frame's call; nil if abandoned
	buf       []byte // where the payload goes
	bn        int    // payload bytes read
}

// readUntil reads responses, handing each to its call, until mine is done
// or the connection breaks (true), or until passes or stop closes (false;
// a frame half read is finished by the next reader). The connection
// breaks when nothing arrives within the timeout of mine being sent or of
// the last bytes read, whichever is later.
func (cn *conn) readUntil(mine *call, stop <-chan struct{}, until time.Time) bool {
	rs := &cn.rs
	for {
		// A frame half read when mine is done is left for the next reader.
		select {
		case <-mine.done:
			return true
		default:
		}
		var dst []byte
		if rs.inPayload {
			dst = rs.buf[rs.bn:]
		} else {
			dst = rs.hb[rs.hn:]
		}
		if len(dst) > 0 {
			if cn.br.Buffered() == 0 {
				// A read timeout breaks neither the framing (what was read
				// is kept in rs) nor the TLS connection.
				hard := mine.sent
				if cn.lastRead.After(hard) {
					hard = cn.lastRead
				}
				hard = hard.Add(cn.timeout)
				d := hard
				if !until.IsZero() && until.Before(d) {
					d = until
				}
				if poll := time.Now().Add(pollSlice); stop != nil && poll.Before(d) {
					d = poll
				}
				_ = cn.c.SetReadDeadline(d)
				n, err := cn.br.Read(dst)
				if n > 0 {
					cn.lastRead = time.Now()
					cn.heard.Store(cn.lastRead.UnixNano())
				}
				if err != nil {
					now := time.Now()
					if !errors.Is(err, os.ErrDeadlineExceeded) || !now.Before(hard) {
						cn.close(err)
						cn.failFrame()
						return true
					}
					if !until.IsZero() && !now.Before(until) {
						return false
					}
					select {
					case <-stop:
						return false
					default:
					}
				}
				cn.advance(n)
			} else {
				n, _ := cn.br.Read(dst) // buffered: no error
				cn.advance(n)
			}
			continue
		}
		if !rs.inPayload {
			if err := cn.startFrame(); err != nil {
				cn.close(err)
				cn.failFrame()
				return true
			}
			continue
		}
		// A whole frame.
		cl := rs.cl
		h, buf := rs.h, rs.buf
		*rs = rstate{}
		if cl == nil {
			continue // abandoned by its caller
		}
		cl.h = h
		if cl.dst == nil {
			cl.msg = buf
		}
		close(cl.done)
	}
}

// advance counts n bytes read into the frame.
func (cn *conn) advance(n int) {
	if cn.rs.inPayload {
		cn.rs.bn += n
	} else {
		cn.rs.hn += n
	}
}

// startFrame decodes the header read and finds the frame's call and the
// buffer for its payload.
func (cn *conn) startFrame() error {
	rs := &cn.rs
	h, err := pageproto.Parse(rs.hb[:])
	if err == nil && h.Op&pageproto.RespBit == 0 {
		err = fmt.Errorf("%w: %v from the server", pageproto.ErrBadFrame, h.Op)
	}
	if err != nil {
		return err
	}
	cn.mu.Lock()
	cl := cn.pending[h.ID]
	delete(cn.pending, h.ID)
	cn.mu.Unlock()
	rs.h, rs.cl, rs.inPayload = h, cl, true
	if cl != nil && cl.dst != nil && pageproto.Status(h.Arg) == pageproto.StatusOK {
		if int(h.Length) != len(cl.dst) {
			return fmt.Errorf("%w: load answered with %d bytes, %d asked", pageproto.ErrBadFrame, h.Length, len(cl.dst))
		}
		rs.buf = cl.dst
	} else {
		rs.buf = make([]byte, h.Length) // bounded by Parse
	}
	return nil
}

// failFrame fails the call of the frame being read, which close no
// longer finds pending. Preconditions: the connection is closed.
func (cn *conn) failFrame() {
	if cl := cn.rs.cl; cl != nil {
		cn.rs.cl = nil
		cl.err = cn.broken()
		close(cl.done)
	}
}
