package mux

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		ch <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-ch
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func sessions(t testing.TB, cfg Config) (*Session, *Session) {
	a, b := tcpPair(t)
	cl, sv := Client(a, cfg), Server(b, cfg)
	t.Cleanup(func() { cl.Close(); sv.Close() })
	return cl, sv
}

func accept(t *testing.T, sv *Session) *Stream {
	t.Helper()
	ch := make(chan *Stream, 1)
	go func() {
		st, err := sv.AcceptStream()
		if err != nil {
			t.Error(err)
		}
		ch <- st
	}()
	select {
	case st := <-ch:
		if st == nil {
			t.FailNow()
		}
		return st
	case <-time.After(5 * time.Second):
		t.Fatal("no stream accepted")
		return nil
	}
}

// Bytes cross both ways; each side's CloseWrite is the other's EOF, and
// the other direction goes on after it.
func TestStreamHalfClose(t *testing.T) {
	cl, sv := sessions(t, Config{})
	c, err := cl.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "hello")
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	s := accept(t, sv)
	s.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "hello" {
		t.Fatalf("server read %q, %v", got, err)
	}
	io.WriteString(s, strings.ToUpper(string(got)))
	s.CloseWrite()
	back, err := io.ReadAll(c)
	if err != nil || string(back) != "HELLO" {
		t.Fatalf("client read %q, %v", back, err)
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Error("write after CloseWrite succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for cl.NumStreams()+sv.NumStreams() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("streams left: client %d, server %d", cl.NumStreams(), sv.NumStreams())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A reset reaches the peer as an error on its reads (after the bytes
// sent before it) and writes, never as EOF.
func TestStreamReset(t *testing.T) {
	cl, sv := sessions(t, Config{})
	c, _ := cl.OpenStream()
	io.WriteString(c, "abc")
	s := accept(t, sv)
	s.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 3)
	if _, err := io.ReadFull(s, buf); err != nil {
		t.Fatal(err)
	}
	io.WriteString(s, "before the reset")
	time.Sleep(50 * time.Millisecond)
	c.Reset()
	if _, err := s.Read(buf); !errors.Is(err, ErrReset) {
		t.Fatalf("server read after the client's reset: %v, want ErrReset", err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, ErrReset) {
		t.Fatalf("server write after the client's reset: %v, want ErrReset", err)
	}
	if _, err := c.Read(buf); !errors.Is(err, ErrAborted) {
		t.Fatalf("client read after its own reset: %v", err)
	}
	// Bytes that came before a reset are still read.
	c2, _ := cl.OpenStream()
	io.WriteString(c2, "x")
	s2 := accept(t, sv)
	io.WriteString(s2, "last words")
	s2.Reset()
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c2)
	if string(got) != "last words" || !errors.Is(err, ErrReset) {
		t.Fatalf("read %q, %v; want the bytes then ErrReset", got, err)
	}
}

// A sender has at most Window bytes in flight: a reader that does not
// read stops it (the write times out), and reading lets it go on.
func TestFlowControl(t *testing.T) {
	cl, sv := sessions(t, Config{})
	c, _ := cl.OpenStream()
	c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	n, err := c.Write(make([]byte, 3*Window))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("write past the window: %d bytes, %v; want a timeout", n, err)
	}
	if n != Window {
		t.Fatalf("%d bytes written before blocking, want %d", n, Window)
	}
	s := accept(t, sv)
	s.SetDeadline(time.Now().Add(10 * time.Second))
	c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	done := make(chan error, 1)
	go func() {
		_, err := c.Write(make([]byte, 2*Window))
		if err == nil {
			err = c.CloseWrite()
		}
		done <- err
	}()
	got, err := io.Copy(io.Discard, s)
	if err != nil || got != 3*Window {
		t.Fatalf("read %d bytes, %v; want %d", got, err, 3*Window)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// When a session ends, its streams fail (not EOF) on both sides, and
// no new stream opens on it.
func TestSessionCloseFailsStreams(t *testing.T) {
	cl, sv := sessions(t, Config{})
	c, _ := cl.OpenStream()
	io.WriteString(c, "x")
	s := accept(t, sv)
	s.SetDeadline(time.Now().Add(10 * time.Second))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 1)
	io.ReadFull(s, b)
	cl.Close()
	if _, err := c.Read(b); !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("client stream read: %v, want ErrSessionClosed", err)
	}
	if _, err := s.Read(b); err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("server stream read: %v, want a failure", err)
	}
	if _, err := cl.OpenStream(); err == nil {
		t.Fatal("stream opened on a closed session")
	}
	select {
	case <-sv.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("server session still open")
	}
}

// A peer that sends nothing (no frame, no ping answer) is dropped after
// three keepalive periods.
func TestKeepAliveDropsSilentPeer(t *testing.T) {
	a, b := net.Pipe()
	go io.Copy(io.Discard, b) // reads the pings, never answers
	defer b.Close()
	cl := Client(a, Config{KeepAlive: 20 * time.Millisecond})
	select {
	case <-cl.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("session to a silent peer still open")
	}
	if err := cl.Err(); !strings.Contains(err.Error(), "sent nothing") {
		t.Fatalf("err = %v", err)
	}
	// An answering peer keeps it open (idle for 5 keepalive periods).
	cl2, _ := sessions(t, Config{KeepAlive: 200 * time.Millisecond})
	time.Sleep(time.Second)
	if cl2.IsClosed() {
		t.Fatalf("session with a live peer closed: %v", cl2.Err())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := cl2.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestReadDeadline(t *testing.T) {
	cl, _ := sessions(t, Config{})
	c, _ := cl.OpenStream()
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past its deadline: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	c.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.As(err, &ne) {
		t.Fatalf("read with a past deadline: %v", err)
	}
}

// Delivered straight to a socket whose reader is slow (the socket fills,
// writes are partial, the rest is queued), the bytes still arrive whole
// and in order, and Delivered plus what Read returned is all of them.
func TestDeliverToSlowReader(t *testing.T) {
	cl, sv := sessions(t, Config{})
	sinkW, sinkR := tcpPair(t)
	const size = 16 << 20
	c, _ := cl.OpenStream()
	go func() {
		buf := make([]byte, 40000) // frames and socket writes out of step
		for sent := 0; sent < size; {
			n := min(len(buf), size-sent)
			for i := range n {
				buf[i] = byte((sent + i) % 251)
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			sent += n
		}
		c.CloseWrite()
	}()
	s := accept(t, sv)
	s.DeliverTo(sinkW)
	copied := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(sinkW, s)
		sinkW.(*net.TCPConn).CloseWrite()
		copied <- n
	}()
	sinkR.SetDeadline(time.Now().Add(30 * time.Second))
	got := 0
	buf := make([]byte, 7000)
	for {
		n, err := sinkR.Read(buf)
		for i := range n {
			if buf[i] != byte((got+i)%251) {
				t.Fatalf("byte %d differs", got+i)
			}
		}
		got += n
		if got%(1<<20) < n {
			time.Sleep(5 * time.Millisecond) // slow: let the socket fill
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", got, err)
		}
	}
	if got != size {
		t.Fatalf("%d bytes, want %d", got, size)
	}
	if n := <-copied + s.Delivered(); n != size {
		t.Fatalf("copied plus delivered = %d, want %d", n, size)
	}
}

func frame(typ, flags byte, id, length uint32, body []byte) []byte {
	h := []byte{typ, flags}
	h = binary.BigEndian.AppendUint32(h, id)
	h = binary.BigEndian.AppendUint32(h, length)
	return append(h, body...)
}

// Frames that break the protocol end the session with ErrProtocol.
func TestProtocolErrors(t *testing.T) {
	big := make([]byte, MaxFrame)
	over := []byte{}
	for sent := 0; sent <= Window; sent += MaxFrame {
		flags := byte(0)
		if sent == 0 {
			flags = flagSYN
		}
		over = append(over, frame(typeData, flags, 1, MaxFrame, big)...)
	}
	for name, in := range map[string][]byte{
		"unknown type":        frame(9, 0, 1, 0, nil),
		"unknown flag":        frame(typeData, 0x40, 1, 0, nil),
		"data too big":        frame(typeData, flagSYN, 1, MaxFrame+1, nil),
		"stream 0":            frame(typeData, flagSYN, 0, 0, nil),
		"never opened":        frame(typeData, 0, 5, 1, []byte("x")),
		"even id":             frame(typeData, flagSYN, 2, 0, nil),
		"SYN twice":           append(frame(typeData, flagSYN, 1, 0, nil), frame(typeData, flagSYN, 1, 0, nil)...),
		"SYN reusing":         append(frame(typeData, flagSYN, 3, 0, nil), frame(typeData, flagSYN, 1, 0, nil)...),
		"data after FIN":      append(frame(typeData, flagSYN|flagFIN, 1, 0, nil), frame(typeData, 0, 1, 1, []byte("x"))...),
		"window past 1 GiB":   append(frame(typeData, flagSYN, 1, 0, nil), frame(typeWindow, 0, 1, 1<<30, nil)...),
		"window overrun":      over,
		"ping on a stream":    frame(typePing, 0, 1, 0, nil),
		"ACK on stream frame": frame(typeData, flagSYN|flagACK, 1, 0, nil),
	} {
		t.Run(name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			sv := Server(b, Config{})
			defer sv.Close()
			go io.Copy(io.Discard, a)
			go func() {
				for {
					if _, err := sv.AcceptStream(); err != nil {
						return
					}
				}
			}()
			a.SetWriteDeadline(time.Now().Add(5 * time.Second))
			a.Write(in)
			select {
			case <-sv.CloseChan():
			case <-time.After(5 * time.Second):
				t.Fatal("session still open")
			}
			if !errors.Is(sv.Err(), ErrProtocol) {
				t.Fatalf("err = %v, want ErrProtocol", sv.Err())
			}
		})
	}
}

// FuzzServer: whatever a peer sends, a server session neither panics nor
// outlives its connection, and its streams end with it.
func FuzzServer(f *testing.F) {
	f.Add(append(frame(typeData, flagSYN, 1, 5, []byte("hello")), frame(typeData, flagFIN, 1, 0, nil)...))
	f.Add(append(frame(typeData, flagSYN, 1, 1, []byte("x")), frame(typeWindow, flagRST, 1, 0, nil)...))
	f.Add(append(frame(typePing, 0, 0, 7, nil), frame(typePing, flagACK, 0, 7, nil)...))
	f.Add(append(frame(typeData, flagSYN, 3, 0, nil), frame(typeWindow, 0, 3, 1<<20, nil)...))
	f.Add(frame(typeData, flagSYN, 1, MaxFrame+1, nil))
	f.Add([]byte{0, 1, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		sv := Server(b, Config{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				st, err := sv.AcceptStream()
				if err != nil {
					return
				}
				go func() {
					st.SetDeadline(time.Now().Add(time.Second))
					io.Copy(st, st)
					st.Close()
				}()
			}
		}()
		go io.Copy(io.Discard, a)
		a.SetWriteDeadline(time.Now().Add(time.Second))
		a.Write(in)
		a.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("server session still running 5 s after its connection closed")
		}
	})
}
