package pageserver

import (
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
)

// client speaks the protocol over a pipe as node peer.
type client struct {
	t  *testing.T
	c  net.Conn
	id uint64
}

func dial(t *testing.T, s *Server, peer string, instance uint64) *client {
	a, b := net.Pipe()
	names := map[net.Conn]string{b: peer}
	s.PeerName = func(c net.Conn) string { return names[c] }
	go s.ServeConn(b)
	t.Cleanup(func() { a.Close() })
	cl := &client{t: t, c: a}
	if st, _ := cl.do(pageproto.Header{Op: pageproto.OpHello, Arg: instance}, "", nil); st != pageproto.StatusOK {
		t.Fatalf("hello: %v", st)
	}
	return cl
}

func (cl *client) do(h pageproto.Header, owner string, data []byte) (pageproto.Status, []byte) {
	cl.t.Helper()
	cl.id++
	h.ID = cl.id
	cl.c.SetDeadline(time.Now().Add(5 * time.Second))
	go cl.c.Write(pageproto.AppendFrame(nil, h, owner, data))
	rh, p, err := pageproto.ReadFrame(cl.c, nil)
	if err != nil || rh.ID != h.ID || rh.Op != h.Op|pageproto.RespBit {
		cl.t.Fatalf("%v: response %+v, %v", h.Op, rh, err)
	}
	return pageproto.Status(rh.Arg), p
}

func TestPeersIsolatedAndRestartDrops(t *testing.T) {
	s := New(4*pageproto.PageSize, nil)
	page := bytes.Repeat([]byte{1}, pageproto.PageSize)
	n1 := dial(t, s, "n1", 11)
	if st, _ := n1.do(pageproto.Header{Op: pageproto.OpStore, Region: 1}, "o", page); st != pageproto.StatusOK {
		t.Fatal(st)
	}
	load := pageproto.Header{Op: pageproto.OpLoad, Region: 1, Arg: pageproto.PageSize}
	if _, p := n1.do(load, "o", nil); !bytes.Equal(p, page) {
		t.Fatal("n1 does not read its page back")
	}
	n2 := dial(t, s, "n2", 22)
	if _, p := n2.do(load, "o", nil); !bytes.Equal(p, make([]byte, pageproto.PageSize)) {
		t.Fatal("n2 reads n1's page")
	}
	// Capacity: 4 pages; n1 holds 1, so 4 more is refused whole.
	if st, msg := n2.do(pageproto.Header{Op: pageproto.OpStore, Region: 1}, "o", make([]byte, 4*pageproto.PageSize)); st != pageproto.StatusFull {
		t.Fatalf("store beyond capacity: %v %s", st, msg)
	}
	if st := s.Stat(); st.Used != pageproto.PageSize {
		t.Fatalf("used %d after a refused store", st.Used)
	}
	// Overwriting a held page needs no new room.
	if st, _ := n1.do(pageproto.Header{Op: pageproto.OpStore, Region: 1}, "o", page); st != pageproto.StatusOK {
		t.Fatal(st)
	}
	if st, _ := n1.do(pageproto.Header{Op: pageproto.OpReserve, Arg: 3 * pageproto.PageSize}, "o", nil); st != pageproto.StatusOK {
		t.Fatal(st)
	}
	if st, _ := n2.do(pageproto.Header{Op: pageproto.OpReserve, Arg: 2 * pageproto.PageSize}, "o", nil); st != pageproto.StatusFull {
		t.Fatalf("reserve beyond capacity: %v", st)
	}
	// n1 comes back as a new instance: its pages and reservations go.
	dial(t, s, "n1", 12)
	if st := s.Stat(); st.Used != 0 || st.Reserved != 0 {
		t.Fatalf("after n1 restarted: %+v", st)
	}
}

// FuzzServeConn: whatever a member sends, the server answers with frames
// that parse, never panics, never holds more than its capacity, and ends
// the connection when the input ends.
func FuzzServeConn(f *testing.F) {
	hello := pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpHello, ID: 1, Arg: 3}, "", nil)
	f.Add(hello)
	f.Add(append(bytes.Clone(hello), pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpStore, ID: 2, Region: 1}, "o", make([]byte, pageproto.PageSize))...))
	f.Add(append(bytes.Clone(hello), pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpLoad, ID: 2, Arg: pageproto.PageSize}, "o", nil)...))
	f.Add(append(bytes.Clone(hello), pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpReserve, ID: 2, Arg: 1 << 40}, "o", nil)...))
	f.Add([]byte("\x0bP\x02\x01\x00\x00\x10\x01"))
	f.Fuzz(func(t *testing.T, in []byte) {
		s := New(8*pageproto.PageSize, nil)
		a, b := net.Pipe()
		s.PeerName = func(net.Conn) string { return "n1" }
		done := make(chan struct{})
		go func() {
			s.ServeConn(b)
			close(done)
		}()
		go func() {
			a.Write(in)
			// Then nothing more: like a peer that closed its side.
			time.Sleep(10 * time.Millisecond)
			a.Close()
		}()
		a.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			h, _, err := pageproto.ReadFrame(a, nil)
			if err != nil {
				break
			}
			if h.Op&pageproto.RespBit == 0 {
				t.Fatalf("server sent a request %v", h.Op)
			}
		}
		a.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("ServeConn did not return")
		}
		if st := s.Stat(); st.Used > st.Capacity || st.Reserved > st.Capacity {
			t.Fatalf("beyond capacity: %+v", st)
		}
	})
}

// TestReservationsBounded: empty reservations keep no entry, and the
// number of owners holding one is bounded whatever their sizes.
func TestReservationsBounded(t *testing.T) {
	s := New(1<<40, nil)
	n1 := dial(t, s, "n1", 1)
	for i := range 100 {
		if st, _ := n1.do(pageproto.Header{Op: pageproto.OpReserve}, fmt.Sprint("o", i), nil); st != pageproto.StatusOK {
			t.Fatalf("reserve 0: %v", st)
		}
	}
	s.mu.Lock()
	n := len(s.owners)
	s.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d owners kept for reservations of 0 bytes", n)
	}
	s.mu.Lock()
	for i := range MaxOwners {
		s.owners[ownerKey{"n1", fmt.Sprint("p", i)}] = 1
	}
	s.reserved += MaxOwners
	s.mu.Unlock()
	if st, _ := n1.do(pageproto.Header{Op: pageproto.OpReserve, Arg: 1}, "new", nil); st != pageproto.StatusFull {
		t.Fatalf("reservation of owner %d: %v, want full", MaxOwners+1, st)
	}
	if st, _ := n1.do(pageproto.Header{Op: pageproto.OpReserve, Arg: 1}, "p0", nil); st != pageproto.StatusOK {
		t.Fatalf("more for an owner already holding some: %v", st)
	}
}
