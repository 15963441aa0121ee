package mux

import (
	"io"
	"net"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// deadlineConn records how much of its write deadline each Write had.
type deadlineConn struct {
	net.Conn // nil: only what a session calls is implemented
	once     sync.Once
	closed   chan struct{}
	mu       sync.Mutex
	deadline time.Time
	minLeft  time.Duration
	writes   int
}

func (c *deadlineConn) Read([]byte) (int, error) { <-c.closed; return 0, io.EOF }
func (c *deadlineConn) Close() error             { c.once.Do(func() { close(c.closed) }); return nil }
func (c *deadlineConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return nil
}

func (c *deadlineConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	left := time.Until(c.deadline)
	if c.writes == 0 || left < c.minLeft {
		c.minLeft = left
	}
	c.writes++
	return len(b), nil
}

// Every frame's write is given at least WriteTimeout, however the writes
// fall against the deadline's renewals (virtual time: synctest).
func TestWriteGetsWholeTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const timeout = 5 * time.Second
		c := &deadlineConn{closed: make(chan struct{})}
		s := Client(c, Config{WriteTimeout: timeout, KeepAlive: time.Hour})
		for range 30 {
			if err := s.writeFrame(typePing, flagACK, 0, 1, nil); err != nil {
				t.Fatal(err)
			}
			time.Sleep(700 * time.Millisecond)
		}
		s.Close()
		if c.minLeft < timeout {
			t.Fatalf("a frame's write had %v before its deadline, want at least %v", c.minLeft, timeout)
		}
	})
}
