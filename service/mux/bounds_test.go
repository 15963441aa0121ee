package mux

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"
)

// waitGoroutines waits (bounded) for the goroutine count to come back to
// at most want, and fails with the stacks if it does not.
func waitGoroutines(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, want at most %d:\n%s", runtime.NumGoroutine(), want, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A peer that opens streams past the accept backlog and never reads what
// it is sent costs this side one goroutine and a bounded queue, not a
// goroutine per refused stream; past the bound the session ends.
func TestRefusedStreamsBounded(t *testing.T) {
	base := runtime.NumGoroutine()
	a, b := net.Pipe()
	defer a.Close()
	sv := Server(b, Config{WriteTimeout: time.Hour, KeepAlive: time.Hour})
	defer sv.Close()
	var in []byte
	id := uint32(1)
	for range 20000 {
		in = append(in, frame(typeData, flagSYN, id, 0, nil)...)
		id += 2
	}
	a.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := a.Write(in); err != nil {
		t.Fatal(err)
	}
	// The receive loop took every byte but the up to 64 KiB it buffers;
	// with a goroutine per refused stream there would be thousands.
	if n := runtime.NumGoroutine() - base; n > 50 {
		t.Fatalf("%d goroutines for a session with refused streams", n)
	}
	// Going on until the queue is full ends the session.
	in = in[:0]
	for range maxControlQueue/headerSize + 1 {
		in = append(in, frame(typeData, flagSYN, id, 0, nil)...)
		id += 2
	}
	in = append(in, make([]byte, 64<<10)...) // past the reader's buffer
	a.Write(in)
	select {
	case <-sv.CloseChan():
	case <-time.After(30 * time.Second):
		t.Fatal("session still open with its control queue full")
	}
	if !errors.Is(sv.Err(), ErrProtocol) {
		t.Fatalf("err = %v, want ErrProtocol", sv.Err())
	}
}

// Tiny frames do not cost a buffer each: a stream's queue stays near the
// bytes it holds.
func TestTinyFramesCoalesce(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	sv := Server(b, Config{})
	defer sv.Close()
	const n = 1 << 16
	in := frame(typeData, flagSYN, 1, 1, []byte{0})
	for i := 1; i < n; i++ {
		in = append(in, frame(typeData, 0, 1, 1, []byte{byte(i)})...)
	}
	in = append(in, frame(typePing, 0, 0, 42, nil)...)
	go func() {
		a.SetWriteDeadline(time.Now().Add(30 * time.Second))
		a.Write(in)
	}()
	// The ping's answer comes after every frame before it was applied.
	a.SetReadDeadline(time.Now().Add(30 * time.Second))
	var h [headerSize]byte
	if _, err := io.ReadFull(a, h[:]); err != nil {
		t.Fatal(err)
	}
	if h[0] != typePing || h[1] != flagACK {
		t.Fatalf("frame %v, want the ping's answer", h)
	}
	st, err := sv.AcceptStream()
	if err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	chunks, queued := len(st.recv), st.recvN
	st.mu.Unlock()
	if queued != n {
		t.Fatalf("%d bytes queued, want %d", queued, n)
	}
	if chunks > n/minChunk+1 {
		t.Fatalf("%d chunks for %d one-byte frames, want at most %d", chunks, n, n/minChunk+1)
	}
	got := make([]byte, n)
	if _, err := io.ReadFull(st, got); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if got[i] != byte(i) {
			t.Fatalf("byte %d = %d, want %d", i, got[i], byte(i))
		}
	}
}

// Frames the receive loop still applies after the session ended (they
// were buffered) open no stream: one made then would never fail.
func TestNoStreamAfterClose(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	sv := Server(b, Config{})
	sv.Close()
	st, err := sv.stream(1, flagSYN)
	if st != nil || err == nil {
		t.Fatalf("stream %v, err %v after Close; want none and an error", st, err)
	}
	select {
	case st := <-sv.accept:
		t.Fatalf("stream %d queued for accept after Close", st.id)
	default:
	}
}

// Many sessions with many streams each, echoed and closed (cleanly,
// reset, or by the session's end): every goroutine ends.
func TestNoGoroutineLeak(t *testing.T) {
	base := runtime.NumGoroutine()
	for range 5 {
		a, b := tcpPair(t)
		cl, sv := Client(a, Config{}), Server(b, Config{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				st, err := sv.AcceptStream()
				if err != nil {
					return
				}
				go func() {
					io.Copy(st, st)
					st.CloseWrite()
					st.Close()
				}()
			}
		}()
		for i := range 40 {
			st, err := cl.OpenStream()
			if err != nil {
				t.Fatal(err)
			}
			st.SetDeadline(time.Now().Add(20 * time.Second))
			msg := bytes.Repeat([]byte{byte(i)}, 1000*i+1)
			if _, err := st.Write(msg); err != nil {
				t.Fatal(err)
			}
			switch i % 3 {
			case 0: // clean: both sides FIN
				st.CloseWrite()
				got, err := io.ReadAll(st)
				if err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("stream %d: %d bytes, %v", i, len(got), err)
				}
				st.Close()
			case 1: // reset
				st.Reset()
			case 2: // left open: the session's end fails it
			}
		}
		cl.Close()
		<-done
		sv.Close()
	}
	waitGoroutines(t, base)
}

// slowClose is a connection whose Close waits until release is closed
// (as a TLS connection's close alert waits on a peer that does not read).
type slowClose struct {
	net.Conn
	release chan struct{}
}

func (c slowClose) Close() error {
	<-c.release
	return c.Conn.Close()
}

// A session's streams fail when it ends, not when its connection has
// finished closing.
func TestStreamsFailBeforeConnCloses(t *testing.T) {
	a, b := tcpPair(t)
	release := make(chan struct{})
	defer close(release)
	cl := Client(slowClose{a, release}, Config{})
	sv := Server(b, Config{})
	defer sv.Close()
	st, err := cl.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	go func() {
		_, err := st.Read(make([]byte, 1))
		read <- err
	}()
	go cl.Close()
	select {
	case err := <-read:
		if !errors.Is(err, ErrSessionClosed) {
			t.Fatalf("read: %v, want ErrSessionClosed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("stream still open while its session's connection closes")
	}
}

// A stream opened and not written yet (its peer knows nothing of it)
// fails with its session: a Read waiting on it returns.
func TestUnsentStreamFailsWithSession(t *testing.T) {
	cl, _ := sessions(t, Config{})
	st, err := cl.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	go func() {
		_, err := st.Read(make([]byte, 1))
		read <- err
	}()
	cl.Close()
	select {
	case err := <-read:
		if !errors.Is(err, ErrSessionClosed) {
			t.Fatalf("read: %v, want ErrSessionClosed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("read of an unsent stream still waiting after its session closed")
	}
}
