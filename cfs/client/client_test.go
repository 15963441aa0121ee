package client

import (
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/proto"
)

// peer is a fake server: it answers OpExports unless mute, and can drop
// its connections.
type peer struct {
	mu    sync.Mutex
	mute  bool
	down  bool
	conns []net.Conn
}

func (p *peer) dial(context.Context) (net.Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return nil, errors.New("connection refused")
	}
	a, b := net.Pipe()
	p.conns = append(p.conns, b)
	go func() {
		for {
			f, err := proto.ReadFrame(b)
			if err != nil {
				return
			}
			p.mu.Lock()
			mute := p.mute
			p.mu.Unlock()
			if !mute {
				b.Write(proto.AppendFrame(nil, f.ID, f.Op|proto.ReplyBit, proto.Reply(0, &proto.ExportList{})))
			}
		}
	}()
	return a, nil
}

func (p *peer) set(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f()
}

func TestFSFailuresAreErrnosNotHangs(t *testing.T) {
	p := &peer{}
	c := New(p.dial, 200*time.Millisecond)
	defer c.Close()
	ctx := context.Background()
	var l proto.ExportList
	gen, errno := c.Call(ctx, proto.OpExports, &proto.Empty{}, &l)
	if errno != 0 || gen == 0 {
		t.Fatalf("call: gen %d errno %v", gen, errno)
	}

	// A peer that stops answering: EIO after the timeout, and the
	// connection is dropped.
	p.set(func() { p.mute = true })
	if _, errno := c.Call(ctx, proto.OpExports, &proto.Empty{}, &l); errno != syscall.EIO {
		t.Fatalf("mute peer: %v, want EIO", errno)
	}
	if c.Gen() != 0 {
		t.Fatal("connection to a mute peer kept")
	}

	// A peer that is down: ENOTCONN.
	p.set(func() { p.mute, p.down = false, true })
	if _, errno := c.Call(ctx, proto.OpExports, &proto.Empty{}, &l); errno != syscall.ENOTCONN {
		t.Fatalf("down peer: %v, want ENOTCONN", errno)
	}

	// Back: a new connection, and a handle of the old one is refused.
	p.set(func() { p.down = false })
	var gen2 uint64
	for range 50 {
		if gen2, errno = c.Call(ctx, proto.OpExports, &proto.Empty{}, &l); errno == 0 {
			break
		}
		time.Sleep(RedialDelay / 5)
	}
	if errno != 0 || gen2 == gen {
		t.Fatalf("after the peer came back: gen %d (was %d), %v", gen2, gen, errno)
	}
	if errno := c.CallOn(ctx, gen, proto.OpExports, &proto.Empty{}, &l); errno != syscall.EIO {
		t.Fatalf("request on a handle of a broken connection: %v, want EIO", errno)
	}

	// A connection that breaks with requests in flight: ENOTCONN.
	p.set(func() { p.mute = true })
	done := make(chan syscall.Errno)
	go func() {
		_, errno := c.Call(ctx, proto.OpExports, &proto.Empty{}, &l)
		done <- errno
	}()
	time.Sleep(20 * time.Millisecond)
	p.set(func() {
		for _, cn := range p.conns {
			cn.Close()
		}
	})
	if errno := <-done; errno != syscall.ENOTCONN && errno != syscall.EIO {
		t.Fatalf("broken connection: %v, want ENOTCONN", errno)
	}
}
