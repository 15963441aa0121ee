// Package client is the member side of the onebox-fs/1 protocol: one
// connection per peer, dialled on first use and again after it breaks,
// carrying many requests at once (each with its own id) and bounding every
// request by a timeout, so a dead or unreachable peer turns into an errno
// (ENOTCONN, EIO) within a bounded time instead of a hang.
package client

import (
	"bufio"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/cfs/proto"
)

// Dialer opens a connection to the peer (TLS done, protocol negotiated).
type Dialer func(ctx context.Context) (net.Conn, error)

// Defaults.
const (
	DefaultTimeout     = 5 * time.Second
	DefaultDialTimeout = 3 * time.Second
	// RedialDelay is how long after a failed dial requests fail at once
	// instead of dialling again, so a dead peer is not hammered by every
	// file operation.
	RedialDelay = 500 * time.Millisecond
)

// Client talks to one peer.
type Client struct {
	// Observe, if set (before the first call), is called after every
	// request with its op, the errno returned and how long it took.
	Observe func(op proto.Op, errno syscall.Errno, d time.Duration)

	dial        Dialer
	timeout     time.Duration
	dialTimeout time.Duration

	mu      sync.Mutex
	cur     *conn     // guarded by mu; nil when not connected
	gen     uint64    // guarded by mu; increases with every connection
	dialErr time.Time // guarded by mu; when the last dial failed
	dialing chan struct{}
	closed  bool // guarded by mu
}

// New returns a client; timeout bounds each request (0: DefaultTimeout).
func New(dial Dialer, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{dial: dial, timeout: timeout, dialTimeout: min(timeout, DefaultDialTimeout)}
}

type result struct {
	op      proto.Op
	payload []byte
}

type conn struct {
	c        net.Conn
	gen      uint64
	wmu      sync.Mutex
	lastRecv atomic.Int64 // unix nanoseconds of the last frame received

	mu      sync.Mutex
	pending map[uint32]chan result // guarded by mu
	next    uint32                 // guarded by mu
	dead    bool                   // guarded by mu
	done    chan struct{}
}

// Close ends the connection; requests in flight fail with ENOTCONN.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	cur := c.cur
	c.cur = nil
	c.mu.Unlock()
	if cur != nil {
		cur.kill()
	}
	return nil
}

// Gen is the generation of the current connection (0: none). Handles are
// valid only on the connection that opened them.
func (c *Client) Gen() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		return 0
	}
	return c.cur.gen
}

// connect returns the live connection, dialling if needed.
func (c *Client) connect(ctx context.Context) (*conn, syscall.Errno) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, syscall.ENOTCONN
		}
		if c.cur != nil {
			cur := c.cur
			c.mu.Unlock()
			return cur, 0
		}
		if !c.dialErr.IsZero() && time.Since(c.dialErr) < RedialDelay {
			c.mu.Unlock()
			return nil, syscall.ENOTCONN
		}
		if c.dialing != nil {
			wait := c.dialing
			c.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, syscall.EIO
			}
		}
		c.dialing = make(chan struct{})
		c.mu.Unlock()

		dctx, cancel := context.WithTimeout(ctx, c.dialTimeout)
		nc, err := c.dial(dctx)
		cancel()
		c.mu.Lock()
		close(c.dialing)
		c.dialing = nil
		if err != nil {
			c.dialErr = time.Now()
			c.mu.Unlock()
			return nil, syscall.ENOTCONN
		}
		if c.closed {
			c.mu.Unlock()
			nc.Close()
			return nil, syscall.ENOTCONN
		}
		c.dialErr = time.Time{}
		c.gen++
		cn := &conn{c: nc, gen: c.gen, pending: map[uint32]chan result{}, done: make(chan struct{})}
		cn.lastRecv.Store(time.Now().UnixNano())
		c.cur = cn
		c.mu.Unlock()
		go c.readLoop(cn)
		return cn, 0
	}
}

// drop kills cn and forgets it, so the next request dials afresh.
func (c *Client) drop(cn *conn) {
	cn.kill()
	c.mu.Lock()
	if c.cur == cn {
		c.cur = nil
	}
	c.mu.Unlock()
}

func (c *Client) readLoop(cn *conn) {
	defer c.drop(cn)
	br := bufio.NewReaderSize(cn.c, 64<<10)
	for {
		f, err := proto.ReadFrame(br)
		if err != nil || f.Op&proto.ReplyBit == 0 {
			return
		}
		cn.lastRecv.Store(time.Now().UnixNano())
		cn.mu.Lock()
		ch, ok := cn.pending[f.ID]
		delete(cn.pending, f.ID)
		cn.mu.Unlock()
		if ok {
			ch <- result{op: f.Op &^ proto.ReplyBit, payload: f.Payload}
		}
	}
}

// kill closes the connection and fails every pending request.
func (cn *conn) kill() {
	cn.mu.Lock()
	if cn.dead {
		cn.mu.Unlock()
		return
	}
	cn.dead = true
	close(cn.done)
	cn.pending = nil
	cn.mu.Unlock()
	cn.c.Close()
}

// Call sends a request and decodes the reply into resp (nil for none). It
// returns the generation of the connection used and an errno: the peer's,
// ENOTCONN when the peer cannot be reached or the connection broke, EIO
// when the request timed out or the reply was malformed.
func (c *Client) Call(ctx context.Context, op proto.Op, req, resp proto.Msg) (uint64, syscall.Errno) {
	return c.call(ctx, 0, op, req, resp)
}

// CallOn is Call restricted to connection generation gen: requests on a
// handle opened on an earlier connection fail with EIO (the peer closed
// the handle with that connection).
func (c *Client) CallOn(ctx context.Context, gen uint64, op proto.Op, req, resp proto.Msg) syscall.Errno {
	_, errno := c.call(ctx, gen, op, req, resp)
	return errno
}

func (c *Client) call(ctx context.Context, gen uint64, op proto.Op, req, resp proto.Msg) (uint64, syscall.Errno) {
	if c.Observe == nil {
		return c.roundTrip(ctx, gen, op, req, resp)
	}
	start := time.Now()
	g, errno := c.roundTrip(ctx, gen, op, req, resp)
	c.Observe(op, errno, time.Since(start))
	return g, errno
}

func (c *Client) roundTrip(ctx context.Context, gen uint64, op proto.Op, req, resp proto.Msg) (uint64, syscall.Errno) {
	// Requests are bounded by the timeout only, not cancelled by the
	// caller: FUSE interrupts a request whenever its process gets a
	// signal (Go programs get SIGURG all the time), and failing a quick
	// operation with EINTR breaks programs that do not retry.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.timeout)
	defer cancel()
	cn, errno := c.connect(ctx)
	if errno != 0 {
		return 0, errno
	}
	if gen != 0 && cn.gen != gen {
		return cn.gen, syscall.EIO
	}
	ch := make(chan result, 1)
	cn.mu.Lock()
	if cn.dead {
		cn.mu.Unlock()
		return cn.gen, syscall.ENOTCONN
	}
	cn.next++
	if cn.next == 0 {
		cn.next = 1
	}
	id := cn.next
	cn.pending[id] = ch
	cn.mu.Unlock()
	forget := func() {
		cn.mu.Lock()
		if cn.pending != nil {
			delete(cn.pending, id)
		}
		cn.mu.Unlock()
	}

	size := 256
	if io, ok := req.(*proto.IOReq); ok {
		size += len(io.Data)
	}
	frame := proto.AppendMsgFrame(make([]byte, 0, size), id, op, req)
	cn.wmu.Lock()
	deadline, _ := ctx.Deadline()
	_ = cn.c.SetWriteDeadline(deadline)
	_, err := cn.c.Write(frame)
	cn.wmu.Unlock()
	if err != nil {
		forget()
		// A write that timed out may have left half a frame: the
		// connection cannot be used any more.
		c.drop(cn)
		return cn.gen, syscall.ENOTCONN
	}
	select {
	case r := <-ch:
		if r.op != op {
			c.drop(cn)
			return cn.gen, syscall.EIO
		}
		errno, err := proto.ParseReply(r.payload, resp)
		if err != nil {
			return cn.gen, syscall.EIO
		}
		return cn.gen, syscall.Errno(errno)
	case <-cn.done:
		return cn.gen, syscall.ENOTCONN
	case <-ctx.Done():
		forget()
		// The peer may be gone without a word (a cut link): if nothing
		// at all came back for a whole timeout, drop the connection, so
		// later requests dial afresh instead of each waiting out its own
		// timeout on a dead one. A peer still answering other requests
		// is only slow.
		if ctx.Err() == context.DeadlineExceeded && time.Since(time.Unix(0, cn.lastRecv.Load())) >= c.timeout {
			c.drop(cn)
		}
		return cn.gen, syscall.EIO
	}
}
