package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/onebox-project/onebox/service/balance"
	"github.com/onebox-project/onebox/service/wire"
)

// Many client connections, one after another and at once, share one
// fabric connection.
func TestSessionsShareOneConnection(t *testing.T) {
	_, addr, conns := echoThroughSession(t)
	for i := range 20 {
		if got, err := ask(t, addr, "x"); err != nil || got != "a: x" {
			t.Fatalf("connection %d: %q, %v", i, got, err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := ask(t, addr, "y"); err != nil || got != "a: y" {
				errs <- errors.New(got)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent connection: %v", err)
	}
	if n := len(conns()); n != 1 {
		t.Errorf("%d fabric connections for 40 client connections, want 1", n)
	}
}

// A session cut under an open connection fails that connection at once
// (an error, not a clean end of data, and no hang), and the next client
// connection is carried on a new session.
func TestSessionCutMidStream(t *testing.T) {
	f, addr, conns := echoThroughSession(t)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	rd := bufio.NewReader(c)
	io.WriteString(c, "before\n")
	if s, err := rd.ReadString('\n'); err != nil || s != "a: before\n" {
		t.Fatalf("before the cut: %q, %v", s, err)
	}
	for _, fc := range conns() {
		fc.Close()
	}
	start := time.Now()
	io.WriteString(c, "after\n")
	s, err := rd.ReadString('\n')
	if err == nil {
		t.Fatalf("the cut connection answered %q", s)
	}
	// The proxy aborts the client's socket (SO_LINGER 0: a reset, see
	// TestSpliceFailedCloseWriteAborts for that path). On loopback under
	// load the client was seen to read EOF instead of ECONNRESET in 9 of
	// 200 runs, with the abort path taken (instrumented Splice), so
	// here the test asks only that no answer comes and nothing hangs.
	if errors.Is(err, io.EOF) {
		t.Logf("the cut connection read EOF (the reset raced, see above)")
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the cut connection hung until its deadline (%v)", time.Since(start))
	}
	if got, err := ask(t, addr, "next"); err != nil || got != "a: next" {
		t.Fatalf("next connection: %q, %v", got, err)
	}
	if n := len(conns()); n != 2 {
		t.Errorf("%d fabric connections, want 2 (one redial after the cut)", n)
	}
	if st := f.Pool.States()[0]; !st.Healthy {
		t.Errorf("target marked down by a lost session: %+v", st)
	}
}

// Half-close crosses a session: the client's FIN reaches the server as
// end of data, and the answer still comes back.
func TestSessionHalfClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				b, _ := io.ReadAll(c) // until the client's half-close
				io.WriteString(c, strings.ToUpper(string(b)))
				c.Close()
			}()
		}
	}()
	baddr, _ := backend(t)
	f := newFrontend(t, baddr, balance.RoundRobin, ln.Addr().(*net.TCPAddr).Port)
	addr := serve(t, f)
	for range 3 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "hello")
		c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(b) != "HELLO" {
			t.Fatalf("got %q, %v", b, err)
		}
	}
}

// Bulk data both ways through a session arrives whole (flow control
// lets a stream send more than its initial window).
func TestSessionBulk(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(c, c) // echo until the half-close, then close
		c.Close()
	}()
	baddr, _ := backend(t)
	f := newFrontend(t, baddr, balance.RoundRobin, ln.Addr().(*net.TCPAddr).Port)
	addr := serve(t, f)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	const size = 8 << 20
	go func() {
		buf := make([]byte, 64<<10)
		for sent := 0; sent < size; sent += len(buf) {
			for i := range buf {
				buf[i] = byte(sent + i)
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
		c.(*net.TCPConn).CloseWrite()
	}()
	got := 0
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		for i := range n {
			if buf[i] != byte(got+i) {
				t.Fatalf("byte %d differs", got+i)
			}
		}
		got += n
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", got, err)
		}
	}
	if got != size {
		t.Fatalf("%d bytes back, want %d", got, size)
	}
}

// A session request, then frames.
func sessionBytes(frames ...[]byte) []byte {
	b, _ := wire.AppendRequest(nil, wire.Request{Kind: wire.KindSession})
	for _, f := range frames {
		b = append(b, f...)
	}
	return b
}

// frame is a mux frame: type, flags, stream id, length, then body.
func frame(typ, flags byte, id, length uint32, body []byte) []byte {
	h := []byte{typ, flags}
	h = binary.BigEndian.AppendUint32(h, id)
	h = binary.BigEndian.AppendUint32(h, length)
	return append(h, body...)
}

// FuzzBackendServeConn: whatever a member sends on a service connection
// (session request, mux frames, stream headers), the backend neither
// panics nor keeps serving after the connection ends, and it never
// connects anywhere but through Local.
func FuzzBackendServeConn(f *testing.F) {
	connect, _ := wire.AppendRequest(nil, wire.Request{Kind: wire.KindConnect, Port: 8000})
	check, _ := wire.AppendRequest(nil, wire.Request{Kind: wire.KindCheck, Port: 8000, GID: "g0123456789ab"})
	session, _ := wire.AppendRequest(nil, wire.Request{Kind: wire.KindSession})
	const syn, fin, rst = 1, 2, 4
	f.Add(sessionBytes(frame(0, syn, 1, uint32(len(connect)), connect), frame(0, 0, 1, 5, []byte("hello")), frame(1, 0, 1, 1000, nil), frame(0, fin, 1, 0, nil)))
	f.Add(sessionBytes(frame(0, syn, 1, uint32(len(check)), check), frame(0, syn, 3, uint32(len(connect)), connect), frame(1, rst, 3, 0, nil)))
	f.Add(sessionBytes(frame(0, syn, 3, uint32(len(session)), session), frame(1, rst, 3, 0, nil)))
	f.Add(sessionBytes(frame(2, 0, 0, 7, nil), frame(2, 8, 0, 7, nil), frame(3, 0, 0, 0, nil)))
	f.Add(sessionBytes(frame(0, syn, 1, 1<<30, nil)))
	f.Add(sessionBytes(frame(0, syn|fin, 1, 0, nil), frame(0, 0, 1, 1, []byte("x"))))
	f.Add(sessionBytes([]byte{1, 9, 0, 0}))
	f.Add(connect)
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		b := &Backend{
			HeaderTimeout: 200 * time.Millisecond,
			Local: func(ctx context.Context, req wire.Request) (net.Conn, wire.Reply) {
				if req.Port == 8000 && req.GID == "" {
					a, c := net.Pipe()
					go func() { io.Copy(io.Discard, c); c.Close() }()
					return a, wire.Reply{}
				}
				return nil, wire.Reply{Status: wire.StatusRefused, Message: "refused"}
			},
		}
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() { b.ServeConn(server, "peer"); close(done) }()
		go io.Copy(io.Discard, client)
		client.SetWriteDeadline(time.Now().Add(time.Second))
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("ServeConn still running 5 s after its connection closed")
		}
		closed := make(chan struct{})
		go func() { b.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not end the streams")
		}
	})
}
