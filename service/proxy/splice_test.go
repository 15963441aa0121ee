package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// brokenStream is a stream whose CloseWrite fails (reset or session lost
// just as the end of data was to be sent); it records Reset.
type brokenStream struct {
	net.Conn // nil: only what Splice calls is implemented
	once     sync.Once
	done     chan struct{}
	reset    chan struct{}
}

func (c *brokenStream) Read([]byte) (int, error)    { <-c.done; return 0, net.ErrClosed }
func (c *brokenStream) Write(b []byte) (int, error) { return len(b), nil }
func (c *brokenStream) CloseWrite() error           { return errors.New("stream reset") }
func (c *brokenStream) Close() error                { c.once.Do(func() { close(c.done) }); return nil }
func (c *brokenStream) Reset() error {
	select {
	case <-c.reset:
	default:
		close(c.reset)
	}
	return c.Close()
}

// When the end of data cannot be passed on, the other side sees a reset,
// not a clean close.
func TestSpliceFailedCloseWriteAborts(t *testing.T) {
	x, y := tcpConnPair(t)
	st := &brokenStream{done: make(chan struct{}), reset: make(chan struct{})}
	spliced := make(chan struct{})
	go func() {
		Splice(st, y)
		close(spliced)
	}()
	x.(*net.TCPConn).CloseWrite() // y reads EOF: Splice passes it on, and fails
	x.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.ReadAll(x)
	if err == nil {
		t.Fatal("the client saw a clean end of data")
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read: %v, want a connection reset", err)
	}
	select {
	case <-st.reset:
	default:
		t.Error("the stream was closed, not reset")
	}
	<-spliced
}

func tcpConnPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	x, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	y, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { x.Close(); y.Close() })
	return x, y
}
