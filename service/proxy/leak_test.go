package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/onebox-project/onebox/service/wire"
)

// Client connections through sessions, sessions cut and redialed: once
// the sessions end, every goroutine they and their streams started
// (both ends, the splices, the local connections) has ended too.
func TestSessionsNoGoroutineLeak(t *testing.T) {
	_, addr, conns := echoThroughSession(t)
	base := runtime.NumGoroutine()
	for round := range 4 {
		var wg sync.WaitGroup
		for i := range 25 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				line := strconv.Itoa(round) + "-" + strconv.Itoa(i)
				if got, err := ask(t, addr, line); err != nil || got != "a: "+line {
					t.Errorf("%s: %q, %v", line, got, err)
				}
			}()
		}
		wg.Wait()
		for _, c := range conns() {
			c.Close() // ends the session on both sides
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A session that ends while a stream's request waits for its answer (the
// peer's agent restarted; this side had not read that yet) is replaced
// and the request goes on the new session instead of failing.
func TestSessionsRedialWhenSessionEndsUnderRequest(t *testing.T) {
	pa, stop := echoServer(t, "a")
	defer stop()
	baddr, _, _ := backendConns(t)
	// A peer that accepts the session, then drops it when the first
	// stream's frame arrives, without answering.
	fake, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer fake.Close()
	go func() {
		c, err := fake.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := wire.ReadRequest(c); err != nil {
			return
		}
		c.Write(wire.AppendReply(nil, wire.Reply{}))
		c.Read(make([]byte, 1)) // the stream's first frame
	}()
	var dials atomic.Int32
	ss := &Sessions{Dial: func(ctx context.Context, _ string) (net.Conn, error) {
		addr := baddr
		if dials.Add(1) == 1 {
			addr = fake.Addr().String()
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}}
	defer ss.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := ss.Open(ctx, "backend", wire.Request{Kind: wire.KindConnect, Port: uint16(pa)})
	if err != nil {
		t.Fatalf("open: %v (after %d session dials)", err, dials.Load())
	}
	defer c.Close()
	io.WriteString(c, "x\n")
	if got, err := bufio.NewReader(c).ReadString('\n'); err != nil || got != "a: x\n" {
		t.Fatalf("%q, %v", got, err)
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d session dials, want 2", n)
	}
}
