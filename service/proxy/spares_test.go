package proxy

import (
	"context"
	"net"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// Spares with fake time: none before the first Take, Max after it, handed
// out while fresh, all closed after MaxAge without a Take, none after Close.
func TestSpares(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		dials := 0
		var far []net.Conn // the other ends, to see closes
		s := &Spares{Max: 2, MaxAge: 3 * time.Second, Dial: func(ctx context.Context, key string) (net.Conn, error) {
			mu.Lock()
			defer mu.Unlock()
			dials++
			a, b := net.Pipe()
			far = append(far, b)
			return a, nil
		}}
		if c := s.Take("n2"); c != nil {
			t.Fatal("a spare before any was made")
		}
		synctest.Wait()
		if dials != 2 {
			t.Fatalf("%d dials after the first Take, want 2", dials)
		}
		c1 := s.Take("n2")
		if c1 == nil {
			t.Fatal("no spare after they were made")
		}
		synctest.Wait()
		if dials != 3 {
			t.Fatalf("%d dials after taking one, want 3 (replenished)", dials)
		}
		// Idle past MaxAge: the two spares left are closed.
		time.Sleep(4 * time.Second)
		synctest.Wait()
		closed := 0
		mu.Lock()
		for _, b := range far[1:] { // far[0] pairs with c1, still ours
			b.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := b.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
				closed++
			}
		}
		mu.Unlock()
		if closed != 2 {
			t.Fatalf("%d of 2 idle spares closed after MaxAge", closed)
		}
		c1.Close()
		s.Close()
		if c := s.Take("n2"); c != nil {
			t.Fatal("a spare after Close")
		}
	})
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
