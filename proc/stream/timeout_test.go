package stream_test

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"testing/synctest"
	"time"

	"github.com/onebox-project/onebox/proc/stream"
)

// tcpPair is a connected loopback TCP pair.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(acc)
			return
		}
		acc <- c
	}()
	a, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b, ok := <-acc
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// A peer that stops reading: the writes fail once the kernel's buffers are
// full and a frame has waited the timeout, instead of blocking for good.
func TestWriteTimeoutReaderStops(t *testing.T) {
	a, _ := tcpPair(t) // the other end never reads
	c := stream.NewConn(a, nil)
	c.SetWriteTimeout(100 * time.Millisecond)
	payload := make([]byte, stream.MaxPayload)
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 1<<12; i++ { // 4 GiB: far beyond any socket buffer
			if err := c.Write(stream.Stdout, payload); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if !errors.Is(err, stream.ErrWriteTimeout) || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("write to a peer that reads nothing: %v, want a write timeout", err)
		}
	case <-time.After(time.Minute): // a no-hang bound, not a timing check
		t.Fatal("a write to a peer that reads nothing is still blocked after a minute")
	}
}

// A reader that keeps reading gets a stream much longer than the timeout
// allows to buffer: the deadline is per frame.
func TestWriteTimeoutHealthyReader(t *testing.T) {
	a, b := tcpPair(t)
	c := stream.NewConn(a, nil)
	c.SetWriteTimeout(30 * time.Second)
	const frames = 64
	go func() {
		payload := make([]byte, stream.MaxPayload)
		for i := 0; i < frames; i++ {
			if err := c.Write(stream.Stdout, payload); err != nil {
				t.Errorf("frame %d: %v", i, err)
				break
			}
		}
		a.Close()
	}()
	r := stream.NewConn(b, nil)
	buf := make([]byte, stream.MaxPayload)
	n := 0
	for {
		_, err := r.ReadInto(buf)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n != frames {
		t.Fatalf("read %d frames, want %d", n, frames)
	}
}

// deadlineRecorder records the write deadlines set before each write.
type deadlineRecorder struct {
	deadlines []time.Time
	writes    int
}

func (d *deadlineRecorder) Read([]byte) (int, error)    { return 0, io.EOF }
func (d *deadlineRecorder) Write(p []byte) (int, error) { d.writes++; return len(p), nil }
func (d *deadlineRecorder) Close() error                { return nil }
func (d *deadlineRecorder) SetWriteDeadline(t time.Time) error {
	d.deadlines = append(d.deadlines, t)
	return nil
}

func TestWriteTimeoutPerFrame(t *testing.T) {
	for _, tc := range []struct {
		name      string
		timeout   time.Duration
		deadlines int // set per write of the three below
	}{
		{"none", 0, 0},
		{"a minute", time.Minute, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				d := &deadlineRecorder{}
				c := stream.NewConn(d, nil)
				c.SetWriteTimeout(tc.timeout)
				_ = c.Write(stream.Stdout, []byte("x"))
				time.Sleep(time.Second)
				_ = c.WriteJSON(stream.Restored, map[string]int{"pid": 1})
				time.Sleep(time.Second)
				_ = c.WriteEncoded([]byte{byte(stream.FilesDone), 0, 0, 0, 0})
				if d.writes != 3 || len(d.deadlines) != tc.deadlines {
					t.Fatalf("%d writes, %d deadlines; want 3, %d", d.writes, len(d.deadlines), tc.deadlines)
				}
				for i, dl := range d.deadlines {
					// Each from the time of its own frame (fake clock).
					if want := time.Now().Add(time.Duration(i-2)*time.Second + tc.timeout); !dl.Equal(want) {
						t.Errorf("deadline %d: %v, want %v", i, dl, want)
					}
				}
			})
		})
	}
}

// The default bound an agent uses (a minute), on a synchronous pipe whose
// reader never reads, in the fake time of a synctest bubble.
func TestWriteTimeoutPipeSynctest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		c := stream.NewConn(a, nil)
		c.SetWriteTimeout(time.Minute)
		start := time.Now()
		err := c.Write(stream.Stdout, []byte("nobody reads this"))
		if !errors.Is(err, stream.ErrWriteTimeout) {
			t.Fatalf("write to a pipe nobody reads: %v", err)
		}
		if got := time.Since(start); got != time.Minute {
			t.Fatalf("the write failed after %v, want the timeout (1m)", got)
		}
	})
}
